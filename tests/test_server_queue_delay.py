"""Queue-delay admission in the service (``export.serve_max_queue_delay_ms``, issue 30).

Fast: the config key's default and validation, its wiring into :class:`export.server.Batching`,
the ``/metrics`` collector's ``micrec_rejected_delay_total`` read from a real
:class:`export.batcher.MicroBatcher` that refused one item for its queue delay (the worker held
on a gate, the head's wait made clearly longer than the limit: 50 ms limit, 0.3 s sleep), and
serve_bench's derived latency bound worked by hand.

Slow: a real ``python -m export.server`` over tests/test_server.py's tiny export with batches of
one user, no batching window and a 1 microsecond queue delay: 32 concurrent ``:predict``
requests (in rounds until one is refused, at most 20) leave requests waiting behind the running
batch, so later arrivals find a head that waited longer than 1 us: 503 with ``Retry-After`` and
a one-line error naming ``max_queue_delay_ms``; every other answer is 200 and equal to the same
request answered alone before the load; ``micrec_rejected_delay_total`` and
``micrec_rejected_total`` both equal the 503s (the 512-request queue never filled). Nothing
asserts a duration.
"""
import asyncio
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from benchmarks import serve_bench
from export import server
from export.batcher import MicroBatcher, Overloaded


def test_config_default_and_validation():
    from micrec_tf.config import ConfigError, from_dict

    e = from_dict({}).export
    assert e.serve_max_queue_delay_ms == 500.0
    assert server.Batching.from_config(e).max_queue_delay_ms == 500.0
    assert server.Batching().max_queue_delay_ms == 500.0
    off = from_dict({"export": {"serve_max_queue_delay_ms": 0}}).export
    assert server.Batching.from_config(off).max_queue_delay_ms == 0.0
    assert server.Batching.from_config(
        from_dict({"export": {"serve_max_queue_delay_ms": 250}}).export).max_queue_delay_ms \
        == 250.0
    with pytest.raises(ConfigError,
                       match=r"^export.serve_max_queue_delay_ms must be >= 0, got -1"):
        from_dict({"export": {"serve_max_queue_delay_ms": -1}})
    with pytest.raises(ConfigError, match=r"^export.serve_max_queue_delay_ms must be a number"):
        from_dict({"export": {"serve_max_queue_delay_ms": "fast"}})


def test_metrics_count_delay_rejections_apart_from_the_total():
    import prometheus_client as prom

    gate, started = threading.Event(), threading.Event()

    def fn(items):
        started.set()
        assert gate.wait(30)
        return list(items)

    async def go():
        b = MicroBatcher(fn, 4, 0, 100, name="user_tower", max_queue_delay_ms=50)
        b.start()
        first = asyncio.create_task(b.submit(1))
        await asyncio.to_thread(started.wait, 30)
        second = asyncio.create_task(b.submit(2))
        while b.stats()["queue_depth"] != 1:
            await asyncio.sleep(0.002)
        await asyncio.sleep(0.3)
        with pytest.raises(Overloaded):
            await b.submit(3)
        gate.set()
        await first, await second
        await b.close()
        return b

    b = asyncio.run(asyncio.wait_for(go(), 60))
    registry = prom.CollectorRegistry()
    registry.register(server._BatcherCollector({"user_tower": b}))
    text = prom.generate_latest(registry).decode()
    assert 'micrec_rejected_total{stage="user_tower"} 1.0' in text
    assert 'micrec_rejected_delay_total{stage="user_tower"} 1.0' in text


def test_latency_bound_with_the_queue_delay_by_hand():
    # d = 0: the old formula, 2 x (512 / 256 + 0.002) + 1 = 5.004
    assert serve_bench.latency_bound(0.0, 512, 2.0, 256.0, max_queue_delay_ms=0.0)[0] == \
        pytest.approx(5.004)
    # d = 500 ms at R = 2 S: per stage min(512 / 256 = 2, 2 x (0.002 + 0.5) = 1.004) + 0.002
    bound, source = serve_bench.latency_bound(0.0, 512, 2.0, 256.0, max_queue_delay_ms=500.0)
    assert bound == pytest.approx(2 * (1.004 + 0.002) + 1) and "serve_max_queue_delay_ms" in source
    # the same with the rate given: R = 512 = 2 S
    assert serve_bench.latency_bound(0.0, 512, 2.0, 256.0, max_queue_delay_ms=500.0,
                                     rate=512.0)[0] == pytest.approx(3.012)
    # R = 3 S = 30, S = 10: min(64 / 10 = 6.4, 3 x (0.1 + 0.9) = 3.0) + 0.1 per stage
    assert serve_bench.latency_bound(0.0, 64, 100.0, 10.0, max_queue_delay_ms=900.0,
                                     rate=30.0)[0] == pytest.approx(2 * (3.0 + 0.1) + 1)
    # a short queue is the smaller term: min(2 / 5 = 0.4, 2 x (0.3 + 0.5) = 1.6) + 0.3
    assert serve_bench.latency_bound(0.0, 2, 300.0, 5.0, max_queue_delay_ms=500.0)[0] == \
        pytest.approx(2 * (0.4 + 0.3) + 1)
    # explicit and the request timeout still come first; no S, no bound
    assert serve_bench.latency_bound(3.0, 512, 2.0, 256.0, explicit=0.5,
                                     max_queue_delay_ms=500.0) == \
        (0.5, "--overload-latency-bound")
    assert serve_bench.latency_bound(3.0, 512, 2.0, 256.0, max_queue_delay_ms=500.0)[0] == 3.0
    assert serve_bench.latency_bound(0.0, 512, 2.0, None, max_queue_delay_ms=500.0)[0] is None


@pytest.mark.slow
def test_a_stage_behind_its_queue_delay_answers_503_with_retry_after(tmp_path):
    from test_server import Server, _samples, make_export

    root = tmp_path / "exports" / "tiny"
    root.mkdir(parents=True)
    make_export(str(root), 100)
    srv = Server(str(tmp_path), str(root), "export.serve_max_batch_size=1",
                 "export.serve_max_wait_ms=0", "export.serve_max_queue_delay_ms=0.001")
    body = {"instances": [{"gender": "F", "age": "25", "region": "r1", "history": ["i1", ""]}]}
    path = "/v1/models/user_tower:predict"
    answers = []
    try:
        srv.wait_ready()
        alone = srv.json("POST", path, body)
        assert alone[0] == 200, alone
        with ThreadPoolExecutor(32) as pool:
            for _ in range(20):
                answers += list(pool.map(lambda _: srv.request("POST", path, body), range(32)))
                if any(status == 503 for status, _, _ in answers):
                    break
        metrics = _samples(srv.request("GET", "/metrics")[2].decode())
    finally:
        code = srv.stop()
    assert code == 0, srv.stderr()
    refused = [(h, d) for s, h, d in answers if s == 503]
    assert refused, "no request was refused in 20 rounds of 32"
    assert {s for s, _, _ in answers} <= {200, 503}
    for headers, data in refused:
        assert int(headers["retry-after"]) >= 1
        text = data.decode()
        assert "\n" not in text.strip() and list(json.loads(text)) == ["error"]
        assert "max_queue_delay_ms=0.001" in json.loads(text)["error"]
    for status, _, data in answers:
        if status == 200:
            assert json.loads(data) == alone[1]
    tower = (("stage", "user_tower"),)
    assert metrics[("micrec_rejected_delay_total", tower)] == len(refused)
    assert metrics[("micrec_rejected_total", tower)] == len(refused)
    assert metrics[("micrec_requests_total", (("code", "503"), ("endpoint", "predict")))] == \
        len(refused)

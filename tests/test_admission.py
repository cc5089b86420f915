"""Admission at arrival: the in-flight cap (``export.serve_max_in_flight``, export/admission.py).

Fast (no server, no TensorFlow): :class:`export.admission.InFlightLimit` around a recording
ASGI app whose calls are held on events (so which requests are in flight never depends on
timing): with a cap of 2 and 5 concurrent calls, exactly 3 are answered 503 + ``Retry-After``
(one-line JSON) without their body being read (``receive`` never called) and never reach the
app; a place is given back when the app answers, raises, is cancelled, or returns after the
client disconnected without answering; health / metrics / status requests pass while saturated,
uncounted; a cap of 0 passes everything exactly as the app alone would (the same messages);
argument validation; the ``/metrics`` collector; the config key; serve_bench's bound worked out
by hand.

Slow: a real ``python -m export.server`` (tests/test_server.py's tiny export) with a cap of 2:
two requests are held in flight by sending only part of their bodies (deterministic: they stay
admitted until the test sends the rest), then 6 concurrent ``:predict`` requests all get 503 with
``Retry-After`` while ``/healthz``, ``/readyz``, ``/metrics`` and the model status answer 200;
the held two then finish with 200 and the same answer as the request alone;
``micrec_rejected_in_flight_total`` = ``micrec_requests_total{predict,503}`` = the client's 6.
The same with a cap of 0: all 200, no counter. Nothing asserts a duration.
"""
from __future__ import annotations

import asyncio
import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

import numpy as np

from benchmarks import serve_bench
from export.admission import InFlightLimit, model_call


def _same_answer(data: bytes, alone: bytes) -> None:
    """The :predict answer equals the request answered alone (float32-fitting tolerance)."""
    got, want = json.loads(data), json.loads(alone)
    assert list(got) == list(want) == ["predictions"]
    np.testing.assert_allclose(got["predictions"], want["predictions"], rtol=0, atol=1e-6)


class Recorder:
    """A fake ASGI app: each call waits on its own event, then answers 200 ``{"n": i}`` (or does
    what ``mode`` says); records the calls it got."""

    def __init__(self, mode: str = "answer"):
        self.calls, self.gates, self.mode = [], [], mode

    async def __call__(self, scope, receive, send):
        gate = asyncio.Event()
        self.calls.append(scope["path"])
        self.gates.append(gate)
        await gate.wait()
        if self.mode == "raise":
            raise RuntimeError("boom")
        if self.mode == "disconnect":  # the client went away: read it, answer nothing
            assert (await receive())["type"] == "http.disconnect"
            return
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b'{"n": %d}' % len(self.calls)})


def _scope(path="/v1/models/m:predict", method="POST"):
    return {"type": "http", "method": method, "path": path}


async def _call(mw, scope, body=b"{}", disconnect=False):
    """Runs one request through ``mw``; returns (status, headers dict, body, receive calls)."""
    sent, received = [], []

    async def receive():
        received.append(1)
        if disconnect:
            return {"type": "http.disconnect"}
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        sent.append(message)

    await mw(scope, receive, send)
    if not sent:
        return None, {}, None, len(received)
    head = sent[0]
    return (head["status"], {k.decode(): v.decode() for k, v in head["headers"]},
            b"".join(m.get("body", b"") for m in sent[1:]), len(received))


async def _until(cond):
    for _ in range(10_000):
        if cond():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never held")


def test_cap_of_two_refuses_exactly_the_excess_without_reading_it():
    async def go():
        app = Recorder()
        mw = InFlightLimit(app, 2, model_call, retry_after_s=3)
        held = [asyncio.create_task(_call(mw, _scope())) for _ in range(2)]
        await _until(lambda: len(app.calls) == 2)
        refused = [await _call(mw, _scope("/v1/models/m/versions/7:retrieve")) for _ in range(3)]
        assert (mw.in_flight, mw.admitted, mw.rejected) == (2, 2, 3)
        for gate in app.gates:
            gate.set()
        answered = [await t for t in held]
        after = await asyncio.wait_for(_later(mw, app), 10)
        return app, mw, refused, answered, after

    app, mw, refused, answered, after = asyncio.run(asyncio.wait_for(go(), 30))
    for status, headers, body, reads in refused:
        assert status == 503 and headers["retry-after"] == "3" and reads == 0
        assert headers["content-type"] == "application/json"
        assert int(headers["content-length"]) == len(body)
        assert b"\n" not in body and list(json.loads(body)) == ["error"]
        assert "export.serve_max_in_flight=2" in json.loads(body)["error"]
    assert [a[0] for a in answered] == [200, 200] and after[0] == 200
    assert len(app.calls) == 3                            # the refused three never reached it
    assert mw.stats() == {"max_in_flight": 2, "in_flight": 0, "max_seen": 2, "admitted": 3,
                          "rejected": 3}


async def _later(mw, app):
    task = asyncio.create_task(_call(mw, _scope()))
    await _until(lambda: len(app.calls) == 3)
    app.gates[-1].set()
    return await task


@pytest.mark.parametrize("mode", ["raise", "cancel", "disconnect"])
def test_a_place_is_given_back_on_error_cancellation_and_disconnect(mode):
    async def go():
        app = Recorder("raise" if mode == "raise" else "disconnect")
        mw = InFlightLimit(app, 1, model_call)
        task = asyncio.create_task(_call(mw, _scope(), disconnect=mode == "disconnect"))
        await _until(lambda: len(app.calls) == 1)
        assert (await _call(mw, _scope()))[0] == 503      # full
        if mode == "cancel":
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        else:
            app.gates[0].set()
            if mode == "raise":
                with pytest.raises(RuntimeError, match="boom"):
                    await task
            else:
                assert (await task)[0] is None           # nothing sent: nobody to answer
        assert mw.in_flight == 0
        app.mode = "answer"
        nxt = asyncio.create_task(_call(mw, _scope()))   # the place is free again
        await _until(lambda: len(app.calls) == 2)
        app.gates[1].set()
        return mw, await nxt

    mw, answer = asyncio.run(asyncio.wait_for(go(), 30))
    assert answer[0] == 200
    assert (mw.in_flight, mw.admitted, mw.rejected, mw.max_seen) == (0, 2, 1, 1)


def test_health_metrics_and_status_pass_while_saturated_uncounted():
    async def go():
        app = Recorder()
        mw = InFlightLimit(app, 1, model_call)
        held = asyncio.create_task(_call(mw, _scope()))
        await _until(lambda: len(app.calls) == 1)
        others = [_scope("/healthz", "GET"), _scope("/readyz", "GET"), _scope("/metrics", "GET"),
                  _scope("/v1/models/m", "GET"), _scope("/v1/models/m/metadata", "GET")]
        tasks = [asyncio.create_task(_call(mw, s)) for s in others]
        await _until(lambda: len(app.calls) == 1 + len(others))
        for gate in app.gates:
            gate.set()
        return mw, [await t for t in tasks], await held

    mw, answers, held = asyncio.run(asyncio.wait_for(go(), 30))
    assert [a[0] for a in answers] == [200] * 5 and held[0] == 200
    assert (mw.admitted, mw.rejected, mw.max_seen) == (1, 0, 1)


def test_cap_zero_is_the_app_alone():
    async def run(wrap):
        app = Recorder()
        entry = InFlightLimit(app, 0, model_call) if wrap else app
        tasks = [asyncio.create_task(_call(entry, _scope())) for _ in range(50)]
        await _until(lambda: len(app.calls) == 50)
        for gate in app.gates:
            gate.set()
        return [await t for t in tasks], entry

    with_mw, mw = asyncio.run(asyncio.wait_for(run(True), 30))
    alone, _ = asyncio.run(asyncio.wait_for(run(False), 30))
    assert with_mw == alone and {a[0] for a in alone} == {200}
    assert mw.stats() == {"max_in_flight": 0, "in_flight": 0, "max_seen": 0, "admitted": 0,
                          "rejected": 0}


@pytest.mark.parametrize("scope, expected", [
    (_scope("/v1/models/user_tower:predict"), True),
    (_scope("/v1/models/user_tower/versions/3:retrieve"), True),
    (_scope("/v1/models/user_tower:predict", "GET"), False),
    (_scope("/v1/models/user_tower", "POST"), False),
    (_scope("/v1/models/user_tower:classify"), False),
    (_scope("/healthz", "GET"), False), (_scope("/metrics", "GET"), False),
])
def test_which_requests_are_capped(scope, expected):
    assert model_call(scope) is expected


@pytest.mark.parametrize("kwargs, what", [
    ({"max_in_flight": -1}, "max_in_flight"), ({"max_in_flight": 1.5}, "max_in_flight"),
    ({"max_in_flight": True}, "max_in_flight"), ({"max_in_flight": 2, "retry_after_s": 0},
                                                 "retry_after_s"),
    ({"max_in_flight": 2, "applies": None}, "applies"),
])
def test_arguments_are_validated(kwargs, what):
    kwargs = {"applies": model_call, **kwargs}
    with pytest.raises(ValueError, match=rf"{what}.*Received: .*{what}="):
        InFlightLimit(Recorder(), **kwargs)


def test_config_key_default_and_validation():
    from micrec_tf.config import ConfigError, from_dict

    assert from_dict({}).export.serve_max_in_flight == 256
    assert from_dict({"export": {"serve_max_in_flight": 0}}).export.serve_max_in_flight == 0
    with pytest.raises(ConfigError, match=r"^export.serve_max_in_flight must be >= 0, got -1$"):
        from_dict({"export": {"serve_max_in_flight": -1}})
    with pytest.raises(ConfigError, match=r"^export.serve_max_in_flight must be an integer"):
        from_dict({"export": {"serve_max_in_flight": 2.5}})


def test_metrics_collector_only_with_the_cap_on():
    import prometheus_client as prom

    from export import server

    class Versions:
        ready, status = False, staticmethod(lambda: {})

    off = server.Service(Versions(), "m")
    assert off.admission.max_in_flight == 0
    assert b"micrec_rejected_in_flight" not in off.metrics.render(Versions())[0]
    on = server.Service(Versions(), "m", max_in_flight=3)
    on.admission.rejected, on.admission.in_flight, on.admission.max_seen = 4, 2, 3
    text = prom.generate_latest(on.metrics.registry).decode()
    assert "micrec_rejected_in_flight_total 4.0" in text
    assert "micrec_admitted_in_flight 2.0" in text
    assert "micrec_admitted_in_flight_max 3.0" in text


def test_latency_bound_with_the_cap_by_hand():
    # C = 0: the formulas before (5.004 and 3.012: tests/test_server_queue_delay.py)
    assert serve_bench.latency_bound(0.0, 512, 2.0, 256.0)[0] == pytest.approx(5.004)
    # C = 512, S = 256, w = 2 ms, d = 500 ms: stages 2 x (min(2, 1.004) + 0.002) = 2.012;
    # in flight 512 / 256 + 2 x 0.002 = 2.004; min + 1 = 3.004
    bound, source = serve_bench.latency_bound(0.0, 512, 2.0, 256.0, max_queue_delay_ms=500.0,
                                              max_in_flight=512)
    assert bound == pytest.approx(3.004) and "serve_max_in_flight / S" in source
    # C = 2, q = 2, S = 5, w = 300 ms, d = 0: stages 2 x (0.4 + 0.3) = 1.4; 0.4 + 0.6 = 1.0
    assert serve_bench.latency_bound(0.0, 2, 300.0, 5.0, max_in_flight=2)[0] == \
        pytest.approx(2.0)
    # a cap above both queues: the stages' term stays (2 x (2 + 0.002) = 4.004 < 16.004)
    assert serve_bench.latency_bound(0.0, 512, 2.0, 256.0, max_in_flight=4096)[0] == \
        pytest.approx(5.004)
    # explicit, the timeout and "no S" still come first
    assert serve_bench.latency_bound(0.0, 512, 2.0, 256.0, 0.7, max_in_flight=2)[0] == 0.7
    assert serve_bench.latency_bound(2.5, 512, 2.0, 256.0, max_in_flight=2)[0] == 2.5
    assert serve_bench.latency_bound(0.0, 512, 2.0, None, max_in_flight=2)[0] is None


# ----------------------------------------------------------------------------- slow: real server
def _serve_saturated(tmp_path, cap: int):
    """A server with ``serve_max_in_flight=cap``; two :predict requests held in flight (half of
    each body sent), then 6 concurrent ones and the plain endpoints; returns what came back."""
    from test_server import Server, _read_response, _row, _samples, _send_partial, make_export

    root = tmp_path / "exports" / "tiny"
    root.mkdir(parents=True)
    make_export(str(root), 100)
    srv = Server(str(tmp_path), str(root), f"export.serve_max_in_flight={cap}")
    body = json.dumps({"instances": [_row()]}).encode("utf-8")
    path = "/v1/models/user_tower:predict"
    held = []
    try:
        srv.wait_ready()
        alone = srv.request("POST", path, body)
        held = [_send_partial(srv.port, body, 10) for _ in range(2)]
        if cap:   # wait until both are admitted (seen on /metrics), however long that takes
            gauge = ("micrec_admitted_in_flight", ())
            for _ in range(600):
                if _samples(srv.request("GET", "/metrics")[2].decode()).get(gauge) == 2:
                    break
                time.sleep(0.05)
            else:
                raise AssertionError("the two held requests were never admitted")
        with ThreadPoolExecutor(6) as pool:
            burst = list(pool.map(lambda _: srv.request("POST", path, body), range(6)))
        plain = [srv.request("GET", p)[0] for p in
                 ("/healthz", "/readyz", "/metrics", "/v1/models/user_tower")]
        finished = []
        for s in held:
            s.sendall(body[10:])
            finished.append(_read_response(s))
        after = srv.request("POST", path, body)
        metrics = _samples(srv.request("GET", "/metrics")[2].decode())
    finally:
        for s in held:
            s.close()
        code = srv.stop()
    assert code == 0, srv.stderr()
    return alone, burst, plain, finished, after, metrics


@pytest.mark.slow
def test_a_saturated_server_refuses_exactly_the_excess_at_arrival(tmp_path):
    alone, burst, plain, finished, after, metrics = _serve_saturated(tmp_path, 2)
    assert alone[0] == 200
    assert [status for status, _, _ in burst] == [503] * 6
    for _, headers, data in burst:
        assert int(headers["retry-after"]) >= 1
        assert data.count(b"\n") == 0 and list(json.loads(data)) == ["error"]
        assert "export.serve_max_in_flight=2" in json.loads(data)["error"]
    assert plain == [200, 200, 200, 200]
    assert [status for status, _ in finished] == [200, 200]
    for _, payload in finished:
        _same_answer(payload, alone[2])
    assert after[0] == 200
    _same_answer(after[2], alone[2])
    assert metrics[("micrec_rejected_in_flight_total", ())] == 6
    assert metrics[("micrec_requests_total", (("code", "503"), ("endpoint", "predict")))] == 6
    assert metrics[("micrec_admitted_in_flight", ())] == 0
    assert metrics[("micrec_admitted_in_flight_max", ())] == 2
    assert ("micrec_rejected_total", (("stage", "user_tower"),)) not in metrics or \
        metrics[("micrec_rejected_total", (("stage", "user_tower"),))] == 0


@pytest.mark.slow
def test_cap_zero_refuses_nothing(tmp_path):
    alone, burst, plain, finished, after, metrics = _serve_saturated(tmp_path, 0)
    assert [status for status, _, _ in burst] == [200] * 6
    for _, _, data in burst:
        _same_answer(data, alone[2])
    assert plain == [200, 200, 200, 200] and [s for s, _ in finished] == [200, 200]
    assert not any(name.startswith("micrec_rejected_in_flight") or
                   name.startswith("micrec_admitted_in_flight") for name, _ in metrics)
    assert ("micrec_requests_total", (("code", "503"), ("endpoint", "predict"))) not in metrics

"""Per-request deadlines: ``MicroBatcher.submit(item, deadline=t)`` and the server's
``export.serve_request_timeout_s`` (504 for a request still queued at its deadline).

Fast (no TensorFlow): the batcher with a recording ``fn`` held on a gate, so which items are
queued when a deadline passes is fixed by the test, never by timing: an item queued past its
deadline raises ``DeadlineExceeded``, is never given to ``fn`` (the recorded calls are the
reference) and frees its queue slot; an item already running is answered; the worker drops an
item whose deadline passed when it forms the batch (its caller's loop held busy); config
default and validation. The only clock reads wait until a deadline has passed (``until``), no
assertion is about elapsed time.

Slow: a real ``python -m export.server`` over tests/test_server.py's tiny export with
``serve_request_timeout_s=2``, ``serve_max_batch_size=2`` and a 10-minute batching window: a
lone request never gets company, so it is still queued at its deadline: 504 with a one-line JSON
error naming the key, on ``:predict`` and ``:retrieve``; two concurrent requests fill a batch and
run at once: 200, equal to the brute-force answer; ``micrec_expired_total`` counts the two 504s.

Disconnects (``export.serve_drop_disconnected``): fast, ``server._unless_disconnected`` with a
scripted ASGI ``receive`` (the work is cancelled when ``http.disconnect`` comes first, returned
when it finishes first) and a cancelled batcher caller leaving the queue at once; slow, a real
server (batches of 2, a 10-minute window): a raw socket sends a whole ``:predict`` and closes
while it waits; the server answers it 499 (counted), takes it out of the queue
(``micrec_cancelled_total`` 1, depth 0), and the next two requests form the batch alone (the
tower ran 2 users in 1 batch; without the drop the closed one would have filled it with the
first and left the second waiting).
"""
import asyncio
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from export.batcher import DeadlineExceeded, MicroBatcher, Overloaded

from tests.conftest import LONG_WAIT_MS, Recorder, run, until


def test_an_item_queued_past_its_deadline_is_dropped_and_frees_its_slot():
    rec = Recorder()

    async def main():
        b = MicroBatcher(rec, max_batch_size=4, max_wait_ms=0, max_queue=3, name="tower")
        b.start()
        running = asyncio.ensure_future(b.submit(0))               # held inside fn
        await asyncio.to_thread(rec.started.wait, 30)
        soon = time.monotonic() + 1.0      # queued with the others first, even under load
        late = asyncio.ensure_future(b.submit(1, deadline=soon))
        plain = asyncio.ensure_future(b.submit(2))                 # no deadline
        far = asyncio.ensure_future(b.submit(3, deadline=time.monotonic() + 600))
        await until(lambda: b.stats()["queue_depth"] == 3)
        with pytest.raises(Overloaded):                            # the queue is full
            await b.submit(4)
        with pytest.raises(DeadlineExceeded, match="'tower': deadline exceeded") as err:
            await late
        assert err.value.waited_s > 0
        depth_after = b.stats()["queue_depth"]
        again = asyncio.ensure_future(b.submit(5))                 # the freed slot
        await until(lambda: b.stats()["queue_depth"] == 3)
        rec.gate.set()
        got = await asyncio.gather(running, plain, far, again)
        await b.close()
        return got, depth_after, b.stats()

    got, depth_after, stats = run(main())
    assert got == [0, 20, 30, 50]
    assert depth_after == 2
    assert rec.calls == [[0], [2, 3, 5]]                           # 1 never ran
    assert stats["expired"] == 1 and stats["rejected"] == 1 and stats["items"] == 4
    assert stats["queue_depth"] == 0 and stats["queue_rows"] == 0


def test_an_item_already_running_at_its_deadline_is_answered():
    rec = Recorder()

    async def main():
        b = MicroBatcher(rec, max_batch_size=4, max_wait_ms=0, max_queue=3)
        b.start()
        # 1 s for the worker to take the item (50 ms was missed on 2 loaded cores); then the
        # deadline passes while it runs.
        deadline = time.monotonic() + 1.0
        task = asyncio.ensure_future(b.submit(7, deadline=deadline))
        await asyncio.to_thread(rec.started.wait, 30)              # taken into a batch
        await until(lambda: time.monotonic() > deadline + 0.05)
        rec.gate.set()
        got = await task
        await b.close()
        return got, b.stats()

    got, stats = run(main())
    assert got == 70 and rec.calls == [[7]] and stats["expired"] == 0


def test_the_worker_drops_an_item_whose_deadline_passed_while_its_loop_was_busy():
    """The caller's event loop (another thread) is blocked, so its own timer cannot fire: the
    worker sees the passed deadline when it forms the next batch and fails the item itself."""
    rec = Recorder()
    b = MicroBatcher(rec, max_batch_size=4, max_wait_ms=0, max_queue=3)
    b.start()
    queued, release, outcome = threading.Event(), threading.Event(), {}
    deadline = [None]

    def caller():
        async def main():
            deadline[0] = time.monotonic() + 0.05
            task = asyncio.ensure_future(b.submit(1, deadline=deadline[0]))
            await asyncio.sleep(0)                                  # queued, waiting
            queued.set()
            assert release.wait(30)                                 # the loop is blocked
            try:
                outcome["result"] = await task
            except DeadlineExceeded as err:
                outcome["error"] = err
        asyncio.run(asyncio.wait_for(main(), 60))

    async def main():
        running = asyncio.ensure_future(b.submit(0))
        await asyncio.to_thread(rec.started.wait, 30)
        thread = threading.Thread(target=caller, daemon=True)
        thread.start()
        await asyncio.to_thread(queued.wait, 30)
        await until(lambda: time.monotonic() > deadline[0] + 0.05)
        rec.gate.set()                                              # next batch: item 1 expired
        await until(lambda: b.stats()["expired"] == 1)
        release.set()
        await asyncio.to_thread(thread.join, 30)
        got = await running
        await b.close()
        return got, b.stats()

    got, stats = run(main())
    assert got == 0 and rec.calls == [[0]]
    assert isinstance(outcome.get("error"), DeadlineExceeded), outcome
    assert stats["expired"] == 1 and stats["items"] == 1 and stats["queue_depth"] == 0


def test_a_cancelled_caller_with_a_deadline_is_dropped_as_cancelled():
    rec = Recorder()

    async def main():
        b = MicroBatcher(rec, max_batch_size=4, max_wait_ms=0, max_queue=3)
        b.start()
        running = asyncio.ensure_future(b.submit(0))
        await asyncio.to_thread(rec.started.wait, 30)
        gone = asyncio.ensure_future(b.submit(1, deadline=time.monotonic() + 600))
        kept = asyncio.ensure_future(b.submit(2, deadline=time.monotonic() + 600))
        await until(lambda: b.stats()["queue_depth"] == 2)
        gone.cancel()
        await until(lambda: b.stats()["cancelled"] == 1)          # left at once, worker held
        assert b.stats()["queue_depth"] == 1
        plain_gone = asyncio.ensure_future(b.submit(3))            # no deadline: the same
        await until(lambda: b.stats()["queue_depth"] == 2)
        plain_gone.cancel()
        await until(lambda: b.stats()["queue_depth"] == 1)        # left at once, worker held
        before = b.stats()
        rec.gate.set()
        got = await asyncio.gather(running, kept)
        await b.close()
        return got, before, b.stats()

    got, before, stats = run(main())
    assert got == [0, 20] and rec.calls == [[0], [2]]
    assert before["cancelled"] == 2 and before["queue_rows"] == 1
    assert stats["cancelled"] == 2 and stats["expired"] == 0


def test_a_caller_cancelled_just_before_the_worker_takes_its_batch():
    """``task.cancel()`` cancels the awaited future at once, but the caller's own handler runs one
    loop step later, so the worker may drop the entry first; the handler must then leave the
    queue alone (it raised ValueError once). Deterministic: the loop is blocked until the worker
    has formed the next batch."""
    calls, hold, took = [], threading.Event(), threading.Event()

    def fn(items):
        calls.append(list(items))
        if items == [0]:
            assert hold.wait(30), "hold never released"
        else:
            took.set()
        return [x * 10 for x in items]

    async def main():
        b = MicroBatcher(fn, max_batch_size=4, max_wait_ms=0, max_queue=3)
        b.start()
        running = asyncio.ensure_future(b.submit(0))
        await until(lambda: calls)                                 # the worker is inside fn
        gone = asyncio.ensure_future(b.submit(1))
        kept = asyncio.ensure_future(b.submit(2))
        await until(lambda: b.stats()["queue_depth"] == 2)
        gone.cancel()                      # cancels its future now; its handler runs later
        hold.set()
        assert took.wait(30)               # loop blocked: the worker dropped 1 and took [2]
        assert await kept == 20 and await running == 0
        with pytest.raises(asyncio.CancelledError):
            await gone
        await b.close()
        return b.stats()

    stats = run(main())
    assert calls == [[0], [2]]
    assert stats["cancelled"] == 1 and stats["queue_depth"] == 0 and stats["queue_rows"] == 0


def test_unless_disconnected_cancels_the_work_when_the_client_goes_first():
    from export import server

    async def main():
        started, cancelled, release = asyncio.Event(), [], asyncio.Event()

        async def work():
            started.set()
            try:
                await asyncio.Event().wait()                       # a request still queued
            except asyncio.CancelledError:
                cancelled.append(True)
                raise

        messages = [{"type": "http.request", "body": b"", "more_body": False},
                    {"type": "http.disconnect"}]

        async def receive():
            await started.wait()
            await release.wait()
            return messages.pop(0)

        task = asyncio.ensure_future(server._unless_disconnected(work(), receive))
        await started.wait()
        assert not task.done()
        release.set()
        with pytest.raises(server.ClientGone, match="client closed the connection"):
            await task
        return cancelled, messages

    cancelled, left = run(main())
    assert cancelled == [True] and left == []


def test_unless_disconnected_returns_the_answer_when_the_work_ends_first():
    from export import server

    async def main():
        waiting = []

        async def receive():
            try:
                await asyncio.Event().wait()                       # the client stays
            except asyncio.CancelledError:
                waiting.append("cancelled")
                raise

        got = await server._unless_disconnected(asyncio.sleep(0, result=42), receive)
        await asyncio.sleep(0)
        return got, waiting

    got, waiting = run(main())
    assert got == 42 and waiting == ["cancelled"]


def test_deadline_argument_is_checked():
    async def main():
        b = MicroBatcher(lambda xs: xs, 1, 0, 1)
        b.start()
        for bad in ("soon", float("nan"), True):
            with pytest.raises(ValueError, match="`deadline` must be .* Received: deadline="):
                await b.submit(1, deadline=bad)
        assert await b.submit(1, deadline=None) == 1
        await b.close()
        return b.stats()

    assert run(main())["items"] == 1


def test_serve_request_timeout_default_and_validation():
    from export import server
    from micrec_tf.config import ConfigError, from_dict

    cfg = from_dict({})
    assert cfg.export.serve_request_timeout_s == 0.0
    assert cfg.export.serve_drop_disconnected is False
    assert server.Batching.from_config(cfg.export).drop_disconnected is False
    assert server.Batching.from_config(
        from_dict({"export": {"serve_drop_disconnected": True}}).export).drop_disconnected
    assert server.Batching.from_config(cfg.export).request_timeout_s == 0.0
    assert server.Batching().request_timeout_s == 0.0
    cfg = from_dict({"export": {"serve_request_timeout_s": 2.5}})
    assert server.Batching.from_config(cfg.export).request_timeout_s == 2.5
    with pytest.raises(ConfigError, match=r"^export.serve_request_timeout_s must be >= 0, got -1"):
        from_dict({"export": {"serve_request_timeout_s": -1}})


# ----------------------------------------------------------------------------- slow: a real server
@pytest.mark.slow
def test_requests_queued_past_the_deadline_get_504_and_full_batches_200(tmp_path):
    from test_server import Server, _brute_force, _samples, make_export

    root = tmp_path / "exports" / "tiny"
    root.mkdir(parents=True)
    vdir = make_export(str(root), 100)
    items = np.load(f"{vdir}/item_embeddings/embeddings.npy")
    srv = Server(str(tmp_path), str(root), "export.serve_request_timeout_s=2",
                 "export.serve_max_batch_size=2", f"export.serve_max_wait_ms={LONG_WAIT_MS}")
    row = {"gender": "F", "age": "25", "region": "r1", "history": ["i1", ""]}
    try:
        srv.wait_ready()
        answers = {}
        for verb in ("predict", "retrieve"):                       # alone: never gets company
            status, headers, data = srv.request("POST", f"/v1/models/user_tower:{verb}",
                                                {"instances": [row], "k": 3}
                                                if verb == "retrieve" else {"instances": [row]})
            answers[verb] = (status, headers, data)
        with ThreadPoolExecutor(2) as pool:                        # together: a full batch
            pair = list(pool.map(lambda v: srv.json(
                "POST", "/v1/models/user_tower:retrieve",
                {"user_vector": v, "k": 3}), [[1.0, 0, 0, 0], [0, -1.0, 0, 0]]))
        metrics = _samples(srv.request("GET", "/metrics")[2].decode())
    finally:
        code = srv.stop()
    assert code == 0, srv.stderr()
    for verb, (status, headers, data) in answers.items():
        assert status == 504, (verb, status, data)
        text = data.decode()
        assert "\n" not in text.strip() and list(json.loads(text)) == ["error"]
        message = json.loads(text)["error"]
        assert "deadline exceeded" in message and "serve_request_timeout_s=2" in message
    for vector, (status, got) in zip([[1.0, 0, 0, 0], [0, -1.0, 0, 0]], pair):
        assert status == 200, got
        want, _ = _brute_force([vector], items, 3, [[]])
        assert got["ids"] == want
    tower, search = (("stage", "user_tower"),), (("stage", "search"),)
    assert metrics[("micrec_expired_total", tower)] == 2
    assert metrics[("micrec_expired_total", search)] == 0
    assert metrics[("micrec_requests_total", (("code", "504"), ("endpoint", "predict")))] == 1
    assert metrics[("micrec_requests_total", (("code", "504"), ("endpoint", "retrieve")))] == 1


@pytest.mark.slow
def test_a_client_that_disconnects_while_queued_is_dropped(tmp_path):
    import socket

    from test_server import Server, _samples, make_export

    root = tmp_path / "exports" / "tiny"
    root.mkdir(parents=True)
    make_export(str(root), 100)
    srv = Server(str(tmp_path), str(root), "export.serve_drop_disconnected=true",
                 "export.serve_max_batch_size=2", f"export.serve_max_wait_ms={LONG_WAIT_MS}")
    tower = (("stage", "user_tower"),)
    gone = ("micrec_requests_total", (("code", "499"), ("endpoint", "predict")))
    rows = [{"gender": g, "age": "25", "region": "r1", "history": ["i1", ""]} for g in "FMU"]
    try:
        srv.wait_ready()
        body = json.dumps({"instances": [rows[0]]}).encode()
        with socket.create_connection(("127.0.0.1", srv.port), timeout=60) as sock:
            sock.sendall(b"POST /v1/models/user_tower:predict HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Type: application/json\r\nContent-Length: "
                         + str(len(body)).encode() + b"\r\n\r\n" + body)
            deadline = time.monotonic() + 60
            while _samples(srv.request("GET", "/metrics")[2].decode()).get(
                    ("micrec_queue_depth", tower)) != 1:
                assert time.monotonic() < deadline, srv.stderr()
                time.sleep(0.05)
        deadline = time.monotonic() + 60                           # closed: wait for the drop
        while _samples(srv.request("GET", "/metrics")[2].decode()).get(gone) != 1:
            assert time.monotonic() < deadline, srv.stderr()
            time.sleep(0.05)
        dropped = _samples(srv.request("GET", "/metrics")[2].decode())
        with ThreadPoolExecutor(2) as pool:
            pair = list(pool.map(lambda row: srv.json(
                "POST", "/v1/models/user_tower:predict", {"instances": [row]}), rows[1:]))
        after = _samples(srv.request("GET", "/metrics")[2].decode())
    finally:
        code = srv.stop()
    assert code == 0, srv.stderr()
    assert dropped[("micrec_cancelled_total", tower)] == 1
    assert dropped[("micrec_queue_depth", tower)] == 0
    assert dropped.get(("micrec_stage_batch_size_count", tower), 0) == 0   # nothing ran yet
    assert [status for status, _ in pair] == [200, 200], pair
    assert after[("micrec_stage_batch_size_count", tower)] == 1
    assert after[("micrec_stage_batch_size_sum", tower)] == 2

"""export.batcher.MicroBatcher: results reach their callers, batches bounded in rows, a bounded
queue (Overloaded), failures per batch, drain on close, stats.

No TensorFlow: ``fn`` is a Python function that records the batches it was called with; the
references are a pure-Python map, a greedy in-order packing written here, and counts of the
recorded calls. Batch compositions are made deterministic by holding the worker inside ``fn`` on
a gate while items queue (or by ``max_wait_ms`` far above any test's duration), never by timing;
no assertion is about wall-clock time. Every test runs under a 60 s ``asyncio.wait_for`` so a hang
fails instead of blocking the run.
"""
import asyncio
import threading

import pytest

from export.batcher import BATCH_SIZE_BUCKETS, Closed, MicroBatcher, Overloaded

LONG_WAIT_MS = 600_000.0       # "never" within a test: a batch leaves when full or on close()


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


class Recorder:
    """fn for the batcher: records each batch; item -> f(item); optional gate for the first call."""

    def __init__(self, f=lambda x: x * x + 1, gate=False):
        self.f = f
        self.calls = []
        self.started = threading.Event()
        self.gate = threading.Event()
        if not gate:
            self.gate.set()

    def __call__(self, items):
        self.calls.append(list(items))
        self.started.set()
        assert self.gate.wait(30), "gate never opened"
        return [self.f(x) for x in items]


async def until(predicate):
    """Yields to the loop until predicate() holds (bounded by the test's wait_for)."""
    while not predicate():
        await asyncio.sleep(0.002)


def greedy_batches(sizes, cap):
    """Reference packing: in order; a batch closes when the next item would exceed cap; an item
    larger than cap goes alone."""
    out, cur, total = [], [], 0
    for i, n in enumerate(sizes):
        if cur and total + n > cap:
            out.append(cur)
            cur, total = [], 0
        cur.append(i)
        total += n
        if total >= cap:
            out.append(cur)
            cur, total = [], 0
    if cur:
        out.append(cur)
    return out


def cumulative_hist(batch_rows):
    """[(le, batches with rows <= le)] + [("+Inf", all)], counted directly."""
    out = [(le, sum(1 for r in batch_rows if r <= le)) for le in BATCH_SIZE_BUCKETS]
    return out + [("+Inf", len(batch_rows))]


def test_results_reach_their_callers_under_100_concurrent_submits():
    rec = Recorder()

    async def main():
        b = MicroBatcher(rec, max_batch_size=7, max_wait_ms=5, max_queue=100, name="t")
        b.start()
        got = await asyncio.gather(*(b.submit(x) for x in range(100)))
        await b.close()
        return got, b.stats()

    got, stats = run(main())
    assert got == [x * x + 1 for x in range(100)]
    assert sorted(x for call in rec.calls for x in call) == list(range(100))
    assert all(1 <= len(call) <= 7 for call in rec.calls)
    sizes = [len(call) for call in rec.calls]
    assert stats["batches"] == len(rec.calls)
    assert stats["items"] == stats["rows"] == stats["batch_size_sum"] == 100
    assert stats["batch_size_buckets"] == cumulative_hist(sizes)
    assert stats["rejected"] == stats["failed_batches"] == stats["queue_depth"] == 0
    assert stats["closed"] is True


def test_batches_are_bounded_in_rows_and_a_larger_request_runs_alone():
    # Items are requests of several rows; fn concatenates their rows and splits the outputs back.
    sizes = [1, 3, 3, 2, 9, 1, 4, 4, 8, 2, 2, 2, 1, 12, 5, 3]
    cap = 8
    requests = [[100 * i + j for j in range(n)] for i, n in enumerate(sizes)]
    calls = []
    started, gate = threading.Event(), threading.Event()

    def fn(items):
        calls.append([len(r) for r in items])
        started.set()
        assert gate.wait(30)
        flat = [v for r in items for v in r]          # concatenate the rows
        out = [-v for v in flat]
        res, k = [], 0
        for r in items:                               # split by each request's rows
            res.append(out[k:k + len(r)])
            k += len(r)
        return res

    async def main():
        b = MicroBatcher(fn, max_batch_size=cap, max_wait_ms=LONG_WAIT_MS, max_queue=100,
                         rows=len)
        b.start()
        first = asyncio.ensure_future(b.submit(requests[0]))   # 1 row: waits for company...
        rest = [asyncio.ensure_future(b.submit(r)) for r in requests[1:]]
        await asyncio.to_thread(started.wait, 30)              # ...and leaves when rows >= cap
        await until(lambda: b.stats()["queue_depth"] == len(requests) - len(calls[0]))
        gate.set()
        results = await asyncio.gather(first, *rest, b.close())
        return results[:-1], b.stats()

    results, stats = run(main())
    assert results == [[-v for v in r] for r in requests]
    for call in calls:
        assert sum(call) <= cap or len(call) == 1
    # The first batch leaves once the queued rows reach the cap (1+3+3+2; the 2 does not fit);
    # the rest, queued behind the gate, leave when full or at close(): all of it is packed exactly
    # as the in-order greedy reference packs the whole sequence.
    assert calls == [[sizes[i] for i in batch] for batch in greedy_batches(sizes, cap)]
    assert [len(c) for c in calls if sum(c) > cap] == [1, 1]          # the 9 and the 12
    batch_rows = [sum(c) for c in calls]
    assert stats["rows"] == sum(sizes) and stats["items"] == len(sizes)
    assert stats["batch_size_buckets"] == cumulative_hist(batch_rows)


def test_a_lone_request_is_served_as_a_batch_of_one():
    rec = Recorder()

    async def main():
        b = MicroBatcher(rec, max_batch_size=32, max_wait_ms=2, max_queue=8)
        b.start()
        got = await b.submit(6)
        await b.close()
        return got, b.stats()

    got, stats = run(main())
    assert got == 37
    assert rec.calls == [[6]]
    assert stats["batches"] == 1 and stats["items"] == 1
    assert dict(stats["batch_size_buckets"])[1] == 1


def test_a_partial_batch_waits_for_company_and_leaves_when_full():
    rec = Recorder()

    async def main():
        b = MicroBatcher(rec, max_batch_size=4, max_wait_ms=LONG_WAIT_MS, max_queue=8)
        b.start()
        first = asyncio.ensure_future(b.submit(1))
        await until(lambda: b.stats()["queue_depth"] == 1)
        for _ in range(20):                 # give the worker every chance to leave too early
            await asyncio.sleep(0.002)
        waited = (list(rec.calls), b.stats()["queue_depth"])
        got = await asyncio.gather(first, b.submit(2), b.submit(3), b.submit(4))
        await b.close()
        return waited, got

    waited, got = run(main())
    assert waited == ([], 1)
    assert got == [2, 5, 10, 17]
    assert rec.calls == [[1, 2, 3, 4]]


def test_a_full_queue_answers_overloaded_and_never_grows_past_max_queue():
    rec = Recorder(gate=True)

    async def main():
        b = MicroBatcher(rec, max_batch_size=1, max_wait_ms=0, max_queue=3, name="tower")
        b.start()
        running = asyncio.ensure_future(b.submit(10))
        await asyncio.to_thread(rec.started.wait, 30)          # the worker holds item 10
        waiting = [asyncio.ensure_future(b.submit(x)) for x in (11, 12, 13)]
        await until(lambda: b.stats()["queue_depth"] == 3)
        refused = []
        for x in range(20, 25):
            with pytest.raises(Overloaded) as info:
                await b.submit(x)
            refused.append(info.value)
        during = b.stats()
        rec.gate.set()
        got = await asyncio.gather(running, *waiting)
        after = await b.submit(14)                              # room again
        await b.close()
        return refused, during, got, after, b.stats()

    refused, during, got, after, stats = run(main())
    for exc in refused:
        assert exc.retry_after_s > 0
        assert int(exc.retry_after_header()) >= 1
        assert "max_queue=3" in str(exc)
    assert during["queue_depth"] == 3 and during["rejected"] == 5
    assert got == [101, 122, 145, 170] and after == 197
    assert [x for call in rec.calls for x in call] == [10, 11, 12, 13, 14]   # never 20..24
    assert stats["max_queue_depth"] == 3
    assert stats["rejected"] == 5 and stats["items"] == 5


def test_an_exception_in_fn_reaches_every_caller_of_its_batch_and_the_worker_goes_on():
    calls = []

    def fn(items):
        calls.append(list(items))
        if any(x < 0 for x in items):
            raise ValueError(f"negative in {items}")
        if 99 in items:
            return [0]                                          # wrong length
        return [2 * x for x in items]

    async def main():
        b = MicroBatcher(fn, max_batch_size=3, max_wait_ms=LONG_WAIT_MS, max_queue=10, name="n")
        b.start()
        bad = await asyncio.gather(*(b.submit(x) for x in (1, -2, 3)), return_exceptions=True)
        short = await asyncio.gather(*(b.submit(x) for x in (99, 7, 8)), return_exceptions=True)
        good = await asyncio.gather(*(b.submit(x) for x in (4, 5, 6)))
        await b.close()
        return bad, short, good, b.stats()

    bad, short, good, stats = run(main())
    assert calls == [[1, -2, 3], [99, 7, 8], [4, 5, 6]]
    assert all(isinstance(e, ValueError) and "negative in [1, -2, 3]" in str(e) for e in bad)
    assert all(isinstance(e, RuntimeError) and "'n'" in str(e) and "1 results" in str(e)
               for e in short)
    assert good == [8, 10, 12]
    assert stats["batches"] == 3 and stats["failed_batches"] == 2 and stats["failed_items"] == 6


def test_close_runs_what_is_queued_then_refuses_new_items():
    rec = Recorder(gate=True)

    async def main():
        b = MicroBatcher(rec, max_batch_size=2, max_wait_ms=LONG_WAIT_MS, max_queue=10)
        b.start()
        running = [asyncio.ensure_future(b.submit(x)) for x in (0, 1)]
        await asyncio.to_thread(rec.started.wait, 30)
        queued = [asyncio.ensure_future(b.submit(x)) for x in (2, 3, 4)]   # 4: a partial batch
        await until(lambda: b.stats()["queue_depth"] == 3)
        closing = asyncio.ensure_future(b.close())
        await until(lambda: b.closed)
        with pytest.raises(Closed):
            await b.submit(5)
        rec.gate.set()
        got = await asyncio.gather(*running, *queued)
        await closing
        with pytest.raises(Closed):
            await b.submit(6)
        await b.close()                                         # twice is fine
        return got, b.stats()

    got, stats = run(main())
    assert got == [1, 2, 5, 10, 17]
    assert rec.calls == [[0, 1], [2, 3], [4]]                   # [4] left at close, not waiting
    assert stats["queue_depth"] == 0 and stats["items"] == 5


def test_a_caller_cancelled_while_waiting_is_never_run():
    rec = Recorder(gate=True)

    async def main():
        b = MicroBatcher(rec, max_batch_size=4, max_wait_ms=0, max_queue=10)
        b.start()
        running = asyncio.ensure_future(b.submit(0))
        await asyncio.to_thread(rec.started.wait, 30)
        gone = asyncio.ensure_future(b.submit(1))
        kept = asyncio.ensure_future(b.submit(2))
        await until(lambda: b.stats()["queue_depth"] == 2)
        gone.cancel()
        rec.gate.set()
        got = await asyncio.gather(running, kept)
        await b.close()
        return got, gone.cancelled(), b.stats()

    got, cancelled, stats = run(main())
    assert got == [1, 5] and cancelled
    assert rec.calls == [[0], [2]]
    assert stats["cancelled"] == 1 and stats["items"] == 2


def test_start_and_submit_misuse():
    async def main():
        b = MicroBatcher(lambda xs: xs, 1, 0, 1)
        with pytest.raises(RuntimeError, match="not started"):
            await b.submit(1)
        b.start()
        with pytest.raises(RuntimeError, match="already started"):
            b.start()
        c = MicroBatcher(lambda xs: xs, 4, 0, 4, rows=len)
        c.start()
        with pytest.raises(ValueError, match="Received: 0"):
            await c.submit([])
        await b.close()
        await c.close()

    run(main())


@pytest.mark.parametrize("kwargs, key", [
    (dict(fn=None), "fn"),
    (dict(max_batch_size=0), "max_batch_size"),
    (dict(max_batch_size=2.0), "max_batch_size"),
    (dict(max_batch_size=True), "max_batch_size"),
    (dict(max_wait_ms=-1), "max_wait_ms"),
    (dict(max_wait_ms=float("inf")), "max_wait_ms"),
    (dict(max_wait_ms="5"), "max_wait_ms"),
    (dict(max_queue=0), "max_queue"),
    (dict(name=3), "name"),
    (dict(rows=5), "rows"),
])
def test_constructor_validates_its_arguments(kwargs, key):
    args = dict(fn=lambda xs: xs, max_batch_size=4, max_wait_ms=1.0, max_queue=4)
    args.update(kwargs)
    with pytest.raises(ValueError, match=f"`{key}`.*Received: {key}="):
        MicroBatcher(**args)

"""export.batcher.MicroBatcher's queue-delay admission (``max_queue_delay_ms``, issue 30).

No TensorFlow: ``fn`` records the batches it was called with (the reference for "never given to
fn") and the first call is held on a gate, so the worker is busy and what waits in the queue is
fixed by the test. The only clock use makes the oldest item's wait clearly longer than the limit
(50 ms limit, 0.3 s sleep) or clearly shorter (a 60 s limit); no assertion is about elapsed time.
Every test runs under a 60 s ``asyncio.wait_for``.
"""
import asyncio
import math

import pytest

from export.batcher import MIN_RETRY_AFTER_S, MicroBatcher, Overloaded

from tests.conftest import LONG_WAIT_MS, Recorder, run, until


async def _held(b, rec, sleep_s, late):
    """Item 1 runs (held on the gate), item 2 queues behind it; after ``sleep_s`` the items of
    ``late`` are submitted one by one. Returns (outcome per late item: its result or the
    Overloaded, the stats while held, the final stats)."""
    b.start()
    first = asyncio.create_task(b.submit(1))
    await asyncio.to_thread(rec.started.wait, 30)
    second = asyncio.create_task(b.submit(2))
    await until(lambda: b.stats()["queue_depth"] == 1)
    await asyncio.sleep(sleep_s)
    outcomes, tasks = {}, {}
    for x in late:
        try:
            tasks[x] = asyncio.create_task(b.submit(x))
            await asyncio.sleep(0)          # let submit run up to its await (or raise)
            await asyncio.sleep(0)
            if tasks[x].done():
                outcomes[x] = tasks[x].exception() or tasks[x].result()
        except Overloaded as exc:           # pragma: no cover - submit raises in its task
            outcomes[x] = exc
    held = b.stats()
    rec.gate.set()
    assert await first == 10 and await second == 20
    for x, task in tasks.items():
        if x not in outcomes:
            outcomes[x] = await task
    await b.close()
    return outcomes, held, b.stats()


def test_an_item_arriving_after_the_head_waited_past_the_limit_is_refused_and_never_run():
    rec = Recorder()
    b = MicroBatcher(rec, max_batch_size=8, max_wait_ms=0, max_queue=100, name="t",
                     max_queue_delay_ms=50)
    outcomes, held, after = run(_held(b, rec, 0.3, [3, 4]))
    for x in (3, 4):
        assert isinstance(outcomes[x], Overloaded), outcomes
        assert outcomes[x].retry_after_s >= MIN_RETRY_AFTER_S
        assert outcomes[x].retry_after_header() == str(max(1, math.ceil(
            outcomes[x].retry_after_s)))
        assert "max_queue_delay_ms=50" in str(outcomes[x])
    assert rec.calls == [[1], [2]]                       # 3 and 4 never reached fn
    assert held["queue_depth"] == 1                      # nothing was queued for them
    assert (held["rejected"], held["rejected_delay"]) == (2, 2)
    assert (after["items"], after["rejected"], after["rejected_delay"]) == (2, 2, 2)
    assert after["max_queue_delay_ms"] == 50.0


def test_an_item_arriving_before_the_head_waited_the_limit_is_queued():
    rec = Recorder()
    b = MicroBatcher(rec, max_batch_size=8, max_wait_ms=0, max_queue=100,
                     max_queue_delay_ms=60_000)
    outcomes, held, after = run(_held(b, rec, 0.3, [3, 4]))
    assert outcomes == {3: 30, 4: 40}
    assert held["queue_depth"] == 3 and (held["rejected"], held["rejected_delay"]) == (0, 0)
    assert rec.calls == [[1], [2, 3, 4]]
    assert (after["items"], after["rejected"], after["rejected_delay"]) == (4, 0, 0)


def test_delay_zero_is_the_old_behaviour_only_max_queue_refuses():
    rec = Recorder()
    b = MicroBatcher(rec, max_batch_size=8, max_wait_ms=0, max_queue=2)   # default delay: 0
    outcomes, held, after = run(_held(b, rec, 0.3, [3, 4]))
    assert outcomes[3] == 30                             # waited 0.3 s behind: still queued
    assert isinstance(outcomes[4], Overloaded) and "max_queue=2" in str(outcomes[4])
    assert rec.calls == [[1], [2, 3]]
    assert (after["rejected"], after["rejected_delay"], after["max_queue_delay_ms"]) == \
        (1, 0, 0.0)


def test_a_full_queue_is_counted_as_rejected_not_as_delay():
    rec = Recorder()
    b = MicroBatcher(rec, max_batch_size=8, max_wait_ms=0, max_queue=1,
                     max_queue_delay_ms=60_000)
    outcomes, _, after = run(_held(b, rec, 0.0, [3]))
    assert isinstance(outcomes[3], Overloaded) and "max_queue=1" in str(outcomes[3])
    assert (after["rejected"], after["rejected_delay"]) == (1, 0)
    assert rec.calls == [[1], [2]]


def test_the_batching_window_is_not_counted_as_delay():
    """The head waits in its own batching window (max_wait_ms = 10 min, batch not full): waiting
    0.3 s there is not being behind, so a new item is queued although 0.3 s > 50 ms."""
    rec = Recorder()
    rec.gate.set()

    async def go():
        b = MicroBatcher(rec, max_batch_size=8, max_wait_ms=LONG_WAIT_MS, max_queue=100,
                         max_queue_delay_ms=50)
        b.start()
        first = asyncio.create_task(b.submit(1))
        await until(lambda: b.stats()["queue_depth"] == 1)
        await asyncio.sleep(0.3)
        second = asyncio.create_task(b.submit(2))
        await until(lambda: b.stats()["queue_depth"] == 2)
        await b.close()                                  # runs what is queued
        return await first, await second, b.stats()

    one, two, st = run(go())
    assert (one, two) == (10, 20) and rec.calls == [[1, 2]]
    assert (st["rejected"], st["rejected_delay"]) == (0, 0)


def test_the_queue_refills_once_the_worker_caught_up():
    """Refused while behind; once the held batch ran and the queue drained, a new item is
    queued and answered."""
    rec = Recorder()

    async def go():
        b = MicroBatcher(rec, max_batch_size=8, max_wait_ms=0, max_queue=100,
                         max_queue_delay_ms=50)
        b.start()
        first = asyncio.create_task(b.submit(1))
        await asyncio.to_thread(rec.started.wait, 30)
        second = asyncio.create_task(b.submit(2))
        await until(lambda: b.stats()["queue_depth"] == 1)
        await asyncio.sleep(0.3)
        with pytest.raises(Overloaded):
            await b.submit(3)
        rec.gate.set()
        got = [await first, await second]
        await until(lambda: b.stats()["queue_depth"] == 0)
        got.append(await b.submit(5))
        await b.close()
        return got, b.stats()

    got, st = run(go())
    assert got == [10, 20, 50] and rec.calls == [[1], [2], [5]]
    assert (st["rejected"], st["rejected_delay"]) == (1, 1)


@pytest.mark.parametrize("bad", [-1, -0.5, float("nan"), float("inf"), True, "50", None])
def test_max_queue_delay_ms_is_validated(bad):
    with pytest.raises(ValueError, match=r"`max_queue_delay_ms` must be a finite number >= 0"
                                         r".*Received: max_queue_delay_ms="):
        MicroBatcher(lambda items: items, 8, 0, 10, max_queue_delay_ms=bad)


def test_repr_and_stats_name_the_limit():
    b = MicroBatcher(lambda items: items, 8, 2.0, 10, name="s", max_queue_delay_ms=500)
    assert "max_queue_delay_ms=500.0" in repr(b)
    st = b.stats()
    assert (st["max_queue_delay_ms"], st["rejected"], st["rejected_delay"]) == (500.0, 0, 0)

"""Micro-batching with a bounded queue, for the retrieval service (issue 30).

Concurrent requests of an asyncio server are gathered into batches for one blocking function (the
user tower, the index search: TF calls are not async), run in ONE worker thread:

* :class:`MicroBatcher` ``(fn, max_batch_size, max_wait_ms, max_queue, name="", rows=None,
  max_queue_delay_ms=0.0)``.
  ``fn(items: list) -> list`` gets up to ``max_batch_size`` rows of queued items, oldest first,
  and returns one result per item, same length, same order.
* ``await batcher.submit(item)`` returns ``fn``'s result for that item; raises the exception ``fn``
  raised for the whole batch (every item of that batch gets the same exception object); raises
  :class:`Overloaded` at once when ``max_queue`` items are already waiting (nothing is queued, so
  the backlog never grows past ``max_queue``: the server answers 503 with
  ``Retry-After: exc.retry_after_header()``); raises :class:`Closed` once :meth:`close` began
  (the server answers 503 too: the replica is shutting down).
* Queue delay (``max_queue_delay_ms`` > 0): ``submit`` also raises :class:`Overloaded` at once
  (nothing queued, counted in ``stats()["rejected"]`` and ``stats()["rejected_delay"]``) when
  the OLDEST waiting item has already waited longer than ``max_wait_ms + max_queue_delay_ms``,
  i.e. the worker is more than ``max_queue_delay_ms`` behind that item's batching window. A count
  bound (``max_queue``) does not bound waiting time when batches slow down (measured: a 512-deep
  queue waited seconds under overload, docs/BENCHMARKS.md "Serving"); this rule bounds it in
  time: every item ahead of an admitted one arrived within the last ``max_wait_ms +
  max_queue_delay_ms``, so at an arrival rate R and a drain rate S an admitted item waits at
  most about ``R / S x (max_wait_ms + max_queue_delay_ms)`` (and never more than ``max_queue``
  items' drain). ``0`` (the default): off, the old behaviour bit for bit (only ``max_queue``).
* Batch formation: the worker takes the oldest waiting item and waits until the queued items hold
  ``max_batch_size`` rows or ``max_wait_ms`` have passed since that item was queued (an item that
  waited while the previous batch ran may already be due: its batch leaves at once), then takes
  items in arrival order while they fit. ``max_wait_ms=0`` runs whatever is queued at once.
* Rows: an item may itself be a batch of rows (a request with several instances). ``rows(item)``
  (default: every item is 1 row) gives its row count; a batch holds at most ``max_batch_size``
  rows, except that an item of more than ``max_batch_size`` rows is run alone (in its turn: items
  behind it wait, none overtakes). ``fn`` still sees a list of items and concatenates their rows
  itself (e.g. ``np.concatenate`` of the instances, then splits the output by ``rows``).
  ``max_queue`` counts waiting items (requests), not rows; the request cap
  (``export.max_request_instances``) bounds the rows of each.
* A caller cancelled while its item waits (a client that went away) is taken out of the queue at
  once (its slot and rows freed) and never given to ``fn``; one cancelled after its batch left
  gets nothing. (A future cancelled from outside the caller's task is dropped when the batch is
  formed.)
* Deadlines: ``await batcher.submit(item, deadline=t)`` (``t`` a :func:`time.monotonic` time)
  raises :class:`DeadlineExceeded` at ``t`` if the item is still waiting then (it is taken out of
  the queue, never given to ``fn``, and counted in ``stats()["expired"]``); the worker also drops
  an item whose deadline passed when its batch is formed. An item whose batch left before ``t``
  is answered normally (its work is under way). ``deadline=None`` (the default) is the old
  behaviour: wait as long as it takes.
* ``fn`` returning a list of the wrong length fails every item of that batch with a
  ``RuntimeError`` naming the batcher. Either way the worker keeps serving the next batch.
* :meth:`stats` returns plain numbers for Prometheus (``/metrics``): batches run, items, rows,
  failed batches and items, rejected and cancelled items, the current queue depth (items and
  rows) and its high-water mark, and the batch-size histogram (rows per batch) as cumulative
  counts of the fixed buckets :data:`BATCH_SIZE_BUCKETS` (Prometheus ``le`` semantics).

Why the queue-delay rule looks at the oldest item's observed wait (CoDel's sojourn time, at
admission instead of at dequeue) rather than a predicted wait (queued rows / batch x the moving
average of batch time, as Retry-After uses): the prediction lags exactly when throughput drops
(the average moves 20 % per batch, and a batch slowed by contention is only seen once it ends),
and a prediction of one batch time above the limit would refuse everything while the average
cannot update (no batches run). The observed wait needs no model, reacts within one batch, and
lets the queue refill as soon as the worker catches up.

Nothing here imports TensorFlow; the batcher is generic. Without a batcher (today's
``export/rest.py`` and :class:`micrec_tf.retrieval.Retriever`) every request runs alone, as before.
"""
from __future__ import annotations

import asyncio
import collections
import math
import threading
import time
from typing import Any, Callable, Optional

# Upper bounds (rows per batch) of the batch-size histogram; a last "+Inf" bucket is implied.
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
# Smallest Retry-After advice in seconds (HTTP rounds it up to a whole second anyway).
MIN_RETRY_AFTER_S = 0.05
# Weight of the newest batch in the moving average of batch run time (for Retry-After).
_EWMA_WEIGHT = 0.2


class Overloaded(Exception):
    """``max_queue`` items already wait, or (``max_queue_delay_ms`` > 0) the oldest has waited too
    long: the item was not queued. Answer 503 + Retry-After.

    ``retry_after_s`` (float > 0): an estimate of when the queue has room, from the moving average
    of batch run time, the batches queued ahead and ``max_wait_ms``.
    """

    def __init__(self, retry_after_s: float, message: str = ""):
        self.retry_after_s = float(retry_after_s)
        super().__init__(message or f"overloaded: retry after {self.retry_after_s:.3f} s")

    def retry_after_header(self) -> str:
        """The ``Retry-After`` header value: whole seconds, at least 1 (RFC 9110 10.2.3)."""
        return str(max(1, math.ceil(self.retry_after_s)))


class Closed(Exception):
    """The batcher is closing or closed: no new items. Answer 503 (this replica is going away)."""


class DeadlineExceeded(Exception):
    """The item's deadline passed while it waited in the queue: it was dropped, never run.

    ``waited_s`` (float >= 0): how long it waited. The server answers 504 (docs/SERVING.md).
    """

    def __init__(self, waited_s: float, message: str = ""):
        self.waited_s = float(waited_s)
        super().__init__(message or f"deadline exceeded after {self.waited_s:.3f} s in the queue")


# States of an entry (``_Entry.state``): waiting in the queue, taken into a batch, dropped at its
# deadline, dropped because its caller was cancelled.
_QUEUED, _TAKEN, _EXPIRED, _CANCELLED = 0, 1, 2, 3


class _Entry:
    """One waiting item: its rows, when it was queued, and the future of the caller's loop."""

    __slots__ = ("item", "rows", "queued_at", "loop", "future", "deadline", "state")

    def __init__(self, item, rows: int, queued_at: float, loop, future, deadline=None):
        self.item = item
        self.rows = rows
        self.queued_at = queued_at
        self.loop = loop
        self.future = future
        self.deadline = deadline
        self.state = _QUEUED


def _set_result(future: asyncio.Future, value) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future, exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


class MicroBatcher:
    """Batches concurrent ``submit`` calls for ``fn``, run in one worker thread.

    Args:
        fn: ``fn(items: list) -> list``, one result per item, same order. Called only from the
            worker thread, one batch at a time; its exception fails that batch's items only.
        max_batch_size: int >= 1, rows per batch at most (an item larger than this runs alone).
        max_wait_ms: float >= 0 (finite), how long the oldest queued item may wait for the batch
            to fill before the batch leaves anyway.
        max_queue: int >= 1, waiting items at most; a ``submit`` beyond it raises
            :class:`Overloaded` without queueing.
        name: str, for the worker thread's name and messages (e.g. ``"user_tower"``).
        rows: optional ``rows(item) -> int >= 1``, the row count of an item (default: 1 each).
        max_queue_delay_ms: float >= 0 (finite); > 0: a ``submit`` while the oldest waiting item
            has waited longer than ``max_wait_ms + max_queue_delay_ms`` raises
            :class:`Overloaded` without queueing (module docstring, "Queue delay"). 0 (default):
            off, the old behaviour.

    Use: ``batcher.start()`` once (in or outside the loop), ``await batcher.submit(x)`` from any
    number of tasks (of one or several event loops), ``await batcher.close()`` at shutdown.
    """

    def __init__(self, fn: Callable[[list], list], max_batch_size: int, max_wait_ms: float,
                 max_queue: int, name: str = "", rows: Optional[Callable[[Any], int]] = None,
                 max_queue_delay_ms: float = 0.0):
        if not callable(fn):
            raise ValueError(f"`fn` must be callable. Received: fn={fn!r}")
        if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) \
                or max_batch_size < 1:
            raise ValueError("`max_batch_size` must be an int >= 1. "
                             f"Received: max_batch_size={max_batch_size!r}")
        if isinstance(max_wait_ms, bool) or not isinstance(max_wait_ms, (int, float)) \
                or not math.isfinite(max_wait_ms) or max_wait_ms < 0:
            raise ValueError("`max_wait_ms` must be a finite number >= 0. "
                             f"Received: max_wait_ms={max_wait_ms!r}")
        if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 1:
            raise ValueError(f"`max_queue` must be an int >= 1. Received: max_queue={max_queue!r}")
        if not isinstance(name, str):
            raise ValueError(f"`name` must be a str. Received: name={name!r}")
        if rows is not None and not callable(rows):
            raise ValueError(f"`rows` must be callable or None. Received: rows={rows!r}")
        if isinstance(max_queue_delay_ms, bool) \
                or not isinstance(max_queue_delay_ms, (int, float)) \
                or not math.isfinite(max_queue_delay_ms) or max_queue_delay_ms < 0:
            raise ValueError("`max_queue_delay_ms` must be a finite number >= 0 (0: off). "
                             f"Received: max_queue_delay_ms={max_queue_delay_ms!r}")
        self.fn = fn
        self.max_batch_size = max_batch_size
        self.max_wait_ms = float(max_wait_ms)
        self.max_queue = max_queue
        self.max_queue_delay_ms = float(max_queue_delay_ms)
        self.name = name
        self._rows = rows
        self._cond = threading.Condition()
        self._queue: collections.deque = collections.deque()
        self._queued_rows = 0
        self._closing = False
        self._thread: Optional[threading.Thread] = None
        self._batch_seconds: Optional[float] = None     # moving average of fn's run time
        self._batches = 0
        self._items = 0
        self._rows_run = 0
        self._failed_batches = 0
        self._failed_items = 0
        self._rejected = 0
        self._rejected_delay = 0
        self._cancelled = 0
        self._expired = 0
        self._max_depth = 0
        self._hist = [0] * (len(BATCH_SIZE_BUCKETS) + 1)   # non-cumulative, last = over the top

    def __repr__(self) -> str:
        return (f"MicroBatcher(name={self.name!r}, max_batch_size={self.max_batch_size}, "
                f"max_wait_ms={self.max_wait_ms}, max_queue={self.max_queue}, "
                f"max_queue_delay_ms={self.max_queue_delay_ms})")

    def _label(self) -> str:
        return f"batcher {self.name!r}" if self.name else "batcher"

    # ------------------------------------------------------------------ life cycle
    def start(self) -> None:
        """Starts the worker thread. Raises ``RuntimeError`` if started before or closed."""
        with self._cond:
            if self._closing:
                raise RuntimeError(f"{self._label()} is closed")
            if self._thread is not None:
                raise RuntimeError(f"{self._label()} is already started")
            self._thread = threading.Thread(
                target=self._work, name=f"micro-batcher-{self.name or id(self)}", daemon=True)
            self._thread.start()

    async def close(self) -> None:
        """Refuses new items (:class:`Closed`), runs every queued item (batches leave at once,
        without waiting ``max_wait_ms``), then stops the worker. Safe to call twice."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:     # never started: nothing can be queued (submit refuses)
            await asyncio.to_thread(thread.join)

    @property
    def closed(self) -> bool:
        """True once :meth:`close` began."""
        return self._closing

    # ------------------------------------------------------------------ requests
    def _retry_after_locked(self) -> float:
        per_batch = self._batch_seconds if self._batch_seconds is not None else 0.0
        batches_ahead = math.ceil(self._queued_rows / self.max_batch_size) or 1
        return max(MIN_RETRY_AFTER_S, batches_ahead * per_batch + self.max_wait_ms / 1000.0)

    async def submit(self, item: Any, deadline: Optional[float] = None) -> Any:
        """``fn``'s result for ``item``; see the module docstring for what it raises.

        ``deadline``: a :func:`time.monotonic` time, or None (default, the old behaviour: no
        deadline). Still queued at ``deadline``: :class:`DeadlineExceeded`, and ``fn`` never sees
        the item.
        """
        if deadline is not None and (isinstance(deadline, bool)
                                     or not isinstance(deadline, (int, float))
                                     or not math.isfinite(deadline)):
            raise ValueError(f"`deadline` must be a finite time.monotonic() value or None. "
                             f"Received: deadline={deadline!r}")
        n = 1
        if self._rows is not None:
            n = self._rows(item)
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ValueError(f"`rows(item)` must be an int >= 1. Received: {n!r}")
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._cond:
            if self._closing:
                raise Closed(f"{self._label()} is closed")
            if self._thread is None:
                raise RuntimeError(f"{self._label()} is not started: call start() first")
            if len(self._queue) >= self.max_queue:
                self._rejected += 1
                raise Overloaded(self._retry_after_locked(),
                                 f"{self._label()}: {len(self._queue)} requests waiting "
                                 f"(max_queue={self.max_queue})")
            if self.max_queue_delay_ms > 0 and self._queue:
                waited = time.monotonic() - self._queue[0].queued_at
                if waited > (self.max_wait_ms + self.max_queue_delay_ms) / 1000.0:
                    self._rejected += 1
                    self._rejected_delay += 1
                    raise Overloaded(self._retry_after_locked(),
                                     f"{self._label()}: the oldest waiting request has waited "
                                     f"{waited * 1000.0:.0f} ms (max_wait_ms={self.max_wait_ms:g}"
                                     f" + max_queue_delay_ms={self.max_queue_delay_ms:g})")
            entry = _Entry(item, n, time.monotonic(), loop, future, deadline)
            self._queue.append(entry)
            self._queued_rows += n
            self._max_depth = max(self._max_depth, len(self._queue))
            self._cond.notify_all()
        try:
            if deadline is None:
                return await future
            await asyncio.wait((future,), timeout=max(0.0, deadline - time.monotonic()))
        except asyncio.CancelledError:
            future.cancel()
            with self._cond:
                if entry.state == _QUEUED:           # the caller went away: free its slot now
                    self._queue.remove(entry)
                    self._queued_rows -= entry.rows
                    entry.state = _CANCELLED
                    self._cancelled += 1
            raise
        if not future.done():
            with self._cond:
                if entry.state == _QUEUED:           # still waiting: take it out, never run it
                    self._queue.remove(entry)
                    self._queued_rows -= entry.rows
                    self._expire_locked(entry, set_future=False)
                    raise DeadlineExceeded(time.monotonic() - entry.queued_at,
                                           self._expired_message(entry))
        return await future              # running (answered normally) or expired by the worker

    def _expired_message(self, entry: _Entry) -> str:
        return (f"{self._label()}: deadline exceeded after "
                f"{time.monotonic() - entry.queued_at:.3f} s waiting in the queue")

    def _expire_locked(self, entry: _Entry, set_future: bool) -> None:
        entry.state = _EXPIRED
        self._expired += 1
        if set_future:
            exc = DeadlineExceeded(time.monotonic() - entry.queued_at,
                                   self._expired_message(entry))
            try:
                entry.loop.call_soon_threadsafe(_set_exception, entry.future, exc)
            except RuntimeError:     # the caller's event loop is closed: nobody to answer
                pass

    # ------------------------------------------------------------------ worker
    def _full_locked(self) -> bool:
        return self._queued_rows >= self.max_batch_size

    def _take_locked(self) -> list:
        """Pops the next batch: items in arrival order while their rows fit (the first always)."""
        batch, total = [], 0
        now = None
        while self._queue:
            head = self._queue[0]
            if head.future.cancelled():          # the caller went away while waiting
                self._queue.popleft()
                self._queued_rows -= head.rows
                head.state = _CANCELLED          # its caller's handler must not remove it again
                self._cancelled += 1
                continue
            if head.deadline is not None:
                now = time.monotonic() if now is None else now
                if head.deadline <= now:         # its caller's timer has not fired yet
                    self._queue.popleft()
                    self._queued_rows -= head.rows
                    self._expire_locked(head, set_future=True)
                    continue
            if batch and total + head.rows > self.max_batch_size:
                break
            self._queue.popleft()
            self._queued_rows -= head.rows
            head.state = _TAKEN
            batch.append(head)
            total += head.rows
            if total >= self.max_batch_size:
                break
        return batch

    def _next_batch(self) -> Optional[list]:
        """Blocks until a batch is due; None when closing and the queue is empty."""
        with self._cond:
            while True:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if not self._queue:
                    return None
                deadline = self._queue[0].queued_at + self.max_wait_ms / 1000.0
                while self._queue and not self._full_locked() and not self._closing:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
                batch = self._take_locked()
                if batch:
                    return batch
                # every waiting item was cancelled or expired: wait again

    def _work(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            started = time.monotonic()
            try:
                results = self.fn([e.item for e in batch])
                if not isinstance(results, (list, tuple)) or len(results) != len(batch):
                    got = len(results) if hasattr(results, "__len__") else type(results).__name__
                    raise RuntimeError(f"{self._label()}: fn returned {got} results for a batch "
                                       f"of {len(batch)} items")
                error = None
            except Exception as exc:  # noqa: BLE001 - handed to every caller of the batch
                error, results = exc, None
            elapsed = time.monotonic() - started
            rows = sum(e.rows for e in batch)
            with self._cond:
                self._batches += 1
                self._items += len(batch)
                self._rows_run += rows
                i = next((j for j, b in enumerate(BATCH_SIZE_BUCKETS) if rows <= b),
                         len(BATCH_SIZE_BUCKETS))
                self._hist[i] += 1
                if error is not None:
                    self._failed_batches += 1
                    self._failed_items += len(batch)
                self._batch_seconds = elapsed if self._batch_seconds is None else (
                    _EWMA_WEIGHT * elapsed + (1 - _EWMA_WEIGHT) * self._batch_seconds)
            for k, entry in enumerate(batch):
                try:
                    if error is not None:
                        entry.loop.call_soon_threadsafe(_set_exception, entry.future, error)
                    else:
                        entry.loop.call_soon_threadsafe(_set_result, entry.future, results[k])
                except RuntimeError:     # the caller's event loop is closed: nobody to answer
                    pass

    # ------------------------------------------------------------------ metrics
    def stats(self) -> dict:
        """A snapshot for ``/metrics`` (plain ints and floats, consistent under one lock):

        ``name``, ``max_batch_size``, ``max_wait_ms``, ``max_queue``, ``max_queue_delay_ms``;
        ``batches`` (fn calls), ``items`` and ``rows`` (run in them),
        ``failed_batches``/``failed_items`` (fn raised or returned the wrong length),
        ``rejected`` (:class:`Overloaded`, both reasons), ``rejected_delay`` (those of them
        refused by the queue-delay rule; ``rejected - rejected_delay``: a full queue),
        ``cancelled`` (dropped
        before running), ``expired`` (:class:`DeadlineExceeded`: dropped at their deadline,
        never run), ``queue_depth``/``queue_rows`` (waiting now), ``max_queue_depth`` (the
        most ever waiting, <= max_queue), ``batch_seconds_avg`` (moving average, 0.0 before the
        first batch), ``closed``; ``batch_size_buckets``: ``[(le, cumulative batches)]`` for
        ``le`` in :data:`BATCH_SIZE_BUCKETS` then ``"+Inf"`` (= ``batches``), and
        ``batch_size_sum`` (= ``rows``), as Prometheus histograms are written.
        """
        with self._cond:
            cumulative, acc = [], 0
            for le, count in zip(list(BATCH_SIZE_BUCKETS) + ["+Inf"], self._hist):
                acc += count
                cumulative.append((le, acc))
            return {
                "name": self.name, "max_batch_size": self.max_batch_size,
                "max_wait_ms": self.max_wait_ms, "max_queue": self.max_queue,
                "max_queue_delay_ms": self.max_queue_delay_ms,
                "batches": self._batches, "items": self._items, "rows": self._rows_run,
                "failed_batches": self._failed_batches, "failed_items": self._failed_items,
                "rejected": self._rejected, "rejected_delay": self._rejected_delay,
                "cancelled": self._cancelled,
                "expired": self._expired,
                "queue_depth": len(self._queue), "queue_rows": self._queued_rows,
                "max_queue_depth": self._max_depth,
                "batch_seconds_avg": self._batch_seconds or 0.0,
                "closed": self._closing,
                "batch_size_buckets": cumulative, "batch_size_sum": self._rows_run,
            }

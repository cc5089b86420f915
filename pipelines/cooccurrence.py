"""Sessions and the session co-occurrence table (training clicks only).

A session is a run of a user's clicks with no gap strictly greater than ``session_window_s``.
Every pair of clicks on two distinct items at most ``session_window_s`` apart (inclusive) counts
once (A, B, A inside the window: count(A, B) = 2); ``max_pairs_per_click`` N > 0 caps each click
at its N nearest earlier clicks instead. Partial counts on item indices are pre-aggregated inside
the DoFn (:class:`PairCounter`), merged per item with a CombinePerKey (never one element per
pair) and written as one CSR file, ``cooccurrence/cooccurrence.npz``
(:class:`micrec_tf.data.artifacts.CooccurrenceTable`: every neighbour, or the top
``cooccurrence_top_m``; ``same_category`` per entry from ``session_category``).

Transforms (PCollections they take and give):

- :class:`CooccurrenceCounts`: ``(users, index)`` -> ``{"rows": (item index, (neighbours
  int64 [n] ascending, counts int64 [n])), one per item with a neighbour, STATS: pairs}``.
- :class:`WriteCooccurrence`: ``(rows, item features, index)`` -> ``cooccurrence.npz`` and
  its STATS (``cooc.items``, ``pairs.distinct``).

``users`` are the rows of :class:`pipelines.split.UserTimelines`; ``index`` is the one-element
``{field: {value: index}}`` of :class:`pipelines.vocab.Vocabularies`.
"""
from __future__ import annotations

import os

import numpy as np

from pipelines.common import STATS, BundleCounter, windowed, write_bytes

import apache_beam as beam  # noqa: E402  (after pipelines.common: its import is quiet)

from micrec_tf.config import ConfigError  # noqa: E402
from micrec_tf.data.artifacts import CooccurrenceTable, cooccurrence_npz_bytes  # noqa: E402

# Flush the in-DoFn co-occurrence partial counts when they hold this many (item, item) entries.
COOC_FLUSH_ENTRIES = 4_000_000


def count_sessions(clicks, window_s: int) -> int:
    """Sessions in clicks sorted by time: a gap strictly greater than ``window_s`` starts one."""
    sessions = 0
    prev = None
    for ts, _ in clicks:
        if prev is None or ts - prev > window_s:
            sessions += 1
        prev = ts
    return sessions


def cooccurrence_pairs(clicks, window_s: int, max_pairs_per_click: int = 0):
    """Yields one (earlier_item, later_item) per co-occurrence in clicks sorted by time.

    Two clicks on distinct items at most ``window_s`` apart (inclusive) are one co-occurrence
    (a user clicking A, B, A inside the window gives two A-B co-occurrences). With
    ``max_pairs_per_click`` N > 0 each click pairs with its N nearest earlier clicks on another
    item only; 0 = no cap (the paper's definition).
    """
    for j in range(1, len(clicks)):
        tj, item_j = clicks[j]
        taken = 0
        i = j - 1
        while i >= 0 and (not max_pairs_per_click or taken < max_pairs_per_click):
            ti, item_i = clicks[i]
            if tj - ti > window_s:
                break
            if item_i != item_j:
                yield item_i, item_j
                taken += 1
            i -= 1


# Pairs per array chunk of :func:`cooccurrence_pair_chunks` (a few int64 arrays of this size).
PAIR_CHUNK = 1 << 21


def cooccurrence_pair_chunks(ts, codes, window_s: int, max_pairs_per_click: int = 0,
                             chunk: int = PAIR_CHUNK):
    """Vectorised :func:`cooccurrence_pairs` on int arrays, in pieces of about ``chunk`` pairs.

    ts:    int64 [n] click times, ascending.
    codes: int64 [n] item codes.
    Yields (earlier codes [k], later codes [k]) arrays; together the same pairs as the reference
    generator, in another order. Memory stays O(chunk + n) however long a burst of clicks is.

    No cap: click j pairs with every click in ``[lo[j], j)``, ``lo`` from one ``searchsorted``
    on ``ts - window_s``; the clicks are cut into runs whose windows hold about ``chunk`` pairs
    and each run is expanded with ``repeat``. Cap N: step d pairs every still-open click j with
    click j - d; a click closes when it reached the cap or click j - d is out of the window (then
    every earlier one is too).
    """
    ts = np.asarray(ts, np.int64)
    codes = np.asarray(codes, np.int64)
    n = ts.size
    if n < 2:
        return
    if max_pairs_per_click:
        yield from _capped_pair_chunks(ts, codes, window_s, max_pairs_per_click, chunk)
        return
    lo = np.searchsorted(ts, ts - window_s, side="left")
    width = np.arange(n, dtype=np.int64) - lo  # earlier clicks inside click j's window
    ends = np.cumsum(width)  # pairs of clicks 0..j
    start = 0
    while start < n:
        before = int(ends[start - 1]) if start else 0
        stop = max(start + 1, int(np.searchsorted(ends, before + chunk, side="right")))
        w = width[start:stop]
        total = int(ends[stop - 1]) - before
        if total:
            later = np.repeat(np.arange(start, stop, dtype=np.int64), w)
            earlier = lo[later] + (np.arange(total, dtype=np.int64)
                                   - np.repeat(ends[start:stop] - w - before, w))
            a, b = codes[earlier], codes[later]
            distinct = a != b
            yield a[distinct], b[distinct]
        start = stop


def _capped_pair_chunks(ts, codes, window_s, cap, chunk):
    taken = np.zeros(ts.size, np.int64)
    active = np.arange(1, ts.size)
    out_a, out_b, size = [], [], 0
    d = 1
    while active.size:
        active = active[active >= d]
        earlier = active - d
        open_ = ts[active] - ts[earlier] <= window_s
        active, earlier = active[open_], earlier[open_]
        distinct = codes[active] != codes[earlier]
        later = active[distinct]
        out_a.append(codes[earlier[distinct]])
        out_b.append(codes[later])
        size += later.size
        taken[later] += 1
        active = active[taken[active] < cap]
        d += 1
        if size >= chunk or not active.size:
            if size:
                yield np.concatenate(out_a), np.concatenate(out_b)
            out_a, out_b, size = [], [], 0


def cooccurrence_pair_arrays(ts, codes, window_s: int, max_pairs_per_click: int = 0):
    """Every pair of :func:`cooccurrence_pair_chunks` as two arrays (earlier codes, later codes)."""
    chunks = list(cooccurrence_pair_chunks(ts, codes, window_s, max_pairs_per_click))
    if not chunks:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate([a for a, _ in chunks]), np.concatenate([b for _, b in chunks])


def merge_counts(keys, counts):
    """Sums ``counts`` of equal ``keys``: -> (unique keys ascending, summed counts), int64."""
    keys = np.asarray(keys, np.int64)
    counts = np.asarray(counts, np.int64)
    if not keys.size:
        return keys, counts
    order = np.argsort(keys, kind="stable")
    keys, counts = keys[order], counts[order]
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    return keys[starts], np.add.reduceat(counts, starts)


class PairCounter:
    """Counts unordered pairs of item indices (< 2**31) as int64 keys ``lo << 32 | hi``.

    ``add`` buffers the pairs; they are summed (:func:`merge_counts`) once the buffer holds
    4x the distinct pairs counted so far (at least 1M), so memory stays a small multiple of the
    distinct pairs whatever the number of pairs added.
    """

    def __init__(self):
        self._keys = np.zeros(0, np.int64)
        self._counts = np.zeros(0, np.int64)
        self._pending = []
        self._pending_size = 0

    def add(self, a: np.ndarray, b: np.ndarray) -> None:
        """a, b: int [k] item indices of k co-occurrences (order within a pair is ignored)."""
        if not len(a):
            return
        a, b = np.asarray(a, np.int64), np.asarray(b, np.int64)
        self._pending.append((np.minimum(a, b) << 32) | np.maximum(a, b))
        self._pending_size += len(a)
        if self._pending_size > 4 * max(len(self._keys), 1_000_000):
            self.compact()

    def compact(self) -> None:
        if not self._pending:
            return
        pending = np.sort(np.concatenate(self._pending))
        starts = np.flatnonzero(np.r_[True, pending[1:] != pending[:-1]])
        new_counts = np.diff(np.r_[starts, pending.size])
        self._pending, self._pending_size = [], 0
        self._keys, self._counts = merge_counts(np.concatenate([self._keys, pending[starts]]),
                                                np.concatenate([self._counts, new_counts]))

    def num_entries(self) -> int:
        """Entries of the symmetric table counted so far (2 per distinct pair), buffer excluded."""
        return 2 * len(self._keys)

    def rows(self):
        """Yields (item, neighbours int64 [n] ascending, counts int64 [n]) in item order, both
        directions of every pair."""
        self.compact()
        if not len(self._keys):
            return
        lo, hi = self._keys >> 32, self._keys & 0xFFFFFFFF
        a, b = np.concatenate([lo, hi]), np.concatenate([hi, lo])
        counts = np.concatenate([self._counts, self._counts])
        order = np.lexsort((b, a))
        a, b, counts = a[order], b[order], counts[order]
        bounds = np.flatnonzero(np.r_[True, a[1:] != a[:-1], True])
        for s, e in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
            yield int(a[s]), b[s:e], counts[s:e]


def merge_neighbour_counts(x, y):
    """Sum of two (neighbours, counts) rows -> (neighbours ascending, counts)."""
    return merge_counts(np.concatenate([x[0], y[0]]), np.concatenate([x[1], y[1]]))


def top_neighbours(neighbours, counts, top_m: int = 0):
    """(neighbours, counts) sorted by count desc, then index; the first ``top_m`` (0 = all)."""
    neighbours = np.asarray(neighbours, np.int64)
    counts = np.asarray(counts, np.int64)
    order = np.lexsort((neighbours, -counts))
    if top_m:
        order = order[:top_m]
    return neighbours[order], counts[order]


def same_category(item: int, neighbours, categories):
    """int8 [n]: 1 where ``item`` and each neighbour are "same category" (``session_category``).

    ``categories``: int64 [V, T] tag indices per item (0 = padding; the pair shares a tag) or
    int64 [V] one value index per item (provider or an extra field; equal and non-zero).
    Index 0 (no tag / empty value) never counts.
    """
    neighbours = np.asarray(neighbours, np.int64)
    if categories.ndim == 2:
        own = categories[item]
        own = own[own > 0]
        return np.isin(categories[neighbours], own).any(axis=1).astype(np.int8)
    value = categories[item]
    return ((categories[neighbours] == value) & (value != 0)).astype(np.int8)


def session_category_choices(extra_fields) -> tuple:
    """The values ``preprocess.session_category`` may take for an adapter's item fields."""
    return ("tags", "provider") + tuple(extra_fields)


def check_session_category(value: str, extra_fields) -> None:
    """Raises :class:`ConfigError` (one line) when ``value`` names no item field."""
    choices = session_category_choices(extra_fields)
    if value not in choices:
        raise ConfigError(f"preprocess.session_category must be one of {list(choices)} (tags, "
                          f"provider or an item extra field of this dataset's adapter). "
                          f"Received: {value!r}")


# ------------------------------------------------------------------------------ Beam stages

class UserCooccurrence(beam.DoFn, BundleCounter):
    """Users' training clicks -> co-occurrence partial rows (item index, (neighbours, counts)).

    Pairs (:func:`cooccurrence_pair_chunks`, on item indices of the ``item_id`` vocabulary) are
    summed in one :class:`PairCounter` per bundle, emitted as one row per item when it holds
    ``COOC_FLUSH_ENTRIES`` entries and at the end of the bundle; never one element per pair.
    ``neighbours`` int64 [n] ascending, ``counts`` int64 [n].
    """

    def __init__(self, window_s, max_pairs):
        self.window_s = window_s
        self.max_pairs = max_pairs

    def start_bundle(self):
        self._reset_stats()
        self._pairs = PairCounter()

    def _flush(self, finishing: bool):
        """Emits the counted rows (in the global window when ``finishing`` the bundle)."""
        for item, neighbours, counts in self._pairs.rows():
            out = (item, (neighbours, counts))
            yield windowed(out) if finishing else out
        self._pairs = PairCounter()

    def process(self, user, index):
        clicks, n_train = user[2], user[3]  # item_cold_start: cold clicks (user[6]) never count
        if n_train < 2:
            return
        item_index = index["item_id"]
        train = clicks[:n_train]
        codes = np.fromiter((item_index[item] for _, item in train), np.int64, n_train)
        ts = np.fromiter((t for t, _ in train), np.int64, n_train)
        for a, b in cooccurrence_pair_chunks(ts, codes, self.window_s, self.max_pairs):
            self._pairs.add(a, b)
            self._stats["pairs"] += len(a)
        if self._pairs.num_entries() >= COOC_FLUSH_ENTRIES:
            yield from self._flush(finishing=False)

    def finish_bundle(self):
        yield from self._flush(finishing=True)
        yield from self._flush_stats()


class MergeNeighbourCounts(beam.CombineFn):
    """Sums (neighbours, counts) partial rows of one item (the co-occurrence combiner)."""

    def create_accumulator(self):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)

    def add_input(self, acc, row):
        return merge_neighbour_counts(acc, row)

    def merge_accumulators(self, accs):
        accs = list(accs)
        return merge_counts(np.concatenate([a[0] for a in accs]),
                            np.concatenate([a[1] for a in accs]))

    def extract_output(self, acc):
        return acc


def _category_codes(item_feats, index, session_category, extra_fields, max_tags):
    """The ``categories`` array of :func:`same_category` for every vocab item (row 0 empty).

    ``item_feats``: [(item_id, (idx, tag indices, provider index, extra indices, title))].
    -> int64 [V, max_tags] tag indices for ``tags``, int64 [V] value indices otherwise.
    """
    num_items = len(index["item_id"]) + 1
    if session_category == "tags":
        codes = np.zeros([num_items, max_tags], np.int64)
    else:
        codes = np.zeros([num_items], np.int64)
        k = None if session_category == "provider" else list(extra_fields).index(session_category)
    for _, (idx, tags, provider, extras, _) in item_feats:
        if not idx:
            continue
        if session_category == "tags":
            codes[idx, :len(tags)] = tags[:max_tags]
        else:
            codes[idx] = provider if k is None else extras[k]
    return codes


class CooccurrenceRows(beam.DoFn):
    """(item, (neighbours, counts)) -> (item, neighbours, counts, same_category, #distinct).

    Neighbours sorted by count desc, then index; the first ``top_m`` kept (0 = all).
    """

    def __init__(self, top_m):
        self.top_m = top_m

    def process(self, kv, categories):
        item, (neighbours, counts) = kv
        top, top_counts = top_neighbours(neighbours, counts, self.top_m)
        yield (item, top.astype(np.int32), top_counts,
               same_category(item, top, categories), int(len(neighbours)))


def _write_cooc(rows, out_dir, index):
    """All :class:`CooccurrenceRows` -> ``cooccurrence/cooccurrence.npz`` (CSR, V rows)."""
    num_items = len(index["item_id"]) + 1
    table = CooccurrenceTable.from_rows(num_items, [r[:4] for r in rows])
    write_bytes(os.path.join(out_dir, "cooccurrence", "cooccurrence.npz"),
                 cooccurrence_npz_bytes(table))
    return [("cooc.items", len(rows)),
            ("pairs.distinct", sum(r[4] for r in rows) // 2)]


class CooccurrenceCounts(beam.PTransform):
    """``(users, index)`` -> ``{"rows", STATS}``: the co-occurrence counts, one row per item.

    Input: user rows ``(user_id, profile, clicks, n_train, n_valid, has_profile)`` (only the
    first ``n_train`` clicks count) and the one-element vocabulary index. ``rows``: ``(item
    index, (neighbours int64 [n] ascending, counts int64 [n]))``, both directions of every pair;
    ``STATS``: ``("pairs", co-occurrences)``.
    """

    def __init__(self, window_s: int, max_pairs_per_click: int = 0):
        super().__init__()
        self.window_s, self.max_pairs_per_click = window_s, max_pairs_per_click

    def expand(self, inputs):
        users, index = inputs
        out = users | "UserCooc" >> beam.ParDo(
            UserCooccurrence(self.window_s, self.max_pairs_per_click),
            beam.pvalue.AsSingleton(index)).with_outputs(STATS, main="rows")
        merged = out.rows | "MergeCooc" >> beam.CombinePerKey(MergeNeighbourCounts())
        return {"rows": merged, STATS: out[STATS]}


class WriteCooccurrence(beam.PTransform):
    """``(rows, item features, index)`` -> ``<out_dir>/cooccurrence/cooccurrence.npz``.

    Input: the ``rows`` of :class:`CooccurrenceCounts`, the item features ``(item_id, (idx,
    tag indices, provider index, extra indices, title))`` of :class:`pipelines.items.ItemTable`
    and the one-element vocabulary index. Each row keeps its ``top_m`` neighbours by count
    (0 = all) and flags ``same_category`` by ``session_category``. Returns the STATS
    PCollection: ``cooc.items`` (rows) and ``pairs.distinct``.
    """

    def __init__(self, out_dir: str, top_m: int, session_category: str, extra_fields,
                 max_tags: int):
        super().__init__()
        check_session_category(session_category, extra_fields)
        self.out_dir, self.top_m, self.session_category = out_dir, top_m, session_category
        self.extra_fields, self.max_tags = tuple(extra_fields), max_tags

    def expand(self, inputs):
        rows, item_feats, index = inputs
        index = beam.pvalue.AsSingleton(index)
        categories = beam.pvalue.AsSingleton(
            item_feats | "AllItemFeatures" >> beam.combiners.ToList()
            | "CategoryCodes" >> beam.Map(_category_codes, index, self.session_category,
                                          self.extra_fields, self.max_tags))
        return (rows | "CoocRows" >> beam.ParDo(CooccurrenceRows(self.top_m), categories)
                | "AllCooc" >> beam.combiners.ToList()
                | "WriteCooc" >> beam.FlatMap(_write_cooc, self.out_dir, index))

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

Incremental update (issue 29, docs/GROWING_CATALOGUE.md): :func:`update_cooccurrence` adds the
co-occurrences of a new window of training clicks to the previous table; the state it needs is
each user's session tail (``cooccurrence/session_tails.jsonl``, :func:`session_tail`), written
by preprocess with ``preprocess.session_tails`` (:class:`WriteSessionState`) and by every update.
"""
from __future__ import annotations

import json
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
                             chunk: int = PAIR_CHUNK, first_later: int = 0):
    """Vectorised :func:`cooccurrence_pairs` on int arrays, in pieces of about ``chunk`` pairs.

    ts:    int64 [n] click times, ascending.
    codes: int64 [n] item codes.
    first_later: only pairs whose later click is click ``first_later`` or after (issue 29: the
        clicks before it are the previous window's session tail, already counted); 0 (default)
        = every pair, the behaviour of before.
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
        yield from _capped_pair_chunks(ts, codes, window_s, max_pairs_per_click, chunk,
                                       first_later)
        return
    lo = np.searchsorted(ts, ts - window_s, side="left")
    width = np.arange(n, dtype=np.int64) - lo  # earlier clicks inside click j's window
    ends = np.cumsum(width)  # pairs of clicks 0..j
    start = max(0, int(first_later))
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


def _capped_pair_chunks(ts, codes, window_s, cap, chunk, first_later=0):
    taken = np.zeros(ts.size, np.int64)
    active = np.arange(max(1, int(first_later)), ts.size)
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
        yield from pair_rows(self._keys, self._counts)


def pair_rows(keys, counts):
    """Pair keys ``lo << 32 | hi`` (unique) and their counts -> the rows of
    :meth:`PairCounter.rows`: (item, neighbours int64 [n] ascending, counts int64 [n]) in item
    order, both directions of every pair."""
    keys, counts = np.asarray(keys, np.int64), np.asarray(counts, np.int64)
    if not len(keys):
        return
    lo, hi = keys >> 32, keys & 0xFFFFFFFF
    a, b = np.concatenate([lo, hi]), np.concatenate([hi, lo])
    counts = np.concatenate([counts, counts])
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


# ------------------------------------------------------------------------ incremental update
# Issue 29 ("A growing catalogue"): a new window of training clicks is counted and ADDED to the
# previous table, never recomputed from all history. The only state it needs besides the table
# is each user's session tail: the user's training clicks at most ``session_window_s`` before
# the user's last one. Every click of a later window comes at or after that last click, so the
# clicks it can pair with (at most ``session_window_s`` earlier), and under a cap its N nearest
# earlier ones, all lie in the tail: a session spanning the boundary is counted once, exactly as
# on the union of the windows.

SESSION_TAILS = os.path.join("cooccurrence", "session_tails.jsonl")
SESSION_STATE = os.path.join("cooccurrence", "session_state.json")


def session_tail(clicks, window_s: int) -> tuple:
    """The clicks (sorted by time, ``(ts, item_id)``) at most ``window_s`` before the last one."""
    clicks = tuple((int(t), item) for t, item in clicks)
    if not clicks:
        return ()
    last = clicks[-1][0]
    return tuple(c for c in clicks if c[0] >= last - window_s)


def _train_clicks(row):
    """A user row of :class:`pipelines.split.UserTimelines` -> (user_id, its training clicks)."""
    return row[0], tuple(row[2][:row[3]])


def session_tails(user_rows, window_s: int, previous=None) -> dict:
    """``{user_id: tail}`` after the users' training clicks of ``user_rows`` (rows of
    :class:`pipelines.split.UserTimelines`; only the first ``n_train`` clicks) follow the
    ``previous`` tails; users without new clicks keep their previous tail."""
    tails = dict(previous or {})
    for row in user_rows:
        user, train = _train_clicks(row)
        if train:
            tails[user] = session_tail(tails.get(user, ()) + train, window_s)
    return tails


def _state_meta(pc, grown_from=None, updates: int = 0, users: int = 0) -> dict:
    return {"session_window_s": int(pc.session_window_s),
            "max_pairs_per_click": int(pc.max_pairs_per_click),
            "cooccurrence_top_m": int(pc.cooccurrence_top_m),
            "grown_from": grown_from, "updates": int(updates), "users": int(users)}


def session_state_files(tails: dict, meta: dict) -> dict:
    """``{relative path: bytes}`` of the state files: ``cooccurrence/session_tails.jsonl`` (one
    line per user, ascending user id: ``{"user": id, "clicks": [[ts, item_id], ...]}``) and
    ``cooccurrence/session_state.json`` (the settings the table was counted with, ``grown_from``
    (the previous artifacts folder, null for a full preprocess), ``updates``, ``users``)."""
    lines = [json.dumps({"user": u, "clicks": [[int(t), i] for t, i in tails[u]]},
                        separators=(",", ":")) for u in sorted(tails) if tails[u]]
    return {SESSION_TAILS: "".join(line + "\n" for line in lines).encode("utf-8"),
            SESSION_STATE: (json.dumps(meta, indent=1, sort_keys=True) + "\n").encode("utf-8")}


def write_session_state(out_dir: str, tails: dict, meta: dict) -> None:
    for rel, data in session_state_files(tails, meta).items():
        write_bytes(os.path.join(out_dir, rel), data)


def read_session_state(artifacts_dir: str):
    """-> (meta dict, {user_id: tail}) of a folder written with ``preprocess.session_tails``
    or by :func:`update_cooccurrence`; :class:`FileNotFoundError` naming the key otherwise."""
    state = os.path.join(artifacts_dir, SESSION_STATE)
    if not os.path.exists(state):
        raise FileNotFoundError(
            f"{state} is missing: the previous artifacts keep no session tails; preprocess them "
            f"with --set preprocess.session_tails=true (or grow them with update_cooccurrence)")
    with open(state, encoding="utf-8") as fh:
        meta = json.load(fh)
    tails = {}
    with open(os.path.join(artifacts_dir, SESSION_TAILS), encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                rec = json.loads(line)
                tails[rec["user"]] = tuple((int(t), i) for t, i in rec["clicks"])
    return meta, tails


def _table_pair_counts(table: CooccurrenceTable):
    """A symmetric table -> (pair keys ``lo << 32 | hi`` ascending, counts), each pair once."""
    rows = table.rows()
    once = table.neighbours > rows
    return merge_counts((rows[once] << 32) | table.neighbours[once], table.counts[once])


def _item_categories(items_rows, num_items: int, session_category: str, max_tags: int):
    """The ``categories`` of :func:`same_category` from ``items/items.jsonl`` rows (V rows)."""
    from micrec_tf.data.contract import item_feature

    if session_category == "tags":
        codes = np.zeros([num_items, max_tags], np.int64)
    else:
        codes = np.zeros([num_items], np.int64)
    for row in items_rows:
        idx = row["item"]
        if idx >= num_items:
            continue
        if session_category == "tags":
            tags = row["tags"][:max_tags]
            codes[idx, :len(tags)] = tags
        elif session_category == "provider":
            codes[idx] = row["provider"]
        else:
            codes[idx] = row["extra"].get(item_feature(session_category), 0)
    return codes


def _check_prefix(prev_vocab: list, vocab: list, path: str) -> None:
    if vocab[:len(prev_vocab)] != prev_vocab:
        padded = vocab + [None] * len(prev_vocab)
        first = next(i for i, (a, b) in enumerate(zip(prev_vocab, padded)) if a != b)
        raise ValueError(f"{path}: the item vocabulary does not extend the previous one (index "
                         f"{first + 1}: {prev_vocab[first]!r} became "
                         f"{vocab[first] if first < len(vocab) else None!r}); an update needs "
                         f"append-only vocabularies (preprocess.previous_artifacts)")


def update_cooccurrence(prev_dir: str, window_rows, out_dir: str, pc) -> dict:
    """Adds a new window's co-occurrences to the previous table (issue 29).

    prev_dir:    the previous artifacts: ``cooccurrence/cooccurrence.npz`` (full rows, counted
                 with ``cooccurrence_top_m`` 0), the session state (:func:`read_session_state`)
                 and ``vocab/item_id.txt``; None = no previous table (the first window).
    window_rows: the new window's user rows ``(user_id, profile, clicks ((ts, item_id), ...),
                 n_train, ...)`` of :class:`pipelines.split.UserTimelines` (one per user; only
                 the first ``n_train`` clicks count), every click at or after the user's last
                 click of the previous state (same second allowed: it comes later).
    out_dir:     the new artifacts: ``vocab/item_id.txt`` (the previous one plus appended
                 items) and ``items/items.jsonl`` (for ``same_category``) are read;
                 ``cooccurrence/cooccurrence.npz`` and the session state are written.
    pc:          the :class:`micrec_tf.config.PreprocessConfig` (``session_window_s``,
                 ``max_pairs_per_click`` as the previous table was counted with;
                 ``cooccurrence_top_m`` 0; ``session_category``, ``max_tags``).

    The table written equals the one a full preprocess counts on the union of the windows
    (the same CSR bytes). Returns stats: ``pairs_added`` (co-occurrences of the window),
    ``pairs_distinct``, ``cooccurrence_items``, ``tail_users``, ``window_users``.
    """
    from micrec_tf.data.artifacts import read_items, read_vocab

    previous = read_previous_table(prev_dir, pc)
    vocab_path = os.path.join(out_dir, "vocab", "item_id.txt")
    vocab = read_vocab(vocab_path)
    items_rows = read_items(out_dir)
    extra = sorted({k[len("item_"):] for r in items_rows for k in r["extra"]})
    check_session_category(pc.session_category, extra)
    categories = _item_categories(items_rows, len(vocab) + 1, pc.session_category, pc.max_tags)
    table, tails, meta, stats = grow_cooccurrence(previous, window_rows, vocab, categories, pc,
                                                  where=vocab_path)
    write_bytes(os.path.join(out_dir, "cooccurrence", "cooccurrence.npz"),
                cooccurrence_npz_bytes(table))
    write_session_state(out_dir, tails, meta)
    return stats


def read_previous_table(prev_dir, pc) -> dict:
    """The previous artifacts an update grows from (None: an empty table, no tails): ``meta``,
    ``tails``, ``vocab`` (item ids in index order), ``keys`` / ``counts`` (its pairs, each once),
    ``dir``. Checks the session settings against ``pc`` (one-line ``ValueError``)."""
    from micrec_tf.data.artifacts import read_vocab, load_cooccurrence

    if prev_dir is None:  # the first window: an empty previous table
        meta, tails, vocab = _state_meta(pc), {}, []
        keys, counts = np.zeros(0, np.int64), np.zeros(0, np.int64)
    else:
        meta, tails = read_session_state(prev_dir)
    for key in ("session_window_s", "max_pairs_per_click"):
        if int(meta[key]) != int(getattr(pc, key)):
            raise ValueError(f"preprocess.{key} must be {meta[key]} as the previous table was "
                             f"counted with ({prev_dir}). Received: {getattr(pc, key)!r}")
    for where, top_m in (("the previous table", meta["cooccurrence_top_m"]),
                         ("this update", pc.cooccurrence_top_m)):
        if int(top_m):
            raise ValueError(f"preprocess.cooccurrence_top_m must be 0 for {where}: an update "
                             f"adds to full rows. Received: {top_m!r}")
    if prev_dir is not None:
        vocab = read_vocab(os.path.join(prev_dir, "vocab", "item_id.txt"))
        keys, counts = _table_pair_counts(load_cooccurrence(prev_dir, num_items=len(vocab) + 1))
    return {"meta": meta, "tails": tails, "vocab": vocab, "keys": keys, "counts": counts,
            "dir": prev_dir and os.path.abspath(prev_dir)}


def grow_cooccurrence(previous: dict, window_rows, vocab: list, categories, pc,
                      where: str = "the item vocabulary"):
    """The core of :func:`update_cooccurrence` on objects: ``previous`` from
    :func:`read_previous_table`, ``vocab`` the grown item ids in index order (the previous ones
    first), ``categories`` as :func:`same_category` takes them (V rows).

    -> (:class:`CooccurrenceTable` [V], the new tails, the new state meta, stats).
    """
    _check_prefix(list(previous["vocab"]), list(vocab), where)
    index = {v: i + 1 for i, v in enumerate(vocab)}
    num_items = len(vocab) + 1
    tails = previous["tails"]
    window_s, cap = int(pc.session_window_s), int(pc.max_pairs_per_click)
    counter, added, seen = PairCounter(), 0, set()
    new_tails = dict(tails)
    for row in window_rows:
        user, train = _train_clicks(row)
        if user in seen:
            raise ValueError(f"user {user!r} has two rows in the window: one row per user")
        seen.add(user)
        if not train:
            continue
        tail = tails.get(user, ())
        if tail and int(train[0][0]) < tail[-1][0]:
            raise ValueError(f"user {user!r}: a window click at {train[0][0]} is earlier than "
                             f"the user's last click {tail[-1][0]} of the previous artifacts: "
                             f"windows must follow each other in time")
        clicks = tail + train
        missing = [i for _, i in clicks if i not in index]
        if missing:
            raise ValueError(f"item {missing[0]!r} (user {user!r}) is not in {where}")
        codes = np.fromiter((index[i] for _, i in clicks), np.int64, len(clicks))
        ts = np.fromiter((int(t) for t, _ in clicks), np.int64, len(clicks))
        for a, b in cooccurrence_pair_chunks(ts, codes, window_s, cap, first_later=len(tail)):
            counter.add(a, b)
            added += len(a)
        new_tails[user] = session_tail(clicks, window_s)
    counter.compact()
    keys, counts = merge_counts(np.concatenate([previous["keys"], counter._keys]),
                                np.concatenate([previous["counts"], counter._counts]))
    rows = [(item, nb, c, same_category(item, nb, categories))
            for item, nb, c in pair_rows(keys, counts)]
    table = CooccurrenceTable.from_rows(num_items, rows)
    users = sum(1 for t in new_tails.values() if t)
    meta = _state_meta(pc, grown_from=previous["dir"],
                       updates=int(previous["meta"].get("updates", 0)) + 1, users=users)
    stats = {"pairs_added": int(added), "pairs_distinct": int(len(keys)),
             "cooccurrence_items": len(rows), "tail_users": users, "window_users": len(seen)}
    return table, new_tails, meta, stats


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


def _write_session_state(tails, out_dir, meta):
    tails = dict(tails)
    write_session_state(out_dir, tails, {**meta, "users": sum(1 for t in tails.values() if t)})
    return []


class WriteSessionState(beam.PTransform):
    """``users`` -> ``cooccurrence/session_tails.jsonl`` + ``session_state.json`` (issue 29).

    Input: the user rows the co-occurrence table is counted from (only the first ``n_train``
    clicks); each user's session tail (:func:`session_tail`) is what an incremental update
    (:func:`update_cooccurrence`) needs to count a session that spans the window boundary once.
    Written by preprocess only with ``preprocess.session_tails`` (default false: no such file,
    the artifacts of before). Returns an empty PCollection.
    """

    def __init__(self, out_dir: str, pc):
        super().__init__()
        self.out_dir, self.window_s = out_dir, int(pc.session_window_s)
        self.meta = _state_meta(pc)

    def expand(self, users):
        window_s = self.window_s
        return (users
                | "Tail" >> beam.FlatMap(lambda r: [(r[0], session_tail(r[2][:r[3]], window_s))]
                                         if r[3] else [])
                | "AllTails" >> beam.combiners.ToList()
                | "WriteTails" >> beam.FlatMap(_write_session_state, self.out_dir, self.meta))


def _update_and_write(rows, index, categories, prev_dir, out_dir, pc):
    """:func:`grow_cooccurrence` inside the job: writes the table and the state, -> STATS."""
    item_index = index["item_id"]
    vocab = sorted(item_index, key=item_index.get)
    previous = read_previous_table(prev_dir, pc)
    table, tails, meta, stats = grow_cooccurrence(previous, rows, vocab, categories, pc,
                                                  where="this run's item vocabulary")
    write_bytes(os.path.join(out_dir, "cooccurrence", "cooccurrence.npz"),
                cooccurrence_npz_bytes(table))
    write_session_state(out_dir, tails, meta)
    return [("pairs", stats["pairs_added"]), ("cooc.items", stats["cooccurrence_items"]),
            ("pairs.distinct", stats["pairs_distinct"])]


class UpdateCooccurrence(beam.PTransform):
    """``(users, item features, index)`` -> the previous table plus this run's pairs (issue 29).

    Step 5 of a preprocess with ``preprocess.previous_artifacts`` (a local folder written with
    ``preprocess.session_tails``) and ``preprocess.session_tails``: instead of counting this
    run's clicks alone, :func:`grow_cooccurrence` adds them to the previous
    ``cooccurrence.npz`` through its session tails and writes the table and the new state.
    Inputs as :class:`CooccurrenceCounts` and :class:`WriteCooccurrence`; returns the STATS
    PCollection (``pairs``: co-occurrences of this run's clicks, ``cooc.items``,
    ``pairs.distinct`` of the whole table). One worker holds the previous table and the run's
    rows (a daily window, not the history).
    """

    def __init__(self, out_dir: str, prev_dir: str, pc, extra_fields):
        super().__init__()
        check_session_category(pc.session_category, extra_fields)
        if not os.path.exists(os.path.join(prev_dir, SESSION_STATE)):
            raise ConfigError(f"preprocess.session_tails: the previous artifacts {prev_dir!r} "
                              f"keep no session tails (preprocess them with "
                              f"preprocess.session_tails true, or set it false here to count "
                              f"this run's clicks alone)")
        self.out_dir, self.prev_dir, self.pc = out_dir, prev_dir, pc
        self.extra_fields = tuple(extra_fields)

    def expand(self, inputs):
        rows, item_feats, index = inputs
        index = beam.pvalue.AsSingleton(index)
        pc = self.pc
        categories = beam.pvalue.AsSingleton(
            item_feats | "AllItemFeatures" >> beam.combiners.ToList()
            | "CategoryCodes" >> beam.Map(_category_codes, index, pc.session_category,
                                          self.extra_fields, pc.max_tags))
        return (rows | "AllRows" >> beam.combiners.ToList()
                | "Grow" >> beam.FlatMap(_update_and_write, index, categories, self.prev_dir,
                                         self.out_dir, pc))

"""The Beam preprocessing job: raw files -> artifacts/<name>/ (contracts in docs/ARCHITECTURE.md).

    python -m pipelines.preprocess --config configs/ml-1m.yaml [--set key=value ...] [Beam flags]

Any flag this module does not know goes to Beam's ``PipelineOptions`` (after
``preprocess.beam_args`` from the config), so ``--runner=DataflowRunner --project=...`` or
``--direct_num_workers=2`` work unchanged. DirectRunner is the default.

A flag that neither this module nor any Beam ``PipelineOptions`` class knows (``--sett``, a
stray word) is an error naming it (exit 2), never a warning Beam prints before running anyway.

Steps:
1. Read every raw file as numbered lines (:class:`ReadNumberedLines`: bytes exactly as stored,
   1-based line numbers, uncompressed files split in line-aligned ranges), parse them with the
   dataset adapter; bad lines go to ``dead_letters/`` with their reason (Beam counters
   ``dead_letters:<reason>``), clicks on items missing from the item table too
   (``unknown_item``). A dead letter keeps the file, the line number and the original bytes
   (:func:`dead_letter_record`), so the line can be fixed and replayed. Nothing is dropped
   silently: every raw line is counted in stats.json as parsed, skipped (header or blank) or
   dead-lettered.
2. Split: ``global_time`` (exact timestamp quantiles, two passes: day buckets, then the exact
   seconds inside the two boundary buckets; ties at a boundary all go to the later split) or
   ``leave_last_out`` (per user, last click = test, second-last = valid).
3. Vocabularies from training clicks only, by training-click frequency desc, then value.
4. One ``tf.train.Example`` per click with the H most recent earlier clicks; sharded GZIP TFRecords.
5. Sessions and the co-occurrence table (training clicks only). Every pair of clicks on two
   distinct items at most ``session_window_s`` apart (inclusive) counts once (A, B, A inside
   the window: count(A, B) = 2); ``max_pairs_per_click`` N > 0 caps each click at its N nearest
   earlier clicks instead. Partial counts on item indices are pre-aggregated inside the DoFn,
   merged per item with a CombinePerKey (never one element per pair) and written as one CSR
   file, ``cooccurrence/cooccurrence.npz`` (:class:`micrec_tf.data.artifacts.CooccurrenceTable`:
   every neighbour, or the top ``cooccurrence_top_m``; ``same_category`` per entry from
   ``session_category``).
6. stats.json.

Click order (the tie rule): a user's clicks are sorted by timestamp; clicks in the same second
keep the input order: the input files in the order the adapter lists them, then the line
number, then the row's position within the line (a MIND line yields many clicks). The key
(:func:`click_order`, one int) travels from :class:`ParseRows` to :class:`PrepareUser` and is
dropped there. It decides histories, session pairs under a cap and the leave-last-out targets
(53 % of MovieLens clicks share their second with the previous click). With
``deduplicate_clicks`` the first copy of identical (item, second) clicks is kept.

Output is deterministic: every file is sorted before it is written (TFRecord shards by user
hash, records by user then click order), so two runs give byte-identical artifacts except the
timing block of stats.json. The job writes into ``<artifacts_dir>.tmp-<id>`` and renames it into
place only when everything succeeded.
"""
from __future__ import annotations

import base64
import collections
import contextlib
import difflib
import io
import json
import logging
import math
import os
import shutil
import sys
import time
import uuid
import zlib

import numpy as np

import micrec_tf  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow is imported)
from micrec_tf import cli


@contextlib.contextmanager
def _quiet_root_logger():
    """Drops what is logged on the root logger inside the block, unless ``--verbose``.

    ``import apache_beam`` warns ``apitools not found ...`` through ``logging.warning`` (the root
    logger, which :func:`micrec_tf.cli.quiet_logs` cannot target by name) on a machine without
    the Google Cloud client libraries. The NullHandler also keeps ``logging.warning`` from
    installing a root handler.
    """
    if cli.verbose_requested():
        yield
        return
    root = logging.getLogger()
    guard, errors_only = logging.NullHandler(), (lambda record: record.levelno >= logging.ERROR)
    root.addHandler(guard)
    root.addFilter(errors_only)
    try:
        yield
    finally:
        root.removeFilter(errors_only)
        root.removeHandler(guard)


with _quiet_root_logger():
    import apache_beam as beam
    from apache_beam.io.filesystem import CompressionTypes
    from apache_beam.io.filesystems import FileSystems
    from apache_beam.metrics import Metrics
    from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
    from apache_beam.transforms.window import GlobalWindows

from micrec_tf.config import Config, ConfigError
from micrec_tf.data import schema
from micrec_tf.data.artifacts import (CooccurrenceTable, cooccurrence_npz_bytes,
                                      vocab_field_names)

LOG = logging.getLogger("pipelines.preprocess")

TRAIN, VALID, TEST = "train", "valid", "test"
SPLITS = (TRAIN, VALID, TEST)
SOURCES = ("interactions", "items", "users")
DEAD = "dead"
STATS = "stats"
DAY = 86400
# Flush the in-DoFn co-occurrence partial counts when they hold this many (item, item) entries.
COOC_FLUSH_ENTRIES = 4_000_000
RESERVED_FEATURES = ("user_id", "hist_items", "hist_len", "item", "item_tags", "item_provider",
                     "timestamp")


# --------------------------------------------------------------------------------------------
# Pure functions (also used by the tests as the single definition of each rule)
# --------------------------------------------------------------------------------------------

# Bits of the line number and of the row position inside a line in :func:`click_order`.
ORDER_LINE_BITS = 40
ORDER_ROW_BITS = 24


def click_order(file_index: int, line_number: int, position: int) -> int:
    """One int that sorts clicks in input order: file (in the adapter's listing order), then
    line number, then the row's position within the line (a MIND line holds many clicks).

    The tie rule of clicks with the same timestamp (:class:`PrepareUser`).
    """
    if not (0 <= line_number < 1 << ORDER_LINE_BITS and 0 <= position < 1 << ORDER_ROW_BITS):
        raise ValueError(f"line {line_number} / row {position} of input file {file_index} is "
                         f"past the click order key's range (2**{ORDER_LINE_BITS} lines, "
                         f"2**{ORDER_ROW_BITS} rows per line)")
    return (((file_index << ORDER_LINE_BITS) | line_number) << ORDER_ROW_BITS) | position


def target_ranks(n: int, fractions) -> tuple:
    """0-based ranks (in timestamp order) of the first valid and the first test interaction."""
    f_train, f_valid = float(fractions[0]), float(fractions[1])
    c1 = min(n, max(0, int(math.floor(f_train * n + 0.5))))
    c2 = min(n, max(c1, int(math.floor((f_train + f_valid) * n + 0.5))))
    return c1, c2


def _locate(sorted_counts, rank):
    """``sorted_counts``: [(value, count)] ascending. Returns (value, rank inside value) or None."""
    before = 0
    for value, count in sorted_counts:
        if rank < before + count:
            return value, rank - before
        before += count
    return None


def split_of(ts: int, boundaries) -> str:
    valid_start, test_start = boundaries
    if valid_start is not None and ts >= valid_start:
        if test_start is not None and ts >= test_start:
            return TEST
        return VALID
    if test_start is not None and ts >= test_start:
        return TEST
    return TRAIN


def split_counts(clicks, mode: str, boundaries) -> tuple:
    """(n_train, n_valid) for one user's clicks [(timestamp, item_id)] in click order.

    Both strategies give contiguous blocks: train clicks, then valid, then test.
    """
    n = len(clicks)
    if mode == "leave_last_out":
        return max(0, n - 2), (1 if n >= 2 else 0)
    n_train = n_valid = 0
    for ts, _ in clicks:
        s = split_of(ts, boundaries)
        if s == TRAIN:
            n_train += 1
        elif s == VALID:
            n_valid += 1
    return n_train, n_valid


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


def shard_of(user_id: str, num_shards: int) -> int:
    return zlib.crc32(user_id.encode("utf-8")) % num_shards


def feature_spec(cfg: Config, user_fields, item_extra_fields, vocab_sizes, num_examples) -> dict:
    p = cfg.preprocess
    feats = {"user_id": {"dtype": "string", "shape": [1]}}
    for f in user_fields:
        feats[f"user_{f}"] = {"dtype": "int64", "shape": [1]}
    feats["hist_items"] = {"dtype": "int64", "shape": [p.history_length]}
    feats["hist_len"] = {"dtype": "int64", "shape": [1]}
    feats["item"] = {"dtype": "int64", "shape": [1]}
    feats["item_tags"] = {"dtype": "int64", "shape": [p.max_tags]}
    feats["item_provider"] = {"dtype": "int64", "shape": [1]}
    for f in item_extra_fields:
        feats[f"item_{f}"] = {"dtype": "int64", "shape": [1]}
    feats["timestamp"] = {"dtype": "int64", "shape": [1]}
    return {"features": feats, "history_length": p.history_length, "max_tags": p.max_tags,
            "user_fields": list(user_fields), "item_extra_fields": list(item_extra_fields),
            "vocab_sizes": dict(vocab_sizes), "num_examples": dict(num_examples)}


def _item_values(item, max_tags):
    """(tags, provider, extras) of an item tuple: tags deduplicated, first ``max_tags`` kept."""
    _, _, tags, provider, extras = item
    seen = []
    for t in tags:
        if t and t not in seen:
            seen.append(t)
    return tuple(seen[:max_tags]), provider, extras


# --------------------------------------------------------------------------------------------
# Small Beam helpers
# --------------------------------------------------------------------------------------------

def _wv(value):
    return GlobalWindows.windowed_value(value)


def _is_remote(path: str) -> bool:
    return "://" in path


def _write_bytes(path: str, data: bytes) -> None:
    if not _is_remote(path):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with FileSystems.create(path) as fh:
        fh.write(data)


def _write_lines(path: str, lines) -> None:
    _write_bytes(path, "".join(line + "\n" for line in lines).encode("utf-8"))


# Uncompressed raw files larger than this are read as several line-aligned ranges in parallel.
READ_RANGE_BYTES = 64 << 20
_READ_BLOCK_BYTES = 1 << 20


def numbered_lines(fh, first_line: int = 1, limit: int | None = None):
    """Yields ``(line_number, raw)`` of a binary stream: ``raw`` is the line's bytes exactly as
    stored, its ``\\n`` included (none on an unterminated last line), as ``for raw in fh`` gives.

    Reads at most ``limit`` bytes (all when None); only ``\\n`` ends a line.
    """
    line_no, rest = first_line, b""
    while limit is None or limit > 0:
        data = fh.read(_READ_BLOCK_BYTES if limit is None else min(_READ_BLOCK_BYTES, limit))
        if not data:
            break
        if limit is not None:
            limit -= len(data)
        rest_next = b""
        for raw in io.BytesIO(rest + data):
            if not raw.endswith(b"\n"):
                rest_next = raw
                break
            yield line_no, raw
            line_no += 1
        rest = rest_next
    if rest:
        yield line_no, rest


def line_ranges(path: str, range_bytes: int = READ_RANGE_BYTES) -> list:
    """``[(path, start, end, first_line_number)]`` covering ``path`` in whole lines.

    A compressed or small file is one range (``end`` None: to the end). A larger uncompressed
    file is cut after the last ``\\n`` of every ``range_bytes`` block, its newlines counted on
    the way so that each range knows the number of its first line.
    """
    compressed = (CompressionTypes.detect_compression_type(path)
                  != CompressionTypes.UNCOMPRESSED)
    if compressed or FileSystems.match([path])[0].metadata_list[0].size_in_bytes <= range_bytes:
        return [(path, 0, None, 1)]
    ranges, start, pos, first = [], 0, 0, 1
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as fh:
        while True:
            data = fh.read(range_bytes)
            if not data:
                break
            cut = data.rfind(b"\n")
            pos += len(data)
            if cut >= 0:
                end = pos - len(data) + cut + 1
                ranges.append((path, start, end, first))
                first += data.count(b"\n")
                start = end
    if start < pos:
        ranges.append((path, start, None, first))
    return ranges


def read_range(line_range):
    """Yields ``(path, line_number, raw bytes)`` of one range of :func:`line_ranges`."""
    path, start, end, first = line_range
    with FileSystems.open(path) as fh:
        if start:
            fh.seek(start)
        for line_no, raw in numbered_lines(fh, first, None if end is None else end - start):
            yield path, line_no, raw


class ReadNumberedLines(beam.PTransform):
    """Raw files -> ``(path, line_number, raw bytes)``, every line exactly as stored."""

    def __init__(self, paths, range_bytes: int | None = None):
        super().__init__()
        self.paths = list(paths)
        self.range_bytes = range_bytes or READ_RANGE_BYTES

    def expand(self, p):
        return (p | "Paths" >> beam.Create(self.paths, reshuffle=False)
                | "Ranges" >> beam.FlatMap(line_ranges, self.range_bytes)
                | "Spread" >> beam.Reshuffle()
                | "Lines" >> beam.FlatMap(read_range))


def dead_letter_record(source: str, path: str, line_number: int, reason: str, detail: str,
                       raw: bytes, encoding: str) -> dict:
    """One line of ``dead_letters.jsonl``: where the line is, why it was rejected, and the line.

    ``raw`` is the base64 of the line's exact bytes (line ending included, gzip already
    undone): ``base64.b64decode(record["raw"])`` gives back the line to fix and replay. ``text``
    is the same line decoded with the source's encoding (undecodable bytes as U+FFFD, line
    ending removed), as the adapter saw it, for reading only.
    """
    return {"source": source, "file": path, "line_number": line_number, "reason": reason,
            "detail": detail, "raw": base64.b64encode(raw).decode("ascii"),
            "text": raw.decode(encoding, errors="replace").rstrip("\r\n")}


class _BundleCounter:
    """Mixin: counts per bundle, emitted once at finish_bundle on the STATS output."""

    def _reset_stats(self):
        self._stats = collections.Counter()

    def _flush_stats(self):
        for key, value in sorted(self._stats.items()):
            yield beam.pvalue.TaggedOutput(STATS, _wv((key, value)))
        self._stats = collections.Counter()


class ParseRows(beam.DoFn, _BundleCounter):
    """``(path, line_number, raw)`` -> canonical tuples; bad lines -> DEAD output.

    A DEAD element is ``(source, path, line_number, reason, detail, raw)``. Interaction tuples
    carry their :func:`click_order` key (``paths``: the source's files in the adapter's order)
    and their origin ``(path, line_number, raw)`` last, for :class:`ValidateClicks`.
    """

    def __init__(self, adapter, source: str, encoding: str, paths=()):
        self.adapter = adapter
        self.source = source
        self.encoding = encoding
        self.paths = list(paths)

    def setup(self):
        self._parse = getattr(self.adapter, {"interactions": "parse_interaction",
                                             "items": "parse_item",
                                             "users": "parse_user"}[self.source])
        self._user_fields = tuple(self.adapter.user_fields)
        self._extra_fields = tuple(self.adapter.item_extra_fields)
        self._counters = {r: Metrics.counter("dead_letters", r) for r in schema.REASONS}
        self._file_index = {}
        for k, path in enumerate(self.paths):
            self._file_index.setdefault(path, k)

    def start_bundle(self):
        self._reset_stats()

    def _dead(self, err, origin):
        self._counters[err.reason].inc()
        self._stats[f"dead.{self.source}.{err.reason}"] += 1
        path, line_no, raw = origin
        return beam.pvalue.TaggedOutput(
            DEAD, (self.source, path, line_no, err.reason, err.detail, raw))

    def process(self, numbered_line):
        try:
            line, lossy = numbered_line[2].decode(self.encoding), False
        except UnicodeDecodeError:
            line, lossy = numbered_line[2].decode(self.encoding, errors="replace"), True
        yield from self._rows(line.rstrip("\r\n"), numbered_line, lossy)

    def _rows(self, line, origin, lossy=False):
        self._stats[f"rows.{self.source}"] += 1
        try:
            rows = self._parse(line)
        except schema.RowError as err:
            yield self._dead(err, origin)
            return
        if not rows:
            self._stats[f"skipped.{self.source}"] += 1
            return
        for position, row in enumerate(rows):
            try:
                out = self._canonical(row, line)
                if lossy:
                    self._check_ids_decoded(out)
            except schema.RowError as err:
                yield self._dead(err, origin)
                continue
            self._stats[f"parsed.{self.source}"] += 1
            if self.source == "interactions":
                path, line_no, _ = origin
                file_index = self._file_index.get(path, len(self._file_index))
                yield out + (click_order(file_index, line_no, position), origin)
            else:
                yield out

    def _check_ids_decoded(self, out):
        """Raises ``bad_encoding`` when an id of a canonical tuple holds undecodable bytes."""
        ids = out[:2] if self.source == "interactions" else out[:1]
        bad = [i for i in ids if "\ufffd" in i]
        if bad:
            raise schema.RowError(schema.BAD_ENCODING, "", f"id {bad[0]!r} holds bytes that are "
                                  f"not valid {self.encoding}")

    def _canonical(self, row, line):
        """Plain tuples (fast Beam coders), re-checking the contract adapters must keep."""
        if self.source == "interactions":
            user_id, item_id = str(row.user_id).strip(), str(row.item_id).strip()
            if not user_id or not item_id:
                raise schema.RowError(schema.EMPTY_ID, line, "empty user_id or item_id")
            ts = row.timestamp
            if isinstance(ts, bool) or not isinstance(ts, int) or ts < 0:
                raise schema.RowError(schema.BAD_TIMESTAMP, line,
                                      f"timestamp {ts!r} is not a non-negative integer")
            return user_id, item_id, ts
        if self.source == "items":
            item_id = str(row.item_id).strip()
            if not item_id:
                raise schema.RowError(schema.EMPTY_ID, line, "empty item_id")
            extra = row.extra or {}
            return (item_id, str(row.title or ""), tuple(str(t).strip() for t in row.tags or ()),
                    str(row.provider or "").strip(),
                    tuple(str(extra.get(f, "") or "").strip() for f in self._extra_fields))
        user_id = str(row.user_id).strip()
        if not user_id:
            raise schema.RowError(schema.EMPTY_ID, line, "empty user_id")
        profile = row.profile or {}
        return user_id, tuple(str(profile.get(f, "") or "").strip() for f in self._user_fields)

    def finish_bundle(self):
        yield from self._flush_stats()


class ValidateClicks(beam.DoFn, _BundleCounter):
    """(user, item, ts, order, origin) -> keyed (user, (ts, order, item)); unknown items -> DEAD
    (with the origin's raw line). Day-bucket counts."""

    def __init__(self, with_buckets: bool):
        self.with_buckets = with_buckets

    def setup(self):
        self._unknown = Metrics.counter("dead_letters", schema.UNKNOWN_ITEM)

    def start_bundle(self):
        self._reset_stats()
        self._buckets = collections.Counter()

    def process(self, event, known_items):
        user_id, item_id, ts, order, (path, line_no, raw) = event
        if item_id not in known_items:
            self._unknown.inc()
            self._stats[f"dead.interactions.{schema.UNKNOWN_ITEM}"] += 1
            yield beam.pvalue.TaggedOutput(DEAD, (
                "interactions", path, line_no, schema.UNKNOWN_ITEM,
                f"item {item_id!r} is not in the item table", raw))
        else:
            self._stats["events"] += 1
            if self.with_buckets:
                self._buckets[ts // DAY] += 1
            yield user_id, (ts, order, item_id)

    def finish_bundle(self):
        for bucket, n in sorted(self._buckets.items()):
            yield beam.pvalue.TaggedOutput("buckets", _wv((bucket, n)))
        self._buckets = collections.Counter()
        yield from self._flush_stats()


class ExactSecondsInBuckets(beam.DoFn):
    """Per-second counts of the clicks inside the boundary day buckets (pass 2 of the split)."""

    def start_bundle(self):
        self._counts = collections.Counter()

    def process(self, kv, plan):
        ts = kv[1][0]
        if ts // DAY in plan["buckets"]:
            self._counts[ts] += 1

    def finish_bundle(self):
        for ts, n in sorted(self._counts.items()):
            yield _wv((ts, n))
        self._counts = collections.Counter()


def _split_plan(bucket_counts, fractions):
    """Pass 1: total count, target ranks and the day buckets that hold them."""
    n = sum(c for _, c in bucket_counts)
    ranks = target_ranks(n, fractions)
    buckets = sorted(bucket_counts)
    located = [_locate(buckets, r) for r in ranks]
    return {"n": n, "ranks": list(ranks), "located": located,
            "buckets": sorted({loc[0] for loc in located if loc is not None})}


def _split_boundaries(second_counts, plan):
    """Pass 2: exact boundary timestamps (None: the split reaches past the last click)."""
    by_bucket = collections.defaultdict(list)
    for ts, c in sorted(second_counts):
        by_bucket[ts // DAY].append((ts, c))
    out = []
    for loc in plan["located"]:
        if loc is None:
            out.append(None)
        else:
            bucket, within = loc
            out.append(_locate(by_bucket[bucket], within)[0])
    return tuple(out)


def _pick_first(kv):
    """Duplicate ids in the item/user table: keep the smallest row, deterministically."""
    key, rows = kv
    rows = sorted(rows, key=repr)
    return key, rows[0], len(rows) - 1


class PrepareUser(beam.DoFn):
    """CoGroupByKey result -> (user_id, profile, clicks, n_train, n_valid, has_profile).

    ``clicks``: ((ts, item_id), ...) sorted by timestamp; clicks of the same second keep their
    input order (the :func:`click_order` key carried from :class:`ParseRows`, dropped here).
    """

    def __init__(self, mode: str, num_profile_fields: int, deduplicate: bool = False):
        self.mode = mode
        self.num_profile_fields = num_profile_fields
        self.deduplicate = deduplicate

    def process(self, kv, boundaries):
        user_id, groups = kv
        ordered = sorted(groups["clicks"])  # (ts, order, item): the order keys are unique
        if self.deduplicate:
            # The same click twice (same item, same second: e.g. MIND repeats a user's history on
            # every impression line) counts once, the first in input order; the removed copies
            # are counted in stats.json.
            clicks, second, seen = [], None, set()
            for ts, _, item in ordered:
                if ts != second:
                    second, seen = ts, set()
                if item not in seen:
                    seen.add(item)
                    clicks.append((ts, item))
            if len(clicks) < len(ordered):
                yield beam.pvalue.TaggedOutput(STATS,
                                               ("duplicate_clicks", len(ordered) - len(clicks)))
        else:
            clicks = [(ts, item) for ts, _, item in ordered]
        del ordered
        if clicks:  # a user row without valid clicks produces nothing
            profiles = sorted(groups["user"], key=repr)
            profile = profiles[0] if profiles else ("",) * self.num_profile_fields
            n_train, n_valid = split_counts(clicks, self.mode, boundaries)
            yield user_id, profile, tuple(clicks), n_train, n_valid, bool(profiles)


class UserTrainStats(beam.DoFn, _BundleCounter):
    """Training-period counts per user: vocab entries, item click counts and sessions."""

    def __init__(self, user_fields, window_s):
        self.user_fields = tuple(user_fields)
        self.window_s = window_s

    def start_bundle(self):
        self._reset_stats()
        self._items = collections.Counter()

    def process(self, user):
        yield from self._user(*user)

    def _user(self, user_id, profile, clicks, n_train, n_valid, has_profile):
        n = len(clicks)
        st = self._stats
        st["users"] += 1
        st["events.train"] += n_train
        st["events.valid"] += n_valid
        st["events.test"] += n - n_train - n_valid
        st["sessions"] += count_sessions(clicks, self.window_s)
        if not has_profile:
            st["events_unknown_user"] += n
            st["users_unknown"] += 1
        if n_train == 0:
            return
        st["users.train"] += 1
        train = clicks[:n_train]
        st["sessions.train"] += count_sessions(train, self.window_s)
        yield beam.pvalue.TaggedOutput("vocab", (("user_id", user_id), n_train))
        for field, value in zip(self.user_fields, profile):
            if value:
                yield beam.pvalue.TaggedOutput("vocab", ((f"user_{field}", value), n_train))
        for _, item in train:
            self._items[item] += 1

    def finish_bundle(self):
        for item, n in sorted(self._items.items()):
            yield beam.pvalue.TaggedOutput("item_counts", _wv((item, n)))
        self._items = collections.Counter()
        yield from self._flush_stats()


class UserCooccurrence(beam.DoFn, _BundleCounter):
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

    def _flush(self, windowed):
        for item, neighbours, counts in self._pairs.rows():
            out = (item, (neighbours, counts))
            yield _wv(out) if windowed else out
        self._pairs = PairCounter()

    def process(self, user, index):
        _, _, clicks, n_train, _, _ = user
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
            yield from self._flush(windowed=False)

    def finish_bundle(self):
        yield from self._flush(windowed=True)
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


def _item_vocab_entries(kv, max_tags, extra_fields):
    """Training click counts of one item spread onto its item_id, tags, provider and extras."""
    item_id, groups = kv
    n = sum(groups["count"])
    if not n:
        return
    item = groups["item"][0]
    tags, provider, extras = _item_values(item, max_tags)
    yield ("item_id", item_id), n
    for t in tags:
        yield ("tag", t), n
    if provider:
        yield ("provider", provider), n
    for f, v in zip(extra_fields, extras):
        if v:
            yield (f"item_{f}", v), n


def _sorted_vocab(kv):
    field, groups = kv
    entries = [e for lst in groups["entries"] for e in lst]
    return field, [v for _, v in sorted((-n, v) for v, n in entries)]


class WriteVocab(beam.DoFn):
    def __init__(self, out_dir):
        self.out_dir = out_dir

    def process(self, kv):
        field, values = kv
        for v in values:
            if "\n" in v or "\r" in v:
                raise ValueError(f"vocab value {v!r} of field {field!r} holds a line break")
        _write_lines(os.path.join(self.out_dir, "vocab", f"{field}.txt"), values)
        yield beam.pvalue.TaggedOutput(STATS, (f"vocab.{field}", len(values) + 1))


def _vocab_index(vocabs):
    """[(field, values)] -> {field: {value: index}} with index 0 = OOV."""
    return {field: {v: i + 1 for i, v in enumerate(values)} for field, values in vocabs}


def _item_features(kv, index, max_tags, extra_fields):
    """item_id, item tuple -> (item_id, (idx, tags idx, provider idx, extras idx, title))."""
    item_id, item, _ = kv
    tags, provider, extras = _item_values(item, max_tags)
    tag_idx = tuple(i for i in (index["tag"].get(t, 0) for t in tags) if i)
    extra_idx = tuple(index[f"item_{f}"].get(v, 0) for f, v in zip(extra_fields, extras))
    return item_id, (index["item_id"].get(item_id, 0), tag_idx,
                     index["provider"].get(provider, 0), extra_idx, item[1])


def _write_items(rows, out_dir, extra_fields):
    lines = []
    for item_id, (idx, tags, provider, extras, title) in sorted(rows, key=lambda r: r[1][0]):
        if not idx:
            continue
        lines.append(json.dumps({
            "item": idx, "item_id": item_id, "title": title, "tags": list(tags),
            "provider": provider,
            "extra": {f"item_{f}": v for f, v in zip(extra_fields, extras)}}, ensure_ascii=False))
    _write_lines(os.path.join(out_dir, "items", "items.jsonl"), lines)
    return [("items.vocab", len(lines)), ("items.catalogue", len(rows))]


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
    _write_bytes(os.path.join(out_dir, "cooccurrence", "cooccurrence.npz"),
                 cooccurrence_npz_bytes(table))
    return [("cooc.items", len(rows)),
            ("pairs.distinct", sum(r[4] for r in rows) // 2)]


class MakeExamples(beam.DoFn):
    """One user's clicks -> ((split, shard), [(position, serialized tf.train.Example)])."""

    def __init__(self, user_fields, extra_fields, history_length, max_tags, num_shards):
        self.user_fields = tuple(user_fields)
        self.extra_fields = tuple(extra_fields)
        self.history_length = history_length
        self.max_tags = max_tags
        self.num_shards = num_shards

    def setup(self):
        import tensorflow as tf  # imported on the worker only
        self._tf = tf
        self._extra_keys = [f"item_{f}" for f in self.extra_fields]
        self._item_cache = {}  # item_id -> target-item features (the side input is fixed)

    def _int(self, values):
        tf = self._tf
        return tf.train.Feature(int64_list=tf.train.Int64List(value=values))

    def _item(self, item, item_feats):
        feats = self._item_cache.get(item)
        if feats is None:
            item_idx, tags, provider, extras, _ = item_feats[item]
            tags = list(tags[:self.max_tags])
            feats = {"item": self._int([item_idx]),
                     "item_tags": self._int(tags + [0] * (self.max_tags - len(tags))),
                     "item_provider": self._int([provider])}
            for name, v in zip(self._extra_keys, extras):
                feats[name] = self._int([v])
            self._item_cache[item] = feats
        return feats

    def process(self, user, item_feats, index):
        tf = self._tf
        user_id, profile, clicks, n_train, n_valid, _ = user
        H = self.history_length
        base = {"user_id": tf.train.Feature(bytes_list=tf.train.BytesList(
            value=[user_id.encode("utf-8")]))}
        for field, value in zip(self.user_fields, profile):
            base[f"user_{field}"] = self._int([index[f"user_{field}"].get(value, 0)])
        idx = [item_feats[item][0] for _, item in clicks]
        shard = shard_of(user_id, self.num_shards)
        out = {TRAIN: [], VALID: [], TEST: []}
        for k, (ts, item) in enumerate(clicks):
            split = TRAIN if k < n_train else (VALID if k < n_train + n_valid else TEST)
            hist = idx[max(0, k - H):k]
            feats = dict(base)
            feats.update(self._item(item, item_feats))
            feats["hist_items"] = self._int(hist + [0] * (H - len(hist)))
            feats["hist_len"] = self._int([len(hist)])
            feats["timestamp"] = self._int([ts])
            example = tf.train.Example(features=tf.train.Features(feature=feats))
            out[split].append(((user_id, k), example.SerializeToString(deterministic=True)))
        for split in SPLITS:
            if out[split]:
                yield (split, shard), out[split]


class WriteShard(beam.DoFn):
    def __init__(self, out_dir, num_shards):
        self.out_dir = out_dir
        self.num_shards = num_shards

    def process(self, kv):
        import tensorflow as tf

        (split, shard), groups = kv
        records = sorted(r for batch in groups["examples"] for r in batch)
        path = os.path.join(self.out_dir, "examples",
                            f"{split}-{shard:05d}-of-{self.num_shards:05d}.tfrecord.gz")
        tf.io.gfile.makedirs(os.path.dirname(path))
        with tf.io.TFRecordWriter(path, options=tf.io.TFRecordOptions(compression_type="GZIP")) as w:
            for _, data in records:
                w.write(data)
        yield f"examples.{split}", len(records)


def _write_dead_letters(rows, out_dir, encodings):
    """Sorted by source, file, line number (``encodings``: {source: text encoding})."""
    lines = [json.dumps(dead_letter_record(*row, encoding=encodings[row[0]]), ensure_ascii=False)
             for row in sorted(rows)]
    _write_lines(os.path.join(out_dir, "dead_letters", "dead_letters.jsonl"), lines)
    return [("dead_letters.written", len(lines))]


def _write_summary(items, out_dir):
    summary = {k: v for k, v in sorted(items)}
    _write_bytes(os.path.join(out_dir, "_summary.json"),
                 json.dumps(summary, sort_keys=True).encode("utf-8"))


# --------------------------------------------------------------------------------------------
# Pipeline
# --------------------------------------------------------------------------------------------

def _read(p, label, files: schema.SourceFiles, data_dir: str, required: bool):
    """-> (numbered lines of the source's files, the files in the adapter's listing order)."""
    paths = files.paths(data_dir)
    if not paths and required:
        raise FileNotFoundError(
            f"no {label} files match {list(files.patterns)} under {data_dir!r}")
    return p | f"Read{label}" >> ReadNumberedLines(paths), paths


def build_pipeline(p, cfg: Config, adapter, data_dir: str, out_dir: str) -> None:
    """Adds every step of the job to pipeline ``p``; artifacts go to ``out_dir``."""
    pc = cfg.preprocess
    user_fields = tuple(adapter.user_fields)
    extra_fields = tuple(adapter.item_extra_fields)
    for name in [f"user_{f}" for f in user_fields] + [f"item_{f}" for f in extra_fields]:
        if name in RESERVED_FEATURES:
            raise ValueError(f"adapter field {name!r} collides with a reserved feature name")
    check_session_category(pc.session_category, extra_fields)
    global_time = pc.split == "global_time"

    def parse(source, files, required):
        raw, paths = _read(p, source.capitalize(), files, data_dir, required)
        return raw | f"Parse{source.capitalize()}" >> beam.ParDo(
            ParseRows(adapter, source, files.encoding, paths)).with_outputs(
                DEAD, STATS, main="rows")

    inter = parse("interactions", adapter.interaction_files, True)
    items = parse("items", adapter.item_files, True)
    users = parse("users", adapter.user_files, False)

    # Items and users, one row per id.
    items_picked = (items.rows | "KeyItems" >> beam.Map(lambda r: (r[0], r))
                    | "GroupItems" >> beam.GroupByKey() | "PickItem" >> beam.Map(_pick_first))
    items_kv = items_picked | "ItemKV" >> beam.Map(lambda r: (r[0], r[1]))
    users_kv = (users.rows | "KeyUsers" >> beam.Map(lambda r: (r[0], r[1]))
                | "GroupUsers" >> beam.GroupByKey() | "PickUser" >> beam.Map(_pick_first)
                | "UserKV" >> beam.Map(lambda r: (r[0], r[1])))
    dup_stats = (
        (items_picked | "ItemDups" >> beam.Map(lambda r: ("duplicates.items", r[2])),
         users_kv | "UserOne" >> beam.Map(lambda r: ("users.catalogue", 1)))
        | "FlattenDupStats" >> beam.Flatten())
    known_items = beam.pvalue.AsSingleton(
        items_kv | "ItemIds" >> beam.Keys()
        | "ItemIdList" >> beam.combiners.ToList() | "KnownItems" >> beam.Map(frozenset))

    # 1. Validation.
    valid = inter.rows | "Validate" >> beam.ParDo(
        ValidateClicks(global_time), known_items).with_outputs(DEAD, STATS, "buckets",
                                                               main="clicks")
    clicks = valid.clicks

    # 2. Split boundaries (exact, two passes).
    if global_time:
        fractions = list(pc.split_fractions)
        bucket_counts = (valid.buckets | "SumBuckets" >> beam.CombinePerKey(sum)
                         | "AllBuckets" >> beam.combiners.ToList())
        plan = bucket_counts | "Plan" >> beam.Map(_split_plan, fractions)
        seconds = (clicks | "ExactSeconds" >> beam.ParDo(
            ExactSecondsInBuckets(), beam.pvalue.AsSingleton(plan))
            | "SumSeconds" >> beam.CombinePerKey(sum) | "AllSeconds" >> beam.combiners.ToList())
        boundaries = seconds | "Boundaries" >> beam.Map(
            _split_boundaries, beam.pvalue.AsSingleton(plan))
    else:
        boundaries = p | "NoBoundaries" >> beam.Create([(None, None)])
    boundaries_si = beam.pvalue.AsSingleton(boundaries)

    # Group clicks by user, sort, label splits.
    user_rows = (
        {"clicks": clicks, "user": users_kv} | "GroupByUser" >> beam.CoGroupByKey()
        | "PrepareUser" >> beam.ParDo(PrepareUser(pc.split, len(user_fields),
                                                  pc.deduplicate_clicks), boundaries_si)
        .with_outputs(STATS, main="users"))
    prepare_stats, user_rows = user_rows[STATS], user_rows.users

    # 3. Training-period statistics: vocab counts, sessions.
    train_stats = user_rows | "TrainStats" >> beam.ParDo(UserTrainStats(
        user_fields, pc.session_window_s)).with_outputs("vocab", "item_counts", STATS)
    item_counts = train_stats.item_counts | "SumItemCounts" >> beam.CombinePerKey(sum)
    item_entries = ({"count": item_counts, "item": items_kv} | "JoinItemCounts" >> beam.CoGroupByKey()
                    | "ItemVocabEntries" >> beam.FlatMap(_item_vocab_entries, pc.max_tags,
                                                         extra_fields))
    fields = vocab_field_names(user_fields, extra_fields)
    per_field = (
        (item_entries, train_stats.vocab) | "FlattenVocab" >> beam.Flatten()
        | "SumVocab" >> beam.CombinePerKey(sum)
        | "ByField" >> beam.Map(lambda kv: (kv[0][0], (kv[0][1], kv[1])))
        | "GroupField" >> beam.GroupByKey()
        | "FieldList" >> beam.MapTuple(lambda f, es: (f, list(es))))
    expected = p | "VocabFields" >> beam.Create([(f, []) for f in fields])
    vocabs = ({"entries": per_field, "expected": expected} | "JoinFields" >> beam.CoGroupByKey()
              | "SortVocab" >> beam.Map(_sorted_vocab))
    vocab_stats = vocabs | "WriteVocab" >> beam.ParDo(WriteVocab(out_dir)).with_outputs(
        STATS, main="none")
    index = beam.pvalue.AsSingleton(
        vocabs | "AllVocabs" >> beam.combiners.ToList() | "VocabIndex" >> beam.Map(_vocab_index))

    # Item table.
    item_feats = items_picked | "ItemFeatures" >> beam.Map(
        _item_features, index, pc.max_tags, extra_fields)
    item_feats_si = beam.pvalue.AsDict(item_feats)
    all_item_feats = item_feats | "AllItemFeatures" >> beam.combiners.ToList()
    items_stats = all_item_feats | "WriteItems" >> beam.FlatMap(_write_items, out_dir,
                                                                extra_fields)

    # 5. Co-occurrence table: partial rows on item indices, summed per item, one CSR file.
    categories = beam.pvalue.AsSingleton(all_item_feats | "CategoryCodes" >> beam.Map(
        _category_codes, index, pc.session_category, extra_fields, pc.max_tags))
    cooc = user_rows | "UserCooc" >> beam.ParDo(UserCooccurrence(
        pc.session_window_s, pc.max_pairs_per_click), index).with_outputs(STATS, main="rows")
    cooc_stats = (cooc.rows | "MergeCooc" >> beam.CombinePerKey(MergeNeighbourCounts())
                  | "CoocRows" >> beam.ParDo(CooccurrenceRows(pc.cooccurrence_top_m), categories)
                  | "AllCooc" >> beam.combiners.ToList()
                  | "WriteCooc" >> beam.FlatMap(_write_cooc, out_dir, index))

    # 4. Examples.
    shard_keys = p | "ShardKeys" >> beam.Create(
        [((s, k), None) for s in SPLITS for k in range(pc.num_shards)])
    examples = user_rows | "MakeExamples" >> beam.ParDo(
        MakeExamples(user_fields, extra_fields, pc.history_length, pc.max_tags, pc.num_shards),
        item_feats_si, index)
    example_stats = ({"examples": examples, "keys": shard_keys}
                     | "GroupShards" >> beam.CoGroupByKey()
                     | "WriteShards" >> beam.ParDo(WriteShard(out_dir, pc.num_shards)))

    # 1. Dead letters.
    dead = ((inter[DEAD], items[DEAD], users[DEAD], valid[DEAD]) | "FlattenDead" >> beam.Flatten()
            | "AllDead" >> beam.combiners.ToList()
            | "WriteDead" >> beam.FlatMap(_write_dead_letters, out_dir, {
                src: files.encoding for src, files in zip(SOURCES, (
                    adapter.interaction_files, adapter.item_files, adapter.user_files))}))

    # 6. Summary (stats.json and feature_spec.json are finished by the driver).
    bounds_stats = boundaries | "BoundaryStats" >> beam.FlatMap(
        lambda b: [(f"boundary.{name}", v) for name, v in zip(("valid_start", "test_start"), b)
                   if v is not None])
    ((inter[STATS], items[STATS], users[STATS], valid[STATS], train_stats[STATS],
      vocab_stats[STATS], items_stats, cooc[STATS], cooc_stats, example_stats, dead, dup_stats,
      bounds_stats, prepare_stats)
     | "FlattenStats" >> beam.Flatten() | "SumStats" >> beam.CombinePerKey(sum)
     | "AllStats" >> beam.combiners.ToList()
     | "WriteSummary" >> beam.Map(_write_summary, out_dir))


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------

def _beam_parser():
    """The argparse parser of every registered Beam ``PipelineOptions`` class.

    Beam hands it to ``add_extra_args_fn``; its ``error`` raises :class:`cli.UsageError` instead
    of printing Beam's whole usage and exiting.
    """
    captured = []
    with _quiet_root_logger():  # PipelineOptions() calls logging.basicConfig()
        PipelineOptions([]).get_all_options(add_extra_args_fn=captured.append)
    parser = captured[0]

    def error(message):
        raise cli.UsageError(f"bad Beam pipeline option: {message}")

    parser.error = error
    return parser


def _option_strings(parser) -> list:
    return [o for action in parser._actions for o in action.option_strings]


def beam_options(beam_argv, command=None) -> PipelineOptions:
    """``PipelineOptions`` of ``beam_argv``, DirectRunner unless a runner is given.

    An argument that no Beam options class recognises is a :class:`cli.UsageError` naming it,
    with the closest flag of ``command`` (the calling command's argparse parser) or of Beam,
    instead of Beam's ``Unparseable argument`` warning and a run that ignores it.
    """
    beam_argv = [str(a) for a in beam_argv]
    parser = _beam_parser()
    _, unknown = parser.parse_known_args(beam_argv)
    if unknown:
        flags = (_option_strings(command) if command else []) + _option_strings(parser)
        first = next((a.split("=", 1)[0] for a in unknown if a.startswith("-")), None)
        close = difflib.get_close_matches(first, flags, n=1) if first else []
        hint = f"; did you mean {close[0]}?" if close else ""
        raise cli.UsageError(
            f"unrecognized arguments {unknown}: neither a flag of this command nor a Beam "
            f"pipeline option (command line or preprocess.beam_args){hint}")
    with _quiet_root_logger():
        options = PipelineOptions(beam_argv)
    if not options.view_as(StandardOptions).runner:
        options.view_as(StandardOptions).runner = "DirectRunner"
    return options


def pipeline_options(cfg: Config, beam_argv=(), command=None) -> PipelineOptions:
    """:func:`beam_options` of ``preprocess.beam_args`` followed by ``beam_argv``."""
    return beam_options(list(cfg.preprocess.beam_args) + list(beam_argv), command)


def _dead_letter_counters(result):
    """The Beam counters ``dead_letters:<reason>`` (None where the runner cannot report them)."""
    try:
        from apache_beam.metrics.metric import MetricsFilter

        out = collections.Counter()
        for c in result.metrics().query(MetricsFilter().with_namespace("dead_letters"))["counters"]:
            value = c.committed if c.committed is not None else c.attempted
            out[c.key.metric.name] += int(value or 0)
        return {r: out.get(r, 0) for r in schema.REASONS}
    except Exception as err:  # noqa: BLE001 - metrics support varies by runner
        LOG.warning("could not query Beam counters: %s", err)
        return None


def _finish(cfg: Config, adapter, out_dir: str, wall_s: float, counters=None) -> dict:
    """Reads _summary.json (then deletes it), writes stats.json and feature_spec.json."""
    summary_path = os.path.join(out_dir, "_summary.json")
    with FileSystems.open(summary_path) as fh:
        s = json.loads(fh.read().decode("utf-8"))
    FileSystems.delete([summary_path])
    user_fields, extra_fields = list(adapter.user_fields), list(adapter.item_extra_fields)
    fields = vocab_field_names(user_fields, extra_fields)
    vocab_sizes = {f: s.get(f"vocab.{f}", 1) for f in fields}
    num_examples = {split: s.get(f"examples.{split}", 0) for split in SPLITS}
    spec = feature_spec(cfg, user_fields, extra_fields, vocab_sizes, num_examples)
    _write_bytes(os.path.join(out_dir, "examples", "feature_spec.json"),
                 json.dumps(spec, indent=1).encode("utf-8"))
    by_source = {src: {r: s.get(f"dead.{src}.{r}", 0) for r in schema.REASONS} for src in SOURCES}
    by_reason = {r: sum(by_source[src][r] for src in SOURCES) for r in schema.REASONS}
    events = s.get("events", 0)
    stats = {
        "name": cfg.name, "dataset": cfg.data.dataset, "adapter": getattr(adapter, "name", ""),
        "split": cfg.preprocess.split, "split_fractions": list(cfg.preprocess.split_fractions),
        "split_boundaries": {"valid_start": s.get("boundary.valid_start"),
                             "test_start": s.get("boundary.test_start")},
        "users": s.get("users", 0), "users_train": s.get("users.train", 0),
        "users_in_table": s.get("users.catalogue", 0),
        "users_without_profile": s.get("users_unknown", 0),
        "items": vocab_sizes["item_id"] - 1, "items_in_table": s.get("items.catalogue", 0),
        "events": events,
        "events_by_split": {split: s.get(f"events.{split}", 0) for split in SPLITS},
        "events_without_user_profile": s.get("events_unknown_user", 0),
        "sessions": s.get("sessions", 0), "sessions_train": s.get("sessions.train", 0),
        "pairs": s.get("pairs", 0), "pairs_distinct": s.get("pairs.distinct", 0),
        "cooccurrence_items": s.get("cooc.items", 0),
        "session_window_s": cfg.preprocess.session_window_s,
        "rows": {src: {"read": s.get(f"rows.{src}", 0), "parsed": s.get(f"parsed.{src}", 0),
                       "skipped_header_or_blank": s.get(f"skipped.{src}", 0),
                       "dead_letters": sum(by_source[src].values())} for src in SOURCES},
        "duplicate_item_rows": s.get("duplicates.items", 0),
        "duplicate_clicks_removed": s.get("duplicate_clicks", 0),
        "dead_letters": {"total": sum(by_reason.values()), "by_reason": by_reason,
                         "by_source": by_source, "beam_counters": counters},
        "vocab_sizes": vocab_sizes, "num_examples": num_examples,
        "timing": {"wall_s": round(wall_s, 3),
                   "events_per_s": round(events / wall_s, 1) if wall_s > 0 else None},
    }
    if not events:
        LOG.warning("no valid interactions: every click went to the dead letters (%s)",
                    os.path.join(out_dir, "dead_letters", "dead_letters.jsonl"))
    if s.get("dead_letters.written", 0) != stats["dead_letters"]["total"]:
        raise RuntimeError(f"dead-letter file holds {s.get('dead_letters.written')} rows, "
                           f"counters say {stats['dead_letters']['total']}")
    _write_bytes(os.path.join(out_dir, "stats.json"),
                 json.dumps(stats, indent=1, sort_keys=True).encode("utf-8"))
    return stats


def _swap_into_place(tmp_dir: str, out_dir: str) -> None:
    old = None
    if os.path.exists(out_dir):
        old = f"{out_dir}.old-{uuid.uuid4().hex[:8]}"
        os.rename(out_dir, old)
    os.rename(tmp_dir, out_dir)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def _resolve_data(cfg: Config, adapter, data_dir):
    """The adapter and raw-data folder (generating the synthetic dataset first if needed)."""
    if data_dir is None:
        if cfg.data.dataset == "synthetic":
            from micrec_tf.data.synthetic import ensure_generated
            data_dir = ensure_generated(cfg)
        else:
            data_dir = cfg.data.data_dir
    if adapter is None:
        from micrec_tf.data.adapters import get_adapter
        adapter = get_adapter(cfg.data)
    return adapter, str(data_dir)


def run(cfg: Config, beam_argv=(), adapter=None, data_dir=None, out_dir=None,
        verbose: bool = True) -> dict:
    """Runs the job; returns the stats dict (also written to ``<out_dir>/stats.json``).

    ``adapter``/``data_dir`` default to the config's (tests pass their own); ``out_dir``
    defaults to ``cfg.artifacts_dir``. A local output is written to a temporary sibling and
    renamed into place at the end; a remote one (``gs://...``) is cleared, then written in place.
    """
    options = pipeline_options(cfg, beam_argv)
    adapter, data_dir = _resolve_data(cfg, adapter, data_dir)
    out_dir = out_dir or cfg.artifacts_dir
    remote = _is_remote(out_dir)
    if remote:
        out_dir = out_dir.rstrip("/")
        if FileSystems.exists(out_dir):
            FileSystems.delete([out_dir])
        tmp_dir = out_dir
    else:
        out_dir = os.path.abspath(out_dir)
        tmp_dir = f"{out_dir}.tmp-{uuid.uuid4().hex[:8]}"
    start = time.time()
    try:
        p = beam.Pipeline(options=options)
        build_pipeline(p, cfg, adapter, data_dir, tmp_dir)
        result = p.run()
        result.wait_until_finish()
        wall_s = time.time() - start
        stats = _finish(cfg, adapter, tmp_dir, wall_s, _dead_letter_counters(result))
    except BaseException:
        if not remote:
            shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    if not remote:
        _swap_into_place(tmp_dir, out_dir)
    if verbose:
        print(summary_text(stats, out_dir))
    return stats


def summary_text(stats: dict, out_dir: str) -> str:
    d = stats["dead_letters"]
    reasons = ", ".join(f"{r} {n}" for r, n in d["by_reason"].items() if n)
    lines = [
        f"preprocess: {stats['name']} ({stats['dataset']}) -> {out_dir}",
        "  rows read: " + ", ".join(f"{k} {v['read']}" for k, v in stats["rows"].items()),
        f"  events {stats['events']} (train {stats['events_by_split']['train']}, "
        f"valid {stats['events_by_split']['valid']}, test {stats['events_by_split']['test']}); "
        f"split {stats['split']} boundaries {stats['split_boundaries']}",
        f"  users {stats['users']}, items in vocab {stats['items']} "
        f"(table {stats['items_in_table']}), sessions {stats['sessions']} "
        f"(train {stats['sessions_train']}), co-occurrence pairs {stats['pairs']} "
        f"(distinct {stats['pairs_distinct']})",
        f"  examples {stats['num_examples']}",
        f"  vocab sizes {stats['vocab_sizes']}",
        f"  dead letters {d['total']}" + (
            f": {reasons} (raw lines in {os.path.join(out_dir, 'dead_letters')})"
            if d["total"] else ""),
        f"  wall {stats['timing']['wall_s']:.1f} s, {stats['timing']['events_per_s']} events/s",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    """Flags this parser does not know go to Beam (checked by :func:`beam_options`)."""
    parser = cli.parser(__doc__, allow_abbrev=False)
    parser.add_argument("--out_dir", default=None, help="output dir (default: artifacts/<name>)")
    args, beam_argv = parser.parse_known_args(argv)
    cfg = cli.load(args)
    pipeline_options(cfg, beam_argv, command=parser)  # an unknown flag fails before any work
    run(cfg, beam_argv, out_dir=args.out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))

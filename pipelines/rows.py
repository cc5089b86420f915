"""Raw rows: read every raw line as stored, parse it with the dataset adapter, reject bad lines
to the dead letters with their reason, keep one row per item / user id, and the click order.

Transforms (PCollections they take and give):

- :class:`ReadNumberedLines`: pipeline -> ``(path, line_number, raw bytes)``, every line of the
  files exactly as stored (line ending included, gzip undone), 1-based line numbers.
- :class:`ReadSource`: pipeline -> ``{"rows": canonical tuples, DEAD: rejected lines, STATS}``
  of one source (interactions, items or users) of an adapter.
- :class:`OnePerId`: canonical rows -> ``(id, value, n_duplicates)``, one per id.
- :class:`FirstPerId`: canonical rows with their origin -> ``{"rows": (id, value,
  n_duplicates), DEAD: the later rows of a repeated id, STATS}``: the first row (file order,
  then line) of each id is kept.
- :class:`KnownClicks`: interaction rows + the item table -> ``{"clicks": (user_id, (ts,
  order, item_id)), DEAD: clicks on unknown items, STATS}``.
- :class:`WriteDeadLetters`: DEAD PCollections -> ``dead_letters/dead_letters.jsonl``.

Canonical tuples (plain tuples for Beam's fast coders):

- interaction: ``(user_id, item_id, timestamp, order, (path, line_number, raw))``; ``order`` is
  the :func:`click_order` key;
- item: ``(item_id, title, tags tuple, provider, extras tuple)`` (extras in the adapter's
  ``item_extra_fields`` order, "" when missing);
- user: ``(user_id, profile tuple)`` (the adapter's ``user_fields`` order, "" when missing).

Item and user tuples read with ``keep_origin`` carry ``order, (path, line_number, raw)`` last,
as interactions do (for :class:`FirstPerId`).

A timestamp that cannot be Unix seconds (:func:`micrec_tf.data.schema.check_seconds`) stops the
job with a :class:`~micrec_tf.data.schema.InputError` naming ``file:line`` (one line in the
command-line entry points, see :func:`micrec_tf.cli.run`).

A DEAD element is ``(source, path, line_number, reason, detail, raw bytes)``.
"""
from __future__ import annotations

import base64
import io
import json
import os

from pipelines.common import DEAD, STATS, BundleCounter, write_lines

import apache_beam as beam  # noqa: E402  (after pipelines.common: its import is quiet)
from apache_beam.io.filesystem import CompressionTypes  # noqa: E402
from apache_beam.io.filesystems import FileSystems  # noqa: E402
from apache_beam.metrics import Metrics  # noqa: E402

from micrec_tf.data import schema  # noqa: E402

SOURCES = ("interactions", "items", "users")

# Bits of the line number and of the row position inside a line in :func:`click_order`.
ORDER_LINE_BITS = 40
ORDER_ROW_BITS = 24


def click_order(file_index: int, line_number: int, position: int) -> int:
    """One int that sorts clicks in input order: file (in the adapter's listing order), then
    line number, then the row's position within the line (a MIND line holds many clicks).

    The tie rule of clicks with the same timestamp (:class:`pipelines.split.PrepareUser`).
    """
    if not (0 <= line_number < 1 << ORDER_LINE_BITS and 0 <= position < 1 << ORDER_ROW_BITS):
        raise ValueError(f"line {line_number} / row {position} of input file {file_index} is "
                         f"past the click order key's range (2**{ORDER_LINE_BITS} lines, "
                         f"2**{ORDER_ROW_BITS} rows per line)")
    return (((file_index << ORDER_LINE_BITS) | line_number) << ORDER_ROW_BITS) | position


# ------------------------------------------------------------------------------ reading lines

# Uncompressed raw files larger than this are read as several line-aligned ranges in parallel.
READ_RANGE_BYTES = 64 << 20
_READ_BLOCK_BYTES = 1 << 20


def numbered_lines(fh, first_line: int = 1, limit: int | None = None,
                   block_bytes: int | None = None):
    """Yields ``(line_number, raw)`` of a binary stream: ``raw`` is the line's bytes exactly as
    stored, its ``\\n`` included (none on an unterminated last line), as ``for raw in fh`` gives.

    Reads at most ``limit`` bytes (all when None), ``block_bytes`` (default
    ``_READ_BLOCK_BYTES``) at a time; only ``\\n`` ends a line.
    """
    block = block_bytes or _READ_BLOCK_BYTES
    line_no, rest = first_line, b""
    while limit is None or limit > 0:
        data = fh.read(block if limit is None else min(block, limit))
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
    """Raw files -> ``(path, line_number, raw bytes)``, every line exactly as stored.

    An uncompressed file larger than ``range_bytes`` (default :data:`READ_RANGE_BYTES`) is read
    as several line-aligned ranges (:func:`line_ranges`), spread over the workers.
    """

    def __init__(self, paths, range_bytes: int | None = None):
        super().__init__()
        self.paths = list(paths)
        self.range_bytes = range_bytes or READ_RANGE_BYTES

    def expand(self, p):
        return (p | "Paths" >> beam.Create(self.paths, reshuffle=False)
                | "Ranges" >> beam.FlatMap(line_ranges, self.range_bytes)
                | "Spread" >> beam.Reshuffle()
                | "Lines" >> beam.FlatMap(read_range))


# ------------------------------------------------------------------------------------ parsing

class ParseRows(beam.DoFn, BundleCounter):
    """``(path, line_number, raw)`` -> canonical tuples; bad lines -> DEAD output.

    A DEAD element is ``(source, path, line_number, reason, detail, raw)``. Interaction tuples
    carry their :func:`click_order` key (``paths``: the source's files in the adapter's order)
    and their origin ``(path, line_number, raw)`` last, for :class:`ValidateClicks`; item and
    user tuples too with ``keep_origin`` (for :class:`FirstPerId`).

    Raises :class:`~micrec_tf.data.schema.InputError` (the job stops) at a click whose timestamp
    cannot be Unix seconds: milliseconds read as seconds would make every click a session.
    """

    def __init__(self, adapter, source: str, encoding: str, paths=(), keep_origin: bool = False):
        self.adapter = adapter
        self.source = source
        self.encoding = encoding
        self.paths = list(paths)
        self.keep_origin = keep_origin or source == "interactions"

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
                schema.check_seconds(out[2], f"{origin[0]}:{origin[1]}")
            if self.keep_origin:
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


class ReadSource(beam.PTransform):
    """Pipeline -> one source of an adapter, parsed: ``{"rows", DEAD, STATS}``.

    ``rows``: the canonical tuples of ``source`` (module docstring); ``DEAD``: its rejected
    lines; ``STATS``: ``rows.<source>``, ``parsed.<source>``, ``skipped.<source>`` (header or
    blank) and ``dead.<source>.<reason>`` counts. ``required``: no matching file is an error.
    ``range_bytes``: see :class:`ReadNumberedLines`. ``keep_origin``: item and user rows carry
    their order key and origin last (interaction rows always do), for :class:`FirstPerId`.
    """

    def __init__(self, adapter, source: str, files: schema.SourceFiles, data_dir: str,
                 required: bool = True, range_bytes: int | None = None,
                 keep_origin: bool = False):
        super().__init__()
        self.range_bytes = range_bytes
        self.keep_origin = keep_origin
        if source not in SOURCES:
            raise ValueError(f"source must be one of {list(SOURCES)}. Received: {source!r}")
        self.adapter, self.source, self.files = adapter, source, files
        self.data_dir, self.required = data_dir, required

    def expand(self, p):
        label = self.source.capitalize()
        paths = self.files.paths(self.data_dir)
        if not paths and self.required:
            raise FileNotFoundError(
                f"no {label} files match {list(self.files.patterns)} under {self.data_dir!r}")
        out = (p | f"Read{label}" >> ReadNumberedLines(paths, self.range_bytes)
               | f"Parse{label}" >> beam.ParDo(ParseRows(
                   self.adapter, self.source, self.files.encoding, paths,
                   self.keep_origin)).with_outputs(
                       DEAD, STATS, main="rows"))
        return {"rows": out.rows, DEAD: out[DEAD], STATS: out[STATS]}


# ---------------------------------------------------------------------------- one row per id

def _pick_first(kv):
    """Duplicate ids in the item/user table: keep the smallest row, deterministically."""
    key, rows = kv
    rows = sorted(rows, key=repr)
    return key, rows[0], len(rows) - 1


class OnePerId(beam.PTransform):
    """Canonical item or user rows -> ``(id, value, n_duplicates)``, one per id (``row[0]``).

    ``value(row)`` is what is kept (default the whole row); of several rows with one id, the
    one whose value has the smallest ``repr`` wins, so the choice is deterministic.
    """

    def __init__(self, value=None):
        super().__init__()
        self.value = value

    def expand(self, rows):
        value = self.value or (lambda r: r)
        return (rows | "Key" >> beam.Map(lambda r: (r[0], value(r)))
                | "Group" >> beam.GroupByKey() | "Pick" >> beam.Map(_pick_first))


def _first_per_id(kv, source, reason, value):
    """One id's rows (each ending ``order, origin``): the first kept, the later ones DEAD."""
    key, rows = kv
    rows = sorted(rows, key=lambda r: r[-2])
    first_path, first_line, _ = rows[0][-1]
    for row in rows[1:]:
        path, line_no, raw = row[-1]
        where = f"line {first_line}" + ("" if path == first_path else f" of {first_path}")
        yield beam.pvalue.TaggedOutput(DEAD, (
            source, path, line_no, reason,
            f"{source[:-1]} id {key!r} was defined at {where}; the first row is kept", raw))
    if len(rows) > 1:
        yield beam.pvalue.TaggedOutput(STATS, (f"dead.{source}.{reason}", len(rows) - 1))
    yield key, value(rows[0][:-2]), len(rows) - 1


class FirstPerId(beam.PTransform):
    """Item or user rows read with ``keep_origin`` -> ``{"rows", DEAD, STATS}``.

    ``rows``: ``(id, value, n_duplicates)``, one per id (``row[0]``), from the id's first row in
    input order (file, then line); ``value(row)`` is what is kept (default the whole canonical
    row). ``DEAD``: every later row of a repeated id, with ``reason`` (``duplicate_item_id`` or
    ``duplicate_user_id``) and the line of the row kept. ``STATS``: ``dead.<source>.<reason>``.
    """

    def __init__(self, source: str, reason: str, value=None):
        super().__init__()
        if reason not in schema.REASONS:
            raise ValueError(f"reason must be one of {schema.REASONS}. Received: {reason!r}")
        self.source, self.reason, self.value = source, reason, value

    def expand(self, rows):
        value = self.value or (lambda r: r)
        out = (rows | "Key" >> beam.Map(lambda r: (r[0], r)) | "Group" >> beam.GroupByKey()
               | "First" >> beam.FlatMap(_first_per_id, self.source, self.reason, value)
               .with_outputs(DEAD, STATS, main="rows"))
        counted = out[DEAD] | "Count" >> beam.Map(_count_dead, self.reason)
        return {"rows": out.rows, DEAD: counted, STATS: out[STATS]}


def _count_dead(dead, reason):
    """Counts one dead letter on the Beam counter ``dead_letters:<reason>``; passes it on."""
    Metrics.counter("dead_letters", reason).inc()
    return dead


# ----------------------------------------------------------------------- clicks on known items

class ValidateClicks(beam.DoFn, BundleCounter):
    """(user, item, ts, order, origin) -> keyed (user, (ts, order, item)); unknown items -> DEAD
    (with the origin's raw line)."""

    def setup(self):
        self._unknown = Metrics.counter("dead_letters", schema.UNKNOWN_ITEM)

    def start_bundle(self):
        self._reset_stats()

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
            yield user_id, (ts, order, item_id)

    def finish_bundle(self):
        yield from self._flush_stats()


class ClicksInTimeRange(beam.PTransform):
    """Interaction rows -> ``{"rows", STATS}``: the rows with ``since <= ts < until``
    (``preprocess.time_range``, issue 29); ``STATS``: ``clicks_outside_time_range``, the others
    (dropped, not dead letters: valid clicks of another window)."""

    def __init__(self, since: int, until: int):
        super().__init__()
        self.since, self.until = int(since), int(until)

    def expand(self, rows):
        since, until = self.since, self.until
        out = rows | "InRange" >> beam.Partition(
            lambda row, _n: 0 if since <= row[2] < until else 1, 2)
        stats = out[1] | "Outside" >> beam.Map(lambda _row: ("clicks_outside_time_range", 1))
        return {"rows": out[0], STATS: stats}


class KnownClicks(beam.PTransform):
    """``(interaction rows, item ids)`` -> ``{"clicks", DEAD, STATS}``.

    Input: the ``rows`` of :class:`ReadSource` for interactions and a PCollection of the item
    table's ids. ``clicks``: ``(user_id, (ts, order, item_id))`` of the clicks on a known item;
    ``DEAD``: the others (reason ``unknown_item``); ``STATS``: ``events`` and the dead count.
    """

    def expand(self, inputs):
        interactions, item_ids = inputs
        known = beam.pvalue.AsSingleton(item_ids | "ItemIdList" >> beam.combiners.ToList()
                                        | "KnownItems" >> beam.Map(frozenset))
        out = interactions | "Validate" >> beam.ParDo(ValidateClicks(), known).with_outputs(
            DEAD, STATS, main="clicks")
        return {"clicks": out.clicks, DEAD: out[DEAD], STATS: out[STATS]}


# ------------------------------------------------------------------------------ dead letters

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


def _write_dead_letters(rows, out_dir, encodings):
    """Sorted by source, file, line number (``encodings``: {source: text encoding})."""
    lines = [json.dumps(dead_letter_record(*row, encoding=encodings[row[0]]), ensure_ascii=False)
             for row in sorted(rows)]
    write_lines(os.path.join(out_dir, "dead_letters", "dead_letters.jsonl"), lines)
    return [("dead_letters.written", len(lines))]


class WriteDeadLetters(beam.PTransform):
    """DEAD PCollections (a tuple) -> ``<out_dir>/dead_letters/dead_letters.jsonl``.

    One :func:`dead_letter_record` per line, sorted by source, file and line number (the file
    exists, empty, when nothing was rejected). ``encodings``: {source: text encoding}.
    Returns the STATS PCollection ``[("dead_letters.written", lines)]``.
    """

    def __init__(self, out_dir: str, encodings: dict):
        super().__init__()
        self.out_dir, self.encodings = out_dir, dict(encodings)

    def expand(self, dead):
        return (tuple(dead) | "FlattenDead" >> beam.Flatten()
                | "AllDead" >> beam.combiners.ToList()
                | "WriteDead" >> beam.FlatMap(_write_dead_letters, self.out_dir, self.encodings))

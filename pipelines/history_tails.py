"""History tails (issue 29): each user's last ``H`` clicks over everything seen so far (and its
clicks in the run's test split after them), so that
an incremental preprocess (``preprocess.previous_artifacts``, one window of clicks) gives its
examples the same histories a preprocess of all the clicks would give.

Written with ``preprocess.history_tails`` (default false: no such files, the artifacts of
before) into ``history_tails/``:

- ``tails-<shard:05d>-of-<num_shards:05d>.jsonl.gz``: one line per user (users by
  :func:`pipelines.examples.shard_of` of their id, ascending id inside a shard):
  ``{"user": id, "clicks": [[ts, raw item id], ...]}``, the user's tail (below: at most ``H``
  + its test clicks) in click order (timestamp, input order); gzip with mtime 0
  (byte-identical reruns);
- ``state.json``: ``{"history_length", "num_shards", "users", "grown_from"}`` (``grown_from``:
  the previous artifacts folder whose tails were merged, null for none).

H = ``preprocess.history_length``. The clicks are a user row's (warm) clicks
(:class:`pipelines.split.UserTimelines` ``clicks``; an ``item_cold_start`` row's cold clicks are
evaluation-only and never enter a tail). A tail = the last ``H`` clicks of (carried previous
tail + this run's train and valid clicks), followed by **every** click of the user's test split
(:func:`merge_tail` ``num_test``): at most ``H`` + (the user's test clicks in the run that wrote
it) clicks per user. The test split is a user's newest clicks (``global_time`` and the warm
clicks of ``item_cold_start``: every click at or after the test boundary; ``leave_last_out``:
the user's last click). Without a test split (the update's default [0.9, 0.1, 0.0]) a tail is
the last ``H`` clicks, as before. A user without a click in this run keeps its previous tail
(whole: previous artifacts of a larger ``H`` leave such users' tails longer).

The merge rule (:func:`carried_tail`, :func:`merge_tail`): the previous tail's clicks at or
after the user's first (warm) click of this run are dropped: this run holds them again (the
rolling driver's window folders overlap by one segment, cut by time: update s's test split,
segment s + 1, is in update s + 1's folder again; for windows cut by time and disjoint nothing
is dropped). Since the tail keeps ``H`` clicks before its test split, the carried part still
holds the ``H`` clicks before a repeated test split: the histories are exact whenever the next
run holds again at most the previous run's test split (of each user; ``leave_last_out``: at
most the user's last click, else as short as under the rule of before, never shorter). The
user's sequence is then the carried tail followed by this run's clicks, in time order, and a
click's history is the ``H`` clicks before it in that sequence
(:meth:`pipelines.examples.ExampleWriter.records` ``tail``, which takes the last ``H``: a
carried tail longer than ``H`` is harmless).

Transforms:

- :class:`ReadHistoryTails`: a pipeline root -> ``(user_id, tail)`` of a previous folder.
- :class:`JoinHistoryTails`: ``(user rows, previous tails)`` -> ``{"rows": (row, carried tail),
  STATS}`` (one element per user row), writing the new tails and ``state.json``. A join
  (CoGroupByKey by user), not a side input: a million users' tails are not held by one worker.
"""
from __future__ import annotations

import gzip
import json
import os

from pipelines.common import STATS, is_remote, write_bytes
from pipelines.examples import shard_of

import apache_beam as beam  # noqa: E402  (after pipelines.common: its import is quiet)
from apache_beam.io.filesystem import CompressionTypes  # noqa: E402
from apache_beam.io.filesystems import FileSystems  # noqa: E402

from micrec_tf.config import ConfigError  # noqa: E402

__all__ = ["TAILS_DIR", "STATE_FILE", "carried_tail", "merge_tail", "num_test_clicks",
           "history_tails",
           "shard_file", "tails_shard_bytes", "read_shard", "read_history_tails",
           "read_tails_state",
           "has_history_tails", "ReadHistoryTails", "JoinHistoryTails"]

TAILS_DIR = "history_tails"
STATE_FILE = os.path.join(TAILS_DIR, "state.json")


def carried_tail(previous, clicks) -> tuple:
    """The part of a previous tail (``((ts, item_id), ...)``) a user's sequence keeps before
    this run's ``clicks`` (``((ts, item_id), ...)`` in click order): the clicks strictly before
    the first of ``clicks`` (all of them when ``clicks`` is empty)."""
    previous = tuple((int(t), item) for t, item in (previous or ()))
    if not clicks:
        return previous
    first = int(clicks[0][0])
    return tuple(c for c in previous if c[0] < first)


def merge_tail(previous, clicks, history_length: int, num_test: int = 0) -> tuple:
    """The new tail: the last ``history_length`` clicks of :func:`carried_tail` + ``clicks``
    less its last ``num_test``, followed by those ``num_test`` clicks (the user's test split,
    kept whole: module doc). Returns ``((ts, item_id), ...)`` of at most ``history_length +
    num_test`` clicks. ``num_test=0`` (default) = the last ``history_length`` clicks, the rule
    of before."""
    if history_length < 1:
        raise ValueError(f"history_length must be >= 1. Received: {history_length!r}")
    clicks = tuple((int(t), item) for t, item in clicks)
    if isinstance(num_test, bool) or not isinstance(num_test, int) or \
            not 0 <= num_test <= len(clicks):
        raise ValueError(f"num_test must be an integer in [0, {len(clicks)}] (the number of "
                         f"clicks). Received: {num_test!r}")
    cut = len(clicks) - num_test
    seq = carried_tail(previous, clicks) + clicks[:cut]
    return seq[-history_length:] + clicks[cut:]


def num_test_clicks(row) -> int:
    """The number of clicks of a :class:`pipelines.split.UserTimelines` row in its test split:
    ``len(clicks) - n_train - n_valid`` (its last ones)."""
    return len(row[2]) - int(row[3]) - int(row[4])


def history_tails(previous: dict, user_rows, history_length: int) -> dict:
    """``{user_id: tail}`` after ``user_rows`` (rows of :class:`pipelines.split.UserTimelines`:
    their ``clicks``, ``n_train``, ``n_valid``) follow the ``previous`` tails (:func:`merge_tail`
    with the row's :func:`num_test_clicks`); a user without clicks here keeps its previous tail.
    The plain-Python form of :class:`JoinHistoryTails`."""
    tails = {u: tuple((int(t), i) for t, i in tail) for u, tail in (previous or {}).items()}
    for row in user_rows:
        if row[2]:
            tails[row[0]] = merge_tail(tails.get(row[0], ()), row[2], history_length,
                                       num_test_clicks(row))
    return {u: t for u, t in tails.items() if t}


def shard_file(shard: int, num_shards: int) -> str:
    """``history_tails/tails-<shard>-of-<num_shards>.jsonl.gz`` (relative to the artifacts)."""
    return os.path.join(TAILS_DIR, f"tails-{shard:05d}-of-{num_shards:05d}.jsonl.gz")


def tails_shard_bytes(tails) -> bytes:
    """``(user_id, tail)`` pairs -> one shard file's bytes (ascending user id, gzip mtime 0)."""
    lines = [json.dumps({"user": u, "clicks": [[int(t), i] for t, i in tail]},
                        separators=(",", ":")) + "\n"
             for u, tail in sorted(tails, key=lambda kv: kv[0]) if tail]
    return gzip.compress("".join(lines).encode("utf-8"), mtime=0)


def has_history_tails(artifacts_dir: str) -> bool:
    """Whether artifacts ``artifacts_dir`` hold history tails (``history_tails/state.json``)."""
    return FileSystems.exists(os.path.join(artifacts_dir, STATE_FILE))


def read_tails_state(artifacts_dir: str) -> dict:
    with FileSystems.open(os.path.join(artifacts_dir, STATE_FILE)) as fh:
        return json.loads(fh.read().decode("utf-8"))


def _parse_line(line: str):
    rec = json.loads(line)
    return rec["user"], tuple((int(t), i) for t, i in rec["clicks"])


def read_shard(path: str) -> list:
    """``[(user_id, tail)]`` of one shard file (local or any Beam filesystem)."""
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as fh:
        text = gzip.decompress(fh.read()).decode("utf-8")
    return [_parse_line(line) for line in text.splitlines() if line.strip()]


def read_history_tails(artifacts_dir: str) -> dict:
    """``{user_id: tail}`` of a folder written with ``preprocess.history_tails`` (plain
    Python; tests and small folders)."""
    n = int(read_tails_state(artifacts_dir)["num_shards"])
    return {u: tail for s in range(n)
            for u, tail in read_shard(os.path.join(artifacts_dir, shard_file(s, n)))}


class ReadHistoryTails(beam.PTransform):
    """A pipeline root -> ``(user_id, tail)`` of the previous artifacts ``prev_dir`` (their
    ``history_tails/`` shards), every tail whole: a tail longer than ``history_length`` (its
    test split's clicks, or a larger previous ``H``) is not cut, since cutting it would lose the
    clicks before a repeated test split; the histories and the next tails take the last ``H``
    (module doc). Previous tails of fewer than ``history_length`` clicks are refused."""

    def __init__(self, prev_dir: str, history_length: int):
        super().__init__()
        self.prev_dir, self.history_length = prev_dir, int(history_length)
        try:
            state = read_tails_state(prev_dir)
            prev_h = int(state["history_length"])
            int(state["num_shards"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ConfigError(f"preprocess.history_tails: the previous artifacts' "
                              f"{os.path.join(prev_dir, STATE_FILE)} cannot be read ({err})"
                              ) from None
        if prev_h < self.history_length:
            raise ConfigError(f"preprocess.history_tails: the previous artifacts {prev_dir!r} "
                              f"keep tails of {prev_h} clicks, fewer than "
                              f"preprocess.history_length {self.history_length}. Received: "
                              f"{self.history_length!r}")

    def expand(self, root):
        state = read_tails_state(self.prev_dir)
        n = int(state["num_shards"])
        paths = [os.path.join(self.prev_dir, shard_file(s, n)) for s in range(n)]
        return (root | "TailFiles" >> beam.Create(paths)
                | "ReadTails" >> beam.FlatMap(read_shard))


class _Join(beam.DoFn):
    """CoGroupByKey by user -> main: ``(row, carried tail)`` per user row; ``tails``:
    ``(shard, (user_id, new tail))``; STATS: ``history_tails.*`` counts."""

    def __init__(self, history_length: int, num_shards: int):
        self.history_length, self.num_shards = history_length, num_shards

    def process(self, kv):
        user, groups = kv
        previous = list(groups["tail"])
        previous = previous[0] if previous else ()
        rows = list(groups["rows"])
        row = rows[0] if rows else None
        clicks = row[2] if row is not None else ()
        carried = carried_tail(previous, clicks)
        new = (merge_tail(previous, clicks, self.history_length, num_test_clicks(row))
               if clicks else tuple(previous))
        if row is not None:
            yield (row, carried)
            if carried:
                yield beam.pvalue.TaggedOutput(STATS, ("history_tails.users_carried", 1))
        if new:
            yield beam.pvalue.TaggedOutput("tails", (shard_of(user, self.num_shards),
                                                     (user, new)))
            yield beam.pvalue.TaggedOutput(STATS, ("history_tails.users", 1))


def _write_shard(kv, out_dir, num_shards):
    """Writes one shard's gzip bytes as they are (no second compression by the extension)."""
    shard, groups = kv
    path = os.path.join(out_dir, shard_file(shard, num_shards))
    if not is_remote(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    with FileSystems.create(path, compression_type=CompressionTypes.UNCOMPRESSED) as fh:
        fh.write(tails_shard_bytes(groups["tails"]))
    return []


def _write_state(users, out_dir, meta):
    write_bytes(os.path.join(out_dir, STATE_FILE),
                (json.dumps({**meta, "users": int(users)}, indent=1, sort_keys=True)
                 + "\n").encode("utf-8"))
    return []


class JoinHistoryTails(beam.PTransform):
    """``(user rows, previous tails)`` -> ``{"rows": (row, carried tail), STATS}``; writes
    ``history_tails/`` (module doc) into ``out_dir``.

    ``user rows``: :class:`pipelines.split.UserTimelines` rows; ``previous tails``: ``(user_id,
    tail)`` (:class:`ReadHistoryTails`, or an empty PCollection). ``rows``: one element per user
    row, the row and :func:`carried_tail` of its previous tail (``()`` for a user without one).
    STATS: ``history_tails.users`` (tails written), ``history_tails.users_carried`` (rows whose
    histories start in the previous tail).
    """

    def __init__(self, out_dir: str, history_length: int, num_shards: int,
                 grown_from: str | None = None):
        super().__init__()
        if history_length < 1 or num_shards < 1:
            raise ValueError(f"history_length and num_shards must be >= 1. Received: "
                             f"{history_length!r}, {num_shards!r}")
        self.out_dir, self.history_length, self.num_shards = out_dir, history_length, num_shards
        self.meta = {"history_length": int(history_length), "num_shards": int(num_shards),
                     "grown_from": grown_from}

    def expand(self, inputs):
        rows, previous = inputs
        n = self.num_shards
        keyed = rows | "KeyRows" >> beam.Map(lambda r: (r[0], r))
        out = ({"rows": keyed, "tail": previous} | "GroupTails" >> beam.CoGroupByKey()
               | "Join" >> beam.ParDo(_Join(self.history_length, n)).with_outputs(
                   "tails", STATS, main="rows"))
        shard_keys = rows.pipeline | "TailShardKeys" >> beam.Create([(k, None) for k in range(n)])
        _ = ({"tails": out.tails, "keys": shard_keys} | "GroupTailShards" >> beam.CoGroupByKey()
             | "WriteTailShards" >> beam.FlatMap(_write_shard, self.out_dir, n))
        _ = (out[STATS] | "TailUsers" >> beam.Filter(lambda kv: kv[0] == "history_tails.users")
             | "TailUserOnes" >> beam.Map(lambda kv: kv[1])
             | "CountTailUsers" >> beam.CombineGlobally(sum)
             | "WriteTailState" >> beam.FlatMap(_write_state, self.out_dir, self.meta))
        return {"rows": out.rows, STATS: out[STATS]}

"""The train / valid / test split: the boundaries and each user's clicks in order, labelled.

Three strategies (``preprocess.split``):

- ``global_time``: exact timestamp quantiles of all clicks at ``split_fractions``, in two passes
  (day buckets, then the exact seconds inside the two boundary buckets); clicks at or after a
  boundary go to the later split, so ties at a boundary all go there.
- ``leave_last_out``: per user, the last click is test, the second-last valid.
- ``item_cold_start`` (issue 28): an item is cold when :func:`cold_bucket` of its raw id (the
  dataset's own string) is ``valid`` (sha256 mod 10 = 0) or ``test`` (= 1). Warm clicks (on the
  other items) are split as ``global_time``, boundaries over warm clicks only. Every click on a
  cold item is an evaluation click of its item's bucket, whatever its time; cold clicks appear
  in no training artifact (the user row's ``clicks`` hold warm clicks only). A cold click's
  history is the user's warm clicks strictly earlier in click order (timestamp, input order).

In every mode a user's (warm) clicks in order are contiguous blocks: train, valid, test.

Transforms (PCollections they take and give):

- :class:`SplitBoundaries`: clicks ``(user_id, (ts, order, item_id))`` -> ``{"boundaries": one
  (valid_start, test_start) tuple (None: no boundary), STATS: boundary.* values}``.
- :class:`UserTimelines`: ``(clicks, profiles (user_id, profile), boundaries)`` -> ``{"users":
  (user_id, profile, clicks ((ts, item_id), ...), n_train, n_valid, has_profile[, cold]),
  STATS}``; ``cold`` (``item_cold_start`` only) = ``((ts, item_id, split, n_warm_before), ...)``.
"""
from __future__ import annotations

import collections
import math

from pipelines.common import STATS, windowed

import apache_beam as beam  # noqa: E402  (after pipelines.common: its import is quiet)

from micrec_tf.config import SPLITS as MODES  # noqa: E402  (the values of preprocess.split)

TRAIN, VALID, TEST = "train", "valid", "test"
SPLITS = (TRAIN, VALID, TEST)
DAY = 86400
ITEM_COLD_START = "item_cold_start"
# The rule lives in micrec_tf.data.cold_start (one definition, also read by the evaluation).
from micrec_tf.data.cold_start import (COLD_MODULUS, COLD_TEST_BUCKET,  # noqa: E402,F401
                                       COLD_VALID_BUCKET, cold_bucket)


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
    """The split of a click at ``ts`` under ``global_time`` boundaries (valid_start, test_start)."""
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

    Every strategy gives contiguous blocks: train clicks, then valid, then test
    (``item_cold_start``: the warm clicks, split as ``global_time``).
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


# --------------------------------------------------------------------------------- boundaries

class DayBucketCounts(beam.DoFn):
    """Clicks -> (day bucket ``ts // DAY``, clicks) partial counts, one per bucket and bundle
    (pass 1 of the split)."""

    def start_bundle(self):
        self._buckets = collections.Counter()

    def process(self, kv):
        self._buckets[kv[1][0] // DAY] += 1

    def finish_bundle(self):
        for bucket, n in sorted(self._buckets.items()):
            yield windowed((bucket, n))
        self._buckets = collections.Counter()


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
            yield windowed((ts, n))
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


def _boundary_stats(bounds):
    return [(f"boundary.{name}", v) for name, v in zip(("valid_start", "test_start"), bounds)
            if v is not None]


class SplitBoundaries(beam.PTransform):
    """Clicks ``(user_id, (ts, order, item_id))`` -> ``{"boundaries", STATS}``.

    ``boundaries``: one ``(valid_start, test_start)`` tuple, the timestamps where the valid and
    the test split start (None: that split is empty, or ``leave_last_out``, which needs none).
    ``STATS``: ``(boundary.valid_start | boundary.test_start, timestamp)`` of those not None.
    """

    def __init__(self, mode: str, fractions=(0.8, 0.1, 0.1)):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"split mode must be one of {list(MODES)}. Received: {mode!r}")
        self.mode, self.fractions = mode, [float(f) for f in fractions]

    def expand(self, clicks):
        if self.mode in ("global_time", ITEM_COLD_START):  # item_cold_start: pass warm clicks
            bucket_counts = (clicks | "DayBuckets" >> beam.ParDo(DayBucketCounts())
                             | "SumBuckets" >> beam.CombinePerKey(sum)
                             | "AllBuckets" >> beam.combiners.ToList())
            plan = beam.pvalue.AsSingleton(
                bucket_counts | "Plan" >> beam.Map(_split_plan, self.fractions))
            seconds = (clicks | "ExactSeconds" >> beam.ParDo(ExactSecondsInBuckets(), plan)
                       | "SumSeconds" >> beam.CombinePerKey(sum)
                       | "AllSeconds" >> beam.combiners.ToList())
            boundaries = seconds | "Boundaries" >> beam.Map(_split_boundaries, plan)
        else:
            boundaries = clicks.pipeline | "NoBoundaries" >> beam.Create([(None, None)])
        return {"boundaries": boundaries,
                STATS: boundaries | "BoundaryStats" >> beam.FlatMap(_boundary_stats)}


# ------------------------------------------------------------------------------ user timelines

class PrepareUser(beam.DoFn):
    """CoGroupByKey result -> (user_id, profile, clicks, n_train, n_valid, has_profile[, cold]).

    ``clicks``: ((ts, item_id), ...) sorted by timestamp; clicks of the same second keep their
    input order (the :func:`pipelines.rows.click_order` key carried from
    :class:`pipelines.rows.ParseRows`, dropped here). Under ``item_cold_start`` ``clicks`` holds
    the warm clicks only and a 7th element ``cold`` the cold ones, ``((ts, item_id, split,
    n_warm_before), ...)`` in click order: ``split`` from :func:`cold_bucket`, ``n_warm_before``
    the number of the user's warm clicks strictly earlier in click order (``clicks[:n]`` is the
    cold click's history before truncation). A user with cold clicks only gets ``clicks = ()``.
    Other modes give the 6-tuple unchanged.
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
        cold = None
        if self.mode == ITEM_COLD_START:
            warm, cold = [], []
            for ts, item in clicks:
                bucket = cold_bucket(item)
                if bucket is None:
                    warm.append((ts, item))
                else:
                    cold.append((ts, item, bucket, len(warm)))
            clicks = warm
        if clicks or cold:  # a user row without valid clicks produces nothing
            profiles = sorted(groups["user"], key=repr)
            profile = profiles[0] if profiles else ("",) * self.num_profile_fields
            n_train, n_valid = split_counts(clicks, self.mode, boundaries)
            row = (user_id, profile, tuple(clicks), n_train, n_valid, bool(profiles))
            if cold is not None:
                for _, _, bucket, _ in cold:
                    yield beam.pvalue.TaggedOutput(STATS, (f"cold.{bucket}_clicks", 1))
                row += (tuple(cold),)
            yield row


class UserTimelines(beam.PTransform):
    """``(clicks, profiles, boundaries)`` -> ``{"users", STATS}``: one row per user with clicks.

    Input: clicks ``(user_id, (ts, order, item_id))``, profiles ``(user_id, profile tuple)`` (one
    per user; a user without one gets empty values) and the one-element ``boundaries`` of
    :class:`SplitBoundaries`. ``users``: ``(user_id, profile, clicks, n_train, n_valid,
    has_profile[, cold])``, ``clicks`` = ``((ts, item_id), ...)`` in click order
    (:class:`PrepareUser`), its first ``n_train`` train, the next ``n_valid`` valid, the rest
    test; ``cold`` under ``item_cold_start`` only. ``STATS``: ``duplicate_clicks`` removed under
    ``deduplicate``; ``cold.valid_clicks`` / ``cold.test_clicks`` under ``item_cold_start``.
    """

    def __init__(self, mode: str, num_profile_fields: int, deduplicate: bool = False):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"split mode must be one of {list(MODES)}. Received: {mode!r}")
        self.mode, self.num_profile_fields = mode, num_profile_fields
        self.deduplicate = deduplicate

    def expand(self, inputs):
        clicks, profiles, boundaries = inputs
        out = ({"clicks": clicks, "user": profiles} | "GroupByUser" >> beam.CoGroupByKey()
               | "PrepareUser" >> beam.ParDo(
                   PrepareUser(self.mode, self.num_profile_fields, self.deduplicate),
                   beam.pvalue.AsSingleton(boundaries)).with_outputs(STATS, main="users"))
        return {"users": out.users, STATS: out[STATS]}

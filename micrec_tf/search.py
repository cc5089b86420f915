"""Top-K search over item vectors: the one exact top-K, the one ScaNN builder and searcher, and the
per-query exclusion sets, shared by the evaluation metrics, the export's item index and the
title-neighbour job (pure numpy; ScaNN is imported only when a searcher is built or loaded).

Tie rule (every exact top-K of the project, and the order ScaNN candidates are returned in):
**higher score first, then lower item index.** Only the popularity baselines pass a
``secondary`` key, which ranks between the two (equal scores: larger ``secondary`` first, then
lower index).

Conventions:

* Scores are a ``[B, V]`` matrix (or a function of a row range returning one); ``-inf`` marks an
  entry that cannot be retrieved, ``+inf`` ranks as the largest finite value, NaN raises.
* When fewer than ``k`` entries of a row can be retrieved the row is padded with index ``-1`` and
  score ``-inf``.
* Exclusion sets may be a list of index arrays (one per query), a ``(indptr, indices)`` pair or
  anything with ``indptr``/``indices`` attributes (CSR, e.g. ``scipy.sparse.csr_matrix``), or an
  object with a ``rows_cols(start, stop) -> (rows, cols)`` method (rows relative to ``start``),
  which lets big exclusion sets be produced lazily per batch (:func:`as_exclusion`).

Kept instead of ``tf.math.top_k`` / ``tfrs.layers.factorized_top_k.BruteForce``: those take no
per-query exclusion sets or secondary key, do not pad rows with fewer than k retrievable items,
and would pull TensorFlow into the numpy-only evaluation and the Beam job's driver.
"""
from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from typing import Callable, Iterable, Sequence

import numpy as np

from micrec_tf.cli import verbose_requested

__all__ = ["top_k", "top_k_by_score_fn", "top_k_dot", "rescore_candidates", "CSRExclusion",
           "as_exclusion", "build_scann", "search_scann", "load_scann_searcher",
           "quiet_native_logs"]

ScoreFn = Callable[[int, int], np.ndarray]


# ----------------------------------------------------------------------------- exclusion sets
class CSRExclusion:
    """Per-query excluded item indices in CSR form: query ``i`` excludes
    ``indices[indptr[i]:indptr[i+1]]``."""

    def __init__(self, indptr, indices):
        self.indptr = np.asarray(indptr, dtype=np.int64)
        self.indices = np.asarray(indices, dtype=np.int64)
        if self.indptr.ndim != 1 or self.indptr.size == 0 or self.indptr[0] != 0:
            raise ValueError(f"indptr must be a 1-D array starting at 0. Received: "
                             f"shape {self.indptr.shape}, first {self.indptr[:1].tolist()}")
        if np.any(np.diff(self.indptr) < 0) or self.indptr[-1] != self.indices.size:
            raise ValueError(f"indptr must be non-decreasing and end at len(indices)="
                             f"{self.indices.size}. Received: last {int(self.indptr[-1])}")

    @classmethod
    def from_lists(cls, lists: Sequence[Iterable[int]]) -> "CSRExclusion":
        arrays = [np.asarray(list(x) if not isinstance(x, np.ndarray) else x,
                             dtype=np.int64).ravel() for x in lists]
        indptr = np.zeros(len(arrays) + 1, dtype=np.int64)
        if arrays:
            indptr[1:] = np.cumsum([a.size for a in arrays])
        indices = np.concatenate(arrays) if arrays else np.zeros(0, np.int64)
        return cls(indptr, indices)

    @property
    def num_rows(self) -> int:
        return int(self.indptr.size - 1)

    def rows_cols(self, start: int, stop: int):
        lo, hi = self.indptr[start], self.indptr[stop]
        counts = np.diff(self.indptr[start:stop + 1])
        rows = np.repeat(np.arange(stop - start, dtype=np.int64), counts)
        return rows, self.indices[lo:hi]


def as_exclusion(exclude, num_rows: int | None = None):
    """Normalises the accepted exclusion formats (module doc) into an object with ``rows_cols``."""
    if exclude is None:
        return None
    if hasattr(exclude, "rows_cols"):
        out = exclude
    elif hasattr(exclude, "indptr") and hasattr(exclude, "indices"):
        out = CSRExclusion(exclude.indptr, exclude.indices)
    elif (isinstance(exclude, tuple) and len(exclude) == 2
          and all(isinstance(a, np.ndarray) for a in exclude)):
        out = CSRExclusion(*exclude)
    else:
        out = CSRExclusion.from_lists(exclude)
    n = getattr(out, "num_rows", None)
    if num_rows is not None and n is not None and n != num_rows:
        raise ValueError(f"exclusion sets cover {n} queries, expected {num_rows}")
    return out


# ----------------------------------------------------------------------------- exact top-k
def _working_copy(scores) -> np.ndarray:
    """A float32 (float16/32 input) or float64 copy, checked: 2-D, no NaN, +inf -> max finite."""
    scores = np.asarray(scores)
    low = scores.dtype in (np.float32, np.float16)
    scores = np.array(scores, dtype=np.float32 if low else np.float64, copy=True)
    if scores.ndim != 2:
        raise ValueError(f"scores must be 2-D [B, V]. Received: shape {scores.shape}")
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN")
    scores[scores == np.inf] = np.finfo(scores.dtype).max
    return scores


def _check_k(k) -> int:
    if int(k) != k or k <= 0:
        raise ValueError(f"k must be a positive integer. Received: k={k!r}")
    return int(k)


def _kth_largest(scores: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Per row, the r-th largest value (1-based r >= 1, r <= number of columns)."""
    v = scores.shape[1]
    pos = v - r  # position in ascending order
    uniq = np.unique(pos)
    if uniq.size <= 16:
        part = np.partition(scores, uniq, axis=1)
    else:
        part = np.sort(scores, axis=1)
    return part[np.arange(scores.shape[0]), pos]


def _select_mask(scores: np.ndarray, r: np.ndarray, secondary: np.ndarray | None) -> np.ndarray:
    """Boolean [B, V] mask of the top-r[b] finite entries of each row under the tie rule.

    ``scores`` holds no NaN and no +inf (-inf marks entries that cannot be selected).
    """
    b, v = scores.shape
    finite = scores > -np.inf
    r = np.minimum(r, finite.sum(axis=1))
    out = np.zeros((b, v), dtype=bool)
    active = r > 0
    if not np.any(active):
        return out
    all_rows = bool(active.all())
    rows = np.nonzero(active)[0]
    s = scores if all_rows else scores[rows]
    ra = r[rows]
    kth = _kth_largest(s, ra)
    greater = s > kth[:, None]
    tied = (s == kth[:, None]) & (finite if all_rows else finite[rows])
    need = ra - greater.sum(axis=1)
    n_tied = tied.sum(axis=1)
    chosen = tied
    partial = n_tied > need  # rows where only some of the tied entries make the cut
    if np.any(partial):
        chosen = tied.copy()
        prow = np.nonzero(partial)[0]
        tp = tied[prow]
        if secondary is not None:
            sec = np.where(tp, secondary[None, :].astype(np.float64), -np.inf)
            chosen[prow] = _select_mask(sec, need[prow], None)
        else:
            chosen[prow] = tp & (np.cumsum(tp, axis=1) <= need[prow, None])
    sel = greater | chosen
    if all_rows:
        return sel
    out[rows] = sel
    return out


def _top_k_masked(scores: np.ndarray, k: int, secondary: np.ndarray | None):
    """The general path: any ties, any number of retrievable entries, optional secondary key."""
    b, v = scores.shape
    mask = _select_mask(scores, np.full(b, k, dtype=np.int64), secondary)
    rr, cc = np.nonzero(mask)  # row-major: item indices ascending within each row
    counts = np.bincount(rr, minlength=b)
    if b and np.all(counts == k):
        # Every row full: stable sorts keep ascending index among equal keys.
        cc = cc.reshape(b, k)
        vals = np.take_along_axis(scores, cc, axis=1)
        if secondary is None:
            order = np.argsort(-vals, axis=1, kind="stable")
        else:
            order = np.lexsort([-secondary[cc].astype(np.float64), -vals], axis=1)
        return (np.take_along_axis(cc, order, axis=1).astype(np.int64),
                np.take_along_axis(vals, order, axis=1))
    vals = scores[rr, cc]
    keys = ([cc, -vals, rr] if secondary is None
            else [cc, -secondary[cc].astype(np.float64), -vals, rr])
    order = np.lexsort(keys)
    rr, cc, vals = rr[order], cc[order], vals[order]
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    pos = np.arange(rr.size) - starts[rr]
    idx = np.full((b, k), -1, dtype=np.int64)
    out_scores = np.full((b, k), -np.inf, dtype=scores.dtype)
    idx[rr, pos] = cc
    out_scores[rr, pos] = vals
    return idx, out_scores


# Wide rows (at least this many columns) are first cut to the entries at or above a lower bound
# of their k-th largest score: the k-th largest of every PREFILTER_STRIDE-th column.
PREFILTER_MIN_COLUMNS = 1 << 16
PREFILTER_STRIDE = 16


def _prefilter_candidates(scores: np.ndarray, k: int):
    """Exact candidate cut for wide rows: ``(columns, values)``, both [B, C], or None.

    The k-th largest score of any subset of a row's columns is at most the row's k-th largest,
    so every entry of the row's top k (ties at the k-th place included) scores at least the
    k-th largest of a strided sample of its columns; those entries, about ``k * stride`` per row,
    are kept in ascending column order (so the tie rule's lower index is the lower position),
    padded with column -1 / -inf. None when the cut does not pay (narrow rows, large k, or a
    row whose sample holds fewer than k retrievable entries).
    """
    b, v = scores.shape
    if v < PREFILTER_MIN_COLUMNS or k * PREFILTER_STRIDE * 4 > v:
        return None
    sample = scores[:, ::PREFILTER_STRIDE]
    bound = -np.partition(-sample, k - 1, axis=1)[:, k - 1]  # k-th largest of the sample
    if not np.all(bound > -np.inf):
        return None
    rr, cc = np.nonzero(scores >= bound[:, None])  # row-major: columns ascending in each row
    counts = np.bincount(rr, minlength=b)
    width = int(counts.max())
    if width * 4 > v:
        return None
    pos = np.arange(rr.size) - np.repeat(np.cumsum(counts) - counts, counts)
    cols = np.full((b, width), -1, dtype=np.int64)
    vals = np.full((b, width), -np.inf, dtype=scores.dtype)
    cols[rr, pos] = cc
    vals[rr, pos] = scores[rr, cc]
    return cols, vals


def _top_k_prepared(scores: np.ndarray, k: int, secondary: np.ndarray | None):
    """Top-k of a checked working copy (see :func:`_working_copy`), under the tie rule.

    Fast path (no secondary key, k < V): wide rows are first cut to their candidates
    (:func:`_prefilter_candidates`, exact); then ``argpartition``, and rows where a tie straddles
    the k-th place or fewer than k entries are retrievable go through the general path.
    """
    b, v = scores.shape
    if secondary is not None or k >= v or b == 0:
        return _top_k_masked(scores, k, secondary)
    cut = _prefilter_candidates(scores, k)
    if cut is not None:
        cols, vals = cut
        idx, top = _top_k_prepared(vals, k, None)  # every row holds >= k finite candidates
        return np.take_along_axis(cols, idx, axis=1), top
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    vals = np.take_along_axis(scores, part, axis=1)
    kth = vals.min(axis=1)
    slow = ~(kth > -np.inf) | ((scores >= kth[:, None]).sum(axis=1) > k)
    order = np.lexsort((part, -vals), axis=1)
    idx = np.take_along_axis(part, order, axis=1).astype(np.int64)
    vals = np.take_along_axis(vals, order, axis=1)
    if slow.any():
        rows = np.nonzero(slow)[0]
        idx[rows], vals[rows] = _top_k_masked(scores[rows], k, None)
    return idx, vals


def top_k(scores, k: int, secondary: np.ndarray | None = None, skip_columns=None):
    """Exact top-``k`` of each row of a score matrix under the tie rule (module doc).

    Args:
      scores: [B, V] float; ``-inf`` = not retrievable (NaN raises).
      k: items per row.
      secondary: optional [V] key ranking equal scores (larger first) before the index does.
      skip_columns: optional column indices never retrieved (e.g. 0, the padding item).

    Returns: ``indices int64 [B, k]`` and ``scores [B, k]`` (float32 for float16/32 input, else
    float64), padded with -1 / -inf where a row has fewer than k retrievable entries.
    """
    k = _check_k(k)
    work = _working_copy(scores)
    if skip_columns is not None:
        work[:, skip_columns] = -np.inf
    return _top_k_prepared(work, k, secondary)


def top_k_by_score_fn(score_fn: ScoreFn, num_rows: int, k: int, exclude=None,
                      valid_mask: np.ndarray | None = None, batch_size: int = 1024,
                      secondary: np.ndarray | None = None, skip_columns=None):
    """Batched exact :func:`top_k` where ``score_fn(start, stop)`` returns the [stop-start, V]
    scores of queries ``start .. stop-1``.

    ``exclude``: per-query exclusion sets (module doc); ``valid_mask``: bool [V], False columns are
    never retrieved; ``skip_columns``: columns never retrieved (as in :func:`top_k`).
    Returns ``indices int64 [num_rows, k]`` and ``scores [num_rows, k]``.

    With a ``valid_mask``, each block is cut to its retrievable columns before the top-k (same
    result: the columns keep their order, so the tie rule holds): ranking 400 cold items of a
    4,000-item catalogue then costs what 400 columns cost, not a sort of every row.
    """
    k = _check_k(k)
    if valid_mask is None:
        return _top_k_blocks(score_fn, num_rows, k, exclude, batch_size, secondary,
                             skip_columns, None)
    columns = _retrievable_columns(valid_mask, skip_columns)
    return _top_k_blocks(lambda a, b: np.asarray(score_fn(a, b))[:, columns], num_rows, k,
                         exclude, batch_size, secondary, None, columns)


def _retrievable_columns(valid_mask, skip_columns) -> np.ndarray:
    """int64 [C] ascending: the columns of ``valid_mask`` that are True and not skipped."""
    valid = np.array(valid_mask, dtype=bool, copy=True).reshape(-1)
    if skip_columns is not None:
        valid[skip_columns] = False
    return np.nonzero(valid)[0]


def _narrow_map(columns: np.ndarray) -> np.ndarray:
    """int64 [columns[-1] + 1]: full column -> its position in ``columns`` (ascending), -1 for a
    column that is not among them."""
    to_narrow = np.full(int(columns[-1]) + 1 if columns.size else 0, -1, np.int64)
    to_narrow[columns] = np.arange(columns.size)
    return to_narrow


def excluded_cells(excl, start: int, stop: int, width: int, to_narrow=None):
    """``(rows, cols)`` int64: the exclusion sets (an :func:`as_exclusion` object) of queries
    ``start .. stop-1`` inside a ``[stop - start, width]`` score block, ids outside it dropped.
    With ``to_narrow`` (:func:`_narrow_map`) the block holds only the retrievable columns: the
    cells are in its positions, and excluded ids that are not retrievable drop out."""
    rows, cols = (np.asarray(a, np.int64) for a in excl.rows_cols(start, stop))
    width = width if to_narrow is None else to_narrow.size
    keep = (cols >= 0) & (cols < width)
    rows, cols = rows[keep], cols[keep]
    if to_narrow is not None:
        cols = to_narrow[cols]
        rows, cols = rows[cols >= 0], cols[cols >= 0]
    return rows, cols


def _top_k_blocks(score_fn: ScoreFn, num_rows: int, k: int, exclude, batch_size: int,
                  secondary, skip_columns, columns):
    """The loop of :func:`top_k_by_score_fn`. ``columns``: None, or int64 [C] ascending when
    ``score_fn`` returns only those columns of the [B, V] scores (the indices, exclusion sets
    and ``secondary`` stay in the full V space and are mapped here)."""
    excl = as_exclusion(exclude, num_rows)
    to_narrow = None
    if columns is not None:
        if secondary is not None:
            secondary = np.asarray(secondary)[columns]
        if excl is not None:
            to_narrow = _narrow_map(columns)
    kk = k if columns is None else min(k, int(columns.size))
    all_idx, all_scores = [], []
    for start in range(0, num_rows, batch_size):
        stop = min(num_rows, start + batch_size)
        scores = _working_copy(score_fn(start, stop))
        if skip_columns is not None:
            scores[:, skip_columns] = -np.inf
        if excl is not None:
            rows, cols = excluded_cells(excl, start, stop, scores.shape[1], to_narrow)
            scores[rows, cols] = -np.inf
        if kk == 0:
            idx = np.full((stop - start, 0), -1, np.int64)
            sc = np.zeros((stop - start, 0), scores.dtype)
        else:
            idx, sc = _top_k_prepared(scores, kk, secondary)
        if columns is not None:
            idx = np.where(idx >= 0, columns[np.clip(idx, 0, None)] if columns.size else -1, -1)
            if kk < k:
                idx = np.pad(idx, ((0, 0), (0, k - kk)), constant_values=-1)
                sc = np.pad(sc, ((0, 0), (0, k - kk)), constant_values=-np.inf)
        all_idx.append(idx.astype(np.int64, copy=False))
        all_scores.append(sc)
    if not all_idx:
        return np.zeros((0, k), np.int64), np.zeros((0, k), np.float32)
    return np.concatenate(all_idx), np.concatenate(all_scores)


def _score_dtype(queries: np.ndarray, vectors: np.ndarray):
    dt = np.result_type(queries.dtype, vectors.dtype, np.float32)
    return np.float64 if dt == np.float64 else np.float32


# Most score entries one block of :func:`top_k_dot` holds (its working copies are as large).
SCORE_BLOCK_ENTRIES = 1 << 28


def top_k_dot(queries, vectors, k: int, exclude=None, valid_mask: np.ndarray | None = None,
              batch_size: int = 1024, skip_columns=None):
    """Exact maximum-inner-product top-``k``: :func:`top_k_by_score_fn` over
    ``queries [B, D] @ vectors [V, D].T`` in batches of ``batch_size`` queries, fewer where
    ``batch_size * V`` would exceed ``SCORE_BLOCK_ENTRIES`` (scores float32, float64 if either
    input is float64). Returns ``indices int64 [B, k]`` (rows of ``vectors``) and
    ``scores [B, k]``."""
    queries, vectors = np.asarray(queries), np.asarray(vectors)
    if (queries.ndim != 2 or vectors.ndim != 2 or queries.shape[1] != vectors.shape[1]):
        raise ValueError(f"need queries [B, D] and vectors [V, D]. Received: shapes "
                         f"{queries.shape} and {vectors.shape}")
    dt = _score_dtype(queries, vectors)
    # A block of scores is at most SCORE_BLOCK_ENTRIES (1 GB of float32 at 1 M items).
    batch_size = max(1, min(int(batch_size), SCORE_BLOCK_ENTRIES // max(1, vectors.shape[0])))
    q = queries.astype(dt, copy=False)
    columns = None
    if valid_mask is not None:  # score the retrievable items only (see top_k_by_score_fn)
        columns = _retrievable_columns(valid_mask, skip_columns)
        vectors, skip_columns = vectors[columns], None
    items_t = vectors.astype(dt, copy=False).T
    if q.shape[0] > batch_size:  # several products: one contiguous copy pays
        items_t = np.ascontiguousarray(items_t)
    return _top_k_blocks(lambda a, b: q[a:b] @ items_t, q.shape[0], _check_k(k), exclude,
                         batch_size, None, skip_columns, columns)


# Gathered candidate-vector entries per block of :func:`rescore_candidates` (64 M floats, 256 MB).
RESCORE_BLOCK_ENTRIES = 1 << 26


def rescore_candidates(queries: np.ndarray, vectors: np.ndarray, candidates: np.ndarray, k: int,
                       excluded_rows=None, excluded_cols=None):
    """Exact re-ranking of per-query candidate rows (e.g. an ANN index's answer).

    ``candidates`` int64 [B, C] rows of ``vectors`` (-1 = none); each is rescored exactly
    (``sum(query * vector)``), repeats, ``-1`` and the excluded ``(row, col)`` pairs (query row
    ``excluded_rows[j]`` must not get ``excluded_cols[j]``) are dropped, and the rest ordered by the
    tie rule, cut or padded (-1 / -inf) to ``k``. Returns ``(indices int64 [B, k], scores float32
    [B, k])``.
    """
    q = np.asarray(queries, np.float32)
    cand = np.asarray(candidates, np.int64)
    b, c = cand.shape
    v = vectors.shape[0]
    ok = (cand >= 0) & (cand < v)
    safe = np.where(ok, cand, 0)
    vec = np.asarray(vectors, np.float32)
    # The gathered [rows, C, D] candidate vectors, a block of queries at a time (all 1 M rows of
    # a title-neighbour search at once would be tens of GB); each row's sum is the same.
    block = max(1, RESCORE_BLOCK_ENTRIES // max(1, c * q.shape[1]))
    scores = np.empty((b, c), np.float32)
    for start in range(0, b, block):
        stop = start + block
        scores[start:stop] = (vec[safe[start:stop]] * q[start:stop, None, :]).sum(axis=-1)
    scores[~ok] = -np.inf
    if excluded_rows is not None and len(excluded_rows):
        er, ec = np.asarray(excluded_rows, np.int64), np.asarray(excluded_cols, np.int64)
        keep = (ec >= 0) & (ec < v)
        codes = er[keep] * v + ec[keep]
        scores[np.isin(np.arange(b, dtype=np.int64)[:, None] * v + safe, codes)] = -np.inf
    order = np.lexsort((safe, -scores.astype(np.float64)), axis=1)
    safe, scores = np.take_along_axis(safe, order, 1), np.take_along_axis(scores, order, 1)
    dup = np.zeros_like(ok)
    dup[:, 1:] = (safe[:, 1:] == safe[:, :-1]) & (scores[:, 1:] > -np.inf)
    if dup.any():  # a repeated candidate: keep its first copy, re-sort the dropped ones last
        scores[dup] = -np.inf
        order = np.lexsort((safe, -scores.astype(np.float64)), axis=1)
        safe, scores = np.take_along_axis(safe, order, 1), np.take_along_axis(scores, order, 1)
    idx = np.where(scores > -np.inf, safe, -1)[:, :k]
    scores = scores[:, :k]
    if idx.shape[1] < k:
        pad = k - idx.shape[1]
        idx = np.pad(idx, ((0, 0), (0, pad)), constant_values=-1)
        scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
    return idx.astype(np.int64), scores.astype(np.float32)


# ----------------------------------------------------------------------------- ScaNN
# What ScaNN's C++ code logs while it trains: absl INFO / WARNING lines and absl's banner.
_NATIVE_NOISE = re.compile(rb"^([IW]\d{4} [\d:.]+ +\d+ \S+:\d+\] |"
                           rb"WARNING: All log messages before absl::InitializeLog\(\))")


@contextlib.contextmanager
def quiet_native_logs():
    """Drops ScaNN's C++ INFO / WARNING log lines (``I0000 ... partitioner_factory_base.cc:58]
    Size of sampled dataset ...``) unless verbose logs are on (``micrec_tf.cli``).

    ScaNN logs through its own copy of absl straight to file descriptor 2, which no flag or
    environment variable silences; so fd 2 goes to a temporary file meanwhile, and every other
    line written there (errors, Python warnings) is written to stderr afterwards.
    """
    if verbose_requested():
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with tempfile.TemporaryFile() as captured:
            os.dup2(captured.fileno(), 2)
            try:
                yield
            finally:
                sys.stderr.flush()
                os.dup2(saved, 2)
                captured.seek(0)
                kept = [line for line in captured.read().splitlines(keepends=True)
                        if not _NATIVE_NOISE.match(line)]
                if kept:
                    os.write(2, b"".join(kept))
    finally:
        os.close(saved)


def build_scann(vectors: np.ndarray, params: dict):
    """A dot-product ScaNN searcher over ``vectors`` [N, D] (searcher neighbour j = row j).

    ``params``: ``mode`` (``"tree_ah"``: k-means tree + asymmetric hashing + exact re-ordering,
    or ``"brute_force"``), ``num_neighbors``; for ``tree_ah`` also ``num_leaves``,
    ``num_leaves_to_search``, ``training_sample_size``, ``dimensions_per_block``,
    ``anisotropic_quantization_threshold``, ``reorder_k`` and optionally ``spherical`` (False),
    ``random_init`` (True; False = k-means++, the same tree every build) and
    ``training_threads`` (0 = ScaNN's default).
    """
    from scann import scann_ops_pybind  # deferred: importing ScaNN costs seconds

    db = np.ascontiguousarray(vectors, dtype=np.float32)
    mode = params.get("mode", "tree_ah")
    builder = scann_ops_pybind.builder(db, int(params["num_neighbors"]), "dot_product")
    if params.get("training_threads"):
        builder.set_n_training_threads(int(params["training_threads"]))
    with quiet_native_logs():
        if mode == "brute_force":
            return builder.score_brute_force().build()
        if mode != "tree_ah":
            raise ValueError(f"ScaNN mode must be 'tree_ah' or 'brute_force'. Received: {mode!r}")
        return (builder.tree(num_leaves=int(params["num_leaves"]),
                             num_leaves_to_search=int(params["num_leaves_to_search"]),
                             training_sample_size=int(params["training_sample_size"]),
                             spherical=bool(params.get("spherical", False)),
                             random_init=bool(params.get("random_init", True)))
                .score_ah(int(params["dimensions_per_block"]),
                          anisotropic_quantization_threshold=float(
                              params["anisotropic_quantization_threshold"]))
                .reorder(int(params["reorder_k"]))
                .build())


def load_scann_searcher(index_dir: str):
    """Reloads a searcher serialised with ``searcher.serialize(index_dir)`` (no rebuilding)."""
    from scann import scann_ops_pybind

    return scann_ops_pybind.load_searcher(index_dir)


def search_scann(searcher, params: dict, queries: np.ndarray, k: int,
                 num_items: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` rows per query from a :func:`build_scann` searcher over ``num_items`` rows:
    ``(rows int64 [B, k], scores float32 [B, k])``, ordered by the tie rule.

    For ``tree_ah``, ``max(reorder_k, 2 k)`` hashed candidates are re-ordered exactly, searching
    ``num_leaves_to_search`` leaves. Missing neighbours (k larger than what the searched leaves
    hold) come back as row -1 and score -inf.
    """
    q = np.ascontiguousarray(queries, dtype=np.float32)
    want = int(min(k, num_items))
    if q.shape[0] == 0 or want == 0:
        return (np.full((q.shape[0], k), -1, np.int64),
                np.full((q.shape[0], k), -np.inf, np.float32))
    kwargs = {"final_num_neighbors": want}
    if params.get("mode", "tree_ah") == "tree_ah":
        kwargs["pre_reorder_num_neighbors"] = int(min(num_items,
                                                      max(params["reorder_k"], 2 * want)))
        kwargs["leaves_to_search"] = int(params["num_leaves_to_search"])
    rows, scores = searcher.search_batched(q, **kwargs)
    rows = np.asarray(rows, dtype=np.int64)
    scores = np.asarray(scores, dtype=np.float32)
    bad = ~np.isfinite(scores) | (rows < 0) | (rows >= num_items)
    rows[bad], scores[bad] = -1, -np.inf
    order = np.lexsort((np.where(bad, num_items, rows), -scores), axis=1)
    rows, scores = np.take_along_axis(rows, order, 1), np.take_along_axis(scores, order, 1)
    if want < k:
        pad = k - want
        rows = np.concatenate([rows, np.full((rows.shape[0], pad), -1, np.int64)], axis=1)
        scores = np.concatenate([scores, np.full((rows.shape[0], pad), -np.inf, np.float32)], 1)
    return rows, scores

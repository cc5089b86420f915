"""The exact maximum-inner-product top-K in TensorFlow (issue 31, item 3): ``eval.exact_engine:
tensorflow``.

:func:`top_k_dot_tf` returns what :func:`micrec_tf.search.top_k_dot` returns (same indices,
same padding, same tie rule: higher score first, then lower item index) but scores each block
of queries with ``tf.matmul``, sets the excluded entries to ``-inf`` with one
``tf.tensor_scatter_nd_update`` and ranks with ``tf.math.top_k``, whose documentation says "If
two elements are equal, the lower-index element appears first" (tests/test_tf_top_k.py checks
it against a brute-force sort). The numpy engine spends its time in several passes over each
``[B, V]`` block (the working copy, the exclusions, the wide-row prefilter, argpartition); here
the block is written once by the matmul and read once by ``top_k``.

Kept out of :mod:`micrec_tf.search`, which stays TensorFlow-free (the Beam job's driver and the
numpy-only evaluation import it); :mod:`micrec_tf.evaluation.metrics` imports this module only
when the engine is asked for.

Scores of float32 (or float16) inputs are float32 and of float64 inputs float64, as in
:func:`micrec_tf.search.top_k_dot`; the two engines may order two entries differently only where
BLAS and Eigen round a dot product differently (near-equal scores), never on exact ties.
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from micrec_tf import search

__all__ = ["top_k_dot_tf"]


@tf.function(reduce_retracing=True)
def _block_top_k(queries, items_t, rows, cols, k):
    """Top-``k`` of ``queries [B, D] @ items_t [D, C]`` with the entries ``(rows[i], cols[i])``
    set to ``-inf``. Returns ``values [B, k]`` (descending) and ``indices int32 [B, k]``."""
    scores = tf.matmul(queries, items_t)
    upd = tf.stack([rows, cols], axis=1)
    neg_inf = tf.fill(tf.shape(rows), tf.constant(-np.inf, scores.dtype))
    scores = tf.tensor_scatter_nd_update(scores, upd, neg_inf)
    return tf.math.top_k(scores, k, sorted=True)


def _overflow_possible(q: np.ndarray, v: np.ndarray, dtype) -> bool:
    """True unless every score is surely finite: non-finite inputs, or a bound on ``|q . v|``
    (D times the largest absolute entries, with a factor 4 for rounding) beyond ``dtype``'s
    largest finite value. Such inputs go to :func:`micrec_tf.search.top_k_dot`, which maps
    ``+inf`` to the largest finite value and raises on NaN."""
    if q.size == 0 or v.size == 0:
        return False
    with np.errstate(over="ignore", invalid="ignore"):
        qmax = float(np.max(np.abs(q)))
        vmax = float(np.max(np.abs(v)))
        if not (np.isfinite(qmax) and np.isfinite(vmax)):
            return True
        bound = 4.0 * q.shape[1] * qmax * vmax
    return not bound < float(np.finfo(dtype).max)


def top_k_dot_tf(queries, vectors, k: int, exclude=None, valid_mask: np.ndarray | None = None,
                 batch_size: int = 1024, skip_columns=0):
    """Exact top-``k`` of ``queries [U, D] @ vectors [V, D].T`` per query, in TensorFlow.

    Args:
      queries: [U, D] float query (user) vectors.
      vectors: [V, D] float item vectors.
      k: items per query (positive integer; may exceed V).
      exclude: per-query item sets never retrieved, in any format
        :func:`micrec_tf.search.as_exclusion` takes; ids outside ``0 .. V-1`` are ignored.
      valid_mask: optional bool [V]; False columns are never retrieved.
      batch_size: queries per block, fewer where ``batch_size * V`` would exceed
        :data:`micrec_tf.search.SCORE_BLOCK_ENTRIES` (as the numpy engine).
      skip_columns: column(s) never retrieved; default 0, the padding item (the evaluation's
        :func:`micrec_tf.evaluation.metrics.top_k_items`); None = none.

    Returns: ``indices int64 [U, k]`` (rows of ``vectors``) and ``scores [U, k]`` (float32, or
    float64 if either input is float64), higher score first, equal scores by lower index, padded
    with -1 / -inf where fewer than ``k`` items are retrievable: what
    ``micrec_tf.search.top_k_dot(queries, vectors, k, exclude, valid_mask, batch_size,
    skip_columns)`` returns.
    """
    queries, vectors = np.asarray(queries), np.asarray(vectors)
    if queries.ndim != 2 or vectors.ndim != 2 or queries.shape[1] != vectors.shape[1]:
        raise ValueError(f"need queries [B, D] and vectors [V, D]. Received: shapes "
                         f"{queries.shape} and {vectors.shape}")
    k = search._check_k(k)
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be a positive integer. Received: {batch_size!r}")
    dt = search._score_dtype(queries, vectors)
    num_rows, v = queries.shape[0], vectors.shape[0]
    q = queries.astype(dt, copy=False)
    if _overflow_possible(q, vectors, dt):
        return search.top_k_dot(queries, vectors, k, exclude, valid_mask, batch_size,
                                skip_columns)
    excl = search.as_exclusion(exclude, num_rows)
    # Narrow to the retrievable columns (ascending, so the lower position is the lower index).
    columns = None
    if valid_mask is not None or skip_columns is not None:
        valid = (np.ones(v, bool) if valid_mask is None
                 else np.array(valid_mask, dtype=bool, copy=True).reshape(-1))
        if valid.size != v:
            raise ValueError(f"valid_mask must have one entry per vector ({v}). Received: "
                             f"{valid.size}")
        columns = search._retrievable_columns(valid, skip_columns)
        vectors = vectors[columns]
    c = vectors.shape[0]
    kk = min(k, c)
    to_narrow = (search._narrow_map(columns) if columns is not None and excl is not None
                 else None)
    block = max(1, min(int(batch_size), search.SCORE_BLOCK_ENTRIES // max(1, c)))
    out_idx = np.full((num_rows, k), -1, np.int64)
    out_scores = np.full((num_rows, k), -np.inf, dt)
    if kk == 0 or num_rows == 0:
        return out_idx, out_scores
    items_t = tf.constant(np.ascontiguousarray(vectors.astype(dt, copy=False).T))
    no_rows = np.zeros(0, np.int32)
    for start in range(0, num_rows, block):
        stop = min(num_rows, start + block)
        rows, cols = no_rows, no_rows
        if excl is not None:
            rows, cols = search.excluded_cells(excl, start, stop, v, to_narrow)
            rows, cols = rows.astype(np.int32), cols.astype(np.int32)
        vals, idx = _block_top_k(tf.constant(q[start:stop]), items_t, tf.constant(rows),
                                 tf.constant(cols), tf.constant(kk, tf.int32))
        vals, idx = vals.numpy(), idx.numpy().astype(np.int64)
        if columns is not None:
            idx = columns[idx]
        finite = vals > -np.inf
        out_idx[start:stop, :kk] = np.where(finite, idx, -1)
        out_scores[start:stop, :kk] = vals  # -inf where not retrievable
    return out_idx, out_scores

"""Retrieval metrics of the paper: HIT@N (5.4.1) and item coverage@N (5.6.2), exact or via ScaNN.

Conventions (shared by every model and baseline so that the numbers are comparable):

* Every test click is one query ("user" row): its user vector is computed from the history before
  that click. Candidates are the whole item corpus ``1 .. V-1``; row 0 is the OOV/padding item and
  is never retrieved.
* Ranking order is deterministic: higher score first, then (for equal scores) a larger
  ``secondary`` key where one is given (baselines use popularity), then the smaller item index.
* When fewer than ``k`` items can be retrieved for a query (tiny catalogue, many exclusions) the
  row is padded with index ``-1`` and score ``-inf``; ``-1`` never matches a target and is never
  counted by coverage.
* HIT@N = (test clicks whose target item is among the query's top-N) / (all test clicks). A target
  of 0 (OOV: an item unseen in training, which no model can retrieve) counts as a **miss**; such
  clicks stay in the denominator so that models are compared on the same set of clicks.
* Coverage@N = (distinct catalogue items in the union of all queries' top-N) / (V - 1).
* "Exclude clicked" removes, per query, a given set of items (e.g. the user's earlier clicks) from
  the ranking. If the target itself is excluded it is a miss.

Exclusion sets may be given as a list of index arrays (one per query), a ``(indptr, indices)``
pair or anything with ``indptr``/``indices`` attributes (CSR, e.g. ``scipy.sparse.csr_matrix``), or
an object with a ``rows_cols(start, stop) -> (rows, cols)`` method (rows relative to ``start``),
which lets big exclusion sets be produced lazily per batch.
"""
from __future__ import annotations

from typing import Iterable, Mapping

import numpy as np

from micrec_tf import search

__all__ = [
    "top_k_items", "top_k_from_scores", "hit_at_n", "item_coverage", "long_tail_items",
    "hit_at_n_on_slice", "summarize_topk", "evaluate_retrieval", "top_k_by_score_fn",
    "top_k_items_scann",
]

# Exact top-K, the ScaNN searcher and the exclusion sets live in micrec_tf.search (one
# implementation for evaluation, the export's index and the title-neighbour job); the functions
# below only add the evaluation's conventions (column 0 is padding, valid masks, DB ids).


# ----------------------------------------------------------------------------- top-k selection
def top_k_from_scores(scores: np.ndarray, k: int, secondary: np.ndarray | None = None):
    """Top-k of each row of a score matrix (``-inf`` = not retrievable) under the ranking order.

    Column 0 (padding) is ignored whatever its score. Returns ``indices int64 [B, k]`` and
    ``scores [B, k]`` (padded with -1 / -inf where a row has fewer than k finite scores).
    """
    return search.top_k(scores, k, secondary, skip_columns=0)


def top_k_by_score_fn(score_fn, num_rows: int, k: int, exclude=None,
                      valid_mask: np.ndarray | None = None, batch_size: int = 1024,
                      secondary: np.ndarray | None = None):
    """Batched exact top-k where ``score_fn(start, stop)`` returns the [stop-start, V] scores;
    column 0 (padding) is never retrieved (:func:`micrec_tf.search.top_k_by_score_fn`)."""
    return search.top_k_by_score_fn(score_fn, num_rows, k, exclude, valid_mask, batch_size,
                                    secondary, skip_columns=0)


def top_k_items(user_vectors: np.ndarray, item_vectors: np.ndarray, k: int, exclude=None,
                valid_mask: np.ndarray | None = None, batch_size: int = 1024,
                engine: str = "numpy"):
    """Exact maximum-inner-product top-k by batched matrix products.

    Args:
      user_vectors: [U, D] one query vector per test click.
      item_vectors: [V, D] item embeddings; row 0 is padding and never retrieved.
      k: number of items per query.
      exclude: optional per-query item sets removed from the ranking (see module doc).
      valid_mask: optional bool [V]; items with False are never retrieved.
      batch_size: queries scored per matrix product.
      engine: ``numpy`` (default, :func:`micrec_tf.search.top_k_dot`, the behaviour before the
        argument) or ``tensorflow`` (:func:`micrec_tf.evaluation.tf_top_k.top_k_dot_tf`, the same
        lists; ``eval.exact_engine``).

    Returns: ``indices int64 [U, k]`` and ``scores [U, k]``, higher score first, ties broken by the
    smaller item index, padded with -1 / -inf when fewer than k items are retrievable.
    """
    if engine == "tensorflow":  # imported here: this module stays TensorFlow-free
        from micrec_tf.evaluation.tf_top_k import top_k_dot_tf

        return top_k_dot_tf(user_vectors, item_vectors, k, exclude, valid_mask, batch_size,
                            skip_columns=0)
    if engine != "numpy":
        raise ValueError(f"engine must be 'numpy' or 'tensorflow'. Received: {engine!r}")
    return search.top_k_dot(user_vectors, item_vectors, k, exclude, valid_mask, batch_size,
                            skip_columns=0)


def top_k_items_scann(user_vectors: np.ndarray, item_vectors: np.ndarray, k: int, exclude=None,
                      valid_mask: np.ndarray | None = None, batch_size: int = 1024,
                      num_leaves: int | None = None, leaves_to_search: int | None = None,
                      brute_force_below: int = 2000):
    """Approximate top-k with ScaNN (tree + asymmetric hashing), re-ranked by exact scores.

    Each query asks ScaNN for ``k + |its exclusion set|`` candidates (maximum over the batch),
    drops excluded items, rescores the rest exactly and applies the same ordering and padding as
    :func:`top_k_items` (:func:`micrec_tf.search.rescore_candidates`); so results differ from the
    exact path only by the candidates ScaNN missed. Below ``brute_force_below`` retrievable items
    the searcher scores every item.
    """
    user_vectors = np.asarray(user_vectors, dtype=np.float32)
    item_vectors = np.asarray(item_vectors, dtype=np.float32)
    v = item_vectors.shape[0]
    valid = np.ones(v, dtype=bool) if valid_mask is None else np.asarray(valid_mask, bool).copy()
    valid[0] = False
    db_ids = np.nonzero(valid)[0]
    n = db_ids.size
    excl = search.as_exclusion(exclude, user_vectors.shape[0])
    num_rows = user_vectors.shape[0]
    if n == 0:
        return (np.full((num_rows, k), -1, np.int64), np.full((num_rows, k), -np.inf, np.float32))
    params = {"mode": "brute_force", "num_neighbors": min(k, n)}
    if n >= brute_force_below:
        leaves = num_leaves or int(max(2, min(n // 10, round(np.sqrt(n)))))
        params.update(mode="tree_ah", num_leaves=leaves,
                      num_leaves_to_search=leaves_to_search or max(1, int(np.ceil(leaves * 0.3))),
                      training_sample_size=min(n, 250000), dimensions_per_block=2,
                      anisotropic_quantization_threshold=0.2, reorder_k=min(n, max(4 * k, 200)))
    searcher = search.build_scann(item_vectors[db_ids], params)
    all_idx, all_scores = [], []
    for start in range(0, num_rows, batch_size):
        stop = min(num_rows, start + batch_size)
        if excl is not None:
            rows, cols = excl.rows_cols(start, stop)
            extra = int(np.bincount(rows, minlength=stop - start).max()) if rows.size else 0
        else:
            rows = cols = np.zeros(0, np.int64)
            extra = 0
        nn, _ = search.search_scann(searcher, params, user_vectors[start:stop],
                                    int(min(n, k + extra)), n)
        cand = np.where(nn >= 0, db_ids[np.clip(nn, 0, n - 1)], -1)
        idx, sc = search.rescore_candidates(user_vectors[start:stop], item_vectors, cand, k,
                                            rows, cols)
        all_idx.append(idx)
        all_scores.append(sc)
    return np.concatenate(all_idx), np.concatenate(all_scores)


# ----------------------------------------------------------------------------- metrics
def _check_ns(topk_indices: np.ndarray, ns: Iterable[int]) -> list:
    ns = [int(n) for n in ns]
    width = topk_indices.shape[1]
    for n in ns:
        if n <= 0 or n > width:
            raise ValueError(f"N={n} is outside 1..{width} (the number of items retrieved)")
    return ns


def hit_at_n(topk_indices: np.ndarray, target_items: np.ndarray, ns: Iterable[int]) -> dict:
    """{N: fraction of test clicks whose target is within the first N retrieved items}.

    Targets equal to 0 (OOV, unseen in training) are counted as misses and kept in the
    denominator. Returns NaN for every N when there are no test clicks.

    Kept instead of ``tf.keras.metrics.TopKCategoricalAccuracy`` / TFRS ``FactorizedTopK``: those
    score a batch's own candidates, with no exclusion sets, no OOV-as-miss denominator and no
    coverage@N or long-tail slices over the whole catalogue.
    """
    topk_indices = np.asarray(topk_indices)
    targets = np.asarray(target_items).reshape(-1)
    if topk_indices.shape[0] != targets.shape[0]:
        raise ValueError(f"{topk_indices.shape[0]} rankings for {targets.shape[0]} targets")
    ns = _check_ns(topk_indices, ns)
    if targets.size == 0:
        return {n: float("nan") for n in ns}
    match = (topk_indices == targets[:, None]) & (targets[:, None] > 0)
    # position of the hit (or width if none): a hit at rank p counts for every N > p
    any_hit = match.any(axis=1)
    first = np.where(any_hit, match.argmax(axis=1), topk_indices.shape[1])
    return {n: float(np.mean(first < n)) for n in ns}


def item_coverage(topk_indices: np.ndarray, num_items: int, ns: Iterable[int]) -> dict:
    """{N: distinct items 1..V-1 in the union of all queries' top-N / (V - 1)};
    V = ``num_items``."""
    topk_indices = np.asarray(topk_indices)
    ns = _check_ns(topk_indices, ns)
    if num_items <= 1:
        raise ValueError(f"num_items must count the padding row too (> 1), got {num_items}")
    out = {}
    for n in ns:
        ids = topk_indices[:, :n].ravel()
        ids = ids[(ids > 0) & (ids < num_items)]
        out[n] = float(np.unique(ids).size / (num_items - 1))
    return out


def long_tail_items(train_counts: np.ndarray, fraction: float = 0.8) -> np.ndarray:
    """Bool [V]: the ``fraction`` least-clicked catalogue items (items 1..V-1) in training.

    Items are ranked by training click count, most clicked first, equal counts by smaller index;
    the first ``(V-1) - round(fraction * (V-1))`` are the head, the rest are long-tail. Index 0
    (OOV/padding) is never long-tail, so OOV test clicks fall outside the long-tail slice.
    """
    counts = np.asarray(train_counts).reshape(-1)
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    v = counts.size
    n_cat = v - 1
    n_tail = int(round(fraction * n_cat))
    ids = np.arange(1, v)
    order = ids[np.lexsort([ids, -counts[1:].astype(np.float64)])]
    mask = np.zeros(v, dtype=bool)
    mask[order[n_cat - n_tail:]] = True
    return mask


def hit_at_n_on_slice(topk_indices: np.ndarray, target_items: np.ndarray, ns: Iterable[int],
                      click_mask: np.ndarray) -> dict:
    """HIT@N restricted to the test clicks where ``click_mask`` (bool [U]) is True.

    For the long-tail slice: ``click_mask = long_tail_items(train_counts)[targets]``.
    """
    click_mask = np.asarray(click_mask, dtype=bool).reshape(-1)
    targets = np.asarray(target_items).reshape(-1)
    if click_mask.shape != targets.shape:
        raise ValueError(f"click_mask has shape {click_mask.shape}, targets {targets.shape}")
    return hit_at_n(np.asarray(topk_indices)[click_mask], targets[click_mask], ns)


def summarize_topk(topk_indices: np.ndarray, targets: np.ndarray, num_items: int,
                   ns: Iterable[int], coverage_ns: Iterable[int],
                   slices: Mapping[str, np.ndarray] | None = None) -> dict:
    """Flat metric dict: ``hit@N``, ``coverage@N``, ``num_clicks``, ``num_oov_clicks`` and, per
    named click slice (bool [U]), ``<name>/hit@N`` and ``<name>/num_clicks``."""
    targets = np.asarray(targets).reshape(-1)
    out = {"num_clicks": int(targets.size), "num_oov_clicks": int(np.sum(targets == 0))}
    for n, val in hit_at_n(topk_indices, targets, ns).items():
        out[f"hit@{n}"] = val
    for n, val in item_coverage(topk_indices, num_items, coverage_ns).items():
        out[f"coverage@{n}"] = val
    for name, mask in (slices or {}).items():
        mask = np.asarray(mask, dtype=bool).reshape(-1)
        out[f"{name}/num_clicks"] = int(mask.sum())
        for n, val in hit_at_n_on_slice(topk_indices, targets, ns, mask).items():
            out[f"{name}/hit@{n}"] = val
    return out


def evaluate_retrieval(user_vectors: np.ndarray, item_vectors: np.ndarray, targets: np.ndarray,
                       ns: Iterable[int] = (50, 100, 200, 500),
                       coverage_ns: Iterable[int] = (50, 500), exclude=None,
                       use_scann: bool = False, valid_mask: np.ndarray | None = None,
                       batch_size: int = 1024, slices: Mapping[str, np.ndarray] | None = None,
                       return_topk: bool = False, exact_engine: str = "numpy") -> dict:
    """HIT@N and coverage@N of a two-tower model on the test clicks (see :func:`summarize_topk`).

    ``use_scann`` retrieves with ScaNN (for large catalogues) instead of exact brute force. With
    ``return_topk`` the dict also holds ``"topk"``: the int64 [U, max N] retrieved indices.
    ``exact_engine`` (``eval.exact_engine``): :func:`top_k_items`'s ``engine`` for the exact
    path (default ``numpy``, the behaviour before the argument); ScaNN ignores it.
    """
    ns, coverage_ns = list(ns), list(coverage_ns)
    k = max(ns + coverage_ns)
    if use_scann:
        idx, _ = top_k_items_scann(user_vectors, item_vectors, k, exclude=exclude,
                                   valid_mask=valid_mask, batch_size=batch_size)
    else:
        idx, _ = top_k_items(user_vectors, item_vectors, k, exclude=exclude,
                             valid_mask=valid_mask, batch_size=batch_size, engine=exact_engine)
    out = summarize_topk(idx, targets, np.asarray(item_vectors).shape[0], ns, coverage_ns, slices)
    if return_topk:
        out["topk"] = idx
    return out

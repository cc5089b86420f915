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

from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

__all__ = [
    "top_k_items", "top_k_from_scores", "hit_at_n", "item_coverage", "long_tail_items",
    "hit_at_n_on_slice", "summarize_topk", "evaluate_retrieval", "CSRExclusion", "as_exclusion",
    "top_k_by_score_fn", "top_k_items_scann",
]

ScoreFn = Callable[[int, int], np.ndarray]


# ----------------------------------------------------------------------------- exclusion sets
class CSRExclusion:
    """Per-query excluded item indices in CSR form: query ``i`` excludes ``indices[indptr[i]:indptr[i+1]]``."""

    def __init__(self, indptr, indices):
        self.indptr = np.asarray(indptr, dtype=np.int64)
        self.indices = np.asarray(indices, dtype=np.int64)
        if self.indptr.ndim != 1 or self.indptr.size == 0 or self.indptr[0] != 0:
            raise ValueError("indptr must be a 1-D array starting at 0")
        if np.any(np.diff(self.indptr) < 0) or self.indptr[-1] != self.indices.size:
            raise ValueError("indptr must be non-decreasing and end at len(indices)")

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
    """Normalises the accepted exclusion formats (see module doc) into an object with ``rows_cols``."""
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


# ----------------------------------------------------------------------------- top-k selection
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
    """Boolean [B, V] mask of the top-r[b] finite entries of each row under the ranking order.

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
    tied = (s == kth[:, None]) & finite[rows] if not all_rows else (s == kth[:, None]) & finite
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


def top_k_from_scores(scores: np.ndarray, k: int, secondary: np.ndarray | None = None):
    """Top-k of each row of a score matrix (``-inf`` = not retrievable) under the ranking order.

    Column 0 (padding) is ignored whatever its score. Returns ``indices int64 [B, k]`` and
    ``scores [B, k]`` (padded with -1 / -inf where a row has fewer than k finite scores).
    """
    scores = np.asarray(scores)
    low = scores.dtype in (np.float32, np.float16)
    scores = np.array(scores, dtype=np.float32 if low else np.float64, copy=True)
    if scores.ndim != 2:
        raise ValueError(f"scores must be 2-D, got shape {scores.shape}")
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN")
    b, v = scores.shape
    scores[:, 0] = -np.inf
    scores[scores == np.inf] = np.finfo(scores.dtype).max
    mask = _select_mask(scores, np.full(b, k, dtype=np.int64), secondary)
    rr, cc = np.nonzero(mask)  # row-major: item indices ascending within each row
    counts = np.bincount(rr, minlength=b)
    if b and np.all(counts == k):
        # Fast path, every row full: stable sorts keep ascending index among equal keys.
        cc = cc.reshape(b, k)
        vals = np.take_along_axis(scores, cc, axis=1)
        if secondary is None:
            order = np.argsort(-vals, axis=1, kind="stable")
        else:
            order = np.lexsort([-secondary[cc].astype(np.float64), -vals], axis=1)
        return (np.take_along_axis(cc, order, axis=1).astype(np.int64),
                np.take_along_axis(vals, order, axis=1))
    vals = scores[rr, cc]
    keys = [cc, -vals, rr] if secondary is None else [cc, -secondary[cc].astype(np.float64), -vals, rr]
    order = np.lexsort(keys)
    rr, cc, vals = rr[order], cc[order], vals[order]
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    pos = np.arange(rr.size) - starts[rr]
    idx = np.full((b, k), -1, dtype=np.int64)
    out_scores = np.full((b, k), -np.inf, dtype=scores.dtype)
    idx[rr, pos] = cc
    out_scores[rr, pos] = vals
    return idx, out_scores


def _apply_masks(scores, start, stop, excl, valid_mask):
    scores[:, 0] = -np.inf
    if valid_mask is not None:
        scores[:, ~valid_mask] = -np.inf
    if excl is not None:
        rows, cols = excl.rows_cols(start, stop)
        keep = (cols >= 0) & (cols < scores.shape[1])
        scores[rows[keep], cols[keep]] = -np.inf
    return scores


def top_k_by_score_fn(score_fn: ScoreFn, num_rows: int, k: int, exclude=None,
                      valid_mask: np.ndarray | None = None, batch_size: int = 1024,
                      secondary: np.ndarray | None = None):
    """Batched exact top-k where ``score_fn(start, stop)`` returns the [stop-start, V] scores."""
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    excl = as_exclusion(exclude, num_rows)
    if valid_mask is not None:
        valid_mask = np.asarray(valid_mask, dtype=bool)
    all_idx, all_scores = [], []
    for start in range(0, num_rows, batch_size):
        stop = min(num_rows, start + batch_size)
        scores = np.asarray(score_fn(start, stop))
        low = scores.dtype in (np.float32, np.float16)
        scores = np.array(scores, dtype=np.float32 if low else np.float64, copy=True)
        scores = _apply_masks(scores, start, stop, excl, valid_mask)
        idx, sc = top_k_from_scores(scores, k, secondary)
        all_idx.append(idx)
        all_scores.append(sc)
    if not all_idx:
        return np.zeros((0, k), np.int64), np.zeros((0, k), np.float32)
    return np.concatenate(all_idx), np.concatenate(all_scores)


def _score_dtype(user_vectors, item_vectors):
    dt = np.result_type(user_vectors.dtype, item_vectors.dtype, np.float32)
    return np.float64 if dt == np.float64 else np.float32


def top_k_items(user_vectors: np.ndarray, item_vectors: np.ndarray, k: int, exclude=None,
                valid_mask: np.ndarray | None = None, batch_size: int = 1024):
    """Exact maximum-inner-product top-k by batched matrix products.

    Args:
      user_vectors: [U, D] one query vector per test click.
      item_vectors: [V, D] item embeddings; row 0 is padding and never retrieved.
      k: number of items per query.
      exclude: optional per-query item sets removed from the ranking (see module doc).
      valid_mask: optional bool [V]; items with False are never retrieved.
      batch_size: queries scored per matrix product.

    Returns: ``indices int64 [U, k]`` and ``scores [U, k]``, higher score first, ties broken by the
    smaller item index, padded with -1 / -inf when fewer than k items are retrievable.
    """
    user_vectors = np.asarray(user_vectors)
    item_vectors = np.asarray(item_vectors)
    if user_vectors.ndim != 2 or item_vectors.ndim != 2 or user_vectors.shape[1] != item_vectors.shape[1]:
        raise ValueError(f"need user_vectors [U, D] and item_vectors [V, D], got "
                         f"{user_vectors.shape} and {item_vectors.shape}")
    dt = _score_dtype(user_vectors, item_vectors)
    u = user_vectors.astype(dt, copy=False)
    items_t = np.ascontiguousarray(item_vectors.astype(dt, copy=False).T)
    return top_k_by_score_fn(lambda a, b: u[a:b] @ items_t, u.shape[0], k, exclude,
                             valid_mask, batch_size)


def top_k_items_scann(user_vectors: np.ndarray, item_vectors: np.ndarray, k: int, exclude=None,
                      valid_mask: np.ndarray | None = None, batch_size: int = 1024,
                      num_leaves: int | None = None, leaves_to_search: int | None = None,
                      brute_force_below: int = 2000, seed: int = 0):
    """Approximate top-k with ScaNN (tree + asymmetric hashing), re-ranked by exact scores.

    Each query asks ScaNN for ``k + |its exclusion set|`` candidates (maximum over the batch),
    drops excluded items, rescores the rest exactly and applies the same ordering and padding as
    :func:`top_k_items`; so results differ from the exact path only by the candidates ScaNN missed.
    """
    from scann import scann_ops_pybind  # deferred: importing ScaNN costs seconds

    user_vectors = np.asarray(user_vectors, dtype=np.float32)
    item_vectors = np.asarray(item_vectors, dtype=np.float32)
    v = item_vectors.shape[0]
    valid = np.ones(v, dtype=bool) if valid_mask is None else np.asarray(valid_mask, bool).copy()
    valid[0] = False
    db_ids = np.nonzero(valid)[0]
    n = db_ids.size
    excl = as_exclusion(exclude, user_vectors.shape[0])
    num_rows = user_vectors.shape[0]
    if n == 0:
        return (np.full((num_rows, k), -1, np.int64), np.full((num_rows, k), -np.inf, np.float32))
    db = np.ascontiguousarray(item_vectors[db_ids])
    builder = scann_ops_pybind.builder(db, min(k, n), "dot_product")
    if n < brute_force_below:
        searcher = builder.score_brute_force().build()
    else:
        leaves = num_leaves or int(max(2, min(n // 10, round(np.sqrt(n)))))
        search = leaves_to_search or max(1, int(np.ceil(leaves * 0.3)))
        np.random.seed(seed)
        searcher = (builder.tree(num_leaves=leaves, num_leaves_to_search=search,
                                 training_sample_size=min(n, 250000))
                    .score_ah(2, anisotropic_quantization_threshold=0.2)
                    .reorder(min(n, max(4 * k, 200))).build())
    all_idx, all_scores = [], []
    for start in range(0, num_rows, batch_size):
        stop = min(num_rows, start + batch_size)
        b = stop - start
        if excl is not None:
            rows, cols = excl.rows_cols(start, stop)
            extra = int(np.bincount(rows, minlength=b).max()) if rows.size else 0
        else:
            rows = cols = np.zeros(0, np.int64)
            extra = 0
        want = int(min(n, k + extra))
        nn, dist = searcher.search_batched(user_vectors[start:stop], final_num_neighbors=want,
                                           pre_reorder_num_neighbors=min(n, max(2 * want, 200)))
        nn = np.asarray(nn, dtype=np.int64)
        # ScaNN pads missing neighbours with id 0 and a NaN distance.
        got = np.isfinite(np.asarray(dist)) & (nn >= 0) & (nn < n)
        cand = np.where(got, db_ids[np.clip(nn, 0, n - 1)], 0)
        # Exact rescoring of the candidates; padding and excluded items become -inf.
        ex_scores = np.einsum("bd,bkd->bk", user_vectors[start:stop], item_vectors[cand])
        ex_scores[~got] = -np.inf
        if rows.size:
            keep = (cols >= 0) & (cols < v)
            codes = rows[keep] * v + cols[keep]
            cand_codes = np.arange(b, dtype=np.int64)[:, None] * v + cand
            ex_scores[np.isin(cand_codes, codes)] = -np.inf
        ex_scores[cand == 0] = -np.inf
        # Order within candidates by (score desc, item index asc).
        order = np.lexsort([cand, -ex_scores.astype(np.float64)], axis=1)
        cand = np.take_along_axis(cand, order, axis=1)[:, :k]
        ex_scores = np.take_along_axis(ex_scores, order, axis=1)[:, :k]
        cand = np.where(np.isfinite(ex_scores), cand, -1)
        if cand.shape[1] < k:
            pad = k - cand.shape[1]
            cand = np.pad(cand, ((0, 0), (0, pad)), constant_values=-1)
            ex_scores = np.pad(ex_scores, ((0, 0), (0, pad)), constant_values=-np.inf)
        all_idx.append(cand)
        all_scores.append(ex_scores.astype(np.float32))
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
    """{N: distinct items 1..V-1 in the union of all queries' top-N / (V - 1)}; V = ``num_items``."""
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
                       return_topk: bool = False) -> dict:
    """HIT@N and coverage@N of a two-tower model on the test clicks (see :func:`summarize_topk`).

    ``use_scann`` retrieves with ScaNN (for large catalogues) instead of exact brute force. With
    ``return_topk`` the dict also holds ``"topk"``: the int64 [U, max N] retrieved indices.
    """
    ns, coverage_ns = list(ns), list(coverage_ns)
    k = max(ns + coverage_ns)
    fn = top_k_items_scann if use_scann else top_k_items
    idx, _ = fn(user_vectors, item_vectors, k, exclude=exclude, valid_mask=valid_mask,
                batch_size=batch_size)
    out = summarize_topk(idx, targets, np.asarray(item_vectors).shape[0], ns, coverage_ns, slices)
    if return_topk:
        out["topk"] = idx
    return out

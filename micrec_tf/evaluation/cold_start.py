"""The metrics of the item-cold-start protocol (issue 28, ``preprocess.split: item_cold_start``).

Per evaluation click (no exclusion set in this protocol), three rankings:

* **cold**: a click whose target item is in the evaluated cold bucket (``"valid"`` for the
  validation clicks, ``"test"`` for the test clicks; :func:`micrec_tf.data.cold_start.cold_bucket`
  of the item's raw id) is ranked among **all** catalogue items of that bucket, clicked or not.
  Warm items and the other bucket's items are not candidates.
* **warm**: a click on a warm item (neither cold bucket) is ranked among the warm items.
* **all**: every evaluation click (cold and warm) is ranked over the whole catalogue ``1 .. V-1``.

Item 0 (padding / OOV) is never a candidate; a click whose target is 0 counts as a warm click and
a miss (kept in the denominators, as in :mod:`micrec_tf.evaluation.metrics`).

For each ranking: ``hit@N`` (N in ``ns``, default 20, 50, 500), ``ndcg@20`` (one relevant item:
``1 / log2(rank + 1)`` when its 1-based rank is <= 20, else 0; averaged over the clicks),
``coverage@N`` (distinct retrieved items in the union of the slice's top-N over the size of its
candidate set), ``num_clicks`` and ``num_candidates``. The cold slice is also split by the
user's history: ``cold_empty_history/*`` (history length feature 0) and ``cold_with_history/*``
(hit@N, ndcg@20, num_clicks).

The candidate sets need every catalogue item to have an index: refused (:class:`ConfigError`)
unless ``preprocess.item_vocabulary: catalogue``. The raw ids are the lines of
``vocab/item_id.txt`` (index k + 1 = line k).
"""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

import numpy as np

from micrec_tf.config import ConfigError
from micrec_tf.data.cold_start import COLD_TEST, COLD_VALID, cold_bucket
from micrec_tf.evaluation import metrics

__all__ = ["COLD_START_NS", "NDCG_N", "SLICES", "check_catalogue_vocabulary", "cold_rows",
           "item_buckets",
           "ndcg_at_n", "cold_start_metrics",
           "cold_start_metrics_from_scores", "empty_history_composition"]

COLD_START_NS = (20, 50, 500)
SLICES = ("cold", "warm", "all")
NDCG_N = 20
# Codes of :func:`item_buckets`.
_WARM, _VALID, _TEST, _PAD = 0, 1, 2, -1


def _check_slices(slices) -> set:
    chosen = set(slices)
    if not chosen or chosen - set(SLICES):
        raise ValueError(f"slices must be a non-empty subset of {list(SLICES)}. "
                         f"Received: slices={list(slices)!r}")
    return chosen


def cold_rows(targets: np.ndarray, raw_item_ids: Sequence[str], split: str) -> np.ndarray:
    """bool [U]: the clicks of ``targets`` whose item is in ``split``'s cold bucket."""
    if split not in (COLD_VALID, COLD_TEST):
        raise ValueError(f"split must be 'valid' or 'test'. Received: split={split!r}")
    buckets = item_buckets(raw_item_ids)
    targets = np.asarray(targets, np.int64).reshape(-1)
    own = _VALID if split == COLD_VALID else _TEST
    return (targets > 0) & (buckets[np.clip(targets, 0, buckets.size - 1)] == own)


def check_catalogue_vocabulary(item_vocabulary: str) -> None:
    """Refuse the cold-start metrics unless every catalogue item has an index (one-line error)."""
    if item_vocabulary != "catalogue":
        raise ConfigError(
            f"preprocess.item_vocabulary: {item_vocabulary!r}: the item_cold_start metrics rank "
            f"cold clicks among all cold catalogue items; set preprocess.item_vocabulary=catalogue")


def item_buckets(raw_item_ids: Sequence[str]) -> np.ndarray:
    """int8 [V] bucket code per item index: -1 for padding (index 0), 0 warm, 1 cold-valid,
    2 cold-test; ``raw_item_ids`` are the lines of ``vocab/item_id.txt`` (V - 1 of them)."""
    codes = {None: _WARM, COLD_VALID: _VALID, COLD_TEST: _TEST}
    out = np.empty(len(raw_item_ids) + 1, np.int8)
    out[0] = _PAD
    for k, raw in enumerate(raw_item_ids):
        out[k + 1] = codes[cold_bucket(raw)]
    return out


def ndcg_at_n(topk_indices: np.ndarray, targets: np.ndarray, n: int = NDCG_N) -> float:
    """Mean over clicks of ``1 / log2(rank + 1)`` if the target's 1-based rank <= n, else 0
    (one relevant item per click); a target 0 scores 0; NaN without clicks.

    ``topk_indices``: int [U, K >= n]; ``targets``: int [U].
    """
    topk_indices = np.asarray(topk_indices)[:, :n]
    targets = np.asarray(targets).reshape(-1)
    if topk_indices.shape[1] < n:
        raise ValueError(f"n={n} is more than the {topk_indices.shape[1]} items retrieved")
    if targets.size == 0:
        return float("nan")
    match = (topk_indices == targets[:, None]) & (targets[:, None] > 0)
    hit = match.any(axis=1)
    rank = match.argmax(axis=1) + 1
    return float(np.mean(np.where(hit, 1.0 / np.log2(rank + 1.0), 0.0)))


def _ranking(idx, targets, candidates, ns) -> dict:
    """The metrics of one slice from its top-k rankings ``idx`` int [U, k >= max(ns, 20)]."""
    out = {"num_clicks": int(targets.size), "num_candidates": int(candidates[1:].sum())}
    for n, val in metrics.hit_at_n(idx, targets, ns).items():
        out[f"hit@{n}"] = val
    out[f"ndcg@{NDCG_N}"] = ndcg_at_n(idx, targets, NDCG_N)
    n_cand = out["num_candidates"]
    for n in ns:
        ids = idx[:, :n].ravel()
        ids = ids[ids > 0]
        out[f"coverage@{n}"] = float(np.unique(ids).size / n_cand) if n_cand else float("nan")
    return out


def cold_start_metrics(user_vectors: np.ndarray, item_vectors: np.ndarray, targets: np.ndarray,
                       hist_len: np.ndarray, raw_item_ids: Sequence[str], split: str,
                       item_vocabulary: str = "catalogue", ns: Iterable[int] = COLD_START_NS,
                       batch_size: int = 1024, slices: Iterable[str] = SLICES) -> dict:
    """Cold / warm / all metrics of one evaluation split (see the module doc).

    Args:
      user_vectors: float [U, D], one query per evaluation click.
      item_vectors: float [V, D]; row 0 is padding.
      targets: int [U] clicked item index per query.
      hist_len: int [U] the history length feature of each click (0 = empty history).
      raw_item_ids: the V - 1 lines of ``vocab/item_id.txt``.
      split: ``"valid"`` or ``"test"``: which cold bucket the cold clicks belong to.
      item_vocabulary: ``preprocess.item_vocabulary``; anything but ``catalogue`` is refused.
      ns: the N of hit@N and coverage@N.
      slices: which of ``cold``, ``warm``, ``all`` to rank (default: all three; training's
        per-epoch validation ranks ``cold`` alone).

    Returns: a flat dict ``{"cold/hit@20": ..., "warm/ndcg@20": ..., "all/coverage@500": ...,
    "cold_empty_history/hit@20": ..., ...}``.

    Raises ValueError when a click's target is an item of the other cold bucket (such a click
    cannot be in this split under the protocol: the artifacts and ``split`` disagree).
    """
    check_catalogue_vocabulary(item_vocabulary)
    if split not in (COLD_VALID, COLD_TEST):
        raise ValueError(f"split must be 'valid' or 'test'. Received: split={split!r}")
    item_vectors = np.asarray(item_vectors, np.float32)
    user_vectors = np.asarray(user_vectors, np.float32)
    targets = np.asarray(targets, np.int64).reshape(-1)
    hist_len = np.asarray(hist_len).reshape(-1)
    v = item_vectors.shape[0]
    if len(raw_item_ids) != v - 1:
        raise ValueError(f"{len(raw_item_ids)} raw item ids for {v} item rows (expected V - 1)")
    if not (user_vectors.shape[0] == targets.size == hist_len.size):
        raise ValueError(f"{user_vectors.shape[0]} user vectors, {targets.size} targets and "
                         f"{hist_len.size} history lengths: one of each per click")

    def topk(rows, candidates, k):
        return metrics.top_k_items(user_vectors[rows], item_vectors, k, valid_mask=candidates,
                                   batch_size=batch_size)[0]

    return _cold_start_core(topk, targets, hist_len, raw_item_ids, split, ns, v, slices)


def cold_start_metrics_from_scores(score_fn: Callable[[np.ndarray], np.ndarray],
                                   targets: np.ndarray, hist_len: np.ndarray,
                                   raw_item_ids: Sequence[str], split: str,
                                   item_vocabulary: str = "catalogue",
                                   ns: Iterable[int] = COLD_START_NS,
                                   batch_size: int = 1024) -> dict:
    """:func:`cold_start_metrics` for a model that scores items directly (e.g. the non-neural
    content baseline of :mod:`micrec_tf.evaluation.content_baseline`) instead of by vectors.

    ``score_fn(rows)`` takes int64 [B] click rows (positions in ``targets``) and returns the
    float [B, V] scores of every item index for those clicks (column 0 is padding and never
    ranked); it is called with at most ``batch_size`` rows at a time, so a [U, V] score matrix
    is never held. The rankings, ties (broken by the smaller item index), slices and keys are
    those of :func:`cold_start_metrics`; with ``score_fn = lambda r: user_vectors[r] @
    item_vectors.T`` both give the same metrics. The catalogue size V is that of
    ``raw_item_ids`` (V - 1 lines).
    """
    check_catalogue_vocabulary(item_vocabulary)
    if split not in (COLD_VALID, COLD_TEST):
        raise ValueError(f"split must be 'valid' or 'test'. Received: split={split!r}")
    targets = np.asarray(targets, np.int64).reshape(-1)
    hist_len = np.asarray(hist_len).reshape(-1)
    if targets.size != hist_len.size:
        raise ValueError(f"{targets.size} targets and {hist_len.size} history lengths: one of "
                         f"each per click")
    v = len(raw_item_ids) + 1
    batch_size = max(1, int(batch_size))

    def topk(rows, candidates, k):
        row_ids = np.nonzero(rows)[0]

        def block(a, b):
            sc = np.asarray(score_fn(row_ids[a:b]))
            if sc.shape != (b - a, v):
                raise ValueError(f"score_fn returned shape {sc.shape} for {b - a} clicks and "
                                 f"{v} items. Received: shape {sc.shape}")
            return sc

        return metrics.top_k_by_score_fn(block, row_ids.size, k, valid_mask=candidates,
                                         batch_size=batch_size)[0]

    return _cold_start_core(topk, targets, hist_len, raw_item_ids, split, ns, v)


def _cold_start_core(topk, targets, hist_len, raw_item_ids, split, ns, v,
                     slices: Iterable[str] = SLICES) -> dict:
    """The slices and metrics shared by both entry points; ``topk(rows, candidates, k)`` gives
    the int [rows.sum(), k] top-k item indices of the clicks where ``rows`` over ``candidates``."""
    ns = sorted({int(n) for n in ns})
    buckets = item_buckets(raw_item_ids)
    own, other = (_VALID, _TEST) if split == COLD_VALID else (_TEST, _VALID)
    tb = buckets[np.clip(targets, 0, v - 1)]
    tb = np.where(targets > 0, tb, _WARM)
    if np.any(tb == other):
        raise ValueError(f"{int(np.sum(tb == other))} {split} clicks target items of the other "
                         f"cold bucket: the artifacts were not split with item_cold_start")
    is_cold = tb == own
    out = {}
    chosen = _check_slices(slices)
    slices = {"cold": (is_cold, buckets == own), "warm": (~is_cold, buckets == _WARM),
              "all": (np.ones_like(is_cold), buckets != _PAD)}
    for name, (rows, candidates) in slices.items():
        if name not in chosen:
            continue
        idx = topk(rows, candidates, max(max(ns), NDCG_N))
        res = _ranking(idx, targets[rows], candidates, ns)
        out.update({f"{name}/{key}": val for key, val in res.items()})
        if name == "cold":
            empty = hist_len[rows] == 0
            for sub, mask in (("cold_empty_history", empty), ("cold_with_history", ~empty)):
                out[f"{sub}/num_clicks"] = int(mask.sum())
                for n, val in metrics.hit_at_n(idx[mask], targets[rows][mask], ns).items():
                    out[f"{sub}/hit@{n}"] = val
                out[f"{sub}/ndcg@{NDCG_N}"] = ndcg_at_n(idx[mask], targets[rows][mask])
    return out


def empty_history_composition(targets: np.ndarray, hist_len: np.ndarray,
                              raw_item_ids: Sequence[str], split: str, top: int = 3) -> dict:
    """What the cold slice's empty-history clicks are made of (no model involved): how many
    clicks, on how many distinct cold items, and the ``top`` most clicked of those items, beside
    the same counts for every cold click of the split. A slice whose clicks fall on a handful of
    items is won by any ranking that puts those items first, whatever the user.

    ``targets`` / ``hist_len``: int [U] clicked item index and history length per click of the
    split; ``raw_item_ids``: the lines of ``vocab/item_id.txt``.

    Returns ``{"empty_clicks", "empty_distinct_items", "empty_top": [[item index, clicks], ...]
    (most clicks first, ties by smaller index), "empty_top_share", "cold_clicks",
    "cold_distinct_items", "cold_top_share"}`` (a share is the ``top`` most clicked items'
    clicks over the slice's clicks; NaN for an empty slice).
    """
    targets = np.asarray(targets, np.int64).reshape(-1)
    hist_len = np.asarray(hist_len).reshape(-1)
    if targets.size != hist_len.size:
        raise ValueError(f"{targets.size} targets and {hist_len.size} history lengths: one of "
                         f"each per click")
    if int(top) != top or top <= 0:
        raise ValueError(f"top must be a positive integer. Received: top={top!r}")
    rows = cold_rows(targets, raw_item_ids, split)

    def counts(ids):
        items, n = np.unique(ids, return_counts=True)
        order = np.lexsort((items, -n))
        return items[order], n[order]

    out = {}
    for name, ids in (("empty", targets[rows & (hist_len == 0)]), ("cold", targets[rows])):
        items, n = counts(ids)
        out[f"{name}_clicks"] = int(ids.size)
        out[f"{name}_distinct_items"] = int(items.size)
        out[f"{name}_top_share"] = float(n[:top].sum() / ids.size) if ids.size else float("nan")
        if name == "empty":
            out["empty_top"] = [[int(i), int(c)] for i, c in zip(items[:top], n[:top])]
    return out

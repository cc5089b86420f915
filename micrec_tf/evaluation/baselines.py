"""Non-neural reference rows, ranked under the same protocol as the models (metrics.py).

* :class:`MostPopular`: every query gets the items with the most training clicks.
* :class:`CooccurrenceItemKNN`: a candidate's score is the sum, over the query's history clicks
  (``hist_items``, the 20 most recent earlier clicks), of its 1-hour co-occurrence count with that
  click, read from the co-occurrence ``NeighbourTable`` (each item's top-M neighbours by count).
  Equal scores, including the all-zero scores of an empty history, are ordered by training
  popularity, then by the smaller item index.

Both return ``indices int64 [U, k], scores [U, k]`` like :func:`metrics.top_k_items`, so
:func:`metrics.summarize_topk` applies unchanged; both honour per-query exclusion sets.
"""
from __future__ import annotations

import numpy as np

from micrec_tf.data.artifacts import NeighbourTable
from micrec_tf.evaluation.metrics import top_k_by_score_fn

__all__ = ["MostPopular", "CooccurrenceItemKNN"]


class MostPopular:
    """Scores every item by its training click count (ties: smaller item index first)."""

    def __init__(self, train_counts: np.ndarray):
        self.counts = np.asarray(train_counts, dtype=np.float64).reshape(-1)
        self.counts[0] = 0.0

    @property
    def num_items(self) -> int:
        return int(self.counts.size)

    def rank(self, examples: dict, k: int, exclude=None, batch_size: int = 1024):
        """Top-k for each query in ``examples`` (only its length is used)."""
        n = len(examples["item"]) if "item" in examples else len(next(iter(examples.values())))
        return self.rank_n(n, k, exclude, batch_size)

    def rank_n(self, num_queries: int, k: int, exclude=None, batch_size: int = 1024):
        counts = self.counts
        return top_k_by_score_fn(
            lambda a, b: np.broadcast_to(counts, (b - a, counts.size)), num_queries, k,
            exclude=exclude, batch_size=batch_size)


class CooccurrenceItemKNN:
    """Item-kNN over 1-hour session co-occurrence counts, popularity as the tie-breaker.

    Args:
      cooccurrence: padded neighbour lists ``neighbors [V, M]``, ``weights [V, M]`` (counts).
      train_counts: int [V] training clicks per item (tie-breaker).
      recent: use only the last ``recent`` history clicks (None: all of ``hist_items``).
    """

    def __init__(self, cooccurrence: NeighbourTable, train_counts: np.ndarray,
                 recent: int | None = None):
        self.neighbors = np.asarray(cooccurrence.neighbors, dtype=np.int64)
        self.weights = np.asarray(cooccurrence.weights, dtype=np.float64)
        self.counts = np.asarray(train_counts, dtype=np.float64).reshape(-1)
        if self.neighbors.shape[0] != self.counts.size:
            raise ValueError(f"co-occurrence table has {self.neighbors.shape[0]} rows, "
                             f"train counts {self.counts.size}")
        self.recent = recent

    @property
    def num_items(self) -> int:
        return int(self.counts.size)

    def _history(self, hist_items: np.ndarray, hist_len: np.ndarray | None) -> np.ndarray:
        hist = np.asarray(hist_items, dtype=np.int64)
        h = hist.shape[1]
        length = (np.asarray(hist_len, dtype=np.int64).reshape(-1) if hist_len is not None
                  else (hist > 0).sum(axis=1))
        pos = np.arange(h)[None, :]
        keep = pos < length[:, None]
        if self.recent is not None:
            keep &= pos >= (length - self.recent)[:, None]
        hist = np.where(keep, hist, 0)
        hist[(hist < 0) | (hist >= self.num_items)] = 0
        return hist

    def scores(self, hist_items: np.ndarray, hist_len: np.ndarray | None = None) -> np.ndarray:
        """float64 [B, V]: summed co-occurrence counts of each item with each query's history."""
        hist = self._history(hist_items, hist_len)
        b, v = hist.shape[0], self.num_items
        nb = self.neighbors[hist]  # [B, H, M]
        w = self.weights[hist]
        w = np.where(hist[:, :, None] > 0, w, 0.0)
        flat = (np.arange(b, dtype=np.int64)[:, None, None] * v + nb).ravel()
        return np.bincount(flat, weights=w.ravel(), minlength=b * v).reshape(b, v)

    def rank(self, examples: dict, k: int, exclude=None, batch_size: int = 1024):
        """Top-k for each query; ``examples`` needs ``hist_items`` (and uses ``hist_len`` if present)."""
        hist = np.asarray(examples["hist_items"])
        hist_len = examples.get("hist_len")
        return top_k_by_score_fn(
            lambda a, b: self.scores(hist[a:b], None if hist_len is None else hist_len[a:b]),
            hist.shape[0], k, exclude=exclude, batch_size=batch_size, secondary=self.counts)

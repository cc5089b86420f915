"""Non-neural reference rows, ranked under the same protocol as the models (metrics.py).

* :class:`MostPopular`: every query gets the items with the most training clicks.
* :class:`CooccurrenceItemKNN`: item-kNN over the full 1-hour session co-occurrence table
  (``cooccurrence.npz``, a :class:`~micrec_tf.data.artifacts.CooccurrenceTable`). A candidate
  ``j``'s score is the sum, over the query's history clicks ``h`` (``hist_items``, the recent
  clicks the neural models see; a repeated click counts each time), of a weight ``w(h, j)``:

  ========================  =====================================================
  ``count``                 ``count(h, j)``
  ``sqrt_pop``              ``count(h, j) / sqrt(pop(j))``
  ``cosine``                ``count(h, j) / sqrt(pop(h) * pop(j))``
  ``count_top50``           ``count(h, j)`` if ``j`` is among the 50 first entries of
                            row ``h`` (count desc, index asc), else 0: the scoring of
                            the old padded top-50 lists
  ========================  =====================================================

  ``pop`` is the training click count of an item, floored at 1. Items with no score (0) rank
  after every scored one; equal scores, the zeros included, are ordered by training popularity,
  then by the smaller item index (:func:`metrics.top_k_by_score_fn`'s ``secondary`` key).
  :func:`choose_variant` picks the variant with the best HIT@N on a held-out split.

Both return ``indices int64 [U, k], scores [U, k]`` like :func:`metrics.top_k_items`, so
:func:`metrics.summarize_topk` applies unchanged; both honour per-query exclusion sets.
"""
from __future__ import annotations

import time

import numpy as np

from micrec_tf.data.artifacts import CooccurrenceTable, NeighbourTable
from micrec_tf.data.contract import HIST_ITEMS, HIST_LEN, ITEM
from micrec_tf.evaluation.metrics import hit_at_n, top_k_by_score_fn

__all__ = ["MostPopular", "CooccurrenceItemKNN", "KNN_VARIANTS", "choose_variant"]

# The item-kNN weightings (module doc); the first one is the default.
KNN_VARIANTS = ("count", "sqrt_pop", "cosine", "count_top50")
_TOP50 = 50


def history_clicks(hist: np.ndarray, num_items: int):
    """scipy CSR float64 [B, V]: how often each item occurs among each row's history entries of
    ``hist`` int [B, H] (entries <= 0 are padding and not counted)."""
    import scipy.sparse as sp  # deferred: importing the package needs no scipy

    b = hist.shape[0]
    rows = np.repeat(np.arange(b, dtype=np.int64), hist.shape[1])
    flat = hist.ravel()
    keep = flat > 0
    return sp.csr_matrix((np.ones(int(keep.sum())), (rows[keep], flat[keep])),
                         shape=(b, num_items))


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
        n = len(examples[ITEM]) if ITEM in examples else len(next(iter(examples.values())))
        return self.rank_n(n, k, exclude, batch_size)

    def rank_n(self, num_queries: int, k: int, exclude=None, batch_size: int = 1024):
        counts = self.counts
        return top_k_by_score_fn(
            lambda a, b: np.broadcast_to(counts, (b - a, counts.size)), num_queries, k,
            exclude=exclude, batch_size=batch_size)


class CooccurrenceItemKNN:
    """Item-kNN over session co-occurrence counts, popularity as the tie-breaker (module doc).

    Scores are ``X @ W`` with ``X`` the [B, V] multi-hot of the batch's history clicks and ``W``
    the [V, V] sparse weight matrix of the variant (``scipy.sparse``, built once), so a batch costs
    about B x H x (mean row length) operations whatever the catalogue size.

    Args:
      cooccurrence: a :class:`CooccurrenceTable` (full CSR lists), or a padded
        :class:`NeighbourTable` (``neighbours [V, M]``, ``weights [V, M]`` counts, 0 = padding).
      train_counts: int [V] training clicks per item (``pop`` and the tie-breaker).
      variant: one of :data:`KNN_VARIANTS`.
      recent: use only the last ``recent`` history clicks (None: all of ``hist_items``).
    """

    def __init__(self, cooccurrence, train_counts: np.ndarray, variant: str = "count",
                 recent: int | None = None):
        if variant not in KNN_VARIANTS:
            raise ValueError(f"variant must be one of {KNN_VARIANTS}. Received: {variant!r}")
        if recent is not None and int(recent) < 1:
            raise ValueError(f"recent must be None or >= 1. Received: {recent!r}")
        self.counts = np.asarray(train_counts, dtype=np.float64).reshape(-1).copy()
        self.counts[0] = 0.0
        rows, cols, vals = _entries(cooccurrence, top=_TOP50 if variant == "count_top50" else None)
        v = self.counts.size
        n_rows = (cooccurrence.num_items if isinstance(cooccurrence, CooccurrenceTable)
                  else int(np.asarray(cooccurrence.neighbours).shape[0]))
        if n_rows != v:
            raise ValueError(f"the co-occurrence table has {n_rows} rows but train_counts has "
                             f"{v} items. Received: train_counts of shape {self.counts.shape}")
        pop = np.maximum(self.counts, 1.0)
        if variant == "sqrt_pop":
            vals = vals / np.sqrt(pop[cols])
        elif variant == "cosine":
            vals = vals / np.sqrt(pop[rows] * pop[cols])
        import scipy.sparse as sp  # deferred: importing the package needs no scipy

        self.weights = sp.csr_matrix((vals, (rows, cols)), shape=(v, v), dtype=np.float64)
        self.weights.sum_duplicates()
        self.variant = variant
        self.recent = None if recent is None else int(recent)

    @property
    def num_items(self) -> int:
        return int(self.counts.size)

    def _history(self, hist_items: np.ndarray, hist_len: np.ndarray | None) -> np.ndarray:
        """int64 [B, H]: the clicks that score (oldest first), others (and out-of-range) 0."""
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
        """float64 [B, V]: each item's summed weight with each query's history clicks."""
        x = history_clicks(self._history(hist_items, hist_len), self.num_items)
        return np.asarray((x @ self.weights).toarray(), dtype=np.float64)

    def rank(self, examples: dict, k: int, exclude=None, batch_size: int = 1024):
        """Top-k for each query; ``examples`` needs ``hist_items`` (and uses ``hist_len`` if
        present)."""
        hist = np.asarray(examples[HIST_ITEMS])
        hist_len = examples.get(HIST_LEN)
        return top_k_by_score_fn(
            lambda a, b: self.scores(hist[a:b], None if hist_len is None else hist_len[a:b]),
            hist.shape[0], k, exclude=exclude, batch_size=batch_size, secondary=self.counts)


def _entries(table, top: int | None = None):
    """(rows, cols, counts float64) of a co-occurrence table's entries; ``top``: first per row."""
    if isinstance(table, CooccurrenceTable):
        rows = table.rows()
        cols = np.asarray(table.neighbours, dtype=np.int64)
        vals = np.asarray(table.counts, dtype=np.float64)
        if top is not None:
            keep = np.arange(rows.size, dtype=np.int64) - table.indptr[rows] < top
            rows, cols, vals = rows[keep], cols[keep], vals[keep]
        return rows, cols, vals
    if not isinstance(table, NeighbourTable):
        raise TypeError("cooccurrence must be a CooccurrenceTable or a NeighbourTable. "
                        f"Received: {type(table).__name__}")
    nb = np.asarray(table.neighbours, dtype=np.int64)
    w = np.asarray(table.weights, dtype=np.float64)
    if top is not None:
        nb, w = nb[:, :top], w[:, :top]
    rows = np.repeat(np.arange(nb.shape[0], dtype=np.int64), nb.shape[1]).reshape(nb.shape)
    keep = (w != 0) & (nb > 0) & (nb < nb.shape[0])
    keep[0] = False
    return rows[keep], nb[keep], w[keep]


def choose_variant(cooccurrence, train_counts: np.ndarray, query: dict, targets: np.ndarray,
                   n: int, variants=KNN_VARIANTS, exclude=None, batch_size: int = 1024,
                   recent: int | None = None):
    """The item-kNN variant with the best HIT@``n`` on a held-out split.

    ``query`` holds that split's ``hist_items`` (and ``hist_len``), ``targets`` int [U] its
    clicked items, ``exclude`` its exclusion sets (as for ranking). Ties go to the variant listed
    first. Returns ``(best variant, {variant: HIT@n}, seconds)``.
    """
    variants = list(variants)
    if not variants:
        raise ValueError("variants must name at least one of "
                         f"{KNN_VARIANTS}. Received: {variants!r}")
    targets = np.asarray(targets, dtype=np.int64).reshape(-1)
    t0 = time.time()
    hits = {}
    for name in variants:
        model = CooccurrenceItemKNN(cooccurrence, train_counts, variant=name, recent=recent)
        idx, _ = model.rank(query, n, exclude=exclude, batch_size=batch_size)
        hits[name] = float(hit_at_n(idx, targets, [n])[n])
    best = max(variants, key=lambda name: (hits[name], -variants.index(name)))
    return best, hits, round(time.time() - t0, 2)

"""Per test click, the set of items the user clicked before it (the "exclude clicked" evaluation
option, and ``retrieve --exclude-clicked``).

The split arrays come from :mod:`micrec_tf.data.arrays` (the numpy reader of the example
shards); ``load_split_arrays``, ``num_items``, ``train_item_counts`` and ``load_cooccurrence`` are
re-exported here for the evaluation code.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np

from micrec_tf.data.arrays import EVAL_FEATURES, load_split_arrays, num_items, train_item_counts
from micrec_tf.data.artifacts import load_cooccurrence, load_feature_spec
from micrec_tf.search import CSRExclusion

__all__ = ["load_feature_spec", "load_split_arrays", "train_item_counts", "num_items",
           "earlier_clicks_exclusion", "EarlierClicksExclusion", "load_cooccurrence",
           "EVAL_FEATURES"]


class EarlierClicksExclusion:
    """Per query click, the items its user clicked before it; built lazily per batch.

    "Before" = every click of the same user in the history splits with a strictly smaller
    timestamp, plus the query's ``hist_items`` (which also holds earlier clicks with the same
    timestamp, in the preprocessing's order). OOV (0) is dropped. Implements the ``rows_cols``
    protocol of :mod:`micrec_tf.evaluation.metrics`.
    """

    def __init__(self, query: dict, history_splits: Iterable[dict]):
        users, items, times = [], [], []
        for split in history_splits:
            users.append(np.asarray(split["user_id"]).reshape(-1))
            items.append(np.asarray(split["item"], dtype=np.int64).reshape(-1))
            times.append(np.asarray(split["timestamp"], dtype=np.int64).reshape(-1))
        q_users = np.asarray(query["user_id"]).reshape(-1)
        _, codes = np.unique(np.concatenate(users + [q_users]), return_inverse=True)
        codes = codes.reshape(-1)
        n_hist = codes.size - q_users.size
        h_codes, self._q_codes = codes[:n_hist], codes[n_hist:]
        h_items = np.concatenate(items) if items else np.zeros(0, np.int64)
        h_times = np.concatenate(times) if times else np.zeros(0, np.int64)
        order = np.lexsort([h_times, h_codes])
        h_codes, self._items, self._times = h_codes[order], h_items[order], h_times[order]
        n_users = int(codes.max()) + 1 if codes.size else 0
        self._user_start = np.searchsorted(h_codes, np.arange(n_users + 1))
        self._q_times = np.asarray(query["timestamp"], dtype=np.int64).reshape(-1)
        self._hist = np.asarray(query["hist_items"], dtype=np.int64)
        self.num_rows = int(q_users.size)

    def items_of(self, i: int) -> np.ndarray:
        c = self._q_codes[i]
        lo, hi = self._user_start[c], self._user_start[c + 1]
        cut = lo + np.searchsorted(self._times[lo:hi], self._q_times[i], side="left")
        prev = np.concatenate([self._items[lo:cut], self._hist[i]])
        return np.unique(prev[prev > 0])

    def rows_cols(self, start: int, stop: int):
        parts = [self.items_of(i) for i in range(start, stop)]
        rows = np.repeat(np.arange(stop - start, dtype=np.int64), [p.size for p in parts])
        cols = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        return rows, cols.astype(np.int64)

    def to_csr(self) -> CSRExclusion:
        rows, cols = self.rows_cols(0, self.num_rows)
        indptr = np.zeros(self.num_rows + 1, np.int64)
        indptr[1:] = np.cumsum(np.bincount(rows, minlength=self.num_rows))
        return CSRExclusion(indptr, cols)


def earlier_clicks_exclusion(query: dict, history_splits: Iterable[dict]) -> EarlierClicksExclusion:
    """Exclusion sets "items the user clicked before this click" (see :class:`EarlierClicksExclusion`).

    Pass all splits as ``history_splits`` (the query's own split included). ``query`` and each
    split need ``user_id``, ``item``, ``timestamp``; the query also ``hist_items``.
    """
    return EarlierClicksExclusion(query, history_splits)

"""Reading the preprocessed examples into numpy for evaluation (formats: docs/ARCHITECTURE.md).

* :func:`load_split_arrays` parses ``examples/<split>-K-of-N.tfrecord.gz`` with the feature spec,
  checking the shards against their ``-of-N`` names and the example count preprocessing recorded.
* :func:`train_item_counts` counts training clicks per item.
* :func:`earlier_clicks_exclusion` builds, per test click, the set of items the user clicked
  before it (the "exclude clicked" evaluation option).
* :func:`load_cooccurrence` is :func:`micrec_tf.data.artifacts.load_cooccurrence` (the one strict
  reader of ``cooccurrence/cooccurrence.npz``), re-exported for the evaluation code.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from micrec_tf.data.artifacts import (check_example_count, load_cooccurrence, load_feature_spec,
                                      split_files, unreadable_shard_error)
from micrec_tf.evaluation.metrics import CSRExclusion

__all__ = ["load_feature_spec", "load_split_arrays", "train_item_counts", "num_items",
           "earlier_clicks_exclusion", "EarlierClicksExclusion", "load_cooccurrence"]

# The features the baselines and exclusion sets need (a model's user tower needs more).
EVAL_FEATURES = ("user_id", "hist_items", "hist_len", "item", "timestamp")
_DTYPES = {"int64": "int64", "string": "string", "bytes": "string", "float32": "float32",
           "float": "float32"}


def num_items(artifacts_dir: str, spec: dict | None = None) -> int:
    """V: the item vocabulary size including the OOV/padding slot 0."""
    spec = spec or load_feature_spec(artifacts_dir)
    return int(spec["vocab_sizes"]["item_id"])


def load_split_arrays(artifacts_dir: str, split: str,
                      features: Sequence[str] | None = None,
                      batch_size: int = 8192) -> dict:
    """All examples of one split as ``{feature: numpy array}`` in file order.

    Scalar features (shape [1]) come back as 1-D arrays [N]; others as [N, *shape]; strings as
    ``bytes`` objects. ``features=None`` (default) loads every feature of the spec; pass e.g.
    ``EVAL_FEATURES`` to load only what the baselines need.

    Raises ``ArtifactError`` (a ``FileNotFoundError``) naming the file when a shard of the
    ``-of-N`` set is missing or unreadable (truncated, corrupt), and naming the split and both
    counts when the examples read differ from feature_spec.json's ``num_examples``.
    """
    import tensorflow as tf  # deferred: the rest of evaluation needs no TF

    spec = load_feature_spec(artifacts_dir)
    fspec = spec["features"]
    names = list(fspec) if features is None else list(features)
    missing = [n for n in names if n not in fspec]
    if missing:
        raise KeyError(f"features {missing} are not in the feature spec ({sorted(fspec)})")
    parse = {}
    for name in names:
        dtype = _DTYPES[fspec[name]["dtype"]]
        shape = list(fspec[name].get("shape", [1]))
        parse[name] = tf.io.FixedLenFeature(shape, getattr(tf, dtype))
    files = split_files(artifacts_dir, split, spec.get("num_examples"))
    chunks = {n: [] for n in names}
    counts = {path: _read_shard(path, parse, batch_size, chunks) for path in files}
    check_example_count(spec.get("num_examples"), split, counts)
    out = {}
    for n in names:
        shape = list(fspec[n].get("shape", [1]))
        if chunks[n]:
            arr = np.concatenate(chunks[n])
        else:
            arr = np.zeros([0] + shape, dtype=object if _DTYPES[fspec[n]["dtype"]] == "string"
                           else getattr(np, _DTYPES[fspec[n]["dtype"]]))
        if shape == [1]:
            arr = arr.reshape(-1)
        out[n] = arr
    return out


def _read_shard(path: str, parse: dict, batch_size: int, chunks: dict) -> int:
    """Appends one shard's parsed batches to ``chunks``; returns its number of examples.

    A TensorFlow read error (``DataLossError`` for a truncated or corrupt file,
    ``InvalidArgumentError`` for records the spec cannot parse) becomes an ``ArtifactError``
    naming ``path``.
    """
    import tensorflow as tf

    ds = tf.data.TFRecordDataset(path, compression_type="GZIP").batch(batch_size)
    ds = ds.map(lambda x: (tf.size(x), tf.io.parse_example(x, parse)))
    count = 0
    try:
        for size, batch in ds.as_numpy_iterator():
            count += int(size)
            for n in chunks:
                chunks[n].append(batch[n])
    except (tf.errors.DataLossError, tf.errors.InvalidArgumentError) as err:
        raise unreadable_shard_error(path, err) from err
    return count


def train_item_counts(artifacts_dir: str, train: dict | None = None) -> np.ndarray:
    """int64 [V]: training clicks per item index (entry 0, OOV, is always 0)."""
    v = num_items(artifacts_dir)
    items = (train if train is not None else
             load_split_arrays(artifacts_dir, "train", ["item"]))["item"]
    counts = np.bincount(np.asarray(items, dtype=np.int64), minlength=v)[:v].astype(np.int64)
    counts[0] = 0
    return counts


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

"""The examples of one split as numpy arrays: the numpy reader of the example shards, next to
:mod:`micrec_tf.data.input` (tf.data); both parse with
:func:`micrec_tf.data.contract.parse_features`.

* :func:`load_split_arrays` parses ``examples/<split>-K-of-N.tfrecord.gz``, checking the shards
  against their ``-of-N`` names and the example count preprocessing recorded.
* :func:`train_item_counts` counts training clicks per item.
* :func:`num_items` is V, the item vocabulary size with the padding slot.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from micrec_tf.data import contract
from micrec_tf.data.artifacts import (check_example_count, load_feature_spec, split_files,
                                      unreadable_shard_error)

__all__ = ["load_split_arrays", "train_item_counts", "num_items", "EVAL_FEATURES"]

EVAL_FEATURES = contract.EVAL_FEATURES


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
    spec = load_feature_spec(artifacts_dir)
    fspec = spec["features"]
    names = list(fspec) if features is None else list(features)
    parse = contract.parse_features(spec, names)
    files = split_files(artifacts_dir, split, spec.get("num_examples"))
    chunks = {n: [] for n in names}
    counts = {path: _read_shard(path, parse, batch_size, chunks) for path in files}
    check_example_count(spec.get("num_examples"), split, counts)
    scalar = contract.scalar_features(spec)
    out = {}
    for n in names:
        shape = list(fspec[n]["shape"])
        if chunks[n]:
            arr = np.concatenate(chunks[n])
        else:
            arr = np.zeros([0] + shape, dtype=object if fspec[n]["dtype"] == "string"
                           else np.int64)
        out[n] = arr.reshape(-1) if n in scalar else arr
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

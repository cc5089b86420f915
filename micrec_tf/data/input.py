"""tf.data input: batched feature dicts parsed from the preprocessing TFRecords.

The parsing spec comes from ``examples/feature_spec.json`` through :mod:`micrec_tf.data.contract`,
so no feature list is duplicated here::

    ds = make_dataset("artifacts/ml-1m", "train", batch_size=4096, shuffle=True, repeat=True)
    batch = next(iter(ds))   # {"hist_items": int64 [B, 20], "item": int64 [B], "user_id": [B], ...}

Features of shape [1] come out as rank-1 [B] tensors; others keep their shape, [B, ...].
"""
from __future__ import annotations

import micrec_tf  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow is imported)
import tensorflow as tf

from micrec_tf.data import contract
from micrec_tf.data.artifacts import load_feature_spec, split_files


def make_parse_fn(feature_spec: dict):
    """A function parsing a batch of serialized examples into a dict of [B, ...] tensors
    (:func:`micrec_tf.data.contract.parse_features`; shape-[1] features squeezed to [B])."""
    spec = contract.parse_features(feature_spec)
    scalar = contract.scalar_features(feature_spec)

    def parse(serialized):
        feats = tf.io.parse_example(serialized, spec)
        return {k: (tf.squeeze(v, axis=1) if k in scalar else v) for k, v in feats.items()}

    return parse


def make_dataset(artifacts_dir: str, split: str, batch_size: int, shuffle: bool = False,
                 seed: int = 0, repeat: bool = False, drop_remainder: bool = False,
                 shuffle_buffer: int = 100_000) -> tf.data.Dataset:
    """Batched feature dicts of one split (``train``, ``valid`` or ``test``).

    Shards are read in parallel (interleave); with ``shuffle`` the shard order and the records
    (buffer ``shuffle_buffer``) are shuffled with ``seed``, reshuffled each epoch. Without
    ``shuffle`` the order is the files' order, deterministic. Parsing runs on whole batches.

    The shard set is checked first (:func:`~micrec_tf.data.artifacts.split_files`): a missing
    shard raises ``ArtifactError`` naming it. A corrupt shard surfaces only while iterating, as
    TensorFlow's ``DataLossError``, which does not name the file;
    :func:`micrec_tf.evaluation.data.load_split_arrays` reads shard by shard and does.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0, got {batch_size}")
    feature_spec = load_feature_spec(artifacts_dir)
    files = split_files(artifacts_dir, split, feature_spec.get("num_examples"))
    ds = tf.data.Dataset.from_tensor_slices(files)
    if shuffle:
        ds = ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
    ds = ds.interleave(
        lambda f: tf.data.TFRecordDataset(f, compression_type="GZIP"),
        cycle_length=min(len(files), 8), block_length=1 if shuffle else 1024,
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if shuffle:
        ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    ds = ds.map(make_parse_fn(feature_spec), num_parallel_calls=tf.data.AUTOTUNE,
                deterministic=True)
    return ds.prefetch(tf.data.AUTOTUNE)


def first_batch(artifacts_dir: str, batch_size: int = 8,
                splits: tuple = ("valid", "train", "test")) -> dict:
    """The first ``batch_size`` examples of the first split in ``splits`` that has any (by the
    feature spec's ``num_examples``), as :func:`make_dataset` gives them; when every split is
    empty (an update's window without clicks), one all-zero example in the feature spec's
    shapes and dtypes (index 0, the padding / out-of-vocabulary row of every vocabulary;
    ``""`` for a string feature). Used to build a model's variables before training."""
    feature_spec = load_feature_spec(artifacts_dir)
    counts = feature_spec.get("num_examples") or {}
    for split in splits:
        if int(counts.get(split, 0) or 0) > 0:
            return next(iter(make_dataset(artifacts_dir, split, batch_size)))
    scalar = contract.scalar_features(feature_spec)
    out = {}
    for name, feature in contract.parse_features(feature_spec).items():
        shape = [1] + ([] if name in scalar else list(feature.shape))
        out[name] = (tf.fill(shape, "") if feature.dtype == tf.string
                     else tf.zeros(shape, feature.dtype))
    return out

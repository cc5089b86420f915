"""Training examples: one ``tf.train.Example`` per click with the H most recent earlier clicks,
in sharded GZIP TFRecords ``examples/<split>-<shard>-of-<num_shards>.tfrecord.gz``, and the
feature spec that describes them (``examples/feature_spec.json``, written by the driver).

The features, their names, dtypes and shapes are :mod:`micrec_tf.data.contract`'s (the one
declaration the readers and the serving layer use too). A user's examples
all go to shard :func:`shard_of` of their split; records are sorted by user, then click order.
Only the user rows are shuffled (keyed by shard); the examples are built as the shard's files
are written (:class:`WriteShard`).

Transforms (PCollections they take and give):

- :class:`WriteExamples`: ``(users, item features, index)`` -> the TFRecord shards, and the
  STATS PCollection ``(examples.<split>, records)``.

``users`` are the rows of :class:`pipelines.split.UserTimelines`, ``item features`` the
``features`` of :class:`pipelines.items.ItemTable`, ``index`` the one-element
``{field: {value: index}}`` of :class:`pipelines.vocab.Vocabularies`.
"""
from __future__ import annotations

import os
import zlib

from pipelines.split import SPLITS, TEST, TRAIN, VALID
from pipelines.thinning import kept_user

import apache_beam as beam  # noqa: E402  (after pipelines.split: pipelines.common made it quiet)

from micrec_tf.config import Config  # noqa: E402
from micrec_tf.data import contract as C  # noqa: E402


# Target-item feature protos cached per worker before the cache is cleared.
ITEM_CACHE_SIZE = 100_000


def shard_of(user_id: str, num_shards: int) -> int:
    """The shard of every example of ``user_id`` (CRC-32 of the UTF-8 id, mod ``num_shards``)."""
    return zlib.crc32(user_id.encode("utf-8")) % num_shards


def feature_spec(cfg: Config, user_fields, item_extra_fields, vocab_sizes, num_examples) -> dict:
    """The content of ``examples/feature_spec.json`` for this job's config
    (:func:`micrec_tf.data.contract.feature_spec`)."""
    return C.feature_spec(cfg.preprocess.history_length, cfg.preprocess.max_tags, user_fields,
                          item_extra_fields, vocab_sizes, num_examples)


class ExampleWriter:
    """Builds one user's serialized ``tf.train.Example`` records (one per click).

    Target-item features are cached per item (the item table is fixed during a job); the cache
    is cleared at :data:`ITEM_CACHE_SIZE` entries so a million-item catalogue does not keep a
    million feature protos alive per worker.
    """

    def __init__(self, user_fields, extra_fields, history_length, max_tags,
                 train_user_fraction: float = 1.0):
        import tensorflow as tf  # imported on the worker only
        self._tf = tf
        self.history_length = history_length
        self.max_tags = max_tags
        self.train_user_fraction = train_user_fraction
        self._user_keys = [C.user_feature(f) for f in user_fields]
        self._extra_keys = [C.item_feature(f) for f in extra_fields]
        self._item_cache = {}

    def _int(self, values):
        tf = self._tf
        return tf.train.Feature(int64_list=tf.train.Int64List(value=values))

    def _item(self, item, item_feats):
        feats = self._item_cache.get(item)
        if feats is None:
            if len(self._item_cache) >= ITEM_CACHE_SIZE:
                self._item_cache.clear()
            item_idx, tags, provider, extras, _ = item_feats[item]
            tags = list(tags[:self.max_tags])
            feats = {C.ITEM: self._int([item_idx]),
                     C.ITEM_TAGS: self._int(tags + [0] * (self.max_tags - len(tags))),
                     C.ITEM_PROVIDER: self._int([provider])}
            for name, v in zip(self._extra_keys, extras):
                feats[name] = self._int([v])
            self._item_cache[item] = feats
        return feats

    def records(self, user, item_feats, index, tail=()):
        """Yields ``(split, serialized Example)`` for every click of ``user`` in click order.

        An ``item_cold_start`` row (7 elements) yields its warm clicks first, then its cold
        clicks in click order, each in its item's split with the ``H`` most recent of the user's
        warm clicks strictly earlier as history; a cold target is out of vocabulary (index 0)
        with ``preprocess.item_vocabulary: clicked`` (the evaluation counts it a miss) and has
        its own index with ``catalogue``.

        With ``train_user_fraction`` < 1 a user that :func:`pipelines.thinning.kept_user` drops
        yields no training example; its valid / test examples are unchanged (their histories
        still hold its earlier training clicks). 1.0 (default) = every example, as before.

        ``tail`` (issue 29, ``preprocess.history_tails``): the user's earlier clicks
        ``((ts, item_id), ...)`` from the previous artifacts
        (:func:`pipelines.history_tails.carried_tail`), put before ``clicks``: every history is
        then the ``H`` most recent of tail + the earlier clicks of this run (an item missing
        from ``item_feats`` is index 0). ``()`` (default) = histories from ``clicks`` only, as
        before.
        """
        tf = self._tf
        user_id, profile, clicks, n_train, n_valid, _ = user[:6]
        if n_train and self.train_user_fraction < 1.0 and not kept_user(
                user_id, self.train_user_fraction):
            n_skip = n_train  # the user's training examples are not written
        else:
            n_skip = 0
        H = self.history_length
        base = {C.USER_ID: tf.train.Feature(bytes_list=tf.train.BytesList(
            value=[user_id.encode("utf-8")]))}
        for name, value in zip(self._user_keys, profile):
            base[name] = self._int([index[name].get(value, 0)])
        idx = [item_feats[item][0] if item in item_feats else 0 for _, item in tail[-H:]]
        o = len(idx)  # click k of this run sits at o + k
        idx += [item_feats[item][0] for _, item in clicks]
        for k, (ts, item) in enumerate(clicks):
            if k < n_skip:
                continue
            split = TRAIN if k < n_train else (VALID if k < n_train + n_valid else TEST)
            yield split, self._example(base, item, item_feats, idx[max(0, o + k - H):o + k], ts)
        for ts, item, split, n_before in (user[6] if len(user) > 6 else ()):
            n_before += o
            yield split, self._example(base, item, item_feats,
                                       idx[max(0, n_before - H):n_before], ts)

    def _example(self, base, item, item_feats, hist, ts):
        """One serialized Example: ``base`` user features, the target ``item``, ``hist``."""
        tf, H = self._tf, self.history_length
        feats = dict(base)
        feats.update(self._item(item, item_feats))
        feats[C.HIST_ITEMS] = self._int(hist + [0] * (H - len(hist)))
        feats[C.HIST_LEN] = self._int([len(hist)])
        feats[C.TIMESTAMP] = self._int([ts])
        example = tf.train.Example(features=tf.train.Features(feature=feats))
        return example.SerializeToString(deterministic=True)


class WriteShard(beam.DoFn):
    """(shard, {"users": user rows, "keys": ...}) -> the shard's file of every split.

    Examples are built here, while the file is written, from the shard's users sorted by id:
    only the compact user rows go through the shuffle, never the serialized examples (which
    are about ten times larger and made the DirectRunner hold them all in memory).
    """

    def __init__(self, out_dir, num_shards, user_fields, extra_fields, history_length,
                 max_tags, train_user_fraction: float = 1.0, with_tails: bool = False):
        self.with_tails = with_tails
        self.out_dir = out_dir
        self.num_shards = num_shards
        self.user_fields = tuple(user_fields)
        self.extra_fields = tuple(extra_fields)
        self.history_length = history_length
        self.max_tags = max_tags
        self.train_user_fraction = train_user_fraction

    def setup(self):
        self._writer = ExampleWriter(self.user_fields, self.extra_fields, self.history_length,
                                     self.max_tags, self.train_user_fraction)

    def process(self, kv, item_feats, index):
        import tensorflow as tf

        shard, groups = kv
        if self.with_tails:  # (row, tail) pairs (issue 29)
            users = sorted(groups["users"], key=lambda u: u[0][0])
        else:
            users = [(u, ()) for u in sorted(groups["users"], key=lambda u: u[0])]
        options = tf.io.TFRecordOptions(compression_type="GZIP")
        writers, counts = {}, {}
        try:
            for split in SPLITS:
                path = os.path.join(self.out_dir, "examples",
                                    f"{split}-{shard:05d}-of-{self.num_shards:05d}.tfrecord.gz")
                tf.io.gfile.makedirs(os.path.dirname(path))
                writers[split] = tf.io.TFRecordWriter(path, options=options)
                counts[split] = 0
            for user, tail in users:
                for split, data in self._writer.records(user, item_feats, index, tail):
                    writers[split].write(data)
                    counts[split] += 1
        finally:
            for w in writers.values():
                w.close()
        for split in SPLITS:
            yield f"examples.{split}", counts[split]


class WriteExamples(beam.PTransform):
    """``(users, item features, index)`` -> ``<out_dir>/examples/*.tfrecord.gz``.

    Every (split, shard) file is written, empty when no user falls in it. Returns the STATS
    PCollection ``(examples.<split>, records written)``, one element per (split, shard).
    ``train_user_fraction`` < 1: no training example of the users
    :func:`pipelines.thinning.kept_user` drops (1.0, the default, writes every example).
    ``with_tails`` (issue 29): ``users`` are ``(row, tail)`` pairs
    (:class:`pipelines.history_tails.JoinHistoryTails` ``rows``) and each row's histories start
    in its tail; False (default) = plain rows, as before.
    """

    def __init__(self, out_dir: str, user_fields, extra_fields, history_length: int,
                 max_tags: int, num_shards: int, train_user_fraction: float = 1.0,
                 with_tails: bool = False):
        super().__init__()
        self.with_tails = bool(with_tails)
        self.train_user_fraction = float(train_user_fraction)
        self.out_dir, self.num_shards = out_dir, num_shards
        self.user_fields, self.extra_fields = tuple(user_fields), tuple(extra_fields)
        self.history_length, self.max_tags = history_length, max_tags

    def expand(self, inputs):
        users, item_feats, index = inputs
        num_shards = self.num_shards
        shard_keys = users.pipeline | "ShardKeys" >> beam.Create(
            [(k, None) for k in range(num_shards)])
        user_id = (lambda u: u[0][0]) if self.with_tails else (lambda u: u[0])  # (row, tail)
        keyed = users | "KeyByShard" >> beam.Map(lambda u: (shard_of(user_id(u), num_shards), u))
        return ({"users": keyed, "keys": shard_keys} | "GroupShards" >> beam.CoGroupByKey()
                | "WriteShards" >> beam.ParDo(
                    WriteShard(self.out_dir, num_shards, self.user_fields, self.extra_fields,
                               self.history_length, self.max_tags, self.train_user_fraction,
                               self.with_tails),
                    beam.pvalue.AsDict(item_feats), beam.pvalue.AsSingleton(index)))

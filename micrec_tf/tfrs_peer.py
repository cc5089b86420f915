"""The TensorFlow Recommenders peer: a plain two-tower retrieval model (``model.name:
tfrs_two_tower``), trained by the same :func:`micrec_tf.train.train` and evaluated by the same
HIT@N / coverage / long-tail code as MicRec, so the comparison is fair.

    model = build_tfrs_two_tower(cfg, art.item_table, art.vocab_sizes, art.user_fields)
    model.compile(optimizer=tf_keras.optimizers.Adam(cfg.train.learning_rate))
    model.fit(train_ds, ...)                      # batches: dicts of features
    users = model.user_embeddings(features)        # [B, d] float32
    items = model.item_embeddings()                # [V, d] float32, row i = item i

What it is (the model a TFRS user would write):

* **loss**: ``tfrs.tasks.Retrieval``, an in-batch softmax (each row's negatives are the other
  rows' positives), with

  - logQ correction: ``candidate_sampling_probability`` = each item's share of the training
    clicks, since in-batch negatives are drawn in proportion to popularity; the logits become
    ``u_i . v_j - log q_j`` (every candidate, the positive included);
  - accidental-hit removal (``loss.remove_accidental_hits``, default true): a candidate with
    the same item id as the row's positive, other than the positive itself, leaves the row's
    softmax (Retrieval's ``score_mask``; see :class:`InBatchSoftmax` for why not its
    ``remove_accidental_hits`` flag);
  - temperature 1 (``loss.temperature`` is the CL losses' and is not read here).

  The loss is the batch mean of ``-log softmax(positive)``, logged as ``loss`` and
  ``sampled_softmax_loss`` (MicRec's names, so history.json, TensorBoard and the loss-curve plots
  line up; the values are not comparable across models, whose candidate sets differ).
  ``loss.num_negatives``, ``loss.in_batch_negatives`` and ``loss.mask_history_negatives`` are
  MicRec's sampled-softmax settings and do not apply; ``train.batch_size`` sets the number of
  negatives (B - 1 per row).
* **user tower** (:class:`TFRSUserModel`): ``MLP([profile field embeddings ; mean of the recent
  clicks' item-id embeddings])`` (``hist_items``, 0 = padding, left out of the mean).
* **item tower** (:class:`TFRSItemModel`): ``MLP([item-id embedding ; mean of the tag
  embeddings])``. The item-id embedding table is the one the user tower averages over the
  history (shared, as in YoutubeDNN and MicRec).

Items without clicks (issue 28; every setting off by default, which builds the peer of before,
bit for bit, checked against the code at 9027cc6 in tests/test_tfrs_peer_content.py):

* ``model.item_text: true``: the item tower is :class:`TFRSContentItemModel`, the MLP over the
  same content fields as ICAN + text (ID, tags, provider, extra fields such as year, and the
  projected frozen text vector of :class:`micrec_tf.layers_text.ItemTextFieldEmbeddings`);
* ``model.min_id_clicks``: an item with fewer training clicks never uses its ID row: zero ID field
  in the item tower, left out of the user tower's history mean (:class:`_IDKeepMask`);
* ``loss.id_dropout: p``: in training, each in-batch candidate (a row's positive, the other rows'
  negative) loses its ID field with probability p (DropoutNet; :class:`~micrec_tf.
  layers_id_dropout.IDFieldDropout`).

Both MLPs are ``model.user_mlp_units`` / ``model.item_mlp_units`` (ReLU, linear last layer of
``model.output_dim`` units), embeddings ``model.embedding_dim`` wide, dropout ``model.dropout``.

Why :class:`TFRSTwoTowerModel` subclasses ``tfrs.models.Model`` and not :class:`MicRecModel`:
MicRecModel is built around the sampled-softmax task, its random negatives' generators and the CL
plug-ins (its constructor, ``compute_losses``, ``samplers`` and ``test_step`` all assume them);
the peer has none of those. ``tfrs.models.Model`` is the class a TFRS user subclasses
(``compute_loss``); here ``train_step``/``test_step`` are MicRec's (running-mean loss trackers,
the loss divided by the replica count, ``optimizer.minimize`` so Keras's loss scaling applies
under mixed precision), and the inference interface (``user_embeddings``,
``graph_user_embeddings``, ``item_embeddings``, ``compute_losses``) is MicRecModel's, which is
what train(), evaluation, checkpointing and the export call.

Not in the default build: a user-id embedding. The evaluation (``evaluation/evaluate.py`` drops
``user_id`` from the user features) and the serving signature (profile fields and history only)
never pass ``user_id`` to a user tower, so a tower that read it would fail there.
:class:`TFRSUserModel` takes ``user_id_vocabulary`` for when they do.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import micrec_tf  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow is imported)
import numpy as np
import tensorflow as tf
import tensorflow_recommenders as tfrs
import tf_keras

from micrec_tf.data.artifacts import text_vectors_for
from micrec_tf.data.contract import HIST_ITEMS, ITEM, USER_ID
from micrec_tf.layers import (MLP, ItemFeatureLookup, ItemFieldEmbeddings, check_int, check_rate,
                              check_units, deserialize, masked_mean, register, require_features,
                              scalar_feature, serialize)
from micrec_tf.layers_id_dropout import IDFieldDropout
from micrec_tf.layers_text import ItemTextFieldEmbeddings
from micrec_tf.losses import ID_DROPOUT_SEED_OFFSET
from micrec_tf.model import (TwoTowerSteps, _unpack, _user_feature_names,
                             item_extra_vocab_sizes, item_id_keep_mask)
from micrec_tf.towers import MLPItemTower

LOSS_NAMES = ("loss", "sampled_softmax_loss")


@register
class MaskedMeanPooling(tf_keras.layers.Layer):
    """Mean over the second-to-last axis of the entries where ``mask`` is true.

    Call: ``x`` [..., L, D], ``mask`` bool [..., L] -> [..., D]; a slice with no true entry gives
    zeros (not NaN, unlike ``GlobalAveragePooling1D`` with an all-false mask).
    """

    def call(self, x, mask):
        return masked_mean(x, mask, axis=-2)

    def compute_mask(self, inputs, mask=None):
        return None


class _IDKeepMask:
    """``model.min_id_clicks`` for the peer's towers (mixed in before the Keras layer): the same
    rule and weight as :class:`micrec_tf.layers.ItemFieldEmbeddings` (``id_keep_mask`` from
    :func:`micrec_tf.model.item_id_keep_mask`, held in the non-trainable float32 [V] weight
    ``item_id_keep_mask``, saved in checkpoints, not in the config; ``id_masked`` = whether the
    weight exists, what ``from_config`` passes). No mask (the default): no weight, no op.
    """

    def _init_keep(self, id_keep_mask, id_masked, num_items: int) -> None:
        if id_keep_mask is not None:
            id_keep_mask = np.asarray(id_keep_mask)
            if id_keep_mask.shape != (num_items,):
                raise ValueError(f"id_keep_mask must be [num_items]=[{num_items}]. Received: "
                                 f"shape {id_keep_mask.shape}")
            id_keep_mask = id_keep_mask.astype(bool).astype(np.float32)
        if not isinstance(id_masked, (bool, np.bool_)):
            raise ValueError(f"id_masked must be a bool. Received: {id_masked!r}")
        self.id_masked = bool(id_masked) or id_keep_mask is not None
        self._id_keep_np = id_keep_mask
        self._id_keep_size = int(num_items)
        self.id_keep = None  # the float32 [V] weight, built when id_masked

    def _build_keep(self) -> None:
        if self.id_masked and self.id_keep is None:
            self.id_keep = self.add_weight(
                name="item_id_keep_mask", shape=[self._id_keep_size], dtype=tf.float32,
                initializer="ones", trainable=False)
            if self._id_keep_np is not None:
                self.id_keep.assign(self._id_keep_np)
                self._id_keep_np = None  # the weight holds it now

    def id_kept(self, ids) -> tf.Tensor:
        """Item indices int64 [S...] -> bool [S...]: True where the item may use its ID row."""
        if not self.id_masked:
            return tf.ones_like(ids, tf.bool)
        self._build_keep()
        return tf.gather(self.id_keep, ids) > 0.0

    def _keep_config(self, config: dict) -> dict:
        if self.id_masked:  # only then: the config of an unmasked layer is as before
            config.update(id_masked=True)
        return config


@register
class TFRSItemModel(_IDKeepMask, tf_keras.layers.Layer):
    """Candidate tower: ``MLP([item-id embedding ; mean of the item's tag embeddings])``.

    Args:
      tags: int [V, T] every catalogue item's tag indices, 0-padded (row 0 = the padding item).
      num_tags: tag vocabulary size incl. OOV 0.
      embedding_dim: E, width of the id and tag embeddings.
      units: MLP widths; the last is the output dim d.
      dropout: dropout between the MLP's hidden layers.
      id_keep_mask: bool [V], False for an item whose ID row is never used
        (``model.min_id_clicks``): its id embedding is replaced by zeros (see
        :class:`_IDKeepMask`). None (default): no mask, the tower of before, bit for bit.
      id_masked: whether the mask weight exists (``from_config``).

    Call: item indices int [N] -> [N, d]. The tags come from ``tags``, so any index (targets,
    the whole catalogue) is embedded the same way. :meth:`raw_embedding_of` [N, 2E] (ID first)
    and :meth:`encode` split the call, for ``loss.id_dropout``.
    """

    def __init__(self, tags, num_tags: int, embedding_dim: int = 64,
                 units: Sequence[int] = (128, 64, 64), dropout: float = 0.0,
                 id_keep_mask=None, id_masked: bool = False, **kwargs):
        super().__init__(**kwargs)
        tags = np.asarray(tags, dtype=np.int64)
        if tags.ndim != 2 or tags.shape[0] < 2:
            raise ValueError(f"tags must be [V, T] with V >= 2 (padding + one item). Received: "
                             f"shape {tags.shape}")
        self.num_tags = check_int("num_tags", num_tags)
        if tags.size and (tags.min() < 0 or tags.max() >= self.num_tags):
            raise ValueError(f"tag indices must lie in [0, num_tags={num_tags}). Received: "
                             f"values in [{tags.min()}, {tags.max()}]")
        self._tags_np = tags
        self.embedding_dim = check_int("embedding_dim", embedding_dim)
        self.units = check_units(units, "TFRSItemModel")
        self.dropout = check_rate("dropout", dropout)
        self.item_tags = tf.constant(tags)
        self.id_embedding = tf_keras.layers.Embedding(self.num_items, self.embedding_dim,
                                                      name="item_id_embedding")
        self.tag_embedding = tf_keras.layers.Embedding(self.num_tags, self.embedding_dim,
                                                       name="tag_embedding")
        self.tag_pooling = MaskedMeanPooling(name="tag_pooling")
        self.mlp = MLP(self.units, dropout=self.dropout, name="item_mlp")
        self._init_keep(id_keep_mask, id_masked, self.num_items)

    @property
    def num_items(self) -> int:
        """V, the padding row included."""
        return int(self._tags_np.shape[0])

    @property
    def output_dim(self) -> int:
        return self.units[-1]

    def build(self, input_shape=None):
        self._build_keep()
        super().build(input_shape)

    def raw_embedding_of(self, item_ids) -> tf.Tensor:
        """Item indices int [N] -> ``[id field ; mean tag embedding]`` [N, 2E] (ID field first,
        zero for an ID-masked item)."""
        ids = tf.reshape(tf.cast(item_ids, tf.int64), [-1])  # [N]
        tags = tf.gather(self.item_tags, ids)  # [N, T]
        pooled_tags = self.tag_pooling(self.tag_embedding(tags), tags > 0)  # [N, E]
        id_field = self.id_embedding(ids)  # [N, E]
        if self.id_masked:
            id_field = id_field * tf.cast(self.id_kept(ids), id_field.dtype)[:, tf.newaxis]
        return tf.concat([id_field, pooled_tags], axis=-1)  # [N, 2E]

    def encode(self, raw, training=None) -> tf.Tensor:
        """[N, 2E] -> [N, d]."""
        return self.mlp(raw, training=training)

    def call(self, item_ids, training=None):
        return self.encode(self.raw_embedding_of(item_ids), training=training)  # [N, d]

    def get_config(self):
        config = super().get_config()
        config.update(tags=self._tags_np.tolist(), num_tags=self.num_tags,
                      embedding_dim=self.embedding_dim, units=list(self.units),
                      dropout=self.dropout)
        return self._keep_config(config)


@register
class TFRSContentItemModel(MLPItemTower):
    """Candidate tower with the item's content fields (``model.item_text: true``):
    ``MLP(f^d)`` over the catalogue fields of :class:`micrec_tf.layers_text.
    ItemTextFieldEmbeddings` (ID, tags, provider, the extra fields such as year, and the
    projected frozen text vector), i.e. the item tower of ICAN + text, called with item indices.

    Args: as :class:`micrec_tf.towers.MLPItemTower` (``item_lookup``, ``field_embeddings``,
    ``units``, ``dropout``); the ``min_id_clicks`` mask is the field embeddings' own
    (``id_keep_mask`` of :class:`~micrec_tf.layers.ItemFieldEmbeddings`).

    Call: item indices int [N] -> [N, d]; :meth:`raw_embedding_of` ``f^d`` [N, F * E] (ID field
    first) and :meth:`encode` split it, for ``loss.id_dropout``.
    """

    @property
    def id_embedding(self) -> tf_keras.layers.Embedding:
        """The item-id table [V, E] the user tower averages over the history."""
        return self.field_embeddings.item_embedding

    @property
    def num_items(self) -> int:
        return self.item_lookup.num_items

    def raw_embedding_of(self, item_ids) -> tf.Tensor:
        """Item indices int [N] -> ``f^d`` [N, F * E]."""
        ids = tf.reshape(tf.cast(item_ids, tf.int64), [-1])
        return self.raw_embedding(self.features_for(ids))

    def call(self, item_ids, training=None):
        return self.encode(self.raw_embedding_of(item_ids), training=training)  # [N, d]


@register
class TFRSUserModel(_IDKeepMask, tf_keras.layers.Layer):
    """Query tower: ``MLP([profile field embeddings ; mean of the history's item-id embeddings
    (; user-id embedding)])``.

    Args:
      profile_vocab_sizes: {feature ``user_<field>``: vocabulary size incl. OOV 0}, in order.
      item_id_embedding: the item-id ``Embedding`` [V, E] to average over ``hist_items`` (pass
        the item tower's ``id_embedding`` to share it), or its serialized config.
      units: MLP widths; the last is the output dim d.
      dropout: dropout between the MLP's hidden layers.
      user_id_vocabulary: raw user ids; when given, ``user_id`` (string [B]) is looked up
        (``StringLookup``, unknown ids -> OOV 0) and embedded too. None (default): no user id.
      id_keep_mask: bool [V] (``model.min_id_clicks``, the item tower's mask): a history click
        on an item whose ID row is never used leaves the mean, like padding. None (default):
        every click counts, the tower of before, bit for bit.
      id_masked: whether the mask weight exists (``from_config``).

    Call: features with ``user_<field>`` int [B] (or [B, 1]), ``hist_items`` int [B, H]
    (0 = padding, anywhere) and, with a vocabulary, ``user_id`` -> [B, d]. Other features are
    ignored.

    A config round trip rebuilds ``item_id_embedding`` as the tower's own layer (the sharing of
    one built model is not part of a layer config).
    """

    def __init__(self, profile_vocab_sizes: Mapping, item_id_embedding,
                 units: Sequence[int] = (128, 64, 64), dropout: float = 0.0,
                 user_id_vocabulary: Sequence[str] | None = None, id_keep_mask=None,
                 id_masked: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.profile_vocab_sizes = {k: check_int(f"profile_vocab_sizes[{k!r}]", v)
                                    for k, v in profile_vocab_sizes.items()}
        self.item_id_embedding = deserialize(item_id_embedding)
        if not isinstance(self.item_id_embedding, tf_keras.layers.Embedding):
            raise TypeError(f"item_id_embedding must be a tf_keras Embedding. Received: "
                            f"{type(self.item_id_embedding).__name__}")
        self.embedding_dim = int(self.item_id_embedding.output_dim)
        self.units = check_units(units, "TFRSUserModel")
        self.dropout = check_rate("dropout", dropout)
        self.profile_embeddings = [
            tf_keras.layers.Embedding(size, self.embedding_dim, name=f"{name}_embedding")
            for name, size in self.profile_vocab_sizes.items()]
        self.history_pooling = MaskedMeanPooling(name="history_pooling")
        self.user_id_vocabulary = (None if user_id_vocabulary is None
                                   else [str(u) for u in user_id_vocabulary])
        if self.user_id_vocabulary is not None:
            self.user_id_lookup = tf_keras.layers.StringLookup(
                vocabulary=self.user_id_vocabulary, mask_token=None, num_oov_indices=1,
                name="user_id_lookup")
            self.user_id_embedding = tf_keras.layers.Embedding(
                len(self.user_id_vocabulary) + 1, self.embedding_dim, name="user_id_embedding")
        self.mlp = MLP(self.units, dropout=self.dropout, name="user_mlp")
        self._init_keep(id_keep_mask, id_masked, int(self.item_id_embedding.input_dim))

    def build(self, input_shape=None):
        self._build_keep()
        super().build(input_shape)

    @property
    def feature_names(self) -> list:
        extra = [USER_ID] if self.user_id_vocabulary is not None else []
        return [*self.profile_vocab_sizes, HIST_ITEMS, *extra]

    @property
    def output_dim(self) -> int:
        return self.units[-1]

    def history_embedding(self, features) -> tf.Tensor:
        """``hist_items`` int [B, H] -> mean item-id embedding of the non-zero entries [B, E]
        (zeros for an empty history); with ``id_keep_mask`` only of the items that keep their
        ID row."""
        hist = tf.cast(features[HIST_ITEMS], tf.int64)
        if hist.shape.rank != 2:
            raise ValueError(f"{HIST_ITEMS} must be [B, H]. Received: shape {hist.shape}")
        mask = hist > 0
        if self.id_masked:
            mask = tf.logical_and(mask, self.id_kept(hist))
        return self.history_pooling(self.item_id_embedding(hist), mask)

    def call(self, features, training=None):
        require_features(features, self.feature_names, type(self).__name__)
        parts = [layer(tf.cast(scalar_feature(features[name], name), tf.int64))  # [B, E] each
                 for name, layer in zip(self.profile_vocab_sizes, self.profile_embeddings)]
        parts.append(self.history_embedding(features))  # [B, E]
        if self.user_id_vocabulary is not None:
            ids = self.user_id_lookup(scalar_feature(features[USER_ID], USER_ID))
            parts.append(self.user_id_embedding(ids))  # [B, E]
        return self.mlp(tf.concat(parts, axis=-1), training=training)  # [B, d]

    def get_config(self):
        config = super().get_config()
        embedding = serialize(self.item_id_embedding)
        # Built by whichever tower called it first ([N] items or [B, H] history): not ours.
        embedding.pop("build_config", None)
        config.update(profile_vocab_sizes=dict(self.profile_vocab_sizes),
                      item_id_embedding=embedding,
                      units=list(self.units), dropout=self.dropout,
                      user_id_vocabulary=self.user_id_vocabulary)
        return self._keep_config(config)


@register
class InBatchSoftmax(tf_keras.layers.Layer):
    """``tfrs.tasks.Retrieval`` over the batch's positives with logQ correction.

    Args:
      candidate_probability: float [V], each item's sampling probability as an in-batch
        candidate (its share of the training clicks); any positive multiple gives the same loss
        (``log`` of it shifts a row's logits by a constant). It is handed to TFRS divided by its
        maximum, so TFRS's clip to [1e-6, 1] only touches items over 1e6 times rarer than the
        most clicked one. Entries <= 0 (the padding row, items without a training click) get
        the smallest positive entry's value.
      remove_accidental_hits: mask out of row i's softmax the other rows whose item id is row
        i's positive's.
      temperature: None (= 1) or the softmax temperature.

    Call: ``(query [B, d], candidates [B, d], candidate_ids int [B])`` (row i: user i and the
    item user i clicked) -> scalar float32, the mean over rows of
    ``-log softmax_j(q_i . c_j - log p_j)`` at ``j = i``.
    """

    def __init__(self, candidate_probability, remove_accidental_hits: bool = True,
                 temperature: float | None = None, **kwargs):
        kwargs.setdefault("dtype", "float32")  # logits and loss stay float32 in mixed precision
        super().__init__(**kwargs)
        p = np.asarray(candidate_probability, dtype=np.float64).reshape(-1)
        if p.size < 2 or not np.all(np.isfinite(p)) or not np.any(p > 0):
            raise ValueError(f"candidate_probability must be [V] finite values, V >= 2, some > 0."
                             f" Received: shape {p.shape}, max {p.max() if p.size else None}")
        if temperature is not None and not float(temperature) > 0:
            raise ValueError(f"temperature must be > 0 or None. Received: {temperature!r}")
        self._probability_np = p
        self.remove_accidental_hits = bool(remove_accidental_hits)
        self.temperature = None if temperature is None else float(temperature)
        relative = np.where(p > 0, p, p[p > 0].min()) / p.max()  # (0, 1]
        self.relative_probability = tf.constant(relative, tf.float32)
        # Accidental hits go in as Retrieval's ``score_mask``, not ``remove_accidental_hits=True``:
        # that option builds a RemoveAccidentalHits layer inside every call under the global
        # dtype policy, which under mixed_float16 casts the labels to float16 and fails
        # ("Input 'y' of 'AddV2' Op has type float16 that does not match type float32").
        # The mask is applied at the same point (after the logQ correction, before the loss).
        self.retrieval = tfrs.tasks.Retrieval(
            loss=tf_keras.losses.CategoricalCrossentropy(
                from_logits=True, reduction=tf_keras.losses.Reduction.NONE),
            temperature=self.temperature, name="retrieval")
        # Retrieval takes no dtype argument: keep it float32 too, or under mixed_float16 Keras
        # would cast its first input (the queries) to float16 and not the candidates.
        self.retrieval._set_dtype_policy(tf_keras.mixed_precision.Policy("float32"))

    @property
    def num_items(self) -> int:
        return int(self._probability_np.size)

    def call(self, inputs, training=None):
        query, candidates, candidate_ids = inputs
        ids = tf.reshape(tf.cast(candidate_ids, tf.int64), [-1])  # [B]
        score_mask = None
        if self.remove_accidental_hits:  # [B, B]: false where j != i has row i's item id
            same = tf.equal(ids[:, tf.newaxis], ids[tf.newaxis, :])
            score_mask = tf.logical_or(tf.logical_not(same),
                                       tf.cast(tf.eye(tf.shape(ids)[0]), tf.bool))
        per_row = self.retrieval(
            tf.cast(query, tf.float32), tf.cast(candidates, tf.float32),
            candidate_sampling_probability=tf.gather(self.relative_probability, ids),
            candidate_ids=ids, compute_metrics=False, compute_batch_metrics=False,
            score_mask=score_mask)  # [B]
        return tf.reduce_mean(per_row)

    def get_config(self):
        config = super().get_config()
        config.update(candidate_probability=self._probability_np.tolist(),
                      remove_accidental_hits=self.remove_accidental_hits,
                      temperature=self.temperature)
        return config


class TFRSTwoTowerModel(TwoTowerSteps, tfrs.models.Model):
    """Two-tower retrieval model: :class:`TFRSUserModel`, :class:`TFRSItemModel`,
    :class:`InBatchSoftmax` (see the module docstring for why ``tfrs.models.Model``).

    Args:
      user_model: features -> [B, d].
      item_model: item indices [N] -> [N, d] (:class:`TFRSItemModel` or
        :class:`TFRSContentItemModel`).
      task: :class:`InBatchSoftmax`.
      item_batch_size: chunk size of :meth:`item_embeddings`.
      id_dropout: None (default: the loss of before, bit for bit) or an
        :class:`~micrec_tf.layers_id_dropout.IDFieldDropout` (``loss.id_dropout``): in training
        the loss's candidates (each row's positive, which are the other rows' in-batch
        negatives) are encoded from ``item_model.raw_embedding_of`` with the ID field of each
        row zeroed at that rate; the user tower's history, evaluation and export are undropped.

    Metrics: ``loss`` and ``sampled_softmax_loss`` (the same value: there is no other term),
    running means over the epoch.
    """

    def __init__(self, user_model: TFRSUserModel, item_model: TFRSItemModel,
                 task: InBatchSoftmax, item_batch_size: int = 4096,
                 id_dropout: IDFieldDropout | None = None, **kwargs):
        super().__init__(**kwargs)
        if user_model.output_dim != item_model.output_dim:
            raise ValueError(f"user tower output dim {user_model.output_dim} != item tower "
                             f"output dim {item_model.output_dim}")
        if task.num_items != item_model.num_items:
            raise ValueError(f"the task has probabilities for {task.num_items} items, the item "
                             f"tower embeds {item_model.num_items}")
        if id_dropout is not None and not isinstance(id_dropout, IDFieldDropout):
            raise TypeError(f"id_dropout must be an IDFieldDropout or None. Received: "
                            f"{type(id_dropout).__name__}")
        self.user_model, self.item_model, self.task = user_model, item_model, task
        self.id_field_dropout = id_dropout
        self._init_steps(LOSS_NAMES, item_batch_size)

    @property
    def samplers(self) -> list:
        """The ``tf.random.Generator`` of the ID-field dropout (none without it)."""
        return [] if self.id_field_dropout is None else [self.id_field_dropout.rng]

    @property
    def loss_names(self) -> list:
        return list(LOSS_NAMES)

    @property
    def num_items(self) -> int:
        return self.item_model.num_items

    @property
    def output_dim(self) -> int:
        return self.item_model.output_dim

    # --- forward -------------------------------------------------------------------------
    def call(self, features, training=False):
        """-> {"user_embedding": [B, d], "item_embedding": [B, d]} (target items), float32."""
        return {"user_embedding": tf.cast(self.user_model(features, training=training),
                                          tf.float32),
                "item_embedding": tf.cast(self.item_model(features[ITEM], training=training),
                                          tf.float32)}

    def compute_losses(self, features, training: bool = False) -> dict:
        """{"sampled_softmax_loss", "loss"}: scalars float32 for one batch (dict of features)."""
        item_ids = tf.reshape(tf.cast(features[ITEM], tf.int64), [-1])  # [B]
        # The item tower first: it owns the shared item-id embedding (and names its variable).
        if training and self.id_field_dropout is not None:  # loss.id_dropout
            raw = self.id_field_dropout(self.item_model.raw_embedding_of(item_ids), training=True)
            items = tf.cast(self.item_model.encode(raw, training=training), tf.float32)
        else:
            items = tf.cast(self.item_model(item_ids, training=training), tf.float32)  # [B, d]
        user = tf.cast(self.user_model(features, training=training), tf.float32)  # [B, d]
        main = self.task((user, items, item_ids), training=training)
        total = main + tf.add_n(self.losses) if self.losses else main
        return {"sampled_softmax_loss": main, "loss": total}

    def compute_loss(self, inputs, training: bool = False) -> tf.Tensor:
        """The TFRS entry point: the total loss of a batch."""
        return self.compute_losses(_unpack(inputs), training=training)["loss"]

    # --- the towers, for TwoTowerSteps' inference paths -----------------------------------
    def user_vectors(self, features, training=False) -> tf.Tensor:
        """[B, d] in the compute dtype."""
        return self.user_model(features, training=training)

    def item_vectors(self, ids, training=False) -> tf.Tensor:
        """int64 [N] item indices -> [N, d] in the compute dtype."""
        return self.item_model(ids, training=training)


def candidate_probability_from_counts(counts) -> np.ndarray:
    """int [V] training clicks per item -> float64 [V], each item's share of them."""
    counts = np.asarray(counts, dtype=np.float64).reshape(-1)
    if counts.size < 2 or np.any(counts < 0) or counts.sum() <= 0:
        raise ValueError(f"item click counts must be [V] non-negative with a positive sum. "
                         f"Received: shape {counts.shape}, sum {counts.sum()}")
    return counts / counts.sum()


def build_tfrs_two_tower(cfg, item_table, vocab_sizes: Mapping, user_fields,
                         item_counts=None, user_id_vocabulary=None,
                         text_vectors=None) -> TFRSTwoTowerModel:
    """Builds the TFRS peer from ``cfg.model`` (the dispatch target of ``build_model``).

    Args:
      cfg: :class:`micrec_tf.config.Config` (``model``, ``loss.remove_accidental_hits``,
        ``loss.id_dropout``, ``train.seed``, ``artifacts_dir``).
      item_table: :class:`micrec_tf.data.artifacts.ItemTable` (its ``tags``, ``id_clicks``
        for ``model.min_id_clicks`` and, with ``model.item_text``, ``provider``, ``extra`` and
        ``text_vectors_dir``; row 0 padding).
      vocab_sizes: {vocab name: size incl. OOV 0}: ``item_id``, ``tag``, ``user_<field>``
        (and, with ``model.item_text``, ``provider`` and ``item_<extra>``).
      user_fields: profile field names (``gender`` or ``user_gender``).
      item_counts: int [V] training clicks per item, for the logQ correction; None (default):
        counted from ``cfg.artifacts_dir``'s whole training split (the item table carries no
        counts; under ``train.train_fraction`` < 1 the sampled users' shares differ a little).
      user_id_vocabulary: see :class:`TFRSUserModel`; None (default): no user-id embedding.
      text_vectors: float [V, D_t] for ``model.item_text``; None reads them from
        ``item_table.text_vectors_dir`` (as :func:`micrec_tf.model.build_model`).

    The issue-28 settings (all off by default, which builds the peer of before, bit for bit):

    * ``model.item_text: true``: the item tower is :class:`TFRSContentItemModel`, ICAN + text's
      item fields (ID, tags, provider, extra fields, the projected frozen text vector) through
      the MLP; false: :class:`TFRSItemModel` (ID and tags).
    * ``model.min_id_clicks``: items with fewer training clicks never use their ID row, in the
      item tower and in the history mean (:func:`micrec_tf.model.item_id_keep_mask`; no item is
      masked with the ``clicked`` vocabulary and the default 1).
    * ``loss.id_dropout`` > 0: :class:`TFRSTwoTowerModel`'s ``id_dropout`` (seed
      ``train.seed + ID_DROPOUT_SEED_OFFSET``, as MicRec's main loss).
    """
    m = cfg.model
    for key in ("item_id", "tag"):
        if key not in vocab_sizes:
            raise KeyError(f"vocab_sizes lacks {key!r}. Received: {sorted(vocab_sizes)}")
    num_items = item_table.num_items
    if int(vocab_sizes["item_id"]) != num_items:
        raise ValueError(f"vocab_sizes['item_id'] must equal the item table's {num_items} rows. "
                         f"Received: {vocab_sizes['item_id']}")
    for key in ("item_mlp_units", "user_mlp_units"):
        units = list(getattr(m, key))
        if not units or units[-1] != m.output_dim:
            raise ValueError(f"model.{key}[-1] must equal model.output_dim={m.output_dim} (the "
                             f"tower output). Received: {units!r}")
    if item_counts is None:
        from micrec_tf.data.arrays import train_item_counts

        item_counts = train_item_counts(cfg.artifacts_dir)
    item_counts = np.asarray(item_counts).reshape(-1)
    if item_counts.size != num_items:
        raise ValueError(f"item_counts must have one entry per item ({num_items}). Received: "
                         f"{item_counts.size} entries")
    id_keep_mask = item_id_keep_mask(item_table, m.min_id_clicks)  # None: nothing masked
    if m.item_text:
        item_model = _content_item_model(cfg, item_table, vocab_sizes, id_keep_mask,
                                         text_vectors)
    else:
        item_model = TFRSItemModel(item_table.tags, int(vocab_sizes["tag"]), m.embedding_dim,
                                   m.item_mlp_units, m.dropout, id_keep_mask=id_keep_mask,
                                   name="item_model")
    profile = {n: int(vocab_sizes[n]) for n in _user_feature_names(user_fields, vocab_sizes)}
    user_model = TFRSUserModel(profile, item_model.id_embedding, m.user_mlp_units, m.dropout,
                               user_id_vocabulary=user_id_vocabulary, id_keep_mask=id_keep_mask,
                               name="user_model")
    task = InBatchSoftmax(candidate_probability_from_counts(item_counts),
                          remove_accidental_hits=cfg.loss.remove_accidental_hits, name="task")
    id_dropout = None
    if cfg.loss.id_dropout:
        id_dropout = IDFieldDropout(cfg.loss.id_dropout, m.embedding_dim,
                                    int(cfg.train.seed) + ID_DROPOUT_SEED_OFFSET,
                                    name="id_field_dropout")
    return TFRSTwoTowerModel(user_model, item_model, task, id_dropout=id_dropout,
                             name="tfrs_two_tower")


def _content_item_model(cfg, item_table, vocab_sizes, id_keep_mask,
                        text_vectors) -> TFRSContentItemModel:
    """``model.item_text``: the peer's item tower over ICAN + text's item fields."""
    m, num_items = cfg.model, item_table.num_items
    if "provider" not in vocab_sizes:
        raise KeyError(f"vocab_sizes lacks 'provider'. Received: {sorted(vocab_sizes)}")
    extra = item_extra_vocab_sizes(item_table, vocab_sizes)
    text_vectors = text_vectors_for(item_table, num_items, text_vectors)
    fields = ItemTextFieldEmbeddings(
        num_items, int(vocab_sizes["tag"]), int(vocab_sizes["provider"]), extra,
        m.embedding_dim, text_dim=int(text_vectors.shape[1]), text_vectors=text_vectors,
        id_keep_mask=id_keep_mask, name="item_field_embeddings")
    return TFRSContentItemModel(ItemFeatureLookup.from_item_table(item_table, name="item_lookup"),
                                fields, m.item_mlp_units, m.dropout, name="item_model")

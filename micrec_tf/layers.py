"""Small single-purpose Keras 2 layers shared by the towers (paper 3.1-3.3, 3.6).

Field conventions follow docs/ARCHITECTURE.md: every categorical index is int64, 0 = OOV/padding,
and the embedding of index 0 is always the zero vector. Item fields, in this fixed order, are

    item          [...]     item id
    item_tags     [..., T]  multi-valued, pooled by a masked mean over the non-zero tags
    item_provider [...]     provider
    item_<extra>  [...]     any extra categorical field, in the order given

and their stacked embeddings ``[..., F, D]`` reshaped to ``[..., F * D]`` are the raw item
embedding ``f^d`` of the paper. Leading dimensions are free, so the same layer embeds target items
``[B]``, catalogue items ``[N]`` and click histories ``[B, H]``.

Every layer is registered under the ``micrec_tf`` package and round-trips through
``get_config``/``from_config``.
"""
from __future__ import annotations

import math
import numbers
from typing import Mapping, Sequence

import micrec_tf  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow is imported)
import numpy as np
import tensorflow as tf
import tf_keras

from micrec_tf.config import ATTENTION_IMPLS
from micrec_tf.data.contract import ITEM, ITEM_PROVIDER, ITEM_TAGS, item_feature

register = tf_keras.saving.register_keras_serializable(package="micrec_tf")


# --------------------------------------------------------------------------------------------
# Argument checks: every layer validates its constructor arguments with these, so a layer used
# outside the config fails at construction with a one-line ``ValueError`` naming the argument.
# --------------------------------------------------------------------------------------------
def check_int(name: str, value, minimum: int = 1) -> int:
    """``value`` as an ``int`` if it is an integer >= ``minimum`` (bools are not)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}. Received: {name}={value!r}")
    return int(value)


def check_positive(name: str, value) -> float:
    """``value`` as a ``float`` if it is a real number > 0."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:
        raise ValueError(f"{name} must be > 0. Received: {name}={value!r}")
    return float(value)


def check_rate(name: str, value) -> float:
    """``value`` as a ``float`` if it is a real number in [0, 1) (a dropout rate)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < 1:
        raise ValueError(f"{name} must be in [0, 1). Received: {name}={value!r}")
    return float(value)


def check_choice(name: str, value, choices: Sequence):
    """``value`` if it is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}. Received: {name}={value!r}")
    return value


def check_units(units, who: str) -> list:
    """``units`` as a list of ints if it is a non-empty sequence of ints >= 1 (MLP widths)."""
    units = list(units)
    if not units or any(isinstance(u, bool) or not isinstance(u, (int, np.integer)) or u < 1
                        for u in units):
        raise ValueError(f"{who} units must be a non-empty list of positive ints. Received: "
                         f"units={units!r}")
    return [int(u) for u in units]


def serialize(layer: tf_keras.layers.Layer) -> dict:
    """Keras serialization of a (micrec_tf or stock) layer, for nesting in ``get_config``."""
    return tf_keras.layers.serialize(layer)


def deserialize(config):
    """Inverse of :func:`serialize`; passes layer instances through unchanged."""
    if isinstance(config, tf_keras.layers.Layer):
        return config
    return tf_keras.layers.deserialize(config)


def scalar_feature(x: tf.Tensor, name: str) -> tf.Tensor:
    """A per-example scalar feature as ``[B]``: accepts ``[B]`` or ``[B, 1]``."""
    x = tf.convert_to_tensor(x)
    if x.shape.rank == 2 and x.shape[-1] == 1:
        return tf.squeeze(x, axis=-1)
    if x.shape.rank not in (None, 1):
        raise ValueError(f"feature {name!r} must have shape [B] or [B, 1]. Received: shape "
                         f"{x.shape}")
    return x


def require_features(features: Mapping, names: Sequence[str], who: str) -> None:
    """Raises a ``KeyError`` naming the missing features and the ones received."""
    if not isinstance(features, Mapping):
        raise TypeError(f"{who} expects a dict of features. Received: "
                        f"{type(features).__name__}")
    missing = [n for n in names if n not in features]
    if missing:
        raise KeyError(f"{who} is missing feature(s) {missing}; received {sorted(features)}")


def masked_mean(x: tf.Tensor, mask: tf.Tensor, axis: int) -> tf.Tensor:
    """Mean of ``x`` over ``axis`` counting only entries where ``mask`` (same shape as ``x``
    without its last dimension) is true; all-masked slices give zeros."""
    m = tf.cast(mask, x.dtype)[..., tf.newaxis]
    total = tf.reduce_sum(x * m, axis=axis)
    count = tf.reduce_sum(m, axis=axis)
    return total / tf.maximum(count, tf.ones_like(count))


def _zero_padding(embeddings: tf.Tensor, indices: tf.Tensor) -> tf.Tensor:
    return embeddings * tf.cast(indices > 0, embeddings.dtype)[..., tf.newaxis]


@register
class ItemFeatureLookup(tf_keras.layers.Layer):
    """Maps item indices to their fields with the catalogue item table held as constant tensors.

    Any index (targets, sampled negatives, history clicks) can thus be embedded.

    Args:
      tags: int [V, T] tag indices, 0-padded.
      provider: int [V] provider indices.
      extra: {feature name (e.g. ``"item_year"``): int [V]}.

    Call: ``indices`` int [...] -> {``item`` [...], ``item_tags`` [..., T], ``item_provider``
    [...], ``item_<extra>`` [...]}, all int64.
    """

    def __init__(self, tags, provider, extra: Mapping | None = None, **kwargs):
        super().__init__(trainable=False, **kwargs)
        tags = np.asarray(tags, dtype=np.int64)
        provider = np.asarray(provider, dtype=np.int64)
        extra = {k: np.asarray(v, dtype=np.int64) for k, v in (extra or {}).items()}
        if tags.ndim != 2:
            raise ValueError(f"item table tags must be [V, T]. Received: shape {tags.shape}")
        if provider.shape != (tags.shape[0],):
            raise ValueError(f"item table provider must be [V]={tags.shape[0]}. Received: shape "
                             f"{provider.shape}")
        prefix = item_feature("")  # "item_": extra fields are item_<field> features
        for name, col in extra.items():
            if not name.startswith(prefix):
                raise ValueError(f"extra item field names must start with {prefix!r}. Received: "
                                 f"{name!r}")
            if col.shape != (tags.shape[0],):
                raise ValueError(f"item table extra[{name!r}] must be [V]={tags.shape[0]}. "
                                 f"Received: shape {col.shape}")
        self._tags_np, self._provider_np, self._extra_np = tags, provider, extra
        self.tags = tf.constant(tags)
        self.provider = tf.constant(provider)
        self.extra = {k: tf.constant(v) for k, v in extra.items()}

    @classmethod
    def from_item_table(cls, item_table, **kwargs) -> "ItemFeatureLookup":
        """Builds the lookup from a :class:`micrec_tf.data.artifacts.ItemTable`."""
        return cls(item_table.tags, item_table.provider, dict(item_table.extra), **kwargs)

    @property
    def num_items(self) -> int:
        return int(self._tags_np.shape[0])

    @property
    def extra_names(self) -> list:
        return list(self._extra_np)

    def call(self, indices):
        indices = tf.cast(indices, tf.int64)
        out = {ITEM: indices, ITEM_TAGS: tf.gather(self.tags, indices),
               ITEM_PROVIDER: tf.gather(self.provider, indices)}
        for name, col in self.extra.items():
            out[name] = tf.gather(col, indices)
        return out

    def get_config(self):
        config = super().get_config()
        config.pop("trainable", None)
        config.update(tags=self._tags_np.tolist(), provider=self._provider_np.tolist(),
                      extra={k: v.tolist() for k, v in self._extra_np.items()})
        return config


@register
class ItemFieldEmbeddings(tf_keras.layers.Layer):
    """Item field embeddings (paper 3.3: ``f^d = [f^I; f^T; f^P; ...]``), ``embedding_dim`` each.

    Args:
      num_items, num_tags, num_providers: vocabulary sizes including the OOV slot 0.
      extra_vocab_sizes: {``item_<extra>``: vocabulary size}, in field order.
      embedding_dim: D, 64 in the paper.
      id_keep_mask: bool [num_items], False for an item whose ID row must never be used
        (``model.min_id_clicks``: fewer training clicks than the threshold): its ID field
        ``f^I`` is the zero vector, as if the field were dropped, wherever the item is embedded
        (positives, negatives, history clicks, CL views, export). Held in a non-trainable weight
        ``item_id_keep_mask`` (float32 [num_items], saved in checkpoints, not in the config).
        None (default): no mask and no extra weight, the layer of before, bit for bit.
      id_masked: whether the layer has that weight; ``from_config`` passes True and the
        checkpoint restores the values (initialised to ones: every ID row used). Implied by a
        non-None ``id_keep_mask``.

    Call: ``features`` dict (see module docstring) with leading shape ``S`` and optional
    ``tag_keep_mask`` bool [S..., T] (categorical feature dropout) -> ``[S..., F, D]``.
    """

    def __init__(self, num_items: int, num_tags: int, num_providers: int,
                 extra_vocab_sizes: Mapping | None = None, embedding_dim: int = 64,
                 id_keep_mask=None, id_masked: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.num_items = check_int("num_items", num_items)
        self.num_tags = check_int("num_tags", num_tags)
        self.num_providers = check_int("num_providers", num_providers)
        self.extra_vocab_sizes = {k: check_int(f"extra_vocab_sizes[{k!r}]", v)
                                  for k, v in (extra_vocab_sizes or {}).items()}
        self.embedding_dim = check_int("embedding_dim", embedding_dim)
        emb = tf_keras.layers.Embedding
        dim = self.embedding_dim
        self.item_embedding = emb(self.num_items, dim, name="item_id_embedding")
        self.tag_embedding = emb(self.num_tags, dim, name="tag_embedding")
        self.provider_embedding = emb(self.num_providers, dim, name="provider_embedding")
        self.extra_embeddings = [emb(v, dim, name=f"{k}_embedding")
                                 for k, v in self.extra_vocab_sizes.items()]
        if id_keep_mask is not None:
            id_keep_mask = np.asarray(id_keep_mask)
            if id_keep_mask.shape != (self.num_items,):
                raise ValueError(f"id_keep_mask must be [num_items]=[{self.num_items}]. "
                                 f"Received: shape {id_keep_mask.shape}")
            id_keep_mask = id_keep_mask.astype(bool).astype(np.float32)
        if not isinstance(id_masked, (bool, np.bool_)):
            raise ValueError(f"id_masked must be a bool. Received: {id_masked!r}")
        self.id_masked = bool(id_masked) or id_keep_mask is not None
        self._id_keep_np = id_keep_mask
        self.id_keep = None  # the float32 [num_items] weight, built when id_masked

    def build(self, input_shape=None):
        if self.id_masked and self.id_keep is None:
            self.id_keep = self.add_weight(
                name="item_id_keep_mask", shape=[self.num_items], dtype=tf.float32,
                initializer="ones", trainable=False)
            if self._id_keep_np is not None:
                self.id_keep.assign(self._id_keep_np)
                self._id_keep_np = None  # the weight holds it now
        super().build(input_shape)

    @property
    def field_names(self) -> list:
        return [ITEM, ITEM_TAGS, ITEM_PROVIDER, *self.extra_vocab_sizes]

    def id_field(self, ids) -> tf.Tensor:
        """Item indices int64 [S...] -> ID field ``f^I`` [S..., D]: zero for the padding row 0
        and, with ``id_keep_mask``, for every item whose ID row is masked."""
        field = _zero_padding(self.item_embedding(ids), ids)
        if not self.id_masked:
            return field
        if not self.built:
            self.build(None)
        keep = tf.gather(self.id_keep, ids)
        return field * tf.cast(keep, field.dtype)[..., tf.newaxis]

    @property
    def num_fields(self) -> int:
        return len(self.field_names)

    def call(self, features, tag_keep_mask=None):
        require_features(features, self.field_names, "ItemFieldEmbeddings")
        ids = tf.cast(features[ITEM], tf.int64)
        tags = tf.cast(features[ITEM_TAGS], tf.int64)
        if tags.shape.rank is not None and ids.shape.rank is not None and (
                tags.shape.rank != ids.shape.rank + 1):
            raise ValueError(f"{ITEM_TAGS} must have one more dimension than {ITEM}. Received: "
                             f"{ITEM} {ids.shape}, {ITEM_TAGS} {tags.shape}")
        fields = [self.id_field(ids)]
        tag_mask = tags > 0
        if tag_keep_mask is not None:
            tag_mask = tf.logical_and(tag_mask, tf.cast(tag_keep_mask, tf.bool))
        fields.append(masked_mean(self.tag_embedding(tags), tag_mask, axis=-2))
        provider = tf.cast(features[ITEM_PROVIDER], tf.int64)
        fields.append(_zero_padding(self.provider_embedding(provider), provider))
        for name, layer in zip(self.extra_vocab_sizes, self.extra_embeddings):
            idx = tf.cast(features[name], tf.int64)
            fields.append(_zero_padding(layer(idx), idx))
        return tf.stack(fields, axis=-2)

    def get_config(self):
        config = super().get_config()
        config.update(num_items=self.num_items, num_tags=self.num_tags,
                      num_providers=self.num_providers,
                      extra_vocab_sizes=dict(self.extra_vocab_sizes),
                      embedding_dim=self.embedding_dim)
        if self.id_masked:  # only then: the config of an unmasked layer is as before
            config.update(id_masked=True)
        return config


@register
class UserFieldEmbeddings(tf_keras.layers.Layer):
    """User profile field embeddings (paper 5.3: gender, age, ..., 64-d each).

    Args:
      vocab_sizes: {feature name ``user_<field>``: vocabulary size incl. OOV 0}, in field order.
      embedding_dim: D.

    Call: features with ``user_<field>`` int [B] or [B, 1] -> ``[B, F_u, D]`` (``F_u`` may be 0,
    then ``[B, 0, D]`` with ``B`` taken from ``batch_size_from`` [B, ...]).
    """

    def __init__(self, vocab_sizes: Mapping, embedding_dim: int = 64, **kwargs):
        super().__init__(**kwargs)
        self.vocab_sizes = {k: check_int(f"vocab_sizes[{k!r}]", v) for k, v in vocab_sizes.items()}
        self.embedding_dim = check_int("embedding_dim", embedding_dim)
        self.embeddings = [tf_keras.layers.Embedding(v, self.embedding_dim, name=f"{k}_embedding")
                           for k, v in self.vocab_sizes.items()]

    @property
    def field_names(self) -> list:
        return list(self.vocab_sizes)

    def call(self, features, batch_size_from=None):
        require_features(features, self.field_names, "UserFieldEmbeddings")
        if not self.embeddings:
            if batch_size_from is None:
                raise ValueError("UserFieldEmbeddings has no fields: pass batch_size_from")
            b = tf.shape(batch_size_from)[0]
            return tf.zeros(tf.stack([b, 0, self.embedding_dim]), dtype=self.compute_dtype)
        fields = []
        for name, layer in zip(self.vocab_sizes, self.embeddings):
            idx = tf.cast(scalar_feature(features[name], name), tf.int64)
            fields.append(_zero_padding(layer(idx), idx))
        return tf.stack(fields, axis=1)

    def get_config(self):
        config = super().get_config()
        config.update(vocab_sizes=dict(self.vocab_sizes), embedding_dim=self.embedding_dim)
        return config


@register
class MLP(tf_keras.layers.Layer):
    """Stack of Dense layers (the paper's 3-layer MLPs, units 128/64/64).

    Hidden layers use ``activation`` and optional dropout; the last layer uses
    ``final_activation`` (linear by default, the tower output). ``[..., in] -> [..., units[-1]]``.
    """

    def __init__(self, units: Sequence[int], activation: str = "relu", dropout: float = 0.0,
                 final_activation: str | None = None, **kwargs):
        super().__init__(**kwargs)
        self.units = check_units(units, "MLP")
        self.activation = activation
        self.dropout = check_rate("dropout", dropout)
        self.final_activation = final_activation
        self.dense_layers = [
            tf_keras.layers.Dense(
                u, activation=activation if i < len(self.units) - 1 else final_activation,
                name=f"dense_{i}")
            for i, u in enumerate(self.units)]
        self.dropout_layers = [tf_keras.layers.Dropout(self.dropout) for _ in self.units[:-1]]

    def call(self, x, training=None):
        for i, dense in enumerate(self.dense_layers):
            x = dense(x)
            if i < len(self.dropout_layers) and self.dropout > 0:
                x = self.dropout_layers[i](x, training=training)
        return x

    def get_config(self):
        config = super().get_config()
        config.update(units=list(self.units), activation=self.activation, dropout=self.dropout,
                      final_activation=self.final_activation)
        return config


@register
class PositionEmbedding(tf_keras.layers.Layer):
    """Learned position embeddings added to a sequence: ``[B, L, D] -> [B, L, D]``."""

    def build(self, input_shape):
        if input_shape[-2] is None or input_shape[-1] is None:
            raise ValueError(f"PositionEmbedding needs a static [B, L, D] shape. Received: "
                             f"{input_shape}")
        self.positions = self.add_weight(
            name="positions", shape=(int(input_shape[-2]), int(input_shape[-1])),
            initializer=tf_keras.initializers.RandomNormal(stddev=0.02))
        super().build(input_shape)

    def call(self, x):
        return x + tf.cast(self.positions, x.dtype)


@register
class TransformerEncoderBlock(tf_keras.layers.Layer):
    """Post-LN transformer encoder block with a key padding mask (paper eq. 6).

    Call: ``x`` [B, L, D], ``mask`` bool [B, L] (true = real entry) -> [B, L, D]. Padded query
    positions are zeroed in the output; a fully padded row attends uniformly and is zeroed.

    ``attention`` (``model.attention``, one of :data:`micrec_tf.config.ATTENTION_IMPLS`):
    ``matmul`` projects with plain matmuls and forms the [B, heads, L, L] scores and weighted
    sums as transposed batched matmuls; ``einsum`` calls tf_keras's MultiHeadAttention (its
    einsum path runs the small L x head_dim x L products at a fraction of the CPU's matmul
    speed). Both use the same MultiHeadAttention variables, so they compute the same function
    and share checkpoints.
    """

    def __init__(self, num_heads: int = 2, ff_dim: int | None = None, dropout: float = 0.0,
                 attention: str = "matmul", **kwargs):
        super().__init__(**kwargs)
        self.num_heads = check_int("num_heads", num_heads)
        self.ff_dim = None if ff_dim is None else check_int("ff_dim", ff_dim)
        self.dropout = check_rate("dropout", dropout)
        self.attention_impl = check_choice("attention", attention, ATTENTION_IMPLS)

    def build(self, input_shape):
        if len(input_shape) != 3 or input_shape[-1] is None:
            raise ValueError(f"TransformerEncoderBlock expects [B, L, D] with static D. "
                             f"Received: {input_shape}")
        d = int(input_shape[-1])
        self.attention = tf_keras.layers.MultiHeadAttention(
            self.num_heads, key_dim=max(1, math.ceil(d / self.num_heads)), dropout=self.dropout,
            name="attention")
        # Create its variables now, so that the matmul path (which never calls the layer) and
        # the einsum path own the same ones.
        shape = tf.TensorShape(input_shape)
        mha = self.attention
        mha._build_from_signature(shape, shape)
        heads_shape = shape[:-1].concatenate([mha._num_heads, mha._value_dim])
        with tf.name_scope(mha.name):
            for dense, in_shape in ((mha._query_dense, shape), (mha._key_dense, shape),
                                    (mha._value_dense, shape), (mha._output_dense, heads_shape)):
                with tf.name_scope(dense.name):
                    dense.build(in_shape)
        self.ffn = MLP([self.ff_dim or d, d], activation="relu", name="ffn")
        self.norm1 = tf_keras.layers.LayerNormalization(epsilon=1e-6, name="norm1")
        self.norm2 = tf_keras.layers.LayerNormalization(epsilon=1e-6, name="norm2")
        self.drop1 = tf_keras.layers.Dropout(self.dropout)
        self.drop2 = tf_keras.layers.Dropout(self.dropout)
        super().build(input_shape)

    def call(self, x, mask=None, training=None):
        if mask is None:
            mask = tf.ones(tf.shape(x)[:2], dtype=tf.bool)
        mask = tf.cast(mask, tf.bool)
        if self.attention_impl == "matmul":
            h = self._attend_matmul(x, mask, training)
        else:
            attention_mask = mask[:, tf.newaxis, :]  # [B, 1(query), L(key)] over the queries
            attention_mask = tf.logical_and(attention_mask, tf.ones_like(mask)[:, :, tf.newaxis])
            h = self.attention(x, x, attention_mask=attention_mask, training=training)
        x = self.norm1(x + self.drop1(h, training=training))
        x = self.norm2(x + self.drop2(self.ffn(x, training=training), training=training))
        return x * tf.cast(mask, x.dtype)[..., tf.newaxis]

    def _attend_matmul(self, x, mask, training):
        """MultiHeadAttention(x, x) with a key padding mask, as matmuls: [B, L, D] -> [B, L, D].

        The same arithmetic as tf_keras's layer: query scaled by 1/sqrt(head_dim), masked
        scores + the dtype's large negative, softmax over the keys, its dropout, output dense.
        """
        mha = self.attention
        heads, key_dim, value_dim = mha._num_heads, mha._key_dim, mha._value_dim
        length, d = x.shape[1], x.shape[2]
        flat = tf.reshape(x, [-1, d])

        def project(dense, width):  # [B * L, D] -> [B, heads, L, width]
            y = tf.matmul(flat, tf.cast(tf.reshape(dense.kernel, [d, heads * width]), x.dtype))
            if dense.bias is not None:
                y = y + tf.cast(tf.reshape(dense.bias, [heads * width]), x.dtype)
            return tf.transpose(tf.reshape(y, [-1, length, heads, width]), [0, 2, 1, 3])

        query = project(mha._query_dense, key_dim) * tf.cast(1.0 / math.sqrt(key_dim), x.dtype)
        scores = tf.matmul(query, project(mha._key_dense, key_dim), transpose_b=True)
        # tf_keras's Softmax mask value: half of float16's lowest, else -1e9.
        negative = float(tf.float16.min) / 2.0 if x.dtype == tf.float16 else -1e9
        keys = tf.cast(mask, scores.dtype)[:, tf.newaxis, tf.newaxis, :]  # [B, 1, 1, L]
        probs = tf.nn.softmax(scores + (1.0 - keys) * negative, axis=-1)
        probs = mha._dropout_layer(probs, training=training)
        out = tf.matmul(probs, project(mha._value_dense, value_dim))  # [B, heads, L, value_dim]
        out = tf.reshape(tf.transpose(out, [0, 2, 1, 3]), [-1, heads * value_dim])
        dense = mha._output_dense
        out = tf.matmul(out, tf.cast(tf.reshape(dense.kernel, [heads * value_dim, d]), x.dtype))
        if dense.bias is not None:
            out = out + tf.cast(dense.bias, x.dtype)
        return tf.reshape(out, [-1, length, d])

    def compute_mask(self, inputs, mask=None):
        return None

    def get_config(self):
        config = super().get_config()
        config.update(num_heads=self.num_heads, ff_dim=self.ff_dim, dropout=self.dropout,
                      attention=self.attention_impl)
        return config


@register
class AutoIntInteraction(tf_keras.layers.Layer):
    """AutoInt interacting layer: multi-head self-attention over fields with a residual projection
    and ReLU (Song et al., 2019). ``[B, F, D] -> [B, F, num_heads * head_dim]``."""

    def __init__(self, num_heads: int = 2, head_dim: int = 32, use_residual: bool = True,
                 **kwargs):
        super().__init__(**kwargs)
        self.num_heads = check_int("num_heads", num_heads)
        self.head_dim = check_int("head_dim", head_dim)
        self.use_residual = bool(use_residual)

    def build(self, input_shape):
        if len(input_shape) != 3 or input_shape[-1] is None:
            raise ValueError(f"AutoIntInteraction expects [B, F, D] with static D. Received: "
                             f"{input_shape}")
        d, out = int(input_shape[-1]), self.num_heads * self.head_dim
        init = "glorot_uniform"  # a fresh initializer per weight (distinct values)
        self.w_query = self.add_weight(name="w_query", shape=(d, out), initializer=init)
        self.w_key = self.add_weight(name="w_key", shape=(d, out), initializer=init)
        self.w_value = self.add_weight(name="w_value", shape=(d, out), initializer=init)
        if self.use_residual:
            self.w_residual = self.add_weight(name="w_residual", shape=(d, out), initializer=init)
        super().build(input_shape)

    def call(self, x):
        def heads(w):  # [B, F, D] -> [B, heads, F, head_dim]
            y = tf.einsum("bfd,do->bfo", x, tf.cast(w, x.dtype))
            y = tf.reshape(y, tf.concat([tf.shape(y)[:2], [self.num_heads, self.head_dim]], 0))
            return tf.transpose(y, [0, 2, 1, 3])

        q, k, v = heads(self.w_query), heads(self.w_key), heads(self.w_value)
        weights = tf.nn.softmax(tf.einsum("bhqd,bhkd->bhqk", q, k), axis=-1)
        y = tf.transpose(tf.einsum("bhqk,bhkd->bhqd", weights, v), [0, 2, 1, 3])
        y = tf.reshape(y, tf.concat([tf.shape(y)[:2], [self.num_heads * self.head_dim]], 0))
        if self.use_residual:
            y = y + tf.einsum("bfd,do->bfo", x, tf.cast(self.w_residual, x.dtype))
        return tf.nn.relu(y)

    def get_config(self):
        config = super().get_config()
        config.update(num_heads=self.num_heads, head_dim=self.head_dim,
                      use_residual=self.use_residual)
        return config

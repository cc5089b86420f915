"""Item and user towers of the two-tower matching models (paper 3.1.1, 3.6, 5.2).

Item towers share one interface, so every contrastive task plugs onto any of them:

* ``raw_embedding(features, tag_keep_mask=None)`` -> ``f^d`` [B, F * D] (the raw item embedding)
* ``encode(f_d, training)`` -> item vector [B, output_dim] (``DNN^d``)
* ``call(features)`` = ``encode(raw_embedding(features))``
* ``embed_indices(indices)`` -> [N, output_dim] for any item index (targets, sampled negatives,
  neighbours), through the catalogue item table held by :class:`ItemFeatureLookup`.

User towers embed the click history with the SAME item field embeddings as the item tower and
take ``user_<field>`` [B], ``hist_items`` [B, H] and ``hist_len`` [B] -> [B, output_dim].

With ``model.item_text`` the field embeddings are :class:`micrec_tf.layers_text.
ItemTextFieldEmbeddings` (one more field, the projected frozen text vector of the item index):
every tower below takes them unchanged, with ``F`` counting the text field.

Model families (config ``model.name``):

=========== ===================================== =========================================
name        user tower                            item tower
=========== ===================================== =========================================
ican        transformer over history, flatten,    MLP(f^d)
            concat profile, MLP 128/64/64
youtubednn  MLP(mean history f^d ++ profile)      MLP(f^d)
fm          sum of profile fields + mean history  sum of item fields (score = FM cross terms)
deepfm      [FM vector ; MLP(...)]                [sum of fields ; MLP(f^d)] (score = FM + DNN)
autoint     AutoInt over profile + history fields AutoInt over item fields
=========== ===================================== =========================================
"""
from __future__ import annotations

from typing import Sequence

import micrec_tf  # noqa: F401
import tensorflow as tf
import tf_keras

from micrec_tf.config import ATTENTION_IMPLS, HISTORY_EMBEDDINGS
from micrec_tf.data.contract import HIST_ITEMS, HIST_LEN, ITEM_TAGS
from micrec_tf.layers import (
    MLP, AutoIntInteraction, ItemFeatureLookup, ItemFieldEmbeddings, PositionEmbedding,
    TransformerEncoderBlock, UserFieldEmbeddings, check_choice, check_int, check_rate,
    check_units, deserialize, masked_mean, register, require_features, scalar_feature, serialize)

# How a user tower embeds the clicks of its history (``model.history_embeddings``, one of
# :data:`micrec_tf.config.HISTORY_EMBEDDINGS`): ``slots`` embeds each of the B x H history slots;
# ``table`` embeds (and for ICAN projects) every catalogue item once per call and gathers the
# history rows from that table, which is the same computation per row, so the same result
# (exact: ICAN's projection has no bias), far cheaper when V < B x H, and it hands sparse Adam V
# gradient rows instead of B x H x T; ``unique`` (issue 31) embeds (and projects) only the
# distinct items of the call's history (``tf.unique`` over the B x H ids) and gathers the slots
# from those U rows, the same rows again, for catalogues far larger than B x H where a few
# popular items fill most slots; ``auto`` takes the table when the catalogue has fewer items than
# the call has history slots; above that, a training call of known batch size takes ``unique``
# (issue 31; measured faster at 100,000 and 1,000,000 items, docs/BENCHMARKS.md) and every other
# call (inference: the serving signature, evaluation) the slots. Before issue 31's default change
# ``auto`` never took ``unique`` (the slots above the table's threshold): ``slots`` is that path.
HISTORY_PATHS = ("table", "slots", "unique")


def history_path(mode: str, num_items: int, batch_size: int | None, history_length: int,
                 training: bool = False) -> str:
    """-> how one call embeds its ``batch_size`` x ``history_length`` history slots: one of
    :data:`HISTORY_PATHS` (``batch_size`` None: unknown, taken as small).

    ``mode`` other than ``auto`` is the path itself. ``auto``: ``table`` when ``num_items`` <
    ``batch_size`` x ``history_length``; else ``unique`` for a ``training`` call of known
    ``batch_size``, ``slots`` otherwise (unknown batch size, or inference: the exported model's
    forward pass as before). ``model.history_embeddings: slots`` keeps the old ``auto`` above
    the threshold (training per slot too)."""
    if mode not in HISTORY_EMBEDDINGS:
        raise ValueError(f"history_embeddings must be one of {HISTORY_EMBEDDINGS}. "
                         f"Received: {mode!r}")
    if mode != "auto":
        return mode
    if not batch_size:
        return "slots"
    if num_items < batch_size * history_length:
        return "table"
    return "unique" if training else "slots"


def use_history_table(mode: str, num_items: int, batch_size: int | None, history_length: int
                      ) -> bool:
    """Whether ``mode`` embeds the history through the catalogue table for one call of
    ``batch_size`` x ``history_length`` slots (``batch_size`` None: unknown, taken as small).
    ``unique`` is not the table (False): it embeds the call's distinct history items."""
    return history_path(mode, num_items, batch_size, history_length) == "table"


# --------------------------------------------------------------------------------------------
# Item towers
# --------------------------------------------------------------------------------------------
class ItemTower(tf_keras.layers.Layer):
    """Base item tower: field embeddings -> ``f^d`` -> :meth:`encode` (subclasses)."""

    def __init__(self, item_lookup: ItemFeatureLookup, field_embeddings: ItemFieldEmbeddings,
                 **kwargs):
        super().__init__(**kwargs)
        self.item_lookup = deserialize(item_lookup)
        self.field_embeddings = deserialize(field_embeddings)
        if not isinstance(self.item_lookup, ItemFeatureLookup):
            raise TypeError(f"item_lookup must be an ItemFeatureLookup. Received: "
                            f"{type(self.item_lookup).__name__}")
        if not isinstance(self.field_embeddings, ItemFieldEmbeddings):
            raise TypeError(f"field_embeddings must be an ItemFieldEmbeddings. Received: "
                            f"{type(self.field_embeddings).__name__}")
        missing = set(self.item_lookup.extra_names) ^ set(self.field_embeddings.extra_vocab_sizes)
        if missing:
            raise ValueError(f"item table extra fields {self.item_lookup.extra_names} differ from "
                             f"the embedded extra fields "
                             f"{list(self.field_embeddings.extra_vocab_sizes)}")

    # --- shape helpers -------------------------------------------------------------------
    @property
    def num_fields(self) -> int:
        return self.field_embeddings.num_fields

    @property
    def embedding_dim(self) -> int:
        return self.field_embeddings.embedding_dim

    @property
    def feature_names(self) -> list:
        """Batch feature names the tower reads (``item``, ``item_tags``, ...)."""
        return self.field_embeddings.field_names

    @property
    def output_dim(self) -> int:
        raise NotImplementedError

    def fields(self, f_d: tf.Tensor) -> tf.Tensor:
        """``f^d`` [B, F * D] -> stacked field embeddings [B, F, D]."""
        return tf.reshape(f_d, [-1, self.num_fields, self.embedding_dim])

    # --- embedding paths -----------------------------------------------------------------
    def features_for(self, indices) -> dict:
        """Item indices [...] -> the item's fields from the catalogue table."""
        return self.item_lookup(indices)

    def raw_embedding(self, features, tag_keep_mask=None) -> tf.Tensor:
        """Item features [B] -> raw item embedding ``f^d`` [B, F * D]."""
        require_features(features, self.feature_names, type(self).__name__)
        inputs = {k: features[k] if k == ITEM_TAGS else scalar_feature(features[k], k)
                  for k in self.feature_names}
        fields = self.field_embeddings(inputs, tag_keep_mask=tag_keep_mask)
        return tf.reshape(fields, [-1, self.num_fields * self.embedding_dim])

    def encode(self, f_d: tf.Tensor, training=None) -> tf.Tensor:
        """``f^d`` [B, F * D] -> item vector [B, output_dim]."""
        raise NotImplementedError

    def call(self, features, training=None):
        return self.encode(self.raw_embedding(features), training=training)

    def embed_indices(self, indices, training=None) -> tf.Tensor:
        """Item indices [N] -> item vectors [N, output_dim] (any index, via the item table)."""
        return self.encode(self.raw_embedding(self.features_for(indices)), training=training)

    def get_config(self):
        config = super().get_config()
        config.update(item_lookup=serialize(self.item_lookup),
                      field_embeddings=serialize(self.field_embeddings))
        return config


@register
class MLPItemTower(ItemTower):
    """ICAN / YoutubeDNN / MicRec item tower: ``d = MLP_d(f^d)`` (paper 3.6)."""

    def __init__(self, item_lookup, field_embeddings, units: Sequence[int] = (128, 64, 64),
                 dropout: float = 0.0, **kwargs):
        super().__init__(item_lookup, field_embeddings, **kwargs)
        self.units, self.dropout = check_units(units, "item tower"), check_rate("dropout", dropout)
        self.mlp = MLP(self.units, dropout=self.dropout, name="item_mlp")

    @property
    def output_dim(self) -> int:
        return self.units[-1]

    def encode(self, f_d, training=None):
        return self.mlp(f_d, training=training)

    def get_config(self):
        config = super().get_config()
        config.update(units=list(self.units), dropout=self.dropout)
        return config


@register
class FMItemTower(ItemTower):
    """FM item side: the sum of the item's field vectors, ``[B, D]``. Its dot product with the
    FM user vector is the sum of all user-field x item-field second-order cross terms."""

    @property
    def output_dim(self) -> int:
        return self.embedding_dim

    def encode(self, f_d, training=None):
        return tf.reduce_sum(self.fields(f_d), axis=1)


@register
class DeepFMItemTower(ItemTower):
    """DeepFM item side: ``[sum of fields ; MLP(f^d)]``, so the dot product with the DeepFM user
    vector is the FM score plus the DNN score."""

    def __init__(self, item_lookup, field_embeddings, units: Sequence[int] = (128, 64, 64),
                 dropout: float = 0.0, **kwargs):
        super().__init__(item_lookup, field_embeddings, **kwargs)
        self.units, self.dropout = check_units(units, "item tower"), check_rate("dropout", dropout)
        self.mlp = MLP(self.units, dropout=self.dropout, name="item_dnn")

    @property
    def output_dim(self) -> int:
        return self.embedding_dim + self.units[-1]

    def encode(self, f_d, training=None):
        fm = tf.reduce_sum(self.fields(f_d), axis=1)
        return tf.concat([fm, self.mlp(f_d, training=training)], axis=-1)

    def get_config(self):
        config = super().get_config()
        config.update(units=list(self.units), dropout=self.dropout)
        return config


def _autoint_stack(num_layers, num_heads, embedding_dim, prefix):
    head_dim = max(1, embedding_dim // num_heads)
    return [AutoIntInteraction(num_heads, head_dim, name=f"{prefix}_{i}")
            for i in range(num_layers)]


class _AutoIntHead:
    """Shared by the AutoInt towers: interacting layers over field vectors, flatten, Dense."""

    def _build_autoint(self, output_dim, num_heads, num_layers, embedding_dim, side):
        self._output_dim = check_int("output_dim", output_dim)
        self.num_heads = check_int("num_heads", num_heads)
        self.num_layers = check_int("num_layers", num_layers, minimum=0)
        self.interactions = _autoint_stack(num_layers, num_heads, embedding_dim, f"{side}_autoint")
        self.flatten = tf_keras.layers.Flatten()
        self.output_layer = tf_keras.layers.Dense(self._output_dim, name=f"{side}_output")

    @property
    def output_dim(self) -> int:
        return self._output_dim

    def _interact(self, x):
        """[B, F, D] field vectors -> [B, output_dim]."""
        for layer in self.interactions:
            x = layer(x)
        return self.output_layer(self.flatten(x))


@register
class AutoIntItemTower(_AutoIntHead, ItemTower):
    """AutoInt item side: interacting layers over the item fields, flatten, Dense to output."""

    def __init__(self, item_lookup, field_embeddings, output_dim: int = 64, num_heads: int = 2,
                 num_layers: int = 1, **kwargs):
        super().__init__(item_lookup, field_embeddings, **kwargs)
        self._build_autoint(output_dim, num_heads, num_layers, self.embedding_dim, "item")

    def encode(self, f_d, training=None):
        return self._interact(self.fields(f_d))

    def get_config(self):
        config = super().get_config()
        config.update(output_dim=self._output_dim, num_heads=self.num_heads,
                      num_layers=self.num_layers)
        return config


# --------------------------------------------------------------------------------------------
# User towers
# --------------------------------------------------------------------------------------------
class UserTower(tf_keras.layers.Layer):
    """Base user tower: history clicks embedded with the shared item field embeddings, plus the
    user profile field embeddings.

    ``history_embeddings``: see :data:`HISTORY_EMBEDDINGS` and :func:`history_path`. Under
    ``auto`` a call's batch size is its static one, or, for a training call whose batch dimension
    is unknown (Keras's ``train_step``), ``history_batch_hint`` (the configured training batch
    size); with V items and H history slots a call takes the catalogue table when V < B x H,
    else a training call embeds the distinct items (``unique``) and an inference call (the
    serving signature, evaluation: unknown or static batch size) the slots, as before issue 31.
    ``history_embeddings="slots"`` gives the old ``auto`` above V >= B x H in training too.
    """

    def __init__(self, item_lookup: ItemFeatureLookup, item_field_embeddings: ItemFieldEmbeddings,
                 user_field_embeddings: UserFieldEmbeddings, history_embeddings: str = "auto",
                 history_batch_hint: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.item_lookup = deserialize(item_lookup)
        self.item_field_embeddings = deserialize(item_field_embeddings)
        self.user_field_embeddings = deserialize(user_field_embeddings)
        use_history_table(history_embeddings, 1, None, 1)  # validates the mode
        self.history_embeddings = history_embeddings
        self.history_batch_hint = check_int("history_batch_hint", history_batch_hint, minimum=0)

    @property
    def feature_names(self) -> list:
        return [*self.user_field_embeddings.field_names, HIST_ITEMS, HIST_LEN]

    @property
    def output_dim(self) -> int:
        raise NotImplementedError

    def history(self, features, transform=None, training=None):
        """-> ``transform`` of each history click's field embeddings, [B, H, ...] (default: the
        field embeddings themselves, [B, H, F, D]), and the validity mask bool [B, H].

        ``transform`` maps [..., F, D] to [..., X] row by row; it runs on the B x H slots or,
        through the catalogue table (see :data:`HISTORY_EMBEDDINGS`), on the V items once.
        """
        require_features(features, self.feature_names, type(self).__name__)
        hist = tf.cast(features[HIST_ITEMS], tf.int64)
        if hist.shape.rank != 2:
            raise ValueError(f"{HIST_ITEMS} must be [B, H]. Received: shape {hist.shape}")
        length = tf.cast(scalar_feature(features[HIST_LEN], HIST_LEN), tf.int64)
        mask = tf.range(tf.shape(hist, out_type=tf.int64)[1])[tf.newaxis, :] < length[:, tf.newaxis]
        transform = transform or (lambda x: x)
        num_items = self.item_lookup.num_items
        training = not tf.is_tensor(training) and bool(training)  # a tensor: as inference
        batch = hist.shape[0] or (self.history_batch_hint if training else None)
        path = history_path(self.history_embeddings, num_items, batch, hist.shape[1] or 1,
                            training)
        if path == "table":
            catalogue = tf.range(num_items, dtype=tf.int64)
            table = transform(self.item_field_embeddings(self.item_lookup(catalogue)))
            return tf.gather(table, hist), mask
        if path == "unique":
            return self._unique_history(hist, transform), mask
        return transform(self.item_field_embeddings(self.item_lookup(hist))), mask

    def _unique_history(self, hist, transform):
        """``model.history_embeddings: unique``: int64 [B, H] -> ``transform`` of the field
        embeddings [B, H, ...], computed once per distinct item of ``hist`` (U <= B x H rows,
        padding 0 included) and gathered back to the slots; the gradient of the U rows is the
        sum over their slots, so the embedding tables get U sparse rows instead of B x H."""
        unique, slot_row = tf.unique(tf.reshape(hist, [-1]))  # [U], int32 [B * H]
        rows = transform(self.item_field_embeddings(self.item_lookup(unique)))  # [U, ...]
        return tf.gather(rows, tf.reshape(slot_row, tf.shape(hist)))

    def profile(self, features, batch_size_from):
        """-> user profile field embeddings [B, F_u, D]."""
        return self.user_field_embeddings(features, batch_size_from=batch_size_from)

    @staticmethod
    def flatten_fields(x):
        """[B, F, D] -> [B, F * D] with a static last dimension."""
        return tf.reshape(x, [-1, x.shape[-2] * x.shape[-1]])

    def get_config(self):
        config = super().get_config()
        config.update(item_lookup=serialize(self.item_lookup),
                      item_field_embeddings=serialize(self.item_field_embeddings),
                      user_field_embeddings=serialize(self.user_field_embeddings),
                      history_embeddings=self.history_embeddings,
                      history_batch_hint=self.history_batch_hint)
        return config


@register
class ICANUserTower(UserTower):
    """ICAN / MicRec user tower (paper eq. 6):
    ``u = MLP_u([Flatten(Transformer(F^b)) ; u^other])``.

    ``F^b`` [B, H, F * D] are the raw embeddings ``f^d`` of the H most recent clicks, linearly
    projected to ``transformer_dim`` (0 keeps the raw width F * D; the projection cuts the
    transformer's cost by about ((F * D) / transformer_dim)^2), plus learned position embeddings;
    the transformer masks keys beyond ``hist_len``, padded outputs are zeroed.
    """

    def __init__(self, item_lookup, item_field_embeddings, user_field_embeddings,
                 units: Sequence[int] = (128, 64, 64), num_heads: int = 2, num_layers: int = 1,
                 dropout: float = 0.0, transformer_dim: int = 0, attention: str = "matmul",
                 **kwargs):
        super().__init__(item_lookup, item_field_embeddings, user_field_embeddings, **kwargs)
        self.units = check_units(units, "user tower")
        self.num_heads = check_int("num_heads", num_heads)
        self.num_layers = check_int("num_layers", num_layers, minimum=0)
        self.dropout = check_rate("dropout", dropout)
        self.transformer_dim = check_int("transformer_dim", transformer_dim, minimum=0)
        self.attention_impl = check_choice("attention", attention, ATTENTION_IMPLS)
        self.project = (tf_keras.layers.Dense(self.transformer_dim, use_bias=False,
                                              name="history_projection")
                        if self.transformer_dim else None)
        self.positions = PositionEmbedding(name="history_positions")
        self.blocks = [TransformerEncoderBlock(self.num_heads, dropout=self.dropout,
                                               attention=self.attention_impl,
                                               name=f"transformer_{i}")
                       for i in range(self.num_layers)]
        self.mlp = MLP(self.units, dropout=self.dropout, name="user_mlp")

    @property
    def output_dim(self) -> int:
        return self.units[-1]

    def _flatten_and_project(self, fields):
        """[..., F, D] -> [..., transformer_dim] (or [..., F * D] without a projection)."""
        f, d = fields.shape[-2], fields.shape[-1]
        x = tf.reshape(fields, tf.concat([tf.shape(fields)[:-2], [f * d]], axis=0))
        return self.project(x) if self.project is not None else x

    def call(self, features, training=None):
        x, mask = self.history(features, self._flatten_and_project, training)  # [B, H, W]
        h = x.shape[1]
        if h is None:
            raise ValueError(f"ICANUserTower needs a static history length H in {HIST_ITEMS} "
                             f"[B, H]. Received: shape {x.shape}")
        x = self.positions(x)
        for block in self.blocks:
            x = block(x, mask=mask, training=training)
        width = x.shape[-1]
        behaviour = tf.reshape(x * tf.cast(mask, x.dtype)[..., tf.newaxis], [-1, h * width])
        other = self.flatten_fields(self.profile(features, x))
        return self.mlp(tf.concat([behaviour, other], axis=-1), training=training)

    def get_config(self):
        config = super().get_config()
        config.update(units=list(self.units), num_heads=self.num_heads,
                      num_layers=self.num_layers, dropout=self.dropout,
                      transformer_dim=self.transformer_dim, attention=self.attention_impl)
        return config


@register
class YoutubeDNNUserTower(UserTower):
    """YoutubeDNN user tower: ``MLP([mean of history f^d ; profile])``."""

    def __init__(self, item_lookup, item_field_embeddings, user_field_embeddings,
                 units: Sequence[int] = (128, 64, 64), dropout: float = 0.0, **kwargs):
        super().__init__(item_lookup, item_field_embeddings, user_field_embeddings, **kwargs)
        self.units, self.dropout = check_units(units, "user tower"), check_rate("dropout", dropout)
        self.mlp = MLP(self.units, dropout=self.dropout, name="user_mlp")

    @property
    def output_dim(self) -> int:
        return self.units[-1]

    def call(self, features, training=None):
        hist, mask = self.history(features, training=training)
        pooled = self.flatten_fields(_history_field_means(hist, mask))  # mean of history f^d
        other = self.flatten_fields(self.profile(features, hist))
        return self.mlp(tf.concat([pooled, other], axis=-1), training=training)

    def get_config(self):
        config = super().get_config()
        config.update(units=list(self.units), dropout=self.dropout)
        return config


def _history_field_means(hist, mask):
    """[B, H, F, D], [B, H] -> per-field mean over the valid history [B, F, D]."""
    return masked_mean(hist, tf.broadcast_to(mask[..., tf.newaxis], tf.shape(hist)[:-1]), axis=1)


@register
class FMUserTower(UserTower):
    """FM user side: sum of the profile field vectors plus the pooled history (mean over clicks
    of the sum of each click's item field vectors), ``[B, D]``."""

    @property
    def output_dim(self) -> int:
        return self.item_field_embeddings.embedding_dim

    def call(self, features, training=None):
        hist, mask = self.history(features, training=training)
        history = tf.reduce_sum(_history_field_means(hist, mask), axis=1)
        return history + tf.reduce_sum(self.profile(features, hist), axis=1)


@register
class DeepFMUserTower(YoutubeDNNUserTower):
    """DeepFM user side: ``[FM user vector ; MLP([mean history f^d ; profile])]`` (the DNN part is
    YoutubeDNN's tower)."""

    @property
    def output_dim(self) -> int:
        return self.item_field_embeddings.embedding_dim + self.units[-1]

    def call(self, features, training=None):
        hist, mask = self.history(features, training=training)
        hist_fields = _history_field_means(hist, mask)  # [B, F, D]
        profile = self.profile(features, hist)  # [B, F_u, D]
        fm = tf.reduce_sum(hist_fields, axis=1) + tf.reduce_sum(profile, axis=1)
        dnn_in = tf.concat([self.flatten_fields(hist_fields), self.flatten_fields(profile)], -1)
        return tf.concat([fm, self.mlp(dnn_in, training=training)], axis=-1)


@register
class AutoIntUserTower(_AutoIntHead, UserTower):
    """AutoInt user side: interacting layers over [profile fields ; per-field history means],
    flatten, Dense to output."""

    def __init__(self, item_lookup, item_field_embeddings, user_field_embeddings,
                 output_dim: int = 64, num_heads: int = 2, num_layers: int = 1, **kwargs):
        super().__init__(item_lookup, item_field_embeddings, user_field_embeddings, **kwargs)
        self._build_autoint(output_dim, num_heads, num_layers,
                            self.item_field_embeddings.embedding_dim, "user")

    def call(self, features, training=None):
        hist, mask = self.history(features, training=training)
        return self._interact(
            tf.concat([self.profile(features, hist), _history_field_means(hist, mask)], axis=1))

    def get_config(self):
        config = super().get_config()
        config.update(output_dim=self._output_dim, num_heads=self.num_heads,
                      num_layers=self.num_layers)
        return config

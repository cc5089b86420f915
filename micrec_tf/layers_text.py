"""The item text field: content in the item tower (issue 28, item 2; paper 3.3's ``f^d`` with one
more field).

:class:`ItemTextFieldEmbeddings` is :class:`micrec_tf.layers.ItemFieldEmbeddings` plus a last
field ``f^X``: the item's frozen text vector (the offline all-MiniLM-L6-v2 title embedding, or a
user-supplied vector, that ``pipelines.title_neighbours`` writes to ``title_embeddings/``), held
in a non-trainable table ``[V, D_t]`` aligned with the item index, then a learned projection
(Dense, with bias) to the field width ``D``:

    f^d = [f^I; f^T; f^P; f^<extra>...; f^X],   f^X = has_text(i) * (W x_i + b)   [..., D]

An item without a text vector (row 0, untokenisable titles, ids absent from a vectors file) has
a zero row; it is flagged by that zero row and its text field is the zero vector, like every
other padding field. The text field reads the item index feature ``item``, so the towers and
the CL tasks need nothing new: they see one more field (feature CL's field-level dropout drops
it like any other field). Item vectors of any catalogue item are computed offline at export
through the item tower; the served user tower keeps stock TensorFlow ops (a gather and a Dense).

Only built for ``model.item_text: true``; ``false`` (the default) builds
:class:`~micrec_tf.layers.ItemFieldEmbeddings`, the model of before, bit for bit.
"""
from __future__ import annotations

from typing import Mapping

import micrec_tf  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow is imported)
import numpy as np
import tensorflow as tf
import tf_keras

from micrec_tf.data.contract import ITEM
from micrec_tf.layers import ItemFieldEmbeddings, check_int, register


@register
class ItemTextFieldEmbeddings(ItemFieldEmbeddings):
    """Item field embeddings with the text field last: ``[S..., F + 1, D]``.

    Args:
      num_items, num_tags, num_providers, extra_vocab_sizes, embedding_dim: as
        :class:`~micrec_tf.layers.ItemFieldEmbeddings`.
      text_dim: ``D_t``, the width of the text vectors (384 for all-MiniLM-L6-v2).
      text_vectors: float [num_items, text_dim], row ``i`` the text vector of item index ``i``
        (zeros: no vector). None leaves the table zero until weights are restored (that is what
        ``from_config`` does: the table is a non-trainable weight, saved in checkpoints, not
        in the config, so the config stays small for a 1 M-item catalogue).

    Call: ``features`` as :class:`~micrec_tf.layers.ItemFieldEmbeddings` (the text field reads
    ``item`` [S...]) and optional ``tag_keep_mask`` -> ``[S..., F + 1, D]``.
    """

    def __init__(self, num_items: int, num_tags: int, num_providers: int,
                 extra_vocab_sizes: Mapping | None = None, embedding_dim: int = 64,
                 text_dim: int = 384, text_vectors=None, **kwargs):
        super().__init__(num_items, num_tags, num_providers, extra_vocab_sizes, embedding_dim,
                         **kwargs)
        self.text_dim = check_int("text_dim", text_dim)
        if text_vectors is not None:
            text_vectors = np.asarray(text_vectors, dtype=np.float32)
            if text_vectors.shape != (self.num_items, self.text_dim):
                raise ValueError(f"text_vectors must be [num_items, text_dim]="
                                 f"[{self.num_items}, {self.text_dim}]. Received: shape "
                                 f"{text_vectors.shape}")
            if not np.all(np.isfinite(text_vectors)):
                raise ValueError("text_vectors must be finite. Received: NaN or infinity")
        self._text_vectors_np = text_vectors
        self.text_projection = tf_keras.layers.Dense(self.embedding_dim, name="text_projection")

    def build(self, input_shape=None):
        self.text_table = self.add_weight(
            name="item_text_table", shape=[self.num_items, self.text_dim], dtype=tf.float32,
            initializer="zeros", trainable=False)
        if self._text_vectors_np is not None:
            self.text_table.assign(self._text_vectors_np)
            self._text_vectors_np = None  # the weight holds it now
        super().build(input_shape)

    @property
    def num_fields(self) -> int:
        return len(self.field_names) + 1

    def text_field(self, ids) -> tf.Tensor:
        """Item indices int [S...] -> text field ``f^X`` [S..., D] (zeros for an item without a
        text vector); after :meth:`fold_text_projection`, a gather of the folded table."""
        if not self.built:
            self.build(None)
        folded = getattr(self, "folded_text", None)
        if folded is not None:
            return tf.gather(folded, tf.cast(ids, tf.int64))
        return self._project_text(ids)

    def fold_text_projection(self, chunk_rows: int = 65536) -> None:
        """For an export: computes ``f^X`` of every item index once, ``[V, D]``, into the
        non-trainable variable ``folded_text``, which :meth:`text_field` then gathers from. The
        same function (the projection is affine, the flag per row), so a served tower that reads
        it needs ``V x D`` floats instead of the ``V x D_t`` text table (384 / 64 = 6 times
        fewer at the defaults). Rounding: each row's product is computed in a batch of
        ``chunk_rows`` rows instead of the request's shape (float32 ulps). Never call it on a
        model that trains on: the projection's later updates would not reach the folded table.
        """
        if getattr(self, "folded_text", None) is not None:
            return
        if not self.built:
            self.build(None)
        chunk_rows = check_int("chunk_rows", chunk_rows)
        parts = [self._project_text(tf.range(start, min(start + chunk_rows, self.num_items),
                                             dtype=tf.int64)).numpy()
                 for start in range(0, self.num_items, chunk_rows)]
        self.folded_text = tf.Variable(np.concatenate(parts, axis=0).astype(np.float32),
                                       trainable=False, name="item_text_folded")

    def _project_text(self, ids) -> tf.Tensor:
        vectors = tf.gather(self.text_table, tf.cast(ids, tf.int64))  # [S..., D_t]
        has_text = tf.reduce_any(tf.not_equal(vectors, 0.0), axis=-1)
        projected = self.text_projection(vectors)
        return projected * tf.cast(has_text, projected.dtype)[..., tf.newaxis]

    def call(self, features, tag_keep_mask=None):
        fields = super().call(features, tag_keep_mask=tag_keep_mask)  # [S..., F, D]
        text = self.text_field(features[ITEM])
        return tf.concat([fields, tf.cast(text, fields.dtype)[..., tf.newaxis, :]], axis=-2)

    def get_config(self):
        config = super().get_config()
        config.update(text_dim=self.text_dim)
        return config

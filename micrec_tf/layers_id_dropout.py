"""ID-field dropout for the main loss (issue 28, item 3; DropoutNet, Volkovs et al. 2017).

:class:`IDFieldDropout` zeroes, during training only, the ID field ``f^I`` of each item row with
probability ``rate``: the item is then placed by its content fields alone (tags, provider, extra
fields, the text field), as an item without training clicks always is (``model.min_id_clicks``,
:class:`micrec_tf.layers.ItemFieldEmbeddings`). ``loss.id_dropout`` applies it to the main
sampled softmax's positive and its sampled negatives (each row drawn independently); the CL
views and inference see the undropped items. ``rate = 0`` (the default of ``loss.id_dropout``)
builds no layer: the loss of before, bit for bit.
"""
from __future__ import annotations

import micrec_tf  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow is imported)
import tensorflow as tf
import tf_keras

from micrec_tf.layers import check_int, register


@register
class IDFieldDropout(tf_keras.layers.Layer):
    """Drops the ID field of whole item rows of a raw item embedding ``f^d``.

    Args:
      rate: probability, in [0, 1), that a row's ID field is zeroed (training only).
      id_width: D, the width of the ID field: the first ``id_width`` columns of ``f^d`` (the ID
        field is field 0 of :class:`micrec_tf.layers.ItemFieldEmbeddings`).
      seed: seed of the layer's ``tf.random.Generator`` (``rng``; checkpoint it with the model).

    Call: ``f^d`` [B, F * D], ``training`` -> [B, F * D]: row ``b`` with its first ``id_width``
    columns zeroed when ``keep[b]`` is False; the input unchanged when not training.
    """

    def __init__(self, rate: float, id_width: int, seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate < 1.0:
            raise ValueError(f"rate must be a number in [0, 1). Received: rate={rate!r}")
        self.rate = float(rate)
        self.id_width = check_int("id_width", id_width)
        self.seed = int(seed)
        self.rng = tf.random.Generator.from_seed(self.seed)

    def keep_mask(self, num_rows) -> tf.Tensor:
        """-> bool [num_rows], True where the row keeps its ID field (probability 1 - rate)."""
        return self.rng.uniform(tf.reshape(tf.cast(num_rows, tf.int64), [1])) >= self.rate

    def call(self, raw, training=None):
        if not training or self.rate == 0.0:
            return raw
        if raw.shape.rank != 2 or (raw.shape[-1] is not None and raw.shape[-1] < self.id_width):
            raise ValueError(f"IDFieldDropout needs f^d [B, F * D] with F * D >= id_width="
                             f"{self.id_width}. Received: shape {raw.shape}")
        keep = tf.cast(self.keep_mask(tf.shape(raw)[0]), raw.dtype)[:, tf.newaxis]  # [B, 1]
        id_field = raw[:, :self.id_width] * keep
        return tf.concat([id_field, raw[:, self.id_width:]], axis=1)

    def get_config(self):
        config = super().get_config()
        config.update(rate=self.rate, id_width=self.id_width, seed=self.seed)
        return config

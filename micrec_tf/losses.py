"""Losses: the main sampled softmax L_S (paper eqs. 1, 7) and InfoNCE for the CL tasks
(eqs. 3-5).

Every loss is a per-example MEAN (over the examples that count), computed in float32 whatever the
global mixed-precision policy, so the weights ``lambda_1..3`` of eq. 8 compare like with like.

Note on the denominators: eqs. 3-5 of the paper write the sum over negatives only; like the
classical InfoNCE/SimCLR losses the paper follows, the positive is included in the softmax
denominator here (the loss is then bounded below by 0).
"""
from __future__ import annotations

import math

import micrec_tf  # noqa: F401
import tensorflow as tf
import tf_keras

from micrec_tf.config import CL_SIMILARITIES
from micrec_tf.layers import check_choice, check_int, check_positive, register
from micrec_tf.layers_id_dropout import IDFieldDropout

# IDFieldDropout's generator seed = the task's seed + this (a stream apart from the negatives').
ID_DROPOUT_SEED_OFFSET = 1_000_003

# Logit given to masked candidates (accidental hits, negatives in the positive set). Finite so a
# row with every candidate masked still has a finite loss.
MASK_LOGIT = -1e9


def _f32(x):
    return tf.cast(x, tf.float32)


def masked_mean(values: tf.Tensor, weights: tf.Tensor | None = None) -> tf.Tensor:
    """Mean of ``values`` [B] over entries with non-zero ``weights`` [B]; 0 when none count."""
    values = _f32(values)
    if weights is None:
        return tf.reduce_mean(values) if values.shape.num_elements() != 0 else tf.constant(0.0)
    weights = _f32(weights)
    return tf.math.divide_no_nan(tf.reduce_sum(values * weights), tf.reduce_sum(weights))


def sampled_softmax_loss(query, positives, positive_ids, negatives=None, negative_ids=None, *,
                         in_batch_negatives: bool = False, remove_accidental_hits: bool = True,
                         positive_log_q=None, negative_log_q=None, sample_weight=None,
                         negative_mask=None):
    """Sampled softmax with accidental-hit removal and optional in-batch negatives (logQ).

    Args:
      query: user vectors ``u_i`` [B, d].
      positives: clicked item vectors ``d_k`` [B, d]; row i is user i's positive.
      positive_ids: int [B] item indices of the positives.
      negatives: sampled negative item vectors [N, d], shared by the batch, or None.
      negative_ids: int [N] their item indices.
      in_batch_negatives: also use the other rows' positives as negatives of each row.
      remove_accidental_hits: a negative whose id equals the row's positive id gets logit
        ``MASK_LOGIT`` (for in-batch negatives: other rows with the same positive id).
      positive_log_q: [B] log of each in-batch candidate's expected count in the candidate set,
        subtracted from every in-batch logit, the positive included (TFRS ``Retrieval``);
        only used with ``in_batch_negatives``.
      negative_log_q: scalar or [N], subtracted from the sampled negatives' logits (for uniform
        sampling without in-batch negatives it is a constant shift, irrelevant, so left out).
      sample_weight: optional [B] per-example weights.
      negative_mask: optional bool [B, N], false = sampled negative n is not a negative of row b
        (e.g. :func:`history_negative_mask`); its logit becomes ``MASK_LOGIT``.

    Returns: scalar float32, the per-example mean of ``-log softmax(positive)``.
    """
    query, positives = _f32(query), _f32(positives)
    if query.shape.rank != 2 or positives.shape.rank != 2:
        raise ValueError(f"query and positives must be [B, d]. Received: {query.shape} and "
                         f"{positives.shape}")
    if query.shape[-1] is not None and positives.shape[-1] is not None and (
            query.shape[-1] != positives.shape[-1]):
        raise ValueError(f"query dim {query.shape[-1]} != positives dim {positives.shape[-1]}")
    if negatives is None and not in_batch_negatives:
        raise ValueError("sampled_softmax_loss needs negatives or in_batch_negatives=True")
    positive_ids = tf.cast(tf.reshape(positive_ids, [-1]), tf.int64)
    parts = []
    if in_batch_negatives:
        logits = tf.matmul(query, positives, transpose_b=True)  # [B, B], diagonal = positives
        if positive_log_q is not None:
            logits -= _f32(positive_log_q)[tf.newaxis, :]
        if remove_accidental_hits:
            same = tf.equal(positive_ids[:, tf.newaxis], positive_ids[tf.newaxis, :])
            off_diagonal = tf.logical_not(tf.cast(tf.eye(tf.shape(logits)[0]), tf.bool))
            logits = tf.where(same & off_diagonal, MASK_LOGIT, logits)
        labels = tf.range(tf.shape(logits)[0])
        parts.append(logits)
    else:
        parts.append(tf.reduce_sum(query * positives, axis=-1, keepdims=True))  # [B, 1]
        labels = tf.zeros(tf.shape(query)[:1], dtype=tf.int32)
    if negatives is not None:
        negatives = _f32(negatives)
        if negatives.shape.rank != 2:
            raise ValueError(f"negatives must be [N, d]. Received: {negatives.shape}")
        neg_logits = tf.matmul(query, negatives, transpose_b=True)  # [B, N]
        if negative_log_q is not None:
            neg_logits -= _f32(negative_log_q)
        if remove_accidental_hits:
            if negative_ids is None:
                raise ValueError("remove_accidental_hits needs negative_ids")
            negative_ids = tf.cast(tf.reshape(negative_ids, [-1]), tf.int64)
            hit = tf.equal(positive_ids[:, tf.newaxis], negative_ids[tf.newaxis, :])
            neg_logits = tf.where(hit, MASK_LOGIT, neg_logits)
        if negative_mask is not None:
            neg_logits = tf.where(tf.cast(negative_mask, tf.bool), neg_logits, MASK_LOGIT)
        parts.append(neg_logits)
    logits = tf.concat(parts, axis=1)
    per_example = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
    return masked_mean(per_example, sample_weight)


def history_negative_mask(history_ids, sorted_negative_ids) -> tf.Tensor:
    """bool [B, N]: false where sampled negative n is one of row b's history items.

    Args:
      history_ids: int [B, H] the rows' recent clicks (0 = padding, never a negative).
      sorted_negative_ids: int [N] sampled negatives sorted ascending (duplicates allowed).

    Each history id's run of equal negatives ``[lo, hi)`` is found by binary search and marked
    with a difference array, so the cost is O(B H log N + B N) rather than O(B N H).
    """
    history_ids = tf.cast(history_ids, tf.int64)
    negatives = tf.cast(tf.reshape(sorted_negative_ids, [-1]), tf.int64)
    rows, slots = tf.shape(history_ids)[0], tf.shape(history_ids)[1]
    n = tf.shape(negatives)[0]
    flat = tf.reshape(history_ids, [-1])
    lo = tf.searchsorted(negatives, flat, side="left", out_type=tf.int64)
    hi = tf.searchsorted(negatives, flat, side="right", out_type=tf.int64)
    row = tf.repeat(tf.range(tf.cast(rows, tf.int64)), tf.cast(slots, tf.int32))
    marks = tf.scatter_nd(
        tf.concat([tf.stack([row, lo], 1), tf.stack([row, hi], 1)], 0),
        tf.concat([tf.ones_like(lo, tf.float32), -tf.ones_like(hi, tf.float32)], 0),
        tf.stack([tf.cast(rows, tf.int64), tf.cast(n, tf.int64) + 1]))
    return tf.math.cumsum(marks, axis=1)[:, :-1] < 0.5


def check_similarity(similarity) -> str:
    """``similarity`` if it is one of ``CL_SIMILARITIES``; ValueError naming it otherwise."""
    return check_choice("similarity", similarity, CL_SIMILARITIES)


def _similarity_inputs(similarity: str, *tensors):
    """Casts to float32 and, for ``cosine``, L2-normalises the last axis (``dot``: unchanged)."""
    check_similarity(similarity)
    out = [_f32(t) for t in tensors]
    if similarity == "cosine":
        out = [tf.math.l2_normalize(t, axis=-1) for t in out]
    return out


def info_nce_loss(anchors, positives, negatives, *, temperature: float = 1.0,
                  negative_mask=None, example_mask=None, similarity: str = "dot"):
    """InfoNCE with one positive and K negatives per anchor (semantic / session CL, eqs. 4-5).

    Args:
      anchors: [U, p] projected anchor vectors.
      positives: [U, p] projected positive vectors (row i is anchor i's positive).
      negatives: [K, p] shared negatives or [U, K, p] per-anchor negatives.
      temperature: tau.
      negative_mask: bool [U, K], false = ignore this negative for this anchor.
      example_mask: bool [U], false = leave this anchor out of the mean; or float [U] weights
        (a weighted mean).
      similarity: ``dot`` (the paper's eqs. 2-5) or ``cosine`` (vectors L2-normalised first).

    Returns: scalar float32, mean over counted anchors of
      ``-log(exp(a.p/tau) / (exp(a.p/tau) + sum_k exp(a.n_k/tau)))``.
    """
    check_positive("temperature", temperature)
    anchors, positives, negatives = _similarity_inputs(similarity, anchors, positives, negatives)
    if anchors.shape.rank != 2 or positives.shape.rank != 2:
        raise ValueError(f"anchors and positives must be [U, p]. Received: {anchors.shape} and "
                         f"{positives.shape}")
    pos = tf.reduce_sum(anchors * positives, axis=-1, keepdims=True)
    if negatives.shape.rank == 2:
        neg = tf.matmul(anchors, negatives, transpose_b=True)
    elif negatives.shape.rank == 3:
        neg = tf.einsum("up,ukp->uk", anchors, negatives)
    else:
        raise ValueError(f"negatives must be [K, p] or [U, K, p]. Received: {negatives.shape}")
    logits = tf.concat([pos, neg], axis=1) / temperature
    if negative_mask is not None:
        keep = tf.concat([tf.ones_like(pos, dtype=tf.bool), tf.cast(negative_mask, tf.bool)], 1)
        logits = tf.where(keep, logits, MASK_LOGIT)
    labels = tf.zeros(tf.shape(anchors)[:1], dtype=tf.int32)
    per_example = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
    return masked_mean(per_example, example_mask)


def in_batch_info_nce_loss(anchors, positives, *, temperature: float = 1.0, valid=None,
                           similarity: str = "dot"):
    """InfoNCE with in-batch negatives (feature CL, eq. 3): anchor i's positive is row i of
    ``positives``, its negatives the other valid rows.

    Args:
      anchors: [U, p] (original view), positives: [U, p] (augmented view).
      valid: bool [U]; invalid rows are neither anchors nor negatives. Rows must be distinct
        items (deduplicate before calling, or repeated items become false negatives).
      similarity: ``dot`` or ``cosine``, as in :func:`info_nce_loss`.
    """
    check_positive("temperature", temperature)
    anchors, positives = _similarity_inputs(similarity, anchors, positives)
    logits = tf.matmul(anchors, positives, transpose_b=True) / temperature  # [U, U]
    if valid is not None:
        valid = tf.cast(valid, tf.bool)
        logits = tf.where(valid[tf.newaxis, :], logits, MASK_LOGIT)
    labels = tf.range(tf.shape(logits)[0])
    per_example = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
    return masked_mean(per_example, valid)


@register
class StreamingFrequencyEstimator(tf_keras.layers.Layer):
    """Streaming item frequency estimate for the logQ correction of in-batch negatives
    (Yi et al., RecSys 2019, with item indices instead of hashes).

    Keeps per item the last step it was seen ``A`` and a moving average ``B`` of the steps between
    sightings; ``q = 1 / B`` estimates the item's expected count per batch, the unit that makes it
    comparable with uniform negatives' ``N / (V - 1)``.

    Call: ``ids`` int [B], ``training`` -> ``log q`` float32 [B] (updates the state in training).
    """

    def __init__(self, num_items: int, batch_size: int = 4096, alpha: float = 0.05, **kwargs):
        super().__init__(**kwargs)
        self.num_items = check_int("num_items", num_items, minimum=2)
        self.batch_size = check_int("batch_size", batch_size)
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1]. Received: alpha={alpha!r}")
        self.alpha = float(alpha)
        prior = max(1.0, (self.num_items - 1) / self.batch_size)
        agg = tf.VariableAggregation.ONLY_FIRST_REPLICA
        self.step = self.add_weight(name="step", shape=(), dtype=tf.float32, trainable=False,
                                    initializer="zeros", aggregation=agg)
        self.last_seen = self.add_weight(name="last_seen", shape=(self.num_items,),
                                         dtype=tf.float32, trainable=False, initializer="zeros",
                                         aggregation=agg)
        self.delta = self.add_weight(name="delta", shape=(self.num_items,), dtype=tf.float32,
                                     trainable=False,
                                     initializer=tf_keras.initializers.Constant(prior),
                                     aggregation=agg)

    def call(self, ids, training=None):
        ids = tf.cast(tf.reshape(ids, [-1]), tf.int64)
        if training:
            step = self.step.assign_add(1.0)
            idx = ids[:, tf.newaxis]
            gap = step - tf.gather(self.last_seen, ids)
            new_delta = (1.0 - self.alpha) * tf.gather(self.delta, ids) + self.alpha * gap
            self.delta.assign(tf.tensor_scatter_nd_update(self.delta, idx, new_delta))
            self.last_seen.assign(tf.tensor_scatter_nd_update(
                self.last_seen, idx, tf.fill(tf.shape(ids), step)))
        return -tf.math.log(tf.maximum(tf.gather(self.delta, ids), 1e-6))

    def get_config(self):
        config = super().get_config()
        config.update(num_items=self.num_items, batch_size=self.batch_size, alpha=self.alpha)
        return config


@register
class SampledSoftmaxTask(tf_keras.layers.Layer):
    """The main matching loss L_S (eq. 7) as a task given the item tower.

    Negatives: ``num_negatives`` items drawn uniformly from the whole corpus (indices
    ``1 .. V - 1``) once per batch and shared by its rows, embedded by the item tower; optional
    in-batch negatives with logQ correction from :class:`StreamingFrequencyEstimator`.

    ``mask_history_negatives``: a sampled negative that is in the row's recent clicks is not "an
    item not clicked by u" (eq. 7) and is masked out of that row's softmax (the negatives are
    sorted first, which leaves the loss unchanged and makes the mask a binary search).

    ``id_dropout`` (``loss.id_dropout``, DropoutNet's trick): in training, each sampled
    negative's ID field is zeroed with this probability (:class:`IDFieldDropout`, layer
    ``id_field_dropout``, ``id_width`` = D the field width); the model drops the positives' ID
    fields with :meth:`drop_ids` before encoding them. 0 (default): no layer, the task of before.

    Call: ``(query [B, d], positives [B, d], positive_ids [B])`` or, with
    ``mask_history_negatives``, ``(..., history_ids [B, H])``; ``item_tower=``, ``training=``
    -> scalar float32.
    """

    def __init__(self, num_items: int, num_negatives: int = 1000, in_batch_negatives: bool = False,
                 remove_accidental_hits: bool = True, batch_size: int = 4096, seed: int = 0,
                 mask_history_negatives: bool = False, id_dropout: float = 0.0,
                 id_width: int | None = None, **kwargs):
        kwargs.setdefault("dtype", "float32")  # logits and losses stay float32 in mixed precision
        super().__init__(**kwargs)
        self.num_items = check_int("num_items", num_items, minimum=2)  # padding + one item
        self.num_negatives = check_int("num_negatives", num_negatives, minimum=0)
        if num_negatives == 0 and not in_batch_negatives:
            raise ValueError("num_negatives is 0 and in_batch_negatives is False: no negatives. "
                             "Received: num_negatives=0, in_batch_negatives=False")
        self.in_batch_negatives = bool(in_batch_negatives)
        self.remove_accidental_hits = bool(remove_accidental_hits)
        self.batch_size, self.seed = check_int("batch_size", batch_size), int(seed)
        self.mask_history_negatives = bool(mask_history_negatives)
        self.rng = tf.random.Generator.from_seed(self.seed)
        self.frequency = (StreamingFrequencyEstimator(self.num_items, self.batch_size,
                                                      name="frequency")
                          if self.in_batch_negatives else None)
        if isinstance(id_dropout, bool) or not isinstance(id_dropout, (int, float)) or not (
                0.0 <= id_dropout < 1.0):
            raise ValueError(f"id_dropout must be a number in [0, 1). Received: {id_dropout!r}")
        self.id_dropout = float(id_dropout)
        self.id_width = None if id_width is None else check_int("id_width", id_width)
        self.id_field_dropout = None
        if self.id_dropout:
            if self.id_width is None:
                raise ValueError(f"id_dropout={self.id_dropout} needs id_width (the ID field "
                                 f"width D). Received: id_width=None")
            self.id_field_dropout = IDFieldDropout(self.id_dropout, self.id_width,
                                                   self.seed + ID_DROPOUT_SEED_OFFSET,
                                                   name="id_field_dropout")

    def drop_ids(self, raw, training=None):
        """Raw item embeddings ``f^d`` [B, F * D] -> the same with ID fields dropped at rate
        ``id_dropout`` in training (unchanged without ``id_dropout`` or outside training)."""
        if self.id_field_dropout is None:
            return raw
        return self.id_field_dropout(raw, training=training)

    def sample_negatives(self) -> tf.Tensor:
        """-> int64 [N] item indices uniform in ``1 .. V - 1``."""
        return self.rng.uniform([self.num_negatives], minval=1, maxval=self.num_items,
                                dtype=tf.int64)

    def call(self, inputs, item_tower=None, training=None):
        query, positives, positive_ids = inputs[:3]
        history_ids = inputs[3] if len(inputs) > 3 else None
        if self.mask_history_negatives and history_ids is None:
            raise ValueError("SampledSoftmaxTask(mask_history_negatives=True) needs history_ids "
                             "as the 4th input")
        negatives = negative_ids = positive_log_q = negative_log_q = negative_mask = None
        if self.num_negatives:
            if item_tower is None:
                raise ValueError("SampledSoftmaxTask needs item_tower to embed its negatives")
            negative_ids = self.sample_negatives()
            if self.mask_history_negatives:
                negative_ids = tf.sort(negative_ids)
                negative_mask = history_negative_mask(history_ids, negative_ids)
            if self.id_field_dropout is not None and training:
                raw = item_tower.raw_embedding(item_tower.features_for(negative_ids))
                negatives = item_tower.encode(self.drop_ids(raw, training=training),
                                              training=training)
            else:
                negatives = item_tower.embed_indices(negative_ids, training=training)
        if self.in_batch_negatives:
            positive_log_q = self.frequency(positive_ids, training=training)
            negative_log_q = math.log(self.num_negatives / (self.num_items - 1)) \
                if self.num_negatives else None
        return sampled_softmax_loss(
            query, positives, positive_ids, negatives, negative_ids,
            in_batch_negatives=self.in_batch_negatives,
            remove_accidental_hits=self.remove_accidental_hits,
            positive_log_q=positive_log_q, negative_log_q=negative_log_q,
            negative_mask=negative_mask)

    def get_config(self):
        config = super().get_config()
        config.update(num_items=self.num_items, num_negatives=self.num_negatives,
                      in_batch_negatives=self.in_batch_negatives,
                      remove_accidental_hits=self.remove_accidental_hits,
                      batch_size=self.batch_size, seed=self.seed,
                      mask_history_negatives=self.mask_history_negatives)
        if self.id_dropout:  # only then: the config without ID dropout is as before
            config.update(id_dropout=self.id_dropout, id_width=self.id_width)
        return config

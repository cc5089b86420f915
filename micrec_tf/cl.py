"""The three item-based contrastive learning tasks of MicRec (paper 3.3-3.5), as plug-ins.

Each task is a Keras layer with its own sampler (a seeded, checkpointed ``tf.random.Generator``),
its own 1-layer projector (paper 5.3) and its loss, and is given the model's item tower at call
time, so it plugs onto any item tower (:mod:`micrec_tf.towers`)::

    loss = task(cl_inputs, item_tower=tower, training=True)

The items that get CL are, by default, the batch's target items, deduplicated:
:func:`cl_inputs_from_batch` builds a :class:`CLInputs` with one row per distinct item (the
OOV/padding index 0 is never an anchor nor a negative). :class:`CLAnchorSampler` can replace or
extend them with items drawn uniformly from the catalogue (``loss.cl_anchors``), so that rarely
clicked items get CL as often as popular ones. The uniform draws cover the whole item vocabulary
(1..V-1): with ``preprocess.item_vocabulary: catalogue`` that includes the items without a
training click (issue 28), which then get feature CL from their content fields (their ID rows
are masked by ``model.min_id_clicks``). :func:`describe_cl_anchors` says which items can be
anchors (logged at training start and kept in ``metrics.json`` as ``cl_anchors``).

* :class:`FeatureCL` (``feature_cl``, eqs. 2-3): the original ``f^d`` and a dropped-out copy go
  through the item tower's ``encode`` and the projector; InfoNCE with in-batch negatives.
  Strategies: ``element`` (mask ratio 0.5), ``field`` (zero whole fields), ``categorical`` (drop
  tags before pooling), ``correlated`` (CFM: mask the fields most correlated with a random seed
  field, Yao et al. 2021), ``id_field`` (zero the ID field alone, with the mask ratio).
* :class:`SemanticCL` (``semantic_cl``, eq. 4): positive drawn uniformly from the item's title
  neighbours (or all of them, ``positives="all"``), negatives random items outside that set,
  projector on the tower output.
* :class:`SessionCL` (``session_cl``, eq. 5): positive drawn in proportion to the co-occurrence
  count over the item's full list, same-category pairs multiplied by ``same_category_weight``
  (or uniformly from the list, ``positives="uniform"``); negatives random items that never
  co-occurred with the item (rejected against its full list); items without co-occurrences are
  left out.

An anchor without a positive (an unclicked catalogue item has no co-occurrences; an item
without a usable title has no title neighbours) is left out of that task's loss: its term gets
weight 0 in the mean over anchors (a batch with no such anchor at all gives a loss of 0), so it
neither adds to the loss nor gets a gradient from it; it still gets feature CL, and it can
still be drawn as another anchor's negative (negatives are uniform over 1..V-1).

All sampling is done with TF ops inside the graph.
"""
from __future__ import annotations

from typing import Mapping, NamedTuple

import micrec_tf  # noqa: F401
import numpy as np
import tensorflow as tf
import tf_keras

from micrec_tf.config import (CL_ANCHORS, FEATURE_DROPOUTS, SEMANTIC_POSITIVES,
                              SESSION_MEMBERSHIPS, SESSION_POSITIVES)
from micrec_tf.data.cold_start import COLD_TEST, COLD_VALID, cold_bucket
from micrec_tf.data.contract import ITEM_TAGS
from micrec_tf.layers import check_choice, check_int, check_positive, register
from micrec_tf.losses import check_similarity, in_batch_info_nce_loss, info_nce_loss


class CLInputs(NamedTuple):
    """The distinct target items of a batch, shared by the CL tasks.

    ids:        int64 [U] distinct item indices.
    features:   {item feature: [U, ...]} their fields (``item``, ``item_tags``, ...).
    raw:        [U, F * D] raw item embeddings ``f^d``.
    embeddings: [U, d] item tower outputs ``d_i = DNN^d(f^d)``.
    """

    ids: tf.Tensor
    features: Mapping
    raw: tf.Tensor
    embeddings: tf.Tensor

    @property
    def valid(self) -> tf.Tensor:
        """bool [U]: real items (index > 0)."""
        return self.ids > 0


def cl_inputs_from_batch(item_ids, features: Mapping, raw, embeddings) -> CLInputs:
    """Deduplicates the batch's target items (first occurrence kept).

    Args:
      item_ids: int [B] target item indices; features: {name: [B, ...]} their fields;
      raw: [B, F * D] their ``f^d``; embeddings: [B, d] their item tower outputs.
    """
    item_ids = tf.cast(tf.reshape(item_ids, [-1]), tf.int64)
    unique, idx = tf.unique(item_ids)
    first = tf.math.unsorted_segment_min(tf.range(tf.shape(item_ids)[0]), idx, tf.size(unique))
    gathered = {k: tf.gather(v, first) for k, v in features.items()}
    return CLInputs(unique, gathered, tf.gather(raw, first), tf.gather(embeddings, first))


@register
class CLAnchorSampler(tf_keras.layers.Layer):
    """Chooses the anchor items of the CL tasks (``loss.cl_anchors``).

    Args:
      num_items: V; uniform draws are in 1..V-1 (0 is padding).
      mode: ``batch`` (the batch's target items; the sampler is the identity), ``uniform`` (as
        many items drawn uniformly from the catalogue as the batch has rows) or ``both`` (the
        batch's items followed by that many uniform draws).
      seed: seed of the sampler's generator.

    Call: int [B] target item ids -> int64 [B] (``batch``, ``uniform``) or [2B] (``both``).
    """

    def __init__(self, num_items: int, mode: str = "batch", seed: int = 4, **kwargs):
        kwargs.setdefault("name", "cl_anchor_sampler")
        super().__init__(**kwargs)
        self.mode = check_choice("mode", mode, CL_ANCHORS)
        self.num_items = check_int("num_items", num_items, minimum=2)
        self.seed = seed
        self.rng = tf.random.Generator.from_seed(seed)

    def call(self, item_ids):
        item_ids = tf.cast(tf.reshape(item_ids, [-1]), tf.int64)
        if self.mode == "batch":
            return item_ids
        uniform = self.rng.uniform(tf.shape(item_ids), minval=1, maxval=self.num_items,
                                   dtype=tf.int64)
        return uniform if self.mode == "uniform" else tf.concat([item_ids, uniform], axis=0)

    def get_config(self):
        config = super().get_config()
        config.update(num_items=self.num_items, mode=self.mode, seed=self.seed)
        return config


def cl_anchor_pool(mode: str, num_items: int, id_clicks=None) -> np.ndarray:
    """bool [V]: the items that can be CL anchors under ``loss.cl_anchors`` = ``mode``.

    ``batch`` (the default): the batch's target items, i.e. items with at least one training
    click (``id_clicks`` [V] > 0; every item 1..V-1 when ``id_clicks`` is None, the older
    artifacts whose vocabulary held clicked items only). ``uniform`` and ``both``: every item
    1..V-1 of the vocabulary, clicked or not. Index 0 (padding) never.
    """
    check_choice("mode", mode, CL_ANCHORS)
    num_items = check_int("num_items", num_items, minimum=2)
    pool = np.ones([num_items], bool)
    if mode == "batch" and id_clicks is not None:
        id_clicks = np.asarray(id_clicks, np.int64)
        if id_clicks.shape != (num_items,):
            raise ValueError(f"id_clicks must be [{num_items}]. Received: shape "
                             f"{id_clicks.shape}")
        pool = id_clicks > 0
    pool[0] = False
    return pool


def describe_cl_anchors(mode: str, num_items: int, id_clicks=None, tasks: Mapping | None = None,
                        raw_item_ids=None) -> dict | None:
    """Which items are CL anchors (issue 28): a small dict for ``metrics.json``.

    Args:
      mode: ``loss.cl_anchors``; num_items: V (vocabulary + padding).
      id_clicks: int [V] training clicks per item (``ItemTable.id_clicks``), or None (unknown).
      tasks: the model's CL tasks (``MicRecModel.cl_tasks``); None or empty: no CL, returns None.
      raw_item_ids: the raw ids of items 1..V-1 (``vocab/item_id.txt``) under
        ``preprocess.split: item_cold_start``, to count the cold items among the anchors.

    Returns: ``{"policy", "num_items"`` (items that can be anchors, :func:`cl_anchor_pool`)``,
      "num_without_clicks"`` (of those, with 0 training clicks; None when ``id_clicks`` is)``}``,
      plus ``num_without_cooccurrence`` (session CL) and ``num_without_title_neighbours``
      (semantic CL): the anchors that task leaves out, and ``num_cold_valid`` / ``num_cold_test``
      with ``raw_item_ids``.
    """
    if not tasks:
        return None
    pool = cl_anchor_pool(mode, num_items, id_clicks)
    out = {"policy": mode, "num_items": int(pool.sum()),
           "num_without_clicks": None if id_clicks is None
           else int(np.sum(pool & (np.asarray(id_clicks, np.int64) == 0)))}
    for task, key in (("session", "num_without_cooccurrence"),
                      ("semantic", "num_without_title_neighbours")):
        if tasks.get(task) is not None:
            out[key] = int(np.sum(pool & ~tasks[task].items_with_positive()))
    if raw_item_ids is not None:
        raw_item_ids = list(raw_item_ids)
        if len(raw_item_ids) != num_items - 1:
            raise ValueError(f"raw_item_ids must hold the {num_items - 1} items 1..V-1. "
                             f"Received: {len(raw_item_ids)} ids")
        buckets = [cold_bucket(str(r)) for r in raw_item_ids]
        for split in (COLD_VALID, COLD_TEST):
            out[f"num_cold_{split}"] = sum(1 for i, b in enumerate(buckets, 1)
                                           if b == split and pool[i])
    return out


def cl_anchors_line(summary: Mapping) -> str:
    """One log line from :func:`describe_cl_anchors`, e.g. ``CL anchors: uniform over 3,883
    catalogue items (764 without training clicks; loss.cl_anchors=uniform); session CL leaves
    out 764 of them (no co-occurrences)``."""
    n, zero, policy = summary["num_items"], summary["num_without_clicks"], summary["policy"]
    if policy == "batch":
        text = (f"CL anchors: the batch's target items, among {n:,} items with training clicks "
                f"(loss.cl_anchors=batch)")
    else:
        head = ("uniform" if policy == "uniform"
                else "the batch's target items and as many drawn uniformly")
        zero = "unknown" if zero is None else f"{zero:,}"
        text = (f"CL anchors: {head} over {n:,} catalogue items ({zero} without training "
                f"clicks; loss.cl_anchors={policy})")
    if "num_cold_valid" in summary:
        text += (f"; {summary['num_cold_valid']:,} cold-valid and {summary['num_cold_test']:,} "
                 f"cold-test items among them")
    left_out = [f"{name} CL leaves out {summary[key]:,} of them ({why})"
                for name, key, why in (("session", "num_without_cooccurrence", "no co-occurrences"),
                                       ("semantic", "num_without_title_neighbours",
                                        "no title neighbours"))
                if key in summary]
    return "; ".join([text] + left_out)


# --------------------------------------------------------------------------------------------
# Feature dropout masks (true = keep)
# --------------------------------------------------------------------------------------------
def element_keep_mask(rng: tf.random.Generator, shape, mask_ratio: float) -> tf.Tensor:
    """Element-level dropout: each element of ``f^d`` masked independently with ``mask_ratio``."""
    return rng.uniform(shape) >= mask_ratio


def _one_hot_random(rng, num_rows, num_fields):
    pick = rng.uniform([num_rows], minval=0, maxval=num_fields, dtype=tf.int32)
    return tf.cast(tf.one_hot(pick, num_fields), tf.bool)


def field_keep_mask(rng: tf.random.Generator, num_rows, num_fields: int,
                    mask_ratio: float) -> tf.Tensor:
    """Field-level dropout: bool [U, F], each whole field dropped with ``mask_ratio``; a row that
    would lose every field keeps one field chosen at random."""
    keep = rng.uniform(tf.stack([num_rows, num_fields])) >= mask_ratio
    any_kept = tf.reduce_any(keep, axis=1, keepdims=True)
    return tf.where(any_kept, keep, _one_hot_random(rng, num_rows, num_fields))


def tag_keep_mask(rng: tf.random.Generator, tags: tf.Tensor, mask_ratio: float) -> tf.Tensor:
    """Categorical feature dropout: bool [U, T], each real tag (index > 0) kept with
    ``1 - mask_ratio``; padding is never kept."""
    return tf.logical_and(rng.uniform(tf.shape(tags)) >= mask_ratio, tags > 0)


def correlated_field_keep_mask(rng: tf.random.Generator, correlation, num_rows,
                               mask_ratio: float) -> tf.Tensor:
    """Correlated feature masking (CFM): per row a seed field drawn uniformly, then the
    ``round(mask_ratio * F)`` fields most correlated with it (the seed included) are masked;
    at least one field is kept. ``correlation`` [F, F]. -> bool [U, F]."""
    correlation = tf.convert_to_tensor(correlation, tf.float32)
    num_fields = int(correlation.shape[0])
    k = min(num_fields - 1, max(1, int(round(mask_ratio * num_fields))))
    if k <= 0:
        return tf.ones(tf.stack([num_rows, num_fields]), tf.bool)
    seed_field = rng.uniform([num_rows], minval=0, maxval=num_fields, dtype=tf.int32)
    # The seed field always ranks first (self-correlation is raised above everything).
    scores = tf.gather(correlation, seed_field) + 2.0 * tf.one_hot(seed_field, num_fields)
    _, top = tf.math.top_k(scores, k=k)
    masked = tf.reduce_any(tf.cast(tf.one_hot(top, num_fields), tf.bool), axis=1)
    return tf.logical_not(masked)


def _entropy(codes: np.ndarray) -> float:
    _, counts = np.unique(codes, return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum())


def field_correlation(item_table) -> np.ndarray:
    """Normalised mutual information between the item fields ``[F, F]`` (field order of
    :class:`micrec_tf.layers.ItemFieldEmbeddings`: id, tags (first tag), provider, extras),
    over the catalogue rows 1..V-1. Used by correlated feature masking."""
    v = int(np.asarray(item_table.tags).shape[0])
    tags = np.asarray(item_table.tags)
    columns = [np.arange(v), tags[:, 0] if tags.shape[1] else np.zeros(v, np.int64),
               np.asarray(item_table.provider)]
    columns += [np.asarray(c) for c in dict(item_table.extra).values()]
    columns = [np.asarray(c, np.int64)[1:] for c in columns]
    entropies = [_entropy(c) for c in columns]
    f = len(columns)
    out = np.eye(f, dtype=np.float32)
    for i in range(f):
        for j in range(i + 1, f):
            if entropies[i] <= 0 or entropies[j] <= 0:
                continue
            joint = columns[i] * (int(columns[j].max(initial=0)) + 1) + columns[j]
            mi = entropies[i] + entropies[j] - _entropy(joint)
            out[i, j] = out[j, i] = max(0.0, mi) / np.sqrt(entropies[i] * entropies[j])
    return out


def _projector(dim: int, name: str):
    return tf_keras.layers.Dense(dim, name=name, dtype="float32")


# --------------------------------------------------------------------------------------------
# Tasks
# --------------------------------------------------------------------------------------------
@register
class FeatureCL(tf_keras.layers.Layer):
    """Feature-level item CL, ``L_fea`` (eqs. 2-3).

    Args:
      projection_dim: output size of the 1-layer projector ``MLP_f``.
      strategy: ``element`` | ``field`` | ``categorical`` | ``correlated`` | ``id_field``
        (the field-level dropout of the ID field alone: the view places the item by its
        content fields, as an item without clicks is placed; issue 28).
      mask_ratio: fraction of elements / fields / tags masked (``id_field``: the probability
        that a row's ID field is zeroed).
      temperature: tau.
      seed: seed of the task's generator.
      correlation: [F, F] field correlation for ``correlated`` (see :func:`field_correlation`).
      similarity: ``dot`` (paper eq. 2) or ``cosine``.

    Call: :class:`CLInputs`, ``item_tower=`` -> scalar float32.
    """

    def __init__(self, projection_dim: int, strategy: str = "element", mask_ratio: float = 0.5,
                 temperature: float = 1.0, seed: int = 1, correlation=None,
                 similarity: str = "dot", **kwargs):
        kwargs.setdefault("name", "feature_cl")
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.strategy = check_choice("strategy", strategy, FEATURE_DROPOUTS)
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1). Received: mask_ratio={mask_ratio!r}")
        self.mask_ratio = float(mask_ratio)
        self.temperature = check_positive("temperature", temperature)
        self.similarity = check_similarity(similarity)
        self.projection_dim = check_int("projection_dim", projection_dim)
        if strategy == "correlated":
            if correlation is None:
                raise ValueError("strategy 'correlated' needs the field correlation matrix. "
                                 "Received: correlation=None")
            correlation = np.asarray(correlation, np.float32)
            if correlation.ndim != 2 or correlation.shape[0] != correlation.shape[1]:
                raise ValueError(f"correlation must be [F, F]. Received: shape "
                                 f"{correlation.shape}")
        self.seed = seed
        self.correlation = None if correlation is None else np.asarray(correlation, np.float32)
        self.rng = tf.random.Generator.from_seed(seed)
        self.projector = _projector(projection_dim, "feature_projector")

    def augment(self, inputs: CLInputs, item_tower) -> tf.Tensor:
        """-> the augmented raw embeddings ``Dropout(f^d)`` [U, F * D]."""
        raw = inputs.raw
        rows = tf.shape(raw)[0]
        if self.strategy == "element":
            return raw * tf.cast(element_keep_mask(self.rng, tf.shape(raw), self.mask_ratio),
                                 raw.dtype)
        if self.strategy == "categorical":
            keep = tag_keep_mask(self.rng, tf.cast(inputs.features[ITEM_TAGS], tf.int64),
                                 self.mask_ratio)
            return tf.cast(item_tower.raw_embedding(inputs.features, tag_keep_mask=keep),
                           raw.dtype)
        f, d = item_tower.num_fields, item_tower.embedding_dim
        if self.strategy == "field":
            keep = field_keep_mask(self.rng, rows, f, self.mask_ratio)
        elif self.strategy == "id_field":  # field 0, f^I, of each row with mask_ratio; no other
            keep = tf.concat([self.rng.uniform(tf.stack([rows, 1])) >= self.mask_ratio,
                              tf.ones(tf.stack([rows, f - 1]), tf.bool)], axis=1)
        else:
            if self.correlation.shape[0] != f:
                raise ValueError(f"correlation is {self.correlation.shape} but the item tower has "
                                 f"{f} fields")
            keep = correlated_field_keep_mask(self.rng, self.correlation, rows, self.mask_ratio)
        fields = tf.reshape(raw, [-1, f, d]) * tf.cast(keep, raw.dtype)[..., tf.newaxis]
        return tf.reshape(fields, [-1, f * d])

    def call(self, inputs: CLInputs, item_tower=None, training=None):
        if item_tower is None:
            raise ValueError("FeatureCL needs item_tower")
        augmented = item_tower.encode(self.augment(inputs, item_tower), training=training)
        anchors = self.projector(inputs.embeddings)
        positives = self.projector(augmented)
        return in_batch_info_nce_loss(anchors, positives, temperature=self.temperature,
                                      valid=inputs.valid, similarity=self.similarity)

    def get_config(self):
        config = super().get_config()
        config.update(projection_dim=self.projection_dim, strategy=self.strategy,
                      mask_ratio=self.mask_ratio, temperature=self.temperature, seed=self.seed,
                      similarity=self.similarity,
                      correlation=None if self.correlation is None else self.correlation.tolist())
        return config


def _neighbour_info_nce(task, inputs: CLInputs, positives, has_positive, negatives,
                        negative_mask, item_tower, training):
    """InfoNCE of one positive per anchor against shared, per-anchor-masked negatives, with the
    task's projector on the item tower outputs (semantic and session CL, eqs. 4-5)."""
    candidates = task.projector(item_tower.embed_indices(
        tf.concat([positives, negatives], axis=0), training=training))
    num_anchors = tf.shape(positives)[0]
    return info_nce_loss(
        task.projector(inputs.embeddings), candidates[:num_anchors], candidates[num_anchors:],
        temperature=task.temperature, negative_mask=negative_mask,
        example_mask=inputs.valid & has_positive, similarity=task.similarity)


@register
class SemanticCL(tf_keras.layers.Layer):
    """Semantic-level item CL, ``L_sem`` (eq. 4), with the item's title neighbours ``P_i^t`` as
    positives (the title-neighbour job's ``NeighbourTable``).

    ``positives="sample"``: one neighbour drawn uniformly per anchor and step. ``positives="all"``
    (eq. 4's sum over P_i^t): every listed neighbour is a positive; the loss of an anchor is the
    mean of its InfoNCE terms over its neighbours, then the mean over anchors. Negatives:
    ``num_negatives`` random items shared by the anchors, masked per anchor when they are the
    anchor itself or one of its neighbours.

    Args:
      neighbours: int [V, M] neighbour indices, 0-padded; weights: float [V, M] (scores; only
        0 = padding matters).
      projection_dim, num_negatives, temperature, seed, similarity: as named.
      num_items: V (defaults to ``neighbours.shape[0]``); negatives are uniform in 1..V-1.

    Call: :class:`CLInputs`, ``item_tower=`` -> scalar float32.
    """

    def __init__(self, neighbours, weights, projection_dim: int, num_negatives: int = 50,
                 temperature: float = 1.0, seed: int = 2, num_items: int | None = None,
                 similarity: str = "dot", positives: str = "sample", **kwargs):
        kwargs.setdefault("name", "semantic_cl")
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.projection_dim = check_int("projection_dim", projection_dim)
        self.num_negatives = check_int("num_negatives", num_negatives)
        self.temperature = check_positive("temperature", temperature)
        self.positives = check_choice("positives", positives, SEMANTIC_POSITIVES)
        self.similarity = check_similarity(similarity)
        neighbours = np.asarray(neighbours, np.int64)
        weights = np.asarray(weights, np.float32)
        if neighbours.ndim != 2 or weights.shape != neighbours.shape:
            raise ValueError(f"neighbours and weights must both be [V, M]. Received: "
                             f"{neighbours.shape} and {weights.shape}")
        num_items = int(num_items if num_items is not None else neighbours.shape[0])
        if num_items < 2 or neighbours.shape[0] != num_items:
            raise ValueError(f"num_items must be >= 2 and equal the neighbour table's "
                             f"{neighbours.shape[0]} rows. Received: num_items={num_items}")
        if neighbours.size and (neighbours.min() < 0 or neighbours.max() >= num_items):
            raise ValueError(f"neighbour indices must be in [0, {num_items}). Received: "
                             f"[{neighbours.min()}, {neighbours.max()}]")
        self._neighbours_np, self._weights_np = neighbours, weights
        self.seed, self.num_items = seed, num_items
        self.neighbours = tf.constant(neighbours)
        self.neighbour_valid = tf.constant(neighbours > 0)
        self.rng = tf.random.Generator.from_seed(seed)
        self.projector = _projector(self.projection_dim, f"{self.name}_projector")

    @classmethod
    def from_table(cls, table, projection_dim: int, **kwargs) -> "SemanticCL":
        return cls(table.neighbours, table.weights, projection_dim, **kwargs)

    def items_with_positive(self) -> np.ndarray:
        """bool [V]: items with at least one title neighbour (the others get no semantic CL)."""
        return np.any(self._neighbours_np > 0, axis=1)

    def sample(self, ids):
        """Samples for anchors ``ids`` int [U]:

        -> positives int64 [U] (one uniform neighbour, 0 where none), has_positive bool [U],
           negatives int64 [K] uniform in 1..V-1, negative_mask bool [U, K] (false: the anchor
           or one of its neighbours).
        """
        ids = tf.cast(tf.reshape(ids, [-1]), tf.int64)
        valid = tf.gather(self.neighbour_valid, ids)  # [U, M]
        has_positive = tf.reduce_any(valid, axis=1)
        logits = tf.where(valid, 0.0, float("-inf"))
        logits = tf.where(has_positive[:, tf.newaxis], logits, 0.0)
        choice = tf.random.stateless_categorical(logits, 1, seed=self.rng.make_seeds(1)[:, 0],
                                                 dtype=tf.int32)
        neighbours = tf.gather(self.neighbours, ids)
        positives = tf.gather(neighbours, choice, batch_dims=1)[:, 0]
        positives = tf.where(has_positive, positives, tf.zeros_like(positives))
        negatives, negative_mask = self._negatives(ids, neighbours, valid)
        return positives, has_positive, negatives, negative_mask

    def _negatives(self, ids, neighbours, valid):
        negatives = self.rng.uniform([self.num_negatives], minval=1, maxval=self.num_items,
                                     dtype=tf.int64)
        in_list = tf.reduce_any(
            tf.equal(negatives[tf.newaxis, :, tf.newaxis], neighbours[:, tf.newaxis, :])
            & valid[:, tf.newaxis, :], axis=2)
        negative_mask = tf.logical_not(in_list | tf.equal(negatives[tf.newaxis, :],
                                                          ids[:, tf.newaxis]))
        return negatives, negative_mask

    def call(self, inputs: CLInputs, item_tower=None, training=None):
        if item_tower is None:
            raise ValueError("SemanticCL needs item_tower")
        if self.positives == "sample":
            positives, has_positive, negatives, negative_mask = self.sample(inputs.ids)
            return _neighbour_info_nce(self, inputs, positives, has_positive, negatives,
                                       negative_mask, item_tower, training)
        return self._all_neighbours_loss(inputs, item_tower, training)

    def _all_neighbours_loss(self, inputs: CLInputs, item_tower, training):
        """``positives="all"``: [U, M] positives; per-anchor mean over its valid neighbours."""
        ids = tf.cast(tf.reshape(inputs.ids, [-1]), tf.int64)
        neighbours = tf.gather(self.neighbours, ids)            # [U, M]
        valid = tf.gather(self.neighbour_valid, ids)           # [U, M]
        negatives, negative_mask = self._negatives(ids, neighbours, valid)
        unique, where = tf.unique(tf.concat([tf.reshape(neighbours, [-1]), negatives], 0))
        projected = self.projector(item_tower.embed_indices(unique, training=training))
        flat = tf.gather(projected, where)
        m = tf.shape(neighbours)[1]
        positives = flat[:tf.size(neighbours)]                 # [U * M, p]
        negative_vectors = flat[tf.size(neighbours):]          # [K, p]
        anchors = tf.repeat(self.projector(inputs.embeddings), m, axis=0)
        per_anchor = tf.reduce_sum(tf.cast(valid, tf.float32), axis=1, keepdims=True)
        weight = tf.math.divide_no_nan(tf.cast(valid, tf.float32), per_anchor)
        weight *= tf.cast(inputs.valid, tf.float32)[:, tf.newaxis]
        return info_nce_loss(anchors, positives, negative_vectors, temperature=self.temperature,
                             negative_mask=tf.repeat(negative_mask, m, axis=0),
                             example_mask=tf.reshape(weight, [-1]), similarity=self.similarity)

    def get_config(self):
        config = super().get_config()
        config.update(neighbours=self._neighbours_np.tolist(), weights=self._weights_np.tolist(),
                      projection_dim=self.projection_dim, num_negatives=self.num_negatives,
                      temperature=self.temperature, seed=self.seed, num_items=self.num_items,
                      similarity=self.similarity, positives=self.positives)
        return config


@register
class SessionCL(tf_keras.layers.Layer):
    """Session-level item CL, ``L_sess`` (eq. 5), on every item's full co-occurrence list.

    Positive: drawn with probability proportional to ``count * (same_category_weight if the pair
    is same-category else 1)`` over the anchor's whole list (``positives="count"``, the paper),
    or uniformly from it (``positives="uniform"``). Negatives: items that never co-occurred with
    the anchor (eq. 5's "not in the same session"): a pool of ``negative_pool_factor *
    num_negatives`` items drawn uniformly from ``1 .. V - 1`` per step, shared by the anchors;
    each anchor keeps the first ``num_negatives`` of the pool that are neither itself nor in its
    full list (rejection), so head items, which co-occur with most of the catalogue, still get
    their ``num_negatives``. Anchors without co-occurrences get no loss.

    Args:
      indptr: int [V + 1], neighbours: int [E], counts: [E] (> 0): the CSR table
        (:class:`micrec_tf.data.artifacts.CooccurrenceTable`).
      projection_dim, num_negatives, temperature, seed, similarity: as named.
      same_category: int [E] 1 where the pair is same-category; same_category_weight: its
        sampling emphasis (``count`` only).
      negative_pool_factor: pool size over ``num_negatives``.
      membership: how :meth:`co_occurred` answers (issue 31; speed only: every setting gives the
        same answers, hence the same draws and loss): ``bitmap``, one bit per (anchor, item) pair
        (int32 words ``[V * ceil(V / 32)]``, a gather and a shift per pool entry); ``sorted``,
        binary search of ``anchor * V + item`` in the sorted pair keys ``[E]`` (the code of
        before issue 31); ``auto`` (default), ``bitmap`` when its ``V * ceil(V / 32) * 4`` bytes
        are at most ``bitmap_max_bytes``, else ``sorted``. The chosen one: ``membership_path``.
      bitmap_max_bytes: the ``auto`` limit (default 64 MiB: V <= ~23,000 items).

    Call: :class:`CLInputs`, ``item_tower=`` -> scalar float32.
    """

    def __init__(self, indptr, neighbours, counts, projection_dim: int, num_negatives: int = 50,
                 temperature: float = 1.0, seed: int = 3, same_category=None,
                 same_category_weight: float = 1.0, positives: str = "count",
                 similarity: str = "dot", negative_pool_factor: int = 4,
                 membership: str = "auto", bitmap_max_bytes: int = 64 * 2 ** 20, **kwargs):
        kwargs.setdefault("name", "session_cl")
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.projection_dim = check_int("projection_dim", projection_dim)
        self.num_negatives = check_int("num_negatives", num_negatives)
        self.negative_pool_factor = check_int("negative_pool_factor", negative_pool_factor)
        self.temperature = check_positive("temperature", temperature)
        self.same_category_weight = check_positive("same_category_weight", same_category_weight)
        self.positives = check_choice("positives", positives, SESSION_POSITIVES)
        self.similarity, self.seed = check_similarity(similarity), seed
        self.membership = check_choice("membership", membership, SESSION_MEMBERSHIPS)
        self.bitmap_max_bytes = check_int("bitmap_max_bytes", bitmap_max_bytes, minimum=0)
        indptr = np.asarray(indptr, np.int64)
        neighbours = np.asarray(neighbours, np.int64)
        counts = np.asarray(counts, np.float64)
        num_items = indptr.size - 1
        if indptr.ndim != 1 or num_items < 2 or indptr[0] != 0 or indptr[-1] != neighbours.size \
                or np.any(np.diff(indptr) < 0):
            raise ValueError(f"indptr must be a CSR row pointer [V + 1] (V >= 2) over the "
                             f"{neighbours.size} entries. Received: shape {indptr.shape}")
        if counts.shape != neighbours.shape:
            raise ValueError(f"counts must be [E] like neighbours {neighbours.shape}. Received: "
                             f"{counts.shape}")
        if neighbours.size and (neighbours.min() < 1 or neighbours.max() >= num_items):
            raise ValueError(f"neighbour indices must be in [1, {num_items}). Received: "
                             f"[{neighbours.min()}, {neighbours.max()}]")
        if counts.size and counts.min() <= 0:
            raise ValueError(f"counts must be > 0. Received: min {counts.min()}")
        same_category = (np.zeros(neighbours.shape, np.int8) if same_category is None
                         else np.asarray(same_category, np.int8))
        if same_category.shape != neighbours.shape:
            raise ValueError(f"same_category must be [E] like neighbours {neighbours.shape}. "
                             f"Received: {same_category.shape}")
        self._indptr_np, self._neighbours_np = indptr, neighbours
        self._counts_np, self._same_category_np = counts, same_category
        self.num_items = int(num_items)

        rows = np.repeat(np.arange(num_items, dtype=np.int64), np.diff(indptr))
        weights = self.positive_weights()
        cum = np.cumsum(weights)
        start = np.concatenate([[0.0], cum])[indptr[:-1]]
        self.neighbours = tf.constant(neighbours)
        self.cumulative = tf.constant(cum, tf.float64)          # [E]
        self.row_start = tf.constant(start, tf.float64)         # [V] cumulative before the row
        self.row_total = tf.constant(np.concatenate([[0.0], cum])[indptr[1:]] - start,
                                     tf.float64)                 # [V]
        self.row_first = tf.constant(indptr[:-1])
        self.row_last = tf.constant(np.maximum(indptr[1:] - 1, indptr[:-1]))
        self.has_positive_table = tf.constant(np.diff(indptr) > 0)
        self.bitmap_words = (num_items + 31) // 32
        if self.membership == "auto":
            fits = num_items * self.bitmap_words * 4 <= self.bitmap_max_bytes
            self.membership_path = "bitmap" if fits else "sorted"
        else:
            self.membership_path = self.membership
        if self.membership_path == "bitmap":
            self.pair_bits = tf.constant(self.pair_bitmap())     # int32 [V * W]
        else:
            self.pair_keys = tf.constant(np.sort(rows * num_items + neighbours))  # [E] sorted
        self.rng = tf.random.Generator.from_seed(seed)
        self.projector = _projector(self.projection_dim, f"{self.name}_projector")

    @classmethod
    def from_table(cls, table, projection_dim: int, **kwargs) -> "SessionCL":
        """From a :class:`micrec_tf.data.artifacts.CooccurrenceTable`."""
        return cls(table.indptr, table.neighbours, table.counts, projection_dim,
                   same_category=table.same_category, **kwargs)

    def items_with_positive(self) -> np.ndarray:
        """bool [V]: items with at least one co-occurrence (the others get no session CL)."""
        return np.diff(self._indptr_np) > 0

    def positive_weights(self) -> np.ndarray:
        """float64 [E]: each entry's unnormalised probability of being drawn as the positive."""
        if self.positives == "uniform":
            return np.ones(self._neighbours_np.shape, np.float64)
        return self._counts_np * np.where(self._same_category_np > 0, self.same_category_weight,
                                          1.0)

    def pair_bitmap(self) -> np.ndarray:
        """int32 [V * W] (W = ceil(V / 32)): bit ``j % 32`` of word ``i * W + j // 32`` is set
        when item j is in item i's co-occurrence list (little-endian bit order)."""
        v, w = self.num_items, self.bitmap_words
        rows = np.repeat(np.arange(v, dtype=np.int64), np.diff(self._indptr_np))
        nb = self._neighbours_np
        bits = np.zeros(v * w, np.uint32)
        np.bitwise_or.at(bits, rows * w + nb // 32, np.left_shift(
            np.uint32(1), (nb % 32).astype(np.uint32)))
        return bits.view(np.int32)

    def co_occurred(self, anchors, items) -> tf.Tensor:
        """bool [U, K]: ``items`` [K] (or [U, K]) is in anchor u's full co-occurrence list."""
        anchors = tf.cast(anchors, tf.int64)[:, tf.newaxis]
        items = tf.cast(items, tf.int64)
        if self.membership_path == "bitmap":
            items = items if items.shape.rank == 2 else items[tf.newaxis, :]
            words = tf.gather(self.pair_bits, anchors * self.bitmap_words + items // 32)
            shifted = tf.bitwise.right_shift(words, tf.cast(items % 32, tf.int32))
            return tf.not_equal(tf.bitwise.bitwise_and(shifted, 1), 0)
        keys = anchors * self.num_items + (items if items.shape.rank == 2
                                          else items[tf.newaxis, :])
        flat = tf.reshape(keys, [-1])
        if self._neighbours_np.size == 0:
            return tf.zeros_like(keys, tf.bool)
        pos = tf.minimum(tf.searchsorted(self.pair_keys, flat, out_type=tf.int64),
                         self._neighbours_np.size - 1)
        return tf.reshape(tf.equal(tf.gather(self.pair_keys, pos), flat), tf.shape(keys))

    def sample(self, ids):
        """Samples for anchors ``ids`` int [U]:

        -> positives int64 [U] (0 where none), has_positive bool [U], negatives int64 [P] (the
           shared pool), negative_mask bool [U, P] (true for each anchor's first
           ``num_negatives`` pool items that are neither the anchor nor in its list).
        """
        ids = tf.cast(tf.reshape(ids, [-1]), tf.int64)
        has_positive = tf.gather(self.has_positive_table, ids)
        r = self.rng.uniform(tf.shape(ids), dtype=tf.float64)
        target = tf.gather(self.row_start, ids) + r * tf.gather(self.row_total, ids)
        if self._neighbours_np.size:
            entry = tf.searchsorted(self.cumulative, target, side="right", out_type=tf.int64)
            entry = tf.clip_by_value(entry, tf.gather(self.row_first, ids),
                                     tf.gather(self.row_last, ids))
            positives = tf.gather(self.neighbours, tf.minimum(entry, self._neighbours_np.size - 1))
        else:
            positives = tf.zeros_like(ids)
        positives = tf.where(has_positive, positives, tf.zeros_like(positives))
        pool = self.rng.uniform([self.num_negatives * self.negative_pool_factor], minval=1,
                                maxval=self.num_items, dtype=tf.int64)
        allowed = tf.logical_not(self.co_occurred(ids, pool)
                                 | tf.equal(pool[tf.newaxis, :], ids[:, tf.newaxis]))
        rank = tf.cumsum(tf.cast(allowed, tf.int32), axis=1)
        negative_mask = allowed & (rank <= self.num_negatives)
        return positives, has_positive, pool, negative_mask

    def call(self, inputs: CLInputs, item_tower=None, training=None):
        if item_tower is None:
            raise ValueError("SessionCL needs item_tower")
        positives, has_positive, negatives, negative_mask = self.sample(inputs.ids)
        return _neighbour_info_nce(self, inputs, positives, has_positive, negatives,
                                   negative_mask, item_tower, training)

    def get_config(self):
        config = super().get_config()
        config.update(indptr=self._indptr_np.tolist(), neighbours=self._neighbours_np.tolist(),
                      counts=self._counts_np.tolist(), projection_dim=self.projection_dim,
                      num_negatives=self.num_negatives, temperature=self.temperature,
                      seed=self.seed, same_category=self._same_category_np.tolist(),
                      same_category_weight=self.same_category_weight, positives=self.positives,
                      similarity=self.similarity, negative_pool_factor=self.negative_pool_factor,
                      membership=self.membership, bitmap_max_bytes=self.bitmap_max_bytes)
        return config

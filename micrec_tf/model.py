"""MicRec: a two-tower matching model trained with ``L = L_S + l1 L_fea + l2 L_sem + l3 L_sess``
(paper eq. 8), and the baselines of paper 5.2 in the same framework.

    model = build_model(cfg, artifacts.item_table, artifacts.vocab_sizes, artifacts.user_fields,
                        artifacts.cooccurrence, artifacts.title_neighbours)
    model.compile(optimizer=make_optimizer(cfg.train))  # micrec_tf.optimizers; default Adam(lr)
    model.fit(train_ds, validation_data=valid_ds, ...)   # batches: dicts of features
    users = model.user_embeddings(features)               # [B, d] float32
    items = model.item_embeddings()                       # [V, d] float32, row i = item i

Metrics (progress bar / TensorBoard): ``loss`` (the total of eq. 8), ``sampled_softmax_loss`` and,
for each task listed in ``model.cl``, ``feature_cl_loss``, ``semantic_cl_loss``,
``session_cl_loss``. A task listed in ``model.cl`` with lambda 0 is still computed and logged
(monitor only) but adds nothing to the gradient; leave it out of ``model.cl`` to skip it.

Projectors and CL sampling live in the CL tasks and never run in the inference paths
(``user_embeddings``, ``item_embeddings``, ``call``).
"""
from __future__ import annotations

from typing import Mapping

import micrec_tf  # noqa: F401
import numpy as np
import tensorflow as tf
import tf_keras

from micrec_tf.cl import (CLAnchorSampler, FeatureCL, SemanticCL, SessionCL,
                          cl_inputs_from_batch, field_correlation)
from micrec_tf.config import CL_TASKS
from micrec_tf.data.contract import HIST_ITEMS, ITEM, user_feature
from micrec_tf.data.artifacts import text_vectors_for
from micrec_tf.layers import ItemFeatureLookup, ItemFieldEmbeddings, UserFieldEmbeddings
from micrec_tf.layers_text import ItemTextFieldEmbeddings
from micrec_tf.losses import SampledSoftmaxTask
from micrec_tf.towers import (AutoIntItemTower, AutoIntUserTower, DeepFMItemTower,
                              DeepFMUserTower, FMItemTower, FMUserTower, ICANUserTower,
                              MLPItemTower, YoutubeDNNUserTower)

# (task, MicRecModel attribute and constructor argument): ("feature", "feature_cl"), ...; the
# task's loss is logged as "<attribute>_loss".
_TASKS = tuple((task, f"{task}_cl") for task in CL_TASKS)
# Seed offsets from train.seed, one generator per sampler: the main loss 0, the CL tasks 1, 2, 3
# in CL_TASKS order, the CL anchor sampler after them.
_SEED_OFFSETS = {"sampled_softmax": 0, **{task: 1 + i for i, task in enumerate(CL_TASKS)},
                 "anchors": 1 + len(CL_TASKS)}


def _unpack(data):
    """Keras passes ``features`` or ``(features, ...)``; returns the features dict."""
    if isinstance(data, Mapping):
        return data
    if isinstance(data, (tuple, list)) and data and isinstance(data[0], Mapping):
        return data[0]
    raise TypeError(f"MicRecModel expects batches that are a dict of features (or a tuple whose "
                    f"first element is one). Received: {type(data).__name__}")


class TwoTowerSteps:
    """The Keras steps and inference paths shared by the two-tower models (mixed in before the
    Keras base class).

    The host model provides ``compute_losses(features, training) -> {name: scalar float32}``,
    ``user_vectors(features, training) -> [B, d]``, ``item_vectors(ids [N] int64, training) ->
    [N, d]``, ``num_items``, ``output_dim`` and, optionally, ``samplers`` (the
    ``tf.random.Generator`` objects that test steps must leave as they found them); its
    ``__init__`` calls :meth:`_init_steps`.
    """

    def _init_steps(self, loss_names, item_batch_size: int):
        self.item_batch_size = int(item_batch_size)
        self.loss_trackers = {name: tf_keras.metrics.Mean(name=name) for name in loss_names}
        self._embed_items_fn = None
        self._user_fn = None

    @property
    def metrics(self):
        return list(self.loss_trackers.values())

    @property
    def samplers(self) -> list:
        return []

    def _update_trackers(self, losses):
        for name, tracker in self.loss_trackers.items():
            tracker.update_state(losses[name])
        return {name: tracker.result() for name, tracker in self.loss_trackers.items()}

    def train_step(self, data):
        features = _unpack(data)
        with tf.GradientTape() as tape:
            losses = self.compute_losses(features, training=True)
            # Gradients are summed over replicas: scale so the update is the global mean.
            scaled = losses["loss"] / tf.distribute.get_strategy().num_replicas_in_sync
        self.optimizer.minimize(scaled, self.trainable_variables, tape=tape)
        return self._update_trackers(losses)

    def test_step(self, data):
        # Evaluation leaves the samplers as it found them: training randomness does not depend
        # on how often validation ran, and every validation batch sees the same draws.
        saved = [g.state.read_value() for g in self.samplers]
        logs = self._update_trackers(self.compute_losses(_unpack(data), training=False))
        with tf.control_dependencies(list(logs.values())):
            for g, state in zip(self.samplers, saved):
                g.state.assign(state)
        return logs

    # --- inference -----------------------------------------------------------------------
    def user_embeddings(self, features) -> tf.Tensor:
        """User vectors [B, d] float32 from a batch of features (no CL, no dropout)."""
        return tf.cast(self.user_vectors(features, training=False), tf.float32)

    def graph_user_embeddings(self, features) -> tf.Tensor:
        """:meth:`user_embeddings` through one cached ``tf.function`` (a trace per input shape):
        the evaluation loop's path, several times faster than eager calls."""
        if self._user_fn is None:
            self._user_fn = tf.function(self.user_embeddings)
        return self._user_fn({k: tf.convert_to_tensor(v) for k, v in features.items()})

    def item_embeddings(self, indices=None, batch_size: int | None = None) -> tf.Tensor:
        """Item vectors [N, d] float32 for ``indices`` (default: every item 0..V-1, so row i is
        item i; row 0 is the padding item), computed in chunks of ``batch_size``."""
        if self._embed_items_fn is None:
            self._embed_items_fn = tf.function(
                lambda ids: tf.cast(self.item_vectors(ids, training=False), tf.float32),
                input_signature=[tf.TensorSpec([None], tf.int64)])
        if indices is None:
            indices = np.arange(self.num_items, dtype=np.int64)
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        size = int(batch_size or self.item_batch_size)
        chunks = [self._embed_items_fn(tf.constant(indices[i:i + size]))
                  for i in range(0, len(indices), size)]
        if not chunks:
            return tf.zeros([0, self.output_dim], tf.float32)
        return tf.concat(chunks, axis=0)


class MicRecModel(TwoTowerSteps, tf_keras.Model):
    """Two-tower model with a main sampled-softmax task and optional CL tasks.

    Args:
      user_tower: features -> [B, d] (a :class:`micrec_tf.towers.UserTower`).
      item_tower: item features -> [B, d] (a :class:`micrec_tf.towers.ItemTower`).
      retrieval: :class:`micrec_tf.losses.SampledSoftmaxTask`.
      feature_cl, semantic_cl, session_cl: CL tasks or None (not in ``model.cl``).
      lambdas: {"feature": l1, "semantic": l2, "session": l3}.
      item_batch_size: chunk size of :meth:`item_embeddings`.
      cl_anchor_sampler: :class:`micrec_tf.cl.CLAnchorSampler` choosing the CL anchor items;
        None (default): the batch's target items.
    """

    def __init__(self, user_tower, item_tower, retrieval: SampledSoftmaxTask,
                 feature_cl: FeatureCL | None = None, semantic_cl: SemanticCL | None = None,
                 session_cl: SessionCL | None = None, lambdas: Mapping | None = None,
                 item_batch_size: int = 4096, cl_anchor_sampler: CLAnchorSampler | None = None,
                 **kwargs):
        super().__init__(**kwargs)
        if user_tower.output_dim != item_tower.output_dim:
            raise ValueError(f"user tower output dim {user_tower.output_dim} != item tower output "
                             f"dim {item_tower.output_dim}")
        self.user_tower = user_tower
        self.item_tower = item_tower
        self.retrieval = retrieval
        self.feature_cl = feature_cl
        self.semantic_cl = semantic_cl
        self.session_cl = session_cl
        if cl_anchor_sampler is not None and cl_anchor_sampler.mode == "batch":
            cl_anchor_sampler = None  # the identity: keep the default path (and checkpoints)
        self.cl_anchor_sampler = cl_anchor_sampler
        lambdas = dict(lambdas or {})
        unknown = set(lambdas) - set(CL_TASKS)
        if unknown:
            raise ValueError(f"lambdas keys must be in {CL_TASKS}. Received: {sorted(unknown)}")
        self.lambdas = {t: float(lambdas.get(t, 0.0)) for t in CL_TASKS}
        for task, value in self.lambdas.items():
            if value < 0:
                raise ValueError(f"lambdas[{task!r}] must be >= 0. Received: {value!r}")
        self._init_steps(self.loss_names, item_batch_size)

    # --- bookkeeping ---------------------------------------------------------------------
    @property
    def cl_tasks(self) -> dict:
        """{"feature": FeatureCL, ...} of the enabled CL tasks."""
        return {t: getattr(self, attr) for t, attr in _TASKS if getattr(self, attr) is not None}

    @property
    def loss_names(self) -> list:
        return ["loss", "sampled_softmax_loss"] + [f"{attr}_loss" for t, attr in _TASKS
                                                   if getattr(self, attr) is not None]

    @property
    def num_items(self) -> int:
        return self.item_tower.item_lookup.num_items

    @property
    def output_dim(self) -> int:
        return self.item_tower.output_dim

    # --- forward -------------------------------------------------------------------------
    def call(self, features, training=False):
        """-> {"user_embedding": [B, d], "item_embedding": [B, d]} (target items), float32."""
        return {"user_embedding": tf.cast(self.user_tower(features, training=training), tf.float32),
                "item_embedding": tf.cast(self.item_tower(features, training=training), tf.float32)}

    def compute_losses(self, features, training: bool = False) -> dict:
        """All loss terms (scalars, float32) for one batch, with ``"loss"`` their eq. 8 total."""
        item_names = self.item_tower.feature_names
        user = tf.cast(self.user_tower(features, training=training), tf.float32)
        raw = self.item_tower.raw_embedding(features)
        positives = self.item_tower.encode(raw, training=training)
        item_ids = tf.reshape(tf.cast(features[ITEM], tf.int64), [-1])
        loss_positives = positives
        if training and self.retrieval.id_field_dropout is not None:  # loss.id_dropout
            loss_positives = self.item_tower.encode(self.retrieval.drop_ids(raw, training=True),
                                                    training=training)
        retrieval_inputs = (user, tf.cast(loss_positives, tf.float32), item_ids)
        if self.retrieval.mask_history_negatives:
            retrieval_inputs += (features[HIST_ITEMS],)
        losses = {"sampled_softmax_loss": self.retrieval(
            retrieval_inputs, item_tower=self.item_tower, training=training)}
        total = losses["sampled_softmax_loss"]
        tasks = self.cl_tasks
        if tasks:
            inputs = self._cl_inputs(item_ids, {k: features[k] for k in item_names}, raw,
                                     positives, training)
            for task_name, attr in _TASKS:
                if task_name not in tasks:
                    continue
                value = tasks[task_name](inputs, item_tower=self.item_tower, training=training)
                losses[f"{attr}_loss"] = value
                total = total + self.lambdas[task_name] * value
        losses["loss"] = total
        return losses

    def _cl_inputs(self, item_ids, features, raw, embeddings, training):
        """The CL anchors: the batch's target items, or the anchor sampler's items (their fields
        looked up in the catalogue table and encoded again)."""
        if self.cl_anchor_sampler is None:
            return cl_inputs_from_batch(item_ids, features, raw, embeddings)
        ids = self.cl_anchor_sampler(item_ids)
        features = self.item_tower.features_for(ids)
        raw = self.item_tower.raw_embedding(features)
        return cl_inputs_from_batch(ids, features, raw,
                                    self.item_tower.encode(raw, training=training))

    @property
    def samplers(self) -> list:
        """The ``tf.random.Generator`` of every task (checkpointed with the model)."""
        tasks = [self.retrieval, *self.cl_tasks.values()]
        if self.cl_anchor_sampler is not None:
            tasks.append(self.cl_anchor_sampler)
        rngs = [t.rng for t in tasks]
        if self.retrieval.id_field_dropout is not None:  # loss.id_dropout > 0 only
            rngs.append(self.retrieval.id_field_dropout.rng)
        return rngs

    # --- the towers, for TwoTowerSteps' inference paths -----------------------------------
    def user_vectors(self, features, training=False) -> tf.Tensor:
        """[B, d] in the compute dtype."""
        return self.user_tower(features, training=training)

    def item_vectors(self, ids, training=False) -> tf.Tensor:
        """int64 [N] item indices -> [N, d] in the compute dtype."""
        return self.item_tower.embed_indices(ids, training=training)


def _user_feature_names(user_fields, vocab_sizes) -> list:
    """The ``user_<field>`` feature names of ``user_fields`` (given as ``gender`` or, when that
    is a vocabulary, ``user_gender``); ``KeyError`` for a field without a vocabulary."""
    names = []
    for f in user_fields:
        name = f if (f.startswith(user_feature("")) and f in vocab_sizes) else user_feature(f)
        if name not in vocab_sizes:
            raise KeyError(f"user field {f!r}: vocabulary {name!r} not in vocab_sizes "
                           f"{sorted(vocab_sizes)}")
        names.append(name)
    return names


def item_id_keep_mask(item_table, min_id_clicks: int) -> np.ndarray | None:
    """``model.min_id_clicks``: bool [V], False for the items (padding row 0 excluded) with fewer
    than ``min_id_clicks`` training clicks (``item_table.id_clicks``), whose ID row is never
    used; None when no item is masked (``id_clicks`` None, i.e. older artifacts where every
    vocabulary item was clicked, or every item has enough clicks): the model of before."""
    counts = getattr(item_table, "id_clicks", None)
    if counts is None or min_id_clicks <= 0:
        return None
    counts = np.asarray(counts, np.int64)
    if counts.shape != (item_table.num_items,):
        raise ValueError(f"item_table.id_clicks must be [{item_table.num_items}]. Received: "
                         f"shape {counts.shape}")
    keep = counts >= int(min_id_clicks)
    keep[0] = True  # the padding row is zero anyway
    return None if keep.all() else keep


def item_extra_vocab_sizes(item_table, vocab_sizes: Mapping[str, int]) -> dict:
    """``{field: vocabulary size}`` of the item table's extra fields (``item_year``, ...);
    KeyError naming the field when ``vocab_sizes`` has none for it."""
    extra = {}
    for name in item_table.extra:
        if name not in vocab_sizes:
            raise KeyError(f"item extra field {name!r} has no vocabulary in vocab_sizes "
                           f"{sorted(vocab_sizes)}")
        extra[name] = int(vocab_sizes[name])
    return extra


def build_model(cfg, item_table, vocab_sizes: Mapping, user_fields, cooccurrence=None,
                title_neighbours=None, text_vectors=None) -> MicRecModel:
    """Builds the model named by ``cfg.model.name`` with the CL tasks of ``cfg.model.cl``.

    Args:
      cfg: :class:`micrec_tf.config.Config` (``model``, ``loss``, ``train.seed``/``batch_size``).
      item_table: :class:`micrec_tf.data.artifacts.ItemTable` (numpy arrays, row 0 padding).
      vocab_sizes: {vocab name: size incl. OOV 0}: ``item_id``, ``tag``, ``provider``,
        ``user_<field>``, ``item_<extra>``.
      user_fields: profile field names (``gender`` or ``user_gender``).
      cooccurrence: :class:`micrec_tf.data.artifacts.CooccurrenceTable` (every item's full
        list); needed for ``session``.
      title_neighbours: :class:`NeighbourTable`; needed for ``semantic``.
      text_vectors: float [V, D_t] item text vectors for ``model.item_text`` (row i: item i,
        zeros: none); None reads them from ``item_table.text_vectors_dir``
        (:func:`micrec_tf.data.artifacts.load_text_vectors`, an ``ArtifactError`` naming the job
        to run when they are missing). Unused when ``model.item_text`` is false (the default).

    Build it inside ``strategy.scope()`` when training under a ``tf.distribute`` strategy (the
    samplers' generators must be created there).
    """
    m, loss = cfg.model, cfg.loss
    if m.name == "tfrs_two_tower":  # the TFRS peer: its own model, the same train/eval contract
        from micrec_tf.tfrs_peer import build_tfrs_two_tower

        return build_tfrs_two_tower(cfg, item_table, vocab_sizes, user_fields)
    for key in ("item_id", "tag", "provider"):
        if key not in vocab_sizes:
            raise KeyError(f"vocab_sizes lacks {key!r}; received {sorted(vocab_sizes)}")
    num_items = item_table.num_items
    if vocab_sizes["item_id"] != num_items:
        raise ValueError(f"vocab_sizes['item_id']={vocab_sizes['item_id']} but the item table has "
                         f"{num_items} rows")
    extra = item_extra_vocab_sizes(item_table, vocab_sizes)
    if m.name in ("ican", "youtubednn", "deepfm") and m.item_mlp_units[-1] != m.user_mlp_units[-1]:
        raise ValueError(f"model.item_mlp_units[-1]={m.item_mlp_units[-1]} must equal "
                         f"model.user_mlp_units[-1]={m.user_mlp_units[-1]} (both tower outputs)")
    if m.name in ("ican", "youtubednn") and m.item_mlp_units[-1] != m.output_dim:
        raise ValueError(f"model.item_mlp_units[-1]={m.item_mlp_units[-1]} must equal "
                         f"model.output_dim={m.output_dim}")
    if "semantic" in m.cl and title_neighbours is None:
        raise ValueError("model.cl has 'semantic' but no title_neighbours table was given")
    if "session" in m.cl and cooccurrence is None:
        raise ValueError("model.cl has 'session' but no cooccurrence table was given")

    lookup = ItemFeatureLookup.from_item_table(item_table, name="item_lookup")
    id_keep_mask = item_id_keep_mask(item_table, m.min_id_clicks)
    if m.item_text:  # one more item field, the projected frozen text vector (layers_text.py)
        text_vectors = text_vectors_for(item_table, num_items, text_vectors)
        item_fields = ItemTextFieldEmbeddings(
            int(vocab_sizes["item_id"]), int(vocab_sizes["tag"]), int(vocab_sizes["provider"]),
            extra, m.embedding_dim, text_dim=int(text_vectors.shape[1]),
            text_vectors=text_vectors, id_keep_mask=id_keep_mask, name="item_field_embeddings")
    else:
        item_fields = ItemFieldEmbeddings(
            int(vocab_sizes["item_id"]), int(vocab_sizes["tag"]), int(vocab_sizes["provider"]),
            extra, m.embedding_dim, id_keep_mask=id_keep_mask, name="item_field_embeddings")
    user_names = _user_feature_names(user_fields, vocab_sizes)
    user_fields_emb = UserFieldEmbeddings({n: int(vocab_sizes[n]) for n in user_names},
                                          m.embedding_dim, name="user_field_embeddings")
    history = {"history_embeddings": m.history_embeddings,
               "history_batch_hint": int(cfg.train.batch_size)}
    if m.name == "ican":
        item_tower = MLPItemTower(lookup, item_fields, m.item_mlp_units, m.dropout,
                                  name="item_tower")
        user_tower = ICANUserTower(lookup, item_fields, user_fields_emb, m.user_mlp_units,
                                   m.num_heads, m.num_transformer_layers, m.dropout,
                                   transformer_dim=m.transformer_dim, attention=m.attention,
                                   **history, name="user_tower")
    elif m.name == "youtubednn":
        item_tower = MLPItemTower(lookup, item_fields, m.item_mlp_units, m.dropout,
                                  name="item_tower")
        user_tower = YoutubeDNNUserTower(lookup, item_fields, user_fields_emb, m.user_mlp_units,
                                         m.dropout, **history, name="user_tower")
    elif m.name == "fm":
        item_tower = FMItemTower(lookup, item_fields, name="item_tower")
        user_tower = FMUserTower(lookup, item_fields, user_fields_emb, **history,
                                 name="user_tower")
    elif m.name == "deepfm":
        item_tower = DeepFMItemTower(lookup, item_fields, m.item_mlp_units, m.dropout,
                                     name="item_tower")
        user_tower = DeepFMUserTower(lookup, item_fields, user_fields_emb, m.user_mlp_units,
                                     m.dropout, **history, name="user_tower")
    elif m.name == "autoint":
        item_tower = AutoIntItemTower(lookup, item_fields, m.output_dim, m.num_heads,
                                      m.num_transformer_layers, name="item_tower")
        user_tower = AutoIntUserTower(lookup, item_fields, user_fields_emb, m.output_dim,
                                      m.num_heads, m.num_transformer_layers, **history,
                                      name="user_tower")
    else:
        raise ValueError(f"model.name must be one of ican, youtubednn, fm, deepfm, autoint, "
                         f"tfrs_two_tower. Received: {m.name!r}")

    seed = int(cfg.train.seed)
    retrieval = SampledSoftmaxTask(
        num_items, loss.num_negatives, loss.in_batch_negatives, loss.remove_accidental_hits,
        cfg.train.batch_size, seed + _SEED_OFFSETS["sampled_softmax"],
        mask_history_negatives=loss.mask_history_negatives, id_dropout=loss.id_dropout,
        id_width=m.embedding_dim, name="sampled_softmax")
    dim = item_tower.output_dim
    tasks = {}
    if "feature" in m.cl:
        tasks["feature_cl"] = FeatureCL(
            dim, loss.feature_dropout, loss.mask_ratio, loss.temperature,
            seed + _SEED_OFFSETS["feature"],
            correlation=field_correlation(item_table)
            if loss.feature_dropout == "correlated" else None, similarity=loss.cl_similarity)
    if "semantic" in m.cl:
        tasks["semantic_cl"] = SemanticCL.from_table(
            title_neighbours, dim, num_negatives=loss.num_cl_negatives,
            temperature=loss.temperature, seed=seed + _SEED_OFFSETS["semantic"],
            num_items=num_items, similarity=loss.cl_similarity,
            positives=loss.semantic_positives)
    if "session" in m.cl:
        tasks["session_cl"] = SessionCL.from_table(
            cooccurrence, dim, num_negatives=loss.num_cl_negatives,
            temperature=loss.temperature, seed=seed + _SEED_OFFSETS["session"],
            same_category_weight=loss.same_category_weight,
            similarity=loss.cl_similarity, positives=loss.session_positives,
            negative_pool_factor=loss.session_negative_pool,
            membership=loss.session_membership)
    anchors = (CLAnchorSampler(num_items, loss.cl_anchors, seed + _SEED_OFFSETS["anchors"])
               if tasks and loss.cl_anchors != "batch" else None)
    return MicRecModel(
        user_tower, item_tower, retrieval, **tasks, cl_anchor_sampler=anchors,
        lambdas={task: getattr(loss, f"lambda_{task}") for task in CL_TASKS},
        name=f"micrec_{m.name}")

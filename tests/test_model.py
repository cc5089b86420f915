"""Towers and MicRecModel (micrec_tf.layers, towers, model) on tiny synthetic in-memory data."""
import micrec_tf  # noqa: F401

import numpy as np
import pytest
import tensorflow as tf
import tf_keras

from micrec_tf import layers as L
from micrec_tf import towers as TW
from micrec_tf.config import from_dict
from micrec_tf.data.artifacts import CooccurrenceTable, ItemTable, NeighbourTable
from micrec_tf.model import MicRecModel, build_model

V, T, H, D, TOPICS = 41, 3, 5, 8, 4
NUM_TAGS, NUM_PROVIDERS, NUM_YEARS = 9, 5, 4
VOCAB = {"item_id": V, "tag": NUM_TAGS, "provider": NUM_PROVIDERS, "item_year": NUM_YEARS,
         "user_gender": 3, "user_age": 5, "user_id": 100}
USER_FIELDS = ["gender", "age"]


def _tiny_world(seed=0):
    """Items in TOPICS topics (topic = (item - 1) % TOPICS); tags/provider follow the topic;
    co-occurrence and title neighbours are same-topic items."""
    rs = np.random.RandomState(seed)
    topic = (np.arange(V) - 1) % TOPICS
    tags = np.zeros((V, T), np.int64)
    tags[1:, 0] = topic[1:] + 1
    tags[1:, 1] = rs.randint(5, NUM_TAGS, size=V - 1) * (rs.rand(V - 1) < 0.6)
    provider = np.where(np.arange(V) > 0, topic % (NUM_PROVIDERS - 1) + 1, 0)
    year = np.where(np.arange(V) > 0, rs.randint(1, NUM_YEARS, size=V), 0)
    table = ItemTable(tags=tags, provider=provider, extra={"item_year": year}, category=tags[:, 0])
    m = 5
    nb, cnt = np.zeros((V, m), np.int64), np.zeros((V, m), np.float32)
    for i in range(1, V):
        same = [j for j in range(1, V) if j != i and topic[j] == topic[i]]
        pick = rs.choice(same, size=m, replace=False)
        nb[i], cnt[i] = pick, rs.randint(1, 6, size=m)
    nb[V - 1], cnt[V - 1] = 0, 0  # one item without neighbours
    co = CooccurrenceTable.from_padded(
        NeighbourTable(nb, cnt, (tags[nb, 0] == tags[:, None, 0]).astype(np.int8)))
    title = NeighbourTable(nb, np.where(nb > 0, 0.8, 0.0).astype(np.float32))
    return table, co, title, topic


TABLE, COOC, TITLE, TOPIC = _tiny_world()


def _batches(num_batches=6, batch_size=32, seed=1):
    """Users of one topic click items of that topic."""
    rs = np.random.RandomState(seed)
    by_topic = [np.flatnonzero(TOPIC == t)[np.flatnonzero(TOPIC == t) > 0] for t in range(TOPICS)]
    out = []
    for _ in range(num_batches):
        user_topic = rs.randint(0, TOPICS, size=batch_size)
        items = np.array([rs.choice(by_topic[t]) for t in user_topic])
        hist_len = rs.randint(0, H + 1, size=batch_size)
        hist = np.array([rs.choice(by_topic[t], size=H) for t in user_topic])
        hist = hist * (np.arange(H)[None, :] < hist_len[:, None])
        out.append({
            "user_gender": (user_topic % 2) + 1, "user_age": user_topic + 1,
            "hist_items": hist.astype(np.int64), "hist_len": hist_len.astype(np.int64),
            "item": items.astype(np.int64), "item_tags": TABLE.tags[items],
            "item_provider": TABLE.provider[items], "item_year": TABLE.extra["item_year"][items]})
    return out


def _dataset(batches):
    def gen():
        yield from batches
    sig = {k: tf.TensorSpec((None,) + v.shape[1:], tf.int64) for k, v in batches[0].items()}
    return tf.data.Dataset.from_generator(gen, output_signature=sig)


def _cfg(**model):
    loss = model.pop("loss", {})
    raw_model = {"embedding_dim": D, "output_dim": D, "item_mlp_units": [16, D],
                 "user_mlp_units": [16, D], "num_heads": 2}
    raw_model.update(model)
    return from_dict({"model": raw_model,
                      "loss": {"num_negatives": 20, "num_cl_negatives": 8, **loss},
                      "train": {"batch_size": 32, "seed": 11},
                      "preprocess": {"history_length": H}})


def _build(cfg):
    return build_model(cfg, TABLE, VOCAB, USER_FIELDS, COOC, TITLE)


def _tensors(batch):
    return {k: tf.constant(v) for k, v in batch.items()}


# --- layers and towers round-trip through get_config --------------------------------------
def _lookup():
    return L.ItemFeatureLookup.from_item_table(TABLE)


def _item_fields():
    return L.ItemFieldEmbeddings(V, NUM_TAGS, NUM_PROVIDERS, {"item_year": NUM_YEARS}, D)


def _user_fields():
    return L.UserFieldEmbeddings({"user_gender": 3, "user_age": 5}, D)


def _all_towers():
    lk, itf = _lookup(), _item_fields()
    return [
        TW.MLPItemTower(lk, itf, [16, D]), TW.FMItemTower(lk, itf),
        TW.DeepFMItemTower(lk, itf, [16, D]), TW.AutoIntItemTower(lk, itf, D, 2, 2),
        TW.ICANUserTower(lk, itf, _user_fields(), [16, D], 2, 1),
        TW.ICANUserTower(lk, itf, _user_fields(), [16, D], 2, 1, transformer_dim=8),
        TW.ICANUserTower(lk, itf, _user_fields(), [16, D], 1, 2, 0.1, attention="einsum",
                         history_embeddings="slots", history_batch_hint=4),
        TW.YoutubeDNNUserTower(lk, itf, _user_fields(), [16, D]),
        TW.YoutubeDNNUserTower(lk, itf, _user_fields(), [D], history_embeddings="table"),
        TW.FMUserTower(lk, itf, _user_fields()),
        TW.DeepFMUserTower(lk, itf, _user_fields(), [16, D]),
        TW.AutoIntUserTower(lk, itf, _user_fields(), D, 2, 1)]


NUM_TOWERS = 12  # len(_all_towers()), checked by the round-trip test


def _round_trip(layer, *args, **kwargs):
    config = layer.get_config()
    clone = type(layer).from_config(config)
    assert clone.get_config() == config
    again = L.deserialize(L.serialize(layer))
    assert type(again) is type(layer) and again.get_config() == config
    if args:
        out = layer(*args, **kwargs)
        clone(*args, **kwargs)
        clone.set_weights(layer.get_weights())
        out_clone = clone(*args, **kwargs)
        for a, b in zip(tf.nest.flatten(out), tf.nest.flatten(out_clone)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_layers_round_trip_through_get_config():
    feats = _tensors(_batches(1, 6)[0])
    x = tf.random.stateless_normal([2, H, D], seed=[1, 2])
    mask = tf.constant([[True] * H, [True, True] + [False] * (H - 2)])
    _round_trip(_lookup(), tf.constant([0, 3, 7], tf.int64))
    _round_trip(_item_fields(), {k: feats[k] for k in
                                 ("item", "item_tags", "item_provider", "item_year")})
    _round_trip(_user_fields(), feats)
    _round_trip(L.MLP([4, 3], dropout=0.1, final_activation="tanh"), x)
    _round_trip(L.PositionEmbedding(), x)
    _round_trip(L.MLP([D]), x)
    _round_trip(L.TransformerEncoderBlock(2, ff_dim=6), x, mask=mask)
    _round_trip(L.TransformerEncoderBlock(1, dropout=0.1, attention="einsum"), x, mask=mask)
    _round_trip(L.AutoIntInteraction(2, 3), x)
    _round_trip(L.AutoIntInteraction(1, 4, use_residual=False), x)


@pytest.mark.parametrize("index", range(NUM_TOWERS))
def test_towers_round_trip_through_get_config(index):
    towers = _all_towers()
    assert len(towers) == NUM_TOWERS
    tower = towers[index]
    feats = _tensors(_batches(1, 6)[0])
    _round_trip(tower, feats)
    assert tower(feats).shape == (6, tower.output_dim)


def test_layer_argument_errors_name_what_was_received():
    with pytest.raises(KeyError, match=r"missing feature\(s\) \['item_year'\]"):
        _item_fields()({"item": tf.constant([1]), "item_tags": tf.constant([[1]]),
                        "item_provider": tf.constant([1])})
    with pytest.raises(ValueError, match="MLP units must be"):
        L.MLP([])
    with pytest.raises(ValueError, match=r"provider must be \[V\]"):
        L.ItemFeatureLookup(TABLE.tags, TABLE.provider[:3])
    with pytest.raises(ValueError, match=r"hist_items must be \[B, H\]"):
        TW.ICANUserTower(_lookup(), _item_fields(), _user_fields(), [D])(
            {"user_gender": tf.constant([1]), "user_age": tf.constant([1]),
             "hist_items": tf.constant([1, 2]), "hist_len": tf.constant([1])})


def test_layer_and_tower_constructors_check_their_arguments():
    """Each layer and tower validates its arguments at construction, in one line naming the
    argument and the value received (the config checks are not the only guard)."""
    lk, itf, uf = _lookup(), _item_fields(), _user_fields()
    cases = [
        (lambda: L.ItemFeatureLookup(TABLE.tags, TABLE.provider, {"year": TABLE.provider}),
         "must start with 'item_'. Received: 'year'"),
        (lambda: L.ItemFieldEmbeddings(V, 0, NUM_PROVIDERS),
         "num_tags must be an int >= 1. Received: num_tags=0"),
        (lambda: L.ItemFieldEmbeddings(V, NUM_TAGS, NUM_PROVIDERS, {"item_year": -2}),
         r"extra_vocab_sizes\['item_year'\] must be an int >= 1. Received: "
         r"extra_vocab_sizes\['item_year'\]=-2"),
        (lambda: L.ItemFieldEmbeddings(V, NUM_TAGS, NUM_PROVIDERS, embedding_dim=8.0),
         "embedding_dim must be an int >= 1. Received: embedding_dim=8.0"),
        (lambda: L.UserFieldEmbeddings({"user_gender": 0}),
         r"vocab_sizes\['user_gender'\] must be an int >= 1. Received: "),
        (lambda: L.MLP([4, 0]), r"MLP units must be .* Received: units=\[4, 0\]"),
        (lambda: L.MLP([4], dropout=1.0), r"dropout must be in \[0, 1\). Received: dropout=1.0"),
        (lambda: L.TransformerEncoderBlock(0), "num_heads must be an int >= 1. Received: "
                                               "num_heads=0"),
        (lambda: L.TransformerEncoderBlock(2, ff_dim=-4), "Received: ff_dim=-4"),
        (lambda: L.TransformerEncoderBlock(2, attention="fast"),
         r"attention must be one of \('matmul', 'einsum'\). Received: attention='fast'"),
        (lambda: L.AutoIntInteraction(2, head_dim=0), "Received: head_dim=0"),
        (lambda: TW.MLPItemTower(lk, itf, [16, D], dropout=-0.1), "Received: dropout=-0.1"),
        (lambda: TW.DeepFMItemTower(lk, itf, []), "item tower units must be .* Received: "
                                                  r"units=\[\]"),
        (lambda: TW.AutoIntItemTower(lk, itf, output_dim=0), "Received: output_dim=0"),
        (lambda: TW.AutoIntUserTower(lk, itf, uf, D, num_layers=-1), "Received: num_layers=-1"),
        (lambda: TW.ICANUserTower(lk, itf, uf, [D], transformer_dim=-1),
         "transformer_dim must be an int >= 0. Received: transformer_dim=-1"),
        (lambda: TW.ICANUserTower(lk, itf, uf, [D], num_layers=0, attention="flash"),
         "Received: attention='flash'"),
        (lambda: TW.ICANUserTower(lk, itf, uf, [D], num_heads=0), "Received: num_heads=0"),
        (lambda: TW.YoutubeDNNUserTower(lk, itf, uf, [D], history_batch_hint=-1),
         "history_batch_hint must be an int >= 0. Received: history_batch_hint=-1"),
        (lambda: TW.FMUserTower(lk, itf, uf, history_embeddings="fast"), "Received: 'fast'"),
    ]
    for make, message in cases:
        with pytest.raises(ValueError, match=message):
            make()


def test_history_padding_is_ignored():
    tower = TW.ICANUserTower(_lookup(), _item_fields(), _user_fields(), [16, D])
    feats = _tensors(_batches(1, 4)[0])
    feats["hist_len"] = tf.constant([2, 2, 2, 2], tf.int64)
    base = tower(feats).numpy()
    noisy = dict(feats)
    noisy["hist_items"] = tf.concat([feats["hist_items"][:, :2],
                                     tf.fill([4, H - 2], tf.constant(7, tf.int64))], axis=1)
    np.testing.assert_allclose(tower(noisy).numpy(), base, rtol=1e-5, atol=1e-6)


# --- the model -------------------------------------------------------------------------------
def _grads(model, features):
    with tf.GradientTape() as tape:
        losses = model.compute_losses(features, training=True)
    variables = model.user_tower.trainable_variables + model.item_tower.trainable_variables
    return losses, variables, tape.gradient(losses["loss"], variables)


def test_zero_lambdas_give_the_base_model_gradients():
    feats = _tensors(_batches(1)[0])
    base = _build(_cfg(cl=[]))
    zero = _build(_cfg(cl=["feature", "semantic", "session"],
                       loss={"lambda_feature": 0.0, "lambda_semantic": 0.0,
                             "lambda_session": 0.0}))
    for m in (base, zero):
        m.compute_losses(feats, training=True)  # builds every weight, one negative draw each
    zero.user_tower.set_weights(base.user_tower.get_weights())
    zero.item_tower.set_weights(base.item_tower.get_weights())
    lb, vb, gb = _grads(base, feats)
    lz, vz, gz = _grads(zero, feats)
    assert [v.name for v in vb] == [v.name for v in vz]
    assert set(lz) == {"loss", "sampled_softmax_loss", "feature_cl_loss", "semantic_cl_loss",
                       "session_cl_loss"}
    assert all(float(lz[k]) > 0 for k in lz)  # the CL terms are computed (monitor only)
    np.testing.assert_allclose(lz["loss"], lb["loss"], rtol=1e-6)
    for a, b in zip(gb, gz):
        np.testing.assert_allclose(tf.convert_to_tensor(a), tf.convert_to_tensor(b),
                                   rtol=1e-5, atol=1e-7)
    # and a non-zero lambda does change them
    zero.lambdas["session"] = 0.5
    _, _, g_on = _grads(zero, feats)
    assert any(not np.allclose(tf.convert_to_tensor(a), tf.convert_to_tensor(b))
               for a, b in zip(gb, g_on))


def test_short_training_lowers_every_loss():
    tf_keras.utils.set_random_seed(0)
    cfg = _cfg(cl=["feature", "semantic", "session"])
    model = _build(cfg)
    model.compile(optimizer=tf_keras.optimizers.Adam(0.01))
    train = _dataset(_batches(8, 32, seed=2))
    before = model.evaluate(train, verbose=0, return_dict=True)
    history = model.fit(train, epochs=4, verbose=0)
    after = model.evaluate(train, verbose=0, return_dict=True)
    names = ["loss", "sampled_softmax_loss", "feature_cl_loss", "semantic_cl_loss",
             "session_cl_loss"]
    assert set(history.history) == set(names)
    for name in names:
        assert after[name] < before[name], (name, before[name], after[name])
        assert history.history[name][-1] < history.history[name][0], name


@pytest.mark.parametrize("name", ["ican", "youtubednn", "fm", "deepfm", "autoint"])
def test_each_model_trains_a_step_with_feature_and_session_cl(name):
    model = _build(_cfg(name=name, cl=["feature", "session"]))
    model.compile(optimizer=tf_keras.optimizers.Adam(0.01), run_eagerly=True)
    batches = _batches(1)
    before = model.item_embeddings([1, 2, 3]).numpy()
    hist = model.fit(_dataset(batches), epochs=1, verbose=0).history
    assert set(hist) == {"loss", "sampled_softmax_loss", "feature_cl_loss", "session_cl_loss"}
    assert all(np.isfinite(v[0]) and v[0] > 0 for v in hist.values())
    after = model.item_embeddings([1, 2, 3]).numpy()
    assert not np.allclose(before, after)
    users = model.user_embeddings(_tensors(batches[0]))
    assert users.shape == (32, model.item_tower.output_dim) and users.dtype == tf.float32


@pytest.mark.parametrize("preset,strategy", [("rfm_star", "element"), ("cfm", "correlated"),
                                             ("micrec", "element"), ("ican", None)])
def test_presets_build(preset, strategy):
    cfg = from_dict({"model": {"preset": preset, "embedding_dim": D, "output_dim": D,
                               "item_mlp_units": [D], "user_mlp_units": [D]},
                     "loss": {"num_negatives": 5}, "preprocess": {"history_length": H}})
    model = _build(cfg)
    if strategy is None:
        assert model.cl_tasks == {}
    else:
        assert model.feature_cl.strategy == strategy
    losses = model.compute_losses(_tensors(_batches(1, 8)[0]), training=True)
    assert np.isfinite(float(losses["loss"]))


def _assert_float32_close(got, want, rel=1e-5):
    """``got`` equals ``want`` up to float32 rounding of a different kernel or batch shape: the
    error of a sum scales with its largest terms, so the tolerance is ``rel`` of the largest
    |want| (a near-zero element carries the same absolute error as the others)."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, (got.shape, want.shape)
    np.testing.assert_allclose(got, want, rtol=rel, atol=rel * float(np.max(np.abs(want))))


def test_inference_paths_skip_cl_and_match_the_towers():
    model = _build(_cfg(cl=["feature", "semantic", "session"]))
    batch = _tensors(_batches(1, 8)[0])
    model.compute_losses(batch, training=True)
    states = [t.rng.state.numpy().copy() for t in model.cl_tasks.values()]
    main_state = model.retrieval.rng.state.numpy().copy()
    items = model.item_embeddings()
    users = model.user_embeddings(batch)
    out = model(batch)
    assert items.shape == (V, D) and users.shape == (8, D)
    for t, s in zip(model.cl_tasks.values(), states):
        np.testing.assert_array_equal(t.rng.state.numpy(), s)
    np.testing.assert_array_equal(model.retrieval.rng.state.numpy(), main_state)
    # the table-based item path equals the batch-feature path for the same items; float32
    # tolerance: oneDNN picks its kernels by shape and instruction set, so on an AVX2-only CPU
    # the bits differ between batch sizes (and near-zero elements differ relatively most)
    _assert_float32_close(tf.gather(items, batch["item"]), out["item_embedding"])
    _assert_float32_close(users, out["user_embedding"])
    _assert_float32_close(model.item_embeddings([3, 5], batch_size=1), tf.gather(items, [3, 5]))
    # evaluation leaves the samplers as they were, and repeats its draws
    model.compile(optimizer=tf_keras.optimizers.Adam(0.01), run_eagerly=True)
    first = model.evaluate(_dataset(_batches(1, 8)), verbose=0, return_dict=True)
    second = model.evaluate(_dataset(_batches(1, 8)), verbose=0, return_dict=True)
    assert first == second
    for t, s in zip(model.cl_tasks.values(), states):
        np.testing.assert_array_equal(t.rng.state.numpy(), s)


def test_checkpoint_resume_continues_exactly(tmp_path):
    """Weights, optimizer slots and every sampler's generator state are checkpointed: training
    resumed from a checkpoint matches uninterrupted training step for step."""
    batches = [_tensors(b) for b in _batches(5, 16)]
    cfg = _cfg(cl=["feature", "semantic", "session"])

    def new_model():
        model = _build(cfg)
        model.compile(optimizer=tf_keras.optimizers.Adam(0.01))
        return model

    tf_keras.utils.set_random_seed(3)
    first = new_model()
    for b in batches[:2]:
        first.train_step(b)
    path = tf.train.Checkpoint(model=first, optimizer=first.optimizer).save(
        str(tmp_path / "ckpt"))
    for b in batches[2:]:
        logs_first = first.train_step(b)

    tf_keras.utils.set_random_seed(4)  # different initial weights, all overwritten by restore
    second = new_model()
    second.compute_losses(batches[0], training=True)  # build variables
    second.optimizer.build(second.trainable_variables)
    tf.train.Checkpoint(model=second, optimizer=second.optimizer).restore(path).assert_consumed()
    for b in batches[2:]:
        logs_second = second.train_step(b)
    np.testing.assert_allclose(second.item_embeddings(), first.item_embeddings(), rtol=1e-5,
                               atol=1e-6)
    for name in logs_first:
        np.testing.assert_allclose(float(logs_second[name]), float(logs_first[name]), rtol=1e-5)
    for a, b in zip(first.samplers, second.samplers):
        np.testing.assert_array_equal(a.state.numpy(), b.state.numpy())


def test_mixed_precision_keeps_losses_float32():
    tf_keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = _build(_cfg(cl=["feature", "semantic", "session"]))
        opt = tf_keras.mixed_precision.LossScaleOptimizer(tf_keras.optimizers.Adam(0.01))
        model.compile(optimizer=opt, run_eagerly=True)
        feats = _tensors(_batches(1)[0])
        losses = model.compute_losses(feats, training=True)
        assert all(v.dtype == tf.float32 for v in losses.values())
        assert model.user_tower.compute_dtype == "float16"
        logs = model.train_step(feats)
        assert all(np.isfinite(float(v)) for v in logs.values())
        assert model.item_embeddings([1, 2]).dtype == tf.float32
    finally:
        tf_keras.mixed_precision.set_global_policy("float32")


def test_in_batch_negatives_train():
    model = _build(_cfg(cl=[], loss={"in_batch_negatives": True, "num_negatives": 5}))
    model.compile(optimizer=tf_keras.optimizers.Adam(0.01), run_eagerly=True)
    hist = model.fit(_dataset(_batches(2)), verbose=0).history
    assert np.isfinite(hist["loss"][0])
    assert model.retrieval.frequency.step.numpy() == 2


def test_build_model_errors_are_clear():
    with pytest.raises(ValueError, match="no title_neighbours"):
        build_model(_cfg(cl=["semantic"]), TABLE, VOCAB, USER_FIELDS, COOC, None)
    with pytest.raises(ValueError, match="no cooccurrence"):
        build_model(_cfg(cl=["session"]), TABLE, VOCAB, USER_FIELDS, None, TITLE)
    with pytest.raises(ValueError, match=r"item_mlp_units\[-1\]=8 must equal"):
        _build(_cfg(user_mlp_units=[16, 4]))
    with pytest.raises(KeyError, match="user field 'income'"):
        build_model(_cfg(cl=[]), TABLE, VOCAB, ["income"])
    with pytest.raises(ValueError, match="item table has 41 rows"):
        build_model(_cfg(cl=[]), TABLE, {**VOCAB, "item_id": 40}, USER_FIELDS)
    base = _build(_cfg(cl=[]))
    parts = (base.user_tower, base.item_tower, base.retrieval)
    with pytest.raises(ValueError, match=r"lambdas keys must be in .* Received: \['graph'\]"):
        MicRecModel(*parts, lambdas={"feature": 1.0, "graph": 1.0})
    with pytest.raises(ValueError, match=r"lambdas\['session'\] must be >= 0. Received: -1.0"):
        MicRecModel(*parts, lambdas={"session": -1.0})


def test_built_model_takes_each_cl_task_s_lambda_and_seed_from_the_config():
    """The lambdas and sampler seeds follow ``loss.lambda_<task>`` and ``train.seed`` + 1, 2, 3
    (the tasks in the order feature, semantic, session), anchors + 4, the main loss + 0."""
    model = _build(_cfg(cl=["feature", "semantic", "session"],
                        loss={"lambda_feature": 0.7, "lambda_semantic": 0.2,
                              "lambda_session": 0.05, "cl_anchors": "both"}))
    assert model.lambdas == {"feature": 0.7, "semantic": 0.2, "session": 0.05}
    assert model.loss_names == ["loss", "sampled_softmax_loss", "feature_cl_loss",
                                "semantic_cl_loss", "session_cl_loss"]
    seeds = {"main": model.retrieval.seed, "feature": model.feature_cl.seed,
             "semantic": model.semantic_cl.seed, "session": model.session_cl.seed,
             "anchors": model.cl_anchor_sampler.seed}
    assert seeds == {"main": 11, "feature": 12, "semantic": 13, "session": 14, "anchors": 15}


def test_cl_similarity_reaches_every_cl_task_and_cosine_losses_are_bounded():
    cfg = _cfg(cl=["feature", "semantic", "session"],
               loss={"cl_similarity": "cosine", "temperature": 0.5})
    model = _build(cfg)
    assert {t.similarity for t in model.cl_tasks.values()} == {"cosine"}
    losses = model.compute_losses(_tensors(_batches(1, 16)[0]), training=True)
    # Cosine logits lie in [-1/tau, 1/tau], so InfoNCE over n candidates is at most
    # log(1 + (n-1) e^{2/tau}) (n <= 16 in-batch, 1 + 8 sampled), whatever the vector norms.
    assert 0.0 < float(losses["feature_cl_loss"]) <= np.log1p(15 * np.exp(4.0))
    for name in ("semantic_cl_loss", "session_cl_loss"):
        value = float(losses[name])
        assert 0.0 <= value <= np.log1p(8 * np.exp(4.0)), (name, value)
    dot = _build(_cfg(cl=["feature"]))
    assert dot.feature_cl.similarity == "dot"


def test_cl_anchors_and_session_positives_reach_the_model():
    batch = _tensors(_batches(1, 16)[0])
    batch_items = np.unique(batch["item"].numpy())
    default = _build(_cfg(cl=["feature", "session"]))
    assert default.cl_anchor_sampler is None and default.session_cl.positives == "count"
    for mode, size in (("uniform", 16), ("both", None)):
        model = _build(_cfg(cl=["feature", "session"],
                            loss={"cl_anchors": mode, "session_positives": "uniform"}))
        assert model.session_cl.positives == "uniform"
        assert model.cl_anchor_sampler.rng in model.samplers  # checkpointed, restored by eval
        ids = tf.reshape(batch["item"], [-1])
        inputs = model._cl_inputs(ids, {}, None, None, training=False)
        got = inputs.ids.numpy()
        assert len(set(got.tolist())) == len(got) and got.min() >= 1 and got.max() <= V - 1
        if size:
            assert len(got) <= size
        else:  # the batch's items first, then uniform draws not already there
            assert set(batch_items.tolist()) <= set(got.tolist())
            np.testing.assert_array_equal(got[:len(batch_items)],
                                          first_occurrence_order(ids.numpy()))
        # Anchors carry their own catalogue fields and tower outputs.
        np.testing.assert_array_equal(inputs.features["item"].numpy().reshape(-1), got)
        np.testing.assert_allclose(inputs.embeddings.numpy(),
                                   model.item_embeddings(got).numpy(), rtol=1e-5, atol=1e-6)
        losses = model.compute_losses(batch, training=True)
        assert np.isfinite(float(losses["loss"])) and float(losses["feature_cl_loss"]) > 0
    # CL off: no sampler even if asked for.
    assert _build(_cfg(cl=[], loss={"cl_anchors": "uniform"})).cl_anchor_sampler is None


def first_occurrence_order(values):
    """First-occurrence order of distinct values (pure numpy)."""
    _, first = np.unique(values, return_index=True)
    return values[np.sort(first)]

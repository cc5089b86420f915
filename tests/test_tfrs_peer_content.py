"""The TFRS peer with content (issue 28, item 5: "the TFRS two-tower peer with the same content
features"): ``model.item_text``, ``model.min_id_clicks`` and ``loss.id_dropout`` for
``model.name: tfrs_two_tower`` (micrec_tf/tfrs_peer.py).

References are independent of the code under test: numpy forward passes of the towers written
from their definitions (the peer of before: ``MLP([id row ; mean tag row])``; with the text field:
``MLP([id row * keep ; mean tag row ; provider row ; year row ; has_text * (W x + b)])``), the
in-batch softmax written from the formula, and the variables of the peer recorded from the code
before this change (commit 9027cc6).
"""
import micrec_tf  # noqa: F401  (before tensorflow)

import json
import os

import numpy as np
import pytest
import tensorflow as tf
import tf_keras

from micrec_tf.config import from_dict
from micrec_tf.data.artifacts import ItemTable
from micrec_tf.layers_id_dropout import IDFieldDropout
from micrec_tf.tfrs_peer import (TFRSContentItemModel, TFRSItemModel, TFRSUserModel,
                                 build_tfrs_two_tower)
from tests.conftest import tiny_item_fields

V, T, E, DT, H = 13, 2, 4, 6, 3
NUM_TAGS, NUM_PROVIDERS, NUM_YEARS = 5, 3, 4
VOCAB, TAGS, PROVIDER, YEAR, RS = tiny_item_fields(V, T)
TAGS[2, 1] = 3  # an item with two tags
PROVIDER[4] = 0  # an item without a provider
TEXT = RS.normal(size=(V, DT)).astype(np.float32)
TEXT[0] = 0.0
TEXT[7] = 0.0  # an item without a text vector
# Training clicks per item index: items 3 and 8 were never clicked, items 5 and 10 once.
CLICKS = np.array([0, 4, 2, 0, 7, 1, 3, 2, 0, 9, 1, 5, 2], np.int64)
COLD = {1: [3, 8], 2: [3, 5, 8, 10]}  # below min_id_clicks = 1 / 2
BATCH = {"user_gender": np.array([1, 2, 0, 1, 2, 1]),
         "hist_items": np.array([[1, 2, 0], [4, 0, 0], [0, 0, 0], [9, 6, 1], [0, 2, 2],
                                 [11, 12, 7]]),
         "hist_len": np.array([2, 1, 0, 3, 3, 3]),
         "item": np.array([1, 2, 1, 9, 4, 6])}
# The peer's variables with the defaults, recorded from the code before this change (9027cc6,
# same _cfg, built by one compute_losses call): name, shape.
BEFORE = [("item_model/item_id_embedding/embeddings:0", (13, 4)),
          ("user_model/user_gender_embedding/embeddings:0", (3, 4)),
          ("user_model/user_mlp/dense_0/kernel:0", (8, 5)),
          ("user_model/user_mlp/dense_0/bias:0", (5,)),
          ("user_model/user_mlp/dense_1/kernel:0", (5, 3)),
          ("user_model/user_mlp/dense_1/bias:0", (3,)),
          ("item_model/tag_embedding/embeddings:0", (5, 4)),
          ("item_model/item_mlp/dense_0/kernel:0", (8, 16)),
          ("item_model/item_mlp/dense_0/bias:0", (16,)),
          ("item_model/item_mlp/dense_1/kernel:0", (16, 3)),
          ("item_model/item_mlp/dense_1/bias:0", (3,))]


def _table(clicks=None):
    return ItemTable(tags=TAGS, provider=PROVIDER, extra={"item_year": YEAR},
                     category=TAGS[:, 0], id_clicks=clicks)


def _cfg(model=None, loss=None):
    raw = {"name": "tfrs_two_tower", "cl": [], "embedding_dim": E, "output_dim": 3,
           "item_mlp_units": [16, 3], "user_mlp_units": [5, 3]}
    raw.update(model or {})
    return from_dict({"model": raw, "loss": dict(loss or {}), "train": {"seed": 11}})


def _model(model=None, loss=None, clicks=None, text=TEXT):
    tf_keras.utils.set_random_seed(0)
    return build_tfrs_two_tower(_cfg(model, loss), _table(clicks), VOCAB, ["gender"],
                                item_counts=np.maximum(CLICKS, 1), text_vectors=text)


def _relu_mlp(x, dense_layers):
    for i, layer in enumerate(dense_layers):
        x = x @ layer.kernel.numpy().astype(np.float64) + layer.bias.numpy()
        if i < len(dense_layers) - 1:
            x = np.maximum(x, 0.0)
    return x


def _tag_mean(tag_table, ids):
    out = []
    for i in ids:
        tags = [t for t in TAGS[i] if t > 0]
        out.append(tag_table[tags].mean(axis=0) if tags else np.zeros(E))
    return np.array(out)


def _reference_plain_items(item_model, ids, keep=None):
    """The peer of before: MLP([id row ; mean of the tag rows]), written from its definition;
    with ``keep`` [V] the id row of an item with keep False is zeros."""
    id_rows = item_model.id_embedding.embeddings.numpy().astype(np.float64)[ids]
    if keep is not None:
        id_rows = id_rows * keep[ids][:, None]
    tags = _tag_mean(item_model.tag_embedding.embeddings.numpy().astype(np.float64), ids)
    return _relu_mlp(np.concatenate([id_rows, tags], axis=1), item_model.mlp.dense_layers)


def _reference_content_items(item_model, ids, keep):
    """MLP([id * keep ; tag mean ; provider ; year ; has_text * (W x + b)]) over the catalogue
    arrays of this file (0 = padding: a zero field)."""
    f = item_model.field_embeddings
    table = lambda layer: layer.embeddings.numpy().astype(np.float64)  # noqa: E731
    ids = np.asarray(ids)
    id_rows = table(f.item_embedding)[ids] * (keep[ids] * (ids > 0))[:, None]
    tags = _tag_mean(table(f.tag_embedding), ids)
    provider = table(f.provider_embedding)[PROVIDER[ids]] * (PROVIDER[ids] > 0)[:, None]
    year = table(f.extra_embeddings[0])[YEAR[ids]] * (YEAR[ids] > 0)[:, None]
    x = TEXT[ids].astype(np.float64)
    w, b = f.text_projection.kernel.numpy(), f.text_projection.bias.numpy()
    text = (x @ w + b) * np.any(x != 0, axis=1)[:, None]
    raw = np.concatenate([id_rows, tags, provider, year, text], axis=1)
    return _relu_mlp(raw, item_model.mlp.dense_layers)


def _overwrite_id_rows(model, rows, seed=1):
    table = model.item_model.id_embedding.embeddings
    new = table.numpy()
    new[rows] = np.random.RandomState(seed).normal(size=(len(rows), E)) * 3.0
    table.assign(new)


def _in_batch_loss(u, v, ids, q):
    """Mean over rows i of -log softmax_j(u_i . v_j - log q[ids_j]) at j = i, the columns j != i
    with ids_j == ids_i left out of row i."""
    logits = u.astype(np.float64) @ v.astype(np.float64).T - np.log(q[ids])[None, :]
    losses = []
    for i in range(len(ids)):
        row = logits[i, (ids != ids[i]) | (np.arange(len(ids)) == i)]
        losses.append(np.log(np.exp(row - row.max()).sum()) + row.max() - logits[i, i])
    return float(np.mean(losses))


# --------------------------------------------------------------------------- defaults
def test_defaults_build_the_peer_of_before():
    """No mask (no click counts, or every item clicked), no text field, no ID dropout: the
    variables of before, and the item vectors of the old tower's formula."""
    for clicks in (None, np.maximum(CLICKS, 1)):  # the clicked vocabulary: every item clicked
        model = _model(clicks=clicks)
        model.compute_losses(BATCH)
        assert [(w.name, tuple(w.shape)) for w in model.weights
                if "total" not in w.name and "count" not in w.name] == BEFORE
        assert isinstance(model.item_model, TFRSItemModel)
        assert not model.item_model.id_masked and not model.user_model.id_masked
        assert model.id_field_dropout is None and model.samplers == []
        assert "id_masked" not in model.item_model.get_config()
        assert "id_masked" not in model.user_model.get_config()
        ids = np.arange(V)
        np.testing.assert_allclose(model.item_embeddings(ids).numpy(),
                                   _reference_plain_items(model.item_model, ids), atol=1e-5)


# ----------------------------------------------------------------------- min_id_clicks
@pytest.mark.parametrize("item_text", [False, True])
@pytest.mark.parametrize("threshold", [1, 2])
def test_cold_items_vectors_ignore_their_id_rows(item_text, threshold):
    """The issue's must-show for the peer: overwriting a cold item's ID row leaves its vector as
    it was; a clicked item's vector moves with its ID row."""
    cold = COLD[threshold]
    model = _model({"item_text": item_text, "min_id_clicks": threshold}, clicks=CLICKS)
    before = model.item_embeddings().numpy()
    _overwrite_id_rows(model, cold)
    # Exact: the same call over the same [V] batch on one machine, and a masked ID row enters
    # only multiplied by 0.
    np.testing.assert_array_equal(model.item_embeddings().numpy(), before)
    warm = [i for i in range(1, V) if i not in cold]
    _overwrite_id_rows(model, warm, seed=2)
    after = model.item_embeddings().numpy()
    for i in range(1, V):  # row i = item i
        moved = not np.allclose(after[i], before[i], atol=1e-6)
        assert moved == (i not in cold), i
    # Against the formula with the mask written out from the click counts.
    keep = (CLICKS >= threshold).astype(np.float64)
    ids = np.arange(1, V)  # the catalogue items (row 0 is the padding item)
    want = (_reference_content_items(model.item_model, ids, keep) if item_text
            else _reference_plain_items(model.item_model, ids, keep))
    np.testing.assert_allclose(after[1:], want, atol=1e-5)


@pytest.mark.parametrize("item_text", [False, True])
def test_history_mean_leaves_out_the_masked_items(item_text):
    """A history click on an item that never uses its ID row leaves the user tower's mean: a
    history of cold items only gives the empty history's vector, whatever their ID rows."""
    model = _model({"item_text": item_text, "min_id_clicks": 2}, clicks=CLICKS)
    batch = {"user_gender": np.array([1, 1, 1, 2]),
             "hist_items": np.array([[3, 5, 8], [0, 0, 0], [3, 9, 10], [9, 0, 0]]),
             "hist_len": np.array([3, 0, 3, 1]), "item": np.array([1, 1, 1, 1])}
    got = model.user_model.history_embedding(batch).numpy()
    table = model.item_model.id_embedding.embeddings.numpy()
    np.testing.assert_allclose(got[0], np.zeros(E), atol=1e-7)
    np.testing.assert_allclose(got[2], table[9], atol=1e-6)  # 3 and 10 left out
    users = model.user_embeddings(batch).numpy()
    np.testing.assert_allclose(users[0], users[1], atol=1e-6)
    same_user_only_9 = {**batch, "user_gender": np.array([1, 1, 1, 1])}
    np.testing.assert_allclose(users[2], model.user_embeddings(same_user_only_9).numpy()[3],
                               atol=1e-6)
    _overwrite_id_rows(model, COLD[2])
    np.testing.assert_array_equal(model.user_embeddings(batch).numpy(), users)


# ------------------------------------------------------------------------- text field
def test_text_field_vectors_follow_the_hand_computation():
    model = _model({"item_text": True, "min_id_clicks": 1}, clicks=CLICKS)
    assert isinstance(model.item_model, TFRSContentItemModel)
    # one more field than ICAN's item fields: ID, tags, provider, year, text
    assert model.item_model.num_fields == 5
    ids = np.arange(V)
    got = model.item_embeddings(ids).numpy()
    want = _reference_content_items(model.item_model, ids, (CLICKS >= 1).astype(np.float64))
    np.testing.assert_allclose(got, want, atol=1e-5)
    # The user tower shares the field embeddings' ID table (as the peer of before shares its own).
    assert model.user_model.item_id_embedding is model.item_model.field_embeddings.item_embedding


def test_changing_one_items_text_vector_changes_only_its_item_vector():
    model = _model({"item_text": True})
    before = model.item_embeddings().numpy()
    text = TEXT.copy()
    text[4] += 1.0
    model.item_model.field_embeddings.text_table.assign(text)
    after = model.item_embeddings().numpy()
    for i in range(1, V):  # row i = item i
        assert np.allclose(after[i], before[i], atol=1e-7) == (i != 4), i
    # Item 7 has no text vector: its text field is zero, so its vector ignores the projection.
    bias = model.item_model.field_embeddings.text_projection.bias
    bias.assign(bias.numpy() + 1.0)
    moved = model.item_embeddings().numpy()
    for i in range(1, V):
        assert np.allclose(moved[i], after[i], atol=1e-7) == (i == 7), i


def test_text_field_trains_its_projection_not_its_table():
    model = _model({"item_text": True})
    fields = model.item_model.field_embeddings
    model.compute_losses(BATCH)  # builds the layers
    model.compile(optimizer=tf_keras.optimizers.Adam(0.05))
    kernel = fields.text_projection.kernel.numpy().copy()
    model.fit(tf.data.Dataset.from_tensors(BATCH).repeat(3), epochs=1, verbose=0)
    np.testing.assert_array_equal(fields.text_table.numpy(), TEXT)
    assert not np.allclose(fields.text_projection.kernel.numpy(), kernel)
    assert fields.text_table not in model.trainable_variables


# ------------------------------------------------------------------------- ID dropout
@pytest.mark.parametrize("item_text", [False, True])
def test_id_dropout_drops_the_candidates_id_fields_in_training_only(item_text):
    """The training loss equals the in-batch softmax over candidates whose ID field is zero for
    the rows the dropout's generator drops (each row on its own; replayed from a copy of its
    state); evaluation's loss is the undropped one."""
    rate = 0.5
    model = _model({"item_text": item_text}, {"id_dropout": rate})
    layer = model.id_field_dropout
    assert isinstance(layer, IDFieldDropout) and layer.rate == rate and layer.id_width == E
    assert model.samplers == [layer.rng]
    ids = BATCH["item"]
    q = np.maximum(CLICKS, 1) / np.maximum(CLICKS, 1).sum()
    model.compute_losses(BATCH)  # builds the layers
    last = model.user_model.mlp.dense_layers[-1].kernel  # larger user vectors: the loss then
    last.assign(last.numpy() * 50.0)  # tells dropped items from kept ones well above float noise
    u = model.user_embeddings(BATCH).numpy()
    full = model.item_embeddings(ids).numpy()
    # The same items with their ID rows zeroed (the ID field is zeros, everything else as is).
    table = model.item_model.id_embedding.embeddings
    saved = table.numpy()
    table.assign(np.zeros_like(saved))
    no_id = model.item_embeddings(ids).numpy()
    table.assign(saved)
    # (a copy of the state: from_state on the variable itself would share and advance it)
    replay = tf.random.Generator.from_state(layer.rng.state.numpy().copy(), layer.rng.algorithm)
    keep = replay.uniform([len(ids)]).numpy() >= rate
    assert keep.any() and not keep.all()  # the draw tells the cases apart
    v = np.where(keep[:, None], full, no_id)
    got = float(model.compute_losses(BATCH, training=True)["loss"])
    assert got == pytest.approx(_in_batch_loss(u, v, ids, q), abs=1e-5)
    assert abs(_in_batch_loss(u, full, ids, q) - got) > 1e-4
    # Outside training nothing is dropped and the generator does not move.
    state = layer.rng.state.numpy().copy()
    got_eval = float(model.compute_losses(BATCH, training=False)["loss"])
    assert got_eval == pytest.approx(_in_batch_loss(u, full, ids, q), abs=1e-5)
    np.testing.assert_array_equal(layer.rng.state.numpy(), state)


def test_id_dropout_seed_follows_train_seed():
    a = _model(loss={"id_dropout": 0.3}).id_field_dropout
    cfg = _cfg(loss={"id_dropout": 0.3})
    assert a.seed == cfg.train.seed + 1_000_003  # as MicRec's main loss (losses.py)


# ------------------------------------------------------------------------ round trips
def _round_trip(layer, *inputs):
    config = layer.get_config()
    clone = type(layer).from_config(config)
    clone(*inputs)
    assert clone.get_config() == config
    clone.set_weights(layer.get_weights())
    return clone


@pytest.mark.parametrize("item_text", [False, True])
def test_masked_and_text_layers_round_trip(item_text):
    model = _model({"item_text": item_text, "min_id_clicks": 2}, {"id_dropout": 0.25},
                   clicks=CLICKS)
    model.compute_losses(BATCH, training=True)
    ids = np.arange(V)
    model.item_model(ids)
    item = _round_trip(model.item_model, ids)
    masked = item.field_embeddings if item_text else item
    assert masked.get_config()["id_masked"] is True
    np.testing.assert_allclose(item(ids).numpy(), model.item_model(ids).numpy(), atol=1e-6)
    user = _round_trip(model.user_model, BATCH)
    assert user.get_config()["id_masked"] is True
    np.testing.assert_allclose(user(BATCH).numpy(), model.user_model(BATCH).numpy(), atol=1e-6)
    # The restored mask (a weight, not config) still hides the cold items' ID rows.
    table = item.id_embedding.embeddings
    table.assign(table.numpy() + 5.0)  # every ID row moves: the cold items' vectors do not
    np.testing.assert_allclose(item(np.array(COLD[2])).numpy(),
                               model.item_model(np.array(COLD[2])).numpy(), atol=1e-6)
    drop = model.id_field_dropout
    assert IDFieldDropout.from_config(drop.get_config()).get_config() == drop.get_config()


def test_checkpoint_restores_the_masks_and_the_text_table(tmp_path):
    model = _model({"item_text": True, "min_id_clicks": 2}, clicks=CLICKS)
    want = model.item_embeddings().numpy()
    users = model.user_embeddings(BATCH).numpy()
    path = tf.train.Checkpoint(model=model).write(str(tmp_path / "ckpt"))
    other = _model({"item_text": True, "min_id_clicks": 2}, clicks=CLICKS,
                   text=np.zeros_like(TEXT))
    other.compute_losses(BATCH)
    tf.train.Checkpoint(model=other).read(path).assert_existing_objects_matched()
    np.testing.assert_array_equal(other.item_model.field_embeddings.text_table.numpy(), TEXT)
    np.testing.assert_allclose(other.item_embeddings().numpy(), want, atol=1e-6)
    np.testing.assert_allclose(other.user_embeddings(BATCH).numpy(), users, atol=1e-6)


def test_checkpoint_carries_the_id_dropout_generator(tmp_path):
    """A resumed run draws the ID-dropout masks it would have drawn: the generator's state is
    part of the model's checkpoint."""
    model = _model(loss={"id_dropout": 0.5})
    model.compute_losses(BATCH, training=True)
    path = tf.train.Checkpoint(model=model).write(str(tmp_path / "ckpt"))
    next_draw = model.id_field_dropout.keep_mask(64).numpy()
    other = _model(loss={"id_dropout": 0.5})
    other.compute_losses(BATCH)
    tf.train.Checkpoint(model=other).read(path).assert_existing_objects_matched()
    np.testing.assert_array_equal(other.id_field_dropout.keep_mask(64).numpy(), next_draw)


def test_config_accepts_the_content_settings_for_the_peer():
    cfg = from_dict({"model": {"name": "tfrs_two_tower", "cl": [], "item_text": True,
                               "min_id_clicks": 3}, "loss": {"id_dropout": 0.5}})
    assert cfg.model.item_text and cfg.loss.id_dropout == 0.5


def test_layer_arguments_are_checked():
    emb = tf_keras.layers.Embedding(V, E)
    with pytest.raises(ValueError, match=r"id_keep_mask must be \[num_items\]=\[13\]. Received"):
        TFRSItemModel(TAGS, NUM_TAGS, E, [3], id_keep_mask=np.ones(4, bool))
    with pytest.raises(ValueError, match=r"id_keep_mask must be \[num_items\]=\[13\]. Received"):
        TFRSUserModel({"user_gender": 3}, emb, [3], id_keep_mask=np.ones(4, bool))
    with pytest.raises(ValueError, match="id_masked must be a bool. Received: 'yes'"):
        TFRSItemModel(TAGS, NUM_TAGS, E, [3], id_masked="yes")
    model = _model()
    with pytest.raises(TypeError, match="id_dropout must be an IDFieldDropout or None"):
        type(model)(model.user_model, model.item_model, model.task, id_dropout=0.5)


# ----------------------------------------------------------------- training, end to end
@pytest.mark.slow
def test_tiny_cold_start_training_of_the_content_peer(tmp_path):
    """A tiny ``item_cold_start`` + ``catalogue`` pipeline with text vectors from a vectors file,
    one epoch of the peer with the text field and ID dropout: metrics.json has the cold / warm /
    all slices of both splits, the cold-valid slice counts exactly the clicks on hash-rule
    bucket-0 items, and the export writes a vector for every catalogue item."""
    import hashlib

    from export import export_model, item_index
    from micrec_tf.data.arrays import load_split_arrays
    from micrec_tf.data.artifacts import read_items
    from micrec_tf.train import train
    from pipelines import preprocess, title_neighbours
    from tests.conftest import tiny_config

    tmp = str(tmp_path)
    vectors_path = os.path.join(tmp, "vectors.npz")
    cfg = tiny_config(tmp, preprocess={"split": "item_cold_start",
                                       "item_vocabulary": "catalogue"},
                      semantic={"source": "vectors", "vectors_path": vectors_path, "top_k": 5},
                      model={"name": "tfrs_two_tower", "cl": [], "item_text": True},
                      loss={"id_dropout": 0.25},
                      train={"epochs": 1, "early_stopping_patience": 2})
    preprocess.run(cfg, verbose=False)
    rows = read_items(os.path.join(cfg.artifacts_dir, "items", "items.jsonl"))
    rs = np.random.RandomState(5)
    np.savez(vectors_path, item_ids=np.array([r["item_id"] for r in rows]),
             vectors=rs.normal(size=(len(rows), 12)).astype(np.float32))
    title_neighbours.run(cfg, verbose=False)
    result = train(cfg, evaluate_test=True, log=lambda *a: None)
    model = result["model"]
    assert isinstance(model.item_model, TFRSContentItemModel)
    assert model.item_model.field_embeddings.id_masked  # the unclicked cold items are masked
    with open(os.path.join(result["run_dir"], "metrics.json"), encoding="utf-8") as fh:
        saved = json.load(fh)["cold_start"]
    with open(os.path.join(cfg.artifacts_dir, "vocab", "item_id.txt"), encoding="utf-8") as fh:
        raw_ids = [line.rstrip("\n") for line in fh]
    bucket = {i + 1: int(hashlib.sha256(r.encode()).hexdigest(), 16) % 10
              for i, r in enumerate(raw_ids)}
    for split, b in (("valid", 0), ("test", 1)):
        got = saved[split]
        targets = np.asarray(load_split_arrays(cfg.artifacts_dir, split)["item"]).reshape(-1)
        assert got["cold/num_clicks"] == sum(bucket.get(int(t)) == b for t in targets) > 0
        assert got["warm/num_clicks"] > 0
        assert got["cold/num_candidates"] == sum(v == b for v in bucket.values())
        for key in ("cold/hit@20", "cold/hit@50", "cold/ndcg@20", "warm/hit@50", "all/hit@50"):
            assert 0.0 <= got[key] <= 1.0, (split, key)
    version_dir = export_model.export_run(cfg, log=lambda *a: None)
    ids, vectors = item_index.load_item_embeddings(os.path.join(version_dir, "item_embeddings"))
    assert ids == raw_ids and len(ids) == len(rows)  # every catalogue item, clicked or not
    want = np.asarray(model.item_embeddings(np.arange(1, len(ids) + 1)), np.float32)
    assert np.max(np.abs(vectors - want)) <= 1e-5

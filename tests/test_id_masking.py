"""ID masking in the item tower (issue 28, items 1 and 3): ``model.min_id_clicks`` (an item with
too few training clicks never uses its ID row) and ``loss.id_dropout`` (DropoutNet's trick in
the main loss, :class:`micrec_tf.layers_id_dropout.IDFieldDropout`)."""
import micrec_tf  # noqa: F401

import os
import shutil

import numpy as np
import pytest
import tensorflow as tf
import tf_keras

from micrec_tf import layers as L
from micrec_tf.config import ConfigError, from_dict
from micrec_tf.data.artifacts import ArtifactContentError, ItemTable, read_id_clicks
from micrec_tf.layers_id_dropout import IDFieldDropout
from micrec_tf.layers_text import ItemTextFieldEmbeddings
from micrec_tf.losses import SampledSoftmaxTask
from micrec_tf.model import build_model, item_id_keep_mask
from tests.conftest import tiny_item_fields

V, T, D, H = 13, 2, 4, 3
NUM_TAGS, NUM_PROVIDERS, NUM_YEARS = 5, 3, 4
VOCAB, TAGS, PROVIDER, YEAR, RS = tiny_item_fields(V, T)
# Training clicks per item index: items 3 and 8 were never clicked, items 5 and 10 once.
CLICKS = np.array([0, 4, 2, 0, 7, 1, 3, 2, 0, 9, 1, 5, 2], np.int64)
COLD_1 = [3, 8]  # below min_id_clicks = 1
COLD_2 = [3, 5, 8, 10]  # below min_id_clicks = 2


def _table(clicks=CLICKS):
    return ItemTable(tags=TAGS, provider=PROVIDER, extra={"item_year": YEAR},
                     category=TAGS[:, 0], id_clicks=clicks)


def _cfg(model=None, loss=None):
    raw = {"embedding_dim": D, "output_dim": D, "item_mlp_units": [8, D],
           "user_mlp_units": [8, D], "num_heads": 2, "cl": []}
    raw.update(model or {})
    return from_dict({"model": raw,
                      "loss": {"num_negatives": 5, "num_cl_negatives": 3, **(loss or {})},
                      "train": {"batch_size": 4, "seed": 11},
                      "preprocess": {"history_length": H}})


def _features(ids):
    ids = np.asarray(ids, np.int64)
    return {"item": tf.constant(ids), "item_tags": tf.constant(TAGS[ids]),
            "item_provider": tf.constant(PROVIDER[ids]), "item_year": tf.constant(YEAR[ids])}


def _overwrite_id_rows(model, rows, seed=1):
    table = model.item_tower.field_embeddings.item_embedding.embeddings
    new = table.numpy()
    new[rows] = np.random.RandomState(seed).normal(size=(len(rows), D)) * 3.0
    table.assign(new)


# ------------------------------------------------------------------------ min_id_clicks
@pytest.mark.parametrize("threshold, cold", [(1, COLD_1), (2, COLD_2)])
@pytest.mark.parametrize("name", ["ican", "youtubednn", "fm", "deepfm", "autoint"])
def test_cold_items_vectors_ignore_their_id_rows(name, threshold, cold):
    """The issue's must-show: overwriting a cold item's ID row leaves its vector as it was; a
    clicked item's vector moves with its ID row."""
    model = build_model(_cfg({"name": name, "min_id_clicks": threshold}), _table(), VOCAB,
                        ["gender"])
    before = model.item_embeddings().numpy()
    _overwrite_id_rows(model, cold)
    # Exact on purpose: the same call over the same [V] batch on one machine (one oneDNN kernel
    # plan), and a masked ID row enters only multiplied by 0, so the bits must not move.
    np.testing.assert_array_equal(model.item_embeddings().numpy(), before)
    warm = [i for i in range(1, V) if i not in cold]
    _overwrite_id_rows(model, warm, seed=2)
    after = model.item_embeddings().numpy()
    for i in warm:
        assert np.max(np.abs(after[i] - before[i])) > 1e-4, i
    np.testing.assert_array_equal(after[cold], before[cold])


def test_id_field_is_zero_for_cold_items_and_the_table_row_for_the_others():
    """Hand reference: the ID field of item i is row i of the embedding table (numpy), or zeros
    for the cold items and the padding row."""
    for layer in (L.ItemFieldEmbeddings(V, NUM_TAGS, NUM_PROVIDERS, {"item_year": NUM_YEARS}, D,
                                        id_keep_mask=CLICKS >= 2),
                  ItemTextFieldEmbeddings(V, NUM_TAGS, NUM_PROVIDERS, {"item_year": NUM_YEARS}, D,
                                          text_dim=3, text_vectors=RS.normal(size=(V, 3)),
                                          id_keep_mask=CLICKS >= 2)):
        ids = np.arange(V)
        fields = layer(_features(ids)).numpy()
        table = layer.item_embedding.embeddings.numpy()
        want = table.copy()
        want[[0] + COLD_2] = 0.0
        # Exact: the ID field is a table gather times a 0/1 mask, no arithmetic to round.
        np.testing.assert_array_equal(fields[:, 0], want)
        # The other fields still read the item (the text field reads the `item` feature).
        assert np.all(np.any(fields[COLD_2, 1:] != 0, axis=-1))


def test_user_history_ignores_a_cold_items_id_row():
    model = build_model(_cfg({"min_id_clicks": 1}), _table(), VOCAB, ["gender"])
    feats = {"user_gender": tf.constant([1]), "hist_items": tf.constant([[3, 2, 0]], tf.int64),
             "hist_len": tf.constant([2], tf.int64)}
    before = model.user_embeddings(feats).numpy()
    _overwrite_id_rows(model, [3])  # item 3: never clicked, in the history
    np.testing.assert_array_equal(model.user_embeddings(feats).numpy(), before)
    _overwrite_id_rows(model, [2])  # item 2: clicked, in the history
    assert np.max(np.abs(model.user_embeddings(feats).numpy() - before)) > 1e-6


def test_keep_mask_from_click_counts():
    table = _table()
    np.testing.assert_array_equal(np.flatnonzero(~item_id_keep_mask(table, 1)), COLD_1)
    np.testing.assert_array_equal(np.flatnonzero(~item_id_keep_mask(table, 2)), COLD_2)
    assert item_id_keep_mask(table, 0) is None  # 0 never masks
    assert item_id_keep_mask(_table(None), 5) is None  # older artifacts: every item clicked
    assert item_id_keep_mask(_table(np.r_[0, np.ones(V - 1, np.int64)]), 1) is None


# Recorded from the code before this change (commit be78dd7) with tf_keras.utils.set_random_seed(3)
# and the model of _default_model: item vectors of items 1, 6, 12 and two user vectors.
HEAD_ITEMS = np.array([[-0.018721, 0.001391, 0.007242, 0.011861],
                       [-0.004043, -0.001255, 0.002147, 0.007716],
                       [-0.049068, -0.016757, -0.004265, -0.03053]], np.float32)
HEAD_USERS = np.array([[-0.486163, 0.949043, 1.238798, -0.784101],
                       [0.444083, -0.360567, 1.715554, 0.467141]], np.float32)


@pytest.mark.parametrize("clicks", [None, np.r_[0, np.arange(1, V)]])
def test_defaults_give_the_model_of_before(clicks):
    """min_id_clicks 1 and id_dropout 0 with every vocabulary item clicked (or no counts file):
    the variables and outputs of the model at be78dd7."""
    cfg = _cfg({"cl": ["feature"]})
    assert cfg.model.min_id_clicks == 1 and cfg.loss.id_dropout == 0.0
    tf_keras.utils.set_random_seed(3)
    model = build_model(cfg, _table(clicks), VOCAB, ["gender"])
    items = model.item_embeddings().numpy()
    feats = {"user_gender": tf.constant([1, 2]),
             "hist_items": tf.constant([[5, 2, 0], [7, 0, 0]], tf.int64),
             "hist_len": tf.constant([2, 1], tf.int64)}
    users = model.user_embeddings(feats).numpy()
    np.testing.assert_allclose(items[[1, 6, 12]], HEAD_ITEMS, atol=2e-6)
    np.testing.assert_allclose(users, HEAD_USERS, atol=2e-6)
    names = [w.name for w in model.weights]
    assert not any("keep_mask" in n or "dropout" in n for n in names)
    assert len(names) == 37  # as at be78dd7 (31 variables and 3 metric trackers' 2)
    assert len(model.samplers) == 2  # sampled softmax and feature CL, as before
    assert "id_masked" not in model.item_tower.field_embeddings.get_config()
    assert "id_dropout" not in model.retrieval.get_config()


def test_masked_layer_get_config_round_trip_keeps_the_mask_in_the_weights():
    layer = L.ItemFieldEmbeddings(V, NUM_TAGS, NUM_PROVIDERS, {"item_year": NUM_YEARS}, D,
                                  id_keep_mask=CLICKS >= 2)
    want = layer(_features(np.arange(V))).numpy()
    config = layer.get_config()
    assert config["id_masked"] is True and "id_keep_mask" not in config
    clone = L.ItemFieldEmbeddings.from_config(config)
    clone(_features(np.arange(V)))
    assert [w.name.split("/")[-1] for w in clone.weights if not w.trainable] == [
        "item_id_keep_mask:0"]
    clone.set_weights(layer.get_weights())
    np.testing.assert_array_equal(clone(_features(np.arange(V))).numpy(), want)
    np.testing.assert_array_equal(
        [w for w in clone.weights if not w.trainable][0].numpy(), (CLICKS >= 2).astype(float))


@pytest.mark.parametrize("kwargs, message", [
    ({"id_keep_mask": np.ones(V + 1, bool)}, f"id_keep_mask must be [num_items]=[{V}]. "
                                             f"Received: shape"),
    ({"id_masked": "yes"}, "id_masked must be a bool. Received: 'yes'"),
])
def test_layer_validates_the_mask(kwargs, message):
    with pytest.raises(ValueError) as err:
        L.ItemFieldEmbeddings(V, NUM_TAGS, NUM_PROVIDERS, None, D, **kwargs)
    assert message in str(err.value)


def test_read_id_clicks(tmp_path):
    path = tmp_path / "item_id_counts.txt"
    path.write_text("4\n0\n12\n")
    np.testing.assert_array_equal(read_id_clicks(str(path), 4), [0, 4, 0, 12])
    with pytest.raises(ArtifactContentError, match="has 3 counts, the item vocabulary 4"):
        read_id_clicks(str(path), 5)
    path.write_text("4\n-1\n12\n")
    with pytest.raises(ArtifactContentError, match=r"item_id_counts.txt:2: .*Received: '-1'"):
        read_id_clicks(str(path), 4)


@pytest.mark.parametrize("key, value", [("model.min_id_clicks", -1),
                                        ("model.min_id_clicks", 1.5),
                                        ("model.min_id_clicks", True),
                                        ("loss.id_dropout", 1.0), ("loss.id_dropout", -0.1),
                                        ("loss.id_dropout", "0.2")])
def test_config_validates_the_keys(key, value):
    section, name = key.split(".")
    with pytest.raises(ConfigError) as err:
        from_dict({section: {name: value}})
    assert key in str(err.value) and "\n" not in str(err.value)


def test_config_accepts_id_dropout_with_the_tfrs_peer():
    # Refused until the peer supported it (tests/test_tfrs_peer_content.py tests the peer's).
    cfg = from_dict({"model": {"name": "tfrs_two_tower", "cl": []}, "loss": {"id_dropout": 0.2}})
    assert cfg.loss.id_dropout == 0.2


# ----------------------------------------------------------------------------- id_dropout
def test_id_dropout_layer_round_trip_and_identity_at_inference():
    layer = IDFieldDropout(0.3, D, seed=5, name="idd")
    clone = IDFieldDropout.from_config(layer.get_config())
    assert (clone.rate, clone.id_width, clone.seed, clone.name) == (0.3, D, 5, "idd")
    raw = tf.constant(RS.normal(size=(50, 3 * D)), tf.float32)
    np.testing.assert_array_equal(layer(raw, training=False).numpy(), raw.numpy())
    np.testing.assert_array_equal(layer(raw).numpy(), raw.numpy())


@pytest.mark.parametrize("kwargs, message", [
    ({"rate": 1.0, "id_width": D}, "rate must be a number in [0, 1). Received: rate=1.0"),
    ({"rate": -0.1, "id_width": D}, "rate must be a number in [0, 1). Received: rate=-0.1"),
    ({"rate": 0.2, "id_width": 0}, "id_width must be an int >= 1. Received: id_width=0"),
])
def test_id_dropout_layer_validates(kwargs, message):
    with pytest.raises(ValueError) as err:
        IDFieldDropout(**kwargs)
    assert message in str(err.value)


@pytest.mark.parametrize("rate", [0.1, 0.3, 0.7])
def test_id_dropout_drops_whole_id_fields_at_the_rate(rate):
    """Over 40 draws of 500 rows, the dropped-row fraction is within 4.5 binomial standard
    deviations of ``rate``; a dropped row has its first D columns zero and the rest intact."""
    layer = IDFieldDropout(rate, D, seed=7)
    raw = RS.uniform(0.5, 1.5, size=(500, 3 * D)).astype(np.float32)  # no zero entries
    dropped = 0
    for _ in range(40):
        out = layer(tf.constant(raw), training=True).numpy()
        np.testing.assert_array_equal(out[:, D:], raw[:, D:])
        zero = np.all(out[:, :D] == 0, axis=1)
        same = np.all(out[:, :D] == raw[:, :D], axis=1)
        assert np.all(zero | same)
        dropped += int(zero.sum())
    n = 40 * 500
    assert abs(dropped / n - rate) <= 4.5 * np.sqrt(rate * (1 - rate) / n)


def test_sampled_softmax_task_round_trip_with_id_dropout():
    task = SampledSoftmaxTask(V, 5, seed=3, id_dropout=0.25, id_width=D, name="ss")
    config = task.get_config()
    assert config["id_dropout"] == 0.25 and config["id_width"] == D
    clone = SampledSoftmaxTask.from_config(config)
    assert clone.id_field_dropout.rate == 0.25 and clone.id_field_dropout.id_width == D
    with pytest.raises(ValueError, match=r"id_dropout must be a number in \[0, 1\). Received: 1"):
        SampledSoftmaxTask(V, 5, id_dropout=1)
    with pytest.raises(ValueError, match="needs id_width"):
        SampledSoftmaxTask(V, 5, id_dropout=0.5)


def _numpy_sampled_softmax(user, pos, pos_ids, neg, neg_ids):
    """Hand reference of eq. 7 with accidental-hit removal: mean over rows of
    ``-log softmax`` of the positive among the positive and the sampled negatives."""
    losses = []
    for b in range(user.shape[0]):
        logits = [float(user[b] @ pos[b])]
        logits += [float(user[b] @ neg[j]) for j in range(len(neg_ids))
                   if neg_ids[j] != pos_ids[b]]
        logits = np.array(logits, np.float64)
        m = logits.max()
        losses.append(-(logits[0] - m - np.log(np.exp(logits - m).sum())))
    return float(np.mean(losses))


def test_main_loss_with_every_id_dropped_equals_a_tower_without_id_rows():
    """p -> 1 (the layer's rate set to 1 after construction, beyond the config's range): the
    training loss is the numpy loss with the user vectors of the model and the item vectors of a
    copy whose ID table is all zeros; at inference the ID rows are used again."""
    cfg = _cfg(loss={"id_dropout": 0.5, "mask_history_negatives": False})
    model = build_model(cfg, _table(None), VOCAB, ["gender"])
    ref = build_model(_cfg(loss={"mask_history_negatives": False}), _table(None), VOCAB,
                      ["gender"])
    ids = np.array([1, 4, 6, 9], np.int64)
    feats = {**_features(ids), "user_gender": tf.constant([1, 2, 1, 2]),
             "hist_items": tf.constant([[5, 2, 0], [7, 0, 0], [3, 3, 1], [0, 0, 0]], tf.int64),
             "hist_len": tf.constant([2, 1, 3, 0], tf.int64)}
    model.compute_losses(feats)  # builds every variable
    ref.compute_losses(feats)
    ref.set_weights(model.get_weights())
    _overwrite_id_rows(ref, list(range(V)))
    ref.item_tower.field_embeddings.item_embedding.embeddings.assign(tf.zeros([V, D]))
    model.retrieval.id_field_dropout.rate = 1.0
    state = model.retrieval.rng.state.numpy()
    loss = float(model.compute_losses(feats, training=True)["sampled_softmax_loss"])
    model.retrieval.rng.state.assign(state)
    neg_ids = model.retrieval.sample_negatives().numpy()
    user = model.user_embeddings(feats).numpy()
    items = ref.item_embeddings().numpy()
    want = _numpy_sampled_softmax(user, items[ids], ids, items[neg_ids], neg_ids)
    assert loss == pytest.approx(want, rel=1e-5, abs=1e-6)
    # Inference: no dropout, the ID rows count.
    model.retrieval.rng.state.assign(state)
    loss = float(model.compute_losses(feats, training=False)["sampled_softmax_loss"])
    full = model.item_embeddings().numpy()
    want = _numpy_sampled_softmax(user, full[ids], ids, full[neg_ids], neg_ids)
    assert loss == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert len(model.samplers) == 2  # the negatives' and the dropout's generators


# ------------------------------------------------------------------------------- training
@pytest.mark.slow
def test_tiny_training_with_min_id_clicks_and_id_dropout(tiny_pipeline, tmp_path):
    """One epoch on the tiny pipeline's artifacts with a counts file that leaves every third
    item below min_id_clicks = 2; the trained model's cold items ignore their ID rows."""
    from micrec_tf.data.artifacts import load_artifacts
    from micrec_tf.train import train
    from tests.conftest import tiny_config

    cfg0, _ = tiny_pipeline
    tmp = str(tmp_path)
    art_dir = os.path.join(tmp, "artifacts", cfg0.name)
    shutil.copytree(cfg0.artifacts_dir, art_dir)
    num_items = len(load_artifacts(art_dir).vocabs["item_id"])
    counts = [1 if k % 3 == 0 else 5 for k in range(1, num_items + 1)]
    with open(os.path.join(art_dir, "vocab", "item_id_counts.txt"), "w") as fh:
        fh.write("".join(f"{c}\n" for c in counts))
    cfg = tiny_config(tmp, model={"min_id_clicks": 2}, loss={"id_dropout": 0.3},
                      train={"epochs": 1})
    cfg.data.data_dir = cfg0.data.data_dir
    result = train(cfg, evaluate_test=False, log=lambda *a: None)
    model = result["model"]
    cold = [k for k in range(1, num_items + 1) if k % 3 == 0]
    keep = [w for w in model.item_tower.weights if "item_id_keep_mask" in w.name]
    assert len(keep) == 1
    np.testing.assert_array_equal(np.flatnonzero(keep[0].numpy() == 0), cold)
    before = model.item_embeddings().numpy()
    assert np.all(np.isfinite(before))
    table = model.item_tower.field_embeddings.item_embedding.embeddings
    new = table.numpy()
    new[cold] = 10.0
    table.assign(new)
    np.testing.assert_allclose(model.item_embeddings().numpy(), before, atol=0, rtol=0)


# ------------------------------------------------------------- feature CL: ID-field dropout
@pytest.mark.parametrize("ratio", [0.2, 0.6])
def test_feature_cl_id_field_dropout_drops_the_id_field_alone(ratio):
    """``loss.feature_dropout: id_field`` (paper 3.3's field-level dropout, of f^I only): each
    row's ID field is zero with probability mask_ratio (binomial band), every other field is
    the row's own."""
    import types

    from micrec_tf.cl import FeatureCL

    cfg = _cfg({"cl": ["feature"]}, {"feature_dropout": "id_field", "mask_ratio": ratio})
    model = build_model(cfg, _table(None), VOCAB, ["gender"])
    assert model.feature_cl.strategy == "id_field"
    tower = model.item_tower
    ids = np.tile(np.arange(1, V), 200)
    feats = _features(ids)
    raw = tower.raw_embedding(feats)
    task = FeatureCL(D, "id_field", ratio, 0.2, seed=3)
    clone = FeatureCL.from_config(task.get_config())
    assert (clone.strategy, clone.mask_ratio) == ("id_field", ratio)
    aug = task.augment(types.SimpleNamespace(raw=raw, features=feats), tower).numpy()
    aug = aug.reshape(len(ids), tower.num_fields, D)
    raw = raw.numpy().reshape(len(ids), tower.num_fields, D)
    np.testing.assert_array_equal(aug[:, 1:], raw[:, 1:])
    dropped = np.all(aug[:, 0] == 0, axis=-1)
    assert np.all(dropped | np.all(aug[:, 0] == raw[:, 0], axis=-1))
    n = len(ids)
    assert abs(dropped.mean() - ratio) <= 4.5 * np.sqrt(ratio * (1 - ratio) / n)
    losses = model.compute_losses({**_features(ids[:4]), "user_gender": tf.constant([1] * 4),
                                   "hist_items": tf.zeros([4, H], tf.int64),
                                   "hist_len": tf.zeros([4], tf.int64)}, training=True)
    assert np.isfinite(float(losses["feature_cl_loss"]))


@pytest.mark.slow
def test_catalogue_vocabulary_training_and_export_of_unclicked_items(tmp_path):
    """preprocess.item_vocabulary: catalogue on the tiny synthetic data, one epoch with the
    default min_id_clicks (1) and id_dropout 0.3, then the export: every catalogue item of the
    raw item file has an exported vector, the unclicked ones (count 0 in vocab/item_id_counts.txt,
    checked against the raw files in tests/test_catalogue_vocab.py) have a zero ID keep mask,
    and their exported vectors do not move when their ID rows are overwritten."""
    from export import export_model, item_index
    from micrec_tf.data.artifacts import load_artifacts, read_items
    from micrec_tf.train import train
    from pipelines import preprocess, title_neighbours
    from tests.conftest import tiny_config

    tmp = str(tmp_path)
    cfg = tiny_config(tmp, preprocess={"item_vocabulary": "catalogue"},
                      loss={"id_dropout": 0.3}, train={"epochs": 1})
    preprocess.run(cfg, verbose=False)
    title_neighbours.run(cfg, verbose=False)
    art = load_artifacts(cfg.artifacts_dir)
    rows = read_items(os.path.join(cfg.artifacts_dir, "items", "items.jsonl"))
    counts = art.item_table.id_clicks
    assert counts is not None and counts.shape == (len(rows) + 1,)
    unclicked = [k for k in range(1, len(rows) + 1) if counts[k] == 0]
    assert unclicked  # the tiny catalogue has items without a training click
    result = train(cfg, evaluate_test=False, log=lambda *a: None)
    model = result["model"]
    keep = [w for w in model.item_tower.weights if "item_id_keep_mask" in w.name][0].numpy()
    np.testing.assert_array_equal(np.flatnonzero(keep[1:] == 0) + 1, unclicked)
    version_dir = export_model.export_run(cfg, log=lambda *a: None)
    ids, vectors = item_index.load_item_embeddings(os.path.join(version_dir, "item_embeddings"))
    assert ids == list(art.vocabs["item_id"]) and len(ids) == len(rows)
    table = model.item_tower.field_embeddings.item_embedding.embeddings
    new = table.numpy()
    new[unclicked] = 7.0
    table.assign(new)
    after = np.asarray(model.item_embeddings(np.asarray(unclicked, np.int64)), np.float32)
    np.testing.assert_allclose(vectors[np.asarray(unclicked) - 1], after, atol=1e-5, rtol=0)

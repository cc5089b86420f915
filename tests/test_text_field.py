"""The item text field (micrec_tf/layers_text.py, ``model.item_text``; issue 28, item 2)."""
import micrec_tf  # noqa: F401

import os
import shutil
import types

import numpy as np
import pytest
import tensorflow as tf
import tf_keras

from micrec_tf import layers as L
from micrec_tf.cl import FeatureCL
from micrec_tf.config import ConfigError, from_dict
from micrec_tf.data.artifacts import ArtifactError, ItemTable, load_text_vectors
from micrec_tf.layers_text import ItemTextFieldEmbeddings
from micrec_tf.model import build_model
from tests.conftest import tiny_item_fields

V, T, D, DT, H = 13, 2, 4, 6, 3
NUM_TAGS, NUM_PROVIDERS, NUM_YEARS = 5, 3, 4
VOCAB, TAGS, PROVIDER, YEAR, RS = tiny_item_fields(V, T)
TABLE = ItemTable(tags=TAGS, provider=PROVIDER, extra={"item_year": YEAR}, category=TAGS[:, 0])
TEXT = RS.normal(size=(V, DT)).astype(np.float32)
TEXT[0] = 0.0
TEXT[7] = 0.0  # an item without a text vector

# The model's variables with model.item_text false, recorded from the code before the text field
# existed (commit 89fc09b, same _cfg): name, shape, trainable.
BEFORE = [
    ("item_id_embedding/embeddings:0", (13, 4), True),
    ("tag_embedding/embeddings:0", (5, 4), True),
    ("provider_embedding/embeddings:0", (3, 4), True),
    ("item_year_embedding/embeddings:0", (4, 4), True),
    ("dense_0/kernel:0", (16, 8), True),
    ("dense_0/bias:0", (8,), True),
    ("dense_1/kernel:0", (8, 4), True),
    ("dense_1/bias:0", (4,), True),
]


def _cfg(**model):
    raw = {"embedding_dim": D, "output_dim": D, "item_mlp_units": [8, D],
           "user_mlp_units": [8, D], "num_heads": 2, "cl": []}
    raw.update(model)
    return from_dict({"model": raw, "loss": {"num_negatives": 5, "num_cl_negatives": 3},
                      "train": {"batch_size": 4, "seed": 11},
                      "preprocess": {"history_length": H}})


def _layer(text=TEXT, **kw):
    return ItemTextFieldEmbeddings(V, NUM_TAGS, NUM_PROVIDERS, {"item_year": NUM_YEARS}, D,
                                   text_dim=DT, text_vectors=text, **kw)


def _features(ids):
    ids = np.asarray(ids, np.int64)
    return {"item": tf.constant(ids), "item_tags": tf.constant(TAGS[ids]),
            "item_provider": tf.constant(PROVIDER[ids]), "item_year": tf.constant(YEAR[ids])}


def _item_weights(model):
    return [("/".join(w.name.split("/")[-2:]), tuple(w.shape), w.trainable)
            for w in model.item_tower.weights]


# --------------------------------------------------------------------------------- the layer
@pytest.mark.parametrize("kwargs, message", [
    ({"text_dim": 0}, "text_dim must be an int >= 1. Received: text_dim=0"),
    ({"text_dim": True}, "text_dim must be an int >= 1"),
    ({"text_vectors": np.zeros((V, DT + 1))}, f"text_vectors must be [num_items, text_dim]="
                                                f"[{V}, {DT}]. Received: shape"),
    ({"text_vectors": np.full((V, DT), np.nan)}, "text_vectors must be finite. Received"),
])
def test_layer_validates_its_arguments(kwargs, message):
    args = {"text_dim": DT, "text_vectors": TEXT, **kwargs}
    with pytest.raises(ValueError) as err:
        ItemTextFieldEmbeddings(V, NUM_TAGS, NUM_PROVIDERS, {"item_year": NUM_YEARS}, D, **args)
    assert message in str(err.value)


def test_text_field_equals_numpy_projection_of_the_table_row():
    layer = _layer()
    ids = np.array([[1, 7, 0], [12, 3, 3]])
    out = layer(_features(ids)).numpy()
    assert out.shape == (2, 3, 5, D) and layer.num_fields == 5
    kernel, bias = (v.numpy() for v in layer.text_projection.weights)
    want = TEXT[ids] @ kernel.astype(np.float64) + bias
    want[(ids == 7) | (ids == 0)] = 0.0  # no text vector: the zero field
    np.testing.assert_allclose(out[..., 4, :], want, rtol=1e-5, atol=1e-6)
    # The first four fields are the plain ItemFieldEmbeddings with the same weights.
    plain = L.ItemFieldEmbeddings(V, NUM_TAGS, NUM_PROVIDERS, {"item_year": NUM_YEARS}, D)
    plain(_features(ids))
    for w in plain.weights:
        w.assign(next(x for x in layer.weights if x.name.split("/")[-2:] == w.name.split("/")[-2:]))
    np.testing.assert_array_equal(out[..., :4, :], plain(_features(ids)).numpy())
    assert [w.name.split("/")[-1] for w in layer.non_trainable_weights] == ["item_text_table:0"]


def test_folded_text_field_equals_the_numpy_projection_for_every_item():
    layer = _layer()
    ids = np.array([[1, 7, 0], [12, 3, 3]])
    before = layer(_features(ids)).numpy()
    layer.fold_text_projection(chunk_rows=5)  # 13 rows in chunks of 5, 5 and 3
    kernel, bias = (v.numpy() for v in layer.text_projection.weights)
    want = TEXT.astype(np.float64) @ kernel + bias
    want[[0, 7]] = 0.0  # no text vector: the zero field
    assert layer.folded_text.shape == (V, D) and not layer.folded_text.trainable
    np.testing.assert_allclose(layer.folded_text.numpy(), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(layer.text_field(np.arange(V)).numpy(), want, rtol=1e-5,
                               atol=1e-6)
    after = layer(_features(ids)).numpy()
    np.testing.assert_array_equal(after[..., :4, :], before[..., :4, :])
    np.testing.assert_allclose(after, before, rtol=1e-6, atol=1e-6)
    folded = layer.folded_text
    layer.fold_text_projection()  # a second fold keeps the first table
    assert layer.folded_text is folded
    with pytest.raises(ValueError, match="chunk_rows must be an int >= 1. Received: "
                                         "chunk_rows=0"):
        _layer().fold_text_projection(chunk_rows=0)


def test_get_config_round_trip_and_weights_restore_the_table():
    layer = _layer(name="item_field_embeddings")
    ids = np.array([3, 7, 12])
    want = layer(_features(ids)).numpy()
    config = layer.get_config()
    assert config["text_dim"] == DT and "text_vectors" not in config
    clone = ItemTextFieldEmbeddings.from_config(config)
    assert clone.get_config() == config
    clone(_features(ids))
    np.testing.assert_array_equal(clone.text_table.numpy(), 0.0)  # the table is a weight
    clone.set_weights(layer.get_weights())
    np.testing.assert_array_equal(clone(_features(ids)).numpy(), want)
    again = tf_keras.layers.deserialize(tf_keras.layers.serialize(layer))
    assert isinstance(again, ItemTextFieldEmbeddings) and again.text_dim == DT


# ----------------------------------------------------------------------------- artifacts
def test_load_text_vectors_aligns_rows_with_item_indices(tmp_path):
    emb = np.arange(2 * DT, dtype=np.float32).reshape(2, DT) + 1
    np.save(tmp_path / "embeddings.npy", emb)
    np.save(tmp_path / "items.npy", np.array([9, 2], np.int64))
    table = load_text_vectors(str(tmp_path), V)
    assert table.shape == (V, DT) and table.dtype == np.float32
    np.testing.assert_array_equal(table[9], emb[0])
    np.testing.assert_array_equal(table[2], emb[1])
    others = [i for i in range(V) if i not in (2, 9)]
    np.testing.assert_array_equal(table[others], 0.0)
    np.save(tmp_path / "items.npy", np.array([9, V], np.int64))
    with pytest.raises(ArtifactError, match=r"outside \[1, 13\)"):
        load_text_vectors(str(tmp_path), V)


def test_missing_text_vectors_is_one_line_artifact_error_naming_the_job(tmp_path):
    table = ItemTable(tags=TAGS, provider=PROVIDER, extra={"item_year": YEAR},
                      category=TAGS[:, 0], text_vectors_dir=str(tmp_path / "title_embeddings"))
    with pytest.raises(ArtifactError) as err:
        build_model(_cfg(item_text=True), table, VOCAB, ["gender"])
    msg = str(err.value)
    assert "\n" not in msg and "pipelines.title_neighbours" in msg and "title_embeddings" in msg
    with pytest.raises(ArtifactError, match="pipelines.title_neighbours"):
        build_model(_cfg(item_text=True), TABLE, VOCAB, ["gender"])  # no artifacts folder


# (model.name tfrs_two_tower was refused here until the peer took the text field:
# tests/test_tfrs_peer_content.py.)
@pytest.mark.parametrize("key, value", [("loss.feature_dropout", "correlated")])
def test_config_refuses_unsupported_combinations(key, value):
    section, name = key.split(".")
    raw = {"model": {"item_text": True}, section: {name: value}}
    if section == "model":
        raw["model"] = {"item_text": True, name: value}
    with pytest.raises(ConfigError, match="model.item_text"):
        from_dict(raw)


def test_item_text_must_be_a_bool():
    with pytest.raises(ConfigError, match="model.item_text"):
        from_dict({"model": {"item_text": "yes"}})
    assert from_dict({}).model.item_text is False


# ------------------------------------------------------------------------------ the model
def test_item_text_false_keeps_the_variables_of_before():
    model = build_model(_cfg(), TABLE, VOCAB, ["gender"])
    model.item_embeddings()
    assert _item_weights(model) == BEFORE
    assert model.item_tower.num_fields == 4


def test_item_text_true_adds_the_table_and_projection_only():
    model = build_model(_cfg(item_text=True), TABLE, VOCAB, ["gender"], text_vectors=TEXT)
    model.item_embeddings()
    got = _item_weights(model)
    want = [w for w in BEFORE if w[0] != "dense_0/kernel:0"]
    extra = [("text_projection/kernel:0", (DT, D), True), ("text_projection/bias:0", (D,), True),
             ("item_field_embeddings/item_text_table:0", (V, DT), False), ("dense_0/kernel:0", (20, 8), True)]
    assert sorted(got) == sorted(want + extra)
    assert model.item_tower.num_fields == 5


@pytest.mark.parametrize("name", ["ican", "youtubednn", "fm", "deepfm", "autoint"])
def test_changing_one_items_text_vector_changes_only_its_item_vector(name):
    units = {"item_mlp_units": [8, D], "user_mlp_units": [8, D]}
    model = build_model(_cfg(item_text=True, name=name, **units), TABLE, VOCAB, ["gender"],
                        text_vectors=TEXT)
    before = model.item_embeddings().numpy()
    table = model.item_tower.field_embeddings.text_table
    new = table.numpy()
    new[5] = RS.normal(size=DT)
    table.assign(new)
    after = model.item_embeddings().numpy()
    assert np.max(np.abs(after[5] - before[5])) > 1e-4
    others = [i for i in range(V) if i != 5]
    np.testing.assert_array_equal(after[others], before[others])
    # An item without a text vector: its vector is the one of a zero text field.
    new[5] = 0.0
    table.assign(new)
    ids = model.item_tower.features_for(tf.constant([5]))
    fields = model.item_tower.field_embeddings(ids).numpy()
    np.testing.assert_array_equal(fields[0, -1], 0.0)


def test_user_history_sees_the_text_field():
    model = build_model(_cfg(item_text=True), TABLE, VOCAB, ["gender"], text_vectors=TEXT)
    feats = {"user_gender": tf.constant([1]), "hist_items": tf.constant([[5, 2, 0]], tf.int64),
             "hist_len": tf.constant([2], tf.int64)}
    before = model.user_embeddings(feats).numpy()
    table = model.item_tower.field_embeddings.text_table
    new = table.numpy()
    new[11] = RS.normal(size=DT)  # not in the history: no change
    table.assign(new)
    np.testing.assert_array_equal(model.user_embeddings(feats).numpy(), before)
    new[5] = RS.normal(size=DT)  # in the history: the user vector moves
    table.assign(new)
    assert np.max(np.abs(model.user_embeddings(feats).numpy() - before)) > 1e-6


def test_field_level_feature_dropout_treats_the_text_field_as_a_field():
    model = build_model(_cfg(item_text=True, cl=["feature"]), TABLE, VOCAB, ["gender"],
                        text_vectors=TEXT)
    tower = model.item_tower
    ids = np.tile(np.arange(1, V), 30)
    feats = _features(ids)
    raw = tower.raw_embedding(feats)
    task = FeatureCL(D, "field", 0.5, 0.2, seed=3)
    inputs = types.SimpleNamespace(raw=raw, features=feats)  # augment reads only these
    aug = task.augment(inputs, tower).numpy().reshape(len(ids), 5, D)
    raw = raw.numpy().reshape(len(ids), 5, D)
    kept = np.all(aug == raw, axis=-1)
    dropped = np.all(aug == 0, axis=-1)
    assert np.all(kept | dropped)
    text_dropped = dropped[:, 4] & np.any(raw[:, 4] != 0, axis=-1)
    assert 0.3 < text_dropped.mean() < 0.7  # the text field is dropped like the others


# ------------------------------------------------------------------- training and export
@pytest.mark.slow
def test_tiny_training_and_export_with_item_text(tiny_pipeline, tmp_path):
    """The tiny pipeline's artifacts, text vectors from a vectors file (source taxonomy writes
    none), one epoch of training with model.item_text and the export of every item."""
    from export import export_model, item_index
    from micrec_tf.data.artifacts import load_artifacts, read_items
    from micrec_tf.train import train
    from pipelines import title_neighbours
    from tests.conftest import tiny_config

    cfg0, tmp0 = tiny_pipeline
    tmp = str(tmp_path)
    shutil.copytree(cfg0.artifacts_dir, os.path.join(tmp, "artifacts", cfg0.name))
    rows = read_items(os.path.join(cfg0.artifacts_dir, "items", "items.jsonl"))
    rs = np.random.RandomState(5)
    have = [r for r in rows if r["item"] % 5]  # every fifth item has no vector
    vectors_path = os.path.join(tmp, "vectors.npz")
    np.savez(vectors_path, item_ids=np.array([r["item_id"] for r in have]),
             vectors=rs.normal(size=(len(have), 12)).astype(np.float32))
    cfg = tiny_config(tmp, semantic={"source": "vectors", "vectors_path": vectors_path,
                                     "top_k": 5},
                      model={"item_text": True}, train={"epochs": 1})
    cfg.data.data_dir = cfg0.data.data_dir
    title_neighbours.run(cfg, verbose=False)
    result = train(cfg, evaluate_test=False, log=lambda *a: None)
    model = result["model"]
    fields = model.item_tower.field_embeddings
    assert model.item_tower.num_fields == len(fields.field_names) + 1
    art = load_artifacts(cfg.artifacts_dir)
    table = model.item_tower.field_embeddings.text_table.numpy()
    assert table.shape == (len(rows) + 1, 12)
    for r in rows:  # the table row of item r is r's vector, or zeros
        assert np.any(table[r["item"]] != 0) == bool(r["item"] % 5)
    version_dir = export_model.export_run(cfg, log=lambda *a: None)
    ids, vectors = item_index.load_item_embeddings(os.path.join(version_dir, "item_embeddings"))
    assert ids == list(art.vocabs["item_id"]) and len(ids) == len(rows)
    want = np.asarray(model.item_embeddings(np.arange(1, len(ids) + 1)), np.float32)
    assert np.max(np.abs(vectors - want)) <= 1e-5

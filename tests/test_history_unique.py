"""``model.history_embeddings: unique`` (issue 31): the user towers embed only the distinct items
of the batch's history and gather the slots from them.

Checked against the per-slot path (``slots``: the path ``auto`` took above V >= B x H before
issue 31 made it take ``unique`` for training calls there; inference calls still take it) on the
same weights and inputs: user vectors, every loss term and every gradient (as dense
tensors) agree to 1e-5 for every user tower; the rows it embeds and the sparse gradient rows it
hands the item ID table are the batch's distinct history ids, counted in pure Python.
"""
import micrec_tf  # noqa: F401

import numpy as np
import pytest
import tensorflow as tf

from micrec_tf import towers as TW
from micrec_tf.config import ConfigError
from test_fast_paths import assert_same_function, embedded_ids
from test_model import H, V, _batches, _build, _cfg, _tensors

TOL = 1e-5


def _pair(name, cl):
    """A ``slots`` and a ``unique`` model of the same config, with the same weights and draws."""
    batch = _tensors(_batches(1, 32)[0])
    models = []
    for mode in ("slots", "unique"):
        model = _build(_cfg(name=name, cl=list(cl), history_embeddings=mode))
        model.compute_losses(batch, training=True)  # creates every variable
        models.append(model)
    old, new = models
    assert [v.name for v in old.weights] == [v.name for v in new.weights]
    new.set_weights(old.get_weights())
    for a, b in zip(old.samplers, new.samplers):
        a.reset_from_seed(0)
        b.reset_from_seed(0)
    return old, new, _tensors(_batches(1, 32, seed=5)[0])


@pytest.mark.parametrize("name,cl", [("ican", ()), ("ican", ("feature", "semantic", "session")),
                                     ("youtubednn", ()), ("fm", ()), ("deepfm", ()),
                                     ("autoint", ())])
def test_unique_history_matches_the_slots(name, cl):
    old, new, batch = _pair(name, cl)
    assert any("item_id_embedding" in v.name for v in old.trainable_variables)
    assert_same_function(old, new, batch, TOL)


def test_unique_embeds_each_distinct_history_item_once():
    model = _build(_cfg(name="ican", cl=[], history_embeddings="unique"))
    raw = _batches(1, 32, seed=3)[0]
    want = sorted({int(x) for x in np.asarray(raw["hist_items"]).reshape(-1)})  # incl. padding 0
    assert len(want) < raw["hist_items"].size  # the batch repeats items: fewer rows than slots
    seen = embedded_ids(model.user_tower,
                         lambda: model.user_tower(_tensors(raw), training=True))
    assert len(seen) == 1
    assert sorted(seen[0].numpy().tolist()) == want


def test_unique_hands_the_id_table_one_gradient_row_per_distinct_item():
    """The history's sparse gradient rows of the item ID table: the distinct history ids (pure
    Python count), not the B x H slots; their sums equal the slots' per-row sums."""
    old, new, _ = _pair("youtubednn", ())
    raw = _batches(1, 32, seed=7)[0]
    batch = _tensors(raw)
    hist = np.asarray(raw["hist_items"])
    grads = []
    for model in (old, new):
        table = model.user_tower.item_field_embeddings.item_embedding.embeddings
        with tf.GradientTape() as tape:
            total = tf.reduce_sum(model.user_tower(batch, training=True))
        grads.append(tape.gradient(total, table))
    g_old, g_new = grads
    assert isinstance(g_new, tf.IndexedSlices)
    assert int(g_old.indices.shape[0]) == hist.size
    assert sorted(g_new.indices.numpy().tolist()) == sorted({int(x) for x in hist.reshape(-1)})
    np.testing.assert_allclose(tf.convert_to_tensor(g_new).numpy(),
                               tf.convert_to_tensor(g_old).numpy(), atol=TOL, rtol=0)


def test_unique_with_an_unknown_batch_size_keeps_the_history_length_static():
    """The serving signature's unknown batch: ICAN needs a static H and gets it."""
    model = _build(_cfg(name="ican", cl=[], history_embeddings="unique"))
    batch = _tensors(_batches(1, 8)[0])
    spec = {k: tf.TensorSpec([None, *v.shape[1:]], v.dtype) for k, v in batch.items()}
    fn = tf.function(lambda b: model.user_tower(b, training=False), input_signature=[spec])
    np.testing.assert_allclose(fn(batch).numpy(), model.user_tower(batch).numpy(), atol=TOL)


def test_unique_round_trips():
    assert TW.use_history_table("unique", V, 10**6, H) is False
    assert TW.use_history_table("auto", V, V, H) is True
    assert TW.use_history_table("auto", V, 1, H) is False
    assert _cfg().model.history_embeddings == "auto"
    model = _build(_cfg(name="fm", cl=[], history_embeddings="unique"))
    config = model.user_tower.get_config()
    assert config["history_embeddings"] == "unique"
    assert TW.FMUserTower.from_config(config).history_embeddings == "unique"
    with pytest.raises(ConfigError, match="model.history_embeddings.*'uniq'"):
        _cfg(history_embeddings="uniq")
    with pytest.raises(ValueError, match="Received: 'uniq'"):
        TW.use_history_table("uniq", V, 1, H)


def test_the_training_log_names_the_distinct_items_path():
    from micrec_tf.config import Config
    from micrec_tf.train import describe_code_paths

    cfg = Config().replace({"model.history_embeddings": "unique"})
    line = describe_code_paths(cfg, 1_000_001, {"history_length": 20})
    assert line.startswith("history embeddings: distinct items (model.history_embeddings=unique")
    # auto above batch x history (4096 x 20 = 81,920 <= 1,000,001): the distinct items since
    # issue 31's default change; below it the catalogue table; slots when asked for
    line = describe_code_paths(Config(), 1_000_001, {"history_length": 20})
    assert line.startswith("history embeddings: distinct items (model.history_embeddings=auto: "
                           "1,000,000 items >= batch 4096 x 20 history slots; inference per slot)")
    line = describe_code_paths(Config(), 3_884, {"history_length": 20})
    assert line.startswith("history embeddings: catalogue table (model.history_embeddings=auto: "
                           "3,883 items < batch 4096 x 20")
    cfg = Config().replace({"model.history_embeddings": "slots"})
    line = describe_code_paths(cfg, 1_000_001, {"history_length": 20})
    assert line.startswith("history embeddings: per slot (model.history_embeddings=slots: forced")


# --- auto takes unique for training calls at V >= B x H (issue 31 default change) -------------
# (mode, V items incl. padding, batch size (None: unknown), H, training call) -> path, each
# derived by hand from the rule: table iff V < B x H; else unique iff training with a known B.
RESOLUTION = [
    ("auto", 1_000_001, 4096, 20, True, "unique"),   # 81,920 slots <= 1 M items
    ("auto", 1_000_001, 4096, 20, False, "slots"),   # inference: the exported forward pass
    ("auto", 1_000_001, None, 20, True, "slots"),    # unknown batch (no hint): as before
    ("auto", 1_000_001, None, 20, False, "slots"),
    ("auto", 100_001, 4096, 20, True, "unique"),     # 81,920 <= 100,001
    ("auto", 81_920, 4096, 20, True, "unique"),      # V == B x H: not below the threshold
    ("auto", 81_919, 4096, 20, True, "table"),       # V == B x H - 1
    ("auto", 81_919, 4096, 20, False, "table"),      # the table does not depend on training
    ("auto", 3_884, 4096, 20, True, "table"),        # ml-1m's 3,883 movies + padding
    ("auto", 1_683, 1024, 20, True, "table"),        # ml-100k's 1,682 movies + padding
    ("auto", 41, 8, 5, True, "unique"),              # the test model: 40 <= 41
    ("auto", 41, 9, 5, True, "table"),               # 45 > 41
    ("auto", 41, 8, 5, False, "slots"),
    ("slots", 1_000_001, 4096, 20, True, "slots"),   # the old auto above the threshold
    ("slots", 41, 100, 5, True, "slots"),
    ("unique", 41, 100, 5, False, "unique"),
    ("table", 10**6, 1, 5, False, "table"),
]


@pytest.mark.parametrize("mode,num_items,batch,length,training,want", RESOLUTION)
def test_auto_resolution_table(mode, num_items, batch, length, training, want):
    assert TW.history_path(mode, num_items, batch, length, training) == want
    assert TW.use_history_table(mode, num_items, batch, length) == (want == "table")


@pytest.mark.parametrize("name,catalogue", [("ml-100k", 1682), ("ml-100k-cold", 1682),
                                            ("ml-1m", 3883), ("ml-1m-cold", 3883),
                                            ("ml-1m-llo", 3883)])
def test_committed_movielens_configs_keep_the_catalogue_table(name, catalogue):
    """The committed ml-100k / ml-1m / cold-start results: the whole MovieLens catalogue (1,682
    / 3,883 movies, the datasets' published sizes; the clicked vocabulary is smaller) plus a few
    special rows stays below batch x history, so ``auto`` trains them as before (the table)."""
    from pathlib import Path

    from micrec_tf.config import load_config

    cfg = load_config(str(Path(__file__).resolve().parents[1] / "configs" / f"{name}.yaml"))
    b, h = cfg.train.batch_size, cfg.preprocess.history_length
    assert cfg.model.history_embeddings == "auto"
    assert TW.history_path("auto", catalogue + 4, b, h, training=True) == "table"


def _auto_pair(name, cl, hint=8):
    """A ``slots`` and an ``auto`` model with the same weights and draws; the training batch
    size (``history_batch_hint``) ``hint`` x H = 40 <= V = 41 items: auto's training calls take
    ``unique``."""
    models = []
    for mode in ("slots", "auto"):
        cfg = _cfg(name=name, cl=list(cl), history_embeddings=mode).replace(
            {"train.batch_size": hint})
        model = _build(cfg)
        model.compute_losses(_tensors(_batches(1, hint)[0]), training=True)
        models.append(model)
    old, new = models
    assert new.user_tower.history_batch_hint == hint and V >= hint * H
    new.set_weights(old.get_weights())
    for a, b in zip(old.samplers, new.samplers):
        a.reset_from_seed(0)
        b.reset_from_seed(0)
    return old, new


@pytest.mark.parametrize("name,cl", [("ican", ("feature", "semantic", "session")),
                                     ("youtubednn", ()), ("deepfm", ())])
def test_auto_training_step_above_the_threshold_matches_the_slots(name, cl):
    """``auto`` at V >= B x H: a training call embeds the batch's distinct history ids (pure
    Python set) and its losses and gradients equal the per-slot path's (float32 tolerance)."""
    old, new = _auto_pair(name, cl)
    raw = _batches(1, 8, seed=5)[0]
    batch = _tensors(raw)
    want = sorted({int(x) for x in np.asarray(raw["hist_items"]).reshape(-1)})
    seen = embedded_ids(new.user_tower, lambda: new.compute_losses(batch, training=True))
    # (the item tower shares the field embeddings: its positives / negatives are looked up too)
    assert want in [sorted(ids.numpy().tolist()) for ids in seen if ids.shape.rank == 1]
    assert (8, H) not in [tuple(ids.shape) for ids in seen]  # no per-slot lookup in training
    seen = embedded_ids(old.user_tower, lambda: old.compute_losses(batch, training=True))
    assert (8, H) in [tuple(ids.shape) for ids in seen]
    assert_same_function(old, new, batch, TOL)


def test_auto_training_with_an_unknown_batch_uses_the_hint():
    """Keras's ``train_step`` (batch dimension None): the hint 8 puts ``auto`` on ``unique``; the
    gradient of the user vectors equals the slots' within float32 tolerance."""
    old, new = _auto_pair("ican", ())
    batch = _tensors(_batches(1, 8, seed=9)[0])
    spec = {k: tf.TensorSpec([None, *v.shape[1:]], v.dtype) for k, v in batch.items()}
    out = []
    for model in (old, new):
        def step(b, model=model):
            with tf.GradientTape() as tape:
                total = tf.reduce_sum(tf.square(model.user_tower(b, training=True)))
            return total, tape.gradient(total, model.user_tower.trainable_variables)
        fn = tf.function(step, input_signature=[spec])
        shapes = {tuple(ids.shape) for ids in embedded_ids(model.user_tower, lambda: fn(batch))}
        out.append((shapes, fn(batch)))
    (old_shapes, (old_total, old_grads)), (new_shapes, (new_total, new_grads)) = out
    assert old_shapes == {(None, H)} and new_shapes == {(None,)}
    assert float(new_total) == pytest.approx(float(old_total), rel=1e-6)
    for a, b in zip(old_grads, new_grads):
        np.testing.assert_allclose(tf.convert_to_tensor(b).numpy(),
                                   tf.convert_to_tensor(a).numpy(), atol=TOL, rtol=1e-5)


@pytest.mark.parametrize("name", ["ican", "youtubednn", "fm"])
def test_auto_inference_is_the_slots_bit_for_bit(name):
    """Inference under ``auto`` (static batch, and the serving signature's unknown batch) runs
    the per-slot path: user vectors exactly equal to ``slots``'."""
    old, new = _auto_pair(name, ())
    batch = _tensors(_batches(1, 8, seed=4)[0])
    spec = {k: tf.TensorSpec([None, *v.shape[1:]], v.dtype) for k, v in batch.items()}
    for model in (old, new):
        shapes = {tuple(ids.shape) for ids in embedded_ids(
            model.user_tower, lambda m=model: m.user_tower(batch, training=False))}
        assert shapes == {(8, H)}
    np.testing.assert_array_equal(new.user_tower(batch, training=False).numpy(),
                                  old.user_tower(batch, training=False).numpy())
    np.testing.assert_array_equal(new.user_embeddings(batch).numpy(),
                                  old.user_embeddings(batch).numpy())
    served = [tf.function(lambda b, m=m: m.user_tower(b, training=False),
                          input_signature=[spec])(batch).numpy() for m in (old, new)]
    np.testing.assert_array_equal(served[1], served[0])

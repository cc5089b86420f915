"""``model.history_embeddings: unique`` (issue 31): the user towers embed only the distinct items
of the batch's history and gather the slots from them.

Checked against the per-slot path (``slots``, the path ``auto`` takes when the catalogue exceeds
B x H) on the same weights and inputs: user vectors, every loss term and every gradient (as dense
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


def test_unique_is_opt_in_and_round_trips():
    # auto never takes it: the catalogue table below B x H, the slots above (the old paths).
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
    # auto above batch x history keeps reporting the slots, as before
    line = describe_code_paths(Config(), 1_000_001, {"history_length": 20})
    assert line.startswith("history embeddings: per slot (model.history_embeddings=auto: 1,000,000")

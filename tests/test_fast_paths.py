"""The fast code paths of the user towers compute what the pre-0.2 paths compute.

``model.history_embeddings: table`` (history rows gathered from a per-call catalogue table) and
``model.attention: matmul`` (attention as batched matmuls) against the old paths, ``slots`` and
``einsum`` (tf_keras's MultiHeadAttention), which stay selectable: on the same weights and
inputs, the user vectors, every loss term and every gradient agree to 1e-5, for every user
tower (all read the history) with and without the CL terms.
"""
import micrec_tf  # noqa: F401

import numpy as np
import pytest
import tensorflow as tf

from micrec_tf import towers as TW
from test_model import H, V, _batches, _build, _cfg, _tensors

OLD = {"history_embeddings": "slots", "attention": "einsum"}
NEW = {"history_embeddings": "table", "attention": "matmul"}
TOL = 1e-5


def _pair(name, cl):
    """Two models of the same config but for the code paths, with the same weights."""
    batch = _tensors(_batches(1, 32)[0])
    models = []
    for paths in (OLD, NEW):
        model = _build(_cfg(name=name, cl=list(cl), **paths))
        model.compute_losses(batch, training=True)  # creates every variable
        models.append(model)
    old, new = models
    assert [v.name for v in old.weights] == [v.name for v in new.weights]
    new.set_weights(old.get_weights())
    for a, b in zip(old.samplers, new.samplers):  # the same negatives and CL draws
        b.reset_from_seed(0)
        a.reset_from_seed(0)
    return old, new, _tensors(_batches(1, 32, seed=5)[0])


def _dense(grad):
    return tf.convert_to_tensor(grad).numpy() if grad is not None else None


@pytest.mark.parametrize("cl", [(), ("feature", "semantic", "session")], ids=["base", "micrec"])
@pytest.mark.parametrize("name", ["ican", "youtubednn", "fm", "deepfm", "autoint"])
def test_fast_paths_match_the_old_ones(name, cl):
    old, new, batch = _pair(name, cl)
    old_losses = assert_same_function(old, new, batch)
    if cl:
        assert {"feature_cl_loss", "semantic_cl_loss", "session_cl_loss"} <= set(old_losses)


def assert_same_function(old, new, batch, tol=TOL) -> dict:
    """``new`` computes ``old``'s user vectors, losses and gradients (within ``tol``) on
    ``batch``; at least one gradient is checked. Returns ``old``'s losses."""
    np.testing.assert_allclose(new.user_embeddings(batch).numpy(),
                               old.user_embeddings(batch).numpy(), atol=tol, rtol=0)
    results = []
    for model in (old, new):
        with tf.GradientTape() as tape:
            losses = model.compute_losses(batch, training=True)
        grads = tape.gradient(losses["loss"], model.trainable_variables)
        results.append(({k: float(v) for k, v in losses.items()}, [_dense(g) for g in grads]))
    (old_losses, old_grads), (new_losses, new_grads) = results
    assert old_losses.keys() == new_losses.keys()
    for key, value in old_losses.items():
        assert new_losses[key] == pytest.approx(value, abs=tol), key
    names = [v.name for v in old.trainable_variables]
    assert sum(g is not None for g in old_grads) > 0
    for var, a, b in zip(names, old_grads, new_grads):
        assert (a is None) == (b is None), var
        if a is not None:
            np.testing.assert_allclose(b, a, atol=tol, rtol=0, err_msg=var)
    return old_losses


def test_history_gradient_rows_shrink_with_the_table():
    """What the table path is for: sparse gradient rows of the embedding tables scale with the
    catalogue (V), not with the batch's history slots (B x H x tags)."""
    old, new, batch = _pair("ican", ())
    rows = []
    for model in (old, new):
        with tf.GradientTape() as tape:
            loss = model.compute_losses(batch, training=True)["loss"]
        table = model.user_tower.item_field_embeddings.tag_embedding.embeddings
        grad = tape.gradient(loss, table)
        rows.append(int(grad.indices.shape[0]))
    assert rows[1] < rows[0]


def embedded_ids(tower, run):
    """The item index tensors ``tower``'s item field embeddings are called on in ``run()``."""
    seen = []
    layer = tower.item_field_embeddings
    original = layer.call

    def spy(features, *args, **kwargs):
        seen.append(features["item"])
        return original(features, *args, **kwargs)

    layer.call = spy
    try:
        run()
    finally:
        layer.call = original
    return seen


def _embedded_shapes(tower, run):
    """The index shapes ``tower``'s item field embeddings are called on while ``run()`` runs."""
    return [tuple(ids.shape) for ids in embedded_ids(tower, run)]


@pytest.mark.parametrize("batch_size,path", [(V // H + 1, "table"), (V // H, "slots")])
def test_auto_switch_on_both_sides_of_its_threshold(batch_size, path):
    """``auto`` embeds the catalogue once when V < B x H, the B x H slots otherwise."""
    assert TW.use_history_table("auto", V, batch_size, H) == (path == "table")
    model = _build(_cfg(name="ican", cl=[], history_embeddings="auto"))
    batch = _tensors(_batches(1, batch_size)[0])
    shapes = _embedded_shapes(model.user_tower, lambda: model.user_tower(batch, training=False))
    assert shapes == ([(V,)] if path == "table" else [(batch_size, H)])


def test_auto_switch_with_an_unknown_batch_size():
    """In ``train_step`` the batch dimension is unknown: training calls take the configured
    batch size (``history_batch_hint``), inference calls (the serving signature) the slots."""
    assert TW.use_history_table("auto", V, None, H) is False
    assert TW.use_history_table("table", 10**6, 1, H) and not TW.use_history_table(
        "slots", 1, 10**6, H)
    with pytest.raises(ValueError, match="Received: 'fast'"):
        TW.use_history_table("fast", V, 1, H)
    model = _build(_cfg(name="ican", cl=[], history_embeddings="auto"))  # batch hint 32
    assert model.user_tower.history_batch_hint == 32 and V < 32 * H
    batch = _tensors(_batches(1, 8)[0])
    spec = {k: tf.TensorSpec([None, *v.shape[1:]], v.dtype) for k, v in batch.items()}
    for training, want in ((True, (V,)), (False, (None, H))):
        fn = tf.function(lambda b, t=training: model.user_tower(b, training=t),
                         input_signature=[spec])
        assert set(_embedded_shapes(model.user_tower, lambda: fn(batch))) == {want}



def test_evaluation_user_vectors_match_eager_calls():
    """The evaluation loop's graph function with a padded last batch gives each example's own
    vector (reference: one eager ``user_embeddings`` call per example)."""
    from micrec_tf.evaluation.evaluate import user_vectors

    model = _build(_cfg(name="ican", cl=[]))
    parts = _batches(2, 23, seed=9)
    arrays = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    got = user_vectors(model, arrays, batch_size=10)  # 46 examples: 4 full batches + 6
    want = np.concatenate([model.user_embeddings(
        {k: tf.constant(v[i:i + 1]) for k, v in arrays.items()}).numpy() for i in range(46)])
    assert got.shape == want.shape == (46, model.user_tower.output_dim)
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)

"""The TFRS two-tower peer (micrec_tf/tfrs_peer.py).

* its loss on a hand-made batch equals a numpy in-batch softmax with logQ correction and
  accidental-hit removal, written here from the formula;
* the user tower's history mean leaves padding out (numpy reference);
* the layers round-trip through get_config / from_config (same config, same outputs);
* a training step under mixed_float16 keeps the loss float32 and finite;
* ``train()`` trains it end to end on the tiny synthetic pipeline, the checkpoint restores, and
  a run killed mid-epoch resumes to the uninterrupted run's weights.
"""
import os

import micrec_tf  # noqa: F401  (before tensorflow)
import numpy as np
import pytest
import tensorflow as tf
import tf_keras

from micrec_tf.config import Config
from micrec_tf.data.artifacts import ItemTable
from micrec_tf.tfrs_peer import (InBatchSoftmax, MaskedMeanPooling, TFRSItemModel,
                                 TFRSTwoTowerModel, TFRSUserModel, build_tfrs_two_tower)

TAGS = np.array([[0, 0], [1, 2], [2, 0], [0, 0], [3, 1], [1, 0]], np.int64)  # V = 6
COUNTS = np.array([0, 5, 3, 1, 2, 9])  # training clicks per item (row 0: padding)
VOCAB = {"item_id": 6, "tag": 4, "provider": 1, "user_gender": 3, "user_age": 4}
# Items 1 and 2 appear twice: rows 0/2 and 1/4 are accidental hits of each other.
BATCH = {
    "user_gender": np.array([1, 2, 0, 1, 2]),
    "user_age": np.array([3, 1, 2, 0, 1]),
    "hist_items": np.array([[1, 2, 0], [3, 0, 0], [0, 0, 0], [5, 4, 1], [0, 2, 2]]),
    "hist_len": np.array([2, 1, 0, 3, 3]),
    "item": np.array([1, 2, 1, 3, 2]),
}


def _cfg(**overrides):
    return Config().replace({"model.name": "tfrs_two_tower", "model.cl": [],
                             "model.embedding_dim": 4, "model.output_dim": 3,
                             "model.item_mlp_units": [5, 3], "model.user_mlp_units": [5, 3],
                             **overrides})


def _model(**overrides):
    item_table = ItemTable(tags=TAGS, provider=np.zeros(6, np.int64), extra={},
                           category=TAGS[:, 0])
    tf_keras.utils.set_random_seed(0)
    return build_tfrs_two_tower(_cfg(**overrides), item_table, VOCAB, ["gender", "age"],
                                item_counts=COUNTS)


def _reference_loss(u, v, ids, q, remove_hits=True, log_q=True):
    """Mean over rows i of -log softmax_j(u_i . v_j - log q[ids_j]) at j = i, where the columns
    j != i with ids_j == ids_i leave row i's softmax."""
    logits = u.astype(np.float64) @ v.astype(np.float64).T
    if log_q:
        logits = logits - np.log(q[ids])[None, :]
    losses = []
    for i in range(len(ids)):
        keep = np.ones(len(ids), bool)
        if remove_hits:
            keep = (ids != ids[i]) | (np.arange(len(ids)) == i)
        row = logits[i, keep]
        losses.append(np.log(np.exp(row - row.max()).sum()) + row.max() - logits[i, i])
    return float(np.mean(losses))


def test_loss_is_in_batch_softmax_with_logq_and_accidental_hit_removal():
    model = _model()
    got = model.compute_losses(BATCH)
    u = model.user_embeddings(BATCH).numpy()
    v = model.item_embeddings(BATCH["item"]).numpy()
    q = COUNTS / COUNTS.sum()  # each item's share of the training clicks
    want = _reference_loss(u, v, BATCH["item"], q)
    assert float(got["sampled_softmax_loss"]) == pytest.approx(want, abs=1e-5)
    assert float(got["loss"]) == pytest.approx(want, abs=1e-5)
    # The batch tells the three variants apart, so the match above is not a coincidence.
    for other in (_reference_loss(u, v, BATCH["item"], q, remove_hits=False),
                  _reference_loss(u, v, BATCH["item"], q, log_q=False)):
        assert abs(other - want) > 1e-3


def test_loss_without_accidental_hit_removal():
    model = _model(**{"loss.remove_accidental_hits": False})
    u = model.user_embeddings(BATCH).numpy()
    v = model.item_embeddings(BATCH["item"]).numpy()
    want = _reference_loss(u, v, BATCH["item"], COUNTS / COUNTS.sum(), remove_hits=False)
    assert float(model.compute_losses(BATCH)["loss"]) == pytest.approx(want, abs=1e-5)


def test_history_mean_ignores_padding():
    model = _model()
    got = model.user_model.history_embedding(BATCH).numpy()
    table = model.item_model.id_embedding.embeddings.numpy()  # [V, E], shared by both towers
    assert model.user_model.item_id_embedding is model.item_model.id_embedding
    for row, hist in zip(got, BATCH["hist_items"]):
        clicks = hist[hist > 0]
        want = table[clicks].mean(axis=0) if clicks.size else np.zeros(table.shape[1])
        np.testing.assert_allclose(row, want, atol=1e-6)
    # Where the padding sits does not matter; the user vector follows the history mean.
    moved = dict(BATCH, hist_items=np.array([[0, 1, 2], [0, 0, 3], [0, 0, 0], [1, 5, 4],
                                             [2, 0, 2]]))
    np.testing.assert_allclose(model.user_embeddings(moved).numpy(),
                               model.user_embeddings(BATCH).numpy(), atol=1e-6)


def test_masked_mean_pooling_reference():
    x = np.random.default_rng(0).normal(size=(3, 4, 2)).astype(np.float32)
    mask = np.array([[1, 0, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]], bool)
    got = MaskedMeanPooling()(x, mask).numpy()
    for i in range(3):
        want = x[i][mask[i]].mean(axis=0) if mask[i].any() else np.zeros(2)
        np.testing.assert_allclose(got[i], want, atol=1e-6)


def _round_trip(layer, *inputs):
    """from_config(get_config()) of a built layer, built on ``inputs``: the same config."""
    config = layer.get_config()
    clone = type(layer).from_config(config)
    clone(*inputs)
    assert clone.get_config() == config
    return clone


def test_layers_round_trip_through_get_config():
    model = _model()
    items = np.arange(6)
    model.compute_losses(BATCH)  # builds every layer

    item_clone = _round_trip(model.item_model, items)
    item_clone.set_weights(model.item_model.get_weights())
    np.testing.assert_allclose(item_clone(items).numpy(), model.item_model(items).numpy(),
                               atol=1e-6)

    user_clone = _round_trip(model.user_model, BATCH)
    user_clone.set_weights(model.user_model.get_weights())
    np.testing.assert_allclose(user_clone(BATCH).numpy(), model.user_model(BATCH).numpy(),
                               atol=1e-6)

    u, v = model.user_embeddings(BATCH), model.item_embeddings(BATCH["item"])
    task_clone = _round_trip(model.task, (u, v, BATCH["item"]))
    assert float(task_clone((u, v, BATCH["item"]))) == pytest.approx(
        float(model.task((u, v, BATCH["item"]))), abs=1e-6)
    pool = MaskedMeanPooling(name="pool")
    _round_trip(pool, np.ones((2, 3, 4), np.float32), np.ones((2, 3), bool))


def test_user_id_embedding_when_a_vocabulary_is_given():
    emb = tf_keras.layers.Embedding(6, 4)
    tower = TFRSUserModel({"user_gender": 3}, emb, units=[3], user_id_vocabulary=["u1", "u2"])
    feats = {"user_gender": np.array([1, 1, 1]), "hist_items": np.array([[1], [1], [1]]),
             "user_id": np.array([b"u1", b"u2", b"nobody"])}
    out = tower(feats).numpy()
    assert not np.allclose(out[0], out[1]) and not np.allclose(out[1], out[2])
    with pytest.raises(KeyError, match="user_id"):
        tower({k: v for k, v in feats.items() if k != "user_id"})
    clone = _round_trip(tower, feats)
    clone.set_weights(tower.get_weights())
    np.testing.assert_allclose(clone(feats).numpy(), out, atol=1e-6)


def test_probability_scale_does_not_change_the_loss():
    """TFRS clips sampling probabilities to [1e-6, 1]; the task hands it share / max share,
    which shifts every logit of a row by one constant, so rare items keep their correction."""
    counts = np.array([0, 1, 400_000, 800_000])  # item 1's share 8.3e-7 is under TFRS's clip
    q = counts / counts.sum()
    task = InBatchSoftmax(q)
    rng = np.random.default_rng(1)
    u, v = rng.normal(size=(3, 2)).astype(np.float32), rng.normal(size=(3, 2)).astype(np.float32)
    ids = np.array([1, 2, 3])
    want = _reference_loss(u, v, ids, q)
    assert float(task((u, v, ids))) == pytest.approx(want, abs=1e-5)
    # Handing TFRS the shares themselves would clip item 1 to 1e-6: another loss.
    assert abs(_reference_loss(u, v, ids, np.maximum(q, 1e-6)) - want) > 1e-3


def test_bad_settings_are_one_line_errors():
    with pytest.raises(ValueError, match=r"model.user_mlp_units\[-1\] must equal "
                                         r"model.output_dim=3.*Received: \[5, 4\]"):
        _model(**{"model.user_mlp_units": [5, 4]})
    item_table = ItemTable(tags=TAGS, provider=np.zeros(6, np.int64), extra={},
                           category=TAGS[:, 0])
    with pytest.raises(ValueError, match="one entry per item \\(6\\). Received: 3 entries"):
        build_tfrs_two_tower(_cfg(), item_table, VOCAB, ["gender"], item_counts=[1, 2, 3])


def test_layer_constructors_check_their_arguments():
    emb = tf_keras.layers.Embedding(6, 4)
    cases = [
        (lambda: TFRSItemModel(TAGS, 0), "num_tags must be an int >= 1. Received: num_tags=0"),
        (lambda: TFRSItemModel(TAGS, 4, embedding_dim=0), "Received: embedding_dim=0"),
        (lambda: TFRSItemModel(TAGS, 4, units=[3, 0]),
         r"TFRSItemModel units must be .* Received: units=\[3, 0\]"),
        (lambda: TFRSItemModel(TAGS, 4, dropout=1.0), r"dropout must be in \[0, 1\)"),
        (lambda: TFRSItemModel(TAGS, 2), r"tag indices must lie in \[0, num_tags=2\)"),
        (lambda: TFRSUserModel({"user_gender": 0}, emb),
         r"profile_vocab_sizes\['user_gender'\] must be an int >= 1. Received: "),
        (lambda: TFRSUserModel({}, emb, units=[]), "TFRSUserModel units must be"),
        (lambda: TFRSUserModel({}, emb, dropout=-0.5), "Received: dropout=-0.5"),
        (lambda: InBatchSoftmax(COUNTS / COUNTS.sum(), temperature=0.0),
         "temperature must be > 0 or None. Received: 0.0"),
    ]
    for make, message in cases:
        with pytest.raises(ValueError, match=message):
            make()
    with pytest.raises(TypeError, match="item_id_embedding must be a tf_keras Embedding"):
        TFRSUserModel({}, tf_keras.layers.Dense(3))
    task = InBatchSoftmax(COUNTS / COUNTS.sum(), remove_accidental_hits=False, temperature=0.5)
    clone = InBatchSoftmax.from_config(task.get_config())
    assert clone.get_config() == task.get_config() and clone.temperature == 0.5


def test_mixed_precision_step_keeps_the_loss_float32():
    tf_keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = _model()
        model.compile(optimizer=tf_keras.optimizers.Adam(0.01))
        logs = model.fit(tf.data.Dataset.from_tensors(BATCH).repeat(2), epochs=1,
                         verbose=0).history
        assert model.compute_losses(BATCH)["loss"].dtype == tf.float32
        assert np.isfinite(logs["loss"][0])
        assert model.item_embeddings().dtype == tf.float32
    finally:
        tf_keras.mixed_precision.set_global_policy("float32")


def test_train_end_to_end_and_restore(tiny_pipeline):
    from micrec_tf.train import restore_model, train

    cfg, tmp = tiny_pipeline
    cfg = cfg.replace({"model.name": "tfrs_two_tower", "model.cl": [], "train.epochs": 2})
    run_dir = os.path.join(tmp, "runs", "tfrs")
    res = train(cfg, run_dir=run_dir, log=lambda *a: None)
    assert isinstance(res["model"], TFRSTwoTowerModel)
    hist = res["history"]
    for key in ("loss", "sampled_softmax_loss", "val_hit_at_10", "val_hit_at_50"):
        assert len(hist[key]) == 2, key
    assert np.all(np.isfinite(hist["loss"]))
    for split in ("valid", "test"):
        for n in cfg.eval.hit_n:
            assert 0.0 <= res[split][f"hit@{n}"] <= 1.0
    assert "long_tail/hit@50" in res["test"]
    num_items = res["model"].item_embeddings().shape[0] - 1
    assert res["test"]["hit@50"] > 1.5 * 50 / num_items  # better than retrieving at random
    model, _, _ = restore_model(run_dir)
    np.testing.assert_allclose(model.item_embeddings().numpy(),
                               res["model"].item_embeddings().numpy(), atol=1e-6)


class _Kill(RuntimeError):
    pass


def test_killed_run_resumes_to_the_same_weights(tiny_pipeline):
    from micrec_tf.data.artifacts import load_artifacts
    from micrec_tf.train import consumed_batches, train

    class KillAt(tf_keras.callbacks.Callback):
        seen = 0

        def on_train_batch_end(self, batch, logs=None):
            KillAt.seen += 1
            if KillAt.seen == 17:  # in epoch 2 (13 batches an epoch)
                raise _Kill("killed")

    cfg, tmp = tiny_pipeline
    cfg = cfg.replace({"model.name": "tfrs_two_tower", "model.cl": []})
    n_train = load_artifacts(cfg.artifacts_dir).feature_spec["num_examples"]["train"]
    assert int(np.ceil(n_train / cfg.train.batch_size)) == 13  # the kill lands in epoch 2
    quiet = lambda *a: None  # noqa: E731
    full = train(cfg, run_dir=os.path.join(tmp, "runs", "tfrs_full"), evaluate_test=False,
                 log=quiet)
    run_dir = os.path.join(tmp, "runs", "tfrs_killed")
    with pytest.raises(_Kill):
        train(cfg, run_dir=run_dir, evaluate_test=False, log=quiet, extra_callbacks=[KillAt()])
    # The resumed run starts from the backup inside epoch 2, not from scratch.
    assert 13 < consumed_batches(os.path.join(run_dir, "backup"), 13) < 17
    resumed = train(cfg, run_dir=run_dir, evaluate_test=False, log=quiet)
    for a, b in zip(full["model"].trainable_variables, resumed["model"].trainable_variables):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-4)
    assert resumed["valid"]["hit@50"] == pytest.approx(full["valid"]["hit@50"], abs=1e-3)

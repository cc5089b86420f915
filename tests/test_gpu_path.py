"""The GPU path of the trainer, checked without a GPU.

* ``choose_mixed_precision``: ``auto`` turns float16 on only when every visible GPU has compute
  capability >= 7.0 (Pascal P40 = 6.1 stays float32), ``on``/``off`` force it, and the decision is
  logged with its reason. Device details are faked.
* ``select_strategy``: one-device strategy for one GPU, mirrored for several, the default strategy
  on CPU, and a clear :class:`GPURequestedError` when ``train.require_gpu`` is set and no GPU is
  visible (also from ``train()`` itself, before any work).
* A MicRec training step under the ``mixed_float16`` policy, compiled as the trainer compiles it
  (plain Adam, wrapped in a loss-scale optimizer by Keras), keeps logits and losses float32; and the
  real ``train()`` with ``train.mixed_precision: on`` trains the tiny pipeline to finite losses.
"""
import math
import os
import types

import micrec_tf  # noqa: F401  (before tensorflow)
import numpy as np
import pytest
import tensorflow as tf
import tf_keras

from micrec_tf import train as train_mod
from micrec_tf.config import from_dict
from micrec_tf.data.artifacts import CooccurrenceTable, ItemTable, NeighbourTable
from micrec_tf.model import build_model
from micrec_tf.train import GPURequestedError, choose_mixed_precision, select_strategy


def _gpu(i):
    return types.SimpleNamespace(name=f"/physical_device:GPU:{i}", device_type="GPU")


@pytest.fixture
def fake_caps(monkeypatch):
    """``fake_caps({0: (6, 1)})``: the compute capability each fake GPU reports."""
    def install(caps):
        def details(device):
            index = int(device.name.rsplit(":", 1)[1])
            return {"device_name": "fake", "compute_capability": caps[index]}
        monkeypatch.setattr(tf.config.experimental, "get_device_details", details)
        return [_gpu(i) for i in sorted(caps)]
    return install


@pytest.fixture(autouse=True)
def _float32_policy_after():
    yield
    tf_keras.mixed_precision.set_global_policy("float32")


# ----------------------------------------------------------------------------- mixed precision
@pytest.mark.parametrize("caps, expected", [
    ({0: (6, 1)}, False),                  # Tesla P40 (Pascal): slow float16
    ({0: (6, 0)}, False),                  # P100
    ({0: (7, 0)}, True),                   # V100
    ({0: (7, 5)}, True),                   # T4 (Colab)
    ({0: (8, 0)}, True),                   # A100
    ({0: (9, 0), 1: (9, 0)}, True),        # 2x H100
    ({0: (8, 6), 1: (6, 1)}, False),       # mixed cards: every GPU must qualify
])
def test_auto_mixed_precision_follows_compute_capability(fake_caps, caps, expected):
    logs = []
    assert choose_mixed_precision("auto", fake_caps(caps), log=logs.append) is expected
    assert len(logs) == 1 and "mixed precision" in logs[0]
    assert ("ON (mixed_float16)" in logs[0]) is expected
    assert ("OFF (float32)" in logs[0]) is not expected
    assert "compute capability" in logs[0]
    if not expected:
        assert "< 7.0" in logs[0]


def test_auto_without_gpu_is_float32():
    logs = []
    assert choose_mixed_precision("auto", [], log=logs.append) is False
    assert "no GPU visible" in logs[0]


@pytest.mark.parametrize("setting, caps, expected", [
    ("on", {0: (6, 1)}, True),    # a P40 forced into float16 by train.mixed_precision: on
    ("on", {}, True),
    ("off", {0: (7, 5)}, False),  # a T4 forced into float32
    ("off", {}, False),
])
def test_forced_settings_override_the_device(fake_caps, setting, caps, expected):
    logs = []
    got = choose_mixed_precision(setting, fake_caps(caps) if caps else [], log=logs.append)
    assert got is expected
    assert f"forced {setting} by train.mixed_precision" in logs[0]


def test_missing_compute_capability_counts_as_old(monkeypatch):
    monkeypatch.setattr(tf.config.experimental, "get_device_details", lambda d: {})
    assert choose_mixed_precision("auto", [_gpu(0)], log=lambda *a: None) is False


# ----------------------------------------------------------------------------- strategy
def _visible(monkeypatch, gpus):
    real = tf.config.list_physical_devices

    def fake(device_type=None):
        return list(gpus) if device_type == "GPU" else real(device_type)
    monkeypatch.setattr(tf.config, "list_physical_devices", fake)


def test_require_gpu_without_gpu_is_a_clear_error(monkeypatch):
    _visible(monkeypatch, [])
    with pytest.raises(GPURequestedError) as err:
        select_strategy(require_gpu=True, log=lambda *a: None)
    msg = str(err.value)
    assert "train.require_gpu" in msg and "no GPU" in msg
    assert "make install GPU=1" in msg and "nvidia-smi" in msg
    assert isinstance(err.value, RuntimeError)


def test_cpu_strategy_without_gpu(monkeypatch):
    _visible(monkeypatch, [])
    logs = []
    strategy, gpus = select_strategy(require_gpu=False, log=logs.append)
    assert gpus == []
    assert strategy.num_replicas_in_sync == 1
    assert not isinstance(strategy, (tf.distribute.OneDeviceStrategy,
                                     tf.distribute.MirroredStrategy))
    assert "0 GPU(s)" in logs[0]


def test_one_gpu_gets_a_one_device_strategy(monkeypatch):
    _visible(monkeypatch, [_gpu(0)])
    logs = []
    strategy, gpus = select_strategy(require_gpu=True, log=logs.append)
    assert isinstance(strategy, tf.distribute.OneDeviceStrategy)
    assert len(gpus) == 1
    assert "1 GPU(s)" in logs[0] and "OneDeviceStrategy" in logs[0]


def test_several_gpus_get_a_mirrored_strategy(monkeypatch):
    _visible(monkeypatch, [_gpu(0), _gpu(1)])

    class FakeMirrored:
        pass
    monkeypatch.setattr(tf.distribute, "MirroredStrategy", FakeMirrored)
    strategy, gpus = select_strategy(log=lambda *a: None)
    assert isinstance(strategy, FakeMirrored) and len(gpus) == 2


def test_train_with_require_gpu_fails_before_any_work(monkeypatch, tmp_path):
    """No artifacts exist: the GPU check must come first, with the clear message."""
    _visible(monkeypatch, [])
    cfg = from_dict({"name": "nogpu", "artifacts_root": str(tmp_path / "missing"),
                     "train": {"require_gpu": True, "runs_dir": str(tmp_path / "runs")}})
    with pytest.raises(GPURequestedError, match="require_gpu"):
        train_mod.train(cfg, log=lambda *a: None)


# ----------------------------------------------------------------------------- mixed_float16 step
V, T, H, D = 31, 2, 4, 8
VOCAB = {"item_id": V, "tag": 6, "provider": 4, "user_gender": 3, "user_age": 4, "user_id": 50}


def _tiny_model_inputs():
    rs = np.random.RandomState(0)
    topic = (np.arange(V) - 1) % 3
    tags = np.zeros((V, T), np.int64)
    tags[1:, 0] = topic[1:] + 1
    provider = np.where(np.arange(V) > 0, topic + 1, 0)
    table = ItemTable(tags=tags, provider=provider, extra={}, category=tags[:, 0])
    nb = np.zeros((V, 3), np.int64)
    for i in range(1, V):
        same = [j for j in range(1, V) if j != i and topic[j] == topic[i]]
        nb[i] = rs.choice(same, 3, replace=False)
    counts = np.where(nb > 0, 2.0, 0.0).astype(np.float32)
    cooc = CooccurrenceTable.from_padded(
        NeighbourTable(nb, counts, (tags[nb, 0] == tags[:, None, 0]).astype(np.int8)))
    title = NeighbourTable(nb, np.where(nb > 0, 0.9, 0.0).astype(np.float32))
    cfg = from_dict({"model": {"embedding_dim": D, "output_dim": D, "item_mlp_units": [16, D],
                               "user_mlp_units": [16, D], "num_heads": 2,
                               "cl": ["feature", "semantic", "session"]},
                     "loss": {"num_negatives": 10, "num_cl_negatives": 5},
                     "train": {"batch_size": 16, "seed": 5},
                     "preprocess": {"history_length": H}})
    batches = []
    for _ in range(3):
        items = rs.randint(1, V, size=16)
        hist_len = rs.randint(0, H + 1, size=16)
        hist = rs.randint(1, V, size=(16, H)) * (np.arange(H)[None, :] < hist_len[:, None])
        batches.append({"user_gender": rs.randint(1, 3, size=16), "user_age": rs.randint(1, 4, 16),
                        "hist_items": hist, "hist_len": hist_len, "item": items,
                        "item_tags": tags[items], "item_provider": provider[items]})
    batches = [{k: np.asarray(v, np.int64) for k, v in b.items()} for b in batches]
    return cfg, table, cooc, title, batches


def test_mixed_float16_training_keeps_losses_float32():
    cfg, table, cooc, title, batches = _tiny_model_inputs()
    tf_keras.mixed_precision.set_global_policy("mixed_float16")
    model = build_model(cfg, table, VOCAB, ["gender", "age"], cooc, title)
    # Exactly as micrec_tf.train compiles: a plain Adam, which Keras wraps in a loss-scale optimizer.
    model.compile(optimizer=tf_keras.optimizers.Adam(cfg.train.learning_rate))
    assert isinstance(model.optimizer, tf_keras.mixed_precision.LossScaleOptimizer)

    feats = {k: tf.constant(v) for k, v in batches[0].items()}
    losses = model.compute_losses(feats, training=True)
    assert set(losses) == {"loss", "sampled_softmax_loss", "feature_cl_loss", "semantic_cl_loss",
                           "session_cl_loss"}
    assert all(v.dtype == tf.float32 for v in losses.values()), {k: v.dtype for k, v in losses.items()}
    assert model.user_tower.compute_dtype == "float16"
    assert model.item_tower.compute_dtype == "float16"
    assert all(v.dtype == tf.float32 for v in model.trainable_variables)  # float32 master weights
    out = model(feats)
    assert out["user_embedding"].dtype == tf.float32 and out["item_embedding"].dtype == tf.float32

    fit_one_epoch_checked(model, batches, losses)
    assert model.item_embeddings([1, 2]).dtype == tf.float32


def fit_one_epoch_checked(model, batches, loss_names):
    """One ``fit`` epoch over ``batches`` (graph mode, as in training): every loss in
    ``loss_names`` finite, and some weight changed."""
    sig = {k: tf.TensorSpec((None,) + v.shape[1:], tf.int64) for k, v in batches[0].items()}
    ds = tf.data.Dataset.from_generator(lambda: iter(batches), output_signature=sig)
    before = [v.numpy().copy() for v in model.trainable_variables]
    hist = model.fit(ds, epochs=1, verbose=0).history
    for name in loss_names:
        assert math.isfinite(hist[name][0]), (name, hist[name])
    changed = sum(not np.array_equal(b, v.numpy()) for b, v in zip(before, model.trainable_variables))
    assert changed > 0


def test_train_entry_point_under_forced_mixed_precision(tiny_pipeline, tmp_path):
    """The real trainer with train.mixed_precision: on (float16 compute even on the CPU)."""
    cfg, _ = tiny_pipeline
    cfg = cfg.replace({"train.mixed_precision": "on", "train.epochs": 1,
                       "train.runs_dir": str(tmp_path / "runs"), "model.cl": ["feature", "session"]})
    logs = []
    try:
        result = train_mod.train(cfg, evaluate_test=False, log=logs.append)
    finally:
        tf_keras.mixed_precision.set_global_policy("float32")
    assert any("mixed precision ON (mixed_float16)" in line and "forced on" in line for line in logs)
    model = result["model"]
    assert model.user_tower.compute_dtype == "float16"
    assert isinstance(model.optimizer, tf_keras.mixed_precision.LossScaleOptimizer)
    for name in ("loss", "sampled_softmax_loss", "feature_cl_loss", "session_cl_loss"):
        assert all(math.isfinite(x) for x in result["history"][name]), name
    assert 0.0 <= result["valid"]["hit@10"] <= 1.0
    assert os.path.exists(os.path.join(result["run_dir"], "checkpoint", "model.index"))

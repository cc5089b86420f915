"""``train.mixed_precision: bfloat16`` (issue 31): Keras mixed_bfloat16 for CPUs with
avx512_bf16 / AMX.

References: the policy table by hand; a hand-written cpuinfo file; the float32 model built with
the same seed on the same batch (bfloat16 keeps 8 significant bits, so the losses agree to a
few per cent, not to float32 precision); the dtypes Keras documents for a mixed policy (float32
variables, bfloat16 compute, float32 outputs where the model casts them).
"""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
import tensorflow as tf
import tf_keras

from micrec_tf import train as train_mod
from micrec_tf.model import build_model
from micrec_tf.precision import BF16_CPU_FLAGS, cpu_flags, policy_scope
from micrec_tf.train import training_policy
from tests.test_gpu_path import VOCAB, _gpu, _tiny_model_inputs, fit_one_epoch_checked


@pytest.fixture(autouse=True)
def _float32_policy_after():
    yield
    tf_keras.mixed_precision.set_global_policy("float32")


@pytest.mark.parametrize("flags, expected_text", [
    ({"avx2", "avx512f", "avx512_bf16"}, "this CPU has avx512_bf16"),
    ({"avx512_bf16", "amx_bf16", "amx_tile"}, "this CPU has amx_bf16 and avx512_bf16"),
    ({"avx2", "fma"}, "WARNING: this CPU has none of avx512_bf16 / amx_bf16: its bfloat16 "
                      "matrix products are emulated and likely slower than float32"),
])
def test_bfloat16_policy_says_whether_the_cpu_has_native_bfloat16(flags, expected_text):
    logs = []
    assert training_policy("bfloat16", [], log=logs.append, flags=flags) == "mixed_bfloat16"
    assert logs == ["[train] mixed precision ON (mixed_bfloat16): forced by "
                    f"train.mixed_precision=bfloat16; {expected_text}"]


def test_bfloat16_on_a_gpu_and_the_other_settings(fake_caps_two):
    logs = []
    assert training_policy("bfloat16", fake_caps_two, log=logs.append) == "mixed_bfloat16"
    assert logs[0].endswith("; on 2 GPU(s)")
    quiet = dict(log=lambda *a: None, flags={"avx512_bf16"})
    assert training_policy("off", [], **quiet) == "float32"
    assert training_policy("auto", [], **quiet) == "float32"  # no GPU: never bfloat16 by itself
    assert training_policy("on", [], **quiet) == "mixed_float16"


@pytest.fixture
def fake_caps_two(monkeypatch):
    monkeypatch.setattr(tf.config.experimental, "get_device_details",
                        lambda d: {"compute_capability": (8, 0)})
    return [_gpu(0), _gpu(1)]


def test_cpu_flags_reads_the_first_processor(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512_bf16\n\n"
                    "processor\t: 1\nflags\t\t: fpu sse2\n")
    assert cpu_flags(str(path)) == {"fpu", "avx2", "avx512_bf16"}
    assert cpu_flags(str(tmp_path / "missing")) == set()
    assert set(BF16_CPU_FLAGS) == {"avx512_bf16", "amx_bf16"}


def _model(policy, cfg, table, cooc, title, batch):
    tf_keras.utils.set_random_seed(cfg.train.seed)
    with policy_scope(policy):
        model = build_model(cfg, table, VOCAB, ["gender", "age"], cooc, title)
        model.compile(optimizer=tf_keras.optimizers.Adam(cfg.train.learning_rate))
        model.compute_losses(batch, training=False)
    return model


def test_bfloat16_losses_are_float32_and_near_the_float32_model():
    cfg, table, cooc, title, batches = _tiny_model_inputs()
    feats = [{k: tf.constant(v) for k, v in b.items()} for b in batches]
    f32 = _model("float32", cfg, table, cooc, title, feats[0])
    bf16 = _model("mixed_bfloat16", cfg, table, cooc, title, feats[0])
    assert bf16.user_tower.compute_dtype == "bfloat16"
    assert bf16.item_tower.compute_dtype == "bfloat16"
    assert not isinstance(bf16.optimizer, tf_keras.mixed_precision.LossScaleOptimizer)
    assert all(v.dtype == tf.float32 for v in bf16.trainable_variables)
    for a, b in zip(f32.trainable_variables, bf16.trainable_variables):  # same initial weights
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    want = f32.compute_losses(feats[1], training=False)
    got = bf16.compute_losses(feats[1], training=False)
    assert set(got) == set(want)
    for name in want:
        assert got[name].dtype == tf.float32, name
        np.testing.assert_allclose(float(got[name]), float(want[name]), rtol=3e-2, err_msg=name)
    users = {k: v for k, v in feats[1].items() if k.startswith(("user_", "hist_"))}
    u32, u16 = f32.user_embeddings(users), bf16.user_embeddings(users)
    assert u16.dtype == tf.float32
    np.testing.assert_allclose(u16.numpy(), u32.numpy(), atol=5e-2)
    assert bf16.item_embeddings([1, 2]).dtype == tf.float32
    fit_one_epoch_checked(bf16, batches, want)


@pytest.mark.slow
def test_train_and_export_under_bfloat16(tiny_pipeline, tmp_path):
    """The real trainer with train.mixed_precision: bfloat16, then the float32 export of it."""
    from export.export_model import export_run
    from micrec_tf.retrieval import Retriever

    cfg, _ = tiny_pipeline
    cfg = cfg.replace({"train.mixed_precision": "bfloat16", "train.epochs": 1,
                       "train.runs_dir": str(tmp_path / "runs"),
                       "export.exports_dir": str(tmp_path / "exports"),
                       "export.index": "brute_force"})
    logs = []
    result = train_mod.train(cfg, evaluate_test=False, log=logs.append)
    assert any(line.startswith("[train] mixed precision ON (mixed_bfloat16)") for line in logs)
    model = result["model"]
    assert model.user_tower.compute_dtype == "bfloat16"
    for name in ("loss", "sampled_softmax_loss"):
        assert all(math.isfinite(x) for x in result["history"][name]), name
    assert 0.0 <= result["valid"]["hit@10"] <= 1.0
    assert tf_keras.mixed_precision.global_policy().name == "float32"  # restored after train

    version_dir = export_run(cfg, log=lambda *a: None)
    r = Retriever.load(version_dir)
    assert r.vectors.dtype == np.float32 and np.isfinite(r.vectors).all()
    meta_tower = r.metadata["user_tower"]
    assert meta_tower["self_check_max_abs_diff"] <= 1e-5  # the float32 rebuild serves itself
    assert os.path.isdir(os.path.join(version_dir, "user_tower"))

"""train.optimizer=fused_adam (micrec_tf/optimizers.py, issue 31): one ResourceApplyAdam kernel
per variable, against a hand-written numpy Adam, against tf_keras's Adam on the MicRec model,
across checkpoints both ways, under MirroredStrategy and LossScaleOptimizer, and through train()."""
import micrec_tf  # noqa: F401

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf
import tf_keras

from micrec_tf.config import ConfigError, Config, validate
from micrec_tf.optimizers import FusedAdam, LazyAdam, make_optimizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LR, B1, B2, EPS = 0.01, 0.9, 0.999, 1e-7
# The kernel computes 1 - beta in float32 from float32 beta: its effective betas are the float32
# roundings of 0.9 and 0.999 (1 - 0.999f = 0.00099998713, 1.3e-5 relative below 0.001).
B1_F32, B2_F32 = float(np.float32(B1)), float(np.float32(B2))


def numpy_adam(var, grads, lr=LR, b1=B1, b2=B2, eps=EPS):
    """Hand-written Adam in float64 (tf_keras's formula: epsilon outside the bias-corrected root):
    for t = 1, 2, ...: m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2;
    var -= lr sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps). ``grads``: dense arrays."""
    var = np.array(var, np.float64)
    m, v = np.zeros_like(var), np.zeros_like(var)
    for t, g in enumerate(grads, start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        var = var - lr * np.sqrt(1 - b2 ** t) / (1 - b1 ** t) * m / (np.sqrt(v) + eps)
    return var, m, v


def dense_of(rows, values, indices):
    """The dense gradient of an IndexedSlices: repeated indices add up (pure Python loop)."""
    out = np.zeros((rows,) + np.shape(values)[1:], np.float64)
    for value, index in zip(values, indices):
        out[index] += value
    return out


def _sparse_steps(seed=0, steps=4, rows=7, dim=3):
    """Per step: (values [5, dim], indices [5]) with repeats (row 2 thrice in step 1, ...)."""
    rs = np.random.RandomState(seed)
    out = []
    for t in range(steps):
        indices = np.array([2, 5, 2, 0, 2] if t % 2 == 0 else [6, 1, 6, 3, 1])
        out.append((rs.randn(5, dim).astype(np.float32), indices))
    return out


def test_matches_a_numpy_adam_on_dense_and_sparse_gradients():
    rs = np.random.RandomState(1)
    w0 = rs.randn(3, 4).astype(np.float32)
    e0 = rs.randn(7, 3).astype(np.float32)
    w, e = tf.Variable(w0), tf.Variable(e0)
    opt = FusedAdam(LR)
    dense = [rs.randn(3, 4).astype(np.float32) for _ in range(4)]
    sparse = _sparse_steps()
    for g, (values, indices) in zip(dense, sparse):
        opt.apply_gradients([
            (tf.constant(g), w),
            (tf.IndexedSlices(tf.constant(values), tf.constant(indices), tf.constant([7, 3])), e)])
    dense_e = [dense_of(7, v, i) for v, i in sparse]
    # With the kernel's float32 betas: float32 rounding only.
    want_w, want_mw, want_vw = numpy_adam(w0, dense, b1=B1_F32, b2=B2_F32)
    want_e, want_me, want_ve = numpy_adam(e0, dense_e, b1=B1_F32, b2=B2_F32)
    np.testing.assert_allclose(w.numpy(), want_w, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(e.numpy(), want_e, rtol=1e-6, atol=1e-6)
    # the slots are tf_keras Adam's m and v, in the same order and with the same names
    assert [v.name for v in opt.variables[1:]] == ["Adam/m/Variable:0", "Adam/v/Variable:0"] * 2
    np.testing.assert_allclose(opt.variables[1].numpy(), want_mw, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(opt.variables[2].numpy(), want_vw, rtol=1e-5, atol=1e-10)
    np.testing.assert_allclose(opt.variables[3].numpy(), want_me, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(opt.variables[4].numpy(), want_ve, rtol=1e-5, atol=1e-10)
    # With the exact 0.9 / 0.999: v is 1.3e-5 (relative) lower, the variables within 1e-5.
    exact_w, _, exact_vw = numpy_adam(w0, dense)
    exact_e, _, _ = numpy_adam(e0, dense_e)
    np.testing.assert_allclose(w.numpy(), exact_w, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(e.numpy(), exact_e, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(opt.variables[2].numpy(), exact_vw, rtol=2e-5)
    assert int(opt.iterations.numpy()) == 4
    # rows no gradient ever touched (row 4) keep their value: m = v = 0 there
    np.testing.assert_array_equal(e.numpy()[4], e0[4])


@pytest.mark.parametrize("name", ["fused", "lazy"])
def test_update_step_sums_repeated_indices_itself(name):
    """update_step called directly (no Keras de-duplication first): repeats still add up."""
    e0 = np.arange(12, dtype=np.float32).reshape(6, 2) / 5
    e = tf.Variable(e0)
    opt = FusedAdam(LR) if name == "fused" else LazyAdam(LR)
    opt.build([e])
    values = np.array([[1.0, -2.0], [0.5, 0.25], [3.0, 1.0]], np.float32)
    indices = np.array([4, 1, 4])
    opt.update_step(tf.IndexedSlices(tf.constant(values), tf.constant(indices)), e)
    if name == "fused":
        want, _, _ = numpy_adam(e0, [dense_of(6, values, indices)])
    else:
        want, _, _ = numpy_lazy_adam(e0, [(values, indices)])
    np.testing.assert_allclose(e.numpy(), want, rtol=1e-5, atol=1e-6)
    if name == "lazy":
        assert opt.jit_compile is False


def test_adaptive_epsilon_and_int64_indices():
    e0 = np.full((4, 2), 0.5, np.float32)
    e = tf.Variable(e0)
    opt = FusedAdam(LR, epsilon=1e-3, adaptive_epsilon=True)
    values, indices = np.array([[1e-3, -2e-3]], np.float32), np.array([2], np.int64)
    opt.apply_gradients([(tf.IndexedSlices(tf.constant(values), tf.constant(indices),
                                           tf.constant([4, 2], tf.int64)), e)])
    g = dense_of(4, values, indices)
    # adaptive epsilon = epsilon * sqrt(1 - b2^t) (Kingma and Ba's Algorithm 1), by hand at t=1
    m, v = (1 - B1) * g, (1 - B2) * g * g
    eps_hat = 1e-3 * np.sqrt(1 - B2)
    want = e0 - LR * np.sqrt(1 - B2) / (1 - B1) * m / (np.sqrt(v) + eps_hat)
    np.testing.assert_allclose(e.numpy(), want, rtol=1e-5, atol=1e-7)


def test_under_loss_scale_optimizer():
    """Mixed precision wraps the optimizer in LossScaleOptimizer: the unscaled step is Adam's."""
    rs = np.random.RandomState(3)
    e0, ids = rs.randn(6, 2).astype(np.float32), tf.constant([1, 3, 1, 5])
    e = tf.Variable(e0)
    opt = tf_keras.mixed_precision.LossScaleOptimizer(FusedAdam(LR))
    grads = []
    for _ in range(3):
        before = e.numpy().astype(np.float64)
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.gather(e, ids) ** 2)
            scaled = opt.get_scaled_loss(loss)
        g = opt.get_unscaled_gradients(tape.gradient(scaled, [e]))
        opt.apply_gradients(zip(g, [e]))
        dense = np.zeros_like(before)
        for i in ids.numpy():
            dense[i] += 2 * before[i]  # d/de sum(e[ids]^2), by hand
        grads.append(dense)
        # the next gradient depends on the updated value: compare step by step
        want, _, _ = numpy_adam(e0, grads)
        np.testing.assert_allclose(e.numpy(), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cls", ["FusedAdam", "LazyAdam"])
def test_mirrored_strategy_over_two_cpu_replicas(cls):
    """MirroredStrategy over 2 logical CPUs (a subprocess: logical devices are set before TF
    starts): the per-replica IndexedSlices gradients are summed across replicas, then each
    replica's copy gets the same step = numpy Adam (lazy: on the named rows only) on the summed
    gradient."""
    script = textwrap.dedent("""
        import micrec_tf, sys, json, numpy as np, tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        from micrec_tf.optimizers import FusedAdam, LazyAdam
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        e0 = np.arange(10, dtype=np.float32).reshape(5, 2) / 10
        with strategy.scope():
            e = tf.Variable(e0)
            opt = CLS(0.01)
            opt.build([e])
        ids = [tf.constant([1, 3, 1]), tf.constant([3, 4, 3])]
        def step():
            ctx = tf.distribute.get_replica_context()
            my = tf.switch_case(ctx.replica_id_in_sync_group, [lambda: ids[0], lambda: ids[1]])
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(tf.gather(e, my) * 0.5)
            g = tape.gradient(loss, [e])
            opt.apply_gradients(zip(g, [e]))
        for _ in range(3):
            strategy.run(tf.function(step))
        values = [v.numpy().tolist() for v in e.values]
        print(json.dumps({"replicas": len(e.values), "values": values}))
    """).replace("CLS", cls)
    env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    import json
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["replicas"] == 2
    e0 = np.arange(10, dtype=np.float64).reshape(5, 2) / 10
    g = dense_of(5, np.full((6, 2), 0.5), [1, 3, 1, 3, 4, 3])  # both replicas' rows, summed
    want, _, _ = numpy_adam(e0, [g] * 3)
    if cls == "LazyAdam":  # row 0 and 2 are never named: they stay
        want[[0, 2]] = e0[[0, 2]]
    for values in res["values"]:
        np.testing.assert_allclose(values, want, rtol=1e-5, atol=1e-6)


# --- lazy_adam: a different optimizer, against its own numpy reference -----------------------
def numpy_lazy_adam(var, steps, lr=LR, b1=B1_F32, b2=B2_F32, eps=EPS):
    """Row-sparse Adam by hand (float64): at step t only the rows named by that step's
    (values, indices) (repeats summed) update m, v and their value, with bias correction at t."""
    var = np.array(var, np.float64)
    m, v = np.zeros_like(var), np.zeros_like(var)
    for t, (values, indices) in enumerate(steps, start=1):
        g = dense_of(var.shape[0], values, indices)
        for r in sorted(set(int(i) for i in indices)):
            m[r] = b1 * m[r] + (1 - b1) * g[r]
            v[r] = b2 * v[r] + (1 - b2) * g[r] ** 2
            var[r] -= lr * np.sqrt(1 - b2 ** t) / (1 - b1 ** t) * m[r] / (np.sqrt(v[r]) + eps)
    return var, m, v


def test_lazy_adam_updates_only_the_named_rows():
    rs = np.random.RandomState(4)
    e0, w0 = rs.randn(7, 3).astype(np.float32), rs.randn(2, 3).astype(np.float32)
    e, w = tf.Variable(e0), tf.Variable(w0)
    opt = LazyAdam(LR)
    sparse = _sparse_steps(seed=5)
    dense = [rs.randn(2, 3).astype(np.float32) for _ in sparse]
    for (values, indices), g in zip(sparse, dense):
        opt.apply_gradients([
            (tf.IndexedSlices(tf.constant(values), tf.constant(indices), tf.constant([7, 3])), e),
            (tf.constant(g), w)])
    want_e, want_m, want_v = numpy_lazy_adam(e0, sparse)
    np.testing.assert_allclose(e.numpy(), want_e, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(opt.variables[1].numpy(), want_m, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(opt.variables[2].numpy(), want_v, rtol=1e-5, atol=1e-10)
    np.testing.assert_array_equal(e.numpy()[4], e0[4])  # never named: untouched
    # rows last named at step 3 (0, 2, 5) keep their step-3 moments and values through step 4
    # (Adam would decay the moments and move the rows)
    assert not {0, 2, 5} & {int(i) for i in sparse[3][1]}
    e_3, m_3, v_3 = numpy_lazy_adam(e0, sparse[:3])
    for r in (0, 2, 5):
        np.testing.assert_allclose(opt.variables[1].numpy()[r], m_3[r], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(opt.variables[2].numpy()[r], v_3[r], rtol=1e-5, atol=1e-10)
        np.testing.assert_allclose(e.numpy()[r], e_3[r], rtol=1e-6, atol=1e-6)
    # dense gradients get Adam's step
    want_w, _, _ = numpy_adam(w0, dense, b1=B1_F32, b2=B2_F32)
    np.testing.assert_allclose(w.numpy(), want_w, rtol=1e-6, atol=1e-6)
    # it is not Adam: the rows Adam keeps moving by momentum differ
    adam_e, _, _ = numpy_adam(e0, [dense_of(7, v, i) for v, i in sparse], b1=B1_F32, b2=B2_F32)
    assert np.abs(adam_e - want_e).max() > 1e-3


# --- against tf_keras's Adam on the MicRec model --------------------------------------------
def _micrec(optimizer, batch):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from test_model import _build, _cfg, _tensors

    tf_keras.utils.set_random_seed(0)
    model = _build(_cfg(cl=["feature", "semantic", "session"]))
    model.compile(optimizer=optimizer)
    model.compute_losses(_tensors(batch))  # creates every variable, as train() does
    model.optimizer.build(model.trainable_variables)
    return model


def _fit(model, batches):
    from test_model import _dataset

    tf_keras.utils.set_random_seed(5)
    return model.fit(_dataset(batches), epochs=1, verbose=0, shuffle=False).history["loss"]


def test_equals_keras_adam_on_the_micrec_model_for_six_steps():
    """Six fit steps of MicRec (ICAN + all CL terms; item table, tags, providers: sparse
    gradients) from the same seed: every variable within 5e-5 of tf_keras's Adam (rounding:
    1 - b1 is 0.1f in tf_keras, 1.0f - 0.9f in the kernel; sparse rows' moments are summed in
    another order), while the step moved them by far more."""
    from test_model import _batches

    batches = _batches(6, 32, seed=2)
    keras = _micrec(tf_keras.optimizers.Adam(LR), batches[0])
    fused = _micrec(FusedAdam(LR), batches[0])
    start = [v.numpy().copy() for v in fused.trainable_variables]
    assert len(start) > 20 and len(start) == len(keras.trainable_variables)
    for a, b in zip(keras.trainable_variables, fused.trainable_variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())  # same start
    loss_k, loss_f = _fit(keras, batches), _fit(fused, batches)
    np.testing.assert_allclose(loss_f, loss_k, rtol=1e-4)
    moved = 0.0
    for a, b, s in zip(keras.trainable_variables, fused.trainable_variables, start):
        assert a.name == b.name
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=0, atol=5e-5, err_msg=a.name)
        moved = max(moved, float(np.abs(a.numpy() - s).max()))
    assert moved > 0.03  # 6 steps at lr 0.01 moved some weight by ~6 lr
    assert [v.name for v in fused.optimizer.variables] == [
        v.name for v in keras.optimizer.variables]
    assert [v.shape for v in fused.optimizer.variables] == [
        v.shape for v in keras.optimizer.variables]


# --- checkpoints restore across the two -----------------------------------------------------
class _Tiny(tf.Module):
    """An embedding table [20, 4] and a dense kernel [4, 1]; loss = mean((E[ids] W - y)^2)."""

    def __init__(self):
        rs = np.random.RandomState(7)
        self.table = tf.Variable(rs.randn(20, 4).astype(np.float32))
        self.kernel = tf.Variable(rs.randn(4, 1).astype(np.float32))


def _tiny_steps(model, opt, steps, start):
    rs = np.random.RandomState(100 + start)
    for _ in range(steps):
        ids = tf.constant(rs.randint(0, 20, size=16))  # repeats
        y = tf.constant(rs.randn(16, 1).astype(np.float32))
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean((tf.gather(model.table, ids) @ model.kernel - y) ** 2)
        grads = tape.gradient(loss, [model.table, model.kernel])
        assert isinstance(grads[0], tf.IndexedSlices)
        opt.apply_gradients(zip(grads, [model.table, model.kernel]))


@pytest.mark.parametrize("first,second", [("adam", "fused_adam"), ("fused_adam", "adam"),
                                          ("adam", "lazy_adam")])
def test_checkpoint_restores_across_optimizers(tmp_path, first, second):
    """2 steps with ``first``, checkpoint, restore into a fresh model with ``second`` (slots and
    step count exactly as saved), 3 more steps: as continuing with ``first`` within 1e-5 (Adam
    and the fused Adam; lazy_adam is another optimizer: only the restore is checked)."""
    def opt_of(name):
        return make_optimizer(Config().replace({"train.optimizer": name}).train)

    model, opt = _Tiny(), opt_of(first)
    _tiny_steps(model, opt, 2, start=0)
    path = tf.train.Checkpoint(model=model, optimizer=opt).write(str(tmp_path / "ckpt"))
    saved = [v.numpy() for v in opt.variables]
    _tiny_steps(model, opt, 3, start=2)  # the reference: one optimizer throughout

    other, opt2 = _Tiny(), opt_of(second)
    opt2.build([other.table, other.kernel])
    tf.train.Checkpoint(model=other, optimizer=opt2).read(path).assert_consumed()
    assert len(opt2.variables) == len(saved) == 5
    for a, b in zip(opt2.variables, saved):
        np.testing.assert_array_equal(a.numpy(), b)  # iteration, m and v of both variables
    _tiny_steps(other, opt2, 3, start=2)
    assert int(opt2.iterations.numpy()) == 5
    if second == "lazy_adam":
        return
    for a, b in ((model.table, other.table), (model.kernel, other.kernel)):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=0, atol=1e-5)


# --- config, factory, argument checks -------------------------------------------------------
def test_make_optimizer_default_is_keras_adam():
    opt = make_optimizer(Config().train)
    assert type(opt) is tf_keras.optimizers.Adam
    assert opt.get_config() == tf_keras.optimizers.Adam(0.001).get_config()
    fused = make_optimizer(Config().replace({"train.optimizer": "fused_adam",
                                             "train.learning_rate": 0.05}).train)
    assert type(fused) is FusedAdam
    cfg = fused.get_config()
    assert (cfg["beta_1"], cfg["beta_2"], cfg["epsilon"], cfg["amsgrad"]) == (0.9, 0.999, 1e-7,
                                                                              False)
    assert cfg["learning_rate"] == pytest.approx(0.05)
    again = FusedAdam.from_config(cfg)
    assert type(again) is FusedAdam and again.get_config() == cfg
    # serialization by registered name round-trips too
    restored = tf_keras.optimizers.deserialize(tf_keras.optimizers.serialize(fused))
    assert type(restored) is FusedAdam
    lazy = make_optimizer(Config().replace({"train.optimizer": "lazy_adam"}).train)
    assert type(lazy) is LazyAdam and type(LazyAdam.from_config(lazy.get_config())) is LazyAdam


def test_config_rejects_an_unknown_optimizer():
    with pytest.raises(ConfigError) as err:
        validate(Config().replace({"train.optimizer": "sgd"}))
    msg = str(err.value)
    assert "\n" not in msg and "train.optimizer" in msg and "'sgd'" in msg
    assert validate(Config()).train.optimizer == "adam"


@pytest.mark.parametrize("kwargs,match", [
    ({"amsgrad": True}, "amsgrad.*Received: amsgrad=True"),
    ({"beta_1": 1.0}, "beta_1 must be in \\[0, 1\\). Received: beta_1=1.0"),
    ({"beta_2": -0.1}, "beta_2 must be in \\[0, 1\\). Received: beta_2=-0.1"),
    ({"epsilon": -1e-7}, "epsilon must be >= 0. Received: epsilon=-1e-07"),
])
def test_fused_adam_argument_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FusedAdam(**kwargs)
    with pytest.raises(ValueError, match=match):
        LazyAdam(**kwargs)


# --- through train() ------------------------------------------------------------------------
@pytest.mark.slow
def test_train_with_fused_adam_learns_and_resumes(tiny_pipeline):
    """train.optimizer=fused_adam through train(): the loss falls over the epochs, and a run
    killed mid-epoch resumes from its backup to the uninterrupted run's weights."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from test_train import _Kill, _KillAt, _weights

    from micrec_tf.train import train

    base, tmp = tiny_pipeline
    cfg = base.replace({"train.optimizer": "fused_adam"})
    quiet = lambda *a: None  # noqa: E731
    full = train(cfg, run_dir=os.path.join(tmp, "runs", "fused-full"), evaluate_test=False,
                 log=quiet)
    assert type(full["model"].optimizer) is FusedAdam
    loss = full["history"]["sampled_softmax_loss"]
    assert len(loss) == 2 and loss[-1] < loss[0]
    run_dir = os.path.join(tmp, "runs", "fused-killed")
    with pytest.raises(_Kill):
        train(cfg, run_dir=run_dir, evaluate_test=False, log=quiet,
              extra_callbacks=[_KillAt(at_batch=17)])
    lines = []
    resumed = train(cfg, run_dir=run_dir, evaluate_test=False, log=lines.append)
    assert any("resuming from" in line for line in lines), lines
    for a, b in zip(_weights(full["model"]), _weights(resumed["model"])):
        np.testing.assert_allclose(a, b, atol=1e-4)


# --- the micro-benchmark of one apply (benchmarks/step_profile.py) ----------------------------
@pytest.mark.parametrize("kwargs,match", [
    ({"grad_rows": 0}, "grad_rows must be an int >= 1. Received: 0"),
    ({"num_rows": 10, "grad_rows": 11}, "grad_rows must be <= num_rows \\(10\\). Received: 11"),
    ({"rounds": 1.5}, "rounds must be an int >= 1. Received: 1.5"),
])
def test_optimizer_apply_argument_errors(kwargs, match):
    from benchmarks import step_profile as sp

    with pytest.raises(ValueError, match=match):
        sp.optimizer_apply(**kwargs)


def test_optimizer_apply_times_each_optimizer():
    from benchmarks import step_profile as sp

    out = sp.optimizer_apply(num_rows=300, dim=4, grad_rows=20, rounds=2, log=lambda *a: None)
    assert set(out["ms"]) == {"adam", "fused_adam", "lazy_adam"}
    assert all(t > 0 for t in out["ms"].values())
    assert all(len(r) == 2 for r in out["ms_per_round"].values())
    assert out["table"] == [300, 4] and out["grad_rows"] == 20
    assert out["ratio_adam_over_fused"] > 0 and out["ratio_adam_over_lazy"] > 0

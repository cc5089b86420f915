"""End-to-end training on the tiny synthetic pipeline: outputs, learning, and exact resume."""
import json
import os
import re

import numpy as np
import pytest

from micrec_tf.train import consumed_batches, restore_model, train


class _Kill(RuntimeError):
    pass


class _KillAt:
    """A Keras callback that aborts training at a given global batch (a killed job)."""

    def __new__(cls, at_batch):
        import tf_keras

        class Killer(tf_keras.callbacks.Callback):
            seen = 0

            def on_train_batch_end(self, batch, logs=None):
                Killer.seen += 1
                if Killer.seen == at_batch:
                    raise _Kill(f"killed after batch {at_batch}")

        return Killer()


def _weights(model):
    """Trained parameters plus the optimizer's step count (not the loss-metric accumulators)."""
    return [np.asarray(w) for w in model.trainable_variables] + [
        np.asarray(model.optimizer.iterations)]


def test_train_writes_outputs_and_learns(tiny_pipeline):
    cfg, tmp = tiny_pipeline
    run_dir = os.path.join(tmp, "runs", "learn")
    res = train(cfg.replace({"train.epochs": 3}), run_dir=run_dir, log=lambda *a: None)
    for name in ("config.yaml", "history.json", "metrics.json", "checkpoint"):
        assert os.path.exists(os.path.join(run_dir, name)), name
    hist = res["history"]
    for key in ("sampled_softmax_loss", "feature_cl_loss", "semantic_cl_loss",
                "session_cl_loss", "val_hit_at_10"):
        assert key in hist and len(hist[key]) == 3, key
    assert hist["sampled_softmax_loss"][-1] < hist["sampled_softmax_loss"][0]
    # Better than retrieving at random: 50 of ~300 items.
    num_items = res["model"].item_embeddings().shape[0] - 1
    assert res["test"]["hit@50"] > 1.5 * 50 / num_items
    with open(os.path.join(run_dir, "metrics.json")) as fh:
        saved = json.load(fh)
    assert saved["test"]["hit@50"] == pytest.approx(res["test"]["hit@50"])
    # The final checkpoint restores to the same item vectors.
    model, _, _ = restore_model(run_dir)
    np.testing.assert_allclose(model.item_embeddings().numpy(),
                               res["model"].item_embeddings().numpy(), atol=1e-6)


def test_killed_run_resumes_to_the_same_result(tiny_pipeline):
    cfg, tmp = tiny_pipeline
    quiet = lambda *a: None  # noqa: E731
    full = train(cfg, run_dir=os.path.join(tmp, "runs", "full"), evaluate_test=False, log=quiet)

    run_dir = os.path.join(tmp, "runs", "killed")
    with pytest.raises(_Kill):
        train(cfg, run_dir=run_dir, evaluate_test=False, log=quiet,
              extra_callbacks=[_KillAt(at_batch=17)])
    # The backup was written at the end of epoch 1 and then every steps_per_checkpoint (2)
    # batches; the killer runs before the backup of its own batch.
    from micrec_tf.data.artifacts import load_artifacts

    n_train = load_artifacts(cfg.artifacts_dir).feature_spec["num_examples"]["train"]
    steps = int(np.ceil(n_train / cfg.train.batch_size))
    assert steps < 16 < 2 * steps  # the kill lands in the second epoch
    expected = steps + (16 - steps) // 2 * 2
    assert consumed_batches(os.path.join(run_dir, "backup"), steps) == expected
    resumed = train(cfg, run_dir=run_dir, evaluate_test=False, log=quiet)
    for a, b in zip(_weights(full["model"]), _weights(resumed["model"])):
        np.testing.assert_allclose(a, b, atol=1e-4)
    assert resumed["valid"]["hit@50"] == pytest.approx(full["valid"]["hit@50"], abs=1e-3)
    assert not os.path.exists(os.path.join(run_dir, "backup", "chief"))


def test_backup_of_another_config_is_discarded_not_resumed(tmp_path):
    import yaml

    from micrec_tf.config import Config
    from micrec_tf.train import discard_stale_backup

    cfg = Config()
    run_dir = str(tmp_path)
    os.makedirs(os.path.join(run_dir, "backup", "chief"))
    with open(os.path.join(run_dir, "config.yaml"), "w") as fh:
        yaml.safe_dump(cfg.to_dict(), fh, sort_keys=False)
    messages = []
    assert not discard_stale_backup(cfg, run_dir, messages.append)  # same config: resume
    assert os.path.isdir(os.path.join(run_dir, "backup", "chief")) and not messages
    changed = cfg.replace({"loss.temperature": 0.2, "train.epochs": 3})
    assert discard_stale_backup(changed, run_dir, messages.append)
    assert not os.path.exists(os.path.join(run_dir, "backup"))
    assert "loss.temperature" in messages[0] and "train.epochs" in messages[0]


def test_backup_survives_keys_added_since_and_export_settings(tmp_path):
    """A run interrupted under older code (its config.yaml lacks keys added since, which take
    their defaults) resumes; so does one whose export settings changed; a training key changed
    still discards it."""
    import yaml

    from micrec_tf.config import Config
    from micrec_tf.train import discard_stale_backup

    cfg = Config()
    run_dir = str(tmp_path)
    os.makedirs(os.path.join(run_dir, "backup", "chief"))
    older = cfg.to_dict()
    del older["train"]["optimizer"], older["preprocess"]["time_range"]  # not there back then
    del older["export"]["fold_text"]
    with open(os.path.join(run_dir, "config.yaml"), "w") as fh:
        yaml.safe_dump(older, fh, sort_keys=False)
    messages = []
    assert not discard_stale_backup(cfg, run_dir, messages.append)
    assert not discard_stale_backup(cfg.replace({"export.keep_versions": 3}), run_dir,
                                    messages.append)
    assert os.path.isdir(os.path.join(run_dir, "backup", "chief")) and not messages
    # a new key set away from its default is a change
    assert discard_stale_backup(cfg.replace({"train.optimizer": "fused_adam"}), run_dir,
                                messages.append)
    assert "train.optimizer" in messages[0] and not os.path.exists(os.path.join(run_dir, "backup"))


def _write_config(cfg, path, **overrides):
    import yaml

    with open(path, "w") as fh:
        yaml.safe_dump(cfg.replace(overrides).to_dict(), fh, sort_keys=False)
    return str(path)


def _train_cli(config_path, run_dir, kill_on=None, timeout=900):
    """Runs ``python -m micrec_tf.train`` as a real process; with ``kill_on``, SIGKILLs it as
    soon as a line containing that text appears. Returns ``(returncode, output)``."""
    import signal
    import subprocess
    import sys
    import time

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen(
        [sys.executable, "-m", "micrec_tf.train", "--config", config_path, "--run-dir", run_dir],
        cwd=root, env=dict(os.environ, PYTHONUNBUFFERED="1"), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    lines, deadline = [], time.time() + timeout
    for line in proc.stdout:
        lines.append(line)
        if kill_on and kill_on in line:
            proc.send_signal(signal.SIGKILL)
            break
        assert time.time() < deadline, "training subprocess timed out:\n" + "".join(lines)
    rest, _ = proc.communicate(timeout=timeout)
    return proc.returncode, "".join(lines) + (rest or "")


def test_sigkilled_run_resumes_with_default_checkpointing(tiny_pipeline, tmp_path):
    """With the default ``train.steps_per_checkpoint`` (200 batches, longer than an
    epoch here) a run SIGKILLed after its first epoch resumes at epoch 2, not epoch 1, and ends
    with the uninterrupted run's metrics; early stopping and the best epoch survive the kill."""
    from micrec_tf.config import TrainConfig

    cfg, _ = tiny_pipeline
    defaults = TrainConfig()
    config = _write_config(cfg, tmp_path / "c.yaml", **{
        "train.epochs": 3, "train.steps_per_checkpoint": defaults.steps_per_checkpoint,
        "train.early_stopping_patience": defaults.early_stopping_patience})
    from micrec_tf.data.artifacts import load_artifacts

    n_train = load_artifacts(cfg.artifacts_dir).feature_spec["num_examples"]["train"]
    assert n_train / cfg.train.batch_size < defaults.steps_per_checkpoint  # no mid-epoch backup

    full_dir, killed_dir = str(tmp_path / "full"), str(tmp_path / "killed")
    rc, out = _train_cli(config, full_dir)
    assert rc == 0, out
    # Quiet logs: the project's lines and Keras's epoch lines, nothing else.
    noise = [line for line in out.splitlines() if re.search(
        r"WARNING|W0000|E0000|I0000|cuInit|cuda|oneDNN|apitools|Traceback", line)]
    assert not noise, noise
    rc, out = _train_cli(config, killed_dir, kill_on="[train] epoch 1 backed up")
    assert rc == -9, out
    assert "epoch 1 validation" in out and "epoch 2 validation" not in out
    rc, out = _train_cli(config, killed_dir)
    assert rc == 0, out
    assert "resuming from" in out and "at epoch 2" in out, out
    assert "Epoch 1/3" not in out and "Epoch 2/3" in out, out

    def metrics(run_dir):
        with open(os.path.join(run_dir, "metrics.json")) as fh:
            return json.load(fh)

    want, got = metrics(full_dir), metrics(killed_dir)
    assert got["best_epoch"] == want["best_epoch"]
    for split in ("valid", "test"):
        for key, value in want[split].items():
            assert got[split][key] == pytest.approx(value, abs=1e-3), (split, key)
    with open(os.path.join(killed_dir, "history.json")) as fh:
        assert [r["epoch"] for r in json.load(fh)] == list(range(1, want["epochs_run"] + 1))


def test_best_epoch_is_restored_at_the_epoch_cap(tiny_pipeline):
    """With early stopping on, the kept weights are the best validation epoch's, also when the
    run ends at ``train.epochs`` (tf_keras's EarlyStopping restores only when it stops)."""
    cfg, tmp = tiny_pipeline
    res = train(cfg.replace({"train.epochs": 3, "train.early_stopping_patience": 5}),
                run_dir=os.path.join(tmp, "runs", "best"), evaluate_test=False,
                log=lambda *a: None)
    curve = res["history"]["val_hit_at_10"]
    assert res["best_epoch"] == int(np.argmax(curve)) + 1 and not res["stopped_early"]
    assert res["valid"]["hit@10"] == pytest.approx(max(curve), abs=1e-6)


def test_step_progress_lines_within_an_epoch():
    import tf_keras

    from micrec_tf.train import StepProgress

    lines = []
    model = tf_keras.Sequential([tf_keras.layers.Dense(1, input_shape=(3,))])
    model.compile(optimizer="sgd", loss="mse")
    x, y = np.ones((40, 3), np.float32), np.zeros((40, 1), np.float32)
    model.fit(x, y, batch_size=8, epochs=2, verbose=0,
              callbacks=[StepProgress(8, every_s=0, log=lines.append)])
    pat = re.compile(r"\[train\] epoch (\d): step (\d)/5 \([\d,]+ examples/s, loss ([\d.]+), "
                     r"about \d+ min left of the epoch\)")
    got = [pat.fullmatch(line) for line in lines]
    assert all(got) and len(got) == 10, lines
    assert [(int(m[1]), int(m[2])) for m in got] == [(e, s) for e in (1, 2) for s in range(1, 6)]
    with pytest.raises(ValueError, match="every_s must be >= 0. Received: -1"):
        StepProgress(8, every_s=-1)
    with pytest.raises(ValueError, match="batch_size must be a positive integer. Received: 0"):
        StepProgress(0)
    silent = []
    model.fit(x, y, batch_size=8, epochs=1, verbose=0,
              callbacks=[StepProgress(8, every_s=3600, log=silent.append)])
    assert silent == []

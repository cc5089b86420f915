"""Issue 27, item 3: export refuses a run folder whose checkpoint is not its config's finished one.

Training rewrites ``config.yaml`` when it starts and writes ``checkpoint/`` only when it ends, so a
training that dies in between leaves the previous run's weights beside the new run's config. One
module-scoped tiny run (1 epoch, over the session's ``tiny_pipeline`` artifacts) is trained to
completion; each test copies its folder and breaks the copy the way the issue describes, then runs
the export command in-process (``cli.run``) on it.
"""
import hashlib
import json
import os
import shutil
import types

import pytest
import yaml

from micrec_tf import cli
from conftest import tiny_config


class _Killed(Exception):
    """Stands for the kill of a training process (raised by a callback)."""


class _DieAt:
    """A Keras callback that raises at the start of training, or after batch ``after_batch``."""

    def __new__(cls, after_batch=None):
        import tf_keras

        class Die(tf_keras.callbacks.Callback):
            def on_train_begin(self, logs=None):
                if after_batch is None:
                    raise _Killed("died before the first batch")

            def on_train_batch_end(self, batch, logs=None):
                if after_batch is not None and batch + 1 >= after_batch:
                    raise _Killed(f"killed after batch {batch + 1}")

        return Die()


@pytest.fixture(scope="module")
def finished(tiny_pipeline, tmp_path_factory):
    from micrec_tf.train import train

    _, tmp = tiny_pipeline
    root = tmp_path_factory.mktemp("run_state")
    cfg = tiny_config(tmp, model={"cl": ["feature"]},
                      train={"epochs": 1, "runs_dir": str(root / "runs")},
                      export={"exports_dir": str(root / "exports"), "index": "brute_force"})
    train(cfg, evaluate_test=False, log=lambda *a: None)
    cfg_path = root / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg.to_dict()))
    return types.SimpleNamespace(cfg=cfg, cfg_path=str(cfg_path), root=root)


def _copy_run(finished, tmp_path, name="run"):
    run_dir = str(tmp_path / name)
    shutil.copytree(finished.cfg.run_dir, run_dir)
    return run_dir


def _export(finished, run_dir, exports, capsys, *extra):
    """In-process ``python -m export.export_model``: (exit code, stdout, stderr)."""
    from export import export_model

    capsys.readouterr()
    code = cli.run(export_model.main, ["--config", finished.cfg_path, "--run-dir", run_dir,
                                       "--set", f"export.exports_dir={exports}", *extra])
    out = capsys.readouterr()
    return code, out.out, out.err


def _published(exports):
    """Every entry under the export folder (nothing may be published by a refused export)."""
    if not os.path.isdir(exports):
        return []
    return sorted(os.path.relpath(os.path.join(d, f), exports)
                  for d, dirs, files in os.walk(exports) for f in dirs + files)


def _assert_refused(code, out, err, run_dir, reason):
    assert code == cli.EXIT_USAGE, (code, out, err[-3000:])
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-3000:]
    assert run_dir in lines[0] and reason in lines[0], lines[0]


def _sha256(path):
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()


def test_finished_run_records_its_config_and_checkpoint(finished):
    """The record names the exact config.yaml bytes and checkpoint index the training wrote."""
    run_dir = finished.cfg.run_dir
    with open(os.path.join(run_dir, "run_state.json")) as fh:
        state = json.load(fh)
    assert state["state"] == "finished"
    assert state["config_sha256"] == _sha256(os.path.join(run_dir, "config.yaml"))
    assert state["checkpoint_sha256"] == _sha256(os.path.join(run_dir, "checkpoint",
                                                              "model.index"))
    with open(os.path.join(run_dir, "config.yaml")) as fh:
        assert yaml.safe_load(fh) == finished.cfg.to_dict()


def test_training_that_dies_early_leaves_a_run_export_refuses(finished, tmp_path, capsys):
    """A new config's training that dies before its first batch: config.yaml is the new one,
    checkpoint/ the old run's. Before the fix the export exited 0 and published the old weights
    under the new config."""
    from micrec_tf.train import train

    run_dir = _copy_run(finished, tmp_path)
    other = finished.cfg.replace({"train.learning_rate": finished.cfg.train.learning_rate / 2})
    with pytest.raises(_Killed):
        train(other, run_dir=run_dir, evaluate_test=False, log=lambda *a: None,
              extra_callbacks=[_DieAt()])
    with open(os.path.join(run_dir, "config.yaml")) as fh:  # the state the issue describes
        assert yaml.safe_load(fh) == other.to_dict()
    assert os.path.exists(os.path.join(run_dir, "checkpoint", "model.index"))
    exports = str(tmp_path / "exports")
    code, out, err = _export(finished, run_dir, exports, capsys)
    _assert_refused(code, out, err, run_dir, "did not finish")
    assert _published(exports) == []


@pytest.mark.parametrize("same_config", [False, True])
def test_training_killed_after_its_first_backup_leaves_a_run_export_refuses(
        finished, tmp_path, capsys, same_config):
    """Killed after batch 3 (backups every 2 batches): backup/ holds the new run, checkpoint/ the
    old one; with the same config too, the checkpoint is not this training's."""
    from micrec_tf.train import train

    run_dir = _copy_run(finished, tmp_path)
    other = (finished.cfg if same_config else
             finished.cfg.replace({"loss.temperature": finished.cfg.loss.temperature * 2}))
    assert other.train.steps_per_checkpoint == 2
    with pytest.raises(_Killed):
        train(other, run_dir=run_dir, evaluate_test=False, log=lambda *a: None,
              extra_callbacks=[_DieAt(after_batch=3)])
    assert os.listdir(os.path.join(run_dir, "backup"))
    exports = str(tmp_path / "exports")
    code, out, err = _export(finished, run_dir, exports, capsys)
    _assert_refused(code, out, err, run_dir, "did not finish")
    assert _published(exports) == []


def test_config_changed_after_the_training_is_refused(finished, tmp_path, capsys):
    """config.yaml edited after the training finished: its checkpoint was not written under it."""
    run_dir = _copy_run(finished, tmp_path)
    raw = finished.cfg.to_dict()
    raw["loss"]["temperature"] = raw["loss"]["temperature"] * 2
    with open(os.path.join(run_dir, "config.yaml"), "w") as fh:
        yaml.safe_dump(raw, fh, sort_keys=False)
    exports = str(tmp_path / "exports")
    code, out, err = _export(finished, run_dir, exports, capsys)
    _assert_refused(code, out, err, run_dir, "not written under")
    assert _published(exports) == []


def test_checkpoint_replaced_after_the_training_is_refused(finished, tmp_path, capsys):
    """checkpoint/ swapped for another one after the training finished (here: the same model
    re-saved without its optimizer's slots, which export restores without complaint, so only the
    record tells the two apart)."""
    import tensorflow as tf

    from export import export_model

    run_dir = _copy_run(finished, tmp_path)
    model, _, _ = export_model.restore_for_export(run_dir)
    shutil.rmtree(os.path.join(run_dir, "checkpoint"))
    tf.train.Checkpoint(model=model).write(os.path.join(run_dir, "checkpoint", "model"))
    exports = str(tmp_path / "exports")
    code, out, err = _export(finished, run_dir, exports, capsys)
    _assert_refused(code, out, err, run_dir, "checkpoint")
    assert "not the one" in err
    assert _published(exports) == []


def test_run_without_record_or_metrics_is_refused(finished, tmp_path, capsys):
    """A folder from before run_state.json whose last training did not finish (no metrics.json:
    training deletes it when it starts and writes it last)."""
    run_dir = _copy_run(finished, tmp_path)
    os.remove(os.path.join(run_dir, "run_state.json"))
    os.remove(os.path.join(run_dir, "metrics.json"))
    exports = str(tmp_path / "exports")
    code, out, err = _export(finished, run_dir, exports, capsys)
    _assert_refused(code, out, err, run_dir, "run_state.json")
    assert "make train" in err
    assert _published(exports) == []


def test_finished_run_exports_with_its_metrics(finished, tmp_path, capsys):
    """The good case still works, and so does a run finished before run_state.json existed
    (metrics.json present: its training finished under this config.yaml)."""
    run_dir = _copy_run(finished, tmp_path)
    exports = str(tmp_path / "exports")
    code, out, err = _export(finished, run_dir, exports, capsys)
    assert code == 0, err[-3000:]
    version_dir = out.strip().splitlines()[-1]
    with open(os.path.join(version_dir, "metadata.json")) as fh:
        meta = json.load(fh)
    with open(os.path.join(run_dir, "metrics.json")) as fh:
        assert meta["training_metrics"] == json.load(fh)
    assert meta["config"]["train"]["learning_rate"] == finished.cfg.train.learning_rate

    legacy = _copy_run(finished, tmp_path, "legacy")
    os.remove(os.path.join(legacy, "run_state.json"))
    code, out, err = _export(finished, legacy, str(tmp_path / "exports_legacy"), capsys)
    assert code == 0, err[-3000:]
    assert "predates run_state.json" in out + err

"""End-to-end training on the tiny synthetic pipeline: outputs, learning, and exact resume."""
import json
import os

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
    # The backup holds the last multiple of steps_per_checkpoint (2) before the kill.
    from micrec_tf.data.artifacts import load_artifacts

    n_train = load_artifacts(cfg.artifacts_dir).feature_spec["num_examples"]["train"]
    steps = int(np.ceil(n_train / cfg.train.batch_size))
    assert steps < 16 < 2 * steps  # the kill lands in the second epoch
    assert consumed_batches(os.path.join(run_dir, "backup"), steps) == 16
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

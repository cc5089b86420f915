"""``micrec_tf.train`` under ``MultiWorkerMirroredStrategy`` (issue 31): two worker processes on
free loopback ports train the tiny pipeline's config through the real CLI (``python -m
micrec_tf.train`` with ``TF_CONFIG``), CPU only.

* **Two workers = one process with the same global batch.** Global batch 256 (128 per worker,
  ``AutoShardPolicy.DATA``: every worker reads the same stream and keeps its half of each global
  batch). The reference is one process training the same config over two replicas
  (``MirroredStrategy`` on two logical CPUs, no ``TF_CONFIG``, no collectives over gRPC): MicRec's
  losses are per replica (each replica draws its own sampled negatives, its generator key hashed
  with the replica id, and the CL tasks contrast within the replica's batch), so a
  single-replica run with batch 256 draws other negatives and is only statistically equivalent.
  Every epoch's losses and validation HIT@N (history.json) and the final checkpoint's weights
  must agree within 1e-6 absolute (float32; measured: 0, bit-identical, since the all-reduce
  of two gradients is one addition either way).
* **Only the chief writes the run folder.** checkpoint/, metrics.json, history.json,
  run_state.json "finished" in the run folder; the other worker's temporary folder (under its
  ``TMPDIR``) is gone.
* **A killed worker fails the other loudly; a restart of both resumes.** SIGKILL of worker 1
  after the first epoch's backup: worker 0 exits with status 1 and one ``error: multi-worker
  training ...`` line (no traceback) once the collective fails (the lost gRPC socket, the
  coordination service's heartbeat or ``train.collective_timeout_s``). Restarting both workers
  resumes from the chief's ``backup/`` (both skip the 13 global batches of epoch 1) and
  finishes with the history (every loss, CL ones included) and final checkpoint of the
  uninterrupted two-worker run (within 1e-6; measured bit-identical). This needs worker 1's
  own sampler states (``backup/sampler_states_worker1.json``): restored from the chief's
  checkpoint alone, the CL losses differed by up to 1.9e-2 (the CL tasks' draws depend on the
  replica's batch, so the workers' generator states drift apart).
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from test_multiworker import _free_ports

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPOCHS = 4
TOL = 1e-6

# Runs micrec_tf.train's CLI; with MIRRORED_REFERENCE=1, over two CPU replicas in one process.
DRIVER = r'''
import os, sys
import micrec_tf  # noqa: F401  (TF_USE_LEGACY_KERAS)
if os.environ.get("MIRRORED_REFERENCE"):
    import tensorflow as tf
    import micrec_tf.train as train_module
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

    def two_replicas(require_gpu=False, log=print, collective_timeout_s=None):
        log("[train] reference: MirroredStrategy over 2 CPU replicas in one process")
        return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]), []

    train_module.select_strategy = two_replicas
from micrec_tf import cli, train
sys.exit(cli.run(train.main))
'''


def _launch(tmp, config, run_dir, log_path, tf_config=None, reference=False, tmpdir=None):
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CONFIG", "MIRRORED_REFERENCE")}
    env.update(PYTHONPATH=ROOT, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1",
               TF_NUM_INTRAOP_THREADS="1", TF_NUM_INTEROP_THREADS="1", TF_CPP_MIN_LOG_LEVEL="1",
               PYTHONUNBUFFERED="1")
    if tf_config is not None:
        env["TF_CONFIG"] = json.dumps(tf_config)
    if reference:
        env["MIRRORED_REFERENCE"] = "1"
    if tmpdir is not None:
        os.makedirs(tmpdir, exist_ok=True)
        env["TMPDIR"] = str(tmpdir)
    driver = os.path.join(tmp, "driver.py")
    if not os.path.exists(driver):
        with open(driver, "w") as fh:
            fh.write(DRIVER)
    out = open(log_path, "w")
    return subprocess.Popen([sys.executable, driver, "--config", config, "--run-dir", run_dir],
                            env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, text=True)


def _two_workers(tmp, config, run_dir, tag):
    """Starts workers 0 and 1 on fresh loopback ports; -> (procs, log paths, TMPDIRs)."""
    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    logs = [os.path.join(tmp, f"{tag}-worker{i}.log") for i in range(2)]
    tmpdirs = [os.path.join(tmp, f"{tag}-tmp{i}") for i in range(2)]
    procs = [_launch(tmp, config, run_dir, logs[i],
                     {"cluster": cluster, "task": {"type": "worker", "index": i}},
                     tmpdir=tmpdirs[i]) for i in range(2)]
    return procs, logs, tmpdirs


def _wait_all(procs, logs, timeout=600):
    for p in procs:
        p.wait(timeout=timeout)
    texts = [open(p).read() for p in logs]
    for p, text in zip(procs, texts):
        assert p.returncode == 0, text[-4000:]
    return texts


def _checkpoint(run_dir) -> dict:
    """Every numeric tensor of ``run_dir/checkpoint`` (model weights, optimizer slots and step,
    the samplers' generator states)."""
    import tensorflow as tf

    reader = tf.train.load_checkpoint(os.path.join(run_dir, "checkpoint", "model"))
    out = {}
    for name in reader.get_variable_to_shape_map():
        value = np.asarray(reader.get_tensor(name))
        if value.dtype.kind in "fiu":
            out[name] = value.astype(np.float64)
    return out


def _assert_same_checkpoint(got: dict, ref: dict):
    assert set(got) == set(ref)
    assert len(ref) > 20  # towers, CL projectors, Adam slots
    for name, value in ref.items():
        np.testing.assert_allclose(got[name], value, rtol=0, atol=TOL, err_msg=name)


@pytest.fixture(scope="module")
def setup(tiny_pipeline, tmp_path_factory):
    """(tmp, config path): the tiny config, 4 epochs, backups every 2 batches, a 60 s collective
    timeout (10 s failed a healthy run on the loaded 2-core CI machine: one worker reached the
    final checkpoint's collective 17 s after the other)."""
    import yaml

    cfg, _ = tiny_pipeline
    tmp = str(tmp_path_factory.mktemp("multiworker_train"))
    cfg = cfg.replace({"train.epochs": EPOCHS, "train.collective_timeout_s": 60})
    config = os.path.join(tmp, "config.yaml")
    with open(config, "w") as fh:
        yaml.safe_dump(cfg.to_dict(), fh, sort_keys=False)
    return tmp, config


@pytest.fixture(scope="module")
def two_worker_run(setup):
    """An uninterrupted two-worker run: (run_dir, worker logs, worker TMPDIRs)."""
    tmp, config = setup
    run_dir = os.path.join(tmp, "runs", "two_workers")
    procs, logs, tmpdirs = _two_workers(tmp, config, run_dir, "full")
    return run_dir, _wait_all(procs, logs), tmpdirs


@pytest.mark.slow
def test_two_workers_match_one_process_and_only_the_chief_writes(setup, two_worker_run):
    tmp, config = setup
    run_dir, texts, tmpdirs = two_worker_run
    assert "MultiWorkerMirroredStrategy: 2 replica(s), task worker:0" in texts[0]
    assert "MultiWorkerMirroredStrategy: 2 replica(s), task worker:1" in texts[1]

    ref_dir = os.path.join(tmp, "runs", "reference")
    ref = _launch(tmp, config, ref_dir, os.path.join(tmp, "reference.log"), reference=True)
    (ref_text,) = _wait_all([ref], [os.path.join(tmp, "reference.log")])
    assert "MirroredStrategy over 2 CPU replicas" in ref_text

    with open(os.path.join(run_dir, "history.json")) as fh:
        got = json.load(fh)
    with open(os.path.join(ref_dir, "history.json")) as fh:
        want = json.load(fh)
    assert [r["epoch"] for r in got] == [r["epoch"] for r in want] == list(range(1, EPOCHS + 1))
    for g, w in zip(got, want):
        assert set(g) == set(w)
        for key in ("loss", "sampled_softmax_loss", "feature_cl_loss", "semantic_cl_loss",
                    "session_cl_loss", "val_hit_at_10", "val_hit_at_50"):
            assert g[key] == pytest.approx(w[key], abs=TOL), (g["epoch"], key)
    assert got[-1]["sampled_softmax_loss"] < got[0]["sampled_softmax_loss"]  # it learns
    _assert_same_checkpoint(_checkpoint(run_dir), _checkpoint(ref_dir))

    # Only the chief wrote the run folder; the other worker's temporary folder is gone.
    for name in ("checkpoint", "metrics.json", "history.json", "config.yaml", "tensorboard"):
        assert os.path.exists(os.path.join(run_dir, name)), name
    with open(os.path.join(run_dir, "run_state.json")) as fh:
        assert json.load(fh)["state"] == "finished"
    with open(os.path.join(run_dir, "metrics.json")) as fh:
        assert "hit@10" in json.load(fh)["valid"]
    (temp,) = re.findall(r"this worker writes its copies to (\S+) \(removed", texts[1])
    assert temp.startswith(tmpdirs[1])
    assert not os.path.exists(os.path.dirname(temp))
    assert os.listdir(tmpdirs[1]) == []
    assert "this worker writes" not in texts[0]
    backup = os.path.join(run_dir, "backup")
    assert not os.path.isdir(backup) or not [n for n in os.listdir(backup) if "workertemp" in n]


@pytest.mark.slow
def test_killed_worker_fails_the_other_and_a_restart_resumes(setup, two_worker_run):
    tmp, config = setup
    uninterrupted_dir = two_worker_run[0]
    run_dir = os.path.join(tmp, "runs", "killed")
    procs, logs, _ = _two_workers(tmp, config, run_dir, "killed")
    deadline = time.time() + 400
    # Kill once the chief backed up epoch 1 (worker 1 saved its own sampler states before).
    states = os.path.join(run_dir, "backup", "sampler_states_worker1.json")
    while "epoch 1 backed up" not in open(logs[0]).read():
        assert time.time() < deadline, "the chief never backed up epoch 1"
        assert all(p.poll() is None for p in procs), [open(p).read()[-3000:] for p in logs]
        time.sleep(0.1)
    procs[1].send_signal(signal.SIGKILL)
    procs[1].wait(timeout=30)
    procs[0].wait(timeout=300)
    text = open(logs[0]).read()
    assert procs[0].returncode == 1, text[-4000:]
    errors = [line for line in text.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, text[-4000:]
    assert errors[0].startswith("error: multi-worker training (worker 0) stopped"), errors
    assert "Restart every worker" in errors[0]
    assert "Traceback" not in text
    assert not os.path.exists(os.path.join(run_dir, "metrics.json"))
    with open(os.path.join(run_dir, "run_state.json")) as fh:
        assert json.load(fh)["state"] == "training"

    # Restart both: they resume from the chief's backup (epoch 1) and finish.
    procs, logs, tmpdirs = _two_workers(tmp, config, run_dir, "restart")
    texts = _wait_all(procs, logs)
    backup = re.escape(os.path.join(run_dir, "backup"))
    skipped = [re.findall(rf"resuming from {backup} at [^:]*epoch 2[^:]*: skipping (\d+) batches",
                          text) for text in texts]
    # Both workers skip the same global batches: epoch 1's 13, or a few more when the kill
    # came after a batch backup of epoch 2 (every 2 batches).
    assert skipped[0] == skipped[1] and len(skipped[0]) == 1, texts[0][-3000:]
    assert 13 <= int(skipped[0][0]) < 26
    with open(os.path.join(run_dir, "run_state.json")) as fh:
        assert json.load(fh)["state"] == "finished"
    assert os.path.exists(os.path.join(run_dir, "metrics.json"))
    with open(os.path.join(run_dir, "history.json")) as fh:
        resumed = json.load(fh)
    with open(os.path.join(uninterrupted_dir, "history.json")) as fh:
        uninterrupted = json.load(fh)
    # The resumed run ends where the uninterrupted one did: every epoch's losses and validation
    # HIT@N, and every weight of the final checkpoint (measured: bit-identical).
    assert [r["epoch"] for r in resumed] == [r["epoch"] for r in uninterrupted] \
        == list(range(1, EPOCHS + 1))
    for r, u in zip(resumed, uninterrupted):
        for key in ("loss", "sampled_softmax_loss", "feature_cl_loss", "semantic_cl_loss",
                    "session_cl_loss", "val_hit_at_10", "val_hit_at_50"):
            assert r[key] == pytest.approx(u[key], abs=TOL), (r["epoch"], key)
    _assert_same_checkpoint(_checkpoint(run_dir), _checkpoint(uninterrupted_dir))
    assert resumed[-1]["loss"] < resumed[0]["loss"]
    assert os.listdir(tmpdirs[1]) == []
    assert not os.path.exists(states)  # removed at the end


def test_collective_timeout_key_defaults_to_none_and_refuses_negatives(tmp_path):
    """``train.collective_timeout_s``: 0.0 by default (no timeout, as before the key); a number
    >= 0; a negative or non-number value is refused naming the key."""
    from micrec_tf.config import ConfigError

    from conftest import tiny_config

    assert tiny_config(str(tmp_path)).train.collective_timeout_s == 0.0
    assert tiny_config(str(tmp_path),
                       train={"collective_timeout_s": 30}).train.collective_timeout_s == 30.0
    for bad in (-1, "soon", True):
        with pytest.raises(ConfigError, match="train.collective_timeout_s"):
            tiny_config(str(tmp_path), train={"collective_timeout_s": bad})


def test_without_tf_config_train_takes_the_single_process_path(monkeypatch):
    """No ``TF_CONFIG``: not multi-worker, task 0, and the chief's value is computed locally
    (no collective): the single-process path of before issue 31."""
    import tensorflow as tf

    from micrec_tf.train import _chief_value, chief_task_id, multiworker_requested

    monkeypatch.delenv("TF_CONFIG", raising=False)
    assert not multiworker_requested()
    monkeypatch.setenv("TF_CONFIG", " ")
    assert not multiworker_requested()
    strategy = tf.distribute.get_strategy()
    assert chief_task_id(strategy) == 0
    assert _chief_value(strategy, lambda: 13) == 13

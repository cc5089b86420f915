"""Export over a small catalogue (exact index), half-published versions, quiet export logs.

One module-scoped run: a synthetic catalogue of a few dozen items, preprocessed and trained for
one epoch in-process (the trained model is the reference), then exported by the real CLI in
subprocesses: once to completion, once SIGKILLed between publishing the version directory and its
TF Serving view.
"""
import gc
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import types

import numpy as np
import pytest
import yaml

import micrec_tf  # noqa: F401  (before tensorflow)

from conftest import tiny_config
from export import export_model, item_index, serving
from export.requests import raw_requests
from micrec_tf.retrieval import Retriever

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_ITEMS = 30  # under item_index.SCANN_MIN_ITEMS: the catalogue that used to crash the export

# Runs the export CLI, but SIGKILLs itself right after the version directory is renamed into
# place: the serving view is never published (a real kill, at exactly that point).
_KILLED_EXPORT = r"""
import os, signal, sys
from export import export_model
from micrec_tf import publish
publish_numbered = publish.publish_numbered
def publish_then_die(*args, **kwargs):
    version = publish_numbered(*args, **kwargs)
    print(f"killed-after-publishing {version}", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
publish.publish_numbered = publish_then_die
sys.exit(export_model.main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    from micrec_tf.data.artifacts import load_artifacts
    from micrec_tf.train import train
    from pipelines import preprocess

    tmp = str(tmp_path_factory.mktemp("small_catalogue"))
    cfg = tiny_config(tmp, data={"synthetic": {"num_users": 60, "num_items": NUM_ITEMS,
                                               "num_events": 1200, "num_topics": 4, "seed": 3}},
                      preprocess={"num_shards": 1}, model={"cl": ["feature"]},
                      loss={"num_negatives": 16, "num_cl_negatives": 8},
                      train={"epochs": 1})
    preprocess.run(cfg, verbose=False)
    result = train(cfg, evaluate_test=False, log=lambda *a: None)
    cfg_path = os.path.join(tmp, "small.yaml")
    with open(cfg_path, "w") as fh:
        yaml.safe_dump(cfg.to_dict(), fh)
    art = load_artifacts(cfg.artifacts_dir)
    assert len(art.vocabs["item_id"]) < item_index.SCANN_MIN_ITEMS
    return types.SimpleNamespace(tmp=tmp, cfg=cfg, cfg_path=cfg_path, model=result["model"],
                                 art=art)


def _export_cli(small, exports_dir, script=None, timeout=300):
    """The export CLI in a fresh process with the default (quiet) logs, writing under
    ``exports_dir/<name>``; ``CompletedProcess``."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("MICREC_VERBOSE", "MICREC_DEBUG", "TF_CPP_MIN_LOG_LEVEL")}
    head = [sys.executable, "-c", script] if script else [sys.executable, "-m",
                                                         "export.export_model"]
    return subprocess.run(head + ["--config", small.cfg_path,
                                  "--set", f"export.exports_dir={exports_dir}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def _test_requests(small, n=6):
    """``(requests, integer features)`` of the first test examples: raw strings for the export,
    the same examples' integer features for the in-memory trained model."""
    from micrec_tf.evaluation.data import load_split_arrays

    feats = ["hist_items", "hist_len"] + [f"user_{f}" for f in small.art.user_fields]
    arrays = load_split_arrays(small.art.path, "test", feats)
    rows = np.arange(min(n, len(arrays["hist_len"])))
    return (raw_requests(arrays, rows, small.art.vocabs, small.art.user_fields),
            export_model.user_features(arrays, rows, small.art))


def _same_files(a, b):
    for rel in ("saved_model.pb", "variables/variables.index"):
        with open(os.path.join(a, rel), "rb") as fa, open(os.path.join(b, rel), "rb") as fb:
            assert fa.read() == fb.read(), rel


def test_export_cli_small_catalogue_is_quiet_exact_and_trained(small, tmp_path):
    proc = _export_cli(small, tmp_path)
    root = os.path.join(tmp_path, small.cfg.name)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    # Item 11: no checkpoint-restore warnings (the optimizer's slots), no warning lines at all.
    assert "Value in checkpoint could not be found" not in out
    assert not [line for line in out.splitlines() if "WARNING" in line], out[-3000:]
    assert "Traceback" not in out
    # Item 4: the export says which index it built and why.
    n = len(small.art.vocabs["item_id"])
    assert f"[export] index: brute_force over {n} items ({n} items are fewer than the 256" in out
    version_dir = proc.stdout.strip().splitlines()[-1]
    meta = json.load(open(os.path.join(version_dir, "metadata.json")))
    assert meta["index"]["kind"] == "brute_force" and meta["index"]["requested"] == "scann"
    assert not os.path.exists(os.path.join(version_dir, "scann"))
    _same_files(os.path.join(root, "serving", os.path.basename(version_dir)),
                os.path.join(version_dir, "user_tower"))
    # Retrieval from the export = an exact numpy ranking of the trained model's vectors.
    r = Retriever.load(root)
    assert r.version_dir == version_dir and r.index_kind == "brute_force"
    requests, feats = _test_requests(small)
    user = np.asarray(small.model.user_embeddings(feats), np.float32)
    items = np.asarray(small.model.item_embeddings(np.arange(1, n + 1)), np.float32)
    np.testing.assert_allclose(r.user_vectors(requests), user, atol=1e-5)  # trained weights
    np.testing.assert_allclose(r.vectors, items, atol=1e-5)
    k = n + 2
    ids, scores = r.retrieve(requests, k=k)
    want = np.argsort(-(user.astype(np.float64) @ items.astype(np.float64).T), axis=1,
                      kind="stable")
    np.testing.assert_array_equal(ids[:, :n], np.asarray(r.ids, dtype=object)[want])
    assert np.all(ids[:, n:] == "") and np.all(np.isneginf(scores[:, n:]))


def test_restore_reads_trained_weights_without_warnings(small):
    """Item 11: the restore says nothing about the optimizer's unused slots, and still refuses a
    checkpoint that lacks a weight of the model (it would export fresh initial values)."""
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    tf_logger = logging.getLogger("tensorflow")
    level = tf_logger.level
    tf_logger.addHandler(handler)
    tf_logger.setLevel(logging.WARNING)
    try:
        model, _, art = export_model.restore_for_export(small.cfg.run_dir)
        feats = _test_requests(small)[1]
        np.testing.assert_allclose(np.asarray(model.user_embeddings(feats)),
                                   np.asarray(small.model.user_embeddings(feats)), atol=1e-5)
        del model
        gc.collect()  # a checkpoint status warns about unused values when it is collected
    finally:
        tf_logger.removeHandler(handler)
        tf_logger.setLevel(level)
    assert not [r.getMessage() for r in records if "checkpoint" in r.getMessage().lower()]
    # A run whose config describes one more user-tower layer than its checkpoint holds.
    other = os.path.join(small.tmp, "runs", "wider")
    os.makedirs(other)
    raw = yaml.safe_load(open(os.path.join(small.cfg.run_dir, "config.yaml")))
    raw["model"]["user_mlp_units"] = list(raw["model"]["user_mlp_units"]) + [16]
    with open(os.path.join(other, "config.yaml"), "w") as fh:
        yaml.safe_dump(raw, fh)
    os.symlink(os.path.join(small.cfg.run_dir, "checkpoint"), os.path.join(other, "checkpoint"))
    with pytest.raises(RuntimeError, match="lacks weights of the model .*not exporting fresh"):
        export_model.restore_for_export(other)


def test_export_killed_between_version_and_serving_view_is_repaired(small, tmp_path, capfd):
    """Item 8: SIGKILL after the version rename, before serving/<version>; the next retrieval
    start-up and the next export both publish the missing serving view."""
    proc = _export_cli(small, tmp_path, script=_KILLED_EXPORT)
    root = os.path.join(tmp_path, small.cfg.name)
    assert proc.returncode == -signal.SIGKILL, proc.stdout[-2000:] + proc.stderr[-3000:]
    version = int(proc.stdout.split("killed-after-publishing ")[1].split()[0])
    # The half-published state: retrieval would use `version`, TF Serving has nothing of it.
    assert serving.published_versions(root) == [version]
    assert not os.path.exists(os.path.join(root, "serving", str(version)))
    capfd.readouterr()

    r = Retriever.load(root)
    assert r.version_dir == os.path.join(root, str(version))
    assert f"repaired half-published version {version}" in capfd.readouterr().err
    _same_files(os.path.join(root, "serving", str(version)),
                os.path.join(root, str(version), "user_tower"))
    assert [d for d in os.listdir(os.path.join(root, "serving"))] == [str(version)]
    assert Retriever.load(root).version_dir == r.version_dir  # nothing more to repair

    # The same state again (serving view gone): the next export repairs it before its own.
    shutil.rmtree(os.path.join(root, "serving", str(version)))
    logs = []
    new_dir = export_model.export_model(small.model, small.cfg, small.art, export_root=root,
                                        log=logs.append)
    new = int(os.path.basename(new_dir))
    assert any(f"repaired half-published version {version}" in line for line in logs)
    assert serving.published_versions(root) == [version, new]
    assert sorted(os.listdir(os.path.join(root, "serving"))) == sorted([str(version), str(new)])
    for v in (version, new):
        _same_files(os.path.join(root, "serving", str(v)), os.path.join(root, str(v), "user_tower"))
    assert not [d for d in os.listdir(root) if d.startswith(".")]

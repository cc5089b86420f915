"""The daily update (micrec_tf/update.py, issue 29): preprocess a window growing the previous
artifacts, warm-started training, export of a new numbered version.

Set-up: the tiny synthetic clicks split by time at their median timestamp: the initial part
(before it) without 10 held items (the items with the most clicks after it), and the window
(from it on) with every item. The initial model is preprocessed (with session tails), trained
one epoch and exported (brute-force index, top 20); each test updates from that version.

References are plain reads of the files (vocabulary lines, the item file, the export's ids),
a numpy brute force over the exported item vectors, and the published version numbers.
"""
from __future__ import annotations

import collections
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml

from tests.conftest import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HELD = 10
TOP_K = 20


def _read_tsv(path):
    with open(path, encoding="utf-8") as fh:
        lines = fh.readlines()
    return lines[0], lines[1:]


def _write(path, header, lines):
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(header)
        fh.writelines(lines)


def _vocab(art, name="item_id"):
    with open(os.path.join(art, "vocab", f"{name}.txt"), encoding="utf-8") as fh:
        return fh.read().split("\n")[:-1]


def _split(data_dir, initial, window):
    """Writes the initial part and the window (module doc); returns the held raw item ids."""
    head, clicks = _read_tsv(os.path.join(data_dir, "interactions.tsv"))
    times = sorted(int(ln.rstrip("\n").split("\t")[2]) for ln in clicks)
    cut = times[len(times) // 2]
    after = collections.Counter(ln.split("\t")[1] for ln in clicks
                                if int(ln.rstrip("\n").split("\t")[2]) >= cut)
    held = {i for i, _ in sorted(after.items(), key=lambda kv: (-kv[1], kv[0]))[:HELD]}
    os.makedirs(initial)
    os.makedirs(window)
    _write(os.path.join(initial, "interactions.tsv"), head,
           [ln for ln in clicks if int(ln.rstrip("\n").split("\t")[2]) < cut
            and ln.split("\t")[1] not in held])
    _write(os.path.join(window, "interactions.tsv"), head,
           [ln for ln in clicks if int(ln.rstrip("\n").split("\t")[2]) >= cut])
    ihead, items = _read_tsv(os.path.join(data_dir, "items.tsv"))
    _write(os.path.join(initial, "items.tsv"), ihead,
           [ln for ln in items if ln.split("\t")[0] not in held])
    shutil.copy(os.path.join(data_dir, "items.tsv"), os.path.join(window, "items.tsv"))
    for d in (initial, window):
        shutil.copy(os.path.join(data_dir, "users.tsv"), os.path.join(d, "users.tsv"))
    return held


def _own_root(base, v0_dir, tmp_path, **overrides):
    """``base`` with its own artifacts root and export root under ``tmp_path``, the latter
    serving a copy of the initial version ``v0_dir`` (so a test may update and prune freely)."""
    cfg = base.replace({"artifacts_root": str(tmp_path / "artifacts"),
                        "export.exports_dir": str(tmp_path / "exports"), **overrides})
    os.makedirs(cfg.export_dir)
    shutil.copytree(v0_dir, os.path.join(cfg.export_dir, os.path.basename(v0_dir)))
    return cfg


def _window_folder(path, head, lines, window):
    """A window folder ``path``: the click lines given, the item and user files of ``window``."""
    os.makedirs(path)
    _write(os.path.join(path, "interactions.tsv"), head, lines)
    for name in ("items.tsv", "users.tsv"):
        shutil.copy(os.path.join(window, name), os.path.join(path, name))
    return str(path)


@pytest.fixture(scope="module")
def initial(tmp_path_factory):
    """(cfg, window dir, held ids, initial version dir): the first model, trained and exported."""
    from export.export_model import export_run
    from micrec_tf.data.synthetic import ensure_generated
    from micrec_tf.train import train
    from pipelines import preprocess, title_neighbours

    tmp = str(tmp_path_factory.mktemp("update"))
    raw = ensure_generated(tiny_config(tmp))
    held = _split(raw, os.path.join(tmp, "initial"), os.path.join(tmp, "window"))
    cfg = tiny_config(tmp, data={"dataset": "canonical",
                                 "data_dir": os.path.join(tmp, "initial")},
                      preprocess={"session_tails": True}, train={"epochs": 1},
                      export={"index": "brute_force", "top_k": TOP_K})
    preprocess.run(cfg, verbose=False)
    title_neighbours.run(cfg, verbose=False)
    train(cfg, evaluate_test=False, log=lambda *a: None)
    version_dir = export_run(cfg, log=lambda *a: None)
    return cfg, os.path.join(tmp, "window"), held, version_dir


def _best_query(vectors, n):
    """``(q, t)``: the query q in [-1, 1]^D maximising item ``n``'s least score margin t over
    every other row of ``vectors`` (scipy's linprog)."""
    from scipy.optimize import linprog

    v = vectors.astype(np.float64)
    dim = v.shape[1]
    a = np.delete(np.hstack([v - v[n], np.ones((len(v), 1))]), n, axis=0)
    res = linprog(np.r_[np.zeros(dim), -1.0], A_ub=a, b_ub=np.zeros(len(a)),
                  bounds=[(-1, 1)] * dim + [(None, None)])
    assert res.success, res.message
    return res.x[:dim].astype(np.float32), float(-res.fun)


def _user(retriever, history):
    vocabs = retriever.vocabularies()
    req = {f: vocabs[f"user_{f}"][0] for f in retriever.user_fields}
    req["history"] = list(history)
    return req


@pytest.mark.slow
def test_a_new_item_is_retrievable_after_one_update(initial):
    from export import serving
    from micrec_tf.retrieval import Retriever
    from micrec_tf.update import run_update, update_root

    cfg, window, held, v0_dir = initial
    v0 = int(os.path.basename(v0_dir))
    old_ids = _vocab(cfg.artifacts_dir)
    lines = []
    record = run_update(cfg, window, log=lines.append)

    # The newest version is the update's, with its TF Serving view.
    assert serving.published_versions(cfg.export_dir)[-1] == record["version"] > v0
    assert os.path.isdir(os.path.join(cfg.export_dir, "serving", str(record["version"])))
    with open(os.path.join(update_root(cfg), "state.json"), encoding="utf-8") as fh:
        assert json.load(fh)["version"] == record["version"]
    assert record["previous"]["version"] == v0 and record["generation"] == 1
    # The initial artifacts hold session tails: the table grew (pipelines/cooccurrence.py).
    assert record["cooccurrence"] == "grown"
    with open(os.path.join(record["artifacts_dir"], "cooccurrence", "session_state.json")) as fh:
        assert json.load(fh)["updates"] == 1

    # Old items keep their indices; new lines follow (items first clicked in the training part
    # of the window, the held ones among them: they were not in the initial item file).
    new_ids = _vocab(record["artifacts_dir"])
    assert new_ids[:len(old_ids)] == old_ids
    appended = new_ids[len(old_ids):]
    assert len(set(new_ids)) == len(new_ids)
    assert record["rows_added"]["item_id"] == len(appended)
    new_items = [i for i in appended if i in held]
    assert new_items
    _, window_clicks = _read_tsv(os.path.join(window, "interactions.tsv"))
    assert sum(record["window_clicks"].values()) == len(window_clicks)
    assert any(line.startswith("[update] rows added: ") and f"item_id +{len(appended)}" in line
               for line in lines)
    assert any(line.startswith("[update] time: ") and "total" in line for line in lines)

    r = Retriever.load(cfg.export_dir)
    assert r.metadata["version"] == record["version"]
    assert list(r.ids) == new_ids  # the exported index, in vocabulary order
    # Retrievable: for each new item, a query on which it scores above every other exported
    # vector, found by a linear program over the exported vectors (maximise t subject to
    # (v_j - v_new) . q + t <= 0 for every other j, q in [-1, 1]^D); the retriever returns the
    # item first for that query. A point inside the vectors' hull has no such query (t <= 0).
    retrievable = []
    for item in new_items:
        n = new_ids.index(item)
        q, margin = _best_query(r.vectors, n)
        if margin > 1e-5:
            ids, _ = r.search(q[None], k=1)
            assert ids[0][0] == item
            retrievable.append(item)
    assert retrievable
    # The served user tower knows the new ids: a history of a new item is not an unknown one.
    known = r.user_vectors([_user(r, [new_items[0]])])
    unknown = r.user_vectors([_user(r, ["<no such item>"])])
    assert not np.allclose(known, unknown, atol=1e-6)


def _wait_for(path, proc, timeout_s=600):
    start = time.monotonic()
    while not os.path.exists(path):
        if proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise AssertionError(f"the update ended (rc {proc.returncode}) before {path} "
                                 f"appeared:\n{out[-3000:]}")
        if time.monotonic() - start > timeout_s:
            raise AssertionError(f"{path} did not appear in {timeout_s} s")
        time.sleep(0.02)


@pytest.mark.slow
def test_sigkill_during_training_leaves_the_previous_version_serving(initial, tmp_path):
    from export import serving
    from micrec_tf.retrieval import Retriever
    from micrec_tf.update import generation_dir, run_update, update_root

    base, window, _, v0_dir = initial
    v0 = int(os.path.basename(v0_dir))
    # Its own export root and update folder, serving a copy of the initial version.
    cfg = _own_root(base, v0_dir, tmp_path)
    assert Retriever.load(cfg.export_dir).metadata["version"] == v0
    config_path = str(tmp_path / "config.yaml")
    with open(config_path, "w", encoding="utf-8") as fh:
        yaml.safe_dump(cfg.to_dict(), fh)

    gen = generation_dir(cfg, 1)
    proc = subprocess.Popen([sys.executable, "-m", "micrec_tf.update", "--config", config_path,
                             "--window", window], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        _wait_for(os.path.join(gen, "run", "config.yaml"), proc)  # training has started
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert os.path.isdir(gen)  # the killed update's leftovers

    # Nothing was published: the previous version serves, as it was.
    assert serving.published_versions(cfg.export_dir) == [v0]
    assert serving.served_versions(cfg.export_dir) == [v0]
    r = Retriever.load(cfg.export_dir)
    assert r.metadata["version"] == v0 and r.version_dir == os.path.join(cfg.export_dir, str(v0))
    assert not os.path.exists(os.path.join(update_root(cfg), "state.json"))

    # The next update removes the leftovers and publishes the next version.
    lines = []
    record = run_update(cfg, window, log=lines.append)
    assert any(line.startswith(f"[update] removing {gen}") for line in lines)
    assert record["generation"] == 1 and record["previous"]["version"] == v0
    assert serving.published_versions(cfg.export_dir) == [v0, record["version"]]
    assert Retriever.load(cfg.export_dir).metadata["version"] == record["version"]
    assert not [d for d in os.listdir(cfg.export_dir) if d.startswith(".tmp-")]


def test_refusals_are_one_line(tmp_path, capsys):
    """Fast: no window folder, then no published version: one ``error:`` line, exit 2, and
    nothing written under the export root."""
    from micrec_tf import cli
    from micrec_tf.update import main

    cfg = tiny_config(str(tmp_path))
    path = str(tmp_path / "config.yaml")
    with open(path, "w", encoding="utf-8") as fh:
        yaml.safe_dump(cfg.to_dict(), fh)
    missing = str(tmp_path / "no-window")
    assert cli.run(main, ["--config", path, "--window", missing]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --window") and missing in err[0]
    window = tmp_path / "window"
    window.mkdir()
    assert cli.run(main, ["--config", path, "--window", str(window)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no published version under" in err[0]
    assert not os.path.exists(cfg.export_dir)


def test_previous_state_reads_the_newest_version_and_its_generation(tmp_path):
    """Fast, on hand-written export metadata and lineage.json: the newest all-digit version
    with a metadata.json is the previous state; generation = lineage's (0 without one)."""
    from micrec_tf.update import UpdateError, generation_dir, previous_state

    cfg = tiny_config(str(tmp_path))
    run, art = tmp_path / "run", tmp_path / "art"
    run.mkdir()
    art.mkdir()
    for v in (5, 7):
        os.makedirs(os.path.join(cfg.export_dir, str(v)))
        with open(os.path.join(cfg.export_dir, str(v), "metadata.json"), "w") as fh:
            json.dump({"version": v, "run_dir": str(run), "artifacts_dir_abs": str(art)}, fh)
    os.makedirs(os.path.join(cfg.export_dir, ".tmp-9-1-ab"))  # a killed export: not a version
    state = previous_state(cfg)
    assert state["version"] == 7 and state["generation"] == 0
    assert state["version_dir"] == os.path.abspath(os.path.join(cfg.export_dir, "7"))
    (art / "lineage.json").write_text(json.dumps({"generation": 3}))
    assert previous_state(cfg, os.path.join(cfg.export_dir, "5"))["generation"] == 3
    assert generation_dir(cfg, 4).endswith(os.path.join("tiny-updates", "gen-0004"))
    shutil.rmtree(run)
    with pytest.raises(UpdateError, match="run_dir .* is gone"):
        previous_state(cfg)


@pytest.mark.slow
def test_killed_after_the_export_the_next_update_grows_from_the_new_version(initial, tmp_path,
                                                                           monkeypatch):
    """The export's rename is the publish point: an update that dies after it (here: the
    record write fails) has published a complete version, and the next update grows from that
    version (generation 2), keeping generation 1's folders, which it uses."""
    from export import serving
    from micrec_tf import update
    from micrec_tf.retrieval import Retriever

    base, window, _, v0_dir = initial
    v0 = int(os.path.basename(v0_dir))
    cfg = _own_root(base, v0_dir, tmp_path)

    # Two consecutive windows (the tails refuse a window earlier than the previous one).
    head, clicks = _read_tsv(os.path.join(window, "interactions.tsv"))
    cut = sorted(int(ln.rstrip("\n").split("\t")[2]) for ln in clicks)[len(clicks) // 2]
    windows = [str(tmp_path / "w1"), str(tmp_path / "w2")]
    for w, keep in zip(windows, (lambda t: t < cut, lambda t: t >= cut)):
        _window_folder(w, head, [ln for ln in clicks
                                 if keep(int(ln.rstrip("\n").split("\t")[2]))], window)

    def die(path, obj):
        raise OSError("killed before the record")

    with monkeypatch.context() as mp:
        mp.setattr(update, "_write_json_atomic", die)
        with pytest.raises(OSError, match="killed before the record"):
            update.run_update(cfg, windows[0], log=lambda *a: None)
    v1 = serving.published_versions(cfg.export_dir)[-1]
    assert v1 > v0 and Retriever.load(cfg.export_dir).metadata["version"] == v1
    assert not os.path.exists(os.path.join(update.update_root(cfg), "state.json"))

    record = update.run_update(cfg, windows[1], log=lambda *a: None)
    assert record["previous"]["version"] == v1 and record["generation"] == 2
    assert os.path.isdir(update.generation_dir(cfg, 1))  # the run version v1 was made from
    assert serving.published_versions(cfg.export_dir) == [v0, v1, record["version"]]


@pytest.mark.slow
def test_a_window_without_clicks_publishes_the_previous_model_unchanged(initial, tmp_path):
    """A day without clicks (the click file holds its header only): the update preprocesses
    the empty window, restores the previous model without a training step and publishes a new
    version whose vectors are the previous version's; metrics.json reports no validation metric
    (there is no validation click) instead of failing."""
    from export import serving
    from micrec_tf import update
    from micrec_tf.retrieval import Retriever

    base, window, _, v0_dir = initial
    v0 = int(os.path.basename(v0_dir))
    cfg = _own_root(base, v0_dir, tmp_path)
    head, _ = _read_tsv(os.path.join(window, "interactions.tsv"))
    empty = _window_folder(tmp_path / "empty", head, [], window)

    lines = []
    record = update.run_update(cfg, empty, log=lines.append)
    assert record["window_clicks"] == {"train": 0, "valid": 0, "test": 0}
    assert record["examples"] == {"train": 0, "valid": 0, "test": 0}
    assert record["epochs_run"] == 0
    assert "[train] warm start on a window without training examples: no training step" in lines
    assert "[train] valid: no examples, no metrics" in lines
    with open(os.path.join(record["run_dir"], "metrics.json"), encoding="utf-8") as fh:
        assert json.load(fh)["valid"] == {"num_examples": 0}
    assert serving.published_versions(cfg.export_dir) == [v0, record["version"]]
    before = Retriever.load(cfg.export_dir, version=v0)
    after = Retriever.load(cfg.export_dir)
    assert after.metadata["version"] == record["version"] > v0
    assert list(after.ids) == list(before.ids)
    np.testing.assert_allclose(after.vectors, before.vectors, rtol=0, atol=1e-6)
    history = [list(before.ids)[1], list(before.ids)[2]]
    np.testing.assert_allclose(after.user_vectors([_user(after, history)]),
                               before.user_vectors([_user(before, history)]), rtol=0, atol=1e-6)


@pytest.mark.slow
def test_keep_versions_removes_old_versions_and_their_generations(initial, tmp_path):
    """export.keep_versions 2 over three daily updates: after each, the newest two versions
    stay (with their TF Serving views); a generation folder goes once no kept version uses it;
    the from-scratch run and artifacts (generation 0) stay; the newest version serves and the
    next update grows from it."""
    from export import serving
    from micrec_tf import update
    from micrec_tf.retrieval import Retriever

    base, window, _, v0_dir = initial
    v0 = int(os.path.basename(v0_dir))
    cfg = _own_root(base, v0_dir, tmp_path, **{"export.keep_versions": 2})
    head, clicks = _read_tsv(os.path.join(window, "interactions.tsv"))
    times = sorted(int(ln.rstrip("\n").split("\t")[2]) for ln in clicks)
    cuts = [times[0], times[len(times) // 3], times[2 * len(times) // 3], times[-1] + 1]
    windows = [_window_folder(tmp_path / f"w{n + 1}", head, [
        ln for ln in clicks if cuts[n] <= int(ln.rstrip("\n").split("\t")[2]) < cuts[n + 1]],
        window) for n in range(3)]

    root = update.update_root(cfg)
    versions = [v0]
    for n, w in enumerate(windows, start=1):
        lines = []
        record = update.run_update(cfg, w, log=lines.append)
        versions.append(record["version"])
        assert record["previous"]["version"] == versions[-2] and record["generation"] == n
        assert serving.published_versions(cfg.export_dir) == versions[-2:]
        assert sorted(os.listdir(os.path.join(cfg.export_dir, "serving"))) == [
            str(v) for v in versions[-2:]]
        assert Retriever.load(cfg.export_dir).metadata["version"] == versions[-1]
        # Generations 1..n exist up to here; the oldest kept version (n - 1) uses generation
        # n - 1 (none for n = 1: it is the from-scratch version), so generation n - 2 goes.
        kept = [f"gen-{g:04d}" for g in range(max(1, n - 1), n + 1)]
        assert sorted(d for d in os.listdir(root) if d.startswith("gen-")) == kept
        expected = [f"gen-{n - 2:04d}"] if n >= 3 else []
        assert record["generations_removed"] == expected
        if n >= 2:
            assert any(line.startswith(f"[export] removed 1 old version(s) [{versions[-3]}]")
                       for line in lines)
    assert os.path.isdir(base.run_dir) and os.path.isdir(base.artifacts_dir)


@pytest.mark.slow
def test_two_days_of_one_growing_log(initial, tmp_path):
    """``--since/--until`` over one click log: two consecutive updates read the same folder, each
    only its half-open time range (counted against a plain-Python filter of the file), and the
    second grows from the first."""
    from micrec_tf import update

    base, window, _, v0_dir = initial
    cfg = _own_root(base, v0_dir, tmp_path)
    _, clicks = _read_tsv(os.path.join(window, "interactions.tsv"))
    times = [int(ln.rstrip("\n").split("\t")[2]) for ln in clicks]
    cut = sorted(times)[len(times) // 2]
    ranges = [[min(times), cut], [cut, max(times) + 1]]
    records = []
    for since, until in ranges:
        lines = []
        records.append(update.run_update(cfg, window, log=lines.append,
                                         time_range=[since, until]))
        inside = sum(since <= t < until for t in times)
        assert sum(records[-1]["window_clicks"].values()) == inside
        assert records[-1]["clicks_outside_time_range"] == len(times) - inside
        assert records[-1]["time_range"] == [since, until]
        assert any(f"time range [{since}, {until}) ({len(times) - inside} clicks outside)" in ln
                   for ln in lines if ln.startswith("[update] window clicks"))
    assert records[1]["previous"]["version"] == records[0]["version"]
    assert records[1]["generation"] == 2

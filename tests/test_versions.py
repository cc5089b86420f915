"""export/versions.py (issue 30): load + warm the newest complete version, hot-swap newer ones,
release old ones when their last request ends, refuse broken ones, never write the export tree.

Two kinds of tests:

* fast ones on a hand-made tree (``<root>/<v>/metadata.json`` + ``serving/<v>/``) with an
  injected ``load_fn`` that reads a ``value.txt`` per version: the references are the files the
  test wrote (which version must answer, which one must be refused);
* slow ones on a real tiny export (preprocess + one epoch + the real export, module fixture),
  where a second version is published by copying the first with negated item vectors (one
  rename, as the export does) so the two versions' answers differ; the reference answers are a
  brute-force numpy top-k over each version's own ``embeddings.npy`` with user vectors from a
  separately loaded SavedModel.

Read-only trees: the tests run as root here, where ``chmod -w`` stops nothing, so besides the real
``chmod`` the read-only test (a) makes every Python-level write under the tree fail (open for
writing, mkdir, rename, link, remove) and (b) compares an os-level snapshot of the tree
(``lstat`` size, mtime_ns and ctime_ns of every entry, and the entry list) before and after;
TensorFlow's and ScaNN's own C++ file access is covered by (b) only.
"""
from __future__ import annotations

import builtins
import errno
import gc
import json
import os
import shutil
import stat
import threading
import time
import types
import weakref

import numpy as np
import pytest

from export import versions
from export.versions import LoadedVersion, NoLoadableVersionError, VersionManager


def _wait_for(cond, what, limit_s=120.0):
    """Polls ``cond()`` until true; fails naming ``what`` after ``limit_s`` (a hang guard, not a
    timing assertion)."""
    end = time.monotonic() + limit_s
    while not cond():
        if time.monotonic() > end:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)


# ----------------------------------------------------------------------------- fake tree
def _publish_fake(root, version, value="", serving_view=True, loadable=True):
    """A version folder published with one rename (metadata.json + value.txt), then its serving
    view (like the export). ``loadable=False`` leaves value.txt out (the fake load fails)."""
    tmp = os.path.join(root, f".tmp-{version}")
    os.makedirs(tmp)
    with open(os.path.join(tmp, "metadata.json"), "w") as fh:
        json.dump({"version": version}, fh)
    if loadable:
        with open(os.path.join(tmp, "value.txt"), "w") as fh:
            fh.write(value or f"value-{version}")
    os.rename(tmp, os.path.join(root, str(version)))
    if serving_view:
        os.makedirs(os.path.join(root, "serving", str(version)))


class _FakeRetriever:
    """What LoadedVersion reads of a Retriever, plus the version's value (weak-referenceable)."""

    def __init__(self, value):
        self.signature_fn, self.specs, self.value = f"fn-{value}", {"history": None}, value


def _fake_load(path):
    with open(os.path.join(path, "value.txt")) as fh:
        value = fh.read()
    retriever = _FakeRetriever(value)
    return LoadedVersion(int(os.path.basename(path)), path, retriever)


def _manager(root, logs=None, **kw):
    kw.setdefault("load_fn", _fake_load)
    kw.setdefault("warmup_fn", lambda v: None)
    return VersionManager(str(root), log=(logs.append if logs is not None else lambda m: None),
                          **kw)


@pytest.fixture
def root(tmp_path):
    r = tmp_path / "exports" / "tiny"
    (r / "serving").mkdir(parents=True)
    return r


@pytest.mark.parametrize("poll_s", [0, -1.0, "10", True, None])
def test_poll_s_is_validated(root, poll_s):
    with pytest.raises(ValueError, match=r"poll_s must be a number > 0\. Received: poll_s="):
        VersionManager(str(root), poll_s=poll_s)


def test_start_without_a_version_is_one_line(root):
    m = _manager(root)
    with pytest.raises(NoLoadableVersionError) as info:
        m.start()
    assert "\n" not in str(info.value) and "no complete export version" in str(info.value)
    assert not m.ready and m.status()["state"] == "END"


def test_start_serves_newest_complete_version_and_falls_back_past_broken_ones(root):
    """Candidates: published versions with a serving view (6 is half-published); the newest
    (5) fails to load, so 3 serves and 5 is refused with its reason; 1 and 2 are never loaded."""
    loaded = []
    for v in (1, 2, 3):
        _publish_fake(root, v)
    _publish_fake(root, 5, loadable=False)
    _publish_fake(root, 6, serving_view=False)

    def load(path):
        loaded.append(int(os.path.basename(path)))
        return _fake_load(path)

    logs = []
    m = _manager(root, logs, load_fn=load, poll_s=3600)
    v = m.start()
    try:
        assert (v.version, v.retriever.value, v.user_tower) == (3, "value-3", "fn-value-3")
        assert loaded == [5, 3]
        st = m.status()
        assert st["version"] == 3 and st["state"] == "AVAILABLE" and m.ready
        assert list(st["refused"]) == [5] and "FileNotFoundError" in st["refused"][5]
        assert sum("refused version 5" in line for line in logs) == 1
        assert not os.path.exists(root / "serving" / "6")  # nothing repaired (no writes)
    finally:
        m.stop()


def test_start_with_only_broken_versions_names_them(root):
    _publish_fake(root, 7, loadable=False)
    _publish_fake(root, 8, loadable=False)
    m = _manager(root)
    with pytest.raises(NoLoadableVersionError) as info:
        m.start()
    msg = str(info.value)
    assert "\n" not in msg and "refused 8, 7" in msg and "version 8: FileNotFoundError" in msg


def test_warmup_failure_refuses_the_version(root):
    _publish_fake(root, 1)
    _publish_fake(root, 2)

    def warm(v):
        if v.version == 2:
            raise ValueError("user tower returned non-finite values\nsecond line")

    m = _manager(root, warmup_fn=warm, poll_s=3600)
    assert m.start().version == 1
    assert m.status()["refused"] == {2: "ValueError: user tower returned non-finite values"}
    m.stop()


def test_held_request_keeps_the_old_version_until_it_ends(root):
    """A request holding version 1 across the swap keeps version 1's objects (not released)
    and new requests get version 2; version 1 is released when the held block ends."""
    _publish_fake(root, 1)
    logs = []
    m = _manager(root, logs, poll_s=3600)
    m.start()
    with m.acquire() as old:
        alive = weakref.ref(old.retriever)
        _publish_fake(root, 2)
        assert m.poll_once() == 2
        with m.acquire() as new:
            assert (new.version, new.retriever.value) == (2, "value-2")
        assert (old.version, old.retriever.value, old.released) == (1, "value-1", False)
        assert not any("released version 1" in line for line in logs)
    assert old.released and old.retriever is None and old.user_tower is None
    gc.collect()
    assert alive() is None
    assert sum("released version 1" in line for line in logs) == 1
    assert m.status()["version"] == 2
    m.stop()
    assert not m.ready and m.status() == {"version": None, "state": "END", "refused": {}}
    with pytest.raises(RuntimeError, match="no version is serving"):
        with m.acquire():
            pass


def test_unheld_old_version_is_released_at_the_swap(root):
    _publish_fake(root, 1)
    m = _manager(root, poll_s=3600)
    first = m.start()
    _publish_fake(root, 2)
    m.poll_once()
    assert first.released and m.version == 2
    m.stop()


def test_background_poll_swaps_and_refuses_once(root):
    """poll_s short: a newer good version is picked up by the thread; a broken newer one is
    refused once (one log line over many polls) while the good one keeps serving."""
    _publish_fake(root, 1)
    logs = []
    m = _manager(root, logs, poll_s=0.01)
    m.start()
    try:
        _publish_fake(root, 2)
        _wait_for(lambda: m.version == 2, "the swap to version 2")
        _publish_fake(root, 3, loadable=False)
        _wait_for(lambda: 3 in m.status()["refused"], "version 3 refused")
        polls = [0]
        real = m.candidates
        m.candidates = lambda: (polls.__setitem__(0, polls[0] + 1), real())[1]
        _wait_for(lambda: polls[0] >= 5, "five more polls")
        assert m.version == 2
        assert sum("refused version 3" in line for line in logs) == 1
        with m.acquire() as v:
            assert v.retriever.value == "value-2"
        _publish_fake(root, 4)
        _wait_for(lambda: m.version == 4, "the swap to version 4 past the refused 3")
    finally:
        m.stop()


def test_newest_broken_falls_back_to_next_newer_on_poll(root):
    _publish_fake(root, 1)
    m = _manager(root, poll_s=3600)
    m.start()
    _publish_fake(root, 2)
    _publish_fake(root, 3, loadable=False)
    assert m.poll_once() == 2
    assert list(m.status()["refused"]) == [3]
    m.stop()


def test_concurrent_requests_never_see_a_released_version(root):
    """8 threads acquire in a loop while 6 versions are swapped in: every acquired version is
    whole (its own value, not released) for the whole block; every replaced version ends
    released."""
    _publish_fake(root, 1)
    m = _manager(root, poll_s=3600)
    m.start()
    stop, errors, seen = threading.Event(), [], set()

    def client():
        while not stop.is_set():
            with m.acquire() as v:
                for _ in range(50):
                    if v.released or v.retriever.value != f"value-{v.version}":
                        errors.append(v.version)
                seen.add(v)

    threads = [threading.Thread(target=client) for _ in range(8)]
    for t in threads:
        t.start()
    try:
        for v in range(2, 8):
            _publish_fake(root, v)
            assert m.poll_once() == v
            time.sleep(0.01)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert errors == []
    assert m.version == 7
    assert all(v.released for v in seen if v.version != 7)
    m.stop()


def test_a_load_finishing_after_stop_is_not_served(root):
    _publish_fake(root, 1)
    gate, started = threading.Event(), threading.Event()

    def load(path):
        if path.endswith("2"):
            started.set()
            gate.wait(30)
        return _fake_load(path)

    m = _manager(root, load_fn=load, poll_s=3600)
    m.start()
    _publish_fake(root, 2)
    result = []
    t = threading.Thread(target=lambda: result.append(m.poll_once()))
    t.start()
    started.wait(30)
    stopper = threading.Thread(target=m.stop)
    stopper.start()
    _wait_for(lambda: m.status()["state"] == "END", "stop()")
    gate.set()
    t.join()
    stopper.join()
    assert result == [None] and m.version is None and not m.ready


def test_restart_on_the_same_tree_serves_the_same_version(root):
    """A manager abandoned without stop() (as after SIGKILL) and a fresh one on the same tree:
    the same version, the broken newer one refused again."""
    _publish_fake(root, 1)
    first = _manager(root, poll_s=3600)
    first.start()
    _publish_fake(root, 2)
    first.poll_once()
    _publish_fake(root, 3, loadable=False)
    first.poll_once()
    assert first.version == 2
    again = _manager(root, poll_s=3600)
    assert again.start().version == 2 and list(again.status()["refused"]) == [3]
    again.stop()
    first.stop()


# ----------------------------------------------------------------------------- read-only checks
class _NoWrites:
    """Every Python-level write under ``folder`` fails with EACCES and is recorded."""

    def __init__(self, monkeypatch, folder):
        self.folder, self.attempts = os.path.abspath(folder), []
        real_open = builtins.open
        real = {n: getattr(os, n) for n in ("mkdir", "makedirs", "rename", "replace", "link",
                                            "symlink", "remove", "unlink", "rmdir")}

        def inside(path):
            p = os.path.abspath(os.fsdecode(path))
            return p == self.folder or p.startswith(self.folder + os.sep)

        def deny(path):
            self.attempts.append(os.fsdecode(path))
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fsdecode(path))

        def wrap(name, nargs):
            def fn(*a, **k):
                if any(inside(p) for p in a[:nargs] if isinstance(p, (str, bytes, os.PathLike))):
                    deny(a[0])
                return real[name](*a, **k)
            return fn

        def open_(file, mode="r", *a, **k):
            if (isinstance(file, (str, bytes, os.PathLike)) and set(mode) & set("wax+")
                    and inside(file)):
                deny(file)
            return real_open(file, mode, *a, **k)

        for name in ("mkdir", "makedirs", "remove", "unlink", "rmdir"):
            monkeypatch.setattr(os, name, wrap(name, 1))
        for name in ("rename", "replace", "link", "symlink"):
            monkeypatch.setattr(os, name, wrap(name, 2))
        monkeypatch.setattr(builtins, "open", open_)


def _snapshot(folder):
    """{relative path: (size, mtime_ns, ctime_ns, mode)} of every entry under ``folder``."""
    out = {}
    for d, dirs, files in os.walk(folder):
        for name in [""] + dirs + files:
            p = os.path.join(d, name) if name else d
            s = os.lstat(p)
            out[os.path.relpath(p, folder)] = (s.st_size, s.st_mtime_ns, s.st_ctime_ns,
                                               s.st_mode)
    return out


def _chmod_tree(folder, writable):
    for d, dirs, files in os.walk(folder):
        for p in [d] + [os.path.join(d, f) for f in files]:
            mode = os.lstat(p).st_mode
            os.chmod(p, (mode | stat.S_IWUSR) if writable else
                     (mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)))


def test_fake_tree_read_only_start_and_poll_write_nothing(root, monkeypatch):
    _publish_fake(root, 1)
    _publish_fake(root, 2, serving_view=False)  # half-published: Retriever.load would repair it
    before = _snapshot(root)
    guard = _NoWrites(monkeypatch, root)
    m = _manager(root, poll_s=3600)
    assert m.start().version == 1
    m.poll_once()
    m.stop()
    assert guard.attempts == [] and _snapshot(root) == before


# ----------------------------------------------------------------------------- real tiny export
NUM_ITEMS = 40


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A trained tiny model exported once (version 100, brute force over 40 items)."""
    from conftest import tiny_config
    from export import export_model
    from micrec_tf.data.artifacts import load_artifacts
    from micrec_tf.train import train
    from pipelines import preprocess

    tmp = str(tmp_path_factory.mktemp("versions"))
    cfg = tiny_config(tmp, data={"synthetic": {"num_users": 60, "num_items": NUM_ITEMS,
                                               "num_events": 1200, "num_topics": 4, "seed": 5}},
                      preprocess={"num_shards": 1}, model={"cl": ["feature"]},
                      loss={"num_negatives": 16, "num_cl_negatives": 8},
                      train={"epochs": 1}, export={"top_k": 10})
    preprocess.run(cfg, verbose=False)
    result = train(cfg, evaluate_test=False, log=lambda *a: None)
    art = load_artifacts(cfg.artifacts_dir)
    base = os.path.join(tmp, "exports", cfg.name)
    vdir = export_model.export_model(result["model"], cfg, art, export_root=base, version=100,
                                     log=lambda *a: None)
    assert os.path.basename(vdir) == "100"
    return types.SimpleNamespace(base=base, user_fields=list(art.user_fields))


def _tree(exported, tmp_path):
    """A private copy of the exported tree (version 100 and serving/100)."""
    dst = str(tmp_path / "exports" / "tiny")
    shutil.copytree(exported.base, dst, ignore=shutil.ignore_patterns(".*"))
    return dst


def _publish_copy(root, src_version, version, change=None, serving_view=True):
    """Publishes ``version`` as a copy of ``src_version`` with ``change(tmp_dir)`` applied:
    assembled under a dot name and renamed whole, then its serving view, as the export does."""
    tmp = os.path.join(root, f".tmp-{version}-test")
    shutil.copytree(os.path.join(root, str(src_version)), tmp)
    if change:
        change(tmp)
    os.rename(tmp, os.path.join(root, str(version)))
    if serving_view:
        stmp = os.path.join(root, "serving", f".tmp-{version}-test")
        shutil.copytree(os.path.join(root, str(version), "user_tower"), stmp)
        os.rename(stmp, os.path.join(root, "serving", str(version)))


def _negate_vectors(vdir):
    path = os.path.join(vdir, "item_embeddings", "embeddings.npy")
    np.save(path, -np.load(path))


def _requests(user_fields):
    return [{**{f: "" for f in user_fields}, "history": []},
            {**{f: "x" for f in user_fields}, "history": ["i1", "i2", "i3"]}]


def _reference(root, version, requests, k):
    """Brute-force top-k ids and scores for ``requests`` in ``version``: user vectors from a
    separately loaded SavedModel, scores = numpy dot products with that version's own dump."""
    import tensorflow as tf

    vdir = os.path.join(root, str(version))
    fn = tf.saved_model.load(os.path.join(vdir, "user_tower")).signatures["serving_default"]
    width = max(len(r["history"]) for r in requests) or 1
    feed = {f: tf.constant([r[f] for r in requests]) for f in requests[0] if f != "history"}
    feed["history"] = tf.constant([r["history"] + [""] * (width - len(r["history"]))
                                   for r in requests])
    users = fn(**feed)["user_embedding"].numpy().astype(np.float64)
    vectors = np.load(os.path.join(vdir, "item_embeddings", "embeddings.npy")).astype(np.float64)
    with open(os.path.join(vdir, "item_embeddings", "ids.txt")) as fh:
        ids = fh.read().split("\n")[:vectors.shape[0]]
    scores = users @ vectors.T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return ([[ids[j] for j in row] for row in order],
            np.take_along_axis(scores, order, axis=1))


def _check_answers(v, root, requests, k=10):
    ids, scores = v.retriever.retrieve(requests, k=k)
    ref_ids, ref_scores = _reference(root, v.version, requests, k)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-5)
    # ids agree wherever scores are not tied within float32 noise
    for row, (got, want, s) in enumerate(zip(ids.tolist(), ref_ids, ref_scores)):
        for j in range(k):
            tied = (j > 0 and abs(s[j] - s[j - 1]) < 1e-5) or (j + 1 < k and
                                                               abs(s[j] - s[j + 1]) < 1e-5)
            if not tied:
                assert got[j] == want[j], (row, j)
    return ids


@pytest.mark.slow
def test_real_export_swap_keeps_held_requests_on_the_old_version(exported, tmp_path):
    root = _tree(exported, tmp_path)
    reqs = _requests(exported.user_fields)
    logs = []
    m = VersionManager(root, poll_s=0.05, log=logs.append)
    first = m.start()
    try:
        assert first.version == 100 and m.ready
        assert first.load_s >= 0 and first.warmup_s >= 0
        assert set(first.specs) == set(exported.user_fields) | {"history"}
        with m.acquire() as old:
            alive = weakref.ref(old.retriever)
            _publish_copy(root, 100, 200, change=_negate_vectors)
            _wait_for(lambda: m.version == 200, "the swap to version 200")
            old_ids = _check_answers(old, root, reqs)  # still version 100's answers
            with m.acquire() as new:
                assert new.version == 200
                new_ids = _check_answers(new, root, reqs)
            assert old_ids.tolist() != new_ids.tolist()  # negated vectors: other answers
            assert not old.released
        assert old.released
        gc.collect()
        assert alive() is None, "version 100's retriever is still referenced after release"
        assert m.status() == {"version": 200, "state": "AVAILABLE", "refused": {}}
    finally:
        m.stop()


def _drop_embeddings(vdir):
    os.remove(os.path.join(vdir, "item_embeddings", "embeddings.npy"))


def _corrupt_saved_model(vdir):
    with open(os.path.join(vdir, "user_tower", "saved_model.pb"), "wb") as fh:
        fh.write(b"this is not a SavedModel")


def _wrong_dimension(vdir):
    path = os.path.join(vdir, "item_embeddings", "embeddings.npy")
    v = np.load(path)
    np.save(path, np.concatenate([v, v], axis=1))


@pytest.mark.slow
@pytest.mark.parametrize("breakage,expect", [(_drop_embeddings, "embeddings.npy"),
                                             (_corrupt_saved_model, "Error"),
                                             (_wrong_dimension, "does not match item vectors")])
def test_real_export_broken_version_is_refused_and_old_keeps_serving(exported, tmp_path,
                                                                      breakage, expect):
    root = _tree(exported, tmp_path)
    reqs = _requests(exported.user_fields)
    logs = []
    m = VersionManager(root, poll_s=3600, log=logs.append)
    m.start()
    try:
        _publish_copy(root, 100, 300, change=breakage)
        assert m.poll_once() is None and m.poll_once() is None
        st = m.status()
        assert st["version"] == 100 and list(st["refused"]) == [300]
        assert expect in st["refused"][300] and "\n" not in st["refused"][300]
        assert sum("refused version 300" in line for line in logs) == 1
        with m.acquire() as v:
            assert v.version == 100
            _check_answers(v, root, reqs)
        # a restart on the same tree (after SIGKILL: no stop()) serves the same version
        again = VersionManager(root, poll_s=3600, log=lambda msg: None)
        assert again.start().version == 100 and list(again.status()["refused"]) == [300]
        again.stop()
    finally:
        m.stop()


@pytest.mark.slow
def test_real_export_read_only_tree_is_served_without_writes(exported, tmp_path, monkeypatch):
    """Version 200 is half-published (no serving/200): Retriever.load(root) would repair it
    (a write); the manager serves 100, the newest that TF Serving serves, and writes nothing:
    chmod -w, Python-level writes refused, os-level snapshot unchanged."""
    root = _tree(exported, tmp_path)
    _publish_copy(root, 100, 200, change=_negate_vectors, serving_view=False)
    _chmod_tree(root, writable=False)
    try:
        before = _snapshot(root)
        guard = _NoWrites(monkeypatch, root)
        m = VersionManager(root, poll_s=3600, log=lambda msg: None)
        try:
            assert m.start().version == 100
            assert m.poll_once() is None and m.status()["refused"] == {}
            with m.acquire() as v:
                _check_answers(v, root, _requests(exported.user_fields))
        finally:
            m.stop()
        assert guard.attempts == []
        assert _snapshot(root) == before
        assert not os.path.exists(os.path.join(root, "serving", "200"))
    finally:
        monkeypatch.undo()
        _chmod_tree(root, writable=True)


@pytest.mark.slow
def test_real_export_warm_up_runs_the_export_warmup_file(exported, tmp_path):
    """The export's warm-up file holds 8 + 1 + 2 users (docs/SERVING.md); without it, the
    synthetic batch (2 users) runs instead."""
    root = _tree(exported, tmp_path)
    v = LoadedVersion.load(os.path.join(root, "100"))
    assert versions.warm_up(v) == 11
    os.remove(os.path.join(root, "100", "user_tower", "assets.extra",
                           "tf_serving_warmup_requests"))
    assert versions.warm_up(v) == 2

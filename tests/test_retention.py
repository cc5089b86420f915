"""Retention of export versions and update generations (``export.keep_versions``, issue 29):
``export.serving.prune_versions`` and ``micrec_tf.update.prune_generations``.

References are hand-made folder trees: version folders with a metadata.json naming their run
and artifacts folders, TF Serving views, generation folders; what must stay and what must go
is listed by hand.
"""
from __future__ import annotations

import json
import os

import pytest

from export import serving
from export.export_model import sweep_stale_tmp
from micrec_tf.update import prune_generations


def _version(root, v, run_dir=None, artifacts_dir=None, view=True):
    os.makedirs(os.path.join(root, str(v), "user_tower"))
    with open(os.path.join(root, str(v), "metadata.json"), "w") as fh:
        json.dump({"version": v, "run_dir": run_dir, "artifacts_dir_abs": artifacts_dir}, fh)
    if view:
        os.makedirs(os.path.join(root, serving.SERVING_DIR, str(v)))


def _listing(path):
    return sorted(os.listdir(path)) if os.path.isdir(path) else []


def test_prune_keeps_the_newest_versions_and_their_views(tmp_path):
    root = str(tmp_path / "exports" / "m")
    for v in (100, 101, 102, 103, 104):
        _version(root, v)
    os.makedirs(os.path.join(root, "notes"))  # not a version: never touched
    lines = []
    assert serving.prune_versions(root, 2, lines.append) == [100, 101, 102]
    assert serving.published_versions(root) == [103, 104]
    assert _listing(root) == ["103", "104", "notes", "serving"]
    assert _listing(os.path.join(root, "serving")) == ["103", "104"]
    assert lines == ["[export] removed 3 old version(s) [100, 101, 102] "
                     "(export.keep_versions=2: the newest 2 stay)"]
    assert serving.prune_versions(root, 2, lines.append) == []  # nothing older left
    assert serving.prune_versions(root, 0) == []                 # 0: keep every version
    assert serving.published_versions(root) == [103, 104]


def test_prune_removes_a_version_without_its_view(tmp_path):
    root = str(tmp_path / "m")
    _version(root, 1, view=False)  # e.g. an export killed before its serving view
    _version(root, 2)
    _version(root, 3)
    assert serving.prune_versions(root, 2, lambda *a: None) == [1]
    assert _listing(root) == ["2", "3", "serving"]


@pytest.mark.parametrize("keep", [1, -1, 2.0, "2"])
def test_prune_refuses_a_bad_keep(tmp_path, keep):
    with pytest.raises(ValueError, match=f"keep must be 0 or an int >= 2. Received: keep={keep!r}"):
        serving.prune_versions(str(tmp_path), keep)


def test_a_removal_killed_midway_is_swept_later(tmp_path, monkeypatch):
    """remove_tree renames first: a deletion that dies leaves a dot name that readers skip and
    that sweep_stale_tmp removes once its pid is gone."""
    root = str(tmp_path / "m")
    for v in (1, 2, 3):
        _version(root, v)

    def die(path, *a, **k):
        raise OSError("killed during the deletion")

    monkeypatch.setattr(serving.shutil, "rmtree", die)
    with pytest.raises(OSError, match="killed during the deletion"):
        serving.prune_versions(root, 2, lambda *a: None)
    monkeypatch.undo()
    assert serving.published_versions(root) == [1, 2, 3]  # the view went first, the version stays
    assert not os.path.isdir(os.path.join(root, "serving", "1"))
    stale = [d for d in _listing(os.path.join(root, "serving")) if d.startswith(".tmp-1-")]
    assert len(stale) == 1
    dead = stale[0].split("-")
    dead[2] = "999999999"  # a pid that does not run
    os.rename(os.path.join(root, "serving", stale[0]),
              os.path.join(root, "serving", "-".join(dead)))
    sweep_stale_tmp(os.path.join(root, "serving"), lambda *a: None)
    assert _listing(os.path.join(root, "serving")) == ["2", "3"]
    serving.repair_serving_views(root, lambda *a: None)  # the view of the kept version 1 is back
    assert _listing(os.path.join(root, "serving")) == ["1", "2", "3"]


def test_prune_generations_removes_only_unused_generation_folders(tmp_path):
    updates = tmp_path / "artifacts" / "m-updates"
    for g in ("gen-0001", "gen-0002", "gen-0003", "gen-0004"):
        os.makedirs(updates / g / "run")
        os.makedirs(updates / g / "artifacts" / "m")
    os.makedirs(updates / "gen-notes")  # not a generation number: never touched
    (updates / "state.json").write_text("{}")
    scratch = tmp_path / "runs" / "m"  # generation 0, outside the update folder
    os.makedirs(scratch)
    exports = str(tmp_path / "exports" / "m")
    _version(exports, 7, run_dir=str(scratch), artifacts_dir=str(tmp_path / "artifacts" / "m"))
    _version(exports, 8, run_dir=str(updates / "gen-0002" / "run"),
             artifacts_dir=str(updates / "gen-0002" / "artifacts" / "m"))
    # A version may use one generation's run and another's artifacts (by hand, --previous).
    _version(exports, 9, run_dir=str(updates / "gen-0004" / "run"),
             artifacts_dir=str(updates / "gen-0003" / "artifacts" / "m"))
    lines = []
    assert prune_generations(str(updates), exports, lines.append) == ["gen-0001"]
    assert _listing(updates) == ["gen-0002", "gen-0003", "gen-0004", "gen-notes", "state.json"]
    assert os.path.isdir(scratch)
    assert lines == ["[update] removed 1 generation folder(s) no kept version uses: gen-0001"]
    assert serving.prune_versions(exports, 2, lambda *a: None) == [7]
    assert prune_generations(str(updates), exports, lambda *a: None) == []  # 8 uses gen-0002
    assert os.path.isdir(scratch)  # generation 0 is never the update's to remove
    _version(exports, 10, run_dir=str(updates / "gen-0004" / "run"),
             artifacts_dir=str(updates / "gen-0004" / "artifacts" / "m"))
    assert serving.prune_versions(exports, 2, lambda *a: None) == [8]
    assert prune_generations(str(updates), exports, lambda *a: None) == ["gen-0002"]
    assert _listing(updates) == ["gen-0003", "gen-0004", "gen-notes", "state.json"]

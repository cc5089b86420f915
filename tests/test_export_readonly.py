"""Issue 27, items 5 and 7: export into a folder it cannot write, or onto a full disk, publishes
nothing and says so in one line; retrieval serves a consistent version from a read-only tree.

Read-only folders: the tests run as root on some machines, where ``chmod`` does not stop writes,
so every case runs with a *simulated* read-only folder (the file-system calls that create, rename,
link, remove or open for writing anything under it fail with EACCES, and ``os.access`` says it is
not writable), and again with a real ``chmod 555`` where the tests do not run as root.
Full disks: files the export writes are pre-created as symbolic links to ``/dev/full``, so the
writes fail with the kernel's own ENOSPC (numpy's, ScaNN's native writer's).
"""
import builtins
import errno
import json
import os
import stat
import types

import numpy as np
import pytest
import yaml

from micrec_tf import cli
from conftest import tiny_config

AS_ROOT = os.geteuid() == 0
MODES = ["simulated",
         pytest.param("chmod", marks=pytest.mark.skipif(
             AS_ROOT, reason="root writes into chmod 555 folders; the simulated case covers it"))]


class _ReadOnly:
    """Makes ``folder`` (and everything under it) behave as a read-only folder in this process."""

    def __init__(self, monkeypatch, folder, err=errno.EACCES):
        self.folder, self.err = os.path.abspath(folder), err
        real = {name: getattr(os, name) for name in
                ("mkdir", "rename", "replace", "link", "symlink", "remove", "unlink", "rmdir",
                 "access")}
        real_open = builtins.open

        def inside(path):
            path = os.path.abspath(os.fsdecode(path))
            return path == self.folder or path.startswith(self.folder + os.sep)

        def parent_inside(path):
            return inside(os.path.dirname(os.path.abspath(os.fsdecode(path))))

        def deny(path):
            raise PermissionError(self.err, os.strerror(self.err), os.fsdecode(path))

        def mkdir(path, *a, **k):
            if parent_inside(path) and not os.path.lexists(path):
                deny(path)
            return real["mkdir"](path, *a, **k)

        def two(name):
            def fn(src, dst, *a, **k):
                if parent_inside(src) or parent_inside(dst):
                    deny(dst)
                return real[name](src, dst, *a, **k)
            return fn

        def one(name):
            def fn(path, *a, **k):
                if parent_inside(path):
                    deny(path)
                return real[name](path, *a, **k)
            return fn

        def access(path, mode, *a, **k):
            if mode & os.W_OK and inside(path):
                return False
            return real["access"](path, mode, *a, **k)

        def open_(file, mode="r", *a, **k):
            if (isinstance(file, (str, bytes, os.PathLike)) and set(mode) & set("wax+")
                    and parent_inside(file)):
                deny(file)
            return real_open(file, mode, *a, **k)

        monkeypatch.setattr(os, "mkdir", mkdir)
        for name in ("rename", "replace", "link", "symlink"):
            monkeypatch.setattr(os, name, two(name))
        for name in ("remove", "unlink", "rmdir"):
            monkeypatch.setattr(os, name, one(name))
        monkeypatch.setattr(os, "access", access)
        monkeypatch.setattr(builtins, "open", open_)


@pytest.fixture
def read_only(monkeypatch, request):
    """``read_only(folder)``: makes ``folder`` read-only (simulated, or chmod 555, by the test's
    ``mode`` parameter) until the end of the test."""
    chmodded = []

    def make(folder, mode):
        if mode == "chmod":
            os.chmod(folder, stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP
                     | stat.S_IROTH | stat.S_IXOTH)
            chmodded.append(folder)
        else:
            _ReadOnly(monkeypatch, folder)

    yield make
    for folder in chmodded:
        os.chmod(folder, stat.S_IRWXU)


@pytest.fixture(scope="module")
def trained(tiny_pipeline, tmp_path_factory):
    from micrec_tf.train import train

    _, tmp = tiny_pipeline
    root = tmp_path_factory.mktemp("export_readonly")
    cfg = tiny_config(tmp, model={"cl": ["feature"]},
                      train={"epochs": 1, "runs_dir": str(root / "runs")},
                      export={"exports_dir": str(root / "exports"), "index": "scann",
                              "top_k": 20})
    train(cfg, evaluate_test=False, log=lambda *a: None)
    cfg_path = root / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg.to_dict()))
    return types.SimpleNamespace(cfg=cfg, cfg_path=str(cfg_path))


def _export(trained, exports, capsys):
    """In-process ``python -m export.export_model`` into ``exports/<name>``: (code, out, err)."""
    from export import export_model

    capsys.readouterr()
    code = cli.run(export_model.main, ["--config", trained.cfg_path,
                                       "--set", f"export.exports_dir={exports}"])
    out = capsys.readouterr()
    return code, out.out, out.err


def _one_error_line(code, err):
    assert code == cli.EXIT_USAGE, (code, err[-3000:])
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-3000:]
    assert "Traceback" not in err
    return lines[0]


def _everything(root):
    return sorted(os.path.relpath(os.path.join(d, f), root)
                  for d, dirs, files in os.walk(root) for f in dirs + files)


# ----------------------------------------------------------------------------- export, read-only
@pytest.mark.parametrize("mode", MODES)
def test_read_only_serving_folder_publishes_nothing(trained, tmp_path, capsys, read_only, mode):
    """Before the fix the version folder was published, then the serving view failed with a
    PermissionError traceback: a half-published version that retrieval could not repair."""
    exports = tmp_path / "exports"
    root = exports / trained.cfg.name
    (root / "serving").mkdir(parents=True)
    read_only(str(root / "serving"), mode)
    code, out, err = _export(trained, str(exports), capsys)
    line = _one_error_line(code, err)
    assert f"{root / 'serving'} is not writable" in line and "nothing was published" in line
    assert _everything(str(root)) == ["serving"]


@pytest.mark.parametrize("mode", MODES)
def test_read_only_export_folder_publishes_nothing(trained, tmp_path, capsys, read_only, mode):
    """The export folder itself read-only (no serving/ yet): one line, not a traceback."""
    exports = tmp_path / "exports"
    root = exports / trained.cfg.name
    root.mkdir(parents=True)
    read_only(str(root), mode)
    code, out, err = _export(trained, str(exports), capsys)
    line = _one_error_line(code, err)
    assert f"{root} is not writable" in line and "nothing was published" in line
    assert _everything(str(root)) == []


# ----------------------------------------------------------------------------- export, disk full
def _full(path):
    """Pre-creates ``path`` as a link to /dev/full: every write to it fails with ENOSPC."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    os.symlink("/dev/full", path)


def _assert_disk_full_published_nothing(code, err, root, what):
    line = _one_error_line(code, err)
    assert "no space left on device" in line.lower() and "nothing was published" in line, line
    assert what in line, line
    assert not [d for d in os.listdir(root) if d != "serving"], os.listdir(root)
    assert os.listdir(os.path.join(root, "serving")) == []


def test_disk_full_while_writing_item_embeddings(trained, tmp_path, capsys, monkeypatch):
    from export import item_index

    real = item_index.dump_item_embeddings

    def dump_onto_full_disk(model, vocab_file, out_dir, *a, **k):
        _full(os.path.join(out_dir, "embeddings.npy"))
        return real(model, vocab_file, out_dir, *a, **k)

    monkeypatch.setattr(item_index, "dump_item_embeddings", dump_onto_full_disk)
    exports = tmp_path / "exports"
    code, out, err = _export(trained, str(exports), capsys)
    _assert_disk_full_published_nothing(code, err, str(exports / trained.cfg.name),
                                        "embeddings.npy")


def test_disk_full_while_scann_serialises(trained, tmp_path, capsys, monkeypatch):
    """ScaNN's native writer reports "Failed to extract SingleMachineFactoryOptions: ..."; the
    export says the disk is full."""
    from export import item_index

    real = item_index.save_scann
    seen = {}

    def save_onto_full_disk(searcher, params, out_dir):
        scratch = str(tmp_path / "scratch")
        os.makedirs(scratch, exist_ok=True)
        searcher.serialize(scratch, relative_path=True)  # the names of the files ScaNN writes
        for name in os.listdir(scratch):
            _full(os.path.join(out_dir, name))
        seen["files"] = os.listdir(scratch)
        return real(searcher, params, out_dir)

    monkeypatch.setattr(item_index, "save_scann", save_onto_full_disk)
    exports = tmp_path / "exports"
    code, out, err = _export(trained, str(exports), capsys)
    assert seen, "the export built no ScaNN index: the test needs one"
    _assert_disk_full_published_nothing(code, err, str(exports / trained.cfg.name), "scann")


def test_scann_io_error_on_a_full_disk_says_so(tmp_path, monkeypatch):
    """The message ScaNN gives on a full disk names no file; the free space tells."""
    import shutil

    from export import item_index

    class Searcher:
        def serialize(self, out_dir, relative_path=False):
            raise RuntimeError("Failed to extract SingleMachineFactoryOptions: I/O error")

    usage = types.SimpleNamespace(total=10 ** 9, used=10 ** 9, free=0)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage)
    with pytest.raises(OSError) as info:
        item_index.save_scann(Searcher(), {}, str(tmp_path / "scann"))
    assert info.value.errno == errno.ENOSPC
    assert "I/O error" in str(info.value) and str(tmp_path / "scann") in str(info.value)


# ----------------------------------------------------------------------------- retrieval
def _fake_version(root, version, served):
    vdir = os.path.join(root, str(version))
    os.makedirs(os.path.join(vdir, "user_tower"))
    with open(os.path.join(vdir, "user_tower", "saved_model.pb"), "w") as fh:
        fh.write(str(version))
    with open(os.path.join(vdir, "metadata.json"), "w") as fh:
        json.dump({"version": version}, fh)
    os.makedirs(os.path.join(root, "serving"), exist_ok=True)
    if served:
        os.makedirs(os.path.join(root, "serving", str(version)))


@pytest.mark.parametrize("mode", MODES)
def test_retrieval_from_a_read_only_tree_uses_the_newest_consistent_version(
        tmp_path, capsys, read_only, mode):
    """Version 200 was half-published (no serving/200) and serving/ cannot be written: retrieval
    says so in one line and uses 200's predecessor, the version TF Serving serves. Before the fix
    its start-up repair crashed with PermissionError."""
    from micrec_tf.retrieval import resolve_version_dir

    root = str(tmp_path / "exports" / "tiny")
    _fake_version(root, 100, served=True)
    _fake_version(root, 200, served=False)
    read_only(os.path.join(root, "serving"), mode)
    capsys.readouterr()
    assert resolve_version_dir(root) == os.path.join(root, "100")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "200" in err[0] and "not writable" in err[0] and "using version 100" in err[0], err
    assert sorted(os.listdir(os.path.join(root, "serving"))) == ["100"]
    # Asked for by number (or by folder), the half-published version is served, with the warning.
    assert resolve_version_dir(root, 200) == os.path.join(root, "200")
    assert resolve_version_dir(os.path.join(root, "200")) == os.path.join(root, "200")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all("200" in line and "not writable" in line for line in err), err


def test_retrieval_from_a_read_only_tree_with_no_consistent_version(tmp_path, capsys, read_only):
    """Nothing that TF Serving serves: retrieval uses the newest version, and says so."""
    from micrec_tf.retrieval import resolve_version_dir

    root = str(tmp_path / "exports" / "tiny")
    _fake_version(root, 100, served=False)
    read_only(os.path.join(root, "serving"), "simulated")
    capsys.readouterr()
    assert resolve_version_dir(root) == os.path.join(root, "100")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "100" in err[0] and "not writable" in err[0], err


@pytest.mark.parametrize("message, words", [
    ("Failed to write /x/variables.data; No space left on device", "no space left on device"),
    ("/x/saved_model.pb; Read-only file system", "read-only file system"),
])
def test_tensorflow_write_errors_are_one_line(tmp_path, message, words):
    """TensorFlow's file errors carry the cause in their message only (no errno)."""
    import tensorflow as tf

    from export import write_checks

    where = str(tmp_path / ".tmp-1-2-3")
    err = write_checks.write_failure(tf.errors.UnknownError(None, None, message), where)
    assert isinstance(err, cli.UsageError)
    assert str(err) == f"{words} while writing {where}: nothing was published"
    other = write_checks.write_failure(tf.errors.InvalidArgumentError(None, None, "bad shape"),
                                       where)
    assert other is None  # anything else stays a bug with its traceback

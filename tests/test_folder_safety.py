"""Jobs touch only the folders they own (issue 27, items 2, 4 and 9).

* ``name`` is one safe folder name; no job renames or deletes a filesystem root, the home
  folder, the current folder or the repository, or one of their ancestors
  (:func:`micrec_tf.publish.check_owned_dir`), and preprocess replaces only a folder that holds
  preprocessing artifacts.
* One job per folder: a second training on a run folder, preprocess on an artifacts folder or
  export on an export folder fails with one line naming the holder's pid
  (:mod:`micrec_tf.locks`); the lock goes with its holder when it is killed.
* Preprocess sweeps the temporaries (``<name>.tmp-<pid>-*``, ``<name>.old-<pid>-*``) that killed
  runs left beside its folder, and only those whose pid no longer runs.
"""
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest
import yaml

from micrec_tf.config import ConfigError, from_dict

from conftest import ROOT, tiny_config


# ----------------------------------------------------------------------------- helpers
def _sandbox(tmp_path):
    """``<tmp>/repo`` with a source file and another dataset's artifacts: what must survive."""
    repo = tmp_path / "repo"
    (repo / "src").mkdir(parents=True)
    (repo / "src" / "keep.py").write_text("print('keep')\n")
    other = repo / "artifacts" / "other"
    other.mkdir(parents=True)
    (other / "stats.json").write_text("{}\n")
    return repo


def _intact(repo):
    return ((repo / "src" / "keep.py").read_text() == "print('keep')\n"
            and (repo / "artifacts" / "other" / "stats.json").exists())


def _raw(tmp, **top):
    raw = tiny_config(str(tmp)).to_dict()
    raw.update(top)
    return raw


def _write_config(tmp_path, raw) -> str:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def _cli(module, *args, cwd=ROOT):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)


@pytest.fixture
def holder():
    """``hold(folder, job)``: a separate process that takes ``folder``'s lock and sleeps; the
    fixture SIGKILLs whatever is left at the end."""
    procs = []

    def hold(folder, job):
        code = textwrap.dedent(f"""
            import sys, time
            from micrec_tf import locks
            with locks.folder_lock({str(folder)!r}, {job!r}):
                print("ready", flush=True)
                time.sleep(600)
        """)
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                                cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))
        procs.append(proc)
        assert proc.stdout.readline().strip() == "ready"
        return proc

    yield hold
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def _kill(proc):
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


def _dead_pid() -> int:
    """The pid of a process that has exited (a killed job's)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ----------------------------------------------------------------------------- item 2: names
@pytest.mark.parametrize("name", ["..", ".", "", "a/b", "../src", "/abs", "a\\b", "a\x00b",
                                  ".hidden", " tiny", "tiny\n", "x.tmp-1-ab", "x" * 200])
def test_name_must_be_one_safe_folder_name(tmp_path, name):
    with pytest.raises(ConfigError, match=r"^name must be one folder name.*Received: ") as err:
        from_dict(_raw(tmp_path, name=name))
    assert repr(name) in str(err.value)
    assert "\n" not in str(err.value).replace(repr(name), "")


@pytest.mark.parametrize("name", ["ml-1m", "synthetic_1m", "mind", "ml-1m-llo", "a.b", "Tiny2"])
def test_ordinary_names_pass(tmp_path, name):
    assert from_dict(_raw(tmp_path, name=name)).name == name


@pytest.mark.parametrize("name", ["..", '""'])
def test_preprocess_cli_with_unsafe_name_deletes_nothing(tmp_path, name):
    """The issue's sandbox: ``artifacts_root=<sandbox>/repo/artifacts`` with ``name=..`` deleted
    ``<sandbox>/repo/src``; ``name=""`` another dataset's artifacts."""
    repo = _sandbox(tmp_path)
    cfg = _write_config(tmp_path, _raw(tmp_path, name="ok",
                                       artifacts_root=str(repo / "artifacts")))
    proc = _cli("pipelines.preprocess", "--config", cfg, "--set", f"name={name}",
                cwd=str(tmp_path))
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: name must be one folder name"), lines
    assert _intact(repo)
    assert sorted(os.listdir(repo)) == ["artifacts", "src"]
    assert sorted(os.listdir(repo / "artifacts")) == ["other"]


# ----------------------------------------------------------------------------- item 2: publish
def _make_tmp(final) -> str:
    from micrec_tf import publish

    tmp = publish.tmp_sibling(str(final))
    os.makedirs(tmp)
    with open(os.path.join(tmp, "stats.json"), "w") as fh:
        fh.write("{}\n")
    return tmp


def test_replace_dir_refuses_an_ancestor_of_the_current_folder(tmp_path, monkeypatch):
    from micrec_tf import publish

    repo = _sandbox(tmp_path)
    monkeypatch.chdir(repo / "src")
    tmp = _make_tmp(repo)
    with pytest.raises(publish.UnsafePathError, match="current folder"):
        publish.replace_dir(tmp, str(repo))
    assert _intact(repo) and os.path.isdir(tmp)
    with pytest.raises(publish.UnsafePathError, match="current folder"):
        publish.replace_dir(_make_tmp(repo / "src"), str(repo / "src"))
    assert _intact(repo)


def test_replace_dir_refuses_root_home_and_repository(tmp_path, monkeypatch):
    from micrec_tf import publish

    home = tmp_path / "home"
    home.mkdir()
    (home / "notes.txt").write_text("mine\n")
    monkeypatch.setenv("HOME", str(home))
    with pytest.raises(publish.UnsafePathError, match="home folder"):
        publish.replace_dir(_make_tmp(home), str(home))
    assert (home / "notes.txt").read_text() == "mine\n"
    with pytest.raises(publish.UnsafePathError, match="root"):
        publish.replace_dir(str(tmp_path / "x.tmp-1-ab"), "/")
    with pytest.raises(publish.UnsafePathError, match="repository"):
        publish.replace_dir(_make_tmp(tmp_path / "r"), ROOT)
    git_repo = tmp_path / "g"
    (git_repo / ".git").mkdir(parents=True)
    with pytest.raises(publish.UnsafePathError, match="repository"):
        publish.replace_dir(_make_tmp(git_repo), str(git_repo))
    assert (git_repo / ".git").is_dir()


def test_replace_dir_takes_only_its_own_temporary_sibling(tmp_path):
    from micrec_tf import publish

    final = tmp_path / "artifacts" / "a"
    final.mkdir(parents=True)
    (final / "stats.json").write_text("old\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "stats.json").write_text("new\n")
    with pytest.raises(publish.UnsafePathError, match="temporary sibling"):
        publish.replace_dir(str(elsewhere), str(final))
    other_name = tmp_path / "artifacts" / "b.tmp-1-ab"
    other_name.mkdir()
    with pytest.raises(publish.UnsafePathError, match="temporary sibling"):
        publish.replace_dir(str(other_name), str(final))
    assert (final / "stats.json").read_text() == "old\n"
    assert (elsewhere / "stats.json").read_text() == "new\n" and other_name.is_dir()


def test_replace_dir_replaces_only_what_it_expects(tmp_path):
    from micrec_tf import publish

    final = tmp_path / "artifacts" / "a"
    (final / "src").mkdir(parents=True)
    refused = _make_tmp(final)
    with pytest.raises(publish.UnsafePathError, match="stats.json"):
        publish.replace_dir(refused, str(final), expect=("stats.json",))
    assert (final / "src").is_dir() and os.path.isdir(refused)  # nothing moved
    shutil.rmtree(refused)
    (final / "src").rmdir()
    (final / "stats.json").write_text("old\n")  # a previous run's artifacts: replaced
    publish.replace_dir(_make_tmp(final), str(final), expect=("stats.json",))
    assert (final / "stats.json").read_text() == "{}\n"
    assert os.listdir(tmp_path / "artifacts") == ["a"]  # the old one removed, no temporary left


def test_preprocess_out_dir_refuses_a_folder_that_is_not_artifacts(tmp_path, monkeypatch):
    """``--out_dir`` names a folder that holds something else (a repository, another
    dataset's artifacts folder): refused before any Beam work, nothing renamed."""
    from micrec_tf import publish
    from pipelines import preprocess

    repo = _sandbox(tmp_path)
    cfg = tiny_config(str(tmp_path))
    for out in (repo, repo / "artifacts"):
        with pytest.raises(publish.UnsafePathError):
            preprocess.run(cfg, out_dir=str(out), verbose=False)
        assert _intact(repo)
    monkeypatch.chdir(repo / "src")
    with pytest.raises(publish.UnsafePathError, match="current folder"):
        preprocess.run(cfg, out_dir=".", verbose=False)
    assert _intact(repo) and sorted(os.listdir(repo)) == ["artifacts", "src"]


def test_preprocess_refuses_a_whole_bucket(tmp_path):
    from micrec_tf import publish
    from pipelines import preprocess

    for out in ("gs://bucket", "gs://bucket/", "s3://b"):
        with pytest.raises(publish.UnsafePathError, match="bucket"):
            preprocess.run(tiny_config(str(tmp_path)), out_dir=out, verbose=False)


def test_train_refuses_an_ancestor_of_the_current_folder_as_run_dir(tmp_path, monkeypatch):
    from micrec_tf import publish
    from micrec_tf.train import train

    repo = _sandbox(tmp_path)
    (repo / "backup").mkdir()
    monkeypatch.chdir(repo / "src")
    for run_dir in (str(repo), "."):
        with pytest.raises(publish.UnsafePathError, match="current folder"):
            train(tiny_config(str(tmp_path)), run_dir=run_dir)
    assert _intact(repo) and not (repo / "config.yaml").exists()
    assert not (repo / "src" / "config.yaml").exists() and (repo / "backup").is_dir()


def test_export_refuses_an_ancestor_of_the_current_folder_as_export_root(tmp_path, monkeypatch):
    from export.export_model import export_model
    from micrec_tf import publish

    repo = _sandbox(tmp_path)
    monkeypatch.chdir(repo / "src")
    with pytest.raises(publish.UnsafePathError, match="current folder"):
        export_model(None, tiny_config(str(tmp_path)), None, export_root=str(repo))
    assert sorted(os.listdir(repo)) == ["artifacts", "src"]


# ----------------------------------------------------------------------------- item 4: locks
def test_second_training_on_a_run_folder_is_refused(tmp_path, holder):
    from micrec_tf import locks
    from micrec_tf.train import train

    cfg = tiny_config(str(tmp_path))
    proc = holder(cfg.run_dir, "training")
    with pytest.raises(locks.FolderInUseError) as err:
        train(cfg)
    msg = str(err.value)
    assert f"pid {proc.pid}" in msg and "training" in msg and "--run-dir" in msg
    assert "\n" not in msg
    assert not os.path.exists(os.path.join(cfg.run_dir, "config.yaml"))  # touched nothing
    _kill(proc)
    with locks.folder_lock(cfg.run_dir, "training"):  # the kernel released the dead holder's lock
        pass


def test_second_preprocess_on_an_artifacts_folder_is_refused_in_one_line(tmp_path, holder):
    cfg_path = _write_config(tmp_path, _raw(tmp_path))
    cfg = tiny_config(str(tmp_path))
    proc = holder(cfg.artifacts_dir, "preprocess")
    res = _cli("pipelines.preprocess", "--config", cfg_path)
    assert res.returncode == 2, res.stderr[-2000:]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and f"(pid {proc.pid})" in lines[0] and "preprocess" in lines[0], lines
    assert not os.path.exists(cfg.artifacts_dir)
    assert [d for d in os.listdir(os.path.dirname(cfg.artifacts_dir))
            if not d.startswith(".")] == []  # no temporary folder either
    _kill(proc)
    from micrec_tf import locks

    with locks.folder_lock(cfg.artifacts_dir, "preprocess"):
        pass


def test_second_export_on_an_export_folder_is_refused(tmp_path, holder):
    from export.export_model import export_model
    from micrec_tf import locks

    cfg = tiny_config(str(tmp_path))
    proc = holder(cfg.export_dir, "export")
    with pytest.raises(locks.FolderInUseError, match=rf"export \(pid {proc.pid}\)"):
        export_model(None, cfg, None)
    assert [d for d in os.listdir(cfg.export_dir) if d != "serving"] == []  # nothing published
    assert os.listdir(os.path.join(cfg.export_dir, "serving")) == []
    _kill(proc)
    with locks.folder_lock(cfg.export_dir, "export"):
        pass


def test_lock_file_beside_the_folder_names_the_holder(tmp_path):
    """The lock file sits beside the folder (a job that replaces its folder never deletes it),
    holds the holder's pid while held, and is gone once released."""
    from micrec_tf import locks

    folder = tmp_path / "artifacts" / "tiny"
    with locks.folder_lock(str(folder), "preprocess") as path:
        assert os.path.dirname(path) == str(tmp_path / "artifacts")
        with open(path) as fh:
            assert fh.read().split()[:2] == [str(os.getpid()), "preprocess"]
        with pytest.raises(locks.FolderInUseError, match=f"pid {os.getpid()}"):
            with locks.folder_lock(str(tmp_path / "artifacts" / "tiny") + "/", "preprocess"):
                pass
    assert os.listdir(tmp_path / "artifacts") == []
    with locks.folder_lock(str(folder), "preprocess"):
        pass


# ----------------------------------------------------------------------------- item 9: sweep
def test_sweep_removes_temporaries_of_dead_pids_only(tmp_path, holder):
    from micrec_tf import publish

    art = tmp_path / "artifacts"
    final = art / "tiny"
    dead, live = _dead_pid(), holder(tmp_path / "unrelated", "x").pid
    stale = [f"tiny.tmp-{dead}-0a1b2c3d", f"tiny.old-{dead}-0a1b2c3d"]
    kept = [f"tiny.tmp-{live}-0a1b2c3d", f"tiny.old-{live}-0a1b2c3d",
            f"tiny.tmp-{os.getpid()}-0a1b2c3d",  # this process's own
            f"other.tmp-{dead}-0a1b2c3d",  # another dataset's
            f"tiny2.tmp-{dead}-0a1b2c3d", "tiny.tmp-0a1b2c3d",  # no pid: an old-style name
            "tiny"]
    for d in stale + kept:
        (art / d).mkdir(parents=True)
        (art / d / "f").write_text("x")
    removed = publish.sweep_stale_siblings(str(final), log=lambda *_: None)
    assert sorted(os.path.basename(p) for p in removed) == sorted(stale)
    assert sorted(os.listdir(art)) == sorted(kept)


def test_tmp_sibling_carries_the_pid(tmp_path):
    from micrec_tf import publish

    name = os.path.basename(publish.tmp_sibling(str(tmp_path / "tiny")))
    prefix, pid, rand = name.rsplit("-", 2)
    assert prefix == "tiny.tmp" and pid == str(os.getpid()) and len(rand) == 8


@pytest.mark.slow  # a real (tiny) Beam job
def test_preprocess_sweeps_what_a_killed_preprocess_left(tmp_path):
    """A real tiny run: the stale temporary of a dead pid goes, the artifacts are published and
    no temporary of this run is left behind."""
    from pipelines import preprocess

    cfg = tiny_config(str(tmp_path))
    art = os.path.dirname(cfg.artifacts_dir)
    dead = _dead_pid()
    stale = os.path.join(art, f"tiny.tmp-{dead}-deadbeef")
    os.makedirs(os.path.join(stale, "examples"))
    preprocess.run(cfg, verbose=False)
    assert not os.path.exists(stale)
    assert sorted(d for d in os.listdir(art) if not d.startswith(".")) == ["tiny"]
    assert os.path.exists(os.path.join(cfg.artifacts_dir, "stats.json"))


@pytest.mark.slow  # a real (tiny) Beam job
def test_sigkilled_preprocess_leaves_a_temporary_the_next_run_removes(tmp_path):
    """A preprocess killed (SIGKILL) mid-run leaves ``tiny.tmp-<its pid>-*`` and its lock file;
    the next run takes the lock over, removes the temporary and publishes."""
    import glob
    import time

    from pipelines import preprocess

    cfg = tiny_config(str(tmp_path))
    art = os.path.dirname(cfg.artifacts_dir)
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.preprocess", "--config",
                             _write_config(tmp_path, _raw(tmp_path))], cwd=ROOT,
                            env=dict(os.environ, PYTHONPATH=ROOT),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        left = []
        while not left and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
            left = glob.glob(os.path.join(art, f"tiny.tmp-{proc.pid}-*"))
        assert left and proc.poll() is None, "the run finished before a temporary was seen"
    finally:
        _kill(proc)
    assert os.path.isdir(left[0]) and not os.path.exists(cfg.artifacts_dir)
    preprocess.run(cfg, verbose=False)
    assert sorted(d for d in os.listdir(art) if not d.startswith(".")) == ["tiny"]
    assert os.path.exists(os.path.join(cfg.artifacts_dir, "stats.json"))

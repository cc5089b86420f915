"""The daily update's window split (micrec_tf/update.py, issue 29): by default the window is
split [0.9, 0.1, 0.0] (no test split: the newest clicks are trained on, the validation tail is
kept); ``split_fractions="config"`` / ``--split-fractions`` select the config's fractions (the
update of before: 80/10/10, the test split evaluated at the end).

References: the window's clicks counted in plain Python at the ``global_time`` boundaries
(ranks ``floor(f n + 0.5)`` in time order, clicks tied with a boundary's timestamp go to the
later split: pipelines/split.py), the files the run writes (``metrics.json`` keys) and
hand-written values for the argument parsing.
"""
from __future__ import annotations

import json
import math
import os

import pytest
import yaml

from tests.conftest import tiny_config


# ------------------------------------------------------------------------------------------
# Fast: the fractions an update uses
# ------------------------------------------------------------------------------------------
def test_update_split_fractions_default_config_and_explicit():
    from micrec_tf.config import ConfigError
    from micrec_tf.update import UpdateError, update_split_fractions

    cfg = tiny_config("/tmp/unused")
    assert cfg.preprocess.split_fractions == [0.8, 0.1, 0.1]  # the config's default
    assert update_split_fractions(cfg) == [0.9, 0.1, 0.0]
    assert update_split_fractions(cfg, "config") == [0.8, 0.1, 0.1]
    own = cfg.replace({"preprocess.split_fractions": [0.7, 0.2, 0.1]})
    assert update_split_fractions(own) == [0.9, 0.1, 0.0]  # the config is not read by default
    assert update_split_fractions(own, "config") == [0.7, 0.2, 0.1]
    assert update_split_fractions(cfg, (0.5, 0.25, 0.25)) == [0.5, 0.25, 0.25]
    with pytest.raises(ConfigError, match="preprocess.split_fractions"):
        update_split_fractions(cfg, [0.5, 0.5, 0.5])
    with pytest.raises(UpdateError, match="Received: 'cfg'"):
        update_split_fractions(cfg, "cfg")


def test_stage_configs_takes_the_window_fractions(tmp_path):
    from micrec_tf.update import stage_configs

    cfg = tiny_config(str(tmp_path))
    prev = {"artifacts_dir": str(tmp_path / "prev"), "version_dir": str(tmp_path / "v1")}
    gen = str(tmp_path / "gen")
    assert stage_configs(cfg, str(tmp_path), prev, gen).preprocess.split_fractions == [
        0.8, 0.1, 0.1]
    got = stage_configs(cfg, str(tmp_path), prev, gen, [0.9, 0.1, 0.0])
    assert got.preprocess.split_fractions == [0.9, 0.1, 0.0]


def test_split_fractions_flag_parsing_and_refusals(tmp_path, capsys):
    from micrec_tf import cli
    from micrec_tf.update import CONFIG_FRACTIONS, UpdateError, _fractions_arg, main

    assert _fractions_arg("0.8,0.1,0.1") == [0.8, 0.1, 0.1]
    assert _fractions_arg("1,0,0") == [1.0, 0.0, 0.0]
    assert _fractions_arg("config") == CONFIG_FRACTIONS
    with pytest.raises(UpdateError, match="comma-separated"):
        _fractions_arg("0.9;0.1;0")
    cfg = tiny_config(str(tmp_path))
    path = str(tmp_path / "config.yaml")
    with open(path, "w", encoding="utf-8") as fh:
        yaml.safe_dump(cfg.to_dict(), fh)
    window = tmp_path / "window"
    window.mkdir()
    for bad, says in (("0.5,0.6", "split_fractions"), ("a,b,c", "--split-fractions")):
        assert cli.run(main, ["--config", path, "--window", str(window),
                              "--split-fractions", bad]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and says in err[0], err
    assert not os.path.exists(cfg.export_dir)


def test_cost_line_names_the_split():
    from micrec_tf.update import format_cost

    record = {"timing_s": {}, "rows_added": {}, "window_clicks": {"train": 9, "valid": 1,
                                                                   "test": 0},
              "examples": {}, "previous": {"version": 1}, "version": 2, "version_dir": "v",
              "generation": 1, "epochs_run": 1, "optimizer_iterations": 1,
              "split_fractions": [0.9, 0.1, 0.0], "evaluated_test": False}
    assert any(line.endswith("; split 0.9/0.1/0 (no test evaluation)")
               for line in format_cost(record))
    record.update(split_fractions=[0.8, 0.1, 0.1], evaluated_test=True)
    assert any(line.endswith("; split 0.8/0.1/0.1") for line in format_cost(record))


# ------------------------------------------------------------------------------------------
# Slow: a real update on the tiny synthetic clicks
# ------------------------------------------------------------------------------------------
def _window_counts(times, fractions):
    """Plain-Python global_time split of clicks at ``times``: (train, valid, test) counts."""
    ts = sorted(times)
    n = len(ts)
    c1 = min(n, int(math.floor(fractions[0] * n + 0.5)))
    c2 = min(n, max(c1, int(math.floor((fractions[0] + fractions[1]) * n + 0.5))))
    b1 = ts[c1] if c1 < n else None
    b2 = ts[c2] if c2 < n else None
    test = sum(1 for t in ts if b2 is not None and t >= b2)
    valid = sum(1 for t in ts if b1 is not None and t >= b1) - test
    return n - valid - test, valid, test


@pytest.fixture(scope="module")
def initial(tmp_path_factory):
    """(cfg, window dir, initial version dir): the set-up of tests/test_update.py."""
    from export.export_model import export_run
    from micrec_tf.data.synthetic import ensure_generated
    from micrec_tf.train import train
    from pipelines import preprocess
    from tests.test_update import _split

    tmp = str(tmp_path_factory.mktemp("update_split"))
    raw = ensure_generated(tiny_config(tmp))
    _split(raw, os.path.join(tmp, "initial"), os.path.join(tmp, "window"))
    cfg = tiny_config(tmp, data={"dataset": "canonical",
                                 "data_dir": os.path.join(tmp, "initial")},
                      model={"cl": []}, train={"epochs": 1},
                      export={"index": "brute_force", "top_k": 20})
    preprocess.run(cfg, verbose=False)
    train(cfg, evaluate_test=False, log=lambda *a: None)
    return cfg, os.path.join(tmp, "window"), export_run(cfg, log=lambda *a: None)


def _window_times(window):
    with open(os.path.join(window, "interactions.tsv"), encoding="utf-8") as fh:
        return [int(ln.rstrip("\n").split("\t")[2]) for ln in fh.readlines()[1:]]


def _own(cfg, tmp_path, v0_dir):
    """``cfg`` with its own update folder and export root serving a copy of the version."""
    import shutil

    own = cfg.replace({"artifacts_root": str(tmp_path / "artifacts"),
                       "export.exports_dir": str(tmp_path / "exports")})
    os.makedirs(own.export_dir)
    shutil.copytree(v0_dir, os.path.join(own.export_dir, os.path.basename(v0_dir)))
    return own


@pytest.mark.slow
def test_default_update_trains_on_90_percent_and_writes_no_test_split(initial, tmp_path):
    from micrec_tf.data.arrays import load_split_arrays
    from micrec_tf.data.contract import ITEM
    from micrec_tf.update import run_update

    base, window, v0_dir = initial
    cfg = _own(base, tmp_path, v0_dir)
    times = _window_times(window)
    train_n, valid_n, test_n = _window_counts(times, [0.9, 0.1, 0.0])
    assert test_n == 0 and valid_n > 0
    # Not vacuous: the old fractions train on fewer clicks.
    assert _window_counts(times, [0.8, 0.1, 0.1])[0] < train_n
    lines = []
    record = run_update(cfg, window, log=lines.append)
    assert record["split_fractions"] == [0.9, 0.1, 0.0] and record["evaluated_test"] is False
    assert record["window_clicks"] == {"train": train_n, "valid": valid_n, "test": 0}
    with open(os.path.join(record["artifacts_dir"], "stats.json"), encoding="utf-8") as fh:
        stats = json.load(fh)
    assert stats["num_examples"]["test"] == 0 and record["examples"]["test"] == 0
    assert stats["split_fractions"] == [0.9, 0.1, 0.0]
    assert len(load_split_arrays(record["artifacts_dir"], "test")[ITEM]) == 0
    with open(os.path.join(record["run_dir"], "metrics.json"), encoding="utf-8") as fh:
        metrics = json.load(fh)
    assert "test" not in metrics and "valid" in metrics
    assert metrics["valid"]["num_examples"] > 0
    assert any("(no test evaluation)" in line for line in lines)


@pytest.mark.slow
def test_config_fractions_give_the_update_of_before(initial, tmp_path):
    from micrec_tf.update import run_update

    base, window, v0_dir = initial
    cfg = _own(base, tmp_path, v0_dir)
    train_n, valid_n, test_n = _window_counts(_window_times(window), [0.8, 0.1, 0.1])
    assert test_n > 0
    record = run_update(cfg, window, log=lambda *a: None, split_fractions="config")
    assert record["split_fractions"] == [0.8, 0.1, 0.1] and record["evaluated_test"] is True
    assert record["window_clicks"] == {"train": train_n, "valid": valid_n, "test": test_n}
    with open(os.path.join(record["run_dir"], "metrics.json"), encoding="utf-8") as fh:
        metrics = json.load(fh)
    assert metrics["test"]["num_examples"] == record["examples"]["test"] > 0

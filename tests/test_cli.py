"""Every entry point: a user error is one ``error: ...`` line and exit 2, no traceback.

``--debug`` (or ``MICREC_DEBUG=1``) brings the traceback back.
"""
import os
import re
import subprocess
import sys

import pytest
import yaml

from micrec_tf import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENTRY_POINTS = ("micrec_tf.train", "export.export_model", "pipelines.preprocess",
                "pipelines.title_neighbours", "micrec_tf.retrieve", "micrec_tf.data.synthetic",
                "experiments.reproduce", "experiments.investigate", "experiments.cold_start",
                "experiments.content_control", "experiments.rolling",
                "experiments.reference_rows", "benchmarks")


def _config(tmp_path, data, name="c.yaml"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return str(path)


def _cases(tmp_path):
    """``(argv, text the one line must contain)`` for each kind of config/CLI error."""
    good = _config(tmp_path, {"name": "x"}, "good.yaml")
    return [
        (["--config", _config(tmp_path, {"loss": {"lambda_sesion": 0.1}})], "lambda_sesion"),
        (["--config", _config(tmp_path, {"train": {"epochs": "many"}}, "t.yaml")],
         "train.epochs must be an integer, got 'many'"),
        (["--config", _config(tmp_path, "train: [unclosed\n", "y.yaml")], "not valid YAML"),
        (["--config", str(tmp_path / "missing.yaml")], "config file not found"),
        (["--config", good, "--set", "train.epochs"], "key=value, got 'train.epochs'"),
        (["--config", good, "--set", "train.epoch=3"], "unknown config key 'train.epoch'"),
        (["--config", _config(tmp_path, {"data": {"dataset": "movielens_1m"}}, "d.yaml")],
         "data.data_dir is missing"),
    ]




def test_each_config_error_is_one_line_and_exit_2(tmp_path, capsys):
    from micrec_tf.train import main

    for argv, needle in _cases(tmp_path):
        assert cli.run(main, argv) == 2, argv
        out, err = capsys.readouterr()
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err
        assert "Traceback" not in out + err


def test_debug_keeps_the_traceback(tmp_path, monkeypatch):
    from micrec_tf.config import ConfigError
    from micrec_tf.train import main

    argv, _ = _cases(tmp_path)[0]
    with pytest.raises(ConfigError, match="lambda_sesion"):
        cli.run(main, argv + ["--debug"])
    monkeypatch.setenv(cli.DEBUG_ENV, "1")
    with pytest.raises(ConfigError, match="lambda_sesion"):
        cli.run(main, argv)


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_every_entry_point_prints_one_line(module, tmp_path):
    """A real process per entry point: the error line is all it prints, and it exits 2."""
    bad = _config(tmp_path, {"loss": {"lambda_sesion": 0.1}})
    proc = subprocess.run([sys.executable, "-m", module, "--config", bad], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and "lambda_sesion" in lines[0], \
        lines


def test_a_bug_keeps_its_traceback():
    """Only user errors are shortened: anything else is a bug and keeps its traceback."""
    def main(argv):
        raise KeyError("num_leaves_to_search")

    with pytest.raises(KeyError):
        cli.run(main, [])


NOISE = re.compile(r"WARNING|W0000|E0000|I0000|cuInit|oneDNN|apitools|Unparseable|Traceback")


def test_pipelines_print_only_their_own_lines(tmp_path):
    """Quiet logs: the Beam jobs' output on a CPU machine is their own summary, nothing else
    (no TensorFlow, absl or Beam warnings)."""
    cfg = _config(tmp_path, {
        "name": "quiet", "artifacts_root": str(tmp_path / "artifacts"),
        "data": {"dataset": "synthetic", "data_dir": str(tmp_path / "raw"),
                 "synthetic": {"num_users": 40, "num_items": 60, "num_events": 800,
                               "num_topics": 4, "seed": 1}},
        "preprocess": {"num_shards": 1}})
    for module, first in (("pipelines.preprocess", "preprocess: quiet"),
                          ("pipelines.title_neighbours", "title_neighbours: quiet")):
        proc = subprocess.run([sys.executable, "-m", module, "--config", cfg], cwd=ROOT,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert proc.stdout.startswith(first), proc.stdout
        noise = [line for line in (proc.stdout + proc.stderr).splitlines() if NOISE.search(line)]
        assert not noise and not proc.stderr.strip(), proc.stderr


def _malformed_cases(tmp_path):
    """``(argv, text the one line must contain)`` for config files and overrides that cannot be
    read at all (each was a traceback before)."""
    good = _config(tmp_path, {"name": "x"}, "good.yaml")
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("name: x\ntrain:\n  epochs: 3 # caf\u00e9\n".encode("latin-1"))
    return [
        (["--config", good, "--set", "model.cl=[feature"], "--set model.cl=[feature"),
        (["--config", str(tmp_path)], "is a directory"),
        (["--config", str(latin1)], "is not UTF-8: byte 0xe9 at line 3"),
        (["--config", _config(tmp_path, "- name: x\n", "list.yaml")], "must be a mapping"),
        (["--config", good, "--set", "train.learning_rate=.nan"],
         "train.learning_rate must be a finite number, got nan"),
    ]


def test_malformed_configs_are_one_line_and_exit_2(tmp_path, capsys):
    from micrec_tf.train import main

    for argv, needle in _malformed_cases(tmp_path):
        assert cli.run(main, argv) == 2, argv
        out, err = capsys.readouterr()
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err
        assert "Traceback" not in out + err


def test_bad_yaml_override_in_a_real_process(tmp_path):
    """The issue's case, end to end: ``--set 'model.cl=[feature'`` printed 52 lines, exit 1."""
    good = _config(tmp_path, {"name": "x"}, "good.yaml")
    proc = subprocess.run([sys.executable, "-m", "micrec_tf.train", "--config", good,
                           "--set", "model.cl=[feature"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stdout + proc.stderr
    assert lines[0].startswith("error: --set model.cl=[feature is not valid YAML"), lines


@pytest.mark.parametrize("parse,good,bad", [
    (cli.positive_int, [("1", 1), ("12", 12)], ["0", "-3", "x", "1.5"]),
    (cli.non_negative_int, [("0", 0), ("7", 7)], ["-1", "x", "2.0"]),
    (cli.one_of("fixed", "poisson"), [("fixed", "fixed"), ("poisson", "poisson")],
     ["burst", "", "Fixed"]),
])
def test_argparse_types_accept_and_name_the_bad_value(parse, good, bad):
    import argparse
    for text, want in good:
        assert parse(text) == want
    for text in bad:
        with pytest.raises(argparse.ArgumentTypeError, match=f"Received: {re.escape(repr(text))}"):
            parse(text)

"""``python -m micrec_tf.retrieve``: user errors are one line (exit 2), profiles print in order.

One tiny trained run (1 epoch) and its export over the session's preprocessed ``tiny_pipeline``
artifacts, in this module's own runs/exports directories.
"""
import json
import os
import re
import subprocess
import sys
import types

import pytest
import yaml

from micrec_tf import cli
from conftest import ROOT, tiny_config


@pytest.fixture(scope="module")
def env(tiny_pipeline, tmp_path_factory):
    from export import export_model
    from micrec_tf.train import train

    _, tmp = tiny_pipeline
    root = tmp_path_factory.mktemp("retrieve_cli")
    cfg = tiny_config(tmp, train={"epochs": 1, "runs_dir": str(root / "runs")},
                      export={"exports_dir": str(root / "exports"), "index": "brute_force"})
    train(cfg, evaluate_test=False, log=lambda *a: None)
    export_model.export_run(cfg, log=lambda *a: None)
    cfg_path = root / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg.to_dict()))
    with open(os.path.join(cfg.artifacts_dir, "examples", "feature_spec.json")) as fh:
        user_fields = json.load(fh)["user_fields"]
    return types.SimpleNamespace(cfg=cfg, cfg_path=str(cfg_path), user_fields=user_fields)


def _retrieve(env, *args, capsys):
    """In-process ``python -m micrec_tf.retrieve``: (exit code, stdout, stderr)."""
    from micrec_tf import retrieve

    code = cli.run(retrieve.main, ["--config", env.cfg_path, *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_unknown_user_is_one_line_without_traceback(env):
    proc = subprocess.run([sys.executable, "-m", "micrec_tf.retrieve", "--config", env.cfg_path,
                           "--user", "nobody", "--k", "5"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "'nobody'" in errors[0] and "test split" in errors[0], errors[0]
    assert proc.stdout == ""


def test_unknown_user_names_the_split(env, capsys):
    code, out, err = _retrieve(env, "--user", "u0", "--user", "nobody", "--split", "valid",
                               capsys=capsys)
    assert code == cli.EXIT_USAGE and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ")
    assert "'nobody'" in err and "valid split" in err and "Traceback" not in err


@pytest.mark.parametrize("flag", ["--k", "--num-users"])
def test_non_positive_counts_are_usage_errors(env, capsys, flag):
    code, out, err = _retrieve(env, flag, "0", capsys=capsys)
    assert code == cli.EXIT_USAGE and out == ""
    assert err.startswith(f"error: {flag} must be a positive integer. Received: 0")


def test_profile_fields_print_in_the_declared_order(env, capsys):
    """The profile line lists the feature spec's ``user_fields`` in their order, every time."""
    code, first, _ = _retrieve(env, "--num-users", "3", "--k", "5", capsys=capsys)
    assert code == 0
    profiles = re.findall(r"^user (\S+) \((.*)\)$", first, flags=re.M)
    assert len(profiles) == 3
    for _, profile in profiles:
        assert re.findall(r"(\w+)=", profile) == env.user_fields, profile
    users = [u for u, _ in profiles]
    code, again, _ = _retrieve(env, *[a for u in reversed(users) for a in ("--user", u)],
                               "--k", "5", capsys=capsys)
    assert code == 0
    blocks = dict(zip(users, re.split(r"^(?=user )", first, flags=re.M)[1:]))
    for user, block in zip(reversed(users), re.split(r"^(?=user )", again, flags=re.M)[1:]):
        _assert_same_block(block, blocks[user])


# A printed top-k row: rank, item id, score (4 decimals), title.
_ROW = re.compile(r"^ +(\d+)  (\S+) +(-?\d+\.\d{4})  (.*)$", re.M)


def _assert_same_block(got: str, want: str) -> None:
    """One user's printout, equal up to float32 rounding: the user's vector comes from a batch
    of another order or size, and oneDNN picks its kernels by shape and instruction set (on AVX2
    the bits differ), so a printed score may move by one unit of its last digit and near-tied
    items may trade places; every other line is the same."""
    assert _ROW.sub("", got) == _ROW.sub("", want), (got, want)
    rows_got, rows_want = _ROW.findall(got), _ROW.findall(want)
    assert [r[0] for r in rows_got] == [r[0] for r in rows_want], (got, want)
    for g, w in zip(rows_got, rows_want):  # position by position: a swap only among near-ties
        assert abs(float(g[2]) - float(w[2])) <= 1.5e-4, (got, want)
    assert sorted((r[1], r[3]) for r in rows_got) == sorted((r[1], r[3]) for r in rows_want)

"""experiments.option_check on the tiny pipeline: the option's runs are paired by seed with the
committed reproduction's runs, which are read and never retrained or rewritten.

References: the runs' own JSON files read directly (their test metrics, their configs), the
committed files' bytes before and after, scipy's paired t-test on those numbers.
"""
import glob
import json
import os

import numpy as np
import pytest
from scipy import stats

from experiments.option_check import option_check, parse_options
from experiments.reproduce import reproduce
from micrec_tf.config import ConfigError


def test_parse_options():
    assert parse_options(["train.mixed_precision=bfloat16", "train.optimizer=lazy_adam"]) == {
        "train.mixed_precision": "bfloat16", "train.optimizer": "lazy_adam"}
    assert parse_options(["train.learning_rate=0.5"]) == {"train.learning_rate": 0.5}
    with pytest.raises(ConfigError, match="--option must be KEY=VALUE. Received: 'x'"):
        parse_options(["x"])
    with pytest.raises(ConfigError, match="unknown config key 'train.nope'"):
        parse_options(["train.nope=1"])
    with pytest.raises(ConfigError, match="train.mixed_precision"):
        parse_options(["train.mixed_precision=half"])
    with pytest.raises(ConfigError, match="at least one --option"):
        parse_options([])


@pytest.mark.slow
def test_option_check_pairs_with_the_committed_runs(tiny_pipeline, tmp_path):
    cfg, _ = tiny_pipeline
    cfg = cfg.replace({"train.epochs": 2, "name": "tiny", "train.early_stopping_patience": 2})
    out = str(tmp_path / "results")
    reproduce(cfg, variants=["ICAN"], seeds=2, sparsity=False, grid="small", out_dir=out,
              command="test", log=lambda *a: None)
    committed = {p: open(p, "rb").read()
                 for p in glob.glob(os.path.join(out, "runs", "tiny", "**", "*.json"),
                                    recursive=True)}
    logs = []
    md_path = option_check(cfg, {"train.optimizer": "fused_adam"}, "fused", ["ICAN"], 2,
                           out_dir=out, command="test", log=logs.append)
    # The committed runs are untouched; the option's runs are new files with the option set.
    now = glob.glob(os.path.join(out, "runs", "tiny", "**", "*.json"), recursive=True)
    assert sorted(now) == sorted(committed)
    assert all(open(p, "rb").read() == b for p, b in committed.items())
    option_runs = sorted(glob.glob(os.path.join(out, "runs", "tiny-fused", "**", "*.json"),
                                   recursive=True))
    assert len(option_runs) == 2
    raw = json.load(open(os.path.join(out, "tiny.json")))
    seed0 = next(t["key"] for t in raw["trials"]["ICAN"]
                 if t["setting"] == raw["settings"]["ICAN"])
    pairs = [(os.path.join(out, "runs", "tiny", f"{seed0}.json"),
              os.path.join(out, "runs", "tiny-fused", f"{seed0}.json")),
             (os.path.join(out, "runs", "tiny", "ican", "seed1.json"),
              os.path.join(out, "runs", "tiny-fused", "ican", "seed1.json"))]
    base = [json.load(open(a)) for a, _ in pairs]
    opt = [json.load(open(b)) for _, b in pairs]
    for b, o in zip(base, opt):
        assert o["config"]["train"]["optimizer"] == "fused_adam"
        assert b["config"]["train"]["optimizer"] == "adam"
        assert o["seed"] == b["seed"] and o["overrides"] == b["overrides"]
    js = json.load(open(os.path.join(out, "tiny-fused.json")))
    main = js["metric"]
    assert main == f"hit@{cfg.eval.hit_n[0]}"
    row = js["rows"]["ICAN"]
    b50 = [r["test"][main] for r in base]
    o50 = [r["test"][main] for r in opt]
    assert row["base"][main] == b50 and row["option"][main] == o50
    assert row["change"] == pytest.approx(np.mean(o50) / np.mean(b50) - 1.0)
    diff = np.subtract(o50, b50)
    if np.ptp(diff) > 0:
        assert row["p"] == pytest.approx(stats.ttest_rel(b50, o50).pvalue)
    else:  # equal differences: the t statistic is undefined
        assert np.isnan(row["p"])
    md = open(md_path).read()
    assert "| ICAN | base | 2 |" in md and "| ICAN | option | 2 |" in md
    assert "`train.optimizer: fused_adam`" in md and "Partial" not in md
    # A second call trains nothing; a missing committed run is reported, never retrained.
    os.remove(pairs[1][0])
    logs.clear()
    partial = open(option_check(cfg, {"train.optimizer": "fused_adam"}, "fused", ["ICAN"], 2,
                                out_dir=out, command="test", log=logs.append)).read()
    assert not any(str(m).startswith("[reproduce] run ") for m in logs)
    assert not os.path.exists(pairs[1][0])
    assert "**Partial**: 1 run(s) missing" in partial and "`ican/seed1`" in partial
    assert "| ICAN | base | 1 |" in partial

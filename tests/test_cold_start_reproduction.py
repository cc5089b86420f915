"""experiments.cold_start: which runs the item-cold-start reproduction makes, what it chooses and
what it reports, with training replaced by a function of the config (no TensorFlow run): every
choice must be the argmax of cold-validation HIT@50 over the trials, rows must start from their
base row's choice, and the p-values must be scipy's paired t-test on the per-seed numbers."""
from __future__ import annotations

import json
import os

import pytest
from scipy import stats

from experiments import cold_start
from micrec_tf.config import ConfigError
from tests.conftest import tiny_config

_KEYS = [k for _, k in cold_start.COLUMNS]


def _score(cfg) -> float:
    """A made-up cold-validation HIT@50 with a unique best per grid."""
    s = 0.3 + (0.02 if cfg.train.learning_rate == 0.003 else 0.0)
    s += 0.01 * (cfg.loss.num_negatives == 500) + 0.05 * cfg.model.item_text
    s += 0.1 * cfg.loss.id_dropout - 0.2 * (cfg.loss.id_dropout > 0.6)
    s += 0.001 * len(cfg.model.cl) + 0.003 * (cfg.loss.temperature == 0.5)
    return round(s, 6)


@pytest.fixture
def fake(monkeypatch, tmp_path):
    import micrec_tf.train

    calls = []

    def train(cfg, run_dir=None, evaluate_test=True, log=print):
        calls.append(cfg)
        v = _score(cfg)
        seed = cfg.train.seed
        t = v + 0.01 * seed * (1 + len(cfg.model.cl)) + 0.004 * (seed == 2) * cfg.model.item_text
        t -= 0.05 * (cfg.model.name == "tfrs_two_tower")
        return {"valid": {"hit@50": 0.0}, "test": {"hit@50": 0.0}, "history": {},
                "best_epoch": 3, "epochs_run": 6, "stopped_early": True,
                "cold_start": {"valid": {k: v for k in _KEYS},
                               "test": {k: t for k in _KEYS}}}

    monkeypatch.setattr(micrec_tf.train, "train", train)
    monkeypatch.setattr(cold_start, "content_baseline", lambda cfg, d, log=print: {
        "variant": "tags", "valid_scores": {"tags": 0.2, "text": 0.1}, "seconds": 1.0,
        "test": {k: 0.25 for k in _KEYS}})
    cfg = tiny_config(str(tmp_path), preprocess={"split": "item_cold_start",
                                                 "item_vocabulary": "catalogue"},
                      train={"early_stopping_patience": 2, "epochs": 5})
    return cfg, calls, tmp_path


def test_choices_inheritance_and_report(fake):
    cfg, calls, tmp = fake
    out = str(tmp / "results")
    md_path = cold_start.reproduce_cold_start(cfg, seeds=4, out_dir=out, log=lambda *a: None)
    with open(os.path.join(out, f"{cfg.name}.json")) as fh:
        js = json.load(fh)
    settings = js["settings"]
    # no-base rows: lr 0.003 x 500 negatives wins the grid; the option (no history mask) does not
    # change the made-up score, so it is not kept (only a better score is)
    assert settings["ICAN + text"] == {"train.learning_rate": 0.003, "loss.num_negatives": 500}
    # the dropout row starts from ICAN + text's choice; 0.5 is the best probability (0.75 loses)
    assert settings[cold_start.DROP] == {**settings["ICAN + text"], "loss.id_dropout": 0.5}
    trials = js["trials"][cold_start.DROP]
    assert [t["setting"]["loss.id_dropout"] for t in trials[:4]] == [0.1, 0.25, 0.5, 0.75]
    assert trials[4].get("option") and trials[4]["setting"]["train.learning_rate"] == 0.001
    # CL rows inherit the dropout row's setting and choose among the CL grid (tau 0.5 wins)
    final = settings[cold_start.FINAL]
    assert final["loss.id_dropout"] == 0.5 and final["loss.temperature"] == 0.5
    # the same CL grid on ICAN + text's setting: no ID dropout, the same trial budget
    no_drop = settings[cold_start.FINAL_NO_DROP]
    assert "loss.id_dropout" not in no_drop and no_drop["loss.temperature"] == 0.5
    assert {k: v for k, v in no_drop.items() if k.startswith("train.") or k in (
        "loss.num_negatives",)} == settings["ICAN + text"]
    assert len(js["trials"][cold_start.FINAL_NO_DROP]) == len(js["trials"][cold_start.FINAL])
    assert js["rows"][cold_start.FINAL_NO_DROP]["seeds"] == [0, 1, 2, 3]
    # its runs (trials + seeds 1-3) are the only MicRec runs trained without ID dropout
    no_drop_runs = [c for c in calls if len(c.model.cl) == 3 and c.loss.id_dropout == 0.0]
    assert len(no_drop_runs) == len(js["trials"][cold_start.FINAL_NO_DROP]) + 3
    for name, rows in js["trials"].items():
        scores = [t["valid"] for t in rows]
        chosen = [t for t in rows if t["setting"] == settings[name]]
        assert chosen and chosen[0]["valid"] == max(scores), name
    # every trained config is an item-cold-start one; the main rows ran the 4 seeds asked, the
    # CL-terms-alone rows 3 (ALONE_SEEDS)
    assert all(c.preprocess.split == "item_cold_start" for c in calls)
    assert js["rows"][cold_start.FINAL]["seeds"] == [0, 1, 2, 3]
    assert js["rows"][f"{cold_start.DROP} + sem"]["seeds"] == [0, 1, 2]
    # p-values: scipy's paired t-test of the final row vs ICAN on the per-seed cold HIT@50
    fin = [r["cold/hit@50"] for r in js["rows"][cold_start.FINAL]["test"]]
    ican = [r["cold/hit@50"] for r in js["rows"]["ICAN"]["test"]]
    md = open(md_path).read()
    p = stats.ttest_rel(fin, ican).pvalue
    assert 0 < p < 1
    assert f"{p:.3g}" in md.split("| ICAN |")[1].split("\n")[0]
    assert "Content profile (non-neural) (variant tags)" in md and "Partial" not in md
    # a second call trains nothing (everything is cached)
    n = len(calls)
    cold_start.reproduce_cold_start(cfg, seeds=4, out_dir=out, log=lambda *a: None)
    assert len(calls) == n


def test_cached_only_reports_partial(fake):
    cfg, calls, tmp = fake
    md = open(cold_start.reproduce_cold_start(cfg, seeds=1, out_dir=str(tmp / "r"),
                                              cached_only=True, log=lambda *a: None)).read()
    assert not calls and "**Partial**" in md and "not run yet" in md


def test_refuses_a_config_without_the_protocol(tmp_path):
    with pytest.raises(ConfigError, match="Received: 'global_time'"):
        cold_start.check_config(tiny_config(str(tmp_path)))
    cfg = tiny_config(str(tmp_path), preprocess={"split": "item_cold_start"})
    with pytest.raises(ConfigError, match="item_vocabulary=catalogue. Received: 'clicked'"):
        cold_start.check_config(cfg)

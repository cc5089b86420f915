"""experiments.content_control: the synthetic control of the item-cold-start gain (issue 28, item
6). The fast tests replace training (and the artifact build) by fakes: they check which runs the
control makes for each content_topic_p, that the two values get separate artifacts and caches,
and that the gains and p-values in the report are a hand computation (numpy means, scipy's
ttest_rel) on the fake per-seed numbers. The slow test builds the data and artifacts of both
values at a tiny size and checks them against the generator at its default and the raw files."""
from __future__ import annotations

import csv
import filecmp
import json
import os

import numpy as np
import pytest
from scipy import stats

from experiments import cold_start
from experiments import content_control as cc
from micrec_tf.config import ConfigError
from tests.conftest import tiny_config

_KEYS = [k for _, k in cold_start.COLUMNS]
TEXT, DROP, FINAL, SEM = cc.TEXT, cc.DROP, cc.FINAL, cc.SEM

# Made-up test cold HIT@50 per (content_topic_p, row) for seeds 0, 1, 2. At p 0, MicRec (final)
# is within noise of ICAN + text and semantic CL alone is consistently above it (a "leak").
COLD = {
    (0.0, TEXT): [0.300, 0.310, 0.290], (0.0, DROP): [0.302, 0.305, 0.299],
    (0.0, FINAL): [0.305, 0.306, 0.296], (0.0, SEM): [0.321, 0.329, 0.311],
    (1.0, TEXT): [0.400, 0.410, 0.420], (1.0, DROP): [0.430, 0.425, 0.445],
    (1.0, FINAL): [0.500, 0.490, 0.530], (1.0, SEM): [0.460, 0.470, 0.450],
}


def _all(cold: float, seed: int) -> float:
    """The made-up test all HIT@50 of a run whose cold HIT@50 is ``cold``."""
    return round(0.1 + 0.5 * cold - 0.003 * seed * seed, 6)


def _row(cfg) -> str:
    """Which of the control's rows a trained config is (anything else fails the test)."""
    assert cfg.model.name == "ican" and cfg.model.item_text, cfg.model
    if cfg.model.cl == [] and cfg.loss.id_dropout == 0.0:
        return TEXT
    if cfg.model.cl == []:
        return DROP
    if sorted(cfg.model.cl) == ["feature", "semantic", "session"]:
        return FINAL
    assert cfg.model.cl == ["semantic"], cfg.model.cl
    return SEM


def _valid(cfg) -> float:
    """A made-up cold-validation HIT@50 with a unique best per grid (lr 0.003, ID dropout 0.5,
    temperature 0.5)."""
    s = 0.3 + 0.02 * (cfg.train.learning_rate == 0.003) + 0.1 * cfg.loss.id_dropout
    s += 0.003 * (cfg.loss.temperature == 0.5) + 0.05 * cfg.data.synthetic.content_topic_p
    return round(s, 6)


@pytest.fixture
def fake(monkeypatch, tmp_path):
    import micrec_tf.train

    calls, builds = [], []

    def train(cfg, run_dir=None, evaluate_test=True, log=print):
        calls.append(cfg)
        p, seed = cfg.data.synthetic.content_topic_p, cfg.train.seed
        cold = COLD[(p, _row(cfg))][seed]
        v = _valid(cfg)
        test = {k: cold for k in _KEYS}
        test["all/hit@50"] = _all(cold, seed)
        test["cold/num_candidates"] = 80
        return {"valid": {"hit@50": 0.0}, "test": {"hit@50": 0.0}, "history": {},
                "best_epoch": 4, "epochs_run": 7, "stopped_early": True,
                "cold_start": {"valid": {k: v for k in _KEYS}, "test": test}}

    def build(cfg, log=print):
        builds.append(cfg)
        os.makedirs(cfg.artifacts_dir, exist_ok=True)
        with open(os.path.join(cfg.artifacts_dir, "stats.json"), "w") as fh:
            json.dump({"items": 300, "events": 4000 + int(cfg.data.synthetic.content_topic_p)},
                      fh)
        return True

    monkeypatch.setattr(micrec_tf.train, "train", train)
    monkeypatch.setattr(cc, "build_artifacts", build)
    cfg = tiny_config(str(tmp_path), preprocess={"split": "item_cold_start",
                                                 "item_vocabulary": "catalogue"},
                      semantic={"source": "title"},
                      train={"early_stopping_patience": 2, "epochs": 5})
    return cfg, calls, builds, tmp_path


def _hand(p: float, row: str, key: str, ref: str = TEXT) -> tuple:
    """(gain in %, paired p) of ``row`` over ``ref`` from the tables above, by hand."""
    def vals(name):
        cold = COLD[(p, name)]
        return [c if key == "cold/hit@50" else _all(c, s) for s, c in enumerate(cold)]

    a, b = vals(row), vals(ref)
    return 100.0 * (np.mean(a) / np.mean(b) - 1.0), stats.ttest_rel(a, b).pvalue


def test_runs_caches_gains_and_p_values(fake):
    cfg, calls, builds, tmp = fake
    out = str(tmp / "results")
    md_path = cc.content_control(cfg, seeds=3, grid="small", out_dir=out, log=lambda *a: None)
    assert md_path == os.path.join(out, "tiny-control.md")
    # one build per value, each into its own data, artifacts and run folders
    assert [b.data.synthetic.content_topic_p for b in builds] == [0.0, 1.0]
    assert [b.name for b in builds] == ["tiny-p0", "tiny-p1"]
    assert len({b.data.data_dir for b in builds} | {cfg.data.data_dir}) == 3
    assert len({b.artifacts_dir for b in builds}) == 2
    # the runs: only the control's four rows, item cold start, trained on their p's artifacts;
    # the same grid for both values: 3 trials per row (2 + option) + seeds 1 and 2 of each row
    by_p = {}
    for c in calls:
        p = c.data.synthetic.content_topic_p
        assert c.preprocess.split == "item_cold_start" and c.name == f"tiny-p{p:g}"
        by_p.setdefault(p, []).append((_row(c), c.train.seed, c.train.learning_rate,
                                       c.loss.id_dropout, c.loss.temperature,
                                       c.loss.semantic_positives,
                                       c.loss.mask_history_negatives))
    assert sorted(by_p) == [0.0, 1.0]
    assert sorted(by_p[0.0]) == sorted(by_p[1.0])
    for p, runs in by_p.items():
        assert len(runs) == 4 * 3 + 4 * 2
        assert {r[0] for r in runs} == {TEXT, DROP, FINAL, SEM}
        assert sorted(r[1] for r in runs if r[0] == SEM) == [0, 0, 0, 1, 2]
    # separate caches, each run recorded with its own p
    for tag, p in (("p0", 0.0), ("p1", 1.0)):
        root = os.path.join(out, "runs", f"tiny-{tag}")
        files = [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs]
        assert len(files) == 20
        for f in files:
            with open(f) as fh:
                assert json.load(fh)["config"]["data"]["synthetic"]["content_topic_p"] == p
    # gains and p-values: the report's equal the hand computation
    with open(os.path.join(out, "tiny-control.json")) as fh:
        js = json.load(fh)
    md = open(md_path).read()
    for p in (0.0, 1.0):
        gains = js["p_values"][f"{p:g}"]["gains"]
        for row, ref, keys in ((FINAL, TEXT, ("cold/hit@50", "all/hit@50")),
                               (SEM, TEXT, ("cold/hit@50", "all/hit@50")),
                               (DROP, TEXT, ("cold/hit@50", "all/hit@50")),
                               (FINAL, DROP, ("cold/hit@50",)), (SEM, DROP, ("cold/hit@50",))):
            for key in keys:
                g_hand, p_hand = _hand(p, row, key, ref)
                g = gains[ref][row][key]
                assert g["seeds"] == [0, 1, 2]
                assert g["gain_pct"] == pytest.approx(g_hand, rel=1e-9)
                assert g["p"] == pytest.approx(p_hand, rel=1e-9)
        for row in cc.COMPARED:
            g_hand, p_hand = _hand(p, row, "cold/hit@50")
            summary = [ln for ln in md.splitlines() if ln.startswith(f"| {p:g} |")][0]
            assert f"{g_hand:+.1f} % (p {p_hand:.3g}, 3 seeds)" in summary
            g_hand, p_hand = _hand(p, row, "cold/hit@50", DROP)
            table = md.split(f"## content_topic_p {p:g} ")[1].split("Chosen settings")[0]
            line = [ln for ln in table.splitlines() if ln.startswith(f"| {row} |")][0]
            assert line.split(" | ")[5] == f"{g_hand:+.1f} % (p {p_hand:.3g}, 3 seeds)"
        assert "Cold HIT@50 of a random ranking: 0.6250." in md.split(f"content_topic_p {p:g} (")[1]
        assert js["p_values"][f"{p:g}"]["rows"][TEXT]["test"][1]["cold/hit@50"] == \
            COLD[(p, TEXT)][1]
    # the reading flags the made-up significant gain of semantic CL alone at p 0, not MicRec's
    _, p_sem = _hand(0.0, SEM, "cold/hit@50")
    _, p_fin = _hand(0.0, FINAL, "cold/hit@50")
    assert p_sem < 0.05 < p_fin
    reading = md.split("Reading")[1].split("\n## ")[0].splitlines()
    assert "look for a leak" in [ln for ln in reading if f", {SEM} vs {TEXT}:" in ln][0]
    assert "no significant difference" in [ln for ln in reading if f", {FINAL} vs {TEXT}:" in ln][0]
    assert "(chance 0.6250)" in [ln for ln in reading if f", {TEXT}: cold HIT@50" in ln][0]
    assert "Partial" not in md and "not run yet" not in md
    # a second call trains nothing: every run comes from the two caches
    n = len(calls)
    cc.content_control(cfg, seeds=3, grid="small", out_dir=out, log=lambda *a: None)
    assert len(calls) == n


def test_cached_only_builds_and_trains_nothing(fake):
    cfg, calls, builds, tmp = fake
    md = open(cc.content_control(cfg, seeds=2, out_dir=str(tmp / "r"), cached_only=True,
                                 log=lambda *a: None)).read()
    assert not calls and not builds
    assert "**Partial**" in md and "not run yet" in md


def test_folders_per_value_and_refusals(tmp_path):
    cfg = tiny_config(str(tmp_path), preprocess={"split": "item_cold_start",
                                                 "item_vocabulary": "catalogue"},
                      semantic={"source": "title"}, train={"early_stopping_patience": 2})
    assert [cc.p_tag(p) for p in (0.0, 1.0, 0.5)] == ["p0", "p1", "p0.5"]
    half = cc.config_for(cfg, 0.5)
    assert half.name == "tiny-p0.5" and half.data.synthetic.content_topic_p == 0.5
    assert half.data.data_dir == cfg.data.data_dir + "-p0.5"
    assert half.artifacts_dir.endswith("tiny-p0.5") and half.run_dir.endswith("tiny-p0.5")
    cc.check_config(cfg)
    with pytest.raises(ConfigError, match="semantic.source=title .*Received: 'taxonomy'"):
        cc.check_config(cfg.replace({"semantic.source": "taxonomy"}))
    with pytest.raises(ConfigError, match="item_cold_start. Received: 'global_time'"):
        cc.check_config(cfg.replace({"preprocess.split": "global_time"}))


@pytest.mark.slow
def test_build_artifacts_for_both_values(tmp_path):
    """The real build (generator, Beam preprocessing, MiniLM title neighbours) at a tiny size."""
    from micrec_tf.data.synthetic import generate

    cfg = tiny_config(str(tmp_path), preprocess={"split": "item_cold_start",
                                                 "item_vocabulary": "catalogue"},
                      semantic={"source": "title", "top_k": 5})
    built = {p: cc.config_for(cfg, p) for p in cc.P_VALUES}
    for c in built.values():
        assert cc.build_artifacts(c, log=lambda *a: None)
    d0, d1 = built[0.0].data.data_dir, built[1.0].data.data_dir
    # p 1.0 is the generator at its default, byte for byte; p 0 has the same clicks but other
    # side information
    ref = str(tmp_path / "default")
    generate(tiny_config(str(tmp_path)).data.synthetic, ref)
    for name in ("interactions.tsv", "items.tsv", "users.tsv"):
        assert filecmp.cmp(os.path.join(d1, name), os.path.join(ref, name), shallow=False)
    assert filecmp.cmp(os.path.join(d0, "interactions.tsv"), os.path.join(ref, "interactions.tsv"),
                       shallow=False)
    assert not filecmp.cmp(os.path.join(d0, "items.tsv"), os.path.join(ref, "items.tsv"),
                           shallow=False)
    for p, c in built.items():
        art = c.artifacts_dir
        with open(os.path.join(c.data.data_dir, "items.tsv"), encoding="utf-8") as fh:
            raw = {r["item_id"] for r in csv.DictReader(fh, delimiter="\t")}
        with open(os.path.join(art, "vocab", "item_id.txt"), encoding="utf-8") as fh:
            vocab = {ln.rstrip("\n") for ln in fh if ln.strip()}
        assert raw <= vocab  # the catalogue vocabulary holds every item of this p's file
        with open(os.path.join(art, "stats.json")) as fh:
            assert "cold_split" in json.load(fh)
        assert os.listdir(os.path.join(art, "title_embeddings"))
        stamp = os.path.getmtime(os.path.join(art, "stats.json"))
        assert not cc.build_artifacts(c, log=lambda *a: None)  # built: reused, not rebuilt
        assert os.path.getmtime(os.path.join(art, "stats.json")) == stamp


def test_command_line(tmp_path, capsys):
    """``--cached-only`` through the command line writes a partial report; a config without the
    protocol is one error line and exit 2."""
    import yaml

    from micrec_tf import cli

    cfg = tiny_config(str(tmp_path), preprocess={"split": "item_cold_start",
                                                 "item_vocabulary": "catalogue"},
                      semantic={"source": "title"}, train={"early_stopping_patience": 2})
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text(yaml.safe_dump(cfg.to_dict()))
    bad.write_text(yaml.safe_dump(cfg.replace({"preprocess.split": "global_time"}).to_dict()))
    out = tmp_path / "r"
    assert cli.run(cc.main, ["--config", str(good), "--cached-only", "--out", str(out)]) == 0
    md = (out / "tiny-control.md").read_text()
    assert "**Partial**" in md and "--cached-only" in md
    capsys.readouterr()
    assert cli.run(cc.main, ["--config", str(bad), "--cached-only", "--out", str(out)]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("error: ") and "global_time" in err[0]

"""The reproduction runner on the tiny pipeline: report, raw JSON, plots, caching; and the
committed run cache of ml-1m, which must stay valid for the code that reads it."""
import glob
import json
import os

import pytest

from experiments import report, run_cache, variants as V
from experiments.reproduce import reproduce


def test_reproduce_writes_report_and_caches(tiny_pipeline, tmp_path):
    cfg, _ = tiny_pipeline
    cfg = cfg.replace({"train.epochs": 1, "name": "tiny", "train.early_stopping_patience": 2})
    out = str(tmp_path / "results")
    logs = []
    md_path = reproduce(cfg, variants=["ICAN", "MicRec (final)"], seeds=2, sparsity=True,
                        grid="small", out_dir=out, command="test", log=logs.append)
    md = open(md_path).read()
    assert "Table 2" in md and "| ICAN |" in md and "| MicRec (final) |" in md
    assert "Most popular" in md and "Item-kNN" in md
    assert "Sparsity sweep" in md and "| 20% |" in md
    assert "values in effect" in md and "CL cosine, tau" in md  # MicRec's chosen CL values
    assert "training time of the runs it reports" in md
    raw = json.load(open(os.path.join(out, "tiny.json")))
    assert len(raw["per_seed"]["ICAN"]) == 2 and "hit@10" in raw["per_seed"]["ICAN"][0]
    # The chosen settings come from the small grid (plus, if it won, the method option).
    key, alt = V.option_for(V.VARIANTS["ICAN"][1], "small")
    ican = {k: v for k, v in raw["settings"]["ICAN"].items() if k != key}
    assert ican in V.GRIDS["small"][1]
    # MicRec starts from ICAN's chosen setting and tunes only the CL knobs.
    key, _ = V.option_for(V.VARIANTS["MicRec (final)"][1], "small")
    mic = {k: v for k, v in raw["settings"]["MicRec (final)"].items() if k != key}
    assert mic in [{**raw["settings"]["ICAN"], **t} for t in V.GRIDS["small"][0]]
    for png in ("hit_at_n.png", "coverage.png", "loss_curves.png", "sparsity.png"):
        assert os.path.getsize(os.path.join(out, "tiny", png)) > 1000, png
    # Second call: every run is cached, nothing retrains.
    runs_before = sum(1 for m in logs if str(m).startswith("[reproduce] run "))
    # grid trials + one method option each, extra seeds, 50 % and 20 %
    assert runs_before == 2 * (2 + 1) + 2 * 1 + 2 * 2 * 2
    # every finished run left a small JSON in the committed cache, with its convergence record
    cached = json.load(open(os.path.join(out, "runs", "tiny", "ican", "seed1.json")))
    assert cached["seed"] == 1 and cached["epochs_cap"] == 1 and "best_epoch" in cached
    assert "valid" in cached and "test" in cached and cached["config"]["train"]["seed"] == 1
    assert "Every trial (seed 0)" in md and "(method option)" in md
    logs.clear()
    reproduce(cfg, variants=["ICAN", "MicRec (final)"], seeds=2, sparsity=True, grid="small",
              out_dir=out, command="test", log=logs.append)
    assert not any(str(m).startswith("[reproduce] run ") for m in logs)
    # --cached-only with a seed run and a MicRec trial missing: nothing trains, the report says
    # what is missing, ICAN keeps its done seeds, MicRec (grid incomplete) has no row yet.
    os.remove(os.path.join(out, "runs", "tiny", "ican", "seed1.json"))
    mic_trial = next(t["key"] for t in raw["trials"]["MicRec (final)"])
    os.remove(os.path.join(out, "runs", "tiny", f"{mic_trial}.json"))
    logs.clear()
    partial = open(reproduce(cfg, variants=["ICAN", "MicRec (final)"], seeds=2, sparsity=False,
                             grid="small", out_dir=out, command="test", log=logs.append,
                             cached_only=True)).read()
    assert not any(str(m).startswith("[reproduce] run ") for m in logs)
    assert "PARTIAL" in partial and "`ican/seed1`" in partial and mic_trial in partial
    assert "| ICAN |" in partial and "| MicRec (final) |" not in partial.split("## Chosen")[0]
    assert "not run yet" in partial


def test_every_cl_variant_has_a_base_without_cl_and_equal_trial_counts():
    for name, (_, ov) in V.VARIANTS.items():
        base = V.base_of(ov)
        if ov["model.cl"]:
            assert V.VARIANTS[base][1] == {"model.name": ov["model.name"], "model.cl": []}, name
        else:
            assert base is None
    for grid, (cl_grid, base_grid) in V.GRIDS.items():
        assert len(cl_grid) == len(base_grid), grid  # same tuning budget with and without CL
        assert len(V.PEER_GRIDS[grid]) == len(base_grid), grid  # and for the TFRS peer
        options = [V.option_for(V.VARIANTS[n][1], grid) for n in ("ICAN", "MicRec (final)",
                                                                   "TFRS two-tower")]
        assert len({o is None for o in options}) == 1, (grid, options)  # one option each, or none


def test_paired_p_matches_hand_computation():
    import math

    a, b = [0.30, 0.32, 0.31, 0.35], [0.28, 0.31, 0.27, 0.30]
    d = [x - y for x, y in zip(a, b)]
    mean = sum(d) / len(d)
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1))
    t = mean / (sd / math.sqrt(len(d)))
    # Two-sided p of Student's t with 3 dof, closed form: p = 1 - (2/pi)(atan(u) + u/(1+u^2)
    # ... ) is messy; use the exact CDF for nu = 3.
    u = t / math.sqrt(3)
    cdf_upper = 0.5 - (math.atan(u) + u / (1 + u * u)) / math.pi
    assert abs(report.paired_p(a, b) - 2 * cdf_upper) < 1e-9
    assert math.isnan(report.paired_p([1.0], [0.5]))
    # {seed: value}: paired by seed; a seed one model has not finished yet is left out.
    by_seed = dict(enumerate(a))
    assert abs(report.paired_p({**by_seed, 4: 0.9}, dict(enumerate(b))) - 2 * cdf_upper) < 1e-9
    with pytest.raises(ValueError, match="Received"):
        report.paired_p(a, b[:3])


def test_summarise_keys_values_by_seed():
    runs = [{"seed": 3, "test": {"hit@50": 0.4, "coverage@50": 0.9, "long_tail/hit@50": 0.2}},
            {"seed": 1, "test": {"hit@50": 0.2, "coverage@50": 0.7, "long_tail/hit@50": 0.1}}]
    m = report.summarise({"ICAN": runs}, [50], [50])["ICAN"]
    assert m["hit@50"][2] == {3: 0.4, 1: 0.2}
    assert abs(m["hit@50"][0] - 0.3) < 1e-12 and abs(m["hit@50"][1] - 0.1) < 1e-12


def test_committed_cache_is_reused_only_for_the_same_config_and_artifacts(tmp_path):
    from micrec_tf.config import Config

    art = tmp_path / "artifacts" / "synthetic"
    art.mkdir(parents=True)
    (art / "stats.json").write_text(json.dumps({"events.train": 10, "pairs": 4,
                                                "wall_seconds": 3.2}))
    cfg = Config().replace({"artifacts_root": str(tmp_path / "artifacts"), "model.cl": []})
    cache = tmp_path / "results" / "runs"
    runner = run_cache.Runner(cfg, str(tmp_path / "runs"), "none", log=lambda *a: None,
                      cache_dir=str(cache))
    assert runner.fingerprint == {"events.train": 10, "pairs": 4}  # timings left out
    stored = {"config": run_cache.run_signature(cfg), "artifacts": runner.fingerprint,
              "valid": {"hit@50": 0.4}, "test": {"hit@50": 0.5}, "best_epoch": 3}
    (cache / "ican").mkdir(parents=True)
    (cache / "ican" / "seed1.json").write_text(json.dumps(stored))
    assert runner.run("ican/seed1", {}, evaluate_test=True)["test"]["hit@50"] == 0.5
    logs = []
    other = run_cache.Runner(cfg.replace({"loss.num_negatives": 7}), str(tmp_path / "runs"), "none",
                     log=logs.append, cache_dir=str(cache))
    assert other.cached("ican/seed1", {}) is None
    assert any("another config" in m for m in logs)
    (art / "stats.json").write_text(json.dumps({"events.train": 10, "pairs": 9}))
    logs.clear()
    rebuilt = run_cache.Runner(cfg, str(tmp_path / "runs"), "none", log=logs.append,
                       cache_dir=str(cache))
    assert rebuilt.cached("ican/seed1", {}) is None
    assert any("other artifacts" in m for m in logs)


def test_convergence_flags_runs_whose_best_epoch_is_the_cap():
    runs = [{"key": "a", "best_epoch": 7, "epochs_cap": 30},
            {"key": "b", "best_epoch": 30, "epochs_cap": 30}]
    assert report.convergence_text(runs) == "7, 30 (cap!) of <= 30"
    assert report.unconverged({"ICAN": runs}) == [("ICAN", "b")]


def test_reproduce_requires_early_stopping(tmp_path):

    from micrec_tf.config import Config, ConfigError

    with pytest.raises(ConfigError, match="early_stopping_patience must be >= 2. Received: 1"):
        reproduce(Config().replace({"train.early_stopping_patience": 1}),
                  out_dir=str(tmp_path))


def test_stored_signatures_from_older_code_match_when_new_keys_keep_their_default(tmp_path):
    from micrec_tf.config import Config

    cfg = Config().replace({"model.cl": ["session"], "loss.cl_similarity": "cosine"})
    stored = run_cache.run_signature(cfg)
    del stored["loss"]["cl_anchors"], stored["loss"]["session_positives"]  # keys added later
    assert run_cache.cached_signature({"config": stored}) == run_cache.run_signature(cfg)
    for key, value in (("loss.cl_anchors", "uniform"), ("loss.session_positives", "uniform")):
        assert run_cache.cached_signature({"config": stored}) != run_cache.run_signature(
            cfg.replace({key: value}))


def test_signature_ignores_cl_knobs_only_for_models_without_cl():
    from micrec_tf.config import Config

    sig = run_cache.run_signature
    ican = Config().replace({"model.cl": []})
    assert sig(ican) == sig(ican.replace({"loss.temperature": 0.3}))
    assert sig(ican) != sig(ican.replace({"loss.num_negatives": 9}))
    micrec = Config()
    assert sig(micrec) != sig(micrec.replace({"loss.temperature": 0.3}))
    # the weight of a CL term that is off does not matter; of one that is on, it does
    fea = micrec.replace({"model.cl": ["feature"]})
    assert sig(fea) == sig(fea.replace({"loss.lambda_session": 0.7}))
    assert sig(fea) != sig(fea.replace({"loss.lambda_feature": 0.7}))
    assert sig(micrec) == sig(micrec.replace({"eval.seeds": 2}))
    # speed-only paths compute the same run: session CL's membership test (same draws), the
    # multi-worker failure timeout, the user tower's history path
    for key, value in (("loss.session_membership", "sorted"), ("train.collective_timeout_s", 30),
                       ("model.history_embeddings", "unique")):
        assert sig(micrec) == sig(micrec.replace({key: value})), key
    # float noise in a setting is not a different setting
    assert sig(micrec.replace({"loss.lambda_session": 0.1 * 0.3})) == sig(
        micrec.replace({"loss.lambda_session": 0.03}))


def test_fig3_rows_compare_with_their_base_model():
    from micrec_tf.config import Config

    cfg = Config().replace({"eval.hit_n": [50], "eval.coverage_n": [50]})

    def metrics(values):
        import numpy as np
        return {"hit@50": (float(np.mean(values)), float(np.std(values)), values)}

    summary = {"ICAN": metrics([0.5, 0.5]), "YoutubeDNN": metrics([0.40, 0.42]),
               "YoutubeDNN + fea": metrics([0.42, 0.45])}
    md = report.to_markdown(cfg, summary, {}, {}, {}, 2, "test", 1.0, grid="none")
    fig3 = md.split("## Fig. 3")[1].split("##")[0]
    row = next(line for line in fig3.splitlines() if line.startswith("| YoutubeDNN + fea |"))
    gain = (0.435 / 0.41 - 1) * 100  # against YoutubeDNN, not ICAN
    assert f"{gain:+.1f} %" in row and "vs its base model" in fig3


def test_rows_that_are_the_same_model_share_one_cache_name():
    assert V.canonical_name("MicRec - sem") == "MicRec (fea+sess)"
    assert V.canonical_name("MicRec - all (ICAN)") == "ICAN"
    assert V.canonical_name("MicRec - fea") == "MicRec - fea"
    for name, (_, overrides) in V.VARIANTS.items():
        first = V.canonical_name(name)
        assert V.VARIANTS[first][1] == overrides
        assert list(V.VARIANTS).index(first) <= list(V.VARIANTS).index(name)


# The committed ml-1m run cache: the reproduction continues from it (and the final report reuses
# it), so every run in it must keep matching the key, the path and the config signature that
# today's code computes; a mismatch would retrain the run (hours) instead of reusing it.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ML1M_CACHE = os.path.join(ROOT, "docs", "results", "runs", "ml-1m")


def _committed_ml1m_runs() -> list:
    """[(path, stored run)] for every run JSON of the ml-1m cache (not its reference rows)."""
    paths = sorted(glob.glob(os.path.join(ML1M_CACHE, "**", "*.json"), recursive=True))
    runs = []
    for path in paths:
        if os.path.basename(path) == "reference_rows.json":
            continue
        with open(path, encoding="utf-8") as fh:
            runs.append((path, json.load(fh)))
    if not runs:
        pytest.skip(f"no committed runs under {ML1M_CACHE}")
    return runs


def _ml1m_config():
    from micrec_tf.config import load_config

    return load_config(os.path.join(ROOT, "configs", "ml-1m.yaml"))


def test_committed_ml1m_runs_match_todays_signature_and_path(tmp_path):
    """Runner.cached's config test on every committed run: the signature stored with the run,
    re-normalised through today's config, equals the one today's code computes from
    configs/ml-1m.yaml and the run's overrides; and the file is where its key puts it."""
    cfg = _ml1m_config()
    runner = run_cache.Runner(cfg, str(tmp_path / "runs"), log=lambda *a: None,
                              cache_dir=ML1M_CACHE)
    for path, stored in _committed_ml1m_runs():
        rel = os.path.relpath(path, ML1M_CACHE)
        assert os.path.abspath(runner.cache_path(stored["key"])) == os.path.abspath(path), rel
        expected = run_cache.run_signature(V.expand(cfg, stored["overrides"]))
        assert run_cache.cached_signature(stored) == expected, rel
        assert stored["overrides"]["train.seed"] == stored["seed"], rel


def test_committed_ml1m_runs_are_reused_by_the_protocol(tmp_path, monkeypatch):
    """The reproduction driver itself, --cached-only over every variant and five seeds, on a copy
    of the committed cache: every committed run's key is one the protocol asks for, and each is
    reused as it is (config signature and artifacts fingerprint match, Runner.cached), none
    reported as run with another config or on other artifacts. Needs artifacts/ml-1m (the
    fingerprint is read from its stats.json). The report itself is left out (stubbed)."""
    import shutil

    cfg = _ml1m_config()
    if not run_cache.artifacts_fingerprint(cfg.artifacts_dir):
        pytest.skip(f"{cfg.artifacts_dir}/stats.json is absent: the fingerprint cannot be checked")
    committed = {stored["key"]: stored for _, stored in _committed_ml1m_runs()}
    # The sparsity sweep does not run under --cached-only; its runs are checked by the test above.
    committed = {k: v for k, v in committed.items() if not k.startswith("sparsity/")}
    out = tmp_path / "results"
    shutil.copytree(ML1M_CACHE, out / "runs" / "ml-1m")
    asked, reused = [], {}
    real_run = run_cache.Runner.run

    def recording_run(self, key, overrides, evaluate_test):
        asked.append(key)
        result = real_run(self, key, overrides, evaluate_test)
        if result is not None:
            reused[key] = result
        return result

    monkeypatch.setattr(run_cache.Runner, "run", recording_run)
    import experiments.reference_rows

    import experiments.reproduce

    # The report is not under test here (and the reference rows rank the whole test split).
    monkeypatch.setattr(experiments.reference_rows, "reference_rows", lambda *a, **k: {})
    monkeypatch.setattr(experiments.reproduce, "to_markdown", lambda *a, **k: "")
    monkeypatch.setattr(experiments.reproduce, "plots", lambda *a, **k: [])
    logs = []
    reproduce(cfg, variants=None, seeds=5, sparsity=False, grid="full", out_dir=str(out),
              command="test", log=logs.append, cached_only=True)
    assert not [m for m in logs if "another config" in str(m) or "other artifacts" in str(m)]
    assert sorted(set(committed) - set(asked)) == [], "committed runs the protocol never asks for"
    assert sorted(set(committed) - set(reused)) == [], "committed runs not reused"
    for key, stored in committed.items():
        assert reused[key]["test"] == stored["test"], key

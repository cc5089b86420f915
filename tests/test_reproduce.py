"""The reproduction runner on the tiny pipeline: report, raw JSON, plots, caching."""
import json
import os

from micrec_tf.evaluation import reproduce as R


def test_reproduce_writes_report_and_caches(tiny_pipeline, tmp_path):
    cfg, _ = tiny_pipeline
    cfg = cfg.replace({"train.epochs": 1, "name": "tiny", "train.early_stopping_patience": 2})
    out = str(tmp_path / "results")
    logs = []
    md_path = R.reproduce(cfg, variants=["ICAN", "MicRec (final)"], seeds=2, sparsity=True,
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
    key, alt = R.option_for(R.VARIANTS["ICAN"][1], "small")
    ican = {k: v for k, v in raw["settings"]["ICAN"].items() if k != key}
    assert ican in R.GRIDS["small"][1]
    # MicRec starts from ICAN's chosen setting and tunes only the CL knobs.
    key, _ = R.option_for(R.VARIANTS["MicRec (final)"][1], "small")
    mic = {k: v for k, v in raw["settings"]["MicRec (final)"].items() if k != key}
    assert mic in [{**raw["settings"]["ICAN"], **t} for t in R.GRIDS["small"][0]]
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
    R.reproduce(cfg, variants=["ICAN", "MicRec (final)"], seeds=2, sparsity=True, grid="small",
                out_dir=out, command="test", log=logs.append)
    assert not any(str(m).startswith("[reproduce] run ") for m in logs)
    # --cached-only with a seed run and a MicRec trial missing: nothing trains, the report says
    # what is missing, ICAN keeps its done seeds, MicRec (grid incomplete) has no row yet.
    os.remove(os.path.join(out, "runs", "tiny", "ican", "seed1.json"))
    mic_trial = next(t["key"] for t in raw["trials"]["MicRec (final)"])
    os.remove(os.path.join(out, "runs", "tiny", f"{mic_trial}.json"))
    logs.clear()
    partial = open(R.reproduce(cfg, variants=["ICAN", "MicRec (final)"], seeds=2, sparsity=False,
                               grid="small", out_dir=out, command="test", log=logs.append,
                               cached_only=True)).read()
    assert not any(str(m).startswith("[reproduce] run ") for m in logs)
    assert "PARTIAL" in partial and "`ican/seed1`" in partial and mic_trial in partial
    assert "| ICAN |" in partial and "| MicRec (final) |" not in partial.split("## Chosen")[0]
    assert "not run yet" in partial


def test_every_cl_variant_has_a_base_without_cl_and_equal_trial_counts():
    for name, (_, ov) in R.VARIANTS.items():
        base = R.base_of(ov)
        if ov["model.cl"]:
            assert R.VARIANTS[base][1] == {"model.name": ov["model.name"], "model.cl": []}, name
        else:
            assert base is None
    for grid, (cl_grid, base_grid) in R.GRIDS.items():
        assert len(cl_grid) == len(base_grid), grid  # same tuning budget with and without CL
        assert len(R.PEER_GRIDS[grid]) == len(base_grid), grid  # and for the TFRS peer
        options = [R.option_for(R.VARIANTS[n][1], grid) for n in ("ICAN", "MicRec (final)",
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
    assert abs(R.paired_p(a, b) - 2 * cdf_upper) < 1e-9
    assert math.isnan(R.paired_p([1.0], [0.5]))


def test_committed_cache_is_reused_only_for_the_same_config_and_artifacts(tmp_path):
    from micrec_tf.config import Config

    art = tmp_path / "artifacts" / "synthetic"
    art.mkdir(parents=True)
    (art / "stats.json").write_text(json.dumps({"events.train": 10, "pairs": 4,
                                                "wall_seconds": 3.2}))
    cfg = Config().replace({"artifacts_root": str(tmp_path / "artifacts"), "model.cl": []})
    cache = tmp_path / "results" / "runs"
    runner = R.Runner(cfg, str(tmp_path / "runs"), "none", log=lambda *a: None,
                      cache_dir=str(cache))
    assert runner.fingerprint == {"events.train": 10, "pairs": 4}  # timings left out
    stored = {"config": R.run_signature(cfg), "artifacts": runner.fingerprint,
              "valid": {"hit@50": 0.4}, "test": {"hit@50": 0.5}, "best_epoch": 3}
    (cache / "ican").mkdir(parents=True)
    (cache / "ican" / "seed1.json").write_text(json.dumps(stored))
    assert runner.run("ican/seed1", {}, evaluate_test=True)["test"]["hit@50"] == 0.5
    logs = []
    other = R.Runner(cfg.replace({"loss.num_negatives": 7}), str(tmp_path / "runs"), "none",
                     log=logs.append, cache_dir=str(cache))
    assert other.cached("ican/seed1", {}) is None
    assert any("another config" in m for m in logs)
    (art / "stats.json").write_text(json.dumps({"events.train": 10, "pairs": 9}))
    logs.clear()
    rebuilt = R.Runner(cfg, str(tmp_path / "runs"), "none", log=logs.append,
                       cache_dir=str(cache))
    assert rebuilt.cached("ican/seed1", {}) is None
    assert any("other artifacts" in m for m in logs)


def test_convergence_flags_runs_whose_best_epoch_is_the_cap():
    runs = [{"key": "a", "best_epoch": 7, "epochs_cap": 30},
            {"key": "b", "best_epoch": 30, "epochs_cap": 30}]
    assert R.convergence_text(runs) == "7, 30 (cap!) of <= 30"
    assert R.unconverged({"ICAN": runs}) == [("ICAN", "b")]


def test_reproduce_requires_early_stopping(tmp_path):
    import pytest

    from micrec_tf.config import Config, ConfigError

    with pytest.raises(ConfigError, match="early_stopping_patience must be >= 2. Received: 1"):
        R.reproduce(Config().replace({"train.early_stopping_patience": 1}),
                    out_dir=str(tmp_path))


def test_stored_signatures_from_older_code_match_when_new_keys_keep_their_default(tmp_path):
    from micrec_tf.config import Config

    cfg = Config().replace({"model.cl": ["session"], "loss.cl_similarity": "cosine"})
    stored = R.run_signature(cfg)
    del stored["loss"]["cl_anchors"], stored["loss"]["session_positives"]  # keys added later
    assert R._cached_signature({"config": stored}) == R.run_signature(cfg)
    for key, value in (("loss.cl_anchors", "uniform"), ("loss.session_positives", "uniform")):
        assert R._cached_signature({"config": stored}) != R.run_signature(
            cfg.replace({key: value}))


def test_signature_ignores_cl_knobs_only_for_models_without_cl():
    from micrec_tf.config import Config

    ican = Config().replace({"model.cl": []})
    assert R.run_signature(ican) == R.run_signature(ican.replace({"loss.temperature": 0.3}))
    assert R.run_signature(ican) != R.run_signature(ican.replace({"loss.num_negatives": 9}))
    micrec = Config()
    assert R.run_signature(micrec) != R.run_signature(micrec.replace({"loss.temperature": 0.3}))
    # the weight of a CL term that is off does not matter; of one that is on, it does
    fea = micrec.replace({"model.cl": ["feature"]})
    assert R.run_signature(fea) == R.run_signature(fea.replace({"loss.lambda_session": 0.7}))
    assert R.run_signature(fea) != R.run_signature(fea.replace({"loss.lambda_feature": 0.7}))
    assert R.run_signature(micrec) == R.run_signature(micrec.replace({"eval.seeds": 2}))
    # float noise in a setting is not a different setting
    assert R.run_signature(micrec.replace({"loss.lambda_session": 0.1 * 0.3})) == \
        R.run_signature(micrec.replace({"loss.lambda_session": 0.03}))


def test_fig3_rows_compare_with_their_base_model():
    from micrec_tf.config import Config

    cfg = Config().replace({"eval.hit_n": [50], "eval.coverage_n": [50]})

    def metrics(values):
        import numpy as np
        return {"hit@50": (float(np.mean(values)), float(np.std(values)), values)}

    summary = {"ICAN": metrics([0.5, 0.5]), "YoutubeDNN": metrics([0.40, 0.42]),
               "YoutubeDNN + fea": metrics([0.42, 0.45])}
    md = R.to_markdown(cfg, summary, {}, {}, {}, 2, "test", 1.0, grid="none")
    fig3 = md.split("## Fig. 3")[1].split("##")[0]
    row = next(line for line in fig3.splitlines() if line.startswith("| YoutubeDNN + fea |"))
    gain = (0.435 / 0.41 - 1) * 100  # against YoutubeDNN, not ICAN
    assert f"{gain:+.1f} %" in row and "vs its base model" in fig3


def test_rows_that_are_the_same_model_share_one_cache_name():
    assert R.canonical_name("MicRec - sem") == "MicRec (fea+sess)"
    assert R.canonical_name("MicRec - all (ICAN)") == "ICAN"
    assert R.canonical_name("MicRec - fea") == "MicRec - fea"
    for name, (_, overrides) in R.VARIANTS.items():
        first = R.canonical_name(name)
        assert R.VARIANTS[first][1] == overrides
        assert list(R.VARIANTS).index(first) <= list(R.VARIANTS).index(name)

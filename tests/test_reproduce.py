"""The reproduction runner on the tiny pipeline: report, raw JSON, plots, caching."""
import json
import os

from micrec_tf.evaluation import reproduce as R


def test_reproduce_writes_report_and_caches(tiny_pipeline, tmp_path):
    cfg, _ = tiny_pipeline
    cfg = cfg.replace({"train.epochs": 1, "name": "tiny"})
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
    # The chosen settings come from the small grid.
    assert raw["settings"]["ICAN"] in R.GRIDS["small"][1]
    # MicRec starts from ICAN's chosen setting and tunes only the CL knobs.
    assert raw["settings"]["MicRec (final)"] in [{**raw["settings"]["ICAN"], **t}
                                                 for t in R.GRIDS["small"][0]]
    for png in ("hit_at_n.png", "coverage.png", "loss_curves.png", "sparsity.png"):
        assert os.path.getsize(os.path.join(out, "tiny", png)) > 1000, png
    # Second call: every run is cached, nothing retrains.
    runs_before = sum(1 for m in logs if str(m).startswith("[reproduce] run "))
    logs.clear()
    R.reproduce(cfg, variants=["ICAN", "MicRec (final)"], seeds=2, sparsity=True, grid="small",
                out_dir=out, command="test", log=logs.append)
    assert runs_before == 2 * 2 + 2 * 1 + 2 * 2 * 2  # grid trials, extra seeds, 50 % and 20 %
    assert not any(str(m).startswith("[reproduce] run ") for m in logs)
    # A cached run made with another config is not reused.
    ov = {**R.VARIANTS["ICAN"][1], **raw["settings"]["ICAN"], "train.seed": 1}
    logs.clear()
    runner = R.Runner(cfg.replace({"loss.num_negatives": 7}), os.path.join(cfg.run_dir, "reproduce"),
                      "small", logs.append)
    rerun = runner.run("ican/seed1", ov, evaluate_test=True)
    assert any("run with another config" in str(m) for m in logs)
    assert rerun["config"]["loss"]["num_negatives"] == 7


def test_every_cl_variant_has_a_base_without_cl_and_equal_trial_counts():
    for name, (_, ov) in R.VARIANTS.items():
        base = R.base_of(ov)
        if ov["model.cl"]:
            assert R.VARIANTS[base][1] == {"model.name": ov["model.name"], "model.cl": []}, name
        else:
            assert base is None
    for grid, (cl_grid, base_grid) in R.GRIDS.items():
        assert len(cl_grid) == len(base_grid), grid  # same tuning budget with and without CL


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


def test_runs_cached_before_signatures_are_matched_by_their_config_yaml(tmp_path):
    import yaml

    from micrec_tf.config import Config

    cfg = Config()
    run_dir = tmp_path / "ican" / "seed1"
    run_dir.mkdir(parents=True)
    old = cfg.to_dict()
    del old["loss"]["cl_similarity"]  # a key added after the run: its default is the old code
    (run_dir / "config.yaml").write_text(yaml.safe_dump(old))
    cached = {"valid": {}, "test": {"hit@50": 0.5}}
    (run_dir / "metrics.json").write_text(json.dumps(cached))
    runner = R.Runner(cfg, str(tmp_path), "none", log=lambda *a: None)
    assert runner.run("ican/seed1", {}, evaluate_test=True)["test"]["hit@50"] == 0.5
    assert R._cached_signature(cached, str(run_dir)) == R.run_signature(cfg)
    changed = cfg.replace({"loss.cl_similarity": "cosine"})
    assert R._cached_signature(cached, str(run_dir)) != R.run_signature(changed)
    # A config.yaml newer than metrics.json belongs to a later, unfinished run: not trusted.
    later = os.path.getmtime(run_dir / "metrics.json") + 5
    os.utime(run_dir / "config.yaml", (later, later))
    assert R._cached_signature(cached, str(run_dir)) is None


def test_stored_signatures_from_older_code_match_when_new_keys_keep_their_default(tmp_path):
    from micrec_tf.config import Config

    cfg = Config().replace({"model.cl": ["session"], "loss.cl_similarity": "cosine"})
    stored = R.run_signature(cfg)
    del stored["loss"]["cl_anchors"], stored["loss"]["session_positives"]  # keys added later
    assert R._cached_signature({"config": stored}, str(tmp_path)) == R.run_signature(cfg)
    for key, value in (("loss.cl_anchors", "uniform"), ("loss.session_positives", "uniform")):
        assert R._cached_signature({"config": stored}, str(tmp_path)) != R.run_signature(
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

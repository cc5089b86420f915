"""Benchmark suite: the quick mode runs end to end, so `make bench` cannot rot.

One run of ``BENCH_QUICK=1 python -m benchmarks --config configs/synthetic.yaml --out TMP``
(tiny sizes; about half a minute to a minute on 2 CPU cores). Checks that every section ran and
produced finite, well-formed figures, that the targets are evaluated, and that the markdown
renders. Quick-mode timings come from seconds-long runs on tiny inputs: they are noise, so no
test asserts on the sign or size of a timing-derived figure (a fitted scaling exponent can come
out negative, a throughput ratio either side of 1); only on counts, recall and structure.
"""
import json
import math
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTIONS = ("preprocessing", "training", "title_encoding", "retrieval", "serving")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    env = dict(os.environ, BENCH_QUICK="1")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--config", "configs/synthetic.yaml",
         "--out", str(out), "--work-dir", str(out / "work")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, \
        f"quick bench failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    with open(out / "benchmarks.json") as fh:
        res = json.load(fh)
    md = (out / "BENCHMARKS.md").read_text()
    return res, md, out


def _numbers(obj, path=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _numbers(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _numbers(v, f"{path}[{i}]")
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield path, obj


def test_every_section_has_finite_figures(quick_run):
    res, _, _ = quick_run
    _assert_well_formed(res)


def test_noisy_quick_timings_are_still_well_formed(quick_run):
    """The fault a fresh clone hit: a quick run whose fitted scaling exponent came
    out negative (-0.113) and whose other timings are tiny is a valid run, and it renders."""
    import copy

    from benchmarks.report import evaluate_targets, render_markdown

    res = copy.deepcopy(quick_run[0])
    res["preprocessing"]["headline"]["scaling_exponent"] = -0.113
    res["preprocessing"]["fit"]["exponent"] = -0.113
    res["serving"]["headline"]["latency_ms_p50"] = res["serving"]["latency_ms_p50"] = 0.0
    res["training"]["headline"]["ratio_micrec_over_base"] = 0.8
    _assert_well_formed(res)
    res["targets"] = evaluate_targets(res, 60.0, 30.0, quick=True)
    assert "preprocessing scaling" in render_markdown(res)


def _assert_well_formed(res):
    assert res["meta"]["quick"] is True
    for name in SECTIONS:
        sec = res[name]
        assert "error" not in sec, f"{name} failed: {sec.get('error')}"
        head = sec["headline"]
        assert head, name
        for key, value in head.items():
            assert (isinstance(value, (int, float)) and not isinstance(value, bool)
                    and math.isfinite(value)), f"{name}.headline.{key} = {value!r}"
    tr = res["training"]
    assert set(tr["models"]) >= {"base", "micrec"}
    assert tr["models"]["base"]["cl"] == [] and set(tr["models"]["micrec"]["cl"]) == {
        "feature", "semantic", "session"}
    # MicRec really computes the three CL losses; the base model none.
    assert {"feature_cl_loss", "semantic_cl_loss", "session_cl_loss"} <= set(
        tr["models"]["micrec"]["losses"])
    assert not any(x.endswith("_cl_loss") for x in tr["models"]["base"]["losses"])
    pre = res["preprocessing"]
    assert len(pre["sizes"]) >= 2 and pre["fit"]["exponent"] is not None
    assert math.isfinite(pre["fit"]["exponent"])  # its sign is noise in quick mode
    for row in pre["sizes"]:
        assert row["events"] > 0 and row["peak_rss_mib"] > 0 and math.isfinite(row["wall_s"])
    rt = res["retrieval"]
    assert 0 < rt["scann"]["recall_at_k"] <= 1
    for key in ("latency_ms_p50", "latency_ms_p99"):
        assert math.isfinite(res["serving"][key]), key
    # Every number in the file is finite (NaN/inf would have been written as null).
    for path, value in _numbers(res):
        assert math.isfinite(value), path


def test_targets_and_machine(quick_run):
    res, _, _ = quick_run
    names = [t["name"] for t in res["targets"]]
    assert any(n.startswith("preprocessing") for n in names)
    assert any(n.startswith("training") for n in names)
    assert any(n.startswith("retrieval") for n in names)
    for t in res["targets"]:
        assert t["status"] in ("met", "missed", "not measured") and t["why"]
    mach = res["meta"]["machine"]
    assert mach["cpu"] and mach["cores"] >= 1 and mach["ram_gib"] > 0
    for key in ("python", "tensorflow", "apache_beam", "scann"):
        assert mach["versions"][key]
    assert re.fullmatch(r"[0-9a-f]{40}|unknown", mach["git_commit"])
    assert res["gpu"]["status"]


def test_markdown_renders(quick_run):
    res, md, _ = quick_run
    assert md.startswith("# Benchmarks")
    assert "Quick mode" in md
    for heading in ("## Machine", "## Targets", "## 1. Preprocessing", "## 2. Training",
                    "### GPU", "## 3. Title encoding", "## 4. Retrieval", "## 5. User tower"):
        assert heading in md, heading
    assert "Not measured:" not in md and "None: every section ran." in md
    assert not re.search(r"\bnan\b|\binf\b", md, re.IGNORECASE) and "| None |" not in md
    # Tables: each row has as many cells as its header.
    lines = md.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("|---"):
            width = lines[i - 1].count(" | ")
            j = i + 1
            while j < len(lines) and lines[j].startswith("|"):
                assert lines[j].replace("\\|", "").count(" | ") == width, lines[j]
                j += 1
    try:
        import markdown
    except ImportError:
        return
    html = markdown.markdown(md, extensions=["tables"])
    assert html.count("<table>") >= 6 and "<h2>Targets</h2>" in html


def test_quick_mode_refuses_docs():
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--out", os.path.join(ROOT, "docs")],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "docs" in proc.stderr


def test_power_fit_and_estimates():
    from benchmarks.preprocessing import _estimate_time, power_fit

    a, b = power_fit([1e5, 1e6, 1e7], [2.0, 20.0, 200.0])
    assert b == pytest.approx(1.0) and a == pytest.approx(2e-5)
    runs = {1000: [{"wall_s": 10.0}], 4000: [{"wall_s": 20.0}]}
    # Sub-linear so far, but the estimate is never better than linear from the largest run.
    assert _estimate_time(8000, runs) == pytest.approx(40.0)


def test_regenerated_benchmarks_keep_the_hand_measured_sections():
    from benchmarks.report import HAND_MARKER, keep_hand_sections

    old = f"# Benchmarks\nold suite\n\n{HAND_MARKER}\n\n## Preprocessing: full table\n| a |\n"
    out = keep_hand_sections(old, "# Benchmarks\nnew suite\n")
    assert out.startswith("# Benchmarks\nnew suite\n") and "old suite" not in out
    assert out.endswith(f"{HAND_MARKER}\n\n## Preprocessing: full table\n| a |\n")
    assert keep_hand_sections("# no marker\n", "new\n") == "new\n"

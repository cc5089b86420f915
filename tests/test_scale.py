"""benchmarks.scale: the pieces that do not run the stages (exponent fit, overrides, the
BENCHMARKS.md block); the stages themselves are the product's CLIs, tested elsewhere."""
import math

from benchmarks import scale
from benchmarks.report import HAND_MARKER


def test_fit_exponent_matches_hand_computed_slopes():
    xs = [1e4, 1e5, 1e6]
    assert scale.fit_exponent(xs, [3 * x for x in xs]) == 1.0
    assert scale.fit_exponent(xs, [x ** 2 for x in xs]) == 2.0
    # y = 10, 20, 80: slope of (log y) on (log x) by hand
    ly = [math.log(10), math.log(20), math.log(80)]
    lx = [math.log(x) for x in xs]
    mx, my = sum(lx) / 3, sum(ly) / 3
    want = sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)
    assert scale.fit_exponent(xs, [10, 20, 80]) == round(want, 3)
    assert scale.fit_exponent([1e4], [5]) is None
    assert scale.fit_exponent(xs, [None, 0, 4]) is None  # one usable point


def test_overrides_scale_the_world():
    sets = dict(o.split("=", 1) for o in scale.overrides(100_000))
    assert sets["data.synthetic.num_items"] == "100000"
    assert sets["data.synthetic.num_users"] == "50000"
    assert sets["data.synthetic.num_events"] == "1000000"
    assert sets["name"] == "scale-100000"


def test_benchmarks_md_block_is_appended_once_then_replaced(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n\n## 1. Suite\nx\n\n" + HAND_MARKER + "\n\n## Hand\ny\n")
    scale.update_benchmarks_md("# Scale: first\n\n## 10 items\na\n", str(path))
    scale.update_benchmarks_md("# Scale: second\n\n## 10 items\nb\n", str(path))
    text = path.read_text()
    assert text.count(scale.SCALE_BEGIN) == 1 and "first" not in text
    assert "## Scale: second" in text and "### 10 items" in text
    assert text.index(HAND_MARKER) < text.index("## Hand") < text.index(scale.SCALE_BEGIN)


def _stage(stage, items, wall, rss, metrics=None, rc=0):
    return {"stage": stage, "items": items, "rc": rc, "wall_s": wall, "peak_rss_mib": rss,
            "metrics": metrics or {}}


def test_report_text_tables_from_hand_made_results():
    test = {"hit@50": 0.25, "hit@500": 0.5, "coverage@50": 0.000125, "coverage@500": 0.0025,
            "long_tail/hit@50": 0.0123, "long_tail/num_clicks": 4979, "num_clicks": 50000}
    q = {"batch_1": {"qps": 900.0}, "batch_256": {"qps": 20000.0}}
    res = {10_000: {"generate": _stage("generate", 10_000, 2.0, 100.0),
                    "preprocess": _stage("preprocess", 10_000, 10.0, 500.0, rc=1)},
           1_000_000: {"generate": _stage("generate", 1_000_000, 200.0, 100.0),
                       "train_micrec": _stage("train_micrec", 1_000_000, 3600.0, 9000.0,
                                              {"epochs_run": 1, "seconds": 3000.4,
                                               "test": test}),
                       "retrieval": _stage("retrieval", 1_000_000, 60.0, 4000.0,
                                           {"queries": 1024, "k": 500,
                                            "recall_at_k_scann": 0.97, "scann": q,
                                            "tf_matmul_top_k": q, "numpy": q})}}
    text = scale.report_text(res)
    lines = text.splitlines()
    # generate: 2 s -> 200 s over 10 k -> 1 M items: exponent log(100) / log(100) = 1
    assert "| generate | 2 s, 100 MiB | 200 s, 100 MiB | 1.0 | 0.0 |" in lines
    assert "| preprocess | failed (rc 1) | not run |  |  |" in lines
    res[100_000] = {"generate": _stage("generate", 100_000, 20.0, 100.0)}
    lines = scale.report_text(res).splitlines()
    assert "| generate | 2 s, 100 MiB | 20 s, 100 MiB | 200 s, 100 MiB | 1.0 | 0.0 |" in lines
    assert "| train_micrec | not run | not run | 3,600 s, 9,000 MiB |  |  |" in lines
    del res[1_000_000]["generate"]
    lines = scale.report_text(res).splitlines()
    assert ("| generate | 2 s, 100 MiB | 20 s, 100 MiB | not run | 1.0 (10k-100k only) | "
            "0.0 (10k-100k only) |") in lines
    assert ("| 1,000,000 | MicRec (feature + semantic + session CL) | 1 | 3,000 | 50,000 | "
            "0.2500 | 0.5000 | 0.00013 | 0.00250 | 0.0123 (4,979) |") in lines
    assert "| 1,000,000 | 1,024 | 0.9700 @ 500 | ScaNN (export's index) | 900 | 20,000 |" in lines
    assert "not converged" in text
    res[10_000]["preprocess"] = _stage("preprocess", 10_000, 10.0, 500.0, {"items": 7646})
    assert "out-of-vocabulary miss): 10k: 7,646." in scale.report_text(res)

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

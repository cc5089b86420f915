"""experiments.rolling (issue 29, item 6): the window cut, the new-item slice, the splits each
step asks the preprocessing for, the evaluation's index remapping, and the driver (which runs it
makes, what it caches, which learning rate it chooses, the ratios it reports) with the runs
replaced by a fake (no Beam job, no training).

References: pure-Python counts and sets over hand-made click lists and files, the
preprocessing's own rank rule (``pipelines.split.target_ranks``), hand-computed ratios.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from experiments import rolling
from tests.conftest import tiny_config


# ------------------------------------------------------------------------------------------
# The cut
# ------------------------------------------------------------------------------------------
def test_cut_equal_counts_in_time_order():
    rng = np.random.default_rng(0)
    ts = [int(t) for t in rng.permutation(np.arange(1000, 1030))]  # 30 distinct times, shuffled
    cut = rolling.cut_windows(ts, 5)
    # by hand: 15 initial clicks, then 5 windows of 3, in time order
    assert cut.counts == (15, 3, 3, 3, 3, 3)
    ranked = sorted(ts)
    for rank, t in enumerate(ranked):
        assert cut.segment(t) == (0 if rank < 15 else 1 + (rank - 15) // 3)
    # 31 clicks, 4 windows: n0 = round(15.5) = 16; targets 16 + round(k * 15 / 4) = 16, 20,
    # 24, 27 (3.75 -> 4, 7.5 -> 8 halves up, 11.25 -> 11)
    cut = rolling.cut_windows(list(range(31)), 4)
    assert cut.targets == (16, 20, 24, 27) and cut.counts == (16, 4, 4, 3, 4)


def test_cut_ties_go_to_the_later_segment_and_empty_segments_are_refused():
    ts = [1, 2, 3, 4, 5, 5, 5, 6, 7, 8]
    cut = rolling.cut_windows(list(reversed(ts)), 2)
    # targets 5 and 5 + round(5 / 2) = 8: boundaries ts[5] = 5 and ts[8] = 7; the three 5s go
    # to window 1 (rank 4, the first 5, is before the target rank: it moves with its ties)
    assert cut.boundaries == (5, 7) and cut.counts == (4, 4, 2)
    assert [cut.segment(t) for t in ts] == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2]
    with pytest.raises(ValueError, match="leave segment 1 empty"):
        rolling.cut_windows([1, 2, 3, 3, 3, 3, 3, 3], 2)
    with pytest.raises(ValueError, match="Received: 0"):
        rolling.cut_windows([1, 2, 3], 0)
    with pytest.raises(ValueError, match="cannot make"):
        rolling.cut_windows([1, 2, 3], 3)


def test_new_item_slice_is_the_set_difference():
    # (time, item): distinct times, so segment = rank rule; 12 clicks, 3 windows: 6 initial
    clicks = [(10, "a"), (11, "b"), (12, "a"), (13, "c"), (14, "b"), (15, "a"),
              (16, "d"), (17, "a"), (18, "e"), (19, "d"), (20, "f"), (21, "c")]
    cut = rolling.cut_windows([t for t, _ in clicks], 3)
    assert cut.counts == (6, 2, 2, 2)
    seg = {t: (0 if r < 6 else 1 + (r - 6) // 2) for r, (t, _) in enumerate(clicks)}
    for s in range(3):
        before = {i for t, i in clicks if seg[t] <= s}
        inside = {i for t, i in clicks if seg[t] == s + 1}
        assert rolling.new_items(clicks, cut, s + 1) == inside - before
    assert rolling.new_items(clicks, cut, 2) == {"e"}
    assert rolling.new_items(clicks, cut, 3) == {"f"}  # "c" (window 3) was clicked at 13


def test_step_fractions_give_the_cut_to_the_preprocessing():
    from pipelines.split import target_ranks

    counts = (503, 47, 51, 49, 50)
    for s in range(4):
        v = int(np.floor(0.1 * counts[s] + 0.5))
        trained = sum(counts[:s + 1])
        n = trained + counts[s + 1]
        fr = rolling.step_fractions(counts, s)
        assert abs(sum(fr) - 1) < 1e-9
        # the global-time split's ranks: validation starts v clicks before segment s ends,
        # test at segment s + 1
        assert target_ranks(n, fr) == (trained - v, trained), s
        if s:
            fr = rolling.step_fractions(counts, s, update=True)
            m = counts[s] + counts[s + 1]
            assert target_ranks(m, fr) == (counts[s] - v, counts[s])
    with pytest.raises(ValueError, match="initial model"):
        rolling.step_fractions(counts, 0, update=True)
    with pytest.raises(ValueError, match="Received: 4"):
        rolling.step_fractions(counts, 4)


def test_remap_arrays_by_raw_id():
    src = {"item_id": ["b", "a", "c"], "user_gender": ["F", "X"]}
    dst = {"item_id": ["a", "b", "c", "d"], "user_gender": ["M", "F"]}
    arrays = {"item": np.array([1, 2, 3, 0]), "hist_items": np.array([[2, 3, 0], [1, 0, 0],
                                                                      [3, 1, 2], [0, 0, 0]]),
              "user_gender": np.array([1, 2, 0, 2]), "timestamp": np.array([5, 6, 7, 8])}
    out, oov = rolling.remap_arrays(arrays, src, dst, ["gender"])
    # b -> 2, a -> 1, c -> 3, padding stays 0; F -> 2, X unknown -> 0 (twice), OOV stays 0
    assert out["item"].tolist() == [2, 1, 3, 0]
    assert out["hist_items"].tolist() == [[1, 3, 0], [2, 0, 0], [3, 2, 1], [0, 0, 0]]
    assert out["user_gender"].tolist() == [2, 0, 0, 0] and oov == {"user_gender": 2}
    assert out["timestamp"] is arrays["timestamp"]
    with pytest.raises(ValueError, match="'z' is not in the model's vocabulary"):
        rolling.remap_arrays({"item": np.array([1])}, {"item_id": ["z"]}, dst, [])


# ------------------------------------------------------------------------------------------
# The driver, with fake runs
# ------------------------------------------------------------------------------------------
N_CLICKS, WINDOWS = 60, 4
BONUS = {0.0003: (0.0, 0.0), 0.001: (0.05, 0.05), 0.003: (0.02, 0.2)}  # (step 1, later)


def _full_hit(s):
    return 0.30 + 0.01 * s


def _inc_hit(s, lr):
    return 0.2 + 0.01 * s + BONUS[lr][0 if s == 1 else 1]


class FakeSteps:
    """Runs that write nothing but an empty folder and score by a formula of (kind, step, lr)."""

    def __init__(self, tmp):
        self.tmp, self.calls, self.runs, self.evals = tmp, [], {}, []

    def _unit(self, cfg, kind, step, lr=None, seconds=1.0):
        run_dir = os.path.join(self.tmp, "fake", f"{cfg.name}-{kind}{step}")
        os.makedirs(run_dir, exist_ok=True)
        self.runs[run_dir] = (kind, step, lr)
        self.calls.append((kind, step, lr, cfg))
        return {"run_dir": run_dir, "artifacts_dir": run_dir, "version_dir": run_dir,
                "seconds": {"total": seconds}, "best_epoch": 4 if step != 2 else 30,
                "epochs_cap": 30}

    def initial(self, cfg):
        assert cfg.preprocess.split_fractions == rolling.step_fractions(self.counts, 0)
        return self._unit(cfg, "initial", 0, seconds=50.0)

    def full(self, cfg):
        s = int(cfg.name[-2:])
        return self._unit(cfg, "full", s, seconds=100.0 + 10 * s)

    def update(self, cfg, window_dir, previous):
        s = int(os.path.basename(window_dir).split("-")[1])
        prev = self.runs[previous]
        assert prev[1] == s - 1 and (s == 1 or prev[2] == cfg.train.learning_rate)
        return self._unit(cfg, "inc", s, cfg.train.learning_rate, seconds=10.0 + s)

    def evaluate(self, run_dir, eval_artifacts, new):
        kind, s, lr = self.runs[run_dir]
        assert self.runs[eval_artifacts][:2] in (("full", s), ("initial", 0))
        self.evals.append((kind, s, lr, set(new)))
        h = {"initial": 0.25, "full": _full_hit(s)}.get(kind) or _inc_hit(s, lr)
        return {"all": {"hit@10": h, "hit@50": 2 * h, "coverage@10": 0.5, "num_examples": 9},
                "new": {"hit@10": h / 2, "hit@50": h, "coverage@10": 0.25, "num_examples": 3}}


def _dataset(tmp):
    """A canonical raw folder: 60 clicks (10 users, 20 items, distinct shuffled times) with a
    header, and the (time, item) pairs."""
    rng = np.random.default_rng(5)
    data = os.path.join(tmp, "raw")
    os.makedirs(data)
    times = rng.permutation(np.arange(1_000_000, 1_000_000 + 60 * 3600, 3600))
    clicks = [(f"u{int(rng.integers(10))}", f"i{int(rng.integers(20))}", int(t))
              for t in times]
    with open(os.path.join(data, "interactions.tsv"), "w") as fh:
        fh.write("user_id\titem_id\ttimestamp\n")
        fh.writelines(f"{u}\t{i}\t{t}\n" for u, i, t in clicks)
    with open(os.path.join(data, "items.tsv"), "w") as fh:
        fh.write("item_id\ttitle\ttags\tprovider\n")
        fh.writelines(f"i{k}\tItem {k}\tt{k % 3}\tp\n" for k in range(20))
    return data, clicks


@pytest.fixture
def fake(tmp_path):
    data, clicks = _dataset(str(tmp_path))
    cfg = tiny_config(str(tmp_path), data={"dataset": "canonical", "data_dir": data},
                      train={"epochs": 30, "early_stopping_patience": 3})
    steps = FakeSteps(str(tmp_path))
    steps.counts = rolling.cut_windows([t for _, _, t in clicks], WINDOWS).counts
    return cfg, steps, clicks, tmp_path


def _run(cfg, steps, tmp, **kw):
    return rolling.run_rolling(cfg, windows=WINDOWS, models=["ICAN"], out_dir=str(tmp / "res"),
                               scratch=str(tmp / "scratch"), steps=steps, log=lambda *a: None,
                               **kw)


def test_driver_runs_chooses_on_window_2_caches_and_reports(fake):
    cfg, steps, clicks, tmp = fake
    md = open(_run(cfg, steps, tmp)).read()
    with open(tmp / "res" / "tiny-rolling.json") as fh:
        js = json.load(fh)
    # the window folders: pure-Python counts over the raw file (ranks of the distinct times)
    rank = {t: r for r, t in enumerate(sorted(t for _, _, t in clicks))}
    # ranks 30 + round(7.5 k), halves up: windows start at ranks 30, 38, 45, 53
    seg = {t: sum(r >= b for b in (30, 38, 45, 53)) for t, r in rank.items()}
    counts = [sum(1 for s in seg.values() if s == k) for k in range(WINDOWS + 1)]
    assert counts == [30, 8, 7, 8, 7]
    for k in range(1, WINDOWS + 1):
        with open(tmp / "scratch" / "data" / f"upto-{k:02d}" / "interactions.tsv") as fh:
            lines = fh.read().splitlines()
        assert lines[0] == "user_id\titem_id\ttimestamp" and len(lines) - 1 == sum(counts[:k + 1])
        assert os.path.islink(tmp / "scratch" / "data" / f"upto-{k:02d}" / "items.tsv")
    for k in range(1, WINDOWS):
        with open(tmp / "scratch" / "data" / f"pair-{k:02d}" / "interactions.tsv") as fh:
            got = sorted(fh.read().splitlines()[1:])
        assert got == sorted(f"{u}\t{i}\t{t}" for u, i, t in clicks if seg[t] in (k, k + 1))
    # runs: the initial model, full retrains of steps 1..3, the grid at step 1, then the chosen
    # learning rate alone
    kinds = [(k, s, lr) for k, s, lr, _ in steps.calls]
    assert kinds[:4] == [("initial", 0, None), ("full", 1, None), ("full", 2, None),
                         ("full", 3, None)]
    assert kinds[4:7] == [("inc", 1, lr) for lr in rolling.LR_GRID]
    # 0.001 is best on window 2 (step 1) although 0.003 would be better later: chosen on step 1
    assert js["models"]["ICAN"]["lr"] == 0.001
    assert kinds[7:] == [("inc", 2, 0.001), ("inc", 3, 0.001)]
    assert all(c.preprocess.item_vocabulary == "catalogue" for *_, c in steps.calls)
    # history tails: on for the initial model and the updates, off (the config's) for the full
    # retrains; in the units' cache signatures accordingly
    for kind, _, _, c in steps.calls:
        assert c.preprocess.history_tails is (kind != "full"), kind
    unit = tmp / "res" / "runs" / "tiny-rolling" / "ican" / "seed0"
    for path, on in ((unit / "initial.json", True), (unit / "full" / "step01.json", False),
                     (unit / "inc" / "lr0_001" / "step02.json", True)):
        with open(path) as fh:
            assert json.load(fh)["signature"]["config"]["preprocess"]["history_tails"] is on
    # the new-item slice of each evaluation = items of window s+1 never clicked before (sets)
    for kind, s, lr, new in steps.evals:
        before = {i for _, i, t in clicks if seg[t] <= s}
        assert new == {i for _, i, t in clicks if seg[t] == s + 1} - before, (kind, s)
    # ratios by hand
    rows = {r["step"]: r for r in js["models"]["ICAN"]["seeds"]["0"]}
    assert rows[1]["kind"] == "tuning" and rows[2]["kind"] == "held-out"
    for s in (1, 2, 3):
        lr_bonus = BONUS[0.001][0 if s == 1 else 1]
        inc, full = 0.2 + 0.01 * s + lr_bonus, 0.30 + 0.01 * s
        assert rows[s]["all/hit@10"]["ratio"] == pytest.approx(inc / full, abs=1e-12)
        assert rows[s]["new/hit@10"]["ratio"] == pytest.approx((inc / 2) / (full / 2), abs=1e-12)
        assert rows[s]["seconds"]["ratio"] == pytest.approx((10 + s) / (100 + 10 * s), abs=1e-12)
    assert rows[0]["all/hit@10"]["ratio"] == 1.0
    assert rows[2]["cap_hit"] and not rows[3]["cap_hit"]
    held = [(0.25 + 0.01 * s) / (0.30 + 0.01 * s) for s in (2, 3)]
    assert js["models"]["ICAN"]["summary"]["0"]["all/hit@10"] == pytest.approx(
        sum(held) / 2, abs=1e-12)
    assert f"{(0.26 / 0.31):.3f}" in md.split("| 1 (tuning)")[1].split("\n")[0]
    assert "Partial" not in md and "**0.001**" in md and "30 (cap)" in md
    # a second call trains nothing
    n = len(steps.calls)
    _run(cfg, steps, tmp)
    assert len(steps.calls) == n


def test_steps_update_passes_the_step_fractions_to_the_update(monkeypatch, tmp_path):
    """The update's own default window split ([0.9, 0.1, 0.0]) does not replace the step's
    fractions: :meth:`Steps.update` hands them to ``run_update`` explicitly, and they are the
    ones the update resolves to (``step_fractions`` against hand counts)."""
    from micrec_tf import update

    counts = (30, 8, 7, 8, 7)
    fr = rolling.step_fractions(counts, 2, update=True)
    # by hand: segment 2 = 7 clicks, validation round(0.7) = 1, training 6; test = 8 clicks
    assert fr == [6 / 15, 1 / 15, 8 / 15]
    cfg = tiny_config(str(tmp_path)).replace({"preprocess.split_fractions": fr})
    seen = {}

    def fake_run_update(cfg_, window, previous, log=print, split_fractions=None):
        seen["fractions"] = update.update_split_fractions(cfg_, split_fractions)
        return {"run_dir": "r", "artifacts_dir": "a", "version_dir": "v",
                "timing_s": {"total": 1.0}, "rows_added": {}, "epochs_run": 1,
                "optimizer_iterations": 3}

    monkeypatch.setattr(update, "run_update", fake_run_update)
    out = rolling.Steps(log=lambda *a: None).update(cfg, str(tmp_path), str(tmp_path / "v"))
    assert seen["fractions"] == fr and out["seconds"] == {"total": 1.0}
    assert update.update_split_fractions(cfg) == [0.9, 0.1, 0.0]  # what a plain call would use


def test_cached_only_and_a_second_seed(fake):
    cfg, steps, clicks, tmp = fake
    md = open(_run(cfg, steps, tmp, cached_only=True)).read()
    assert not steps.calls and "**Partial**" in md and "not chosen yet" in md
    _run(cfg, steps, tmp, seeds=2)
    # seed 1: its own initial model and full retrains, the update at seed 0's choice only
    seed1 = [(k, s, lr) for k, s, lr, c in steps.calls if c.train.seed == 1]
    assert [x for x in seed1 if x[0] == "inc"] == [("inc", s, 0.001) for s in (1, 2, 3)]
    assert len([x for x in seed1 if x[0] != "inc"]) == 4


@pytest.mark.slow
def test_smoke_two_windows_on_tiny_synthetic_data(tmp_path):
    """The real runs on the tiny synthetic clicks, ICAN, 2 windows, one learning rate: the
    initial model, one full retrain, one update (the daily update command), both evaluated on
    the same clicks of window 2; a second call trains nothing."""
    from micrec_tf.data.synthetic import ensure_generated

    raw = ensure_generated(tiny_config(str(tmp_path)))
    cfg = tiny_config(str(tmp_path), data={"dataset": "canonical", "data_dir": raw},
                      train={"epochs": 2, "early_stopping_patience": 1},
                      export={"index": "brute_force", "top_k": 20})
    steps = rolling.Steps(log=lambda *a: None)
    kw = dict(windows=2, models=["ICAN"], lr_grid=(0.003,), out_dir=str(tmp_path / "res"),
              scratch=str(tmp_path / "scratch"), log=lambda *a: None)
    rolling.run_rolling(cfg, steps=steps, **kw)
    with open(tmp_path / "res" / "tiny-rolling.json") as fh:
        js = json.load(fh)
    rows = {r["step"]: r for r in js["models"]["ICAN"]["seeds"]["0"]}
    assert js["models"]["ICAN"]["lr"] == 0.003 and not js["missing"]
    with open(os.path.join(raw, "interactions.tsv")) as fh:
        times = sorted(int(ln.split("\t")[2]) for ln in fh.read().splitlines()[1:])
    # the test split of step s is every click of window s + 1 (pure-Python count by time)
    b = js["cut"]["boundaries"]
    window = [sum(1 for t in times if b[0] <= t < b[1]), sum(1 for t in times if t >= b[1])]
    assert rows[0]["all/examples"] == window[0] and rows[1]["all/examples"] == window[1]
    for r in rows.values():
        for key in ("all/hit@10", "all/hit@50"):
            assert 0.0 <= r[key]["inc"] <= 1.0 and 0.0 <= r[key]["full"] <= 1.0
        assert r["seconds"]["inc"] > 0 and r["seconds"]["full"] > 0
    assert rows[1]["all/hit@10"]["inc"] != rows[1]["all/hit@10"]["full"]  # two models
    cached = sorted(os.listdir(tmp_path / "res" / "runs" / "tiny-rolling" / "ican" / "seed0"))
    assert cached == ["full", "inc", "initial.json"]
    # History tails: written by the initial model's preprocess and grown by the update (whose
    # window users start from them), none for the full retrain (plain file reads).
    from micrec_tf.update import has_history_tails

    unit = tmp_path / "res" / "runs" / "tiny-rolling" / "ican" / "seed0"

    def result(path):
        with open(path) as fh:
            return json.load(fh)["result"]

    init, full = result(unit / "initial.json"), result(unit / "full" / "step01.json")
    inc = result(unit / "inc" / "lr0_003" / "step01.json")
    assert has_history_tails(init["artifacts_dir"]) and has_history_tails(inc["artifacts_dir"])
    assert not has_history_tails(full["artifacts_dir"])
    with open(os.path.join(inc["artifacts_dir"], "stats.json")) as fh:
        stats = json.load(fh)
    assert stats["history_tails"]["users_carried"] > 0
    # The update kept the step's split (a test split of window 2), not the update's default.
    assert stats["num_examples"]["test"] == window[1]

    class NoRuns:
        def __getattr__(self, name):
            raise AssertionError(f"a cached unit ran again: {name}")

    rolling.run_rolling(cfg, steps=NoRuns(), **kw)

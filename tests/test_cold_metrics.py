"""The cold / warm / all metrics of the item-cold-start protocol (issue 28) against brute force.

References are independent of the code under test: buckets from ``hashlib`` directly, ranks by
Python loops over the candidate items (small-integer vectors, so every dot product is exact in
float32 and ties are real ties, broken by the smaller item index as the module doc says), NDCG@20
by its formula, coverage as a Python set.
"""
from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest

from micrec_tf.config import ConfigError
from micrec_tf.evaluation.cold_start import (cold_rows, cold_start_metrics,
                                             empty_history_composition)


def _bucket(raw: str):
    d = int(hashlib.sha256(raw.encode()).hexdigest(), 16) % 10
    return {0: "valid", 1: "test"}.get(d, "warm")


def _brute_force(user, items, targets, hist_len, raw_ids, split, ns):
    buckets = ["pad"] + [_bucket(r) for r in raw_ids]
    slices = {"cold": [], "warm": [], "all": []}
    for q, t in enumerate(targets):
        b = buckets[t] if t > 0 else "warm"
        slices["cold" if b == split else "warm"].append(q)
        slices["all"].append(q)
    cands = {"cold": [i for i in range(1, len(buckets)) if buckets[i] == split],
             "warm": [i for i in range(1, len(buckets)) if buckets[i] == "warm"],
             "all": list(range(1, len(buckets)))}
    out = {}

    def score(q, i):
        return sum(float(a) * float(b) for a, b in zip(user[q], items[i]))

    for name, rows in slices.items():
        ranks, tops = [], []
        for q in rows:
            scored = sorted(((score(q, i), i) for i in cands[name]), key=lambda s: (-s[0], s[1]))
            order = [i for _, i in scored]
            tops.append(order)
            t = targets[q]
            ranks.append(order.index(t) + 1 if t in order else None)

        def summary(sel, prefix, coverage):
            out[f"{prefix}/num_clicks"] = len(sel)
            for n in ns:
                out[f"{prefix}/hit@{n}"] = (sum(1 for j in sel if ranks[j] and ranks[j] <= n)
                                            / len(sel)) if sel else float("nan")
            out[f"{prefix}/ndcg@20"] = (sum(1 / math.log2(ranks[j] + 1) for j in sel
                                            if ranks[j] and ranks[j] <= 20) / len(sel)
                                        if sel else float("nan"))
            if coverage:
                out[f"{prefix}/num_candidates"] = len(cands[name])
                for n in ns:
                    union = set()
                    for j in sel:
                        union.update(tops[j][:n])
                    out[f"{prefix}/coverage@{n}"] = len(union) / len(cands[name])

        summary(list(range(len(rows))), name, True)
        if name == "cold":
            summary([j for j, q in enumerate(rows) if hist_len[q] == 0], "cold_empty_history",
                    False)
            summary([j for j, q in enumerate(rows) if hist_len[q] != 0], "cold_with_history",
                    False)
    return out


@pytest.mark.parametrize("split", ["valid", "test"])
def test_every_metric_matches_brute_force(split):
    rng = np.random.default_rng(7 if split == "test" else 8)
    raw_ids = [f"item{k}" for k in range(400)]
    buckets = [_bucket(r) for r in raw_ids]
    assert buckets.count("valid") >= 25 and buckets.count("test") >= 25  # fixture sanity
    items = rng.integers(-4, 5, size=(401, 6)).astype(np.float32)
    own = [k + 1 for k, b in enumerate(buckets) if b == split]
    warm = [k + 1 for k, b in enumerate(buckets) if b == "warm"]
    targets = np.array([rng.choice(own) for _ in range(30)] + [rng.choice(warm) for _ in range(40)]
                       + [0, 0], np.int64)  # two OOV clicks: warm misses
    user = rng.integers(-4, 5, size=(targets.size, 6)).astype(np.float32)
    # queries near their target's vector so that ranks spread over 1 .. hundreds
    boosted = np.r_[0:15, 30:60]
    user[boosted] += items[targets[boosted]]
    hist_len = rng.integers(0, 3, size=targets.size)
    hist_len[:10] = 0
    ns = (20, 50, 500)
    got = cold_start_metrics(user, items, targets, hist_len, raw_ids, split, ns=ns)
    want = _brute_force(user, items, targets, hist_len, raw_ids, split, ns)
    assert set(got) == set(want)
    for key, val in want.items():
        if isinstance(val, int):
            assert got[key] == val, key
        else:
            assert got[key] == pytest.approx(val, abs=1e-6), key
    # the fixture is not trivial: some cold clicks miss at 20 and some hit, some histories empty
    assert 0 < got["cold/hit@20"] < 1 and 0 < got["warm/hit@20"] < 1
    assert got["cold_empty_history/num_clicks"] >= 10 and got["cold_with_history/num_clicks"] > 0
    assert got["all/hit@500"] == pytest.approx(70 / 72)  # every non-OOV target is in the top 400


def test_one_slice_alone_equals_that_slice_of_all_three():
    """``slices=("cold",)`` (training's per-epoch validation) gives exactly the cold keys of the
    full call, and no warm / all key; an unknown slice is refused."""
    rng = np.random.default_rng(3)
    raw_ids = [f"item{k}" for k in range(300)]
    items = rng.integers(-4, 5, size=(301, 5)).astype(np.float32)
    own = [k + 1 for k, r in enumerate(raw_ids) if _bucket(r) == "valid"]
    targets = np.array([rng.choice(own) for _ in range(25)] + [5, 6, 0], np.int64)
    users = rng.integers(-4, 5, size=(targets.size, 5)).astype(np.float32)
    hist_len = rng.integers(0, 2, size=targets.size)
    full = cold_start_metrics(users, items, targets, hist_len, raw_ids, "valid")
    cold = cold_start_metrics(users, items, targets, hist_len, raw_ids, "valid",
                              slices=("cold",))
    assert cold == {k: v for k, v in full.items() if k.startswith("cold")}
    assert cold["cold/num_clicks"] == 25
    with pytest.raises(ValueError, match="Received: slices"):
        cold_start_metrics(users, items, targets, hist_len, raw_ids, "valid", slices=("hot",))


def test_cold_rows_match_the_hash_rule():
    raw_ids = [f"r{k}" for k in range(200)]
    targets = np.array([0, *range(1, 201), 7, 7], np.int64)
    for split in ("valid", "test"):
        want = [t > 0 and _bucket(raw_ids[t - 1]) == split for t in targets]
        assert cold_rows(targets, raw_ids, split).tolist() == want
        assert 0 < sum(want) < len(want)
    with pytest.raises(ValueError, match="Received: split='train'"):
        cold_rows(targets, raw_ids, "train")


def test_empty_history_composition_matches_a_pure_python_count():
    rng = np.random.default_rng(3)
    raw_ids = [f"r{k}" for k in range(300)]
    targets = rng.integers(0, 301, size=2000)
    hist_len = np.where(rng.random(2000) < 0.2, 0, rng.integers(1, 20, size=2000))
    for split in ("valid", "test"):
        cold = [(int(t), int(h)) for t, h in zip(targets, hist_len)
                if t > 0 and _bucket(raw_ids[t - 1]) == split]
        empty = [t for t, h in cold if h == 0]

        def count(ids):
            c = {}
            for i in ids:
                c[i] = c.get(i, 0) + 1
            return sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))

        got = empty_history_composition(targets, hist_len, raw_ids, split, top=3)
        assert got["empty_clicks"] == len(empty) > 0
        assert got["cold_clicks"] == len(cold)
        assert got["empty_distinct_items"] == len(count(empty))
        assert got["cold_distinct_items"] == len(count([t for t, _ in cold]))
        assert got["empty_top"] == [list(kv) for kv in count(empty)[:3]]
        assert got["empty_top_share"] == pytest.approx(
            sum(n for _, n in count(empty)[:3]) / len(empty))
        assert got["cold_top_share"] == pytest.approx(
            sum(n for _, n in count([t for t, _ in cold])[:3]) / len(cold))
    none = empty_history_composition(np.array([1, 2]), np.array([3, 4]), raw_ids, "test")
    assert none["empty_clicks"] == 0 and none["empty_top"] == []
    assert math.isnan(none["empty_top_share"])
    with pytest.raises(ValueError, match="Received: top=0"):
        empty_history_composition(targets, hist_len, raw_ids, "test", top=0)


def _three_items():
    # raw ids with hand-checked buckets (tests/test_cold_split.py): "1" warm, "18" cold-valid,
    # "2" cold-test, "17" cold-test
    return ["1", "18", "2", "17"]


def test_cold_click_candidates_are_its_own_bucket_only():
    raw_ids = _three_items()
    assert [_bucket(r) for r in raw_ids] == ["warm", "valid", "test", "test"]
    items = np.array([[0, 0], [3, 0], [2, 0], [1, 0], [0.5, 0]], np.float32)
    user = np.array([[1, 0]], np.float32)
    # target item 3 ("2", cold-test): the warm item 1 and the cold-valid item 2 score above it
    got = cold_start_metrics(user, items, np.array([3]), np.array([0]), raw_ids, "test",
                             ns=(1, 2))
    assert got["cold/num_candidates"] == 2 and got["cold/num_clicks"] == 1
    assert got["cold/hit@1"] == 1.0 and got["cold/ndcg@20"] == 1.0
    assert got["cold_empty_history/hit@1"] == 1.0 and got["cold_with_history/num_clicks"] == 0
    assert got["all/hit@1"] == 0.0 and got["all/hit@2"] == 0.0  # rank 3 over the catalogue
    assert got["all/ndcg@20"] == pytest.approx(1 / math.log2(4))
    assert got["warm/num_clicks"] == 0 and got["warm/num_candidates"] == 1
    assert got["cold/coverage@1"] == 0.5 and got["all/coverage@2"] == 0.5
    # the same vectors on the validation side: target item 2 ("18") is ranked among {2} only
    got = cold_start_metrics(user, items, np.array([2]), np.array([4]), raw_ids, "valid",
                             ns=(1,))
    assert got["cold/num_candidates"] == 1 and got["cold/hit@1"] == 1.0
    assert got["cold_with_history/hit@1"] == 1.0 and got["all/hit@1"] == 0.0


def test_warm_click_is_ranked_among_warm_items_only():
    raw_ids = _three_items()
    items = np.array([[0, 0], [0.5, 0], [3, 0], [2, 0], [1, 0]], np.float32)
    got = cold_start_metrics(np.array([[1, 0]], np.float32), items, np.array([1]),
                             np.array([2]), raw_ids, "test", ns=(1,))
    assert got["warm/hit@1"] == 1.0 and got["all/hit@1"] == 0.0
    assert got["cold/num_clicks"] == 0 and math.isnan(got["cold/hit@1"])


def test_click_on_the_other_cold_bucket_is_refused():
    with pytest.raises(ValueError, match="other cold bucket"):
        cold_start_metrics(np.ones((1, 2), np.float32), np.ones((5, 2), np.float32),
                           np.array([2]), np.array([0]), _three_items(), "test")


def test_refused_without_the_catalogue_vocabulary():
    with pytest.raises(ConfigError) as err:
        cold_start_metrics(np.ones((1, 2), np.float32), np.ones((5, 2), np.float32),
                           np.array([3]), np.array([0]), _three_items(), "test",
                           item_vocabulary="clicked")
    msg = str(err.value)
    assert "\n" not in msg and "preprocess.item_vocabulary=catalogue" in msg


def test_one_definition_of_the_cold_rule():
    from micrec_tf.data.cold_start import cold_bucket as data_rule
    from pipelines.split import cold_bucket as pipeline_rule
    assert pipeline_rule is data_rule
    from micrec_tf.data.cold_start import ITEM_COLD_START
    from pipelines.split import ITEM_COLD_START as PIPELINE_MODE
    assert ITEM_COLD_START == PIPELINE_MODE == "item_cold_start"
    for raw in [f"x{k}" for k in range(50)]:
        assert {"valid": "valid", "test": "test", None: "warm"}[data_rule(raw)] == _bucket(raw)


@pytest.mark.slow
def test_training_writes_cold_start_metrics_that_match_brute_force(tmp_path):
    """A tiny ``item_cold_start`` + ``catalogue`` pipeline and one epoch: metrics.json holds the
    cold / warm / all metrics of both splits, equal to a brute-force ranking (Python loops over
    the hash-rule buckets) of the trained model's own vectors. Float scores can tie within
    float32 noise: a click with another candidate within 1e-5 of its target's score may move by
    one rank, so each hit / ndcg value gets a tolerance of (such clicks) / (clicks)."""
    import json
    import os

    from micrec_tf.data.arrays import load_split_arrays
    from micrec_tf.evaluation.evaluate import item_vectors, user_vectors
    from micrec_tf.train import train
    from pipelines import preprocess, title_neighbours
    from tests.conftest import tiny_config

    cfg = tiny_config(str(tmp_path), preprocess={"split": "item_cold_start",
                                                 "item_vocabulary": "catalogue"},
                      train={"epochs": 1, "early_stopping_patience": 2})
    preprocess.run(cfg, verbose=False)
    title_neighbours.run(cfg, verbose=False)
    lines = []
    result = train(cfg, evaluate_test=True, log=lines.append)
    with open(os.path.join(result["run_dir"], "metrics.json"), encoding="utf-8") as fh:
        saved = json.load(fh)["cold_start"]
    # Early stopping reads the cold-validation slice; after one epoch it is the final model's
    # cold-validation HIT@50 (checked against brute force below).
    assert any("restored the best epoch 1 (val_cold_hit_at_50=" in str(x) for x in lines), lines
    epoch1 = result["history"]["val_cold_hit_at_50"][0]
    assert epoch1 == pytest.approx(saved["valid"]["cold/hit@50"], abs=1e-9)
    with open(os.path.join(cfg.artifacts_dir, "vocab", "item_id.txt"), encoding="utf-8") as fh:
        raw_ids = [line.rstrip("\n") for line in fh]
    model = result["model"]
    items = item_vectors(model, len(raw_ids) + 1)
    buckets = ["pad"] + [_bucket(r) for r in raw_ids]
    for split in ("valid", "test"):
        arrays = load_split_arrays(cfg.artifacts_dir, split)
        targets = [int(t) for t in np.asarray(arrays["item"]).reshape(-1)]
        hist_len = [int(h) for h in np.asarray(arrays["hist_len"]).reshape(-1)]
        user = user_vectors(model, arrays)
        ns = (20, 50, 500)
        want = _brute_force(user, items, targets, hist_len, raw_ids, split, ns)
        got = saved[split]
        assert got["cold/num_clicks"] > 0 and got["warm/num_clicks"] > 0  # both slices exist
        assert {k for k in got} == set(want)
        # clicks whose target score has a near tie among its candidates (per slice)
        ambiguous = {"cold": 0, "warm": 0, "all": 0}
        for q, t in enumerate(targets):
            b = buckets[t] if t > 0 else "warm"
            name = "cold" if b == split else "warm"
            for sl, cands in ((name, [i for i in range(1, len(buckets))
                                      if buckets[i] == (split if name == "cold" else "warm")]),
                              ("all", range(1, len(buckets)))):
                s_t = float(np.dot(user[q].astype(np.float64), items[t].astype(np.float64)))
                if any(i != t and abs(float(np.dot(user[q].astype(np.float64),
                                                   items[i].astype(np.float64))) - s_t) < 1e-5
                       for i in cands):
                    ambiguous[sl] += 1
        for key, val in want.items():
            sl = key.split("/")[0].split("_")[0]
            if isinstance(val, int) or "coverage" in key:
                if "coverage" not in key:
                    assert got[key] == val, (split, key)
                continue
            n = want[f"{key.split('/')[0]}/num_clicks"]
            tol = ambiguous[sl] / n + 1e-6 if n else 0
            if math.isnan(val):
                assert math.isnan(got[key]), (split, key)
            else:
                assert abs(got[key] - val) <= tol, (split, key, got[key], val)

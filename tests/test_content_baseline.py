"""The non-neural content baseline of the item-cold-start protocol (issue 28) and the score-based
entry point of the cold-start metrics, against Python loops and brute-force rankings."""
import hashlib
import math

import numpy as np
import pytest

from micrec_tf.evaluation import cold_start, content_baseline as cb


def _bucket(raw):
    """The issue's hash rule, written out independently: 0 cold-valid, 1 cold-test, else warm."""
    b = int(hashlib.sha256(raw.encode()).hexdigest(), 16) % 10
    return {0: "valid", 1: "test"}.get(b, "warm")


def _raw_ids(n_valid, n_test, n_warm):
    """Raw ids (strings of integers, in increasing order) with the asked bucket sizes."""
    want = {"valid": n_valid, "test": n_test, "warm": n_warm}
    out = []
    for i in range(10000):
        b = _bucket(str(i))
        if want[b] > 0:
            want[b] -= 1
            out.append(str(i))
        if not any(want.values()):
            return out
    raise AssertionError("not enough ids")


# ---------------------------------------------------------------- loop references

def _ref_tag_score(hist, tags, item):
    counts = {}
    for h in hist:
        for t in set(int(x) for x in tags[h] if x > 0):
            counts[t] = counts.get(t, 0) + 1
    pn = math.sqrt(sum(c * c for c in counts.values()))
    itags = set(int(x) for x in tags[item] if x > 0)
    if pn == 0 or not itags:
        return 0.0
    return sum(counts.get(t, 0) for t in itags) / (pn * math.sqrt(len(itags)))


def _ref_text_score(hist, text, item):
    if not hist:
        return 0.0
    d = len(text[0])
    mean = [sum(float(text[h][j]) for h in hist) / len(hist) for j in range(d)]
    mn = math.sqrt(sum(x * x for x in mean))
    vec = [float(x) for x in text[item]]
    vn = math.sqrt(sum(x * x for x in vec))
    if mn == 0 or vn == 0:
        return 0.0
    return sum(a * b for a, b in zip(mean, vec)) / (mn * vn)


def _ref_score(hist, tags, text, item, alpha):
    s = 0.0
    if alpha > 0:
        s += alpha * _ref_tag_score(hist, tags, item)
    if alpha < 1:
        s += (1 - alpha) * _ref_text_score(hist, text, item)
    return s


def _ref_metrics(score_of, clicks, raw_ids, split, ns):
    """Brute force: each click's target ranked among its slice's candidates by (-score, index)."""
    buckets = ["pad"] + [_bucket(r) for r in raw_ids]
    v = len(buckets)
    res = {}
    per = {"cold": [], "warm": [], "all": [], "cold_empty_history": [], "cold_with_history": []}
    for u in range(len(clicks["targets"])):
        hist = [int(h) for h in clicks["hist_items"][u][:clicks["hist_len"][u]]]
        tgt = int(clicks["targets"][u])
        scores = {i: score_of(u, hist, i) for i in range(1, v)}
        cold = buckets[tgt] == split
        for name, cands in (("cold" if cold else "warm",
                             [i for i in range(1, v) if buckets[i] == (split if cold else "warm")]),
                            ("all", list(range(1, v)))):
            order = sorted(cands, key=lambda i: (-round(scores[i], 9), i))
            rank = order.index(tgt) + 1
            per[name].append(rank)
            if name == "cold":
                per["cold_empty_history" if not hist else "cold_with_history"].append(rank)
    for name, ranks in per.items():
        for n in ns:
            res[f"{name}/hit@{n}"] = (float(np.mean([r <= n for r in ranks])) if ranks
                                      else float("nan"))
        res[f"{name}/ndcg@20"] = (float(np.mean([1 / math.log2(r + 1) if r <= 20 else 0.0
                                                 for r in ranks])) if ranks else float("nan"))
        res[f"{name}/num_clicks"] = len(ranks)
    return res


def _assert_metrics(got, ref):
    for key, val in ref.items():
        if isinstance(val, float) and math.isnan(val):
            assert math.isnan(got[key]), key
        else:
            assert got[key] == pytest.approx(val, abs=1e-6), key


# ---------------------------------------------------------------- fixtures

NS = (1, 2, 3)


def _tiny(seed=0, n_valid=3, n_test=3, n_warm=4, num_tags=3, dim=3):
    rng = np.random.default_rng(seed)
    raw = _raw_ids(n_valid, n_test, n_warm)
    v = len(raw) + 1
    tags = np.zeros((v, 2), np.int64)
    for i in range(1, v):
        k = rng.integers(0, 3)  # 0, 1 or 2 tags (a repeated tag counts once)
        tags[i, :k] = rng.integers(1, num_tags + 1, size=k)
    text = np.zeros((v, dim), np.float32)
    text[1:] = rng.normal(size=(v - 1, dim)).astype(np.float32)
    text[v - 1] = 0.0  # an item without a text vector
    return raw, tags, text


def _clicks(raw, split, num, h, rng):
    buckets = ["pad"] + [_bucket(r) for r in raw]
    warm = [i for i, b in enumerate(buckets) if b == "warm"]
    own = [i for i, b in enumerate(buckets) if b == split]
    hist = np.zeros((num, h), np.int64)
    hlen = rng.integers(0, h + 1, size=num)
    hlen[0] = 0  # at least one empty history
    for u in range(num):
        hist[u, :hlen[u]] = rng.choice(warm, size=hlen[u])
        hist[u, hlen[u]:] = rng.choice(warm, size=h - hlen[u])  # junk past the length: ignored
    targets = np.array([rng.choice(own if u % 2 == 0 else warm) for u in range(num)], np.int64)
    return {"hist_items": hist, "hist_len": hlen, "targets": targets}


# ---------------------------------------------------------------- tests

@pytest.mark.parametrize("alpha", [1.0, 0.0, 0.25, 0.5, 0.75])
def test_scores_match_python_loops(alpha):
    raw, tags, text = _tiny(seed=1)
    rng = np.random.default_rng(2)
    clicks = _clicks(raw, "valid", 12, 4, rng)
    model = cb.ContentProfileBaseline(tags, text, alpha)
    got = model.scores(clicks["hist_items"], clicks["hist_len"])
    assert got.shape == (12, len(raw) + 1)
    for u in range(12):
        hist = [int(x) for x in clicks["hist_items"][u][:clicks["hist_len"][u]]]
        for i in range(1, len(raw) + 1):
            assert got[u, i] == pytest.approx(_ref_score(hist, tags, text, i, alpha), abs=1e-9)


def test_empty_history_scores_zero_and_ranks_by_index():
    raw, tags, text = _tiny(seed=3)
    hist = np.array([[2, 3, 4], [0, 0, 0]])
    model = cb.ContentProfileBaseline(tags, text, 0.5)
    assert np.all(model.scores(hist, [0, 0]) == 0.0)
    # Every cold target ranked by index alone among its bucket's items (1-based position).
    buckets = ["pad"] + [_bucket(r) for r in raw]
    cold = [i for i, b in enumerate(buckets) if b == "test"]
    clicks = {"hist_items": np.zeros((len(cold), 3), np.int64),
              "hist_len": np.zeros(len(cold), np.int64), "targets": np.array(cold)}
    got = cb.evaluate_variant(model, clicks, raw, "test", ns=NS)
    want_ndcg = np.mean([1 / math.log2(r + 2) for r in range(len(cold))])
    assert got["cold/ndcg@20"] == pytest.approx(want_ndcg, abs=1e-6)
    assert got["cold/hit@1"] == pytest.approx(1 / len(cold))
    assert got["cold_empty_history/num_clicks"] == len(cold)
    assert got["cold_with_history/num_clicks"] == 0


@pytest.mark.parametrize("alpha,split", [(1.0, "valid"), (0.0, "test"), (0.5, "test")])
def test_metrics_match_brute_force(alpha, split):
    raw, tags, text = _tiny(seed=4, n_valid=5, n_test=5, n_warm=6)
    clicks = _clicks(raw, split, 30, 5, np.random.default_rng(5))
    model = cb.ContentProfileBaseline(tags, text, alpha)
    got = cb.evaluate_variant(model, clicks, raw, split, batch_size=7, ns=NS)
    ref = _ref_metrics(lambda u, h, i: _ref_score(h, tags, text, i, alpha), clicks, raw, split, NS)
    _assert_metrics(got, ref)


def _selection_case(informative):
    """Items whose cold clicks follow the history's content through tags or text alone."""
    raw = _raw_ids(6, 6, 6)
    v = len(raw) + 1
    buckets = ["pad"] + [_bucket(r) for r in raw]
    group = np.array([0] + [i % 3 for i in range(1, v)])  # three content groups
    tags = np.zeros((v, 1), np.int64)
    text = np.zeros((v, 3), np.float32)
    rng = np.random.default_rng(7)
    if informative == "tags":
        tags[1:, 0] = group[1:] + 1
        text[1:] = 1.0  # the same text vector for every item
    else:
        tags[1:, 0] = 1  # one tag for every item
        text[1:] = np.eye(3)[group[1:]] + 0.05 * rng.normal(size=(v - 1, 3))
    data = {}
    for split in ("valid", "test"):
        own = [i for i in range(1, v) if buckets[i] == split]
        warm = [i for i in range(1, v) if buckets[i] == "warm"]
        hist, hlen, targets = [], [], []
        for t in own * 2:
            same = [w for w in warm if group[w] == group[t]]
            hist.append(rng.choice(same, size=3))
            hlen.append(3)
            targets.append(t)
        data[split] = {"hist_items": np.array(hist), "hist_len": np.array(hlen),
                       "targets": np.array(targets)}
    return raw, tags, text, data


@pytest.mark.parametrize("informative", ["tags", "text"])
def test_variant_chosen_on_valid(informative):
    raw, tags, text, data = _selection_case(informative)
    metric = "cold/hit@1"
    out = cb.choose_and_evaluate(data["valid"], data["test"], tags, text, raw, metric=metric,
                                 ns=NS)
    ref_valid = {}
    for name, alpha in cb.VARIANTS.items():
        ref = _ref_metrics(lambda u, h, i, a=alpha: _ref_score(h, tags, text, i, a), data["valid"],
                           raw, "valid", NS)
        ref_valid[name] = ref[metric]
        assert out["valid_scores"][name] == pytest.approx(ref[metric], abs=1e-9), name
    best = max(ref_valid.values())
    want = next(n for n in cb.VARIANTS if ref_valid[n] == best)  # first best in order
    assert want == informative
    assert out["variant"] == want and out["alpha"] == cb.VARIANTS[want]
    ref_test = _ref_metrics(lambda u, h, i: _ref_score(h, tags, text, i, cb.VARIANTS[want]),
                            data["test"], raw, "test", NS)
    _assert_metrics(out["test"], ref_test)
    assert ref_valid[informative] > ref_valid["text" if informative == "tags" else "tags"]


def test_score_entry_point_equals_vector_entry_point():
    raw = _raw_ids(4, 5, 6)
    v = len(raw) + 1
    rng = np.random.default_rng(11)
    items = rng.integers(-2, 3, size=(v, 3)).astype(np.float32)  # small integers: exact, ties
    users = rng.integers(-2, 3, size=(25, 3)).astype(np.float32)
    buckets = ["pad"] + [_bucket(r) for r in raw]
    allowed = [i for i in range(1, v) if buckets[i] != "valid"]
    targets = rng.choice(allowed, size=25)
    hlen = rng.integers(0, 3, size=25)
    by_vec = cold_start.cold_start_metrics(users, items, targets, hlen, raw, "test",
                                           ns=(1, 5, 20), batch_size=4)
    by_score = cold_start.cold_start_metrics_from_scores(lambda r: users[r] @ items.T, targets,
                                                         hlen, raw, "test", ns=(1, 5, 20),
                                                         batch_size=3)
    assert by_vec.keys() == by_score.keys()
    for key in by_vec:
        a, b = by_vec[key], by_score[key]
        assert (math.isnan(a) and math.isnan(b)) or a == b, key
    # and both agree with the brute force (ties by the smaller index)
    clicks = {"hist_items": np.zeros((25, 2), np.int64), "hist_len": hlen, "targets": targets}
    ref = _ref_metrics(lambda u, h, i: float(sum(users[u, j] * items[i, j] for j in range(3))),
                       clicks, raw, "test", (1, 5, 20))
    _assert_metrics(by_score, {k: v for k, v in ref.items() if "history" not in k})


def test_arguments_validated():
    raw, tags, text = _tiny()
    with pytest.raises(ValueError, match="Received"):
        cb.ContentProfileBaseline(tags, text, 1.5)
    with pytest.raises(ValueError, match="Received"):
        cb.ContentProfileBaseline(tags, None, 0.5)
    with pytest.raises(ValueError, match="Received"):
        cb.ContentProfileBaseline(tags, text[:3], 0.5)
    with pytest.raises(ValueError, match="Received"):
        cold_start.cold_start_metrics_from_scores(lambda r: np.zeros((len(r), 2)), [1], [0], raw,
                                                  "valid")

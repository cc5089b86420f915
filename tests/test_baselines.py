"""Most-popular and co-occurrence item-kNN on hand-made data; test-split loading round trip.

The item-kNN variants are checked against a pure-Python brute force (dicts and loops) written
here, independently of the sparse-matrix scoring. Popularities are powers of 4, so every weight
(count / 2^a) and every sum is exact in floating point and rankings can be compared exactly.
"""
import json
import math
import os

import numpy as np
import pytest

from micrec_tf.data.artifacts import CooccurrenceTable, NeighbourTable, cooccurrence_npz_bytes
from micrec_tf.evaluation import (KNN_VARIANTS, CooccurrenceItemKNN, MostPopular, choose_variant,
                                  earlier_clicks_exclusion, summarize_topk)

# V = 6: items 1..5. Popularity order: 2 and 3 (9 each, 2 first by index), 1, 5, 4.
COUNTS = np.array([0, 5, 9, 9, 1, 3])
NEIGHBOURS = {1: ([4, 5], [3, 1]), 2: ([3], [2]), 3: ([2, 4], [2, 1]), 4: ([1, 3], [3, 1]),
              5: ([1, 3], [1, 1])}


def cooc_table():
    nb = np.zeros((6, 2), np.int64)
    w = np.zeros((6, 2), np.float32)
    for i, (n, c) in NEIGHBOURS.items():
        nb[i, :len(n)] = n
        w[i, :len(c)] = c
    return NeighbourTable(neighbours=nb, weights=w)


def hist(*rows, h=4):
    out = np.zeros((len(rows), h), np.int64)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out, np.array([len(r) for r in rows])


def test_most_popular_by_hand():
    mp = MostPopular(COUNTS)
    idx, sc = mp.rank_n(2, 5)
    assert idx.tolist() == [[2, 3, 1, 5, 4]] * 2
    assert sc[0].tolist() == [9, 9, 5, 3, 1]
    idx, _ = mp.rank_n(2, 3, exclude=[[3], [2, 1, 4, 5]])
    assert idx.tolist() == [[2, 1, 5], [3, -1, -1]]


def test_itemknn_by_hand():
    knn = CooccurrenceItemKNN(cooc_table(), COUNTS)
    h, n = hist([1, 3], [], [2, 2], [5], [3, 5])
    ex = {"hist_items": h, "hist_len": n}
    idx, sc = knn.rank(ex, 5, batch_size=2)
    assert idx.tolist() == [
        [4, 2, 5, 3, 1],  # 4: 3+1, 2: 2, 5: 1; zero scores by popularity: 3 (9) before 1 (5)
        [2, 3, 1, 5, 4],  # empty history: pure popularity
        [3, 2, 1, 5, 4],  # a repeated click counts twice: 3 scores 4
        [3, 1, 2, 5, 4],  # 1 and 3 tie at 1: popularity puts 3 first
        [2, 3, 1, 4, 5],  # 2: 2; 3, 1, 4 tie at 1: by popularity 9, 5, 1; then 5 (score 0)
    ]
    assert sc[0].tolist() == [4, 2, 1, 0, 0]
    # exclude the clicked items
    idx, _ = knn.rank(ex, 5, exclude=[[1, 3], [], [2], [5], [3, 5]])
    assert idx.tolist() == [[4, 2, 5, -1, -1], [2, 3, 1, 5, 4], [3, 1, 5, 4, -1],
                            [3, 1, 2, 4, -1], [2, 1, 4, -1, -1]]
    # only the most recent click (hist is oldest first)
    knn1 = CooccurrenceItemKNN(cooc_table(), COUNTS, recent=1)
    idx, _ = knn1.rank({"hist_items": h[:1], "hist_len": n[:1]}, 5)
    assert idx.tolist() == [[2, 4, 3, 1, 5]]
    # the shared metrics apply to baseline rankings unchanged
    res = summarize_topk(idx, np.array([4]), 6, [1, 2], [2])
    assert res["hit@1"] == 0.0 and res["hit@2"] == 1.0 and res["coverage@2"] == 0.4


def test_itemknn_scores_match_loop():
    rng = np.random.default_rng(0)
    v, m = 30, 5
    nb = rng.integers(1, v, size=(v, m))
    w = rng.integers(0, 4, size=(v, m)).astype(np.float32)
    nb[w == 0] = 0
    nb[0], w[0] = 0, 0
    knn = CooccurrenceItemKNN(NeighbourTable(nb, w), rng.integers(0, 10, size=v))
    h = rng.integers(0, v, size=(12, 6))
    lens = rng.integers(0, 7, size=12)
    got = knn.scores(h, lens)
    for i in range(12):
        ref = np.zeros(v)
        for j in range(lens[i]):
            if h[i, j] > 0:
                for nbr, cnt in zip(nb[h[i, j]], w[h[i, j]]):
                    ref[nbr] += cnt
        np.testing.assert_allclose(got[i, 1:], ref[1:])


# ------------------------------------------------------------- item-kNN variants vs brute force
def brute_weights(pairs, pop, variant, top=50):
    """{(h, j): w(h, j)} from unordered ``{(a, b): count}`` pairs, by the variant's formula."""
    rows = {}
    for (a, b), c in pairs.items():
        rows.setdefault(a, {})[b] = c
        rows.setdefault(b, {})[a] = c
    if variant == "count_top50":  # each row's first `top` entries by count desc, index asc
        rows = {h: dict(sorted(r.items(), key=lambda e: (-e[1], e[0]))[:top])
                for h, r in rows.items()}
    w = {}
    for h, r in rows.items():
        for j, c in r.items():
            ph, pj = max(pop[h], 1), max(pop[j], 1)
            if variant in ("count", "count_top50"):
                w[h, j] = float(c)
            elif variant == "sqrt_pop":
                w[h, j] = c / math.sqrt(pj)
            elif variant == "cosine":
                w[h, j] = c / math.sqrt(ph * pj)
            else:
                raise AssertionError(variant)
    return w


def brute_scores(w, history, v):
    """Summed weights over the history clicks (a repeated click counts each time)."""
    s = [0.0] * v
    for h in history:
        if h > 0:
            for j in range(1, v):
                s[j] += w.get((h, j), 0.0)
    return s


def brute_topk(scores, pop, k, exclude=()):
    """Higher score, then more popular, then smaller index; -1 padding."""
    cands = sorted((j for j in range(1, len(scores)) if j not in set(exclude)),
                   key=lambda j: (-scores[j], -pop[j], j))[:k]
    return cands + [-1] * (k - len(cands))


def pairs_table(v, pairs):
    nbs = {}
    for (a, b), c in pairs.items():
        nbs.setdefault(a, ([], []))
        nbs.setdefault(b, ([], []))
        nbs[a][0].append(b)
        nbs[a][1].append(c)
        nbs[b][0].append(a)
        nbs[b][1].append(c)
    return table_from_neighbours(v, nbs)


# V = 9: items 1..8; item 8 never co-occurs and was never clicked (pop 0).
HAND_POP = [0, 16, 1, 1, 16, 4, 4, 1, 0]
HAND_PAIRS = {(1, 2): 4, (2, 3): 3, (4, 6): 3, (5, 7): 1, (1, 4): 2, (3, 5): 1}


@pytest.mark.parametrize("variant", KNN_VARIANTS)
def test_itemknn_variants_match_brute_force_by_hand(variant):
    v = len(HAND_POP)
    knn = CooccurrenceItemKNN(pairs_table(v, HAND_PAIRS), np.array(HAND_POP), variant=variant)
    histories = [[2], [7, 4], [2, 2, 3], [], [8], [1, 5, 6, 3]]
    h, n = hist(*histories)
    w = brute_weights(HAND_PAIRS, HAND_POP, variant)
    got = knn.scores(h, n)
    excl = [[2], [], [3, 1], [1], [], [5, 6]]
    idx, _ = knn.rank({"hist_items": h, "hist_len": n}, 8, batch_size=4)
    idx_x, _ = knn.rank({"hist_items": h, "hist_len": n}, 8, exclude=excl, batch_size=4)
    for i, hi in enumerate(histories):
        ref = brute_scores(w, hi, v)
        np.testing.assert_allclose(got[i, 1:], ref[1:], rtol=0, atol=1e-12)
        assert idx[i].tolist() == brute_topk(ref, HAND_POP, 8)
        assert idx_x[i].tolist() == brute_topk(ref, HAND_POP, 8, excl[i])


def test_itemknn_variants_by_hand_values():
    v = len(HAND_POP)
    h, n = hist([7, 4])
    table = pairs_table(v, HAND_PAIRS)
    # item 5 <- 7 (count 1, pops 1 and 4), item 6 <- 4 (count 3, pops 16 and 4), 1 <- 4 (2; 16, 16)
    expect = {"count": {5: 1, 6: 3, 1: 2},
              "sqrt_pop": {5: 1 / 2, 6: 3 / 2, 1: 2 / 4},
              "cosine": {5: 1 / 2, 6: 3 / 8, 1: 2 / 16}}
    for variant, by_item in expect.items():
        sc = CooccurrenceItemKNN(table, np.array(HAND_POP), variant=variant).scores(h, n)[0]
        for j in range(1, v):
            assert sc[j] == by_item.get(j, 0.0), (variant, j)
    idx, _ = CooccurrenceItemKNN(table, np.array(HAND_POP), variant="cosine").rank(
        {"hist_items": h, "hist_len": n}, 8)
    # 5 (.5), 6 (.375), 1 (.125); unscored by popularity: 4 (16), 2, 3 (1 each, by index), 8 (0)
    # (7 and 4 are the history; not excluded here)
    assert idx[0].tolist() == [5, 6, 1, 4, 2, 3, 7, 8]


@pytest.mark.parametrize("variant", KNN_VARIANTS)
def test_itemknn_variants_match_brute_force_random(variant):
    """Rows longer than 50 (item 1 co-occurs with 60 items, counts with ties) test count_top50."""
    rng = np.random.default_rng(7)
    v = 80
    pop = [0] + [int(x) for x in rng.choice([0, 1, 4, 16, 64, 256], size=v - 1)]
    pairs = {(1, j): int(rng.integers(1, 4)) for j in range(2, 62)}
    for _ in range(300):
        a, b = sorted(int(x) for x in rng.choice(np.arange(2, v), size=2, replace=False))
        pairs[a, b] = int(rng.integers(1, 6))
    knn = CooccurrenceItemKNN(pairs_table(v, pairs), np.array(pop), variant=variant)
    histories = [[int(x) for x in rng.integers(0, v, size=rng.integers(0, 7))] for _ in range(25)]
    histories[0] = [1, 1, 5]
    h = np.zeros((25, 6), np.int64)
    for i, r in enumerate(histories):
        h[i, :len(r)] = r
    lens = np.array([len(r) for r in histories])
    excl = [[int(x) for x in rng.integers(1, v, size=rng.integers(0, 10))] for _ in range(25)]
    w = brute_weights(pairs, pop, variant)
    got = knn.scores(h, lens)
    idx, _ = knn.rank({"hist_items": h, "hist_len": lens}, 30, exclude=excl, batch_size=7)
    full, _ = knn.rank({"hist_items": h, "hist_len": lens}, v + 2, batch_size=7)
    for i, hi in enumerate(histories):
        ref = brute_scores(w, hi, v)
        np.testing.assert_allclose(got[i, 1:], ref[1:], rtol=0, atol=1e-9)
        assert idx[i].tolist() == brute_topk(ref, pop, 30, excl[i])
        assert full[i].tolist() == brute_topk(ref, pop, v + 2)
    if variant == "count_top50":  # the truncation matters here: item 1's row is cut at 50
        full_w = brute_weights(pairs, pop, "count")
        assert brute_scores(full_w, [1], v) != brute_scores(w, [1], v)


def test_itemknn_bad_arguments():
    table = pairs_table(len(HAND_POP), HAND_PAIRS)
    with pytest.raises(ValueError, match="Received: 'tfidf'"):
        CooccurrenceItemKNN(table, np.array(HAND_POP), variant="tfidf")
    with pytest.raises(ValueError, match="9 rows but train_counts has 5"):
        CooccurrenceItemKNN(table, np.zeros(5))


# Validation: Q1 (history 2, target 3) is a hit at 1 for sqrt_pop and cosine (count picks the
# popular 1), Q2 (history 7, 4, target 5) only for cosine (count and sqrt_pop pick 6).
SEL_VALID = [([2], 3), ([7, 4], 5)]


def test_choose_variant_picks_the_best_on_validation():
    v = len(HAND_POP)
    table = pairs_table(v, HAND_PAIRS)
    h, n = hist(*[q for q, _ in SEL_VALID])
    targets = np.array([t for _, t in SEL_VALID])
    expect = {}
    for variant in KNN_VARIANTS:
        w = brute_weights(HAND_PAIRS, HAND_POP, variant)
        expect[variant] = np.mean([brute_topk(brute_scores(w, q, v), HAND_POP, 1)[0] == t
                                   for q, t in SEL_VALID])
    assert expect == {"count": 0.0, "sqrt_pop": 0.5, "cosine": 1.0, "count_top50": 0.0}
    best, hits, _ = choose_variant(table, np.array(HAND_POP), {"hist_items": h, "hist_len": n},
                                   targets, 1)
    assert best == "cosine" and hits == expect
    # only the variants offered compete; ties go to the one listed first
    best, hits, _ = choose_variant(table, np.array(HAND_POP), {"hist_items": h, "hist_len": n},
                                   targets, 1, variants=["count_top50", "count"])
    assert best == "count_top50" and hits == {"count_top50": 0.0, "count": 0.0}


def test_reference_rows_choose_the_knn_variant_on_valid(tmp_path):
    from experiments.reference_rows import reference_rows

    root = str(tmp_path / "art")
    # training clicks give HAND_POP (each click its own user, long before the rest)
    train = [(f"t{j}-{c}".encode(), [], j, 1) for j, p in enumerate(HAND_POP) for c in range(p)]
    valid = [(b"a", q, t, 10 + i) for i, (q, t) in enumerate(SEL_VALID)]
    test = [(b"a", [2], 1, 20), (b"c", [7, 4], 6, 20)]  # count's hits, cosine's misses at 1
    write_artifacts(root, {"train-00000-of-00001": train, "valid-00000-of-00001": valid,
                           "test-00000-of-00001": test}, v=len(HAND_POP),
                    neighbours={j: (list(r), list(r.values())) for j, r in _rows(HAND_PAIRS)})
    rows = reference_rows(root, "test", ns=[1, 2], coverage_ns=[2])
    for excl in ("false", "true"):
        knn = rows[f"cooccurrence_itemknn/exclude_clicked={excl}"]
        assert knn["variant"] == "cosine"
        sel = knn["variant_selection"]
        assert sel["split"] == "valid" and sel["metric"] == "hit@1"
        assert sel["hit"] == {"count": 0.0, "sqrt_pop": 0.5, "cosine": 1.0, "count_top50": 0.0}
    # test, cosine: a (history 2) ranks 3 (3), 1 (1); c (history 7, 4) ranks 5, 6
    knn = rows["cooccurrence_itemknn/exclude_clicked=false"]
    assert knn["hit@1"] == 0.0 and knn["hit@2"] == 1.0
    # excluding a's earlier clicks (2, and 3 and 5 from valid) puts 1 first
    knn = rows["cooccurrence_itemknn/exclude_clicked=true"]
    assert knn["hit@1"] == 0.5 and knn["hit@2"] == 1.0
    # a fixed variant skips the choice
    rows = reference_rows(root, "test", ns=[1, 2], coverage_ns=[2], exclude_clicked=(False,),
                          knn_variant="count")
    knn = rows["cooccurrence_itemknn/exclude_clicked=false"]
    assert knn["variant"] == "count" and knn["variant_selection"]["reason"] == "given"
    assert knn["hit@1"] == 1.0


def _rows(pairs):
    rows = {}
    for (a, b), c in pairs.items():
        rows.setdefault(a, {})[b] = c
        rows.setdefault(b, {})[a] = c
    return rows.items()


def test_earlier_clicks_exclusion_by_hand():
    train = {"user_id": np.array([b"u1", b"u1", b"u2"]), "item": np.array([1, 2, 4]),
             "timestamp": np.array([10, 20, 5])}
    test = {"user_id": np.array([b"u1", b"u1", b"u1", b"u2"]), "item": np.array([3, 4, 5, 1]),
            "timestamp": np.array([30, 30, 40, 50]),
            "hist_items": np.array([[1, 2, 0, 0], [1, 2, 3, 0], [1, 2, 3, 4], [4, 0, 0, 0]])}
    ex = earlier_clicks_exclusion(test, [train, test])
    assert [ex.items_of(i).tolist() for i in range(4)] == [[1, 2], [1, 2, 3], [1, 2, 3, 4], [4]]
    csr = ex.to_csr()
    assert csr.indptr.tolist() == [0, 2, 5, 9, 10]


# ----------------------------------------------------------------------------- artifacts round trip
def table_from_neighbours(v, neighbours):
    """CooccurrenceTable of ``{item: (neighbours, counts)}``."""
    return CooccurrenceTable.from_rows(v, [(i, n, c, [0] * len(n)) for i, (n, c) in
                                           neighbours.items()])


def write_artifacts(root, shards=None, v=6, neighbours=None):
    """examples/ (feature spec, TFRecord shards ``{name: [(user, hist, item, ts)]}``) and
    cooccurrence/cooccurrence.npz of ``neighbours`` (default: the NEIGHBOURS fixture)."""
    tf = pytest.importorskip("tensorflow")
    if shards is None:
        shards = {"train-00000-of-00002": [(b"a", [], 2, 1), (b"a", [2], 3, 2)],
                  "train-00001-of-00002": [(b"b", [], 2, 1), (b"b", [2], 1, 3)],
                  "test-00000-of-00001": [(b"a", [2, 3], 1, 9), (b"b", [2, 1], 0, 9),
                                          (b"c", [], 4, 9)]}
    num_examples = {}
    for name, rows in shards.items():
        split = name.split("-")[0]
        num_examples[split] = num_examples.get(split, 0) + len(rows)
    # The spec the preprocessing job writes (no profile or extra fields, one tag slot).
    spec = {"features": {"user_id": {"dtype": "string", "shape": [1]},
                         "hist_items": {"dtype": "int64", "shape": [4]},
                         "hist_len": {"dtype": "int64", "shape": [1]},
                         "item": {"dtype": "int64", "shape": [1]},
                         "item_tags": {"dtype": "int64", "shape": [1]},
                         "item_provider": {"dtype": "int64", "shape": [1]},
                         "timestamp": {"dtype": "int64", "shape": [1]}},
            "history_length": 4, "max_tags": 1, "user_fields": [], "item_extra_fields": [],
            "vocab_sizes": {"item_id": v}, "num_examples": num_examples}
    os.makedirs(os.path.join(root, "examples"))
    os.makedirs(os.path.join(root, "cooccurrence"))
    with open(os.path.join(root, "examples", "feature_spec.json"), "w") as fh:
        json.dump(spec, fh)
    table = table_from_neighbours(v, NEIGHBOURS if neighbours is None else neighbours)
    with open(os.path.join(root, "cooccurrence", "cooccurrence.npz"), "wb") as fh:
        fh.write(cooccurrence_npz_bytes(table))

    def example(user, h, item, ts):
        f = tf.train.Feature
        return tf.train.Example(features=tf.train.Features(feature={
            "user_id": f(bytes_list=tf.train.BytesList(value=[user])),
            "hist_items": f(int64_list=tf.train.Int64List(value=h + [0] * (4 - len(h)))),
            "hist_len": f(int64_list=tf.train.Int64List(value=[len(h)])),
            "item": f(int64_list=tf.train.Int64List(value=[item])),
            "item_tags": f(int64_list=tf.train.Int64List(value=[0])),
            "item_provider": f(int64_list=tf.train.Int64List(value=[0])),
            "timestamp": f(int64_list=tf.train.Int64List(value=[ts]))})).SerializeToString()

    opts = tf.io.TFRecordOptions(compression_type="GZIP")
    for name, rows in shards.items():
        with tf.io.TFRecordWriter(os.path.join(root, "examples", name + ".tfrecord.gz"),
                                  opts) as w:
            for r in rows:
                w.write(example(*r))


def test_load_split_arrays_and_reference_rows(tmp_path):
    from micrec_tf.evaluation.data import load_cooccurrence, load_split_arrays, train_item_counts
    from experiments.reference_rows import reference_rows

    root = str(tmp_path / "art")
    write_artifacts(root)
    test = load_split_arrays(root, "test")
    assert test["user_id"].tolist() == [b"a", b"b", b"c"]
    assert test["item"].tolist() == [1, 0, 4] and test["hist_len"].tolist() == [2, 2, 0]
    assert test["hist_items"].shape == (3, 4) and test["hist_items"][0].tolist() == [2, 3, 0, 0]
    counts = train_item_counts(root)
    assert counts.tolist() == [0, 1, 2, 1, 0, 0]
    table = load_cooccurrence(root)
    assert isinstance(table, CooccurrenceTable)
    assert table.row(5)[0].tolist() == [1, 3] and table.row(1)[1].tolist() == [3, 1]

    rows = reference_rows(root, "test", ns=[1, 2], coverage_ns=[2])
    # most popular ranks 2, 1, 3, 4, 5 (ties by index); excluding clicks: a -> 1, 4; b -> 3, 4
    mp = rows["most_popular/exclude_clicked=false"]
    assert mp["hit@1"] == 0.0 and mp["hit@2"] == pytest.approx(1 / 3)  # b's OOV is a miss
    mpx = rows["most_popular/exclude_clicked=true"]
    assert mpx["hit@1"] == pytest.approx(1 / 3) and mpx["hit@2"] == pytest.approx(1 / 3)
    assert mpx["coverage@2"] == pytest.approx(4 / 5)
    # item-kNN, a's history 2, 3: scores 3: 2, 2: 2, 4: 1 -> 2, 3 (popularity) -> miss of 1
    knn = rows["cooccurrence_itemknn/exclude_clicked=false"]
    assert knn["hit@2"] == 0.0 and knn["num_oov_clicks"] == 1
    assert "long_tail/hit@1" in knn
    # no valid split: nothing to choose on, the first variant (raw counts) is used
    assert knn["variant"] == "count"
    assert knn["variant_selection"] == {"split": None, "reason": "no valid split"}

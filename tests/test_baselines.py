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
    return NeighbourTable(neighbors=nb, weights=w)


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
    spec = {"features": {"user_id": {"dtype": "string", "shape": [1]},
                         "hist_items": {"dtype": "int64", "shape": [4]},
                         "hist_len": {"dtype": "int64", "shape": [1]},
                         "item": {"dtype": "int64", "shape": [1]},
                         "timestamp": {"dtype": "int64", "shape": [1]}},
            "history_length": 4, "vocab_sizes": {"item_id": v},
            "num_examples": num_examples}
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
            "timestamp": f(int64_list=tf.train.Int64List(value=[ts]))})).SerializeToString()

    opts = tf.io.TFRecordOptions(compression_type="GZIP")
    for name, rows in shards.items():
        with tf.io.TFRecordWriter(os.path.join(root, "examples", name + ".tfrecord.gz"),
                                  opts) as w:
            for r in rows:
                w.write(example(*r))


def test_load_split_arrays_and_reference_rows(tmp_path):
    from micrec_tf.evaluation.data import load_cooccurrence, load_split_arrays, train_item_counts
    from micrec_tf.evaluation.reference_rows import reference_rows

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

"""HIT@N / coverage / top-k against independent loop-and-full-sort implementations."""
import numpy as np
import pytest

from micrec_tf import search
from micrec_tf.evaluation import metrics as M


# ----------------------------------------------------------------------------- references
def ref_topk(scores, k, exclude=None, valid=None, secondary=None):
    """Loops and a full sort: order by (-score, -secondary, index), items 1..V-1 only."""
    u, v = scores.shape
    out = np.full((u, k), -1, dtype=np.int64)
    for i in range(u):
        banned = set() if exclude is None else {int(x) for x in exclude[i]}
        cands = []
        for j in range(1, v):
            if j in banned or (valid is not None and not valid[j]):
                continue
            sec = 0.0 if secondary is None else float(secondary[j])
            cands.append((-float(scores[i, j]), -sec, j))
        cands.sort()
        for p, (_, _, j) in enumerate(cands[:k]):
            out[i, p] = j
    return out


def ref_scores(users, items):
    u, v = users.shape[0], items.shape[0]
    s = np.zeros((u, v))
    for i in range(u):
        for j in range(v):
            s[i, j] = sum(float(a) * float(b) for a, b in zip(users[i], items[j]))
    return s


def ref_hit(topk, targets, n):
    hits = 0
    for row, t in zip(topk, targets):
        if t != 0 and t in list(row[:n]):
            hits += 1
    return hits / len(targets)


# ----------------------------------------------------------------------------- top-k
def test_topk_random_float_matches_full_sort():
    rng = np.random.default_rng(0)
    users = rng.normal(size=(37, 8))
    items = rng.normal(size=(60, 8))
    idx, sc = M.top_k_items(users, items, 10, batch_size=8)
    ref = ref_topk(ref_scores(users, items), 10)
    np.testing.assert_array_equal(idx, ref)
    assert np.all(np.diff(sc, axis=1) <= 0)
    assert not np.any(idx == 0)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_topk_integer_vectors_ties_exclusion_valid_mask(seed):
    rng = np.random.default_rng(seed)
    users = rng.integers(-1, 2, size=(41, 3)).astype(np.float32)
    items = rng.integers(-1, 2, size=(30, 3)).astype(np.float32)  # many equal scores
    items[0] = 5.0  # the padding row would win every query if it were not masked
    exclude = [rng.choice(np.arange(0, 30), size=rng.integers(0, 12), replace=False)
               for _ in range(41)]
    # Dense and sparse masks: a sparse one (fewer retrievable items than k) is the cold slice's
    # case, where the search cuts each block to the retrievable columns.
    for valid in (rng.random(30) > 0.15, rng.random(30) > 0.8, np.zeros(30, bool)):
        for k in (1, 5, 29, 40):  # 40 > catalogue: padded with -1
            idx, sc = M.top_k_items(users, items, k, exclude=exclude, valid_mask=valid,
                                    batch_size=6)
            ref = ref_topk(ref_scores(users, items), k, exclude, valid)
            np.testing.assert_array_equal(idx, ref)
            assert np.all(np.isneginf(sc[idx == -1]))
            for i in range(41):
                assert not set(idx[i][idx[i] > 0]) & set(exclude[i].tolist())


@pytest.mark.parametrize("seed", [6, 7])
def test_top_k_by_score_fn_valid_mask_secondary_exclusion(seed):
    """The narrowed path of top_k_by_score_fn: a sparse valid mask with a secondary key and
    exclusion sets (some on non-retrievable items), k below and above the retrievable count."""
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 3, size=(23, 40)).astype(np.float64)
    sec = rng.integers(0, 4, size=40)
    valid = rng.random(40) < 0.3
    exclude = [rng.choice(40, size=rng.integers(0, 6), replace=False) for _ in range(23)]
    for k in (1, 4, int(valid.sum()) + 3):
        idx, sc = M.top_k_by_score_fn(lambda a, b: scores[a:b], 23, k, exclude=exclude,
                                      valid_mask=valid, batch_size=5, secondary=sec)
        np.testing.assert_array_equal(idx, ref_topk(scores, k, exclude, valid, sec))
        got = np.where(idx >= 0, np.take_along_axis(scores, np.maximum(idx, 0), 1), -np.inf)
        np.testing.assert_array_equal(sc, got)


def test_tie_breaking_rule_by_hand():
    # scores for items 1..5: 1, 2, 2, 1, 2 -> order 2, 3, 5, 1, 4
    users = np.array([[1.0]])
    items = np.array([[9.0], [1.0], [2.0], [2.0], [1.0], [2.0]])
    idx, _ = M.top_k_items(users, items, 5)
    assert idx.tolist() == [[2, 3, 5, 1, 4]]
    idx, _ = M.top_k_items(users, items, 2)
    assert idx.tolist() == [[2, 3]]
    # a secondary key reorders equal scores, index breaks remaining ties
    sec = np.array([0, 7, 1, 3, 7, 3])
    idx, _ = M.top_k_from_scores(np.array([[0, 1, 2, 2, 1, 2]], float), 4, secondary=sec)
    assert idx.tolist() == [[3, 5, 2, 1]]


@pytest.mark.parametrize("seed", [4, 5])
def test_top_k_from_scores_secondary_matches_reference(seed):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 4, size=(25, 50)).astype(np.float64)
    scores[rng.random((25, 50)) < 0.2] = -np.inf
    sec = rng.integers(0, 5, size=50)
    for k in (1, 7, 45):
        idx, _ = M.top_k_from_scores(scores, k, secondary=sec)
        excl = [np.nonzero(np.isneginf(r))[0] for r in scores]
        np.testing.assert_array_equal(idx, ref_topk(scores, k, excl, secondary=sec))


def test_exclusion_formats_are_equivalent():
    scipy_sparse = pytest.importorskip("scipy.sparse")
    rng = np.random.default_rng(6)
    users = rng.integers(-2, 3, size=(9, 4)).astype(np.float64)
    items = rng.integers(-2, 3, size=(20, 4)).astype(np.float64)
    lists = [rng.choice(20, size=rng.integers(0, 6), replace=False) for _ in range(9)]
    csr = search.CSRExclusion.from_lists(lists)
    sp = scipy_sparse.csr_matrix((np.ones(csr.indices.size), csr.indices, csr.indptr),
                                 shape=(9, 20))
    base, _ = M.top_k_items(users, items, 8, exclude=lists, batch_size=4)
    for ex in (csr, (csr.indptr, csr.indices), sp):
        got, _ = M.top_k_items(users, items, 8, exclude=ex, batch_size=4)
        np.testing.assert_array_equal(got, base)
    with pytest.raises(ValueError):
        M.top_k_items(users, items, 8, exclude=lists[:5])


# ----------------------------------------------------------------------------- HIT@N / coverage
def test_hit_at_n_matches_reference_and_oov_is_a_miss():
    rng = np.random.default_rng(7)
    users = rng.integers(-1, 2, size=(200, 3)).astype(np.float32)
    items = rng.integers(-1, 2, size=(40, 3)).astype(np.float32)
    targets = rng.integers(0, 40, size=200)  # includes OOV (0) targets
    assert np.sum(targets == 0) > 0
    idx, _ = M.top_k_items(users, items, 20)
    got = M.hit_at_n(idx, targets, [1, 5, 20])
    for n in (1, 5, 20):
        assert got[n] == pytest.approx(ref_hit(idx, targets, n))
    # OOV clicks stay in the denominator: with a top-k covering everything, hit = 1 - oov share
    full, _ = M.top_k_items(users, items, 39)
    assert M.hit_at_n(full, targets, [39])[39] == pytest.approx(np.mean(targets != 0))
    with pytest.raises(ValueError):
        M.hit_at_n(idx, targets, [21])


def test_hit_at_n_by_hand():
    topk = np.array([[3, 1, 2], [2, 3, -1], [1, 2, 3], [0, -1, -1]])
    targets = np.array([1, 3, 4, 0])
    assert M.hit_at_n(topk, targets, [1, 2, 3]) == {1: 0.0, 2: 0.5, 3: 0.5}


def test_item_coverage_by_hand():
    # V = 6 -> catalogue items 1..5
    topk = np.array([[1, 2, 3], [1, 4, -1], [2, 1, 5]])
    assert M.item_coverage(topk, 6, [1, 2, 3]) == {1: pytest.approx(2 / 5),
                                                    2: pytest.approx(3 / 5),
                                                    3: pytest.approx(5 / 5)}


def test_long_tail_items_and_slice():
    counts = np.array([0, 50, 1, 7, 7, 2, 0, 9, 1, 30, 3])  # items 1..10
    tail = M.long_tail_items(counts, fraction=0.8)
    # head = 2 most clicked items: 1 (50) and 9 (30)
    assert tail.tolist() == [False, False, True, True, True, True, True, True, True, False, True]
    tail2 = M.long_tail_items(counts, fraction=0.5)
    # ranking: 1(50) 9(30) 7(9) 3(7) 4(7) 10(3) 5(2) 2(1) 8(1) 6(0) -> head 1, 9, 7, 3, 4
    assert np.nonzero(tail2)[0].tolist() == [2, 5, 6, 8, 10]
    topk = np.array([[1, 2], [9, 1], [5, 3], [1, 9]])
    targets = np.array([2, 1, 4, 0])
    mask = tail[targets]
    assert mask.tolist() == [True, False, True, False]
    assert M.hit_at_n_on_slice(topk, targets, [1, 2], mask) == {1: 0.0, 2: 0.5}
    res = M.summarize_topk(topk, targets, 11, [1, 2], [2], slices={"long_tail": mask})
    assert res["long_tail/num_clicks"] == 2 and res["long_tail/hit@2"] == 0.5
    assert res["hit@2"] == 0.5 and res["num_oov_clicks"] == 1
    assert res["coverage@2"] == pytest.approx(5 / 10)


def test_evaluate_retrieval_exact_keys_and_values():
    rng = np.random.default_rng(8)
    users = rng.normal(size=(50, 4))
    items = rng.normal(size=(30, 4))
    targets = rng.integers(0, 30, size=50)
    res = M.evaluate_retrieval(users, items, targets, ns=[5, 10], coverage_ns=[5],
                               return_topk=True)
    ref = ref_topk(ref_scores(users, items), 10)
    assert res["hit@5"] == pytest.approx(ref_hit(ref, targets, 5))
    assert res["hit@10"] == pytest.approx(ref_hit(ref, targets, 10))
    assert res["coverage@5"] == pytest.approx(len(set(ref[:, :5].ravel())) / 29)
    assert res["topk"].shape == (50, 10)


# ----------------------------------------------------------------------------- ScaNN
def clustered(rng, n, d, centers):
    c = rng.normal(size=(centers, d))
    return (c[rng.integers(0, centers, size=n)] + 0.3 * rng.normal(size=(n, d))).astype(np.float32)


def test_scann_recall_close_to_exact():
    pytest.importorskip("scann")
    rng = np.random.default_rng(9)
    items = clustered(rng, 4000, 32, 40)
    users = clustered(rng, 300, 32, 40)
    k = 50
    exact, _ = M.top_k_items(users, items, k)
    approx, sc = M.top_k_items_scann(users, items, k, batch_size=128)
    recall = np.mean([len(set(a) & set(b)) / k for a, b in zip(exact, approx)])
    assert recall >= 0.9, recall
    assert not np.any(approx == 0)
    assert np.all(np.diff(sc, axis=1) <= 0)
    # with exclusions: excluded items never come back, recall stays high
    excl = [exact[i, :10] for i in range(300)]
    exact_x, _ = M.top_k_items(users, items, k, exclude=excl)
    approx_x, _ = M.top_k_items_scann(users, items, k, exclude=excl, batch_size=128)
    for i in range(300):
        assert not set(approx_x[i]) & set(excl[i].tolist())
    recall_x = np.mean([len(set(a) & set(b)) / k for a, b in zip(exact_x, approx_x)])
    # ScaNN's tree training is not bit-reproducible between runs: 0.89-0.9x seen on fresh
    # clones, so the floor leaves room below the typical value (exclusions are checked above).
    assert recall_x >= 0.85, recall_x
    targets = exact[:, 3]
    res = M.evaluate_retrieval(users, items, targets, ns=[50], coverage_ns=[50], use_scann=True)
    assert res["hit@50"] >= 0.9


def test_scann_small_catalogue_is_exact():
    pytest.importorskip("scann")
    rng = np.random.default_rng(10)
    users = rng.normal(size=(20, 6)).astype(np.float32)
    items = rng.normal(size=(15, 6)).astype(np.float32)
    exact, _ = M.top_k_items(users, items, 20)  # 14 real items: padded with -1
    approx, _ = M.top_k_items_scann(users, items, 20)
    np.testing.assert_array_equal(approx, exact)

"""micrec_tf.search: the one exact top-K (tie rule: higher score, then lower index), exclusions,
candidate re-ranking, and the ScaNN builder, against pure-Python brute force."""
import numpy as np
import pytest

from micrec_tf import search


def reference(scores, k, secondary=None, skip=()):
    """Pure Python: sort every retrievable entry by (-score, -secondary, index), pad -1/-inf."""
    out_idx, out_sc = [], []
    for row in np.asarray(scores, np.float64):
        ent = [(-(s if s != np.inf else np.finfo(np.float64).max),
                -(secondary[j] if secondary is not None else 0), j)
               for j, s in enumerate(row) if s > -np.inf and j not in skip]
        ent.sort()
        ent = ent[:k]
        idx = [e[2] for e in ent] + [-1] * (k - len(ent))
        out_idx.append(idx)
        out_sc.append([row[j] if j >= 0 else -np.inf for j in idx])
    return np.array(out_idx, np.int64).reshape(len(out_idx), k), out_sc


@pytest.mark.parametrize("seed", range(6))
def test_top_k_matches_reference_with_ties_and_padding(seed):
    rs = np.random.RandomState(seed)
    b, v = rs.randint(1, 40), rs.randint(1, 60)
    # Few distinct values: ties straddle the cut; some -inf rows have fewer than k entries.
    scores = rs.randint(-3, 4, size=(b, v)).astype(np.float32)
    scores[rs.rand(b, v) < 0.3] = -np.inf
    for k in (1, 3, v, v + 5):
        idx, sc = search.top_k(scores, k)
        want, _ = reference(scores, k)
        np.testing.assert_array_equal(idx, want)
        np.testing.assert_array_equal(sc[idx < 0], -np.inf)
        rows = np.nonzero(idx >= 0)
        np.testing.assert_array_equal(sc[rows], scores[rows[0], idx[rows]])


def test_top_k_real_valued_fast_path():
    rs = np.random.RandomState(7)
    scores = rs.randn(50, 3000).astype(np.float32)
    scores[3, 10:20] = scores[3].max() + 1.0  # a ten-way tie at the top
    scores[4, :] = 0.5                        # every entry tied
    idx, _ = search.top_k(scores, 100)
    np.testing.assert_array_equal(idx, reference(scores, 100)[0])
    assert idx[3, :10].tolist() == list(range(10, 20))
    assert idx[4].tolist() == list(range(100))


def test_secondary_key_and_skip_columns():
    scores = np.array([[0, 1, 2, 2, 1, 2]], np.float64)
    sec = np.array([0, 5, 1, 3, 9, 3])
    idx, _ = search.top_k(scores, 4, secondary=sec, skip_columns=0)
    assert idx.tolist() == reference(scores, 4, sec, skip=(0,))[0].tolist() == [[3, 5, 2, 4]]


def test_inf_nan_and_bad_k():
    idx, _ = search.top_k(np.array([[1.0, np.inf, 3.0]]), 2)
    assert idx.tolist() == [[1, 2]]
    with pytest.raises(ValueError, match="NaN"):
        search.top_k(np.array([[1.0, np.nan]]), 1)
    with pytest.raises(ValueError, match="Received: k=0"):
        search.top_k(np.zeros((1, 3)), 0)
    with pytest.raises(ValueError, match="Received: shape"):
        search.top_k(np.zeros(3), 1)


@pytest.mark.parametrize("batch_size", [1, 7, 1024])
def test_top_k_dot_with_exclusions_matches_reference(batch_size):
    rs = np.random.RandomState(3)
    q = rs.randint(-2, 3, size=(30, 4)).astype(np.float32)
    items = rs.randint(-2, 3, size=(25, 4)).astype(np.float32)
    excl = [rs.choice(25, rs.randint(0, 6), replace=False) for _ in range(30)]
    idx, sc = search.top_k_dot(q, items, 8, exclude=excl, batch_size=batch_size)
    s = (q.astype(np.float64) @ items.T.astype(np.float64))
    for i, e in enumerate(excl):
        s[i, e] = -np.inf
    np.testing.assert_array_equal(idx, reference(s, 8)[0])
    np.testing.assert_allclose(sc, np.take_along_axis(s, np.maximum(idx, 0), 1))
    for i, e in enumerate(excl):
        assert not set(idx[i]) & set(e.tolist())


def test_exclusion_formats_agree():
    lists = [[1, 2], [], [0]]
    csr = search.CSRExclusion.from_lists(lists)
    for form in (lists, (csr.indptr, csr.indices), csr):
        rows, cols = search.as_exclusion(form, 3).rows_cols(0, 3)
        assert rows.tolist() == [0, 0, 2] and cols.tolist() == [1, 2, 0]
    with pytest.raises(ValueError, match="cover 3 queries, expected 2"):
        search.as_exclusion(lists, 2)


def test_rescore_candidates():
    q = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    items = np.array([[1, 0], [2, 0], [0, 2], [1, 1]], np.float32)
    cand = np.array([[0, 1, 3, 1, -1], [2, 3, 0, -1, -1]])
    idx, sc = search.rescore_candidates(q, items, cand, 4, excluded_rows=[1], excluded_cols=[2])
    # row 0: scores 0->1, 1->2, 3->1 (1 repeated): 1, then 0 and 3 tied -> lower index first
    assert idx.tolist() == [[1, 0, 3, -1], [3, 0, -1, -1]]
    assert sc.tolist() == [[2, 1, 1, -np.inf], [1, 0, -np.inf, -np.inf]]


def test_scann_brute_force_searcher_orders_by_tie_rule():
    pytest.importorskip("scann")
    rs = np.random.RandomState(0)
    items = rs.randint(-1, 2, size=(40, 3)).astype(np.float32)  # many tied scores
    q = rs.randint(-1, 2, size=(9, 3)).astype(np.float32)
    params = {"mode": "brute_force", "num_neighbors": 10}
    searcher = search.build_scann(items, params)
    rows, sc = search.search_scann(searcher, params, q, 10, 40)
    want_sc = np.sort(q @ items.T, axis=1)[:, ::-1][:, :10]
    np.testing.assert_allclose(sc, want_sc, atol=1e-6)
    for r, s in zip(rows, sc):  # within equal scores, rows ascend
        for a in range(9):
            if s[a] == s[a + 1]:
                assert r[a] < r[a + 1]


def test_rescore_candidates_in_blocks_matches_a_per_row_reference(monkeypatch):
    """A block of a few queries at a time (as at 1 M rows) gives every row's exact scores and
    the tie-rule order a per-row Python reference gives."""
    from micrec_tf import search as S

    rng = np.random.default_rng(5)
    vectors = rng.normal(size=(60, 8)).astype(np.float32)
    queries = rng.normal(size=(23, 8)).astype(np.float32)
    cand = rng.integers(-1, 60, size=(23, 9))
    monkeypatch.setattr(S, "RESCORE_BLOCK_ENTRIES", 9 * 8 * 4)  # 4 queries per block
    idx, scores = S.rescore_candidates(queries, vectors, cand, 5)
    for r in range(23):
        rows = sorted({int(c) for c in cand[r] if c >= 0})
        exact = {c: float(np.dot(queries[r].astype(np.float64), vectors[c])) for c in rows}
        want = sorted(rows, key=lambda c: (-exact[c], c))[:5]
        got = [int(c) for c in idx[r] if c >= 0]
        assert got == want
        np.testing.assert_allclose(scores[r][:len(got)], [exact[c] for c in got], rtol=1e-5)


def test_wide_rows_prefilter_is_exact(monkeypatch):
    """The strided-sample cut of wide rows (made "wide" at 2,000 columns here) keeps every
    entry of the top k, ties at the k-th place included, and falls back where a row's sample
    holds fewer than k retrievable entries."""
    monkeypatch.setattr(search, "PREFILTER_MIN_COLUMNS", 64)
    rs = np.random.RandomState(3)
    b, v, k = 12, 2000, 5
    scores = np.round(rs.randn(b, v), 1).astype(np.float32)  # many ties at every value
    scores[0, 100:140] = 9.0                                   # a 40-way tie at the top
    scores[1, rs.rand(v) < 0.5] = -np.inf                      # exclusions
    cut = search._prefilter_candidates(search._working_copy(scores), k)
    assert cut is not None and cut[0].shape[1] * 4 <= v        # the cut was taken and narrows
    want, _ = reference(scores, k)
    for row in range(b):
        assert set(want[row]) <= set(cut[0][row][cut[0][row] >= 0])
    np.testing.assert_array_equal(search.top_k(scores, k)[0], want)
    assert search.top_k(scores, k)[0][0].tolist() == [100, 101, 102, 103, 104]
    sparse = scores.copy()
    sparse[2, 1:] = -np.inf  # one retrievable entry: no cut, padded by the general path
    assert search._prefilter_candidates(search._working_copy(sparse), k) is None
    np.testing.assert_array_equal(search.top_k(sparse, k)[0], reference(sparse, k)[0])


def test_top_k_dot_caps_the_score_block(monkeypatch):
    seen = []
    real = search._top_k_blocks

    def spy(score_fn, num_rows, k, exclude, batch_size, *args):
        seen.append(batch_size)
        return real(score_fn, num_rows, k, exclude, batch_size, *args)

    monkeypatch.setattr(search, "_top_k_blocks", spy)
    monkeypatch.setattr(search, "SCORE_BLOCK_ENTRIES", 300)
    rs = np.random.RandomState(0)
    q, items = rs.randn(25, 4), rs.randn(100, 4)
    idx, _ = search.top_k_dot(q, items, 7, batch_size=1024)
    assert seen == [3]  # 300 entries // 100 items
    np.testing.assert_array_equal(idx, reference(q @ items.T, 7)[0])

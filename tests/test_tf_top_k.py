"""eval.exact_engine: tensorflow (micrec_tf/evaluation/tf_top_k.py, issue 31 item 3) against a
brute-force reference: Python loops over every (query, item) pair and a full sort under the tie
rule (higher score first, then lower item index), with exclusions, valid masks, skipped columns
and padding applied by hand."""
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from micrec_tf.config import ConfigError, from_dict
from micrec_tf.evaluation import metrics
from micrec_tf.evaluation.tf_top_k import _block_top_k, top_k_dot_tf
from micrec_tf.search import CSRExclusion


def ref_scores(users, items):
    """float64 [U, V] dot products by Python loops."""
    return np.array([[sum(float(a) * float(b) for a, b in zip(u, it)) for it in items]
                     for u in users])


def ref_topk(scores, k, exclude=None, valid=None, skip=(0,)):
    """Loops and a full sort by (-score, index); excluded / invalid / skipped items left out;
    rows padded with -1."""
    u, v = scores.shape
    out = np.full((u, k), -1, dtype=np.int64)
    for i in range(u):
        banned = set(skip) | (set() if exclude is None else {int(x) for x in exclude[i]})
        cands = sorted((-float(scores[i, j]), j) for j in range(v)
                       if j not in banned and (valid is None or valid[j]))
        for p, (_, j) in enumerate(cands[:k]):
            out[i, p] = j
    return out


def check_scores(idx, sc, scores):
    """Returned scores are the reference scores of the returned items; -inf on padding."""
    rows = np.nonzero(idx >= 0)
    np.testing.assert_allclose(sc[rows], scores[rows[0], idx[rows]], rtol=1e-5, atol=1e-5)
    assert np.all(sc[idx < 0] == -np.inf)


def test_tf_top_k_ties_keep_the_lower_index_first():
    """tf.math.top_k's documented tie rule, on narrow and wide rows full of equal values."""
    rng = np.random.default_rng(0)
    for width in (7, 300, 1 << 17):
        x = rng.integers(0, 3, size=(3, width)).astype(np.float32)
        x[:, ::5] = -np.inf
        for k in (1, 5, min(500, width)):
            vals, idx = tf.math.top_k(x, k)
            for r in range(3):
                ref = sorted(range(width), key=lambda j: (-x[r, j], j))[:k]
                np.testing.assert_array_equal(idx.numpy()[r], ref)


def test_random_float_vectors_match_the_full_sort():
    rng = np.random.default_rng(1)
    users = rng.normal(size=(37, 8)).astype(np.float32)
    items = rng.normal(size=(60, 8)).astype(np.float32)
    scores = ref_scores(users, items)
    idx, sc = top_k_dot_tf(users, items, 10, batch_size=8)  # 8 does not divide 37
    np.testing.assert_array_equal(idx, ref_topk(scores, 10))
    assert idx.dtype == np.int64 and sc.dtype == np.float32
    check_scores(idx, sc, scores)


@pytest.mark.parametrize("seed", [2, 3])
def test_integer_vectors_ties_exclusions_masks_and_padding(seed):
    rng = np.random.default_rng(seed)
    u, v = 41, 30
    users = rng.integers(-1, 2, size=(u, 3)).astype(np.float32)
    items = rng.integers(-1, 2, size=(v, 3)).astype(np.float32)  # many exactly equal scores
    items[0] = 5.0  # the padding row would win every query if it were retrieved
    # Excluded ids out of range (negative, >= V) are ignored; some fall on masked columns.
    exclude = [np.concatenate([rng.choice(v, size=rng.integers(0, 12), replace=False),
                               [-3, v, v + 7][:rng.integers(0, 4)]]) for _ in range(u)]
    scores = ref_scores(users, items)
    for valid in (None, rng.random(v) > 0.15, rng.random(v) > 0.8, np.zeros(v, bool)):
        for k in (1, 5, 29, 40):  # 40 > V: padded with -1 / -inf
            for batch in (7, 1024):
                idx, sc = top_k_dot_tf(users, items, k, exclude=exclude, valid_mask=valid,
                                       batch_size=batch)
                ref = ref_topk(scores, k, exclude, valid)
                np.testing.assert_array_equal(idx, ref)
                check_scores(idx, sc, scores)


def test_every_exclusion_format_gives_the_same_lists():
    rng = np.random.default_rng(4)
    users = rng.integers(-2, 3, size=(13, 4)).astype(np.float32)
    items = rng.integers(-2, 3, size=(25, 4)).astype(np.float32)
    lists = [rng.choice(25, size=rng.integers(0, 6), replace=False) for _ in range(13)]
    csr = CSRExclusion.from_lists(lists)

    class Lazy:  # the rows_cols protocol, produced per block
        def rows_cols(self, start, stop):
            return csr.rows_cols(start, stop)

    ref = ref_topk(ref_scores(users, items), 8, lists)
    for excl in (lists, csr, (csr.indptr, csr.indices), Lazy()):
        idx, _ = top_k_dot_tf(users, items, 8, exclude=excl, batch_size=5)
        np.testing.assert_array_equal(idx, ref)


def test_skip_columns_none_retrieves_item_zero_and_a_list_skips_several():
    users = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    items = np.array([[9, 9], [1, 0], [2, 2], [0, 3], [1, 1]], np.float32)
    scores = ref_scores(users, items)
    idx, _ = top_k_dot_tf(users, items, 3, skip_columns=None)
    np.testing.assert_array_equal(idx, ref_topk(scores, 3, skip=()))
    idx, _ = top_k_dot_tf(users, items, 3, skip_columns=[0, 2])
    np.testing.assert_array_equal(idx, ref_topk(scores, 3, skip=(0, 2)))


@pytest.mark.parametrize("dtype, expected", [(np.float16, np.float32), (np.float32, np.float32),
                                             (np.float64, np.float64)])
def test_score_dtype_follows_the_inputs(dtype, expected):
    rng = np.random.default_rng(5)
    users = rng.integers(-3, 4, size=(9, 5)).astype(dtype)
    items = rng.integers(-3, 4, size=(20, 5)).astype(np.float32)
    idx, sc = top_k_dot_tf(users, items, 6, batch_size=4)
    assert sc.dtype == expected
    scores = ref_scores(users, items)
    np.testing.assert_array_equal(idx, ref_topk(scores, 6))
    np.testing.assert_array_equal(sc, np.take_along_axis(scores, idx, axis=1))  # exact integers


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_scores_beyond_float32_follow_the_numpy_engine():
    """Overflowing dot products (+inf) rank as the largest finite value in the numpy engine;
    such inputs are handed to it, so both engines agree."""
    users = np.array([[1e30, 0.0], [0.0, 1.0]], np.float32)
    items = np.array([[0, 0], [1e30, 0.0], [2e30, 5.0], [-1e30, 9.0], [3.0, 1.0]], np.float32)
    got = top_k_dot_tf(users, items, 3)
    want = metrics.top_k_items(users, items, 3)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(got[0][0], [1, 2, 4])  # two +inf scores: lower index first


def test_block_function_is_not_retraced_for_new_block_and_exclusion_sizes():
    rng = np.random.default_rng(6)
    items = rng.normal(size=(50, 4)).astype(np.float32)
    for u in (3, 9):  # reduce_retracing: the second shape generalises the signature
        top_k_dot_tf(rng.normal(size=(u, 4)).astype(np.float32), items, 5,
                     exclude=[[1] * (i % 3) for i in range(u)], batch_size=4)
    traced = _block_top_k.experimental_get_tracing_count()
    for u in (5, 17, 33):
        top_k_dot_tf(rng.normal(size=(u, 4)).astype(np.float32), items, 5 + u,
                     exclude=[list(range(i % 7)) for i in range(u)], batch_size=6)
    assert _block_top_k.experimental_get_tracing_count() == traced


def test_arguments_are_checked():
    q = np.zeros((2, 3), np.float32)
    with pytest.raises(ValueError, match="Received"):
        top_k_dot_tf(q, np.zeros((4, 2), np.float32), 1)
    with pytest.raises(ValueError, match="k must be"):
        top_k_dot_tf(q, np.zeros((4, 3), np.float32), 0)
    with pytest.raises(ValueError, match="valid_mask"):
        top_k_dot_tf(q, np.zeros((4, 3), np.float32), 1, valid_mask=np.ones(3, bool))
    with pytest.raises(ValueError, match="engine"):
        metrics.top_k_items(q, np.zeros((4, 3), np.float32), 1, engine="jax")


def test_evaluate_retrieval_tensorflow_equals_numpy():
    rng = np.random.default_rng(7)
    u, v = 300, 400
    users = rng.integers(-2, 3, size=(u, 6)).astype(np.float32)  # integers: no rounding
    items = rng.integers(-2, 3, size=(v, 6)).astype(np.float32)
    targets = rng.integers(0, v, size=u)
    exclude = [rng.choice(v, size=rng.integers(0, 20), replace=False) for _ in range(u)]
    slices = {"half": rng.random(u) > 0.5}
    kw = dict(ns=[5, 50, 100], coverage_ns=[5, 100], exclude=exclude, batch_size=64,
              slices=slices, return_topk=True)
    a = metrics.evaluate_retrieval(users, items, targets, **kw)
    b = metrics.evaluate_retrieval(users, items, targets, exact_engine="tensorflow", **kw)
    np.testing.assert_array_equal(b.pop("topk"), a.pop("topk"))
    assert a == b
    # And both against the reference lists.
    ref = ref_topk(ref_scores(users, items), 100, exclude)
    hits = np.mean([t != 0 and t in ref[i, :50] for i, t in enumerate(targets)])
    assert b["hit@50"] == pytest.approx(hits, abs=1e-12)


def test_config_key_defaults_to_numpy_and_refuses_other_engines():
    assert from_dict({}).eval.exact_engine == "numpy"
    assert from_dict({"eval": {"exact_engine": "tensorflow"}}).eval.exact_engine == "tensorflow"
    with pytest.raises(ConfigError, match="eval.exact_engine.*'torch'"):
        from_dict({"eval": {"exact_engine": "torch"}})


def test_metrics_module_does_not_import_tensorflow():
    code = ("import sys, micrec_tf.evaluation.metrics; "
            "assert 'tensorflow' not in sys.modules, 'tensorflow imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_exact_eval_benchmark_inputs_and_report(tmp_path):
    """benchmarks/exact_eval.py on a tiny catalogue: its exclusion lists hold --history ids of
    1..V-1 per query, the ratio is the quotient of the reported medians, and both engines'
    lists (compared row by row here) give the reported identical-row share."""
    import json

    from benchmarks import exact_eval

    users, vectors, (indptr, indices) = exact_eval.make_inputs(50, 7, 4, 3, seed=1)
    assert users.shape == (7, 4) and vectors.shape == (50, 4) and users.dtype == np.float32
    np.testing.assert_array_equal(indptr, [0, 3, 6, 9, 12, 15, 18, 21])
    assert indices.min() >= 1 and indices.max() <= 49
    a = np.array([[1, 2], [3, 4], [5, 6]])
    assert exact_eval.identical_rows(a, np.array([[1, 2], [4, 3], [5, 6]])) == pytest.approx(2 / 3)
    out = tmp_path / "r.json"
    assert exact_eval.main(["--items", "300", "--queries", "20", "--dim", "4", "--k", "10",
                            "--history", "3", "--rounds", "1", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    med = r["median_s"]
    assert r["ratio"] == pytest.approx(med["numpy"] / med["tensorflow"], rel=1e-3)
    u, v, excl = exact_eval.make_inputs(300, 20, 4, 3, seed=0)
    ref = ref_topk(ref_scores(u, v), 10, [excl[1][excl[0][i]:excl[0][i + 1]] for i in range(20)])
    got = metrics.top_k_items(u, v, 10, exclude=excl, engine="tensorflow")[0]
    assert r["identical_row_share"] == pytest.approx(
        exact_eval.identical_rows(metrics.top_k_items(u, v, 10, exclude=excl)[0], got))
    assert exact_eval.identical_rows(got, ref) == 1.0
    assert r["machine"]["cpu_flags"] is not None
    with pytest.raises(SystemExit):
        exact_eval.parse_args(["--queries", "0"])

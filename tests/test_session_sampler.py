"""Session CL's membership test (issue 31, item 2): the packed pair bitmap against pure-Python
sets and hand-computed words, the same draws as the sorted-key search of before, the sampler's
distributions against pure-Python references, and the ratio benchmark's argument errors."""
import math

import numpy as np
import pytest
import tensorflow as tf

from benchmarks import session_cl_ratio
from micrec_tf.cl import SessionCL
from micrec_tf.config import ConfigError, from_dict


def _random_table(v, density, seed):
    """{item: {neighbour: count}} symmetric, built with dicts; item 1 co-occurs with almost all;
    items v - 3 .. v - 1 have no co-occurrence."""
    rs = np.random.RandomState(seed)
    table = {i: {} for i in range(1, v)}
    for a in range(1, v - 3):
        for b in range(a + 1, v - 3):
            if (b % 5 != 0) if a == 1 else rs.rand() < density:
                table[a][b] = table[b][a] = int(rs.randint(1, 9))
    return table


def _csr(table, v, rs=None):
    """CSR arrays; same_category drawn at random (seeded) when ``rs`` is given."""
    indptr, nb, cnt = [0, 0], [], []
    for i in range(1, v):
        for j, c in sorted(table[i].items(), key=lambda e: (-e[1], e[0])):
            nb.append(j)
            cnt.append(c)
        indptr.append(len(nb))
    same = (rs.randint(0, 2, len(nb)).astype(np.int8) if rs is not None
            else np.zeros(len(nb), np.int8))
    return np.array(indptr), np.array(nb, np.int64), np.array(cnt, np.float64), same


V = 70  # W = 3 words per row: bits cross word boundaries


def _task(membership, table=None, seed=4, **kwargs):
    table = table if table is not None else _random_table(V, 0.4, 3)
    indptr, nb, cnt, same = _csr(table, V, np.random.RandomState(1))
    return SessionCL(indptr, nb, cnt, 8, same_category=same, seed=seed, membership=membership,
                     **kwargs)


def test_pair_bitmap_words_hand_computed():
    # V = 40, W = 2: item 1 co-occurs with 2 (word 2, bit 2) and 33 (word 3, bit 1);
    # item 2 with 1 (word 4, bit 1) and 31 (word 4, bit 31); item 33 with 1 (word 66, bit 1).
    indptr = np.zeros(41, np.int64)
    indptr[2:] = 2
    indptr[3:] = 4
    indptr[34:] = 5
    nb = np.array([2, 33, 1, 31, 1])
    task = SessionCL(indptr, nb, np.ones(5), 4, membership="bitmap")
    words = task.pair_bitmap().view(np.uint32)
    expected = np.zeros(80, np.uint32)
    expected[2], expected[3], expected[4], expected[66] = 4, 2, 2 + 2 ** 31, 2
    np.testing.assert_array_equal(words, expected)
    # (an asymmetric table is allowed: 31 does not list 2 back)
    got = task.co_occurred(tf.constant([1, 2, 31, 0]), tf.constant([1, 2, 31, 33])).numpy()
    np.testing.assert_array_equal(got, [[False, True, False, True], [True, False, True, False],
                                        [False, False, False, False], [False] * 4])


@pytest.mark.parametrize("membership", ["bitmap", "sorted"])
def test_co_occurred_matches_python_sets(membership):
    table = _random_table(V, 0.4, 3)
    task = _task(membership, table)
    assert task.membership_path == membership
    anchors = np.arange(V)
    items = np.arange(1, V)
    got = task.co_occurred(tf.constant(anchors), tf.constant(items)).numpy()
    want = np.array([[j in table.get(i, {}) for j in items] for i in anchors])
    np.testing.assert_array_equal(got, want)
    per_row = np.random.RandomState(2).randint(1, V, size=(V, 9))  # [U, K] items too
    got = task.co_occurred(tf.constant(anchors), tf.constant(per_row)).numpy()
    want = np.array([[j in table.get(i, {}) for j in row] for i, row in zip(anchors, per_row)])
    np.testing.assert_array_equal(got, want)


def test_bitmap_draws_exactly_what_the_sorted_search_drew():
    """Same seed, same anchors: positives, pools and masks identical over several steps."""
    a, b = _task("bitmap", seed=11), _task("sorted", seed=11)
    ids = tf.constant(np.r_[np.arange(V), [1, 1, 2, V - 1, 0]])
    for _ in range(6):
        for x, y in zip(a.sample(ids), b.sample(ids)):
            np.testing.assert_array_equal(x.numpy(), y.numpy())


def test_auto_chooses_bitmap_up_to_the_limit():
    # V = 70: W = 3 words per row, 70 * 3 * 4 = 840 bytes.
    assert _task("auto").membership_path == "bitmap"
    assert _task("auto", bitmap_max_bytes=840).membership_path == "bitmap"
    slow = _task("auto", bitmap_max_bytes=839)
    assert slow.membership_path == "sorted" and not hasattr(slow, "pair_bits")
    assert not hasattr(_task("bitmap"), "pair_keys")


def _chi2_crit(k):
    """Chi-square critical value at p = 0.001 for k degrees of freedom (Wilson-Hilferty)."""
    return k * (1 - 2 / (9 * k) + 3.09 * math.sqrt(2 / (9 * k))) ** 3


def test_bitmap_sampler_distributions_match_a_pure_python_reference():
    """400 steps (fixed seeds, bitmap path), each anchor 10 times per step: 4,000 positives per
    anchor, the negatives of one row per anchor and step (rows of a step share the pool); the
    references are computed from the dict table in pure Python:

    * positives: P(j | i) = count(i, j) * (2.0 if same category else 1) / row sum, chi-square
      at p = 0.001;
    * negatives: each kept negative uniform over {1..V-1} minus the anchor and its list
      (chi-square), never outside it, and the number kept per step has the mean of
      min(num_negatives, Binomial(pool, q)), q = the allowed share of 1..V-1 (within 4 standard
      errors).
    """
    table = _random_table(V, 0.4, 3)
    rs = np.random.RandomState(1)
    indptr, nb, cnt, same = _csr(table, V, rs)
    same_of = {}
    for i in range(1, V):
        for e in range(indptr[i], indptr[i + 1]):
            same_of[(i, int(nb[e]))] = int(same[e])
    num_neg, factor = 6, 4
    task = SessionCL(indptr, nb, cnt, 8, same_category=same, same_category_weight=2.0,
                     num_negatives=num_neg, negative_pool_factor=factor, seed=21,
                     membership="bitmap")
    anchors = [1, 2, 9]  # the head item (co-occurs with most) and two ordinary ones
    steps, reps = 400, 10
    n = steps * reps
    ids = tf.constant(np.repeat(anchors, reps))
    pos_draws = {a: [] for a in anchors}
    neg_draws = {a: [] for a in anchors}
    kept_counts = {a: [] for a in anchors}
    for _ in range(steps):
        pos, has, pool, mask = (t.numpy() for t in task.sample(ids))
        assert has.all()
        for r, a in enumerate(anchors):
            pos_draws[a] += pos[r * reps:(r + 1) * reps].tolist()
            kept = pool[mask[r * reps]].tolist()
            neg_draws[a] += kept
            kept_counts[a].append(len(kept))
    for a in anchors:
        items = sorted(table[a])
        w = [table[a][j] * (2.0 if same_of[(a, j)] else 1.0) for j in items]
        probs = np.array(w) / sum(w)
        observed = np.array([pos_draws[a].count(j) for j in items])
        assert observed.sum() == n
        expected = n * probs
        assert float(((observed - expected) ** 2 / expected).sum()) < _chi2_crit(len(items) - 1)

        allowed = [j for j in range(1, V) if j != a and j not in table[a]]
        assert set(neg_draws[a]) <= set(allowed)
        counts = np.array([neg_draws[a].count(j) for j in allowed])
        expected = np.full(len(allowed), counts.sum() / len(allowed))
        assert float(((counts - expected) ** 2 / expected).sum()) < _chi2_crit(len(allowed) - 1)

        q, pool_size = len(allowed) / (V - 1), num_neg * factor
        pmf = [math.comb(pool_size, k) * q ** k * (1 - q) ** (pool_size - k)
               for k in range(pool_size + 1)]
        mean = sum(min(num_neg, k) * p for k, p in enumerate(pmf))
        var = sum((min(num_neg, k) - mean) ** 2 * p for k, p in enumerate(pmf))
        assert abs(np.mean(kept_counts[a]) - mean) < 4 * math.sqrt(var / steps) + 1e-9
    assert len(table[1]) > 0.75 * (V - 5)  # the head item really is one


def test_membership_arguments_and_config():
    with pytest.raises(ValueError, match="membership must be one of .* Received: "
                                         "membership='hash'"):
        _task("hash")
    with pytest.raises(ValueError, match="bitmap_max_bytes must be an int >= 0. Received: "
                                         "bitmap_max_bytes=-1"):
        _task("auto", bitmap_max_bytes=-1)
    task = _task("sorted", bitmap_max_bytes=5)
    clone = SessionCL.from_config(task.get_config())
    assert (clone.membership, clone.bitmap_max_bytes, clone.membership_path) == \
        ("sorted", 5, "sorted")
    assert from_dict({}).loss.session_membership == "auto"
    with pytest.raises(ConfigError, match="loss.session_membership"):
        from_dict({}).replace({"loss.session_membership": "hash"})


@pytest.mark.parametrize("argv, message", [
    (["--rounds", "0"], "--rounds must be >= 1. Received: 0"),
    (["--sampler-repeats", "-2"], "--sampler-repeats must be >= 1. Received: -2"),
    (["--paths", "sorted,hash"], "--paths must be distinct names of sorted, bitmap"),
    (["--paths", "bitmap,bitmap"], "--paths must be distinct names"),
    (["--artifacts", "/nonexistent/artifacts"], "--artifacts has no stats.json"),
    (["--steps", "two"], "argument --steps: invalid int value"),
])
def test_ratio_benchmark_argument_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as err:
        session_cl_ratio.parse_args(argv)
    assert err.value.code == 2
    assert message in capsys.readouterr().err


def test_ratio_benchmark_config_must_be_a_file(tmp_path, capsys):
    art = tmp_path / "art"
    (art / "cooccurrence").mkdir(parents=True)
    (art / "stats.json").write_text("{}")
    (art / "cooccurrence" / "cooccurrence.npz").write_bytes(b"")
    with pytest.raises(SystemExit):
        session_cl_ratio.parse_args(["--artifacts", str(art), "--config", str(tmp_path)])
    assert "--config is not a file" in capsys.readouterr().err
    args = session_cl_ratio.parse_args(["--artifacts", str(art), "--paths", " bitmap "])
    assert args.paths == ["bitmap"] and args.artifacts == str(art)

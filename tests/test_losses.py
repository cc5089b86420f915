"""Losses against hand-written numpy references (micrec_tf.losses)."""
import micrec_tf  # noqa: F401

import numpy as np
import pytest
import tensorflow as tf

from micrec_tf.losses import (SampledSoftmaxTask, StreamingFrequencyEstimator,
                              in_batch_info_nce_loss, info_nce_loss, sampled_softmax_loss)

RS = np.random.RandomState(3)
Q = RS.normal(size=(3, 4)).astype(np.float32)
P = RS.normal(size=(3, 4)).astype(np.float32)
NEG = RS.normal(size=(5, 4)).astype(np.float32)
POS_IDS = np.array([7, 2, 9])
NEG_IDS = np.array([2, 11, 7, 2, 13])  # rows 0 and 1 have accidental hits


def _nll(logits, label):
    logits = np.asarray(logits, np.float64)
    m = logits.max()
    return -(logits[label] - m - np.log(np.exp(logits - m).sum()))


def test_sampled_softmax_removes_accidental_hits():
    expected = []
    for i in range(3):
        logits = [Q[i] @ P[i]] + [Q[i] @ NEG[j] for j in range(5) if NEG_IDS[j] != POS_IDS[i]]
        expected.append(_nll(logits, 0))
    got = sampled_softmax_loss(Q, P, POS_IDS, NEG, NEG_IDS, remove_accidental_hits=True)
    np.testing.assert_allclose(got.numpy(), np.mean(expected), rtol=1e-5)
    assert got.dtype == tf.float32


def test_sampled_softmax_without_hit_removal_keeps_every_negative():
    expected = np.mean([_nll([Q[i] @ P[i]] + [Q[i] @ n for n in NEG], 0) for i in range(3)])
    got = sampled_softmax_loss(Q, P, POS_IDS, NEG, NEG_IDS, remove_accidental_hits=False)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5)


def test_sampled_softmax_is_a_per_example_mean():
    one = sampled_softmax_loss(Q, P, POS_IDS, NEG, NEG_IDS)
    twice = sampled_softmax_loss(np.concatenate([Q, Q]), np.concatenate([P, P]),
                                 np.concatenate([POS_IDS, POS_IDS]), NEG, NEG_IDS)
    np.testing.assert_allclose(one.numpy(), twice.numpy(), rtol=1e-6)


def test_in_batch_negatives_with_log_q_correction():
    q = RS.normal(size=(4, 3)).astype(np.float32)
    p = RS.normal(size=(4, 3)).astype(np.float32)
    ids = np.array([5, 6, 5, 8])  # rows 0 and 2 share an item: accidental in-batch hits
    log_q = np.log(np.array([0.5, 0.1, 0.5, 0.2], np.float32))
    neg = RS.normal(size=(2, 3)).astype(np.float32)
    neg_ids = np.array([6, 3])
    neg_log_q = np.log(2 / 20)
    expected = []
    for i in range(4):
        logits, label = [], None
        for j in range(4):
            if j != i and ids[j] == ids[i]:
                continue
            if j == i:
                label = len(logits)
            logits.append(q[i] @ p[j] - log_q[j])
        logits += [q[i] @ neg[k] - neg_log_q for k in range(2) if neg_ids[k] != ids[i]]
        expected.append(_nll(logits, label))
    got = sampled_softmax_loss(q, p, ids, neg, neg_ids, in_batch_negatives=True,
                               positive_log_q=log_q, negative_log_q=neg_log_q)
    np.testing.assert_allclose(got.numpy(), np.mean(expected), rtol=1e-5)


def test_sampled_softmax_float16_inputs_give_float32_loss():
    got = sampled_softmax_loss(Q.astype(np.float16), P.astype(np.float16), POS_IDS,
                               NEG.astype(np.float16), NEG_IDS)
    assert got.dtype == tf.float32
    ref = sampled_softmax_loss(Q, P, POS_IDS, NEG, NEG_IDS)
    np.testing.assert_allclose(got.numpy(), ref.numpy(), rtol=1e-2)


def test_sampled_softmax_argument_errors():
    with pytest.raises(ValueError, match="needs negatives or in_batch"):
        sampled_softmax_loss(Q, P, POS_IDS)
    with pytest.raises(ValueError, match=r"query and positives must be \[B, d\]"):
        sampled_softmax_loss(Q[0], P, POS_IDS, NEG, NEG_IDS)
    with pytest.raises(ValueError, match="dim 4 != positives dim 3"):
        sampled_softmax_loss(Q, P[:, :3], POS_IDS, NEG, NEG_IDS)


def test_info_nce_with_masks():
    a = np.array([[1.0, 0.5], [-0.3, 2.0], [0.2, 0.2]], np.float32)
    p = np.array([[0.8, 0.1], [0.0, 1.0], [1.0, -1.0]], np.float32)
    n = np.array([[1.0, 1.0], [-1.0, 0.5], [0.3, -0.7]], np.float32)
    neg_mask = np.array([[1, 0, 1], [1, 1, 1], [0, 0, 0]], bool)
    ex_mask = np.array([1, 1, 0], bool)
    tau = 0.5
    expected = []
    for i in range(2):  # row 2 is left out by example_mask
        logits = [a[i] @ p[i] / tau] + [a[i] @ n[k] / tau for k in range(3) if neg_mask[i, k]]
        expected.append(_nll(logits, 0))
    got = info_nce_loss(a, p, n, temperature=tau, negative_mask=neg_mask, example_mask=ex_mask)
    np.testing.assert_allclose(got.numpy(), np.mean(expected), rtol=1e-5)
    # per-anchor negatives [U, K, p] give the same result as shared ones
    per_anchor = np.broadcast_to(n, (3, 3, 2))
    got2 = info_nce_loss(a, p, per_anchor, temperature=tau, negative_mask=neg_mask,
                         example_mask=ex_mask)
    np.testing.assert_allclose(got2.numpy(), got.numpy(), rtol=1e-6)


def test_info_nce_all_masked_is_zero_and_bad_temperature_raises():
    a = np.ones((2, 2), np.float32)
    got = info_nce_loss(a, a, a, example_mask=np.zeros(2, bool))
    assert got.numpy() == 0.0
    with pytest.raises(ValueError, match="temperature must be > 0"):
        info_nce_loss(a, a, a, temperature=0.0)


def test_in_batch_info_nce_against_numpy():
    a = RS.normal(size=(4, 3)).astype(np.float32)
    p = RS.normal(size=(4, 3)).astype(np.float32)
    valid = np.array([1, 0, 1, 1], bool)
    tau = 2.0
    expected = []
    for i in np.flatnonzero(valid):
        cols = np.flatnonzero(valid)
        logits = [a[i] @ p[j] / tau for j in cols]
        expected.append(_nll(logits, int(np.flatnonzero(cols == i)[0])))
    got = in_batch_info_nce_loss(a, p, temperature=tau, valid=valid)
    np.testing.assert_allclose(got.numpy(), np.mean(expected), rtol=1e-5)


def test_frequency_estimator_follows_the_recurrence():
    est = StreamingFrequencyEstimator(num_items=6, batch_size=2, alpha=0.5)
    a_last, b_delta = np.zeros(6), np.full(6, 2.5)  # prior (V - 1) / batch = 2.5
    batches = [[1, 2], [1, 3], [1, 2], [1, 3], [1, 2]]
    for t, ids in enumerate(batches, start=1):
        got = est(tf.constant(ids, tf.int64), training=True).numpy()
        for i in ids:
            b_delta[i] = 0.5 * b_delta[i] + 0.5 * (t - a_last[i])
            a_last[i] = t
        np.testing.assert_allclose(got, -np.log(b_delta[ids]), rtol=1e-6)
    # item 1 (every step) is estimated more frequent than items 2 and 3 (every other step)
    q = np.exp(est(tf.constant([1, 2, 3], tf.int64), training=False).numpy())
    assert q[0] > q[1] and q[0] > q[2]


def test_task_samples_uniform_negatives_from_the_corpus_without_padding():
    task = SampledSoftmaxTask(num_items=8, num_negatives=4000, seed=1)
    ids = task.sample_negatives().numpy()
    assert ids.min() >= 1 and ids.max() <= 7
    counts = np.bincount(ids, minlength=8)[1:]
    np.testing.assert_allclose(counts / counts.sum(), np.full(7, 1 / 7), atol=0.03)
    same = SampledSoftmaxTask(num_items=8, num_negatives=4000, seed=1).sample_negatives()
    np.testing.assert_array_equal(ids, same.numpy())  # seeded
    with pytest.raises(ValueError, match="no negatives"):
        SampledSoftmaxTask(num_items=8, num_negatives=0)


def test_task_round_trips_through_config():
    for task in (SampledSoftmaxTask(num_items=8, num_negatives=3, in_batch_negatives=True,
                                    seed=4, mask_history_negatives=True),
                 SampledSoftmaxTask(num_items=8, num_negatives=0, in_batch_negatives=True,
                                    remove_accidental_hits=False, batch_size=16)):
        clone = SampledSoftmaxTask.from_config(task.get_config())
        assert clone.get_config() == task.get_config()
        assert (clone.num_negatives, clone.in_batch_negatives, clone.batch_size) == (
            task.num_negatives, task.in_batch_negatives, task.batch_size)
    est = StreamingFrequencyEstimator(10, 4, 0.1)
    assert StreamingFrequencyEstimator.from_config(est.get_config()).get_config() == \
        est.get_config()


def test_task_and_estimator_argument_errors_name_what_was_received():
    cases = [
        (lambda: SampledSoftmaxTask(num_items=1), "num_items must be an int >= 2. Received: "
                                                  "num_items=1"),
        (lambda: SampledSoftmaxTask(num_items=8, num_negatives=-1),
         "num_negatives must be an int >= 0. Received: num_negatives=-1"),
        (lambda: SampledSoftmaxTask(num_items=8, batch_size=0),
         "batch_size must be an int >= 1. Received: batch_size=0"),
        (lambda: StreamingFrequencyEstimator(8, alpha=1.5),
         r"alpha must be in \(0, 1\]. Received: alpha=1.5"),
        (lambda: StreamingFrequencyEstimator(8, batch_size=2.0),
         "batch_size must be an int >= 1. Received: batch_size=2.0"),
        (lambda: in_batch_info_nce_loss(Q, P, temperature=-1.0),
         "temperature must be > 0. Received: temperature=-1.0"),
    ]
    for make, message in cases:
        with pytest.raises(ValueError, match=message):
            make()


def test_cosine_similarity_info_nce_against_numpy():
    """``similarity="cosine"``: logits are cos(a, b) / tau, computed here by hand."""
    a = RS.normal(size=(3, 4)).astype(np.float32) * 5.0
    p = RS.normal(size=(3, 4)).astype(np.float32)
    n = RS.normal(size=(2, 4)).astype(np.float32) * 0.1
    tau = 0.2

    def cos(x, y):
        return float(x @ y / np.linalg.norm(x) / np.linalg.norm(y))

    expected = [_nll([cos(a[i], p[i]) / tau] + [cos(a[i], n[k]) / tau for k in range(2)], 0)
                for i in range(3)]
    got = info_nce_loss(a, p, n, temperature=tau, similarity="cosine")
    np.testing.assert_allclose(got.numpy(), np.mean(expected), rtol=1e-5)
    in_batch = [_nll([cos(a[i], p[j]) / tau for j in range(3)], i) for i in range(3)]
    got = in_batch_info_nce_loss(a, p, temperature=tau, similarity="cosine")
    np.testing.assert_allclose(got.numpy(), np.mean(in_batch), rtol=1e-5)
    # scaling a vector changes the dot-product loss but not the cosine one
    scaled = info_nce_loss(a * 3.0, p, n, temperature=tau, similarity="cosine")
    np.testing.assert_allclose(scaled.numpy(), np.mean(expected), rtol=1e-5)
    with pytest.raises(ValueError, match="similarity must be one of .* Received: similarity='l2'"):
        info_nce_loss(a, p, n, similarity="l2")


class _IdTower:
    """Item "tower" for the task tests: item i's vector is row i of a fixed table."""

    def __init__(self, table):
        self.table = tf.constant(table)

    def embed_indices(self, ids, training=None):
        return tf.gather(self.table, ids)


def test_history_masked_negatives_against_numpy():
    from micrec_tf.losses import history_negative_mask

    rs = np.random.RandomState(8)
    v, b, h, n = 12, 5, 4, 30
    table = rs.normal(size=(v, 4)).astype(np.float32)
    hist = rs.randint(0, v, size=(b, h))
    hist[0] = 0  # an all-padding history masks nothing
    query = rs.normal(size=(b, 4)).astype(np.float32)
    pos_ids = rs.randint(1, v, size=b)
    task = SampledSoftmaxTask(num_items=v, num_negatives=n, seed=5, mask_history_negatives=True)
    state = task.rng.state.numpy().copy()
    loss = task((query, table[pos_ids], pos_ids, hist), item_tower=_IdTower(table)).numpy()
    task.rng.state.assign(state)
    negs = task.sample_negatives().numpy()  # the same draws, in sampled order
    expected = []
    for r in range(b):
        clicked = {int(x) for x in hist[r] if x > 0}
        logits = [query[r] @ table[pos_ids[r]]]
        logits += [query[r] @ table[j] for j in negs if j != pos_ids[r] and j not in clicked]
        expected.append(_nll(logits, 0))
    np.testing.assert_allclose(loss, np.mean(expected), rtol=1e-5)
    # without the mask the history items count as negatives: a different loss
    plain = SampledSoftmaxTask(num_items=v, num_negatives=n, seed=5)
    assert abs(plain((query, table[pos_ids], pos_ids), item_tower=_IdTower(table)).numpy()
               - loss) > 1e-4
    # the mask alone, duplicates among the sorted negatives included
    sorted_negs = np.sort(negs)
    mask = history_negative_mask(hist, sorted_negs).numpy()
    ref = np.array([[j not in set(hist[r][hist[r] > 0].tolist()) for j in sorted_negs]
                    for r in range(b)])
    np.testing.assert_array_equal(mask, ref)
    assert (~ref).sum() > 0 and len(set(negs.tolist())) < n
    with pytest.raises(ValueError, match="needs history_ids"):
        task((query, table[pos_ids], pos_ids), item_tower=_IdTower(table))

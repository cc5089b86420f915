"""Contrastive tasks (micrec_tf.cl): dropout mask statistics, neighbour samplers, masking."""
import micrec_tf  # noqa: F401

import numpy as np
import pytest
import tensorflow as tf

from micrec_tf.cl import (CLAnchorSampler, FeatureCL, SemanticCL, SessionCL, cl_inputs_from_batch,
                          correlated_field_keep_mask, field_correlation, tag_keep_mask)
from micrec_tf.data.artifacts import ItemTable
from micrec_tf.layers import ItemFeatureLookup, ItemFieldEmbeddings
from micrec_tf.towers import MLPItemTower

V, T, D = 40, 4, 8
RS = np.random.RandomState(0)
TAGS = RS.randint(1, 7, size=(V, T))
TAGS[:, 3] = 0
TAGS[::3, 2] = 0
TAGS[0] = 0
CATEGORY = TAGS[:, 0]
PROVIDER = (CATEGORY % 3) + 1  # provider is a function of the category: correlated fields
PROVIDER[0] = 0
YEAR = RS.randint(1, 6, size=V)
YEAR[0] = 0
TABLE = ItemTable(tags=TAGS, provider=PROVIDER, extra={"item_year": YEAR}, category=CATEGORY)
F = 4  # item, tags, provider, year


def make_tower():
    lookup = ItemFeatureLookup.from_item_table(TABLE)
    fields = ItemFieldEmbeddings(V, 7, 4, {"item_year": 6}, D)
    return MLPItemTower(lookup, fields, [16, 8])


def make_inputs(tower, ids):
    feats = tower.features_for(tf.constant(ids, tf.int64))
    raw = tower.raw_embedding(feats)
    return cl_inputs_from_batch(tf.constant(ids), feats, raw, tower.encode(raw))


ALL_ITEMS = np.arange(1, V)


def test_cl_inputs_deduplicate_first_occurrence():
    tower = make_tower()
    inputs = make_inputs(tower, [5, 3, 5, 0, 3, 9])
    np.testing.assert_array_equal(inputs.ids.numpy(), [5, 3, 0, 9])
    np.testing.assert_array_equal(inputs.valid.numpy(), [True, True, False, True])
    np.testing.assert_array_equal(inputs.features["item_tags"].numpy(), TAGS[[5, 3, 0, 9]])
    assert inputs.raw.shape == (4, F * D) and inputs.embeddings.shape == (4, 8)


def test_element_dropout_masks_half_the_elements():
    tower = make_tower()
    ids = np.tile(ALL_ITEMS, 1)
    inputs = make_inputs(tower, ids)
    raw = inputs.raw.numpy()
    task = FeatureCL(8, "element", mask_ratio=0.5, seed=3)
    aug = task.augment(inputs, tower).numpy()
    assert aug.shape == raw.shape
    nonzero = raw != 0
    dropped = (aug == 0) & nonzero
    assert abs(dropped.sum() / nonzero.sum() - 0.5) < 0.04
    np.testing.assert_array_equal(aug[~dropped], raw[~dropped])  # kept elements unscaled
    aug7 = FeatureCL(8, "element", mask_ratio=0.7, seed=3).augment(inputs, tower).numpy()
    assert abs(((aug7 == 0) & nonzero).sum() / nonzero.sum() - 0.7) < 0.04


def test_field_dropout_zeroes_whole_fields():
    tower = make_tower()
    inputs = make_inputs(tower, ALL_ITEMS)
    raw = inputs.raw.numpy().reshape(-1, F, D)
    task = FeatureCL(8, "field", mask_ratio=0.5, seed=5)
    dropped = []
    for _ in range(10):
        aug = task.augment(inputs, tower).numpy().reshape(-1, F, D)
        zero = np.all(aug == 0, axis=2)
        same = np.all(aug == raw, axis=2)
        assert np.all(zero | same)  # every field either fully dropped or untouched
        field_zero = zero & ~np.all(raw == 0, axis=2)
        assert not np.any(np.all(zero, axis=1))  # at least one field always kept
        dropped.append(field_zero.mean())
    # 0.5 per field, minus the rows that would lose all four (1/16) and keep one back
    assert abs(np.mean(dropped) - (0.5 - 1 / 64)) < 0.04


def test_categorical_dropout_drops_tags_before_pooling():
    tags = tf.constant(np.tile(TAGS[1:], (20, 1)))
    keep = tag_keep_mask(tf.random.Generator.from_seed(1), tags, 0.5).numpy()
    real = tags.numpy() > 0
    assert keep.shape == real.shape
    assert not np.any(keep & ~real)  # padding is never kept
    assert abs(keep[real].mean() - 0.5) < 0.03

    tower = make_tower()
    inputs = make_inputs(tower, ALL_ITEMS)
    task = FeatureCL(8, "categorical", mask_ratio=0.5, seed=2)
    task_rng_copy = tf.random.Generator.from_seed(2)
    aug = task.augment(inputs, tower).numpy().reshape(-1, F, D)
    raw = inputs.raw.numpy().reshape(-1, F, D)
    np.testing.assert_array_equal(aug[:, [0, 2, 3]], raw[:, [0, 2, 3]])  # other fields intact
    keep = tag_keep_mask(task_rng_copy, inputs.features["item_tags"], 0.5).numpy()
    table = tower.field_embeddings.tag_embedding.embeddings.numpy()
    tags_np = inputs.features["item_tags"].numpy()
    for r in range(len(tags_np)):
        kept = tags_np[r][keep[r]]
        expected = table[kept].mean(axis=0) if len(kept) else np.zeros(D)
        np.testing.assert_allclose(aug[r, 1], expected, rtol=1e-5, atol=1e-6)


def test_correlated_masking_masks_correlated_field_groups():
    corr = np.array([[1, .9, .1, 0], [.9, 1, 0, .1], [.1, 0, 1, .8], [0, .1, .8, 1]], np.float32)
    keep = correlated_field_keep_mask(tf.random.Generator.from_seed(0), corr, 500, 0.5).numpy()
    masked = {tuple(np.flatnonzero(~row)) for row in keep}
    assert masked == {(0, 1), (2, 3)}
    # the item table's provider is a function of the first tag: their NMI tops the matrix
    nmi = field_correlation(TABLE)
    assert nmi.shape == (F, F)
    np.testing.assert_allclose(np.diag(nmi), 1.0)
    assert nmi[1, 2] > nmi[2, 3] and nmi[1, 2] > nmi[1, 3]
    tower = make_tower()
    task = FeatureCL(8, "correlated", 0.5, seed=1, correlation=nmi)
    aug = task.augment(make_inputs(tower, ALL_ITEMS), tower).numpy().reshape(-1, F, D)
    assert np.all(np.all(aug == 0, axis=2).sum(axis=1) >= 2)


def test_feature_cl_duplicates_are_not_false_negatives():
    tower = make_tower()
    a = FeatureCL(8, "element", seed=7)
    b = FeatureCL(8, "element", seed=7)
    loss_dup = a(make_inputs(tower, [4, 6, 6, 4, 8]), item_tower=tower)
    b.projector.build((None, 8))
    b.projector.set_weights(a.projector.get_weights())
    loss_unique = b(make_inputs(tower, [4, 6, 8]), item_tower=tower)
    np.testing.assert_allclose(loss_dup.numpy(), loss_unique.numpy(), rtol=1e-6)


NB = np.zeros((V, 4), np.int64)
CNT = np.zeros((V, 4), np.float32)
SAME = np.zeros((V, 4), np.int8)
NB[1], CNT[1], SAME[1] = [2, 3, 4, 0], [1, 2, 3, 0], [1, 0, 0, 0]
NB[2], CNT[2], SAME[2] = [1, 5, 0, 0], [4, 4, 0, 0], [0, 1, 0, 0]
NB[3], CNT[3] = [7, 8, 9, 10], [0.5, 0.4, 0.3, 0.2]
# item 4 and 0 have no neighbours


def csr(nb, cnt, same=None):
    """The padded fixture as CSR arrays (indptr, neighbours, counts, same_category), by loops."""
    indptr, neighbours, counts, cats = [0], [], [], []
    for i in range(nb.shape[0]):
        for m in range(nb.shape[1]):
            if nb[i, m] > 0 and cnt[i, m] > 0:
                neighbours.append(int(nb[i, m]))
                counts.append(float(cnt[i, m]))
                cats.append(int(same[i, m]) if same is not None else 0)
        indptr.append(len(neighbours))
    return (np.array(indptr), np.array(neighbours, np.int64), np.array(counts),
            np.array(cats, np.int8))


def session_cl(nb=NB, cnt=CNT, same=SAME, **kwargs):
    indptr, neighbours, counts, cats = csr(nb, cnt, same)
    return SessionCL(indptr, neighbours, counts, 8, same_category=cats, **kwargs)


def _chi2(counts, probs):
    expected = counts.sum() * np.asarray(probs)
    return float(((counts - expected) ** 2 / expected).sum())


def test_session_sampler_is_proportional_to_counts_with_category_emphasis():
    task = session_cl(same_category_weight=3.0, num_negatives=30)
    n = 6000
    pos, has, neg, mask = (t.numpy() for t in task.sample(tf.constant([1] * n + [2] * n)))
    assert has.all()
    c1 = np.array([np.sum(pos[:n] == j) for j in (2, 3, 4)])
    assert c1.sum() == n  # positives always from the neighbour list
    # weights count * (3 if same category): [1*3, 2, 3] / 8; chi-square, 2 dof, p=0.001: 13.8
    assert _chi2(c1, np.array([3, 2, 3]) / 8) < 13.8
    c2 = np.array([np.sum(pos[n:] == j) for j in (1, 5)])
    assert c2.sum() == n
    assert _chi2(c2, np.array([4, 12]) / 16) < 10.8  # 1 dof, p=0.001


def test_session_sampler_uniform_positives_ignore_counts_and_category():
    task = session_cl(same_category_weight=3.0, positives="uniform")
    n = 6000
    pos = task.sample(tf.constant([2] * n))[0].numpy()
    counts = np.array([np.sum(pos == j) for j in (1, 5)])
    assert counts.sum() == n
    assert _chi2(counts, [0.5, 0.5]) < 10.8  # counts 4 vs 12 would give 1/4 vs 3/4


def test_cl_anchor_sampler_modes():
    ids = tf.constant([3, 3, 7, 9], tf.int64)
    np.testing.assert_array_equal(CLAnchorSampler(V, "batch")(ids).numpy(), ids.numpy())
    uniform = CLAnchorSampler(V, "uniform", seed=5)
    draws = np.concatenate([uniform(ids).numpy() for _ in range(3000)])
    assert draws.shape == (12000,) and draws.min() >= 1 and draws.max() <= V - 1
    counts = np.bincount(draws, minlength=V)[1:]
    assert _chi2(counts, np.full(V - 1, 1 / (V - 1))) < 78.0  # 38 dof, p=0.001: 73.4 (+ slack)
    both = CLAnchorSampler(V, "both", seed=5)(ids).numpy()
    assert both.shape == (8,)
    np.testing.assert_array_equal(both[:4], ids.numpy())
    assert both[4:].min() >= 1
    with pytest.raises(ValueError, match="mode must be one of .* Received: mode='popular'"):
        CLAnchorSampler(V, "popular")
    with pytest.raises(ValueError, match="num_items must be an int >= 2. Received: num_items=1"):
        CLAnchorSampler(1, "uniform")


def test_semantic_negatives_never_in_the_positive_set_and_empty_items_masked():
    task = SemanticCL(NB, CNT, 8, num_negatives=200, seed=9)
    ids = np.array([1, 2, 3, 4, 0])
    for _ in range(5):
        pos, has, neg, mask = (t.numpy() for t in task.sample(tf.constant(ids)))
        assert neg.min() >= 1 and neg.max() <= V - 1 and mask.shape == (5, 200)
        for r, i in enumerate(ids):
            positive_set = set(NB[i][NB[i] > 0]) | {i}
            kept = neg[mask[r]]
            assert not positive_set & set(kept.tolist())
            # and every negative outside the set is kept
            assert set(neg[~mask[r]].tolist()) <= positive_set
        np.testing.assert_array_equal(has, [True, True, True, False, False])
        assert pos[3] == 0 and pos[4] == 0
        assert set(pos[:1]) <= {2, 3, 4} and set(pos[2:3]) <= {7, 8, 9, 10}


def _random_symmetric_table(v, density, seed):
    """{item: {neighbour: count}} symmetric, built with dicts; item 1 co-occurs with almost all."""
    rs = np.random.RandomState(seed)
    table = {i: {} for i in range(1, v)}
    for a in range(1, v):
        for b in range(a + 1, v):
            if (b % 7 != 0) if a == 1 else rs.rand() < density:
                c = int(rs.randint(1, 9))
                table[a][b] = table[b][a] = c
    return table


def _table_csr(table, v):
    indptr, nb, cnt = [0, 0], [], []
    for i in range(1, v):
        for j, c in sorted(table[i].items()):
            nb.append(j)
            cnt.append(c)
        indptr.append(len(nb))
    return np.array(indptr), np.array(nb, np.int64), np.array(cnt, np.float64)


def test_session_negatives_never_co_occur_with_the_anchor_on_the_full_table():
    v = V
    table = _random_symmetric_table(v, 0.3, seed=3)
    assert len(table[1]) > 0.8 * (v - 2)  # a head item: co-occurs with most of the catalogue
    indptr, nb, cnt = _table_csr(table, v)
    task = SessionCL(indptr, nb, cnt, 8, num_negatives=5, negative_pool_factor=8, seed=4)
    ids = np.arange(0, v)
    for _ in range(5):
        pos, has, pool, mask = (t.numpy() for t in task.sample(tf.constant(ids)))
        assert pool.shape == (40,) and mask.shape == (v, 40)
        for r, i in enumerate(ids):
            allowed = [k for k, n in enumerate(pool.tolist())
                       if n != i and n not in table.get(i, {})]
            # exactly the first num_negatives allowed pool entries, in pool order
            np.testing.assert_array_equal(np.flatnonzero(mask[r]), allowed[:5])
            if has[r]:
                assert pos[r] in table[i]
        np.testing.assert_array_equal(has, [i in table and bool(table[i]) for i in ids])
    # the head item gets its negatives despite co-occurring with most items
    head = np.mean([task.sample(tf.constant([1]))[3].numpy().sum() for _ in range(50)])
    assert head > 1.0


def test_session_positives_follow_counts_over_the_whole_list():
    table = _random_symmetric_table(V, 0.5, seed=5)
    indptr, nb, cnt = _table_csr(table, V)
    task = SessionCL(indptr, nb, cnt, 8, seed=6)
    anchor = max(table, key=lambda i: len(table[i]))
    n = 20000
    pos = task.sample(tf.constant([anchor] * n))[0].numpy()
    items = sorted(table[anchor])
    observed = np.array([np.sum(pos == j) for j in items])
    assert observed.sum() == n
    probs = np.array([table[anchor][j] for j in items], float)
    probs /= probs.sum()
    # chi-square critical value at p = 0.001 for len(items) - 1 dof (Wilson-Hilferty)
    k = len(items) - 1
    crit = k * (1 - 2 / (9 * k) + 3.09 * np.sqrt(2 / (9 * k))) ** 3
    assert _chi2(observed, probs) < crit


def test_semantic_sampler_is_uniform_over_title_neighbours():
    scores = np.where(NB > 0, 0.9, 0.0).astype(np.float32)
    scores[3] = [0.99, 0.5, 0.4, 0.1]  # scores do not bias the choice: all are positives
    task = SemanticCL(NB, scores, 8, num_negatives=20)
    n = 8000
    pos, has, _, _ = (t.numpy() for t in task.sample(tf.constant([3] * n)))
    counts = np.array([np.sum(pos == j) for j in (7, 8, 9, 10)])
    assert counts.sum() == n
    assert _chi2(counts, np.full(4, 0.25)) < 16.3  # 3 dof, p=0.001


def test_items_without_neighbours_get_no_loss():
    tower = make_tower()
    task = session_cl(num_negatives=10)
    loss = task(make_inputs(tower, [4, 0, 11]), item_tower=tower)
    assert loss.numpy() == 0.0
    loss_mixed = task(make_inputs(tower, [4, 1, 2]), item_tower=tower)
    assert loss_mixed.numpy() > 0.0


def test_cl_tasks_round_trip_through_config():
    nmi = field_correlation(TABLE)
    for task in (FeatureCL(8, "correlated", 0.3, 0.5, seed=2, correlation=nmi),
                 FeatureCL(8, similarity="cosine"),
                 SemanticCL(NB, CNT, 8, num_negatives=5, temperature=0.2),
                 SemanticCL(NB, CNT, 8, positives="all", similarity="cosine"),
                 session_cl(same_category_weight=2.5, similarity="cosine", positives="uniform",
                            negative_pool_factor=3),
                 CLAnchorSampler(V, "both", seed=3)):
        config = task.get_config()
        clone = type(task).from_config(config)
        assert clone.get_config() == config


def test_cl_argument_errors():
    """Every task checks its arguments at construction: one line naming the bad value."""
    indptr, nb, cnt, cats = csr(NB, CNT, SAME)
    cases = [
        (lambda: FeatureCL(8, "bogus"), "strategy must be one of .* Received: strategy='bogus'"),
        (lambda: FeatureCL(8, "correlated"), "needs the field correlation"),
        (lambda: FeatureCL(8, mask_ratio=1.0), r"mask_ratio must be in \(0, 1\). Received: "
                                               r"mask_ratio=1.0"),
        (lambda: FeatureCL(8, temperature=0), "temperature must be > 0. Received: temperature=0"),
        (lambda: FeatureCL(0), "projection_dim must be an int >= 1. Received: projection_dim=0"),
        (lambda: FeatureCL(8, similarity="euclid"),
         "similarity must be one of .* Received: similarity='euclid'"),
        (lambda: session_cl(similarity="euclid"),
         "similarity must be one of .* Received: similarity='euclid'"),
        (lambda: session_cl(positives="sqrt"),
         "positives must be one of .* Received: positives='sqrt'"),
        (lambda: session_cl(negative_pool_factor=0),
         "negative_pool_factor must be an int >= 1. Received: negative_pool_factor=0"),
        (lambda: session_cl(same_category_weight=-1.0),
         "same_category_weight must be > 0. Received: same_category_weight=-1.0"),
        (lambda: session_cl(num_negatives=2.5),
         "num_negatives must be an int >= 1. Received: num_negatives=2.5"),
        (lambda: SessionCL(indptr, nb, cnt, 0), "projection_dim must be an int >= 1"),
        (lambda: SessionCL(indptr, nb, cnt[:-1], 8), r"counts must be \[E\]"),
        (lambda: SessionCL(indptr, nb, cnt, 8, same_category=cats[:1]), "same_category must be"),
        (lambda: SessionCL(indptr[::-1].copy(), nb, cnt, 8), "CSR row pointer"),
        (lambda: SemanticCL(NB, CNT, 8, positives="every"),
         "positives must be one of .* Received: positives='every'"),
        (lambda: SemanticCL(NB, CNT, 8, num_negatives=0),
         "num_negatives must be an int >= 1. Received: num_negatives=0"),
        (lambda: SemanticCL(NB, CNT, -3), "projection_dim must be an int >= 1. Received: "
                                          "projection_dim=-3"),
        (lambda: SemanticCL(NB, CNT, 8, num_items=V + 1),
         f"equal the neighbour table's {V} rows. Received: num_items={V + 1}"),
        (lambda: SemanticCL(NB, CNT[:, :2], 8), r"must both be \[V, M\]"),
        (lambda: SemanticCL(NB + V, CNT, 8), "neighbour indices must be in"),
    ]
    for make, message in cases:
        with pytest.raises(ValueError, match=message):
            make()


def test_semantic_all_neighbours_loss_matches_numpy():
    tower = make_tower()
    task = SemanticCL(NB, CNT, 8, num_negatives=12, temperature=0.5, seed=11, positives="all")
    ids = [1, 2, 3, 4]
    inputs = make_inputs(tower, ids)
    state = task.rng.state.numpy().copy()
    loss = float(task(inputs, item_tower=tower).numpy())
    task.rng.state.assign(state)  # replay the same negatives
    ids_t = tf.constant(ids, tf.int64)
    negatives, _ = task._negatives(ids_t, tf.gather(task.neighbours, ids_t),
                                   tf.gather(task.neighbour_valid, ids_t))
    negatives = negatives.numpy()

    def proj(x):
        return task.projector(tf.constant(x)).numpy()

    a = proj(inputs.embeddings.numpy())
    per_anchor = []
    for r, i in enumerate(ids):
        pos_ids = [int(j) for j in NB[i] if j > 0]
        if not pos_ids:
            continue
        p = proj(tower.embed_indices(tf.constant(pos_ids, tf.int64)).numpy())
        n = proj(tower.embed_indices(tf.constant(negatives)).numpy())
        keep = [k for k, j in enumerate(negatives) if j != i and j not in pos_ids]
        terms = []
        for pj in p:
            pos_logit = a[r] @ pj / 0.5
            neg_logits = np.array([a[r] @ n[k] / 0.5 for k in keep])
            terms.append(-pos_logit + np.log(np.exp(pos_logit) + np.exp(neg_logits).sum()))
        per_anchor.append(np.mean(terms))
    np.testing.assert_allclose(loss, np.mean(per_anchor), rtol=1e-4)

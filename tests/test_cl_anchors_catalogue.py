"""CL anchors over the whole catalogue (issue 28, item 3, third bullet): ``loss.cl_anchors``
with ``preprocess.item_vocabulary: catalogue``, where the vocabulary holds items without a
training click.

* ``uniform`` / ``both`` draw anchors uniformly over every item 1..V-1, the unclicked ones
  included (chi-square against pure-numpy expected counts);
* ``batch`` (the default) is unchanged: the batch's distinct target items, no generator;
  the ``uniform`` stream is the generator's formula draw for draw;
* anchors without a positive (no co-occurrence, no title neighbour) are left out of session and
  semantic CL (loss 0, zero gradient) but get feature CL;
* :func:`micrec_tf.cl.describe_cl_anchors` (the training log line and ``metrics.json``'s
  ``cl_anchors``) counts what pure Python counts in ``vocab/item_id_counts.txt`` and the tables.
"""
import micrec_tf  # noqa: F401

import hashlib
import json
import os

import numpy as np
import pytest
import tensorflow as tf

from micrec_tf.cl import (CLAnchorSampler, CLInputs, cl_anchor_pool, cl_anchors_line,
                          describe_cl_anchors)
from micrec_tf.config import from_dict
from micrec_tf.data.artifacts import CooccurrenceTable, ItemTable, NeighbourTable, read_id_clicks
from micrec_tf.model import build_model
from tests.conftest import tiny_item_fields

V, T, D, H = 21, 2, 4, 3
NUM_TAGS, NUM_PROVIDERS, NUM_YEARS = 5, 3, 4
VOCAB, TAGS, PROVIDER, YEAR, RS = tiny_item_fields(V, T)
# Training clicks per item index (row 0: padding). Clicked items first (as the catalogue
# vocabulary orders them), then 7 unclicked catalogue items 14..20.
CLICKS = np.array([0, 9, 8, 7, 6, 5, 5, 4, 3, 3, 2, 2, 1, 1, 0, 0, 0, 0, 0, 0, 0], np.int64)
UNCLICKED = [i for i in range(1, V) if CLICKS[i] == 0]
# Session co-occurrence among clicked items only (an unclicked item has no session), and item
# 13 clicked once, alone in its session: no co-occurrence either.
PAIRS = [(1, 2, 3), (1, 3, 1), (2, 4, 2), (3, 5, 1), (4, 6, 2), (5, 7, 1), (6, 8, 1),
         (7, 9, 2), (8, 10, 1), (9, 11, 1), (10, 12, 1), (11, 12, 2)]
# Title neighbours for every item but 5 and 17 (no usable title); unclicked items have some.
NO_TITLE = {5, 17}


def _cooccurrence():
    rows = {}
    for a, b, c in PAIRS:
        rows.setdefault(a, []).append((b, c))
        rows.setdefault(b, []).append((a, c))
    return CooccurrenceTable.from_rows(V, [(i, [n for n, _ in r], [c for _, c in r],
                                            [0] * len(r)) for i, r in rows.items()])


def _title_neighbours(m=3):
    nb = np.zeros((V, m), np.int64)
    for i in range(1, V):
        if i in NO_TITLE:
            continue
        row = [j for j in range(1, V) if j != i and j not in NO_TITLE
               and TAGS[j, 0] == TAGS[i, 0]][:m] or [1 + i % 4]
        nb[i, :len(row)] = row
    return NeighbourTable(neighbours=nb, weights=(nb > 0).astype(np.float32))


def _table(clicks=CLICKS):
    return ItemTable(tags=TAGS, provider=PROVIDER, extra={"item_year": YEAR},
                     category=TAGS[:, 0], id_clicks=clicks)


def _cfg(**loss):
    return from_dict({
        "model": {"embedding_dim": D, "output_dim": D, "item_mlp_units": [8, D],
                  "user_mlp_units": [8, D], "num_heads": 2,
                  "cl": ["feature", "semantic", "session"]},
        "loss": {"num_negatives": 5, "num_cl_negatives": 4, **loss},
        "train": {"batch_size": 8, "seed": 11}, "preprocess": {"history_length": H}})


def _model(**loss):
    return build_model(_cfg(**loss), _table(), VOCAB, ["gender"], _cooccurrence(),
                       _title_neighbours())


def _chi2(counts, expected):
    return float(((counts - expected) ** 2 / expected).sum())


# 19 degrees of freedom (V - 1 = 20 cells): the 0.999 quantile of chi-square is 43.82.
CHI2_19_P001 = 43.82


# ------------------------------------------------------------------ uniform over the catalogue
@pytest.mark.parametrize("mode", ["uniform", "both"])
def test_uniform_anchors_draw_unclicked_catalogue_items_at_the_uniform_rate(mode):
    model = _model(cl_anchors=mode)
    sampler = model.cl_anchor_sampler
    assert sampler is not None and sampler.num_items == V  # the whole vocabulary, not the clicked
    batch = tf.constant([1, 1, 2, 3, 4, 4, 5, 6], tf.int64)
    draws = []
    for _ in range(2500):
        out = sampler(batch).numpy()
        if mode == "both":
            np.testing.assert_array_equal(out[:8], batch.numpy())  # the batch's items first
            out = out[8:]
        draws.append(out)
    draws = np.concatenate(draws)
    n = draws.size
    assert n == 20000 and draws.min() >= 1 and draws.max() <= V - 1  # never the padding 0
    counts = np.bincount(draws, minlength=V)[1:]
    assert _chi2(counts, np.full(V - 1, n / (V - 1))) < CHI2_19_P001
    # The unclicked items together: binomial(n, 7/20), within 4 standard deviations.
    p = len(UNCLICKED) / (V - 1)
    hits = int(np.isin(draws, UNCLICKED).sum())
    assert abs(hits - n * p) < 4 * np.sqrt(n * p * (1 - p)), (hits, n * p)
    assert all(counts[i - 1] > 0 for i in UNCLICKED)


def test_unclicked_anchors_reach_the_cl_inputs_with_their_catalogue_fields():
    """The anchors the model's CL tasks get: drawn items, unclicked ones included, with their
    fields looked up in the catalogue table (compared with the numpy arrays)."""
    model = _model(cl_anchors="uniform")
    batch = {"item": tf.constant([1, 2, 3, 4, 5, 6, 7, 8], tf.int64)}
    features = {k: tf.constant(v) for k, v in
                {"item": np.arange(1, 9), "item_tags": TAGS[1:9], "item_provider": PROVIDER[1:9],
                 "item_year": YEAR[1:9]}.items()}
    raw = model.item_tower.raw_embedding(features)
    seen = set()
    for _ in range(40):
        inputs = model._cl_inputs(batch["item"], features, raw, model.item_tower.encode(raw),
                                  training=False)
        ids = inputs.ids.numpy()
        assert len(set(ids.tolist())) == ids.size  # deduplicated
        np.testing.assert_array_equal(inputs.features["item_tags"].numpy(), TAGS[ids])
        np.testing.assert_array_equal(inputs.features["item_provider"].numpy(), PROVIDER[ids])
        np.testing.assert_array_equal(inputs.features["item_year"].numpy(), YEAR[ids])
        seen.update(ids.tolist())
    assert set(UNCLICKED) <= seen


# ------------------------------------------------------------------ the default is unchanged
def test_default_batch_anchors_are_the_batch_items_without_a_generator():
    model = _model()
    assert _cfg().loss.cl_anchors == "batch" and model.cl_anchor_sampler is None
    ids = [4, 2, 4, 9, 2, 1, 9, 7]
    want = list(dict.fromkeys(ids))  # distinct, first occurrence order: [4, 2, 9, 1, 7]
    features = {"item": tf.constant(ids, tf.int64), "item_tags": tf.constant(TAGS[ids]),
                "item_provider": tf.constant(PROVIDER[ids]), "item_year": tf.constant(YEAR[ids])}
    raw = model.item_tower.raw_embedding(features)
    emb = model.item_tower.encode(raw)
    inputs = model._cl_inputs(features["item"], features, raw, emb, training=False)
    assert inputs.ids.numpy().tolist() == want
    first = [ids.index(i) for i in want]
    np.testing.assert_array_equal(inputs.raw.numpy(), raw.numpy()[first])
    np.testing.assert_array_equal(inputs.embeddings.numpy(), emb.numpy()[first])


def test_uniform_stream_is_the_generator_formula_draw_for_draw():
    """``uniform`` anchors are ``Generator.from_seed(train.seed + 4).uniform(shape, 1, V)``
    (the seed offset of the anchors is 1 + the 3 CL tasks), before and after issue 28."""
    model = _model(cl_anchors="uniform")
    reference = tf.random.Generator.from_seed(11 + 4)
    batch = tf.constant([3, 1, 2, 7, 7], tf.int64)
    for _ in range(5):
        want = reference.uniform([5], minval=1, maxval=V, dtype=tf.int64).numpy()
        np.testing.assert_array_equal(model.cl_anchor_sampler(batch).numpy(), want)


# ------------------------------------------------------------------ anchors without a positive
def _inputs(model, ids):
    ids = tf.constant(ids, tf.int64)
    features = model.item_tower.features_for(ids)
    raw = model.item_tower.raw_embedding(features)
    return ids, features, raw, model.item_tower.encode(raw)


@pytest.mark.parametrize("semantic_positives", ["sample", "all"])
def test_anchors_without_a_positive_are_left_out_of_session_and_semantic_cl(semantic_positives):
    """Item 15 (unclicked: no co-occurrence) and 17 (unclicked, no title): no session CL; 17 and
    5 (no title): no semantic CL. Such an anchor adds nothing: a batch of them only has loss 0,
    and in a mixed batch its anchor vector gets an exactly zero gradient; it still gets feature
    CL (non-zero gradient)."""
    model = _model(semantic_positives=semantic_positives)
    tasks = model.cl_tasks
    cases = {"session": ([15, 17, 13], [1, 15, 2, 17]),
             "semantic": ([17, 5], [1, 17, 2, 5])}
    for name, (alone, mixed) in cases.items():
        ids, features, raw, emb = _inputs(model, alone)
        loss = tasks[name](CLInputs(ids, features, raw, emb), item_tower=model.item_tower)
        assert loss.numpy() == 0.0, name
        ids, features, raw, emb = _inputs(model, mixed)
        with tf.GradientTape() as tape:
            tape.watch(emb)
            loss = tasks[name](CLInputs(ids, features, raw, emb), item_tower=model.item_tower)
        grad = tape.gradient(loss, emb).numpy()
        assert loss.numpy() > 0.0, name
        for row, item in enumerate(mixed):
            if item in alone:
                assert not grad[row].any(), (name, item)
            else:
                assert np.abs(grad[row]).sum() > 0, (name, item)
    ids, features, raw, emb = _inputs(model, [15, 17, 1, 2])
    with tf.GradientTape() as tape:
        tape.watch(emb)
        loss = tasks["feature"](CLInputs(ids, features, raw, emb), item_tower=model.item_tower)
    grad = tape.gradient(loss, emb).numpy()
    assert np.abs(grad[0]).sum() > 0 and np.abs(grad[1]).sum() > 0


# ------------------------------------------------------------------ which items are anchors
def _bucket(raw):
    b = int(hashlib.sha256(raw.encode()).hexdigest(), 16) % 10
    return {0: "valid", 1: "test"}.get(b)


RAW_IDS = [f"m{i}" for i in range(1, V)]


def _write_vocab(tmp_path):
    vocab = tmp_path / "vocab"
    vocab.mkdir()
    (vocab / "item_id.txt").write_text("".join(f"{r}\n" for r in RAW_IDS), encoding="utf-8")
    (vocab / "item_id_counts.txt").write_text("".join(f"{c}\n" for c in CLICKS[1:]),
                                              encoding="utf-8")
    return vocab


def _reference(vocab, mode, tasks=("session", "semantic"), cold=True):
    """Pure Python over the files and the hand-written tables above."""
    counts = [int(x) for x in (vocab / "item_id_counts.txt").read_text().split()]
    raw = (vocab / "item_id.txt").read_text().split()
    pool = [i for i in range(1, len(counts) + 1) if mode != "batch" or counts[i - 1] > 0]
    out = {"policy": mode, "num_items": len(pool),
           "num_without_clicks": sum(1 for i in pool if counts[i - 1] == 0)}
    with_cooc = {a for a, _, _ in PAIRS} | {b for _, b, _ in PAIRS}
    if "session" in tasks:
        out["num_without_cooccurrence"] = sum(1 for i in pool if i not in with_cooc)
    if "semantic" in tasks:
        out["num_without_title_neighbours"] = sum(1 for i in pool if i in NO_TITLE)
    if cold:
        out["num_cold_valid"] = sum(1 for i in pool if _bucket(raw[i - 1]) == "valid")
        out["num_cold_test"] = sum(1 for i in pool if _bucket(raw[i - 1]) == "test")
    return out


@pytest.mark.parametrize("mode", ["batch", "uniform", "both"])
def test_describe_cl_anchors_counts_what_pure_python_counts(tmp_path, mode):
    vocab = _write_vocab(tmp_path)
    assert {_bucket(r) for r in RAW_IDS} >= {"valid", "test"}  # the fixture has both buckets
    model = _model(cl_anchors=mode)
    id_clicks = read_id_clicks(str(vocab / "item_id_counts.txt"), V)
    got = describe_cl_anchors(mode, V, id_clicks, model.cl_tasks, RAW_IDS)
    want = _reference(vocab, mode)
    assert got == want
    assert want["num_items"] == (13 if mode == "batch" else 20)
    assert want["num_without_clicks"] == (0 if mode == "batch" else 7)
    line = cl_anchors_line(got)
    assert "\n" not in line and f"loss.cl_anchors={mode}" in line
    if mode == "uniform":
        assert line.startswith(f"CL anchors: uniform over 20 catalogue items (7 without training "
                               f"clicks; loss.cl_anchors=uniform); {want['num_cold_valid']} "
                               f"cold-valid and {want['num_cold_test']} cold-test items")
    for key, text in (("num_without_cooccurrence", "session CL leaves out {} of them"),
                      ("num_without_title_neighbours", "semantic CL leaves out {} of them")):
        assert text.format(want[key]) in line
    # Without the cold split, without co-occurrence / semantic tasks, without counts.
    only_feature = {"feature": model.cl_tasks["feature"]}
    assert describe_cl_anchors(mode, V, id_clicks, only_feature) == \
        _reference(vocab, mode, tasks=(), cold=False)
    unknown = describe_cl_anchors(mode, V, None, only_feature)
    assert unknown == {"policy": mode, "num_items": 20, "num_without_clicks": None}
    if mode != "batch":
        assert "(unknown without training clicks" in cl_anchors_line(unknown)
    assert describe_cl_anchors(mode, V, id_clicks, {}) is None  # no CL task: nothing to say


def test_anchor_pool_and_description_validate_their_arguments():
    with pytest.raises(ValueError, match="mode must be one of .* Received: mode='popular'"):
        cl_anchor_pool("popular", V)
    with pytest.raises(ValueError, match=r"id_clicks must be \[21\]. Received: shape \(20,\)"):
        cl_anchor_pool("batch", V, CLICKS[1:])
    with pytest.raises(ValueError, match="raw_item_ids must hold the 20 items .* Received: 19"):
        describe_cl_anchors("uniform", V, CLICKS, {"feature": object()}, RAW_IDS[1:])
    pool = cl_anchor_pool("batch", V, CLICKS)
    assert not pool[0] and pool.tolist() == [False] + [c > 0 for c in CLICKS[1:].tolist()]
    assert cl_anchor_pool("uniform", V, CLICKS).tolist() == [False] + [True] * (V - 1)


def test_sampler_config_round_trip_keeps_the_catalogue_size():
    sampler = CLAnchorSampler(V, "uniform", seed=7)
    clone = CLAnchorSampler.from_config(sampler.get_config())
    assert clone.get_config() == sampler.get_config() and clone.num_items == V


# ------------------------------------------------------------------ the training run
@pytest.mark.slow
def test_training_logs_and_records_the_cl_anchors(tmp_path):
    """A tiny ``item_cold_start`` + ``catalogue`` pipeline, ``uniform`` anchors, one epoch: the
    log line and ``metrics.json``'s ``cl_anchors`` hold the counts pure Python reads from the
    artifact files (zeros of ``vocab/item_id_counts.txt``, the hash rule on
    ``vocab/item_id.txt``, empty co-occurrence rows, items without title neighbours)."""
    from micrec_tf.train import train
    from pipelines import preprocess, title_neighbours
    from tests.conftest import tiny_config

    cfg = tiny_config(str(tmp_path), preprocess={"split": "item_cold_start",
                                                 "item_vocabulary": "catalogue"},
                      loss={"cl_anchors": "uniform"}, train={"epochs": 1})
    preprocess.run(cfg, verbose=False)
    title_neighbours.run(cfg, verbose=False)
    lines = []
    result = train(cfg, evaluate_test=False, log=lambda *a: lines.append(" ".join(map(str, a))))
    art = cfg.artifacts_dir
    with open(os.path.join(art, "vocab", "item_id_counts.txt"), encoding="utf-8") as fh:
        counts = [int(x) for x in fh.read().split()]
    with open(os.path.join(art, "vocab", "item_id.txt"), encoding="utf-8") as fh:
        raw = [x.rstrip("\n") for x in fh]
    with np.load(os.path.join(art, "cooccurrence", "cooccurrence.npz")) as z:
        indptr = z["indptr"].tolist()
    with open(os.path.join(art, "title_neighbours", "title_neighbours.jsonl"),
              encoding="utf-8") as fh:
        with_titles = {r["item"] for r in map(json.loads, fh) if r["neighbours"]}
    n = len(counts)
    want = {"policy": "uniform", "num_items": n, "num_without_clicks": counts.count(0),
            "num_without_cooccurrence": sum(1 for i in range(1, n + 1)
                                            if indptr[i + 1] == indptr[i]),
            "num_without_title_neighbours": sum(1 for i in range(1, n + 1)
                                                if i not in with_titles),
            "num_cold_valid": sum(1 for r in raw if _bucket(r) == "valid"),
            "num_cold_test": sum(1 for r in raw if _bucket(r) == "test")}
    # The fixture has what the test is about: unclicked catalogue items, the cold ones among them.
    assert want["num_without_clicks"] >= want["num_cold_valid"] + want["num_cold_test"] > 0
    with open(os.path.join(result["run_dir"], "metrics.json"), encoding="utf-8") as fh:
        assert json.load(fh)["cl_anchors"] == want
    assert result["cl_anchors"] == want
    line = (f"[train] CL anchors: uniform over {n:,} catalogue items "
            f"({want['num_without_clicks']:,} without training clicks; loss.cl_anchors=uniform)")
    assert any(x.startswith(line) for x in lines), lines

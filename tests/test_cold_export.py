"""Cold items through export and retrieval (issue 28, item 1: "Export writes a vector for every
catalogue item and indexes all of them; retrieval can return an item nobody has clicked", and
"Must show": a cold item comes back from the exported index for a content-similar user).

One tiny synthetic pipeline (tests/conftest.py ``tiny_config``: 300 items, 6 topics of 50) with
``preprocess.split: item_cold_start``, ``preprocess.item_vocabulary: catalogue``, MiniLM title
vectors (``semantic.source: title``) in the item tower (``model.item_text``), DropoutNet-style
``loss.id_dropout: 0.5``, 10 epochs (seeded), then ``export.export_run`` with ``export.top_k``
100 so that the export builds a ScaNN index (300 items: more than top-100 and at least 256).

References, never the code's own output: the raw ``items.tsv`` / ``users.tsv`` /
``interactions.tsv`` read with plain Python (ids, first tag = topic, the sha256 hash rule, each
cold click's history = the user's warm clicks strictly earlier in (timestamp, input order), last
20), ``vocab/item_id.txt`` + ``vocab/item_id_counts.txt`` read line by line, and a numpy
brute-force ranking of the exported ``embeddings.npy`` by user vectors that the exported user
tower SavedModel computes in a fresh process (the same process also runs the
:class:`micrec_tf.retrieval.Retriever` over the exported ScaNN index, the path a user takes).
"""
from __future__ import annotations

import collections
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
K = 100         # export.top_k of this test, and the top-K the content check reads
RECENT = 3      # a content-similar user: the last RECENT history clicks share the cold topic
H = 20          # preprocess.history_length (the default)
SCORE_TOL = 1e-5  # float32 dot products of ~unit vectors: ScaNN's exact re-scoring vs float64

# Runs in a fresh process: the exported user tower's vectors (tf.saved_model.load, its serving
# signature) and the Retriever's top-K over the exported index for the same requests.
QUERY_SCRIPT = r"""
import json, sys
import micrec_tf  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
import tensorflow as tf
from micrec_tf.retrieval import Retriever

version_dir, requests_path, k, out_path = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
with open(requests_path, encoding="utf-8") as fh:
    reqs = json.load(fh)
retriever = Retriever.load(version_dir)
top_ids, top_scores = retriever.retrieve(reqs, k=k, exclude="history")
all_ids, _ = retriever.retrieve(reqs[:1], k=len(retriever.ids))
fn = tf.saved_model.load(version_dir + "/user_tower").signatures["serving_default"]
hlen = max(len(r["history"]) for r in reqs)
feed = {f: tf.constant([r[f] for r in reqs]) for f in retriever.user_fields}
feed["history"] = tf.constant([r["history"] + [""] * (hlen - len(r["history"])) for r in reqs])
outputs = fn(**feed)
assert len(outputs) == 1, sorted(outputs)
user = list(outputs.values())[0].numpy()
with open(out_path, "w", encoding="utf-8") as fh:
    json.dump({"index_kind": retriever.index_kind, "ids": top_ids.tolist(),
               "scores": top_scores.tolist(), "all_ids": all_ids.tolist(),
               "user": user.tolist()}, fh)
"""


def cold_rule(raw_id: str):
    """The issue's rule, spelled out here: 0 = cold-valid, 1 = cold-test, else warm (None)."""
    b = int(hashlib.sha256(raw_id.encode()).hexdigest(), 16) % 10
    return {0: "valid", 1: "test"}.get(b)


def read_tsv(path: str):
    with open(path, encoding="utf-8") as fh:
        rows = [line.rstrip("\n").split("\t") for line in fh]
    return rows[0], rows[1:]


def raw_reference(data_dir: str):
    """Plain-Python reading of the raw files: (item ids in file order, topic per item, the
    profile header and rows, and the content-similar cold-test clicks
    [(user, cold item, history)])."""
    _, items = read_tsv(os.path.join(data_dir, "items.tsv"))
    ids = [r[0] for r in items]
    topic = {r[0]: r[2].split("|")[0] for r in items}
    header, users = read_tsv(os.path.join(data_dir, "users.tsv"))
    profile = {r[0]: dict(zip(header[1:], r[1:])) for r in users}
    ih, clicks = read_tsv(os.path.join(data_dir, "interactions.tsv"))
    assert ih[:3] == ["user_id", "item_id", "timestamp"]
    by_user = collections.defaultdict(list)
    for pos, (u, i, t) in enumerate(r[:3] for r in clicks):
        by_user[u].append((int(t), pos, i))
    pairs = []
    for u in sorted(by_user):
        warm = []
        for _, _, i in sorted(by_user[u]):
            if cold_rule(i) == "test":
                hist = warm[-H:]
                if len(hist) >= RECENT and all(topic[x] == topic[i] for x in hist[-RECENT:]):
                    pairs.append((u, i, hist))
            elif cold_rule(i) is None:
                warm.append(i)
    return ids, topic, header[1:], profile, pairs


@pytest.fixture(scope="module")
def cold_export(tmp_path_factory):
    """(cfg, version dir, raw reference, query results of the fresh process, requests)."""
    from export import export_model
    from micrec_tf.train import train
    from pipelines import preprocess, title_neighbours
    from tests.conftest import tiny_config

    tmp = str(tmp_path_factory.mktemp("cold_export"))
    cfg = tiny_config(tmp, preprocess={"split": "item_cold_start",
                                       "item_vocabulary": "catalogue"},
                      semantic={"source": "title", "top_k": 5},
                      model={"item_text": True}, loss={"id_dropout": 0.5},
                      train={"epochs": 10, "early_stopping_patience": 0, "seed": 42},
                      export={"top_k": K})
    preprocess.run(cfg, verbose=False)
    title_neighbours.run(cfg, verbose=False)
    train(cfg, evaluate_test=False, log=lambda *a: None)
    version_dir = export_model.export_run(cfg, log=lambda *a: None)
    ref = raw_reference(cfg.data.data_dir)
    _, _, fields, profile, pairs = ref
    requests = [{**{f: profile[u][f] for f in fields}, "history": hist} for u, _, hist in pairs]
    assert len(requests) >= 20, len(requests)  # the data exercise the check
    req_path, out_path = os.path.join(tmp, "requests.json"), os.path.join(tmp, "out.json")
    with open(req_path, "w", encoding="utf-8") as fh:
        json.dump(requests, fh)
    proc = subprocess.run([sys.executable, "-c", QUERY_SCRIPT, version_dir, req_path, str(K),
                           out_path], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out_path, encoding="utf-8") as fh:
        out = json.load(fh)
    return cfg, version_dir, ref, out, requests


def _exported(version_dir):
    with open(os.path.join(version_dir, "item_embeddings", "ids.txt"), encoding="utf-8") as fh:
        ids = [line.rstrip("\n") for line in fh]
    with open(os.path.join(version_dir, "metadata.json"), encoding="utf-8") as fh:
        meta = json.load(fh)
    return ids, np.load(os.path.join(version_dir, "item_embeddings", "embeddings.npy")), meta


@pytest.mark.slow
def test_export_and_index_hold_every_catalogue_item_unclicked_ones_included(cold_export):
    cfg, version_dir, (raw_ids, _, _, _, _), out, _ = cold_export
    ids, vectors, meta = _exported(version_dir)
    # Every item of the raw item file has exactly one exported vector.
    assert len(ids) == len(set(ids)) == len(raw_ids) == vectors.shape[0] == 300
    assert set(ids) == set(raw_ids)
    assert np.all(np.isfinite(vectors))
    # The unclicked ones: zero training clicks in vocab/item_id_counts.txt (line r <-> line r of
    # vocab/item_id.txt); every cold item (hash rule) is among them.
    vocab = os.path.join(cfg.artifacts_dir, "vocab")
    with open(os.path.join(vocab, "item_id.txt"), encoding="utf-8") as fh:
        vocab_ids = [line.rstrip("\n") for line in fh]
    with open(os.path.join(vocab, "item_id_counts.txt"), encoding="utf-8") as fh:
        counts = [int(line) for line in fh]
    assert len(counts) == len(vocab_ids) == len(raw_ids)
    unclicked = {i for i, c in zip(vocab_ids, counts) if c == 0}
    cold = {i for i in raw_ids if cold_rule(i)}
    assert cold and cold <= unclicked <= set(ids)
    # The index holds them all: a ScaNN index over 300 items, and a query for the whole
    # catalogue through the Retriever returns every raw item id once.
    assert meta["index"]["kind"] == "scann" and meta["index"]["num_items"] == len(raw_ids)
    assert meta["top_k"] == K
    assert out["index_kind"] == "scann"
    returned = out["all_ids"][0]
    assert len(returned) == len(raw_ids) and set(returned) == set(raw_ids)


@pytest.mark.slow
def test_index_top_k_equals_numpy_brute_force_over_exported_vectors(cold_export):
    """ScaNN is approximate in general; this export searches every leaf
    (num_leaves_to_search == num_leaves) and re-scores reorder_k >= 300 candidates exactly, so
    every item is a candidate with its exact dot product: the index's top-K must equal the exact
    top-K, except that items within SCORE_TOL of the K-th score may swap at the boundary
    (float32 vs float64 sums), and each returned score equals the brute-force one within
    SCORE_TOL."""
    _, version_dir, _, out, requests = cold_export
    ids, vectors, meta = _exported(version_dir)
    params = meta["index"]
    assert params["num_leaves_to_search"] == params["num_leaves"]
    assert params["reorder_k"] >= len(ids)
    row = {i: r for r, i in enumerate(ids)}
    user = np.asarray(out["user"], np.float64)
    assert user.shape == (len(requests), vectors.shape[1])
    scores = user @ vectors.astype(np.float64).T
    for q, req in enumerate(requests):
        excluded = {row[i] for i in req["history"]}
        order = [r for r in sorted(range(len(ids)), key=lambda r: (-scores[q, r], r))
                 if r not in excluded]
        want, kth = order[:K], scores[q, order[K - 1]]
        got = [row[i] for i in out["ids"][q]]
        assert len(got) == K and not set(got) & excluded
        for r, s in zip(got, out["scores"][q]):
            assert abs(s - scores[q, r]) <= SCORE_TOL, (q, ids[r])
        for r in set(got) ^ set(want):
            assert abs(scores[q, r] - kth) <= SCORE_TOL, (q, ids[r])


@pytest.mark.slow
def test_content_similar_user_gets_the_cold_item_from_the_index(cold_export):
    """Users whose last RECENT warm clicks share the topic (first tag in items.tsv) of the
    cold-test item they click next, with the protocol's history: the exported index returns
    that cold item (zero training clicks, ID row masked) in its top K = 100 for most of them,
    while cold-test items of other topics come back far less often for the same requests.

    K = 100 is a third of the catalogue (two of the 6 topics' 50 items): a ranking by content
    puts the cold item among its own topic's items, ahead of the other topics; a ranking blind
    to content would return it with probability about 100 / 280 (300 items minus the excluded
    history), 0.36. Top 50 would be one topic's share, but it is seed-dependent at this scale:
    warm items of every topic (ID rows trained, larger vectors) fill it first. Measured with
    this config on one machine (2026-12-07), train.seed 42 / 1 / 7: clicked cold item in the
    top 100 for 0.92 / 0.69 / 0.93 of these clicks, other-topic cold items 0.10 / 0.16 / 0.21
    (top 50: 0.60 / 0.19 / 0.53 against 0.007 / 0.03 / 0.05; 20 epochs at lr 1e-3 and 5e-3:
    0.87 / 0.90 against 0.11 / 0.16 in the top 100). The bounds leave room for other seeds
    and for CPU-dependent float noise in training."""
    _, _, (_, topic, _, _, pairs), out, _ = cold_export
    cold_test = sorted(i for i in topic if cold_rule(i) == "test")
    hits, other = [], []
    for (_, item, _), got in zip(pairs, out["ids"]):
        hits.append(item in got)
        others = [c for c in cold_test if topic[c] != topic[item]]
        other.append(np.mean([c in got for c in others]))
    hit_rate, other_rate = float(np.mean(hits)), float(np.mean(other))
    assert hit_rate >= 0.5, hit_rate
    assert other_rate <= 0.3, other_rate
    assert hit_rate >= 2 * other_rate, (hit_rate, other_rate)
    # Cold items do come back, several distinct ones.
    assert len({item for (_, item, _), h in zip(pairs, hits) if h}) >= 3


def _saved_variables(version_dir):
    import tensorflow as tf

    ckpt = os.path.join(version_dir, "user_tower", "variables", "variables")
    return {name: tuple(shape) for name, shape in tf.train.list_variables(ckpt)
            if not name.startswith(("_CHECKPOINTABLE", "save_counter"))}


@pytest.mark.slow
def test_folded_text_export_serves_the_same_vectors_without_the_text_table(cold_export,
                                                                          tmp_path):
    """export.fold_text (default): the user tower holds a [V, D] text table instead of the
    [V, 384] vectors, and serves the same user vectors, and the export the same item vectors,
    as the export of before (export.fold_text: false) of the same run, within float32 rounding."""
    import tensorflow as tf
    from export import export_model
    from micrec_tf.retrieval import Retriever

    cfg, version_dir, ref, out, requests = cold_export
    plain_dir = export_model.export_run(
        cfg.replace({"export.fold_text": False, "export.exports_dir": str(tmp_path / "plain")}),
        log=lambda *a: None)
    num_items = len(ref[0]) + 1
    dim = cfg.model.embedding_dim
    folded, plain = _saved_variables(version_dir), _saved_variables(plain_dir)
    assert (num_items, 384) in plain.values() and (num_items, 384) not in folded.values()
    assert (num_items, dim) in folded.values()
    size = {d: os.path.getsize(os.path.join(d, "user_tower", "variables",
                                            "variables.data-00000-of-00001"))
            for d in (version_dir, plain_dir)}
    assert size[plain_dir] - size[version_dir] >= num_items * (384 - dim) * 4
    a, b = Retriever.load(version_dir), Retriever.load(plain_dir)
    assert list(a.ids) == list(b.ids)
    np.testing.assert_allclose(a.vectors, b.vectors, rtol=0, atol=1e-5)
    fn = tf.saved_model.load(os.path.join(plain_dir, "user_tower")).signatures["serving_default"]
    hlen = max(len(r["history"]) for r in requests)
    feed = {f: tf.constant([r[f] for r in requests]) for f in a.user_fields}
    feed["history"] = tf.constant([r["history"] + [""] * (hlen - len(r["history"]))
                                   for r in requests])
    plain_users = list(fn(**feed).values())[0].numpy()
    np.testing.assert_allclose(np.asarray(out["user"]), plain_users, rtol=0, atol=1e-5)

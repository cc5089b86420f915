"""Evaluation through the exported index (micrec_tf/evaluation/index_eval.py, issue 31 item 3).

References are independent of the code under test: brute force by numpy ``argsort`` of the
hand-made vectors' dot products, ScaNN's own ``search_batched`` answer, Python set overlaps.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from micrec_tf import search
from micrec_tf.config import ConfigError, load_config
from micrec_tf.evaluation import index_eval

from conftest import tiny_export_raw

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _world(num_items=400, dim=8, num_queries=30, seed=0):
    rng = np.random.default_rng(seed)
    items = rng.normal(size=(num_items, dim)).astype(np.float32)
    items[0] = 0.0  # padding row
    users = rng.normal(size=(num_queries, dim)).astype(np.float32)
    return users, items


def _brute_force_lists(users, items, k, exclude=None):
    """Per query, the k best items 1..V-1 by numpy dot product (float64), excluded ones dropped."""
    out = []
    for i, q in enumerate(users.astype(np.float64)):
        scores = items.astype(np.float64) @ q
        order = [int(j) for j in np.argsort(-scores, kind="stable") if j != 0
                 and (exclude is None or j not in exclude[i])]
        out.append(order[:k])
    return out


def _hits(lists, targets, n):
    return float(np.mean([t > 0 and t in lst[:n] for lst, t in zip(lists, targets)]))


def _targets(users, items):
    """Targets with hits at several ranks, misses and one OOV (0) target."""
    ref = _brute_force_lists(users, items, 40)
    rng = np.random.default_rng(1)
    t = []
    for i, lst in enumerate(ref):
        t.append(lst[[0, 2, 7, 15, 30][i % 5]] if i % 3 else int(rng.integers(1, len(items))))
    t[4] = 0
    return np.asarray(t, np.int64)


def _brute_force_searcher(items, k):
    params = {"mode": "brute_force", "num_neighbors": k}
    return search.build_scann(items[1:], params), params


def test_exact_index_gives_brute_force_hits_and_recall_one():
    users, items = _world()
    targets = _targets(users, items)
    ns = [1, 5, 10, 20]
    searcher, params = _brute_force_searcher(items, 20)
    out = index_eval.evaluate_with_index(users, items, targets, searcher, params, ns=ns,
                                         coverage_ns=[10])
    ref = _brute_force_lists(users, items, 20)
    for n in ns:
        assert out[f"hit@{n}"] == pytest.approx(_hits(ref, targets, n), abs=1e-12)
        assert out[f"exact_hit@{n}"] == pytest.approx(_hits(ref, targets, n), abs=1e-12)
        assert out[f"index_recall@{n}"] == pytest.approx(1.0, abs=1e-12)
    covered = {j for lst in ref for j in lst[:10]}
    assert out["coverage@10"] == pytest.approx(len(covered) / (len(items) - 1), abs=1e-12)
    assert out["index_kind"] == "scann" and out["index_recall_queries"] == len(users)
    # Some hits, some misses: the comparison above is not trivially all-0 or all-1.
    assert 0.0 < out["hit@5"] < 1.0


def test_exact_index_with_exclusions_matches_brute_force():
    users, items = _world(seed=3)
    targets = _targets(users, items)
    ref_full = _brute_force_lists(users, items, 10)
    # Exclude each query's 2nd and 4th best items, and a target for some queries.
    exclude = [{lst[1], lst[3]} | ({int(t)} if i % 4 == 0 and t > 0 else set())
               for i, (lst, t) in enumerate(zip(ref_full, targets))]
    searcher, params = _brute_force_searcher(items, 10)
    ns = [1, 3, 10]
    out = index_eval.evaluate_with_index(users, items, targets, searcher, params, ns=ns,
                                         coverage_ns=[3], exclude=[sorted(e) for e in exclude])
    ref = _brute_force_lists(users, items, 10, exclude)
    for n in ns:
        assert out[f"hit@{n}"] == pytest.approx(_hits(ref, targets, n), abs=1e-12)
        assert out[f"index_recall@{n}"] == pytest.approx(1.0, abs=1e-12)
    idx, _ = index_eval.index_top_k(users, items, 10, searcher, params,
                                    [sorted(e) for e in exclude])
    assert [list(map(int, r)) for r in idx] == ref


def test_no_searcher_is_the_exact_ranking():
    users, items = _world(seed=5)
    idx, _ = index_eval.index_top_k(users, items, 15)
    assert [list(map(int, r)) for r in idx] == _brute_force_lists(users, items, 15)


def _coarse_index(items, k):
    params = {"mode": "tree_ah", "num_neighbors": k, "num_leaves": 40, "num_leaves_to_search": 1,
              "training_sample_size": items.shape[0] - 1, "dimensions_per_block": 2,
              "anisotropic_quantization_threshold": 0.2, "reorder_k": 2 * k,
              "random_init": False}
    return search.build_scann(items[1:], params), params


def test_coarse_index_recall_is_the_overlap_of_the_two_lists():
    users, items = _world(num_items=2001, dim=16, num_queries=40, seed=7)
    targets = _targets(users, items)
    k, ns = 30, [5, 10, 30]
    searcher, params = _coarse_index(items, k)
    out = index_eval.evaluate_with_index(users, items, targets, searcher, params, ns=ns,
                                         coverage_ns=[5])
    # ScaNN's own answer for the same query-time settings, rescored by numpy (float64).
    nn, _ = searcher.search_batched(users, final_num_neighbors=k,
                                    pre_reorder_num_neighbors=max(params["reorder_k"], 2 * k),
                                    leaves_to_search=1)
    exact = _brute_force_lists(users, items, k)
    approx = []
    for q, row in zip(users.astype(np.float64), np.asarray(nn)):
        cand = [int(j) + 1 for j in row if j >= 0]
        approx.append(sorted(cand, key=lambda j: (-(items[j].astype(np.float64) @ q), j)))
    for n in ns:
        overlap = np.mean([len(set(a[:n]) & set(e[:n])) / n for a, e in zip(approx, exact)])
        assert out[f"index_recall@{n}"] == pytest.approx(overlap, abs=1e-12)
        assert out[f"hit@{n}"] == pytest.approx(_hits(approx, targets, n), abs=1e-12)
        assert out[f"exact_hit@{n}"] == pytest.approx(_hits(exact, targets, n), abs=1e-12)
    assert out["index_recall@30"] < 0.9  # the index is deliberately coarse


def test_recall_on_a_subset_of_queries():
    users, items = _world(num_items=2001, dim=16, num_queries=40, seed=7)
    targets = _targets(users, items)
    searcher, params = _coarse_index(items, 10)
    rows = np.array([0, 3, 4, 17, 39])
    full = index_eval.evaluate_with_index(users, items, targets, searcher, params, ns=[10],
                                          coverage_ns=[10])
    sub = index_eval.evaluate_with_index(users, items, targets, searcher, params, ns=[10],
                                         coverage_ns=[10], recall_rows=rows)
    sub_only = index_eval.evaluate_with_index(users[rows], items, targets[rows], searcher,
                                              params, ns=[10], coverage_ns=[10])
    assert sub["hit@10"] == full["hit@10"]  # the metrics cover every query
    assert sub["index_recall_queries"] == 5
    assert sub["index_recall@10"] == pytest.approx(sub_only["index_recall@10"], abs=1e-12)
    assert sub["exact_hit@10"] == pytest.approx(sub_only["exact_hit@10"], abs=1e-12)


def test_recall_at_n_by_hand():
    approx = np.array([[1, 2, 3], [4, 5, -1], [7, 8, 9]])
    exact = np.array([[3, 2, 9], [5, -1, -1], [-1, -1, -1]])
    got = index_eval.recall_at_n(approx, exact, [1, 2, 3])
    # N=1: {3} vs {1}: 0; {5} vs {4}: 0; row 3 has no exact item: left out.
    # N=2: {3,2} vs {1,2}: 1/2; {5} vs {4,5}: 1.  N=3: 2/3 and 1.
    assert got[1] == pytest.approx(0.0)
    assert got[2] == pytest.approx(0.75)
    assert got[3] == pytest.approx((2 / 3 + 1) / 2)
    with pytest.raises(ValueError, match="N=4"):
        index_eval.recall_at_n(approx, exact, [4])


def test_bad_vectors_are_refused():
    users, items = _world()
    with pytest.raises(ValueError, match="Received"):
        index_eval.index_top_k(users[:, :3], items, 5)
    with pytest.raises(ValueError, match="params"):
        index_eval.index_top_k(users, items, 5, searcher=object())


def test_load_export_index_reads_dump_and_checks_vocabulary(tmp_path):
    from export import item_index

    _, items = _world(num_items=301, seed=9)
    vdir = tmp_path / "1"
    (vdir / "item_embeddings").mkdir(parents=True)
    np.save(vdir / "item_embeddings" / "embeddings.npy", items[1:])
    ids = [f"i{j}" for j in range(1, 301)]
    (vdir / "item_embeddings" / "ids.txt").write_text("".join(i + "\n" for i in ids))
    searcher, params = _brute_force_searcher(items, 10)
    item_index.save_scann(searcher, params, str(vdir / "scann"))
    (vdir / "metadata.json").write_text(json.dumps({"index": {"kind": "scann"}}))
    vocab = tmp_path / "item_id.txt"
    vocab.write_text("".join(i + "\n" for i in ids))
    got, s2, p2, info = index_eval.load_export_index(str(vdir), str(vocab))
    np.testing.assert_array_equal(got[1:], items[1:])
    np.testing.assert_array_equal(got[0], 0.0)
    assert info["kind"] == "scann" and p2["mode"] == "brute_force"
    users, _ = _world(num_items=301, seed=10)
    idx, _ = index_eval.index_top_k(users, got, 10, s2, p2)
    assert [list(map(int, r)) for r in idx] == _brute_force_lists(users, items, 10)
    vocab.write_text("".join(i + "\n" for i in ids[:5] + ["other"] + ids[6:]))
    with pytest.raises(ValueError, match="line 6"):
        index_eval.load_export_index(str(vdir), str(vocab))


def test_eval_search_key():
    cfg = load_config(os.path.join(ROOT, "configs", "synthetic.yaml"))
    assert cfg.eval.search == "exact"  # the default: train's exact ranking
    assert cfg.replace({"eval.search": "index"}).eval.search == "index"
    with pytest.raises(ConfigError, match="eval.search.*'approx'"):
        cfg.replace({"eval.search": "approx"})


# ----------------------------------------------------------------------------- end to end (slow)
@pytest.fixture(scope="module")
def exported_run(tmp_path_factory):
    """A tiny synthetic run (preprocess, one epoch with the final test evaluation, ScaNN export)."""
    import subprocess
    import sys

    import yaml

    from export import export_model
    from micrec_tf.train import train

    root = tmp_path_factory.mktemp("index_eval")
    raw = tiny_export_raw(root)
    raw["eval"] = {"hit_n": [10, 50], "coverage_n": [50], "exclude_clicked": True,
                   "test_max_examples": 300}
    cfg_path = root / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    proc = subprocess.run([sys.executable, "-m", "pipelines.preprocess", "--config",
                           str(cfg_path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = load_config(str(cfg_path))
    result = train(cfg, log=lambda *a: None)
    version_dir = export_model.export_run(cfg, log=lambda *a: None)
    return cfg, str(cfg_path), result, version_dir


@pytest.mark.slow
def test_exact_search_is_trains_final_evaluation(exported_run):
    cfg, _, result, _ = exported_run
    got = index_eval.evaluate_export(cfg, log=lambda *a: None)
    for key, val in result["test"].items():
        assert got[key] == val, key  # bit for bit: the same queries, exclusions and ranking


@pytest.mark.slow
def test_index_search_through_the_export(exported_run, tmp_path):
    cfg, cfg_path, result, version_dir = exported_run
    meta = json.load(open(os.path.join(version_dir, "metadata.json")))
    assert meta["index"]["kind"] == "scann"  # 1000+ items > top_k: a real ScaNN index
    out = tmp_path / "m.json"
    assert index_eval.main(["--config", cfg_path, "--set", "eval.search=index",
                            "--out", str(out)]) == 0
    got = json.loads(out.read_text())
    assert got["search"] == "index" and got["index_kind"] == "scann"
    assert got["num_examples"] == result["test"]["num_examples"] == 300
    assert got["index_recall_queries"] == 300
    for n in (10, 50):
        # The dump holds the model's own item vectors: exact search on it is train's ranking.
        assert got[f"exact_hit@{n}"] == pytest.approx(result["test"][f"hit@{n}"], abs=1e-6)
        assert 0.0 < got[f"index_recall@{n}"] <= 1.0

"""pipelines/title_neighbours.py: exact / ScaNN / taxonomy top-k and the Beam job end to end."""
import json
import re
import os
import math

import pytest

import micrec_tf  # noqa: F401  (before tensorflow)
import numpy as np

from pipelines import title_neighbours as tn


def brute_force(emb, k):
    """Reference top-k: full score matrix, self removed, order (score desc, index asc)."""
    s = emb @ emb.T
    np.fill_diagonal(s, -np.inf)
    idx = np.arange(len(emb))
    out = []
    for i in range(len(emb)):
        order = np.lexsort((idx, -s[i].astype(np.float64)))[:min(k, len(emb) - 1)]
        out.append((order, s[i, order]))
    return out


def clustered(n, d, clusters, seed, noise=0.35):
    rs = np.random.RandomState(seed)
    centers = rs.randn(clusters, d)
    x = centers[rs.randint(0, clusters, n)] + noise * rs.randn(n, d)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def recall(approx, exact):
    return np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(approx, exact)])


# ------------------------------------------------------------------------------ pure top-k

def test_exact_equals_brute_force_with_ties():
    # Small integers: every product and sum is exact in float32, so ties are real and plentiful.
    emb = np.random.RandomState(0).randint(-2, 3, size=(300, 6)).astype(np.float32)
    want = brute_force(emb, 10)
    for block in (None, 1, 37, 300):
        nbrs, scores = tn.exact_top_k(emb, 10, block_rows=block)
        for i, (w_idx, w_sc) in enumerate(want):
            np.testing.assert_array_equal(nbrs[i], w_idx, err_msg=f"row {i} block {block}")
            np.testing.assert_array_equal(scores[i], w_sc)


def test_exact_equals_brute_force_real_vectors():
    emb = clustered(800, 48, 20, seed=1)
    nbrs, scores = tn.exact_top_k(emb, 10, block_rows=100)
    for i, (w_idx, w_sc) in enumerate(brute_force(emb, 10)):
        np.testing.assert_array_equal(nbrs[i], w_idx)
        np.testing.assert_allclose(scores[i], w_sc, atol=1e-6)
    assert not (nbrs == np.arange(800)[:, None]).any()


def test_exact_small_catalogues():
    assert tn.exact_top_k(np.ones((1, 4), np.float32), 10)[0].shape == (1, 0)
    nbrs, _ = tn.exact_top_k(np.eye(3, dtype=np.float32), 10)
    assert nbrs.tolist() == [[1, 2], [0, 2], [0, 1]]


def test_scann_recall_and_determinism():
    emb = clustered(3000, 32, 30, seed=2)
    exact = [w for w, _ in brute_force(emb, 10)]
    nbrs, scores, mode = tn.cosine_neighbours(emb, 10, exact_max_items=1000)
    assert mode == "scann"
    assert recall(nbrs, exact) >= 0.95
    assert not (nbrs == np.arange(3000)[:, None]).any()
    assert (np.diff(scores, axis=1) <= 0).all()
    nbrs2, scores2, _ = tn.cosine_neighbours(emb, 10, exact_max_items=1000)
    np.testing.assert_array_equal(nbrs, nbrs2)
    np.testing.assert_array_equal(scores, scores2)


def taxonomy_brute_force(tag_lists, k, keys):
    sets = [{t for t in tags if t > 0} for tags in tag_lists]
    out = []
    for i, a in enumerate(sets):
        cands = []
        for j, b in enumerate(sets):
            shared = len(a & b)
            if j == i or not shared:
                continue
            jac = shared / len(a | b)
            h = int(tn._pair_hash(np.array([keys[i]]), np.array([keys[j]]))[0])
            cands.append((-jac, -shared, h, keys[j], j, jac))
        cands.sort()
        out.append(([c[4] for c in cands[:k]], [c[5] for c in cands[:k]]))
    return out


def test_taxonomy_equals_brute_force():
    rs = np.random.RandomState(3)
    tags = [list(rs.randint(0, 9, size=rs.randint(0, 4))) for _ in range(200)]
    keys = np.arange(200) * 3 + 5
    got = tn.taxonomy_top_k(tags, 6, keys=keys)
    for i, ((g_idx, g_sc), (w_idx, w_sc)) in enumerate(zip(got, taxonomy_brute_force(tags, 6, keys))):
        assert g_idx.tolist() == w_idx, i
        np.testing.assert_allclose(g_sc, w_sc, rtol=1e-6)
    # An item without (real) tags gets nothing.
    assert [len(c) for c, _ in tn.taxonomy_top_k([[0], [1, 2], [2]], 5)] == [0, 1, 1]


# --------------------------------------------------------------------------------- the job

def write_items(path, rows):
    """items.jsonl in the writer's format (pipelines/items.py): keys a test row omits default."""
    os.makedirs(os.path.join(path, "items"), exist_ok=True)
    with open(os.path.join(path, "items", "items.jsonl"), "w", encoding="utf-8") as fh:
        for row in rows:
            full = {"item_id": f"m{row['item']}", "title": "", "tags": [], "provider": 0,
                    "extra": {}}
            full.update(row)
            fh.write(json.dumps(full) + "\n")


def read_neighbours(art):
    with open(os.path.join(art, "title_neighbours", "title_neighbours.jsonl"),
              encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


@pytest.fixture()
def config_path(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("name: tn-test\n", encoding="utf-8")
    return str(path)


TITLES = ["Toy Story (1995)", "Toy Story 2 (1999)", "", "Heat (1995)", "\t", "   ",
          "GoldenEye (1995)", "\u200b\u200d", "Tomorrow Never Dies (1997)", "😀🎬",
          "Misérables, Les (1995)", "Les Misérables (1998)", "Heat (1995)",
          "Crouching Tiger, Hidden Dragon (Wo hu cang long) (2000)", "卧虎藏龙 (2000)"]
EMPTY = {3, 5, 6, 8}  # "", tab, blank, zero-width only
NO_TOKENS = {10}  # only [UNK]


def title_rows():
    rows = []
    for i, t in enumerate(TITLES, 1):
        rows.append({"item": i, "item_id": f"m{i}", "title": t, "tags": [], "provider": 0,
                     "extra": {}})
    return rows[::-1]  # unsorted on purpose


# Float32 rounding between two batch plans of the encoder (see tests/test_text.py): unit vectors
# and their cosines agree to well within 1e-6.
BATCHING_ATOL = 1e-6


def assert_top_k_up_to_ties(emb, items, row, k, tol):
    """``row`` (a title_neighbours.jsonl line) is a top ``k`` of the embeddings ``emb`` (of
    ``items``) up to ``tol``: each neighbour's cosine is within ``tol`` of the k-best cosine at its
    rank and of the score written beside it, so only near-tied items may trade places."""
    pos = {int(item): i for i, item in enumerate(items)}
    i = pos[row["item"]]
    cos = emb.astype(np.float64) @ emb[i].astype(np.float64)
    cos[i] = -np.inf
    best = np.sort(cos)[::-1][:k]
    nbrs = [pos[n] for n in row["neighbours"]]
    assert len(nbrs) == len(set(nbrs)) == len(best) and i not in nbrs, row
    np.testing.assert_allclose(cos[nbrs], best, rtol=0, atol=tol, err_msg=str(row))
    np.testing.assert_allclose(row["scores"], cos[nbrs], rtol=0, atol=tol, err_msg=str(row))


def test_title_job(tmp_path, config_path, monkeypatch, capsys):
    from micrec_tf.text.encoder import TitleEncoder

    art = str(tmp_path / "art")
    write_items(art, title_rows())
    assert tn.main(["--config", config_path, "--artifacts_dir", art,
                    "--set", "semantic.top_k=4"]) == 0
    rows = read_neighbours(art)
    assert [r["item"] for r in rows] == list(range(1, len(TITLES) + 1))
    for r in rows:
        if r["item"] in EMPTY | NO_TOKENS:
            assert r["neighbours"] == [] and r["scores"] == [], r
        else:
            assert len(r["neighbours"]) == 4 and r["item"] not in r["neighbours"]
            assert not set(r["neighbours"]) & (EMPTY | NO_TOKENS)
    stats = json.load(open(os.path.join(art, "title_neighbours", "stats.json")))
    assert stats["skipped"] == {"empty_title": len(EMPTY), "no_known_tokens": len(NO_TOKENS)}
    assert stats["mode"] == "exact" and math.isfinite(stats["timing"]["titles_per_s"])

    # Embeddings: as the encoder gives them; neighbours: brute force on them.
    emb = np.load(os.path.join(art, "title_embeddings", "embeddings.npy"))
    items = np.load(os.path.join(art, "title_embeddings", "items.npy"))
    kept = [i for i in range(1, len(TITLES) + 1) if i not in EMPTY | NO_TOKENS]
    assert items.tolist() == kept
    direct = TitleEncoder(max_length=64).encode([TITLES[i - 1] for i in kept])
    np.testing.assert_allclose(emb, direct, atol=1e-6)
    by_item = {r["item"]: r for r in rows}
    for row, (w_idx, w_sc) in zip(items, brute_force(emb, 4)):
        assert by_item[int(row)]["neighbours"] == items[w_idx].tolist()
        np.testing.assert_allclose(by_item[int(row)]["scores"], w_sc, atol=1e-6)
    # Identical titles are each other's best neighbour.
    assert by_item[4]["neighbours"][0] == 13 and by_item[4]["scores"][0] == pytest.approx(1.0)

    # Deterministic for one batch plan on one machine: a re-run with the same settings writes
    # the same bytes.
    def snapshot():
        return {name: open(os.path.join(art, *name.split("/")), "rb").read()
                for name in ("title_neighbours/title_neighbours.jsonl",
                             "title_embeddings/embeddings.npy", "title_embeddings/items.npy")}

    before = snapshot()
    assert tn.main(["--config", config_path, "--artifacts_dir", art,
                    "--set", "semantic.top_k=4"]) == 0
    for name, data in snapshot().items():
        assert data == before[name], name
    # Other Beam batches (of 3): the same items and, up to float32 rounding, the same vectors and
    # neighbours. Not the same bits: oneDNN picks its kernels by shape and instruction set, and on
    # an AVX2-only CPU the vectors differ by up to ~6e-8 between batch sizes, so near-tied
    # neighbours may trade places. With a progress line after every batch of 3, the counts grow
    # by batches up to the catalogue's 15 titles.
    monkeypatch.setattr(tn, "PROGRESS_EVERY_S", 1e-9)
    capsys.readouterr()
    tn.main(["--config", config_path, "--artifacts_dir", art,
             "--set", "semantic.top_k=4", "--set", "semantic.batch_size=3"])
    assert np.load(os.path.join(art, "title_embeddings", "items.npy")).tolist() == kept
    np.testing.assert_allclose(np.load(os.path.join(art, "title_embeddings", "embeddings.npy")),
                               emb, rtol=0, atol=BATCHING_ATOL)
    rerun = read_neighbours(art)
    assert [r["item"] for r in rerun] == [r["item"] for r in rows]
    for first, again in zip(rows, rerun):
        if not first["neighbours"]:
            assert again["neighbours"] == [] and again["scores"] == [], again
        else:
            assert_top_k_up_to_ties(emb, items, again, 4, BATCHING_ATOL)
    line = r"\[title_neighbours\] encoded (\d+) of 15 titles \(\d+/s, about \d+ min left\)"
    lines = re.findall(line, capsys.readouterr().err)
    counts = [int(n) for n in lines]
    assert counts and all(c % 3 == 0 or c == 15 for c in counts) and max(counts) <= 15


def test_items_reader_is_strict(tmp_path):
    art = str(tmp_path / "art")
    write_items(art, [{"item": 1}, {"item": 2, "title": None}])
    with pytest.raises(ValueError, match=r"items\.jsonl:2: item 2 has bad \['title'\]"):
        tn.read_items(os.path.join(art, "items", "items.jsonl"))
    write_items(art, [{"item": 1}, {"item": 1}])
    with pytest.raises(ValueError, match="item 1 appears twice"):
        tn.read_items(os.path.join(art, "items", "items.jsonl"))


def test_taxonomy_job(tmp_path, config_path):
    art = str(tmp_path / "art")
    tags = [[1, 2], [1, 2], [2, 3], [], [3], [1, 2, 3], [4], []]
    write_items(art, [{"item": i + 1, "item_id": f"m{i + 1}", "title": "", "tags": t}
                      for i, t in enumerate(tags)])
    tn.main(["--config", config_path, "--artifacts_dir", art,
             "--set", "semantic.source=taxonomy", "--set", "semantic.top_k=3"])
    rows = {r["item"]: r for r in read_neighbours(art)}
    keys = np.arange(1, len(tags) + 1)
    for i, (w_idx, w_sc) in enumerate(taxonomy_brute_force(tags, 3, keys)):
        assert rows[i + 1]["neighbours"] == keys[w_idx].tolist()
        np.testing.assert_allclose(rows[i + 1]["scores"], w_sc, atol=1e-6)
    assert rows[1]["neighbours"][0] == 2 and rows[1]["scores"][0] == 1.0
    assert rows[4]["neighbours"] == rows[7]["neighbours"] == rows[8]["neighbours"] == []
    stats = json.load(open(os.path.join(art, "title_neighbours", "stats.json")))
    assert stats["skipped"] == {"no_tags": 2}
    assert not os.path.exists(os.path.join(art, "title_embeddings"))


def test_vectors_job_tsv(tmp_path, config_path):
    art = str(tmp_path / "art")
    write_items(art, [{"item": i, "item_id": f"m{i}", "title": "x"} for i in range(1, 7)])
    vec_path = tmp_path / "vecs.tsv"
    vec_path.write_text("# item_id\tvector\n"
                        "m1\t1 0 0\nm2\t0.9 0.1 0\nm3\t0,1,0\nm4\t0 0 0\n"
                        "m6\t1 1 0\nunknown\t1 2 3\n\n", encoding="utf-8")
    tn.main(["--config", config_path, "--artifacts_dir", art, "--set", "semantic.source=vectors",
             "--set", f"semantic.vectors_path={vec_path}", "--set", "semantic.top_k=2"])
    rows = {r["item"]: r for r in read_neighbours(art)}
    assert rows[1]["neighbours"] == [2, 6]
    assert rows[3]["neighbours"] == [6, 2]
    assert rows[4]["neighbours"] == [] and rows[5]["neighbours"] == []
    stats = json.load(open(os.path.join(art, "title_neighbours", "stats.json")))
    assert stats["skipped"] == {"no_vector": 1, "zero_vector": 1}
    assert stats["unknown_vector_ids"] == 1
    meta = json.load(open(os.path.join(art, "title_embeddings", "metadata.json")))
    assert meta["source"] == "vectors" and meta["count"] == 4 and meta["dim"] == 3


def test_vectors_job_scann(tmp_path, config_path):
    art = str(tmp_path / "art")
    n = 2500
    write_items(art, [{"item": i + 1, "item_id": f"v{i}"} for i in range(n)])
    emb = clustered(n, 24, 25, seed=4)
    np.savez(tmp_path / "vecs.npz", item_ids=np.array([f"v{i}" for i in range(n)]),
             vectors=emb * 3.0)
    args = ["--config", config_path, "--artifacts_dir", art, "--set", "semantic.source=vectors",
            "--set", f"semantic.vectors_path={tmp_path / 'vecs.npz'}",
            "--set", "semantic.exact_max_items=500"]
    tn.main(args)
    stats = json.load(open(os.path.join(art, "title_neighbours", "stats.json")))
    assert stats["mode"] == "scann" and stats["with_neighbours"] == n
    first = open(os.path.join(art, "title_neighbours", "title_neighbours.jsonl"), "rb").read()
    got = [np.array(r["neighbours"]) - 1 for r in read_neighbours(art)]
    assert recall(got, [w for w, _ in brute_force(emb, 10)]) >= 0.95
    tn.main(args)
    assert open(os.path.join(art, "title_neighbours", "title_neighbours.jsonl"), "rb").read() \
        == first


def test_missing_items_file(tmp_path, config_path):
    with pytest.raises(FileNotFoundError, match="pipelines.preprocess"):
        tn.main(["--config", config_path, "--artifacts_dir", str(tmp_path / "nothing")])


def test_unknown_flag_is_one_line_error_and_beam_flags_pass(tmp_path, config_path, capsys):
    """A typo is neither ours nor Beam's: exit 2 naming it, nothing written; Beam's own flags
    (and --artifacts_dir) still work."""
    from micrec_tf import cli

    art = str(tmp_path / "art")
    write_items(art, [{"item": i + 1, "item_id": f"m{i + 1}", "title": "", "tags": [1 + i % 2]}
                      for i in range(4)])
    base = ["--config", config_path, "--artifacts_dir", art, "--set", "semantic.source=taxonomy"]
    capsys.readouterr()
    assert cli.run(tn.main, base + ["--sett", "semantic.top_k=2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'--sett'" in err[0] and "did you mean --set?" in err[0], err
    assert not os.path.exists(os.path.join(art, "title_neighbours"))
    assert cli.run(tn.main, base + ["--runner=DirectRunner", "--direct_num_workers=2",
                                    "--project=x"]) == 0
    assert len(read_neighbours(art)) == 4


def test_sampled_recall_against_brute_force_lists():
    """sampled_recall: exact lists score 1; lists with half of each row replaced by far items
    score the share a pure-numpy brute force says they keep."""
    from pipelines.title_neighbours import sampled_recall

    rng = np.random.default_rng(3)
    emb = rng.normal(size=(400, 8)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    s = emb @ emb.T
    np.fill_diagonal(s, -np.inf)
    exact = np.argsort(-s, axis=1, kind="stable")[:, :6]
    assert sampled_recall(emb, exact, 6, sample=400)["recall"] == 1.0
    worst = np.argsort(s, axis=1, kind="stable")[:, :3]  # the 3 least similar of each row
    mixed = np.concatenate([exact[:, :3], worst], axis=1)
    got = sampled_recall(emb, mixed, 6, sample=400)
    assert got == {"rows": 400, "k": 6, "recall": 0.5}

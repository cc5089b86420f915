"""Issue 29: title neighbours merged for new items (``merge_title_neighbours``, ``merge_top_k`` of
pipelines.title_neighbours) against brute force over all vectors written here.

Vectors with 4 entries of +-1 out of 8 normalise to +-0.5 exactly, so every dot product is an
exact multiple of 0.25 in any summation order: ties are exact (duplicated vectors, equal scores at
the cut) and the brute force (Python sums, sorted by score desc, then item index asc, the
project's tie rule) is the same in every kernel.

- the merged lists equal the brute force on all vectors and the bytes of a full recompute;
- an old item's line is byte-identical to the previous one exactly when no new item enters its
  top k (a new item tying the k-th score does not: its index is larger);
- what a merge refuses (taxonomy, another top_k, an old item changed);
- (slow) the MiniLM title path: only the new titles are encoded, the result matches a full run.
"""
import json
import os

import numpy as np
import pytest

import micrec_tf  # noqa: F401  (before tensorflow)
from micrec_tf.config import from_dict
from pipelines import title_neighbours as tn

K = 4
D = 8


def _vectors(n, rng):
    out = np.zeros((n, D), np.float32)
    for r in range(n):
        out[r, rng.choice(D, 4, replace=False)] = rng.choice([-1.0, 1.0], 4)
    return out


def _items(n, first=1):
    return [{"item": i, "item_id": f"i{i}", "title": f"title {i}", "tags": [], "provider": 0,
             "extra": {}} for i in range(first, first + n)]


def _write_items(folder, rows):
    os.makedirs(os.path.join(folder, "items"), exist_ok=True)
    with open(os.path.join(folder, "items", "items.jsonl"), "w", encoding="utf-8") as fh:
        fh.write("".join(json.dumps(r) + "\n" for r in rows))


def _lines(folder):
    with open(os.path.join(folder, tn.NEIGHBOURS_DIR, tn.NEIGHBOURS_FILE), encoding="utf-8") as fh:
        return {json.loads(line)["item"]: line for line in fh}


def _brute_force(vecs, k):
    """{item: [(neighbour, score)]} over items with a nonzero vector: exact Python sums of the
    normalised (+-0.5) entries, sorted by score desc, then item asc; the item itself excluded."""
    unit = {i: [x / 2.0 for x in v] for i, v in vecs.items() if any(v)}
    out = {}
    for i, a in unit.items():
        scored = [(-sum(x * y for x, y in zip(a, b)), j) for j, b in unit.items() if j != i]
        out[i] = [(j, -s) for s, j in sorted(scored)[:k]]
    return out


@pytest.fixture(scope="module")
def grown(tmp_path_factory):
    """prev: 40 items; out: 40 + 12 merged; full: the same 52 recomputed. Vectors file for all:
    old item 5 and new item 50 have none, old 7 and new 47 a zero vector, duplicates on both
    sides (ties)."""
    tmp = str(tmp_path_factory.mktemp("grow"))
    rng = np.random.default_rng(7)
    n_old, n_new = 40, 12
    vecs = _vectors(n_old + n_new, rng)
    vecs[[10, 20, 41, 45]] = vecs[[3, 3, 3, 30]]  # row r = item r + 1: duplicated vectors
    vecs[[6, 46]] = 0.0                                # items 7 and 47: zero vectors
    keep = [r for r in range(n_old + n_new) if r not in (4, 49)]  # items 5 and 50: no vector
    path = os.path.join(tmp, "vectors.npz")
    np.savez(path, item_ids=np.array([f"i{r + 1}" for r in keep]), vectors=vecs[keep])
    cfg = from_dict({"name": "grow", "semantic": {"source": "vectors", "vectors_path": path,
                                                  "top_k": K}})
    old_rows, all_rows = _items(n_old), _items(n_old + n_new)
    prev, out, full = (os.path.join(tmp, x) for x in ("prev", "out", "full"))
    _write_items(prev, old_rows)
    tn.run(cfg, artifacts_dir=prev, verbose=False)
    for folder in (out, full):
        _write_items(folder, all_rows)
    stats = tn.merge_title_neighbours(prev, None, out, cfg)
    tn.run(cfg, artifacts_dir=full, verbose=False)
    vec_of = {r + 1: vecs[r].tolist() for r in keep}
    return {"prev": prev, "out": out, "full": full, "cfg": cfg, "stats": stats,
            "old_vecs": {i: v for i, v in vec_of.items() if i <= n_old}, "vecs": vec_of,
            "n_old": n_old, "n_new": n_new}


def test_merged_lists_equal_brute_force_over_all_vectors(grown):
    want = _brute_force(grown["vecs"], K)
    lines = _lines(grown["out"])
    assert sorted(lines) == list(range(1, grown["n_old"] + grown["n_new"] + 1))
    for item, line in lines.items():
        rec = json.loads(line)
        got = list(zip(rec["neighbours"], rec["scores"]))
        assert got == want.get(item, []), item
    assert not json.loads(lines[50])["neighbours"] and not json.loads(lines[47])["neighbours"]


def test_merged_files_are_the_bytes_of_a_full_recompute(grown):
    for rel in (os.path.join(tn.NEIGHBOURS_DIR, tn.NEIGHBOURS_FILE),
                os.path.join(tn.EMBEDDINGS_DIR, "embeddings.npy"),
                os.path.join(tn.EMBEDDINGS_DIR, "items.npy"),
                os.path.join(tn.EMBEDDINGS_DIR, "metadata.json")):
        with open(os.path.join(grown["out"], rel), "rb") as a, \
                open(os.path.join(grown["full"], rel), "rb") as b:
            assert a.read() == b.read(), rel


def test_an_old_line_changes_exactly_where_a_new_item_enters_its_top_k(grown):
    before, after = _lines(grown["prev"]), _lines(grown["out"])
    old_top = _brute_force(grown["old_vecs"], K)
    all_top = _brute_force(grown["vecs"], K)
    n_old = grown["n_old"]
    changed = set()
    tie_kept_out = 0
    for item in range(1, n_old + 1):
        entered = any(j > n_old for j, _ in all_top.get(item, []))
        assert (after[item] != before[item]) == entered, item
        changed |= {item} if entered else set()
        if not entered and len(old_top.get(item, [])) == K:
            kth = old_top[item][-1][1]
            a = [x / 2.0 for x in grown["vecs"][item]]
            tie_kept_out += any(sum(x * y / 2.0 for x, y in zip(a, grown["vecs"][j])) == kth
                                for j in range(n_old + 1, n_old + grown["n_new"] + 1)
                                if j in grown["vecs"] and any(grown["vecs"][j]))
    assert 0 < len(changed) < n_old - 2  # both kinds occur
    assert tie_kept_out  # a new item tying an old k-th score stays out, the line unchanged
    assert grown["stats"]["changed_old_lists"] == len(changed)
    assert grown["stats"]["new_items"] == grown["n_new"]


def test_merge_top_k_equals_exact_top_k_on_random_tied_vectors():
    rng = np.random.default_rng(1)
    for _ in range(25):
        m = int(rng.integers(2, 30))
        n_old = int(rng.integers(1, m + 1))
        k = int(rng.integers(1, 6))
        emb = _vectors(m, rng) / 2.0
        dup = rng.integers(0, m, m // 3)
        emb[rng.integers(0, m, m // 3)] = emb[dup]
        unit = {r + 1: (emb[r] * 2).tolist() for r in range(m)}
        want = _brute_force(unit, k)  # items = rows + 1
        old = _brute_force({i: v for i, v in unit.items() if i <= n_old}, k)
        old_lists = np.full((n_old, k), -1, np.int64)
        for i, lst in old.items():
            old_lists[i - 1, :len(lst)] = [j - 1 for j, _ in lst]
        changed, onb, osc, nnb, nsc = tn.merge_top_k(emb, n_old, old_lists, k, block_rows=3)
        for r in range(m):
            if r < n_old and not changed[r]:
                got = [j - 1 for j, _ in old[r + 1]]
                assert all(j < n_old for j in got)
            else:
                nb, sc = (onb[r], osc[r]) if r < n_old else (nnb[r - n_old], nsc[r - n_old])
                got = nb.tolist()
                assert sc.tolist() == [s for _, s in want[r + 1]]
            assert got == [j - 1 for j, _ in want[r + 1]], (r, n_old, k)


def test_merge_refuses_taxonomy_another_top_k_and_a_changed_old_item(grown, tmp_path):
    base = {"name": "grow", "semantic": {"source": "vectors", "top_k": K,
                                         "vectors_path": grown["cfg"].semantic.vectors_path}}
    out = str(tmp_path / "x")
    rows = _items(grown["n_old"] + 1)
    _write_items(out, rows)
    for semantic, match in (({"source": "taxonomy"}, "must be 'title' or 'vectors'"),
                            ({"top_k": K + 1}, "semantic.top_k must be 4")):
        cfg = from_dict({**base, "semantic": {**base["semantic"], **semantic}})
        with pytest.raises(ValueError, match=match):
            tn.merge_title_neighbours(grown["prev"], None, out, cfg)
    rows[2]["title"] = "renamed"
    _write_items(out, rows)
    with pytest.raises(ValueError, match="item 3 .* differs"):
        tn.merge_title_neighbours(grown["prev"], None, out, grown["cfg"])


@pytest.mark.slow
def test_title_path_encodes_only_new_titles_and_matches_a_full_run(tmp_path):
    """MiniLM (Beam): a merge over 6 new titles against a full run over all 18."""
    titles = ["red apple pie", "green apple tart", "chocolate cake", "football match report",
              "tennis final score", "basketball playoffs", "stock market falls", "bank rates rise",
              "election results", "mountain hiking trail", "beach holiday guide", "city break",
              "apple crumble recipe", "world cup final", "interest rates cut", "ski resort deals",
              "cheese cake", "rugby match report"]
    rows = [{"item": i + 1, "item_id": f"t{i + 1}", "title": t, "tags": [], "provider": 0,
             "extra": {}} for i, t in enumerate(titles)]
    cfg = from_dict({"name": "titles", "semantic": {"source": "title", "top_k": 3,
                                                    "batch_size": 8}})
    prev, out, full = (str(tmp_path / x) for x in ("prev", "out", "full"))
    _write_items(prev, rows[:12])
    tn.run(cfg, artifacts_dir=prev, verbose=False)
    _write_items(out, rows)
    _write_items(full, rows)
    stats = tn.merge_title_neighbours(prev, None, out, cfg)
    tn.run(cfg, artifacts_dir=full, verbose=False)
    assert stats["new_items"] == 6 and stats["new_embedded"] == 6
    a = np.load(os.path.join(out, tn.EMBEDDINGS_DIR, "embeddings.npy"))
    b = np.load(os.path.join(full, tn.EMBEDDINGS_DIR, "embeddings.npy"))
    prev_emb = np.load(os.path.join(prev, tn.EMBEDDINGS_DIR, "embeddings.npy"))
    assert np.array_equal(a[:12], prev_emb)  # old vectors reused, never re-encoded
    np.testing.assert_allclose(a, b, atol=1e-6)
    merged, recomputed, before = _lines(out), _lines(full), _lines(prev)
    for item in range(1, 19):
        x, y = json.loads(merged[item]), json.loads(recomputed[item])
        assert x["neighbours"] == y["neighbours"], item
        np.testing.assert_allclose(x["scores"], y["scores"], atol=2e-6)
        if item <= 12 and all(j <= 12 for j in x["neighbours"]):
            assert merged[item] == before[item]
    # apple crumble (13) is among the apple items' neighbours: an old list changed
    assert any(13 in json.loads(merged[i])["neighbours"] for i in (1, 2))


def test_command_line_merges_with_previous_artifacts(grown, tmp_path, capsys):
    out = str(tmp_path / "cli")
    _write_items(out, _items(grown["n_old"] + grown["n_new"]))
    config = tmp_path / "grow.yaml"
    config.write_text(json.dumps({"name": "grow", "semantic": {
        "source": "vectors", "top_k": K, "vectors_path": grown["cfg"].semantic.vectors_path}}))
    assert tn.main(["--config", str(config), "--artifacts_dir", out,
                    "--previous_artifacts", grown["prev"]]) == 0
    assert "12 new items" in capsys.readouterr().out
    assert _lines(out) == _lines(grown["full"])

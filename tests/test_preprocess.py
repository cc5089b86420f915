"""The Beam preprocessing job against independent pure-Python references (tiny data, DirectRunner).

The pipeline runs once per configuration (module-scoped fixtures): global_time twice (the second
run checks byte-identical output) and leave_last_out once.
"""
import collections
import glob
import gzip
import json
import os
import random

import pytest

import micrec_tf  # noqa: F401  (before tensorflow)
from micrec_tf.config import from_dict
from micrec_tf.data import schema
from conftest import read_examples
from pipelines import cooccurrence, options, preprocess
from pipelines.split import target_ranks

H = 20
WINDOW = 3600
T0 = 1_600_000_000
USER_FIELDS = ("gender", "age")
EXTRA_FIELDS = ("year",)


class TsvAdapter(schema.Adapter):
    """Test-local canonical TSV reader (independent of micrec_tf.data.adapters)."""

    name = "test_tsv"
    interaction_files = schema.SourceFiles(("interactions*.tsv", "interactions*.tsv.gz"))
    item_files = schema.SourceFiles(("items.tsv",))
    user_files = schema.SourceFiles(("users.tsv",), encoding="latin-1")
    user_fields = USER_FIELDS
    item_extra_fields = EXTRA_FIELDS

    def parse_interaction(self, line):
        if not line or line.startswith("user_id\t"):
            return []
        u, i, ts = schema.split_fields(line, "\t", 3)
        return [schema.Interaction(schema.require_id(u, line, "user_id"),
                                   schema.require_id(i, line, "item_id"),
                                   schema.parse_timestamp(ts, line))]

    def parse_item(self, line):
        if not line or line.startswith("item_id\t"):
            return []
        i, title, tags, provider, year = schema.split_fields(line, "\t", 5)
        return [schema.Item(schema.require_id(i, line, "item_id"), title,
                            tuple(t for t in tags.split("|") if t), provider, {"year": year})]

    def parse_user(self, line):
        if not line or line.startswith("user_id\t"):
            return []
        u, gender, age = schema.split_fields(line, "\t", 3)
        return [schema.User(schema.require_id(u, line, "user_id"),
                            {"gender": gender, "age": age})]


BAD_ROWS = {  # (file, row) -> reason
    ("interactions", "u01\ti01"): "wrong_field_count",
    ("interactions", "u01\ti01\tsoon"): "bad_timestamp",
    ("interactions", "u01\ti01\t-5"): "bad_timestamp",
    ("interactions", "\ti01\t1600000000"): "empty_id",
    ("interactions", "u01\tnot_an_item\t1600000000"): "unknown_item",
    ("items", "i99\tno fields"): "wrong_field_count",
    ("items", " \tEmpty id\tt1\tp1\t1990"): "empty_id",
    ("users", "u98\tM"): "wrong_field_count",
    ("users", "\tF\t25"): "empty_id",
}


def make_data(root):
    """Writes the raw files; returns the valid interactions [(user, item, ts)] in input order
    (the file the adapter lists first, then line order): the tie rule of equal timestamps."""
    rng = random.Random(3)
    tags = [f"t{k}" for k in range(6)]
    items = []
    for k in range(40):
        item_tags = rng.sample(tags, rng.randint(1, 3)) if k % 13 else []
        items.append((f"i{k:02d}", f"Title é {k}", "|".join(item_tags), f"p{k % 4}",
                      str(1990 + k % 5)))
    users = [(f"u{k:02d}", rng.choice("MF"), str(rng.choice([18, 25, 35, 45, 56])))
             for k in range(25)]
    users[3] = ("u03", "Ö", "25")  # latin-1 profile value
    events = []
    # Hand-made co-occurrence edge cases early in time (training period).
    t = T0
    events += [("uA", "i01", t), ("uA", "i02", t + 3600), ("uA", "i03", t + 3600 + 3601)]
    events += [("uB", "i05", t + 100), ("uB", "i06", t + 110), ("uB", "i05", t + 120),
               ("uB", "i07", t + 120)]  # same timestamp: input order
    gaps = [0, 5, 30, 600, 1800, 3599, 3600, 3601, 7200, 86400]
    for u in [u[0] for u in users] + ["u25", "u26"]:  # u25, u26 have no profile row
        ts = T0 + rng.randint(0, 40 * 86400)
        for _ in range(rng.randint(6, 26)):
            events.append((u, f"i{rng.randint(0, 35):02d}", ts))
            ts += rng.choice(gaps)
    # Late clicks on items nobody clicked before (OOV in test); i36, i37 are never clicked.
    last = max(e[2] for e in events)
    events += [("u01", "i38", last + 10), ("u02", "i39", last + 20), ("u02", "i38", last + 30)]
    # Files.
    with open(os.path.join(root, "items.tsv"), "w", encoding="utf-8") as fh:
        fh.write("item_id\ttitle\ttags\tprovider\tyear\n")
        rows = ["\t".join(r) for r in items if r[0] not in ("i38", "i39")]
        rows += ["\t".join(r) for r in items if r[0] in ("i38", "i39")]
        rows += [row for (src, row) in BAD_ROWS if src == "items"]
        fh.write("\n".join(rows) + "\n\n")
    with open(os.path.join(root, "users.tsv"), "wb") as fh:
        rows = ["user_id\tgender\tage"] + ["\t".join(r) for r in users]
        rows += [row for (src, row) in BAD_ROWS if src == "users"]
        fh.write(("\r\n".join(rows) + "\r\n").encode("latin-1"))
    shuffled = list(events)
    rng.shuffle(shuffled)
    lines = [f"{u}\t{i}\t{ts}" for u, i, ts in shuffled]
    bad = [row for (src, row) in BAD_ROWS if src == "interactions"]
    half = len(lines) // 2
    with open(os.path.join(root, "interactions-a.tsv"), "w", encoding="utf-8") as fh:
        fh.write("user_id\titem_id\ttimestamp\n" + "\n".join(lines[:half] + bad[:2]) + "\n")
    with gzip.open(os.path.join(root, "interactions-b.tsv.gz"), "wt", encoding="utf-8") as fh:
        fh.write("user_id\titem_id\ttimestamp\n" + "\n".join(lines[half:] + bad[2:]) + "\n")
    return shuffled


def make_cfg(out_root, data_dir, split="global_time", **pre):
    pre = {"split": split, "num_shards": 2, "max_tags": 3, **pre}
    return from_dict({"name": "t", "artifacts_root": str(out_root),
                      "data": {"dataset": "canonical", "data_dir": str(data_dir)},
                      "preprocess": pre})


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("raw")
    events = make_data(str(root))
    return str(root), events


def _run(data, out_root, split="global_time", **pre):
    cfg = make_cfg(out_root, data[0], split, **pre)
    stats = preprocess.run(cfg, ["--direct_num_workers=1"], adapter=TsvAdapter(),
                           data_dir=data[0], verbose=False)
    return cfg.artifacts_dir, stats


@pytest.fixture(scope="module")
def gt(data, tmp_path_factory):
    return _run(data, tmp_path_factory.mktemp("gt"))


@pytest.fixture(scope="module")
def llo(data, tmp_path_factory):
    return _run(data, tmp_path_factory.mktemp("llo"), split="leave_last_out")


# ------------------------------------------------------------------------------- references

def ref_split(events, split, fractions=(0.8, 0.1, 0.1)):
    """global_time: ({(user, item, ts): split}, boundaries) from a plain global sort;
    leave_last_out: ([((user, item, ts), split)], None) from a per-user stable sort by time
    (``events`` in input order: equal timestamps keep it)."""
    out = {}
    if split == "global_time":
        ts = sorted(e[2] for e in events)
        n = len(ts)
        c1 = int(fractions[0] * n + 0.5)
        c2 = int((fractions[0] + fractions[1]) * n + 0.5)
        b1 = ts[c1] if c1 < n else float("inf")
        b2 = ts[c2] if c2 < n else float("inf")
        for e in events:
            out[e] = "train" if e[2] < b1 else ("valid" if e[2] < b2 else "test")
        return out, (b1, b2)
    by_user = collections.defaultdict(list)
    for e in events:
        by_user[e[0]].append(e)
    out = []
    for u, es in by_user.items():
        es.sort(key=lambda e: e[2])
        for k, e in enumerate(es):
            out.append((e, "test" if k == len(es) - 1 else ("valid" if k == len(es) - 2
                                                             else "train")))
    return out, None


def brute_force_cooc(train_events):
    """{(a, b): count} over every pair of one user's training clicks within the window."""
    counts = collections.Counter()
    by_user = collections.defaultdict(list)
    for u, i, ts in train_events:
        by_user[u].append((ts, i))
    for clicks in by_user.values():
        for x in range(len(clicks)):
            for y in range(x + 1, len(clicks)):
                (t1, a), (t2, b) = clicks[x], clicks[y]
                if a != b and abs(t1 - t2) <= WINDOW:
                    counts[(a, b)] += 1
                    counts[(b, a)] += 1
    return counts


def read_cooc(art):
    """{(item index, neighbour index): (count, same_category)} and the rows' neighbour order."""
    from micrec_tf.data.artifacts import load_cooccurrence

    table = load_cooccurrence(art, len(read_vocab(art, "item_id")) + 1)
    out, rows = {}, {}
    for i in range(table.num_items):
        nb, counts, same = table.row(i)
        rows[i] = list(zip(counts.tolist(), nb.tolist()))
        for b, c, s in zip(nb.tolist(), counts.tolist(), same.tolist()):
            out[(i, b)] = (c, s)
    return out, rows


def read_jsonl(path):
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def read_vocab(art, field):
    with open(os.path.join(art, "vocab", f"{field}.txt"), encoding="utf-8") as fh:
        return [line.rstrip("\n") for line in fh]


# ------------------------------------------------------------------------------- pure functions

def test_cooccurrence_pairs_window_and_cap():
    clicks = [(0, "a"), (3600, "b"), (7201, "c"), (7201, "b"), (7210, "b")]
    pairs = collections.Counter(cooccurrence.cooccurrence_pairs(clicks, 3600, 50))
    # a-b at exactly 3600 s counts; b(3600)-c(7201) is 3601 s: no; c-b at 0 s and 9 s count.
    assert pairs == {("a", "b"): 1, ("c", "b"): 2}
    # The cap keeps the nearest earlier clicks.
    clicks = [(0, "a"), (1, "b"), (2, "c"), (3, "d")]
    assert list(cooccurrence.cooccurrence_pairs(clicks, 3600, 2)) == [
        ("a", "b"), ("b", "c"), ("a", "c"), ("c", "d"), ("b", "d")]


def test_sessions_and_boundaries():
    assert cooccurrence.count_sessions([(0, "a"), (3600, "b"), (7201, "c"), (7201, "d")], 3600) == 2
    assert target_ranks(10, [0.8, 0.1, 0.1]) == (8, 9)
    assert target_ranks(10, [1.0, 0.0, 0.0]) == (10, 10)
    nb, counts = cooccurrence.top_neighbours([3, 1, 2], [5, 5, 7], 2)
    assert (nb.tolist(), counts.tolist()) == ([2, 1], [7, 5])
    nb, counts = cooccurrence.top_neighbours([3, 1, 2], [5, 5, 7], 0)
    assert (nb.tolist(), counts.tolist()) == ([2, 1, 3], [7, 5, 5])


# ------------------------------------------------------------------------------- pipeline

def _vocab_index(art, field):
    return {v: i + 1 for i, v in enumerate(read_vocab(art, field))}


def _example_keys(art):
    """[(split, user, ts, item_id or None)] of every example; item_id None when OOV."""
    items = read_vocab(art, "item_id")
    out = []
    for split in ("train", "valid", "test"):
        for ex in read_examples(art, split):
            item = items[ex["item"][0] - 1] if ex["item"][0] else None
            out.append((split, ex["user_id"], ex["timestamp"][0], item, ex))
    return out


def test_dead_letters_and_counts(gt, data):
    art, stats = gt
    events = data[1]
    dead = read_jsonl(os.path.join(art, "dead_letters", "dead_letters.jsonl"))
    got = {(d["source"], d["text"]): d["reason"] for d in dead}
    assert got == {k: v for k, v in BAD_ROWS.items()}
    assert len(dead) == len(BAD_ROWS)
    by_reason = collections.Counter(BAD_ROWS.values())
    assert stats["dead_letters"]["by_reason"] == {r: by_reason.get(r, 0) for r in schema.REASONS}
    assert stats["dead_letters"]["beam_counters"] == stats["dead_letters"]["by_reason"]
    # Every valid row is kept: events, examples, item and user tables.
    assert stats["events"] == len(events)
    assert sum(stats["num_examples"].values()) == len(events)
    rows = stats["rows"]["interactions"]
    assert rows["read"] == len(events) + 5 + 2  # 5 bad rows, 2 headers
    assert rows["read"] == (rows["parsed"] + rows["skipped_header_or_blank"]
                            + rows["dead_letters"] - by_reason["unknown_item"])
    assert stats["items_in_table"] == 40 and stats["users_in_table"] == 25
    assert stats["users"] == len({e[0] for e in events})


def test_global_time_split_matches_reference(gt, data):
    art, stats = gt
    ref, (b1, b2) = ref_split(data[1], "global_time")
    assert (stats["split_boundaries"]["valid_start"], stats["split_boundaries"]["test_start"]) == (b1, b2)
    got = collections.Counter((s, u, ts) for s, u, ts, _, _ in _example_keys(art))
    want = collections.Counter((ref[e], e[0], e[2]) for e in data[1])
    assert got == want
    assert stats["events_by_split"] == {s: sum(1 for e in data[1] if ref[e] == s)
                                        for s in ("train", "valid", "test")}


def test_histories_are_the_previous_clicks(gt, data):
    art, stats = gt
    ref, _ = ref_split(data[1], "global_time")
    item_idx = _vocab_index(art, "item_id")
    by_user = collections.defaultdict(list)
    for u, i, ts in data[1]:
        by_user[u].append((ts, i))
    want = collections.Counter()
    for u, clicks in by_user.items():
        clicks.sort(key=lambda c: c[0])  # stable: same-second clicks keep the input order
        for k, (ts, i) in enumerate(clicks):
            hist = [item_idx.get(x, 0) for _, x in clicks[:k]][-H:]
            want[(ref[(u, i, ts)], u, ts, item_idx.get(i, 0),
                  tuple(hist + [0] * (H - len(hist))), len(hist))] += 1
    got = collections.Counter(
        (s, u, ts, ex["item"][0], tuple(ex["hist_items"]), ex["hist_len"][0])
        for s, u, ts, _, ex in _example_keys(art))
    assert got == want
    assert max(k[5] for k in got) == H  # some users have more than H earlier clicks


def test_example_features_match_tables(gt, data):
    art, _ = gt
    root = data[0]
    items = {r["item"]: r for r in read_jsonl(os.path.join(art, "items", "items.jsonl"))}
    gender, age = _vocab_index(art, "user_gender"), _vocab_index(art, "user_age")
    with open(os.path.join(root, "users.tsv"), encoding="latin-1") as fh:
        profiles = {r[0]: r[1:] for r in (l.rstrip("\r\n").split("\t") for l in fh)
                    if len(r) == 3 and r[0] and r[0] != "user_id"}
    assert gender["Ö"] > 0
    for _, u, _, _, ex in _example_keys(art):
        g, a = profiles.get(u, ("", ""))
        assert ex["user_gender"][0] == gender.get(g, 0) and ex["user_age"][0] == age.get(a, 0)
        if ex["item"][0]:
            row = items[ex["item"][0]]
            assert ex["item_tags"] == row["tags"] + [0] * (3 - len(row["tags"]))
            assert ex["item_provider"][0] == row["provider"]
            assert ex["item_year"][0] == row["extra"]["item_year"]


def test_nothing_leaks_from_valid_and_test(gt, data):
    art, stats = gt
    ref, _ = ref_split(data[1], "global_time")
    train = [e for e in data[1] if ref[e] == "train"]
    counts = collections.Counter(i for _, i, _ in train)
    assert read_vocab(art, "item_id") == [i for _, i in sorted((-n, i) for i, n in counts.items())]
    assert set(read_vocab(art, "user_id")) == {u for u, _, _ in train}
    later_only = {i for e, s in ref.items() if s != "train" for i in [e[1]]} - set(counts)
    assert {"i38", "i39"} <= later_only
    keys = _example_keys(art)
    for s, _, _, item, ex in keys:
        if s == "train":
            assert item is not None
    oov = [k for k in keys if k[3] is None]
    assert len(oov) == sum(1 for e in data[1] if e[1] in later_only) and oov
    assert all(k[0] != "train" for k in oov)
    # Tables hold training items only.
    tags = set()
    with open(os.path.join(data[0], "items.tsv"), encoding="utf-8") as fh:
        item_tags = {r[0]: r[2].split("|")[:3] for r in (l.rstrip("\n").split("\t") for l in fh)
                     if len(r) == 5}
    for i in counts:
        tags.update(t for t in item_tags[i] if t)
    assert set(read_vocab(art, "tag")) == tags
    cooc, _ = read_cooc(art)
    n_items = len(counts)
    assert cooc and all(0 < a <= n_items and 0 < b <= n_items for a, b in cooc)


def test_cooccurrence_matches_brute_force(gt, data):
    art, stats = gt
    ref, _ = ref_split(data[1], "global_time")
    train = [e for e in data[1] if ref[e] == "train"]
    want = brute_force_cooc(train)
    # The edge cases are in the training period and in the reference as intended.
    assert brute_force_cooc([e for e in train if e[0] == "uA"]) == {
        ("i01", "i02"): 1, ("i02", "i01"): 1}
    assert brute_force_cooc([e for e in train if e[0] == "uB"])[("i05", "i06")] == 2
    items = read_vocab(art, "item_id")
    table = {r["item"]: r for r in read_jsonl(os.path.join(art, "items", "items.jsonl"))}
    cooc, rows = read_cooc(art)
    got = {}
    for (a, b), (c, same) in cooc.items():
        got[(items[a - 1], items[b - 1])] = c
        # session_category "tags" (default): the two items share a tag.
        assert same == int(bool(set(table[a]["tags"]) & set(table[b]["tags"])))
    for ranked in rows.values():
        assert ranked == sorted(ranked, key=lambda x: (-x[0], x[1]))
    assert got == dict(want)
    assert any(same for _, same in cooc.values()) and not all(same for _, same in cooc.values())
    assert stats["pairs"] == sum(want.values()) // 2
    assert stats["pairs_distinct"] == len(want) // 2


def test_sessions_count(gt, data):
    art, stats = gt
    by_user = collections.defaultdict(list)
    for u, _, ts in data[1]:
        by_user[u].append(ts)
    want = 0
    for ts in by_user.values():
        ts.sort()
        want += 1 + sum(1 for a, b in zip(ts, ts[1:]) if b - a > WINDOW)
    assert stats["sessions"] == want


def test_make_dataset_parses_records(gt):
    import tensorflow as tf
    from micrec_tf.data.input import make_dataset

    art, stats = gt
    total = 0
    for batch in make_dataset(art, "train", batch_size=64):
        assert batch["hist_items"].shape[1:] == [H] and batch["hist_items"].dtype == tf.int64
        assert batch["item"].shape.rank == 1 and batch["user_id"].dtype == tf.string
        assert batch["item_tags"].shape[1:] == [3]
        total += int(batch["item"].shape[0])
    assert total == stats["num_examples"]["train"]
    ds = make_dataset(art, "valid", batch_size=16, shuffle=True, seed=1, repeat=True,
                      drop_remainder=True)
    batches = list(ds.take(5))
    assert all(b["item"].shape == [16] for b in batches)


def test_load_artifacts(gt, tmp_path):
    import shutil
    from micrec_tf.data.artifacts import load_artifacts

    art, stats = gt
    a = load_artifacts(art)
    V = stats["vocab_sizes"]["item_id"]
    assert a.item_table.num_items == V and a.item_table.tags.shape == (V, 3)
    assert a.vocab_sizes == stats["vocab_sizes"] and a.title_neighbours is None
    assert a.user_fields == list(USER_FIELDS) and a.item_extra_fields == list(EXTRA_FIELDS)
    for r in read_jsonl(os.path.join(art, "items", "items.jsonl")):
        assert "category" not in r
        assert a.item_table.provider[r["item"]] == r["provider"]
        assert a.item_table.extra["item_year"][r["item"]] == r["extra"]["item_year"]
    assert not a.item_table.tags[0].any() and a.cooccurrence.degree[0] == 0
    cooc, _ = read_cooc(art)
    assert a.cooccurrence.num_items == V and a.cooccurrence.num_entries == len(cooc)
    assert {(int(i), int(b)): (int(c), int(s)) for i, b, c, s in zip(
        a.cooccurrence.rows(), a.cooccurrence.neighbours, a.cooccurrence.counts,
        a.cooccurrence.same_category)} == cooc
    copy = str(tmp_path / "copy")
    shutil.copytree(art, copy)
    os.makedirs(os.path.join(copy, "title_neighbours"))
    with open(os.path.join(copy, "title_neighbours", "title_neighbours.jsonl"), "w") as fh:
        fh.write(json.dumps({"item": 2, "neighbours": [4, 1], "scores": [0.9, 0.5]}) + "\n")
    t = load_artifacts(copy).title_neighbours
    assert t.neighbours[2].tolist() == [4, 1] and t.weights.shape == (V, 2)
    os.remove(os.path.join(copy, "vocab", "tag.txt"))
    with pytest.raises(FileNotFoundError, match="tag.txt"):
        load_artifacts(copy)


def test_leave_last_out(llo, data):
    art, stats = llo
    ref, _ = ref_split(data[1], "leave_last_out")
    got = collections.Counter((s, u, ts, item) for s, u, ts, item, _ in _example_keys(art))
    train_items = {i for (u, i, ts), s in ref if s == "train"}
    want = collections.Counter((s, u, ts, i if i in train_items else None)
                               for (u, i, ts), s in ref)
    assert got == want
    users = {e[0] for e in data[1]}
    assert stats["num_examples"]["test"] == len(users) == stats["num_examples"]["valid"]
    assert stats["split_boundaries"] == {"valid_start": None, "test_start": None}
    assert set(read_vocab(art, "item_id")) == train_items


def test_output_is_deterministic(gt, data, tmp_path):
    art, stats = gt
    art2, stats2 = _run(data, tmp_path)
    files = sorted(os.path.relpath(f, art) for f in glob.glob(os.path.join(art, "**"), recursive=True)
                   if os.path.isfile(f))
    files2 = sorted(os.path.relpath(f, art2) for f in glob.glob(os.path.join(art2, "**"), recursive=True)
                    if os.path.isfile(f))
    assert files == files2 and "stats.json" in files
    for rel in files:
        if rel != "stats.json":
            with open(os.path.join(art, rel), "rb") as a, open(os.path.join(art2, rel), "rb") as b:
                assert a.read() == b.read(), rel
    stats.pop("timing"), stats2.pop("timing")
    assert stats == stats2
    assert not glob.glob(str(tmp_path / "t.tmp-*")) and not glob.glob(str(tmp_path / "t.old-*"))


def test_vectorised_pairs_equal_the_reference_generator():
    rng = random.Random(5)
    for trial in range(60):
        n = rng.randint(0, 40)
        ts = sorted(rng.choice([0, 1, 3599, 3600, 3601, 5000]) * rng.randint(0, 3)
                    + rng.randint(0, 9000) for _ in range(n))
        items = [f"x{rng.randint(0, 6)}" for _ in range(n)]
        clicks = list(zip(ts, items))  # time order; same-second clicks in any order
        cap = rng.choice([0, 1, 2, 5, 1000])
        want = collections.Counter(cooccurrence.cooccurrence_pairs(clicks, WINDOW, cap))
        names = sorted(set(items))
        code = {x: k + 1 for k, x in enumerate(names)}
        a, b = cooccurrence.cooccurrence_pair_arrays(
            [t for t, _ in clicks], [code[i] for _, i in clicks], WINDOW, cap)
        got = collections.Counter(zip([names[k - 1] for k in a.tolist()],
                                      [names[k - 1] for k in b.tolist()]))
        assert got == want
        counter = cooccurrence.PairCounter()
        counter.add(a, b)
        both = collections.Counter()
        for (x, y), c in want.items():
            both[(code[x], code[y])] += c
            both[(code[y], code[x])] += c
        assert {(x, y): c for x, nb, counts in counter.rows()
                for y, c in zip(nb.tolist(), counts.tolist())} == dict(both)


def test_cli_on_generated_synthetic_data(tmp_path, capsys):
    """End to end through the CLI: generator, CanonicalAdapter, Beam flags, load, tf.data."""
    pytest.importorskip("micrec_tf.data.synthetic")
    import yaml
    from micrec_tf.data.artifacts import load_artifacts
    from micrec_tf.data.input import make_dataset

    cfg_path = tmp_path / "syn.yaml"
    cfg_path.write_text(yaml.safe_dump({
        "name": "syn", "artifacts_root": str(tmp_path / "artifacts"),
        "data": {"dataset": "synthetic", "data_dir": str(tmp_path / "raw"),
                 "synthetic": {"num_users": 40, "num_items": 60, "num_events": 800,
                               "num_topics": 4, "seed": 1}}}))
    assert preprocess.main(["--config", str(cfg_path), "--set", "preprocess.num_shards=3",
                            "--direct_num_workers=1", "--runner=DirectRunner",
                            "--project=x"]) == 0
    out = capsys.readouterr().out
    assert "events/s" in out and "dead letters 0" in out
    art = str(tmp_path / "artifacts" / "syn")
    stats = json.load(open(os.path.join(art, "stats.json")))
    assert stats["events"] == 800 and stats["dead_letters"]["total"] == 0
    assert len(glob.glob(os.path.join(art, "examples", "*-of-00003.tfrecord.gz"))) == 9
    a = load_artifacts(art)
    assert a.cooccurrence.num_items == a.item_table.num_items == stats["items"] + 1
    n = sum(int(b["item"].shape[0]) for b in make_dataset(art, "test", 32))
    assert n == stats["num_examples"]["test"]


def test_identical_clicks_count_once_and_are_reported(tmp_path):
    """MIND repeats histories on every impression line: the same (user, item, time) twice is one
    click, and the removed copies are counted in stats.json (nothing dropped silently)."""
    root = tmp_path / "raw"
    root.mkdir()
    (root / "items.tsv").write_text(
        "item_id\ttitle\ttags\tprovider\tyear\n"
        + "".join(f"i{k}\tTitle {k}\tt{k % 3}\tp1\t1990\n" for k in range(6)))
    (root / "users.tsv").write_text("user_id\tgender\tage\nu1\tF\t25\nu2\tM\t35\n", "latin-1")
    clicks = [("u1", f"i{k}", 1_600_000_000 + 100 * k) for k in range(6)] + \
             [("u2", f"i{k}", 1_600_000_000 + 100 * k) for k in range(5)]
    dups = [clicks[0], clicks[0], clicks[3], clicks[7]]
    (root / "interactions.tsv").write_text(
        "user_id\titem_id\ttimestamp\n" + "".join(f"{u}\t{i}\t{t}\n" for u, i, t in clicks + dups))
    cfg = make_cfg(tmp_path / "out", root, "leave_last_out", deduplicate_clicks=True)
    stats = preprocess.run(cfg, ["--direct_num_workers=1"], adapter=TsvAdapter(),
                           data_dir=str(root), verbose=False)
    assert stats["duplicate_clicks_removed"] == len(dups)
    assert sum(stats["num_examples"].values()) == len(clicks)


def test_unknown_flag_is_one_line_error_without_beam_noise(tmp_path):
    """A typo is neither ours nor Beam's: exit 2 with one line naming it, before any work, and
    none of Beam's import-time warnings (``apitools not found``) on the way."""
    import subprocess
    import sys

    cfg_path = tmp_path / "syn.yaml"
    cfg_path.write_text(f"name: syn\nartifacts_root: {tmp_path / 'artifacts'}\n"
                        f"data:\n  data_dir: {tmp_path / 'raw'}\n")
    env = {k: v for k, v in os.environ.items() if k not in ("MICREC_VERBOSE", "MICREC_DEBUG")}
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.preprocess", "--config", str(cfg_path),
         "--sett", "preprocess.num_shards=3", "--direct_num_workers=1"],
        capture_output=True, text=True, timeout=300, env=env,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "'--sett'" in lines[0] and "did you mean --set?" in lines[0]
    assert not (tmp_path / "raw").exists() and not (tmp_path / "artifacts").exists()


def test_beam_args_of_the_config_are_checked_too(data, tmp_path):
    from micrec_tf import cli

    cfg = make_cfg(tmp_path, data[0], beam_args=["--direct_num_workers=1", "--runnr=x"])
    with pytest.raises(cli.UsageError, match="--runnr.*did you mean --runner"):
        options.pipeline_options(cfg)
    cfg = make_cfg(tmp_path, data[0], beam_args=["--direct_num_workers=2", "--project=x"])
    got = options.pipeline_options(cfg, ["--region", "eu"]).get_all_options()
    assert (got["direct_num_workers"], got["project"], got["region"],
            got["runner"]) == (2, "x", "eu", "DirectRunner")


@pytest.mark.parametrize("runner", ["DaskRunner",
                                    "apache_beam.runners.dask.dask_runner.DaskRunner"])
def test_runners_known_to_give_wrong_results_are_refused(runner):
    from micrec_tf import cli

    with pytest.raises(cli.UsageError, match=r"--runner=DaskRunner is not supported: .*"
                                             r"multi-output ParDo"):
        options.beam_options([f"--runner={runner}"])


def test_an_untested_runner_warns_and_a_supported_one_does_not(caplog):
    with caplog.at_level("WARNING", logger="pipelines.options"):
        assert options.check_runner("FlinkRunner") == "FlinkRunner"
        assert not caplog.records
        assert options.check_runner("my.pkg.FancyRunner") == "FancyRunner"
    assert "FancyRunner is not tested" in caplog.text

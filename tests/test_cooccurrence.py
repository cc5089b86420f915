"""The session co-occurrence table and the click order of the Beam job, against pure-Python
references written here (tiny data, DirectRunner).

- the full (uncapped) table read back with ``artifacts.load_cooccurrence`` equals a brute-force
  count over every pair of a user's clicks (gaps of exactly 3600 s count, 3601 s do not);
- the capped option (``max_pairs_per_click``) still follows the reference generator, and
  ``cooccurrence_top_m`` keeps the head of each full row;
- ``same_category`` for tags (multi-valued: the items share a tag), provider and an extra field;
- the tie rule: same-second clicks keep the input order (file, line, row in the line), which
  decides histories, capped pairs and the leave-last-out targets;
- the Beam stages touched (ParseRows, PrepareUser, UserCooccurrence + MergeNeighbourCounts,
  CooccurrenceRows) on TestPipeline.
"""
import collections
import os
import random

import numpy as np
import pytest

import micrec_tf  # noqa: F401  (before tensorflow)
from micrec_tf.config import ConfigError, from_dict
from micrec_tf.data import schema
from micrec_tf.data.artifacts import load_cooccurrence
from conftest import read_examples
from pipelines import common, cooccurrence, options, preprocess
from pipelines.rows import ParseRows, click_order
from pipelines.split import PrepareUser

import apache_beam as beam  # noqa: E402  (after pipelines.preprocess: its import is quiet)
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline  # noqa: E402
from apache_beam.testing.util import assert_that, equal_to  # noqa: E402

WINDOW = 3600
H = 20

# Items "1".."12": string order ("10" < "9") differs from numeric order on purpose.
# id -> (tags, provider, year); "" = none.
ITEMS = {
    "1": ("a|b", "p1", "1990"), "2": ("b|c", "p2", ""), "3": ("c", "", "1991"),
    "4": ("", "p2", "1992"), "5": ("d|a", "p1", "1990"), "6": ("e", "", "1991"),
    "7": ("a", "p1", ""), "8": ("", "p2", "1992"), "9": ("b", "p1", "1990"),
    "10": ("c|e", "p2", "1991"), "11": ("d", "p1", "1992"), "12": ("f", "p2", "1990"),
}


class LinesAdapter(schema.Adapter):
    """``user<TAB>item[,item...]<TAB>timestamp``: a line may hold several clicks (like MIND)."""

    name = "test_lines"
    interaction_files = schema.SourceFiles(("clicks-*.tsv",))
    item_files = schema.SourceFiles(("items.tsv",))
    user_files = schema.SourceFiles(("users.tsv",))
    item_extra_fields = ("year",)

    def parse_interaction(self, line):
        if not line or line.startswith("user\t"):
            return []
        u, items, ts = schema.split_fields(line, "\t", 3)
        return [schema.Interaction(u, i, schema.parse_timestamp(ts, line))
                for i in items.split(",")]

    def parse_item(self, line):
        if not line or line.startswith("item\t"):
            return []
        i, tags, provider, year = schema.split_fields(line, "\t", 4)
        return [schema.Item(i, f"Title {i}", tuple(t for t in tags.split("|") if t), provider,
                            {"year": year})]

    def parse_user(self, line):
        return [] if not line or line == "user" else [schema.User(line, {})]


def write_data(root, files):
    """``files``: {file name: [(user, [items], ts)]} -> the clicks [(user, item, ts)] in input
    order (files in name order, as the adapter lists them; lines; items within a line)."""
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "items.tsv"), "w") as fh:
        fh.write("item\ttags\tprovider\tyear\n")
        fh.writelines(f"{i}\t{t}\t{p}\t{y}\n" for i, (t, p, y) in ITEMS.items())
    users = sorted({u for lines in files.values() for u, _, _ in lines})
    with open(os.path.join(root, "users.tsv"), "w") as fh:
        fh.write("user\n" + "".join(f"{u}\n" for u in users))
    ordered = []
    for name in sorted(files):
        with open(os.path.join(root, name), "w") as fh:
            fh.write("user\titems\tts\n")
            for u, items, ts in files[name]:
                fh.write(f"{u}\t{','.join(items)}\t{ts}\n")
                ordered += [(u, i, ts) for i in items]
    return ordered


def make_cfg(out_root, data_dir, split="global_time", **pre):
    pre = {"split": split, "num_shards": 1, "max_tags": 3, **pre}
    if split == "global_time":
        pre.setdefault("split_fractions", [1.0, 0.0, 0.0])  # every click is a training click
    return from_dict({"name": "c", "artifacts_root": str(out_root),
                      "data": {"dataset": "canonical", "data_dir": str(data_dir)},
                      "preprocess": pre})


def run_job(data_dir, out_root, split="global_time", **pre):
    cfg = make_cfg(out_root, data_dir, split, **pre)
    stats = preprocess.run(cfg, ["--direct_num_workers=1"], adapter=LinesAdapter(),
                           data_dir=str(data_dir), verbose=False)
    return cfg.artifacts_dir, stats


def read_vocab(art, field="item_id"):
    with open(os.path.join(art, "vocab", f"{field}.txt")) as fh:
        return [line.rstrip("\n") for line in fh]


def read_table(art):
    """{(item_id, neighbour_id): (count, same_category)}, [per-row (count, neighbour index)]."""
    items = read_vocab(art)
    table = load_cooccurrence(art, len(items) + 1)
    out, rows = {}, []
    for i in range(1, table.num_items):
        nb, counts, same = (x.tolist() for x in table.row(i))
        rows.append(list(zip(counts, nb)))
        for b, c, s in zip(nb, counts, same):
            out[(items[i - 1], items[b - 1])] = (c, s)
    assert table.degree[0] == 0
    return out, rows


# ------------------------------------------------------------------------------- references

def brute_force_counts(clicks):
    """{(a, b): count}, both directions: every pair of one user's clicks on distinct items at
    most WINDOW seconds apart counts once (order of the clicks irrelevant)."""
    by_user = collections.defaultdict(list)
    for u, i, ts in clicks:
        by_user[u].append((ts, i))
    counts = collections.Counter()
    for cl in by_user.values():
        for x in range(len(cl)):
            for y in range(x + 1, len(cl)):
                (t1, a), (t2, b) = cl[x], cl[y]
                if a != b and abs(t1 - t2) <= WINDOW:
                    counts[(a, b)] += 1
                    counts[(b, a)] += 1
    return counts


def capped_counts(clicks, cap):
    """Symmetric counts of the reference generator on each user's clicks in click order (time,
    then input order: Python's sort is stable)."""
    by_user = collections.defaultdict(list)
    for u, i, ts in clicks:
        by_user[u].append((ts, i))
    counts = collections.Counter()
    for cl in by_user.values():
        cl.sort(key=lambda c: c[0])
        for a, b in cooccurrence.cooccurrence_pairs(cl, WINDOW, cap):
            counts[(a, b)] += 1
            counts[(b, a)] += 1
    return counts


def same_tags(a, b):
    return int(bool(set(filter(None, ITEMS[a][0].split("|")))
                    & set(filter(None, ITEMS[b][0].split("|")))))


def same_field(a, b, k):
    return int(ITEMS[a][k] != "" and ITEMS[a][k] == ITEMS[b][k])


# ------------------------------------------------------------------------------- fixtures

def window_fixture():
    """Hand-made edge cases plus random users, spread over two files in shuffled order."""
    rng = random.Random(11)
    lines = [
        # u1: gaps of exactly 3600 s (counted) then 3601 s (not): 1-2 twice (1, 2, 1), 3 alone.
        ("u1", ["1"], 0), ("u1", ["2"], 3600), ("u1", ["1"], 7200), ("u1", ["3"], 10801),
        # u2: A, B, A inside the window, two of them in the same second: count(4, 5) = 2.
        ("u2", ["4"], 1000), ("u2", ["5"], 1000), ("u2", ["4"], 1010),
        # u3: 6-7 3601 s apart (no), 7-8 and 7-9 exactly 3600 s (yes), 6 again 3601 s after 7.
        ("u3", ["6"], 0), ("u3", ["7"], 3601), ("u3", ["8"], 7201), ("u3", ["9"], 7201),
        ("u3", ["6"], 7202),
        # u9: one line, three clicks in the same second.
        ("u9", ["10", "11", "12"], 500),
    ]
    gaps = [0, 0, 1, 30, 3599, 3600, 3601, 7200]
    for u in ("r1", "r2", "r3", "r4"):
        ts = rng.randint(0, 5000)
        for _ in range(rng.randint(15, 40)):
            lines.append((u, [str(rng.randint(1, 12))], ts))
            ts += rng.choice(gaps)
    rng.shuffle(lines)
    half = len(lines) // 2
    return {"clicks-a.tsv": lines[:half], "clicks-b.tsv": lines[half:]}


@pytest.fixture(scope="module")
def window_data(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("window"))
    return root, write_data(root, window_fixture())


@pytest.fixture(scope="module")
def full(window_data, tmp_path_factory):
    """Default co-occurrence settings: no cap, full lists, session_category tags."""
    return run_job(window_data[0], tmp_path_factory.mktemp("full"))


# ------------------------------------------------------------------------------- the job

def test_edge_cases_are_in_the_reference():
    ref = brute_force_counts([("u1", "1", 0), ("u1", "2", 3600), ("u1", "1", 7200),
                              ("u1", "3", 10801)])
    assert ref == {("1", "2"): 2, ("2", "1"): 2}
    assert brute_force_counts([("u2", "4", 1000), ("u2", "5", 1000), ("u2", "4", 1010)]) == {
        ("4", "5"): 2, ("5", "4"): 2}
    ref = brute_force_counts([("u3", "6", 0), ("u3", "7", 3601), ("u3", "8", 7201),
                              ("u3", "9", 7201), ("u3", "6", 7202)])
    assert {k for k in ref if k[0] < k[1]} == {("7", "8"), ("7", "9"), ("8", "9"), ("6", "8"),
                                                ("6", "9")}


def test_full_table_equals_brute_force(full, window_data):
    art, stats = full
    clicks = window_data[1]
    want = brute_force_counts(clicks)
    got, rows = read_table(art)
    assert {k: c for k, (c, _) in got.items()} == dict(want)
    assert ("1", "2") in got and got[("1", "2")][0] >= 2
    for row in rows:  # count desc, then neighbour index asc
        assert row == sorted(row, key=lambda x: (-x[0], x[1]))
    assert stats["pairs"] == sum(want.values()) // 2
    assert stats["pairs_distinct"] == len(want) // 2
    assert stats["cooccurrence_items"] == len({a for a, _ in want})
    # same_category, session_category "tags" (multi-valued): the two items share a tag.
    for (a, b), (_, same) in got.items():
        assert same == same_tags(a, b), (a, b)
    assert {s for _, s in got.values()} == {0, 1}


def test_capped_table_follows_the_reference_generator(window_data, tmp_path):
    """max_pairs_per_click 2, top 3 per row, same_category = equal non-empty year."""
    art, stats = run_job(window_data[0], tmp_path, max_pairs_per_click=2, cooccurrence_top_m=3,
                         session_category="year")
    clicks = window_data[1]
    want = capped_counts(clicks, 2)
    assert want != brute_force_counts(clicks)  # the cap drops pairs on this data
    index = {v: k + 1 for k, v in enumerate(read_vocab(art))}
    full_rows = collections.defaultdict(list)
    for (a, b), c in want.items():
        full_rows[a].append((c, index[b], b))
    top = {(a, b): c for a, row in full_rows.items() for c, _, b in sorted(
        row, key=lambda x: (-x[0], x[1]))[:3]}
    got, _ = read_table(art)
    assert {k: c for k, (c, _) in got.items()} == top
    for (a, b), (_, same) in got.items():
        assert same == same_field(a, b, 2), (a, b)
    assert stats["pairs"] == sum(want.values()) // 2
    assert stats["pairs_distinct"] == len(want) // 2  # counted before the top-M cut


def test_unknown_session_category_is_one_line_error(window_data, tmp_path):
    cfg = make_cfg(tmp_path, window_data[0], session_category="colour")
    with pytest.raises(ConfigError) as err:
        preprocess.run(cfg, ["--direct_num_workers=1"], adapter=LinesAdapter(),
                       data_dir=window_data[0], verbose=False)
    msg = str(err.value)
    assert "\n" not in msg and "Received: 'colour'" in msg
    assert "'tags'" in msg and "'provider'" in msg and "'year'" in msg
    assert not os.listdir(tmp_path)  # nothing written


# Tie rule fixture: same-second clicks whose input order differs from their id order.
TIE_FILES = {
    "clicks-a.tsv": [
        ("t1", ["5"], 100),
        ("t1", ["9", "10"], 200),   # one line, two clicks: 9 (row 0) before 10 (row 1)
        ("t1", ["12"], 300),        # file a before file b: 12 before 11
        ("t3", ["11"], 1000), ("t3", ["12"], 1001), ("t3", ["2"], 1002), ("t3", ["3"], 1003),
        ("t3", ["1"], 5000), ("t3", ["4"], 6000),
        ("t2", ["8"], 50),          # line 11 of file a, still before line 3 of file b
        ("t2", ["2"], 60),
    ],
    "clicks-b.tsv": [
        ("t1", ["11"], 300),
        ("t2", ["3"], 50),
    ],
}


@pytest.fixture(scope="module")
def tie(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("tie"))
    write_data(root, TIE_FILES)
    return run_job(root, tmp_path_factory.mktemp("tie_out"), "leave_last_out",
                   max_pairs_per_click=1, session_category="provider")


def test_tie_rule_histories_and_leave_last_out_targets(tie):
    art, _ = tie
    index = {v: k + 1 for k, v in enumerate(read_vocab(art))}

    def ex(item, hist):
        hist = [index[i] for i in hist]
        return index[item], hist + [0] * (H - len(hist)), len(hist)

    got = {split: {(e["user_id"], e["timestamp"][0]): (e["item"][0], e["hist_items"],
                                                        e["hist_len"][0])
                   for e in read_examples(art, split)} for split in ("valid", "test")}
    # t1 in click order: 5@100, 9@200, 10@200, 12@300 (file a), 11@300 (file b). By id string
    # it would be 5, 10, 9, 11, 12 (test target 12).
    assert got["test"][("t1", 300)] == ex("11", ["5", "9", "10", "12"])
    assert got["valid"][("t1", 300)] == ex("12", ["5", "9", "10"])
    train_t1 = sorted((e["item"][0], e["hist_items"], e["hist_len"][0])
                      for e in read_examples(art, "train") if e["user_id"] == "t1")
    assert train_t1 == sorted([ex("5", []), ex("9", ["5"]), ex("10", ["5", "9"])])
    # t2: 8@50 (file a, line 11) before 3@50 (file b, line 3), then 2@60.
    assert got["test"][("t2", 60)] == ex("2", ["8", "3"])
    assert got["valid"][("t2", 50)] == ex("3", ["8"])


def test_tie_rule_capped_pairs(tie):
    """Cap 1, training clicks only: each click pairs with the click just before it in click
    order; same_category = equal non-empty provider."""
    art, _ = tie
    got, _ = read_table(art)
    want = {("5", "9"): 1, ("9", "10"): 1, ("11", "12"): 1, ("12", "2"): 1, ("2", "3"): 1}
    want.update({(b, a): c for (a, b), c in list(want.items())})
    assert {k: c for k, (c, _) in got.items()} == want
    for (a, b), (_, same) in got.items():
        assert same == same_field(a, b, 1), (a, b)
    assert got[("5", "9")][1] == 1 and got[("9", "10")][1] == 0


# ------------------------------------------------------------------------------- pure functions

def test_click_order_sorts_by_file_line_row():
    rng = random.Random(2)
    keys = [(rng.randint(0, 3), rng.randint(1, 10**9), rng.randint(0, 5000)) for _ in range(500)]
    by_int = sorted(keys, key=lambda k: click_order(*k))
    assert by_int == sorted(keys)
    with pytest.raises(ValueError, match="row 16777216"):
        click_order(0, 1, 1 << 24)


def test_uncapped_chunks_on_a_long_burst_stay_small():
    """1,500 clicks in one window: ~1.1M pairs, cut into pieces of at most ``chunk`` pairs
    (or one click's window), together the reference generator's pairs."""
    rng = random.Random(4)
    n = 1500
    ts = sorted(rng.randint(0, 3000) for _ in range(n))
    items = [rng.randint(1, 40) for _ in range(n)]
    chunk = 50_000
    got = collections.Counter()
    sizes = []
    for a, b in cooccurrence.cooccurrence_pair_chunks(ts, items, WINDOW, 0, chunk):
        sizes.append(len(a))
        got.update(zip(a.tolist(), b.tolist()))
    assert len(sizes) > 10 and max(sizes) <= chunk
    want = collections.Counter(cooccurrence.cooccurrence_pairs(list(zip(ts, items)), WINDOW, 0))
    assert got == want
    # The hand count: every pair of clicks on distinct items (all inside the window).
    assert sum(want.values()) == sum(1 for x in range(n) for y in range(x + 1, n)
                                     if items[x] != items[y])


def test_same_category_tags_and_field():
    tags = np.array([[0, 0], [1, 2], [2, 3], [4, 0], [0, 0], [3, 1]])
    # item 1 {1, 2}: 2 {2, 3} shares 2, 3 {4} none, 4 {} none, 5 {3, 1} shares 1.
    assert cooccurrence.same_category(1, [2, 3, 4, 5], tags).tolist() == [1, 0, 0, 1]
    assert cooccurrence.same_category(4, [1, 2, 3], tags).tolist() == [0, 0, 0]  # no tag: never
    values = np.array([0, 7, 7, 0, 8, 0])
    assert cooccurrence.same_category(1, [2, 3, 4, 5], values).tolist() == [1, 0, 0, 0]
    assert cooccurrence.same_category(3, [5], values).tolist() == [0]  # both empty: not the same


def test_pair_counter_merges_buffers():
    counter = cooccurrence.PairCounter()
    counter.add(np.array([1, 2, 3]), np.array([2, 1, 1]))
    counter.compact()
    counter.add(np.array([1]), np.array([3]))
    rows = {i: dict(zip(nb.tolist(), c.tolist())) for i, nb, c in counter.rows()}
    assert rows == {1: {2: 2, 3: 2}, 2: {1: 2}, 3: {1: 2}}


# ------------------------------------------------------------------------------- Beam stages

def _run_pipeline(build):
    with BeamTestPipeline(options=options.beam_options(["--direct_num_workers=1"])) as p:
        build(p)


def test_parse_rows_carries_the_click_order():
    def check(rows):
        ordered = [r[1] for r in sorted(rows, key=lambda r: r[3])]
        assert ordered == ["9", "10", "3", "7", "1"], ordered
        assert all(r[4][0] in ("/d/a.tsv", "/d/b.tsv") for r in rows)

    def build(p):
        lines = p | beam.Create([("/d/b.tsv", 2, b"u\t1\t5\n"), ("/d/a.tsv", 9, b"u\t3,7\t5\n"),
                                 ("/d/a.tsv", 2, b"u\t9,10\t5\n")])
        out = lines | beam.ParDo(ParseRows(
            LinesAdapter(), "interactions", "utf-8", ["/d/a.tsv", "/d/b.tsv"])).with_outputs(
                common.DEAD, common.STATS, main="rows")
        assert_that(out.rows, check)

    _run_pipeline(build)


def test_prepare_user_sorts_by_time_then_input_order_and_drops_the_key():
    key = click_order
    # Input order: 9@200 (a:2), 10@200 (a:3), 9@200 again (a:4), 5@100 (b:1), 11@300 (a:5),
    # 12@300 (b:2). Given shuffled.
    clicks = [(200, key(0, 3, 0), "10"), (300, key(1, 2, 0), "12"), (100, key(1, 1, 0), "5"),
              (200, key(0, 4, 0), "9"), (300, key(0, 5, 0), "11"), (200, key(0, 2, 0), "9")]

    def build(p):
        bounds = beam.pvalue.AsSingleton(p | "B" >> beam.Create([(None, None)]))
        users = p | beam.Create([("u", {"clicks": clicks, "user": []})])
        for dedup in (False, True):
            out = users | f"Prep{dedup}" >> beam.ParDo(
                PrepareUser("leave_last_out", 0, dedup), bounds).with_outputs(
                    common.STATS, main="users")
            order = ((100, "5"), (200, "9"), (200, "10")) + (() if dedup else ((200, "9"),)) + (
                (300, "11"), (300, "12"))
            assert_that(out.users, equal_to([("u", (), order, len(order) - 2, 1, False)]),
                        label=f"Users{dedup}")
            assert_that(out[common.STATS],
                        equal_to([("duplicate_clicks", 1)] if dedup else []),
                        label=f"Stats{dedup}")

    _run_pipeline(build)


def test_user_cooccurrence_partials_merge_to_the_brute_force(monkeypatch):
    """Tiny flush threshold: many partial rows per item, summed by MergeNeighbourCounts."""
    monkeypatch.setattr(cooccurrence, "COOC_FLUSH_ENTRIES", 4)
    rng = random.Random(8)
    users, clicks = [], []
    for u in range(6):
        ts, cl = rng.randint(0, 100), []
        for _ in range(rng.randint(3, 25)):
            cl.append((ts, str(rng.randint(1, 9))))
            ts += rng.choice([0, 5, 3600, 3601])
        n_train = len(cl) - 2
        users.append((f"u{u}", (), tuple(cl), n_train, 1, True))
        clicks += [(f"u{u}", i, t) for t, i in cl[:n_train]]
    index = {"item_id": {str(k): k for k in range(1, 10)}}
    ref = brute_force_counts(clicks)
    want = collections.defaultdict(dict)
    for (a, b), c in ref.items():
        want[int(a)][int(b)] = c

    def build(p):
        out = (p | beam.Create(users) | beam.ParDo(
            cooccurrence.UserCooccurrence(WINDOW, 0),
            beam.pvalue.AsSingleton(p | "I" >> beam.Create([index]))).with_outputs(
                common.STATS, main="rows"))
        merged = (out.rows | beam.CombinePerKey(cooccurrence.MergeNeighbourCounts())
                  | beam.MapTuple(lambda i, r: (i, dict(zip(r[0].tolist(), r[1].tolist())))))
        assert_that(merged, equal_to(list(want.items())))
        assert_that(out[common.STATS] | beam.CombinePerKey(sum),
                    equal_to([("pairs", sum(ref.values()) // 2)]), label="Pairs")

    _run_pipeline(build)


def test_cooccurrence_rows_rank_cut_and_flag():
    tags = np.array([[0, 0], [1, 0], [1, 2], [3, 0], [2, 0], [0, 0]])

    def build(p):
        cats = beam.pvalue.AsSingleton(p | "C" >> beam.Create([tags]))
        rows = p | beam.Create([(2, (np.array([1, 3, 4, 5]), np.array([4, 9, 4, 1])))])
        for top_m in (0, 2):
            out = (rows | f"Rows{top_m}" >> beam.ParDo(cooccurrence.CooccurrenceRows(top_m), cats)
                   | f"Lists{top_m}" >> beam.Map(lambda r: (r[0], r[1].tolist(), r[2].tolist(),
                                                            r[3].tolist(), r[4])))
            # item 2 {1, 2}: 3 {3} no, 1 {1} yes, 4 {2} yes, 5 {} no; ties by smaller index.
            want = (2, [3, 1, 4, 5], [9, 4, 4, 1], [0, 1, 1, 0], 4)
            if top_m:
                want = (2, want[1][:2], want[2][:2], want[3][:2], 4)
            assert_that(out, equal_to([want]), label=f"Check{top_m}")

    _run_pipeline(build)

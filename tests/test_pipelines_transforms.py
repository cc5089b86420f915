"""Each composite PTransform of the preprocessing job on Beam's TestPipeline, against
references written here by hand or in plain Python (tiny inputs, DirectRunner, one worker).

One test per transform: ReadNumberedLines, ReadSource, OnePerId, ClicksInTimeRange, KnownClicks,
WriteDeadLetters (pipelines.rows); SplitBoundaries, UserTimelines (pipelines.split); Vocabularies
(pipelines.vocab); ItemTable (pipelines.items); CooccurrenceCounts, WriteCooccurrence
(pipelines.cooccurrence); WriteExamples (pipelines.examples).
"""
import base64
import collections
import glob
import gzip
import json
import os
import zlib

import numpy as np
import pytest

import micrec_tf  # noqa: F401  (before tensorflow)
from micrec_tf.config import ConfigError
from micrec_tf.data.artifacts import load_cooccurrence
from pipelines.common import DEAD, STATS
from pipelines.cooccurrence import CooccurrenceCounts, WriteCooccurrence
from pipelines.examples import WriteExamples
from pipelines.items import ItemTable
from pipelines.options import beam_options
from pipelines.rows import (ClicksInTimeRange, KnownClicks, OnePerId, ReadNumberedLines,
                            ReadSource, WriteDeadLetters)
from pipelines.split import SplitBoundaries, UserTimelines
from pipelines.vocab import Vocabularies
from test_preprocess import TsvAdapter

import apache_beam as beam  # noqa: E402  (after pipelines.common: its import is quiet)
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline  # noqa: E402
from apache_beam.testing.util import assert_that, equal_to  # noqa: E402

WINDOW = 3600


def run_pipeline(build):
    """Builds the test's transforms on a one-worker DirectRunner TestPipeline and runs it."""
    with BeamTestPipeline(options=beam_options(["--direct_num_workers=1"])) as p:
        build(p)


def summed(stats):
    return stats | "SumStats" >> beam.CombinePerKey(sum)


# -------------------------------------------------------------------------------- pipelines.rows

def test_read_numbered_lines_gives_every_line_as_stored(tmp_path):
    plain = tmp_path / "a.txt"
    plain.write_bytes(b"first\nsecond line\r\n\nfourth is longer than the range\nlast")
    packed = tmp_path / "b.txt.gz"
    packed.write_bytes(gzip.compress(b"g1\ng2\r\n"))
    want = [(str(plain), n, raw) for n, raw in enumerate(
        [b"first\n", b"second line\r\n", b"\n", b"fourth is longer than the range\n", b"last"], 1)]
    want += [(str(packed), 1, b"g1\n"), (str(packed), 2, b"g2\r\n")]

    def build(p):
        # 7-byte ranges: the plain file is cut into several line-aligned ranges.
        lines = p | ReadNumberedLines([str(plain), str(packed)], range_bytes=7)
        assert_that(lines, equal_to(want))

    run_pipeline(build)


def test_read_source_parses_skips_and_dead_letters(tmp_path):
    (tmp_path / "items.tsv").write_bytes(
        b"item_id\ttitle\ttags\tprovider\tyear\ni1\tOne\ta|b\tp1\t1990\n\ni2\tbad row\n"
        b" \tNo id\ta\tp1\t1\ni3\tThree\t\t\t\n")
    (tmp_path / "interactions-1.tsv").write_bytes(b"u1\ti1\t100\nu2\ti3\tsoon\n")
    (tmp_path / "interactions-2.tsv").write_bytes(b"user_id\titem_id\ttimestamp\nu1\ti3\t50\n")
    items_path, c1, c2 = (str(tmp_path / f)
                          for f in ("items.tsv", "interactions-1.tsv", "interactions-2.tsv"))

    def build(p):
        adapter = TsvAdapter()
        items = p | "Items" >> ReadSource(adapter, "items", adapter.item_files, str(tmp_path))
        assert_that(items["rows"], equal_to([("i1", "One", ("a", "b"), "p1", ("1990",)),
                                             ("i3", "Three", (), "", ("",))]), label="ItemRows")
        assert_that(items[DEAD] | "ItemDead" >> beam.Map(lambda d: d[:4] + d[5:]), equal_to([
            ("items", items_path, 4, "wrong_field_count", b"i2\tbad row\n"),
            ("items", items_path, 5, "empty_id", b" \tNo id\ta\tp1\t1\n")]), label="ItemDead")
        assert_that(items[STATS] | "SumItems" >> beam.CombinePerKey(sum), equal_to([
            ("rows.items", 6), ("parsed.items", 2), ("skipped.items", 2),
            ("dead.items.wrong_field_count", 1), ("dead.items.empty_id", 1)]),
            label="ItemStats")

        clicks = p | "Clicks" >> ReadSource(adapter, "interactions", adapter.interaction_files,
                                            str(tmp_path))
        # The click order key sorts by file (listing order), then line: -1.tsv before -2.tsv.
        in_order = (clicks["rows"] | beam.combiners.ToList() | beam.Map(
            lambda rs: [r[:3] + (r[4],) for r in sorted(rs, key=lambda r: r[3])]))
        assert_that(in_order, equal_to([[("u1", "i1", 100, (c1, 1, b"u1\ti1\t100\n")),
                                         ("u1", "i3", 50, (c2, 2, b"u1\ti3\t50\n"))]]),
                    label="ClickRows")
        assert_that(clicks[DEAD] | "ClickDead" >> beam.Map(lambda d: d[:4]),
                    equal_to([("interactions", c1, 2, "bad_timestamp")]), label="ClickDead")

    run_pipeline(build)


def test_read_source_without_a_required_file_names_the_patterns(tmp_path):
    adapter = TsvAdapter()
    with pytest.raises(FileNotFoundError, match=r"interactions\*\.tsv"):
        with BeamTestPipeline(options=beam_options(["--direct_num_workers=1"])) as p:
            _ = p | ReadSource(adapter, "interactions", adapter.interaction_files, str(tmp_path))


def test_one_per_id_keeps_the_smallest_row_and_counts_the_rest():
    rows = [("b", ("x2",)), ("a", ("y",)), ("b", ("x1",)), ("b", ("x1",)), ("c", ("z",))]

    def build(p):
        created = p | beam.Create(rows)
        assert_that(created | "Whole" >> OnePerId(), equal_to([
            ("a", ("a", ("y",)), 0), ("b", ("b", ("x1",)), 2), ("c", ("c", ("z",)), 0)]),
            label="Whole")
        assert_that(created | "Profile" >> OnePerId(value=lambda r: r[1]), equal_to([
            ("a", ("y",), 0), ("b", ("x1",), 2), ("c", ("z",), 0)]), label="Profile")

    run_pipeline(build)


def test_known_clicks_keys_by_user_and_rejects_unknown_items():
    events = [("u1", "i1", 10, 7, ("f", 1, b"l1\n")), ("u2", "i9", 20, 8, ("f", 2, b"l2\n")),
              ("u1", "i2", 30, 9, ("f", 3, b"l3\n"))]

    def build(p):
        out = ((p | "Events" >> beam.Create(events), p | "Ids" >> beam.Create(["i1", "i2"]))
               | KnownClicks())
        assert_that(out["clicks"], equal_to([("u1", (10, 7, "i1")), ("u1", (30, 9, "i2"))]),
                    label="Clicks")
        assert_that(out[DEAD], equal_to([("interactions", "f", 2, "unknown_item",
                                          "item 'i9' is not in the item table", b"l2\n")]),
                    label="Dead")
        assert_that(summed(out[STATS]), equal_to([("events", 2),
                                                  ("dead.interactions.unknown_item", 1)]),
                    label="Stats")

    run_pipeline(build)


def test_clicks_in_time_range_keeps_since_and_drops_until():
    events = [("u1", "i1", t, n, ("f", n, b"l\n"))
              for n, t in enumerate([99, 100, 101, 149, 150, 151, -5])]

    def build(p):
        out = p | "Events" >> beam.Create(events) | ClicksInTimeRange(100, 150)
        # Half-open [100, 150): by hand, the rows at 100, 101 and 149.
        assert_that(out["rows"], equal_to([events[1], events[2], events[3]]), label="Rows")
        assert_that(summed(out[STATS]), equal_to([("clicks_outside_time_range", 4)]),
                    label="Stats")

    run_pipeline(build)


def test_write_dead_letters_sorts_and_keeps_the_raw_bytes(tmp_path):
    users = [("users", "/d/users.csv", 4, "wrong_field_count", "2 fields", b"caf\xe9\r\n")]
    clicks = [("interactions", "/d/c.csv", 9, "bad_timestamp", "ts", b"u,i,x\n"),
              ("interactions", "/d/c.csv", 2, "empty_id", "id", b",i,1")]

    def build(p):
        stats = ((p | "U" >> beam.Create(users), p | "C" >> beam.Create(clicks))
                 | WriteDeadLetters(str(tmp_path), {"users": "latin-1", "interactions": "utf-8"}))
        assert_that(stats, equal_to([("dead_letters.written", 3)]))

    run_pipeline(build)
    with open(tmp_path / "dead_letters" / "dead_letters.jsonl", encoding="utf-8") as fh:
        got = [json.loads(line) for line in fh]

    def record(source, path, line, reason, detail, raw, text):
        return {"source": source, "file": path, "line_number": line, "reason": reason,
                "detail": detail, "raw": base64.b64encode(raw).decode(), "text": text}

    assert got == [record("interactions", "/d/c.csv", 2, "empty_id", "id", b",i,1", ",i,1"),
                   record("interactions", "/d/c.csv", 9, "bad_timestamp", "ts", b"u,i,x\n",
                          "u,i,x"),
                   record("users", "/d/users.csv", 4, "wrong_field_count", "2 fields",
                          b"caf\xe9\r\n", "caf\u00e9")]


# ------------------------------------------------------------------------------- pipelines.split

DAY = 86400
# Ten clicks over four days, ties at the boundaries. Ranks (0-based) of the first valid and the
# first test click: round(0.6 * 10) = 6 and round(0.8 * 10) = 8 under fractions (0.6, 0.2, 0.2)
# (both 2 * DAY + 3: the test split starts where the valid one does), 5 and 9 under
# (0.5, 0.4, 0.1), 10 and 10 (past the last click: None) under (1, 0, 0).
SPLIT_TS = [5, DAY + 7, DAY + 7, DAY + 9, 2 * DAY, 2 * DAY, 2 * DAY + 3, 2 * DAY + 3,
            2 * DAY + 3, 3 * DAY + 1]


@pytest.mark.parametrize("mode,fractions,want", [
    ("global_time", (0.6, 0.2, 0.2), (2 * DAY + 3, 2 * DAY + 3)),
    ("global_time", (0.5, 0.4, 0.1), (2 * DAY, 3 * DAY + 1)),
    ("global_time", (1.0, 0.0, 0.0), (None, None)),
    ("leave_last_out", (0.8, 0.1, 0.1), (None, None))])
def test_split_boundaries_are_exact_timestamp_quantiles(mode, fractions, want):
    clicks = [(f"u{k % 3}", (ts, k, f"i{k}")) for k, ts in enumerate(reversed(SPLIT_TS))]

    def build(p):
        out = p | beam.Create(clicks) | SplitBoundaries(mode, fractions)
        assert_that(out["boundaries"], equal_to([want]), label="Boundaries")
        assert_that(out[STATS], equal_to(
            [(f"boundary.{n}", v) for n, v in zip(("valid_start", "test_start"), want)
             if v is not None]), label="Stats")

    run_pipeline(build)


def test_split_boundaries_reject_an_unknown_mode():
    with pytest.raises(ValueError, match="Received: 'random'"):
        SplitBoundaries("random")


@pytest.mark.parametrize("dedup", [False, True])
def test_user_timelines_order_label_and_attach_profiles(dedup):
    # u1: input order (order key) decides same-second ties; "i2"@200 is repeated.
    clicks = [("u1", (200, 3, "i3")), ("u1", (100, 9, "i1")), ("u1", (200, 1, "i2")),
              ("u1", (300, 5, "i4")), ("u1", (200, 4, "i2")), ("u2", (150, 2, "i1")),
              ("u2", (400, 6, "i5"))]
    profiles = [("u1", ("F",)), ("u3", ("M",))]  # u3 has no clicks: no row
    u1 = [(100, "i1"), (200, "i2"), (200, "i3")] + ([] if dedup else [(200, "i2")]) + [
        (300, "i4")]
    # Boundaries: valid from 200, test from 300.
    want = [("u1", ("F",), tuple(u1), 1, len(u1) - 2, True),
            ("u2", ("",), ((150, "i1"), (400, "i5")), 1, 0, False)]

    def build(p):
        out = ((p | "C" >> beam.Create(clicks), p | "P" >> beam.Create(profiles),
                p | "B" >> beam.Create([(200, 300)]))
               | UserTimelines("global_time", 1, dedup))
        assert_that(out["users"], equal_to(want), label="Users")
        assert_that(out[STATS], equal_to([("duplicate_clicks", 1)] if dedup else []),
                    label="Stats")

    run_pipeline(build)


# ------------------------------------------------------------------ pipelines.vocab and items

# Users: (user_id, profile, clicks, n_train, n_valid, has_profile); only train clicks count.
VOCAB_USERS = [
    ("u1", ("F",), ((0, "i1"), (10, "i2"), (5000, "i1"), (5001, "i3")), 3, 1, True),
    ("u2", ("M",), ((0, "i2"), (1, "i2"), (2, "i4")), 2, 0, True),
    ("u3", ("",), ((0, "i1"),), 0, 0, False),  # no training click: not in any vocabulary
    ("u4", ("F",), ((7, "i3"),), 1, 0, True),
]
VOCAB_ITEMS = {  # item_id -> (item_id, title, tags, provider, extras)
    "i1": ("i1", "One", ("a", "b", "a"), "p1", ("1990",)),
    "i2": ("i2", "Two", ("b",), "p2", ("",)),
    "i3": ("i3", "Three", ("c", "", "b", "d"), "p1", ("1991",)),
    "i4": ("i4", "Four", (), "", ("1990",)),
    "i5": ("i5", "Five", ("e",), "p3", ("1992",)),  # never clicked
}


def reference_vocab(users, items, max_tags):
    """{field: [values]} by training clicks desc, then value, in plain Python."""
    counts = collections.defaultdict(collections.Counter)
    for user_id, (gender,), clicks, n_train, _, _ in users:
        if not n_train:
            continue
        counts["user_id"][user_id] += n_train
        if gender:
            counts["user_gender"][gender] += n_train
        for _, item_id in clicks[:n_train]:
            _, _, tags, provider, (year,) = items[item_id]
            counts["item_id"][item_id] += 1
            distinct = list(dict.fromkeys(t for t in tags if t))[:max_tags]
            for t in distinct:
                counts["tag"][t] += 1
            if provider:
                counts["provider"][provider] += 1
            if year:
                counts["item_year"][year] += 1
    fields = ("item_id", "tag", "provider", "user_id", "user_gender", "item_year")
    return {f: sorted(counts[f], key=lambda v: (-counts[f][v], v)) for f in fields}


def test_reference_vocab_by_hand():
    """The reference itself on the fixture, counted by hand."""
    ref = reference_vocab(VOCAB_USERS, VOCAB_ITEMS, 2)
    assert ref["item_id"] == ["i2", "i1", "i3"]  # 3, 2, 1 training clicks; i4 only in test
    assert ref["tag"] == ["b", "a", "c"]  # b 6 (2 + 3 + 1), a 2, c 1; "d" is past max_tags
    assert ref["user_gender"] == ["F", "M"]  # F: 3 + 1, M: 2
    assert ref["item_year"] == ["1990", "1991"]


def test_vocabularies_count_training_clicks_only(tmp_path):
    want = reference_vocab(VOCAB_USERS, VOCAB_ITEMS, 2)
    index = {f: {v: k + 1 for k, v in enumerate(vs)} for f, vs in want.items()}

    def build(p):
        out = ((p | "U" >> beam.Create(VOCAB_USERS), p | "I" >> beam.Create(VOCAB_ITEMS.items()))
               | Vocabularies(str(tmp_path), ("gender",), ("year",), max_tags=2, window_s=WINDOW))
        assert_that(out["index"], equal_to([index]), label="Index")
        # Sessions (a gap > 3600 s starts one): u1 2 (its 3 training clicks 0, 10, 5000: 2),
        # u2 1 (train 1), u3 1 (no training click), u4 1 (train 1).
        assert_that(summed(out[STATS]), equal_to(
            [(f"vocab.{f}", len(vs) + 1) for f, vs in want.items()]
            + [("users", 4), ("users.train", 3), ("users_unknown", 1),
               ("events.train", 6), ("events.valid", 1), ("events.test", 2),
               ("events_unknown_user", 1), ("sessions", 5), ("sessions.train", 4)]),
            label="Stats")

    run_pipeline(build)
    for field, values in want.items():
        with open(tmp_path / "vocab" / f"{field}.txt", encoding="utf-8") as fh:
            assert fh.read().splitlines() == values, field


def test_item_table_encodes_items_on_the_index(tmp_path):
    index = {"item_id": {"i2": 1, "i1": 2}, "tag": {"b": 1, "a": 2}, "provider": {"p1": 1},
             "item_year": {"1990": 1}}
    items = [("i1", VOCAB_ITEMS["i1"], 0), ("i2", VOCAB_ITEMS["i2"], 1),
             ("i5", VOCAB_ITEMS["i5"], 0)]
    want = [("i1", (2, (2, 1), 1, (1,), "One")),  # tags a, b (deduplicated)
            ("i2", (1, (1,), 0, (0,), "Two")),  # p2 and "" out of vocabulary
            ("i5", (0, (), 0, (0,), "Five"))]  # not in the vocabulary: index 0

    def build(p):
        out = ((p | "Items" >> beam.Create(items), p | "Index" >> beam.Create([index]))
               | ItemTable(str(tmp_path), max_tags=2, extra_fields=("year",)))
        assert_that(out["features"], equal_to(want), label="Features")
        assert_that(out[STATS], equal_to([("items.vocab", 2), ("items.catalogue", 3)]),
                    label="Stats")

    run_pipeline(build)
    with open(tmp_path / "items" / "items.jsonl", encoding="utf-8") as fh:
        got = [json.loads(line) for line in fh]
    assert got == [
        {"item": 1, "item_id": "i2", "title": "Two", "tags": [1], "provider": 0,
         "extra": {"item_year": 0}},
        {"item": 2, "item_id": "i1", "title": "One", "tags": [2, 1], "provider": 1,
         "extra": {"item_year": 1}}]


# ------------------------------------------------------------------------ pipelines.cooccurrence

COOC_USERS = [  # last click of each user is not training
    ("u1", (), ((0, "1"), (10, "2"), (10, "1"), (3610, "3"), (3611, "2"), (9000, "4")), 5, 1, True),
    ("u2", (), ((5, "3"), (3605, "1"), (3605, "3"), (3606, "2")), 3, 1, True),
    ("u3", (), ((0, "4"), (1, "1")), 1, 1, True),  # one training click: no pair
]


def brute_force_pairs(users, window_s, cap):
    """{(a, b): count} over both directions: each training click j pairs with earlier clicks on
    another item at most ``window_s`` before it, nearest first, at most ``cap`` (0 = all)."""
    counts = collections.Counter()
    for _, _, clicks, n_train, _, _ in users:
        train = clicks[:n_train]
        for j, (tj, bj) in enumerate(train):
            taken = 0
            for ti, ai in reversed(train[:j]):
                if tj - ti > window_s or (cap and taken == cap):
                    break
                if ai != bj:
                    counts[int(ai), int(bj)] += 1
                    counts[int(bj), int(ai)] += 1
                    taken += 1
    return counts


@pytest.mark.parametrize("cap", [0, 1])
def test_cooccurrence_counts_match_the_brute_force(cap):
    ref = brute_force_pairs(COOC_USERS, WINDOW, cap)
    rows = collections.defaultdict(dict)
    for (a, b), c in ref.items():
        rows[a][b] = c
    index = {"item_id": {str(k): k for k in range(1, 5)}}

    def build(p):
        out = ((p | "U" >> beam.Create(COOC_USERS), p | "I" >> beam.Create([index]))
               | CooccurrenceCounts(WINDOW, cap))
        as_dicts = out["rows"] | beam.MapTuple(
            lambda i, r: (i, dict(zip(r[0].tolist(), r[1].tolist()))))
        assert_that(as_dicts, equal_to(list(rows.items())), label="Rows")
        assert_that(summed(out[STATS]), equal_to([("pairs", sum(ref.values()) // 2)]),
                    label="Pairs")

    run_pipeline(build)


def test_write_cooccurrence_ranks_cuts_and_flags(tmp_path):
    # Items 1..4 (V = 5); providers: 1 -> p1, 2 -> p2, 3 -> p1, 4 -> none.
    index = {"item_id": {"a": 1, "b": 2, "c": 3, "d": 4}, "tag": {}, "provider": {"p1": 1, "p2": 2}}
    feats = [("a", (1, (), 1, (), "A")), ("b", (2, (), 2, (), "B")), ("c", (3, (), 1, (), "C")),
             ("d", (4, (), 0, (), "D")), ("zz", (0, (), 1, (), "not in vocab"))]
    rows = [(1, (np.array([2, 3, 4]), np.array([5, 5, 9]))),
            (2, (np.array([1]), np.array([5]))),
            (3, (np.array([1]), np.array([5]))),
            (4, (np.array([1]), np.array([9])))]

    def build(p):
        stats = ((p | "R" >> beam.Create(rows), p | "F" >> beam.Create(feats),
                  p | "I" >> beam.Create([index]))
                 | WriteCooccurrence(str(tmp_path), 2, "provider", (), max_tags=2))
        assert_that(stats, equal_to([("cooc.items", 4), ("pairs.distinct", 3)]))

    run_pipeline(build)
    table = load_cooccurrence(str(tmp_path), 5)
    got = {i: (table.neighbours[table.indptr[i]:table.indptr[i + 1]].tolist(),
               table.counts[table.indptr[i]:table.indptr[i + 1]].tolist(),
               table.same_category[table.indptr[i]:table.indptr[i + 1]].tolist())
           for i in range(5)}
    # Row 1: by count desc, then index: 4 (9), 2 (5), 3 (5) -> top 2 = 4, 2; same provider: none.
    assert got == {0: ([], [], []), 1: ([4, 2], [9, 5], [0, 0]), 2: ([1], [5], [0]),
                   3: ([1], [5], [1]), 4: ([1], [9], [0])}


def test_write_cooccurrence_rejects_an_unknown_category():
    with pytest.raises(ConfigError, match="Received: 'colour'"):
        WriteCooccurrence("/nowhere", 0, "colour", ("year",), max_tags=2)


# ---------------------------------------------------------------------------- pipelines.examples

def test_write_examples_one_per_click_with_the_history(tmp_path):
    import tensorflow as tf

    index = {"user_gender": {"F": 1, "M": 2}}
    # item_id -> (idx, tag indices, provider, extra indices, title)
    feats = [("a", (1, (3,), 1, (2,), "A")), ("b", (2, (1, 2), 0, (1,), "B")),
             ("c", (3, (), 2, (0,), "C"))]
    users = [("u1", ("F",), ((10, "a"), (20, "b"), (30, "c"), (40, "a")), 2, 1, True),
             ("u2", ("X",), ((5, "c"),), 1, 0, False)]
    item = {k: v for k, v in feats}

    def example(user_id, gender, hist, item_id, ts):
        idx, tags, provider, extras, _ = item[item_id]
        return {"user_id": [user_id.encode()], "user_gender": [gender],
                "hist_items": hist + [0] * (2 - len(hist)), "hist_len": [len(hist)],
                "item": [idx], "item_tags": list(tags) + [0] * (2 - len(tags)),
                "item_provider": [provider], "item_year": list(extras), "timestamp": [ts]}

    want = {  # (split, shard) -> examples in file order (user, then click order)
        ("train", zlib.crc32(b"u1") % 2): [example("u1", 1, [], "a", 10),
                                           example("u1", 1, [1], "b", 20)],
        ("valid", zlib.crc32(b"u1") % 2): [example("u1", 1, [1, 2], "c", 30)],
        ("test", zlib.crc32(b"u1") % 2): [example("u1", 1, [2, 3], "a", 40)]}
    want.setdefault(("train", zlib.crc32(b"u2") % 2), []).append(example("u2", 0, [], "c", 5))

    def build(p):
        stats = ((p | "U" >> beam.Create(users), p | "F" >> beam.Create(feats),
                  p | "I" >> beam.Create([index]))
                 | WriteExamples(str(tmp_path), ("gender",), ("year",), history_length=2,
                                 max_tags=2, num_shards=2))
        assert_that(summed(stats), equal_to([("examples.train", 3), ("examples.valid", 1),
                                             ("examples.test", 1)]))

    run_pipeline(build)
    files = sorted(glob.glob(os.path.join(tmp_path, "examples", "*.tfrecord.gz")))
    assert [os.path.basename(f) for f in files] == sorted(
        f"{s}-{k:05d}-of-00002.tfrecord.gz" for s in ("train", "valid", "test") for k in (0, 1))
    for f in files:
        split, shard = os.path.basename(f).split("-")[:2]
        got = []
        for rec in tf.data.TFRecordDataset([f], compression_type="GZIP"):
            ex = tf.train.Example.FromString(rec.numpy()).features.feature
            got.append({k: list(v.bytes_list.value) if k == "user_id" else list(v.int64_list.value)
                        for k, v in ex.items()})
        assert got == want.get((split, int(shard)), []), f

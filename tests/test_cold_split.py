"""The item-cold-start split (``preprocess.split: item_cold_start``, issue 28).

References are independent of the pipeline: the bucket rule by hex-digit arithmetic
(16^k = 6 mod 10 for k >= 1), and a pure-Python reading of the raw files for the time split of
warm clicks, the cold clicks' splits and histories, the vocabulary and the co-occurrence table.
"""
from __future__ import annotations

import collections
import hashlib
import json
import os
import random

import pytest

import micrec_tf  # noqa: F401  (before tensorflow)
from conftest import read_examples
from micrec_tf.config import ConfigError, from_dict
from pipelines import preprocess
from pipelines.split import PrepareUser, cold_bucket
from test_preprocess import TsvAdapter, brute_force_cooc, make_cfg, read_cooc, read_vocab

H = 5  # short histories: some are truncated
T0 = 1_600_000_000


def digit_rule(raw_id: str) -> int:
    """sha256 mod 10 from the hex digits: the last one plus 6 times the sum of the others."""
    hexd = hashlib.sha256(raw_id.encode()).hexdigest()
    return (int(hexd[-1], 16) + 6 * sum(int(c, 16) for c in hexd[:-1])) % 10


# ------------------------------------------------------------------------------ fast: the rule

def test_cold_bucket_matches_hand_computed_hashes():
    # Published digests: sha256("1") = 6b86b273...b7875b4b, sha256("2") = d4735e3a...ec13ab35.
    assert hashlib.sha256(b"2").hexdigest().endswith("ec13ab35")
    want = {"1": 5, "2": 1, "18": 0, "17": 1, "3": 8, "m13": None, "m00": 4}
    for raw, bucket in want.items():
        if bucket is not None:
            assert digit_rule(raw) == bucket
    assert cold_bucket("18") == "valid"  # 0: cold-validation item
    assert cold_bucket("2") == "test" and cold_bucket("17") == "test"  # 1: cold-test item
    assert cold_bucket("1") is None and cold_bucket("3") is None and cold_bucket("m00") is None
    for k in range(300):  # the rule on many ids, against the digit arithmetic
        raw = f"item-{k}"
        assert cold_bucket(raw) == {0: "valid", 1: "test"}.get(digit_rule(raw))


def test_config_accepts_item_cold_start_and_rejects_a_typo():
    assert from_dict({"preprocess": {"split": "item_cold_start"}}).preprocess.split == \
        "item_cold_start"
    with pytest.raises(ConfigError, match="item_cold_starts"):
        from_dict({"preprocess": {"split": "item_cold_starts"}})


def test_prepare_user_keeps_cold_clicks_out_of_the_row_and_counts_earlier_warm_clicks():
    # "2" is a cold-test item, "18" cold-valid, "1" and "3" warm. Same-second ties keep the
    # input order (the order key): the cold click at ts 20 comes after warm "1" of ts 20 only.
    clicks = [(10, 0, "1"), (20, 2, "2"), (20, 1, "1"), (20, 3, "3"), (30, 4, "18"),
              (40, 5, "3")]
    groups = {"clicks": list(reversed(clicks)), "user": [("F",)]}
    out = list(PrepareUser("item_cold_start", 1).process(("u", groups), (35, 40)))
    rows = [o for o in out if isinstance(o, tuple)]
    assert len(rows) == 1
    user_id, profile, warm, n_train, n_valid, has_profile, cold = rows[0]
    assert warm == ((10, "1"), (20, "1"), (20, "3"), (40, "3"))
    assert (n_train, n_valid) == (3, 0)  # 40 >= test_start: test
    assert cold == ((20, "2", "test", 2), (30, "18", "valid", 3))
    # Other modes: the 6-tuple of before.
    out = [o for o in PrepareUser("global_time", 1).process(("u", groups), (35, 40))
           if isinstance(o, tuple)]
    assert len(out[0]) == 6 and len(out[0][2]) == 6


# ---------------------------------------------------------------------------- the Beam job

def make_raw(root):
    """Raw canonical files: 60 items (cold-valid m13 m14 m18 m20 m31 m54 m56, cold-test m24 m41
    m45), clicks with same-second ties, a user who clicks cold items only."""
    rng = random.Random(11)
    items = [(f"m{k:02d}", f"Title {k}", "|".join(rng.sample(["a", "b", "c", "d", "e"], 2)),
              f"p{k % 3}", str(1980 + k % 7)) for k in range(60)]
    items[13] = ("m13", "Cold only tag", "zz", "pz", "1999")  # tag zz / provider pz: cold only
    events = []
    gaps = [0, 0, 10, 600, 1800, 3601, 86400]
    for u in range(20):
        ts = T0 + rng.randint(0, 30 * 86400)
        for _ in range(rng.randint(5, 25)):
            events.append((f"u{u:02d}", f"m{rng.randint(0, 59):02d}", ts))
            ts += rng.choice(gaps)
    events += [("ucold", "m13", T0 + 5), ("ucold", "m14", T0 + 5)]  # cold clicks only
    events += [("u00", "m13", T0 + 1)]  # an early click on a cold item (training period)
    rng.shuffle(events)
    with open(os.path.join(root, "items.tsv"), "w", encoding="utf-8") as fh:
        fh.write("item_id\ttitle\ttags\tprovider\tyear\n")
        fh.write("".join("\t".join(r) + "\n" for r in items))
    with open(os.path.join(root, "users.tsv"), "w", encoding="latin-1") as fh:
        fh.write("user_id\tgender\tage\n")
        fh.write("".join(f"u{u:02d}\t{'MF'[u % 2]}\t{18 + u}\n" for u in range(20)))
    with open(os.path.join(root, "interactions.tsv"), "w", encoding="utf-8") as fh:
        fh.write("user_id\titem_id\ttimestamp\n")
        fh.write("".join(f"{u}\t{i}\t{t}\n" for u, i, t in events))


def read_raw(root):
    """Plain reading of the raw files: items {id: (tags, provider)}, clicks in input order."""
    with open(os.path.join(root, "items.tsv"), encoding="utf-8") as fh:
        rows = [line.rstrip("\n").split("\t") for line in fh][1:]
    items = {r[0]: (r[2].split("|"), r[3]) for r in rows}
    with open(os.path.join(root, "interactions.tsv"), encoding="utf-8") as fh:
        clicks = [line.rstrip("\n").split("\t") for line in fh][1:]
    return items, [(u, i, int(t)) for u, i, t in clicks]


def reference(root):
    """The protocol read off the raw files: [(split, user, ts, item, history items)], the warm
    training clicks, the boundaries and the cold items by bucket."""
    items, clicks = read_raw(root)
    bucket = {i: {0: "valid", 1: "test"}.get(digit_rule(i)) for i in items}
    warm_ts = sorted(t for _, i, t in clicks if bucket[i] is None)
    n = len(warm_ts)
    b1, b2 = warm_ts[int(0.8 * n + 0.5)], warm_ts[int(0.9 * n + 0.5)]
    by_user = collections.defaultdict(list)
    for pos, (u, i, t) in enumerate(clicks):
        by_user[u].append((t, pos, i))
    out, train = [], []
    for u, cs in by_user.items():
        cs.sort()  # (timestamp, input order)
        warm_before = []
        for t, _, i in cs:
            if bucket[i] is None:
                split = "train" if t < b1 else ("valid" if t < b2 else "test")
            else:
                split = bucket[i]
            out.append((split, u, t, i, tuple(warm_before[-H:])))
            if bucket[i] is None:
                warm_before.append(i)
                if split == "train":
                    train.append((u, i, t))
    return out, train, (b1, b2), bucket, items


@pytest.fixture(scope="module")
def cold_run(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("raw"))
    make_raw(root)
    cfg = make_cfg(tmp_path_factory.mktemp("cold"), root, "item_cold_start", history_length=H)
    stats = preprocess.run(cfg, ["--direct_num_workers=1"], adapter=TsvAdapter(),
                           data_dir=root, verbose=False)
    return root, cfg.artifacts_dir, stats


@pytest.mark.slow
def test_examples_match_the_raw_files(cold_run):
    root, art, stats = cold_run
    want, _, (b1, b2), bucket, _ = reference(root)
    assert (stats["split_boundaries"]["valid_start"], stats["split_boundaries"]["test_start"]) \
        == (b1, b2)
    vocab = {v: k + 1 for k, v in enumerate(read_vocab(art, "item_id"))}
    got = collections.Counter()
    for split in ("train", "valid", "test"):
        for ex in read_examples(art, split):
            got[(split, ex["user_id"], ex["timestamp"][0], ex["item"][0],
                 tuple(ex["hist_items"]), ex["hist_len"][0])] += 1
    ref = collections.Counter(
        (s, u, t, vocab.get(i, 0), tuple([vocab.get(x, 0) for x in h] + [0] * (H - len(h))), len(h))
        for s, u, t, i, h in want)
    assert got == ref
    # The data exercise the rule: cold clicks in the training period, in both buckets, a cold
    # click whose history is empty, a truncated history; every cold target is out of vocabulary.
    cold = [w for w in want if bucket[w[3]]]
    assert any(t < b1 for _, _, t, _, _ in cold)
    assert {s for s, *_ in cold} == {"valid", "test"}
    assert any(not h for *_, h in cold) and max(len(w[4]) for w in want) == H
    assert all(vocab.get(i, 0) == 0 for _, _, _, i, _ in cold)


@pytest.mark.slow
def test_no_cold_item_in_any_training_artifact(cold_run):
    root, art, stats = cold_run
    _, train, _, bucket, items = reference(root)
    cold_items = {i for i, b in bucket.items() if b}
    train_items = {i for _, i, _ in train}
    assert set(read_vocab(art, "item_id")) == train_items and not train_items & cold_items
    assert set(read_vocab(art, "tag")) == {t for i in train_items for t in items[i][0]}
    assert "zz" not in read_vocab(art, "tag") and "pz" not in read_vocab(art, "provider")
    assert set(read_vocab(art, "user_id")) == {u for u, _, _ in train}
    for ex in read_examples(art, "train"):
        assert ex["item"][0] > 0  # every training target is a (warm) vocabulary item
    # The co-occurrence table: brute force over the warm training clicks.
    vocab = {v: k + 1 for k, v in enumerate(read_vocab(art, "item_id"))}
    table, _ = read_cooc(art)
    want = {(vocab[a], vocab[b]): c for (a, b), c in brute_force_cooc(train).items()}
    assert {k: c for k, (c, _) in table.items()} == want


@pytest.mark.slow
def test_stats_count_cold_items_and_clicks(cold_run):
    root, _, stats = cold_run
    want, _, _, bucket, items = reference(root)
    split_of = collections.Counter((s, bool(bucket[i])) for s, _, _, i, _ in want)
    assert stats["split"] == "item_cold_start"
    assert stats["cold_split"] == {
        "cold_valid_items": sum(1 for i in items if bucket[i] == "valid"),
        "cold_test_items": sum(1 for i in items if bucket[i] == "test"),
        "cold_valid_clicks": split_of[("valid", True)],
        "cold_test_clicks": split_of[("test", True)],
        "warm_valid_clicks": split_of[("valid", False)],
        "warm_test_clicks": split_of[("test", False)]}
    assert (stats["cold_split"]["cold_valid_items"], stats["cold_split"]["cold_test_items"]) \
        == (7, 3)  # make_raw's docstring
    assert stats["num_examples"] == {s: sum(n for (x, _), n in split_of.items() if x == s)
                                     for s in ("train", "valid", "test")}
    assert stats["events"] == len(want)

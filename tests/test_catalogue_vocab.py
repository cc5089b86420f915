"""The whole-catalogue item vocabulary (``preprocess.item_vocabulary``, issue 28, item 1).

References are a pure-Python reading of the raw files written by the test: training clicks by
the global-time rule (or the item-cold-start hash rule, by hex-digit arithmetic), their counts,
and the frequency ordering (count descending, then raw id), never the pipeline's own output.
"""
from __future__ import annotations

import collections
import json
import os

import pytest

import micrec_tf  # noqa: F401  (before tensorflow)
from conftest import read_examples
from micrec_tf.config import ConfigError, from_dict
from pipelines import preprocess
from pipelines.vocab import _item_vocab_entries, _sorted_vocab
from test_cold_split import digit_rule, make_raw
from test_preprocess import TsvAdapter, brute_force_cooc, make_cfg, read_cooc, read_vocab

H = 5
# Items of the item file that no one clicks: ids before, between and after the clicked "mNN".
UNCLICKED = ("a-new", "m60", "zz9", "m5x")


def add_unclicked(root):
    with open(os.path.join(root, "items.tsv"), "a", encoding="utf-8") as fh:
        for k, i in enumerate(UNCLICKED):
            fh.write(f"{i}\tUnclicked {k}\tq|a\tpn\t2001\n")


def read_counts(art):
    with open(os.path.join(art, "vocab", "item_id_counts.txt"), encoding="utf-8") as fh:
        return [int(line) for line in fh]


def reference(root, cold_start):
    """(item ids of the item file, training clicks [(user, item, ts)], eval clicks
    [(split, user, ts, item, history)]) read off the raw files in plain Python."""
    with open(os.path.join(root, "items.tsv"), encoding="utf-8") as fh:
        item_ids = [line.split("\t")[0] for line in fh][1:]
    with open(os.path.join(root, "interactions.tsv"), encoding="utf-8") as fh:
        clicks = [line.rstrip("\n").split("\t") for line in fh][1:]
    clicks = [(u, i, int(t)) for u, i, t in clicks]
    bucket = {i: ({0: "valid", 1: "test"}.get(digit_rule(i)) if cold_start else None)
              for i in item_ids}
    warm_ts = sorted(t for _, i, t in clicks if bucket[i] is None)
    n = len(warm_ts)
    b1, b2 = warm_ts[int(0.8 * n + 0.5)], warm_ts[int(0.9 * n + 0.5)]
    by_user = collections.defaultdict(list)
    for pos, (u, i, t) in enumerate(clicks):
        by_user[u].append((t, pos, i))
    train, evals = [], []
    for u, cs in by_user.items():
        cs.sort()
        before = []
        for t, _, i in cs:
            if bucket[i] is None:
                split = "train" if t < b1 else ("valid" if t < b2 else "test")
            else:
                split = bucket[i]
            if split == "train":
                train.append((u, i, t))
            else:
                evals.append((split, u, t, i, tuple(before[-H:])))
            if bucket[i] is None:
                before.append(i)
    return item_ids, train, evals, bucket


def reference_vocab(item_ids, train, catalogue):
    counts = collections.Counter(i for _, i, _ in train)
    vocab = sorted(counts, key=lambda i: (-counts[i], i))
    if catalogue:
        vocab += sorted(set(item_ids) - set(counts))
    return vocab, [counts.get(i, 0) for i in vocab]


# ------------------------------------------------------------------------------ fast

def test_config_key_defaults_to_clicked_and_rejects_a_typo():
    assert from_dict({}).preprocess.item_vocabulary == "clicked"
    assert from_dict({"preprocess": {"item_vocabulary": "catalogue"}}).preprocess \
        .item_vocabulary == "catalogue"
    with pytest.raises(ConfigError, match="preprocess.item_vocabulary.*'catalog'"):
        from_dict({"preprocess": {"item_vocabulary": "catalog"}})


def test_unclicked_items_sort_after_clicked_ones_by_raw_id():
    item = ("x", "T", ("a",), "p", ("1990",))
    # A clicked item spreads its count; an unclicked one yields its id only in catalogue mode.
    assert list(_item_vocab_entries(("x", {"count": [], "item": [item]}), 2, ("year",))) == []
    assert list(_item_vocab_entries(("x", {"count": [], "item": [item]}), 2, ("year",),
                                    True)) == [(("item_id", "x"), 0)]
    assert list(_item_vocab_entries(("x", {"count": [2, 1], "item": [item]}), 2, ("year",),
                                    True)) == [(("item_id", "x"), 3), (("tag", "a"), 3),
                                               (("provider", "p"), 3), (("item_year", "1990"), 3)]
    entries = [("b", 0), ("z", 2), ("a", 0), ("c", 5), ("y", 2)]
    got = _sorted_vocab(("item_id", {"entries": [entries[:2], entries[2:]], "expected": []}))
    assert got == ("item_id", [("c", 5), ("y", 2), ("z", 2), ("a", 0), ("b", 0)])


# ---------------------------------------------------------------------------- the Beam job

def _run(tmp_path_factory, split, item_vocabulary):
    root = str(tmp_path_factory.mktemp("raw"))
    make_raw(root)
    add_unclicked(root)
    cfg = make_cfg(tmp_path_factory.mktemp("out"), root, split, history_length=H,
                   item_vocabulary=item_vocabulary)
    stats = preprocess.run(cfg, ["--direct_num_workers=1"], adapter=TsvAdapter(),
                           data_dir=root, verbose=False)
    return root, cfg.artifacts_dir, stats


@pytest.fixture(scope="module")
def clicked_run(tmp_path_factory):
    return _run(tmp_path_factory, "global_time", "clicked")


@pytest.fixture(scope="module")
def catalogue_run(tmp_path_factory):
    return _run(tmp_path_factory, "global_time", "catalogue")


@pytest.fixture(scope="module")
def cold_catalogue_run(tmp_path_factory):
    return _run(tmp_path_factory, "item_cold_start", "catalogue")


def _check_run(root, art, stats, cold_start, catalogue):
    item_ids, train, evals, bucket = reference(root, cold_start)
    want, want_counts = reference_vocab(item_ids, train, catalogue)
    assert read_vocab(art, "item_id") == want
    assert read_counts(art) == want_counts
    assert stats["items"] == len(want) and stats["vocab_sizes"]["item_id"] == len(want) + 1
    assert stats["items_in_table"] == len(item_ids)
    # items.jsonl: one line per vocabulary item, in index order.
    with open(os.path.join(art, "items", "items.jsonl"), encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh]
    assert [(r["item"], r["item_id"]) for r in rows] == [(k + 1, i) for k, i in enumerate(want)]
    # Tags stay a training-click vocabulary: "q" (unclicked items only) is not in it.
    assert "q" not in read_vocab(art, "tag") and "pn" not in read_vocab(art, "provider")
    # Examples: targets and histories on these indices (0 for an item outside the vocabulary).
    index = {i: k + 1 for k, i in enumerate(want)}
    got = collections.Counter()
    for split in ("valid", "test"):
        for ex in read_examples(art, split):
            got[(split, ex["user_id"], ex["timestamp"][0], ex["item"][0],
                 tuple(ex["hist_items"]), ex["hist_len"][0])] += 1
    ref = collections.Counter(
        (s, u, t, index.get(i, 0), tuple([index.get(x, 0) for x in h] + [0] * (H - len(h))),
         len(h)) for s, u, t, i, h in evals)
    assert got == ref
    train_targets = collections.Counter(ex["item"][0] for ex in read_examples(art, "train"))
    assert train_targets == collections.Counter(index[i] for _, i, _ in train)
    # The co-occurrence table on the (larger) index: brute force over the training clicks.
    table, _ = read_cooc(art)
    assert {k: c for k, (c, _) in table.items()} == {
        (index[a], index[b]): c for (a, b), c in brute_force_cooc(train).items()}
    return item_ids, train, evals, bucket, want


@pytest.mark.slow
def test_clicked_mode_is_the_training_click_frequency_order(clicked_run):
    item_ids, train, evals, _, want = _check_run(*clicked_run, cold_start=False,
                                                 catalogue=False)
    assert not set(UNCLICKED) & set(want)
    # The data exercise the difference: an evaluation click on an item with no training click.
    assert any(i not in want for _, _, _, i, _ in evals)


@pytest.mark.slow
def test_catalogue_mode_adds_exactly_the_unclicked_items_by_raw_id(clicked_run, catalogue_run):
    item_ids, train, evals, _, want = _check_run(*catalogue_run, cold_start=False,
                                                 catalogue=True)
    clicked = read_vocab(clicked_run[1], "item_id")
    assert want[:len(clicked)] == clicked  # the clicked items keep their indices
    added = want[len(clicked):]
    assert set(added) == set(item_ids) - {i for _, i, _ in train} and set(UNCLICKED) <= set(added)
    assert added == sorted(added) and added[0] == "a-new"
    # Every other vocabulary is the one of the default mode.
    for field in ("tag", "provider", "user_id", "user_gender", "item_year"):
        assert read_vocab(catalogue_run[1], field) == read_vocab(clicked_run[1], field)
    # Every evaluation target is now in the vocabulary.
    index = set(want)
    assert all(i in index for _, _, _, i, _ in evals)


@pytest.mark.slow
def test_item_cold_start_catalogue_indexes_cold_items_with_zero_clicks(cold_catalogue_run):
    root, art, stats = cold_catalogue_run
    item_ids, train, evals, bucket, want = _check_run(root, art, stats, cold_start=True,
                                                      catalogue=True)
    counts = dict(zip(want, read_counts(art)))
    cold = {i for i, b in bucket.items() if b}
    assert cold and cold <= set(want) and all(counts[i] == 0 for i in cold)
    assert not cold & {i for _, i, _ in train}
    # Cold evaluation clicks are in the vocabulary: no target index 0 in valid / test.
    assert any(bucket[i] for _, _, _, i, _ in evals)
    for split in ("valid", "test"):
        assert all(ex["item"][0] > 0 for ex in read_examples(art, split))
    # Cold items' tags / providers only reach the vocabulary through warm training clicks.
    assert "zz" not in read_vocab(art, "tag") and "pz" not in read_vocab(art, "provider")

"""History tails (issue 29, ``preprocess.history_tails``, ``pipelines/history_tails.py``).

Fast: the merge (previous tails + a window's clicks -> new tails) and the carried part of a
tail against hand computations; the example writer's histories with a tail against hand lists;
the shard files; the config key; the refusals. Slow (Beam): a small synthetic click log cut at a
time t into two raw folders; folder A preprocessed with ``history_tails``, then folder B with
``previous_artifacts`` = A: every example of B (read back from its TFRecords) has the history a
plain-Python computation over A's and B's clicks gives; with ``history_tails`` false B's
histories are the window's alone (as before) and the bytes equal a run whose previous folder
has no tails.
"""
from __future__ import annotations

import collections
import glob
import gzip
import json
import os

import pytest

import micrec_tf  # noqa: F401  (before tensorflow)
from micrec_tf.config import ConfigError, from_dict
from pipelines import history_tails as ht


# ----------------------------------------------------------------------------- fast: merging

def test_merge_of_previous_tails_and_window_clicks_by_hand():
    previous = {"a": ((1, "x"), (2, "y"), (3, "z")),   # full tail (H = 3), clicks again
                "b": ((5, "p"),),                       # short tail, clicks again
                "c": ((7, "q"), (8, "r")),              # no click in the window: kept
                "d": ((9, "s"), (20, "t"), (21, "u"))}  # window overlaps its last two clicks
    rows = [("a", (), ((10, "m"), (10, "n")), 2, 0, True),
            ("b", (), ((11, "o"),), 1, 0, True),
            ("d", (), ((20, "t"), (21, "u"), (22, "v")), 3, 0, True),
            ("e", (), ((12, "w"),), 0, 1, True),         # new user (a valid click only)
            ("f", (), (), 0, 0, True, ((13, "k", "test", 0),))]  # cold clicks only
    got = ht.history_tails(previous, rows, 3)
    assert got == {"a": ((3, "z"), (10, "m"), (10, "n")),
                   "b": ((5, "p"), (11, "o")),
                   "c": ((7, "q"), (8, "r")),
                   "d": ((20, "t"), (21, "u"), (22, "v")),
                   "e": ((12, "w"),)}
    assert ht.history_tails({}, rows, 1)["a"] == ((10, "n"),)


def test_carried_tail_drops_the_clicks_the_window_holds_again():
    tail = ((1, "a"), (5, "b"), (5, "c"), (9, "d"))
    assert ht.carried_tail(tail, ((5, "b"), (5, "c"), (9, "d"), (12, "e"))) == ((1, "a"),)
    assert ht.carried_tail(tail, ((10, "e"),)) == tail
    assert ht.carried_tail(tail, ()) == tail
    assert ht.merge_tail(tail, ((5, "b"), (5, "c"), (9, "d"), (12, "e")), 10) == \
        ((1, "a"), (5, "b"), (5, "c"), (9, "d"), (12, "e"))
    with pytest.raises(ValueError, match="Received: 0"):
        ht.merge_tail(tail, (), 0)


def test_shard_bytes_are_sorted_gzip_and_read_back(tmp_path):
    tails = {"u2": ((3, "i1"),), "u10": ((1, "i2"), (2, "i3")), "u3": ()}
    data = ht.tails_shard_bytes(tails.items())
    assert ht.tails_shard_bytes(tails.items()) == data  # mtime 0: same bytes
    lines = gzip.decompress(data).decode("utf-8").splitlines()
    assert lines == ['{"user":"u10","clicks":[[1,"i2"],[2,"i3"]]}',
                     '{"user":"u2","clicks":[[3,"i1"]]}']
    os.makedirs(tmp_path / "history_tails")
    (tmp_path / ht.shard_file(0, 1)).write_bytes(data)
    (tmp_path / ht.STATE_FILE).write_text(json.dumps({"history_length": 3, "num_shards": 1}))
    assert ht.has_history_tails(str(tmp_path))
    assert ht.read_history_tails(str(tmp_path)) == {"u2": ((3, "i1"),),
                                                    "u10": ((1, "i2"), (2, "i3"))}


def _writer(H):
    from pipelines.examples import ExampleWriter
    return ExampleWriter((), (), H, 2)


def _decode(data):
    import tensorflow as tf
    from micrec_tf.data import contract as C
    ex = tf.train.Example.FromString(data)
    f = ex.features.feature
    n = f[C.HIST_LEN].int64_list.value[0]
    return (f[C.ITEM].int64_list.value[0], f[C.TIMESTAMP].int64_list.value[0],
            list(f[C.HIST_ITEMS].int64_list.value[:n]), list(f[C.HIST_ITEMS].int64_list.value))


def test_example_histories_start_in_the_tail_by_hand():
    feats = {i: (n, (), 0, (), "") for n, i in enumerate(["-", "a", "b", "c", "d", "e"])}
    feats.pop("-")
    user = ("u", (), ((10, "c"), (11, "d"), (12, "e")), 2, 1, True,
            ((11, "a", "test", 1), (13, "b", "valid", 3)))
    tail = ((1, "a"), (2, "gone"), (3, "b"))   # "gone": not in the item table -> 0
    got = [(s, _decode(d)) for s, d in _writer(3).records(user, feats, {}, tail)]
    assert got == [("train", (3, 10, [1, 0, 2], [1, 0, 2])),
                   ("train", (4, 11, [0, 2, 3], [0, 2, 3])),
                   ("valid", (5, 12, [2, 3, 4], [2, 3, 4])),
                   ("test", (1, 11, [0, 2, 3], [0, 2, 3])),
                   ("valid", (2, 13, [3, 4, 5], [3, 4, 5]))]
    plain = [(s, _decode(d)) for s, d in _writer(3).records(user, feats, {})]
    assert plain[0] == ("train", (3, 10, [], [0, 0, 0])) and plain[1][1][2] == [3]
    assert [d for _, d in _writer(3).records(user, feats, {}, ())] == \
        [d for _, d in _writer(3).records(user, feats, {})]


def test_config_key_defaults_off():
    cfg = from_dict({"name": "x"})
    assert cfg.preprocess.history_tails is False
    assert from_dict({"name": "x", "preprocess": {"history_tails": True}}).preprocess.history_tails
    with pytest.raises(ConfigError, match="history_tails"):
        from_dict({"name": "x", "preprocess": {"history_tails": "yes"}})


def test_previous_tails_shorter_than_the_history_are_refused(tmp_path):
    os.makedirs(tmp_path / "history_tails")
    (tmp_path / ht.STATE_FILE).write_text(json.dumps({"history_length": 3, "num_shards": 1}))
    with pytest.raises(ConfigError, match="tails of 3 clicks, fewer than "
                                          "preprocess.history_length 5"):
        ht.ReadHistoryTails(str(tmp_path), 5)
    ht.ReadHistoryTails(str(tmp_path), 2)  # longer tails are cut
    (tmp_path / ht.STATE_FILE).write_text("{")
    with pytest.raises(ConfigError, match="cannot be read"):
        ht.ReadHistoryTails(str(tmp_path), 2)


# ------------------------------------------------------------------------------ slow: Beam

H = 4


def _read_examples(folder):
    """[(user, ts, target index, history)] of every example of ``folder``, and the raw bytes
    of each file by name."""
    import tensorflow as tf
    from micrec_tf.data import contract as C
    out, raw = [], {}
    for path in sorted(glob.glob(os.path.join(folder, "examples", "*.tfrecord.gz"))):
        records = [r.numpy() for r in tf.data.TFRecordDataset(path, compression_type="GZIP")]
        raw[os.path.basename(path)] = records
        for data in records:
            f = tf.train.Example.FromString(data).features.feature
            n = f[C.HIST_LEN].int64_list.value[0]
            out.append((f[C.USER_ID].bytes_list.value[0].decode("utf-8"),
                        f[C.TIMESTAMP].int64_list.value[0], f[C.ITEM].int64_list.value[0],
                        tuple(f[C.HIST_ITEMS].int64_list.value[:n])))
    return sorted(out), raw


def _reference(before, window, vocab):
    """Plain Python: every click of ``window`` ({user: [(ts, item)] in click order}) with the
    last H of the user's ``before`` clicks and its earlier window clicks, on ``vocab``."""
    index = {v: k + 1 for k, v in enumerate(vocab)}
    out = []
    for u, clicks in window.items():
        seq = [index.get(i, 0) for _, i in before.get(u, [])]
        for ts, item in clicks:
            out.append((u, ts, index.get(item, 0), tuple(seq[-H:])))
            seq.append(index.get(item, 0))
    return sorted(out)


@pytest.mark.slow
def test_window_examples_carry_the_histories_of_all_clicks(tmp_path):
    """Folder A (days 0-10) with ``history_tails``, then folder B (days 10-20) with
    ``previous_artifacts`` = A: B's examples have the histories of A + B's clicks; B's tails
    are each user's last H clicks of A + B. ``history_tails`` false: the window's histories,
    the bytes of a run whose previous folder has no tails."""
    import shutil
    from micrec_tf.data.artifacts import read_vocab
    from pipelines import preprocess
    from test_append_vocab import make_phases
    from test_preprocess import TsvAdapter, make_cfg

    root_a, root_b = str(tmp_path / "rawA"), str(tmp_path / "rawB")
    os.makedirs(root_a)
    os.makedirs(root_b)
    make_phases(root_a, root_b)  # u00-u04 only in A; v00-v04 new in B
    short = "u14"  # keeps 2 clicks in A: a tail shorter than H
    inter_a = os.path.join(root_a, "interactions.tsv")
    with open(inter_a, encoding="utf-8") as fh:
        header, lines = fh.readline(), fh.readlines()
    mine = [n for n, line in enumerate(lines) if line.startswith(short + "\t")]
    lines = [line for n, line in enumerate(lines) if n not in set(mine[2:])]
    with open(inter_a, "w", encoding="utf-8") as fh:
        fh.write(header + "".join(lines))

    def timelines(root):  # click order: timestamp, then file line (a stable sort)
        with open(os.path.join(root, "interactions.tsv"), encoding="utf-8") as fh:
            next(fh)
            rows = [line.rstrip("\n").split("\t") for line in fh]
        out = collections.defaultdict(list)
        for u, item, ts in sorted(rows, key=lambda r: int(r[2])):
            out[u].append((int(ts), item))
        return dict(out), len(rows)

    before, _ = timelines(root_a)
    window, n_b = timelines(root_b)
    assert "u00" in before and "u00" not in window
    assert "v00" in window and "v00" not in before
    assert 0 < len(before[short]) < H and short in window
    assert max(c[0][0] for c in window.values()) > max(c[-1][0] for c in before.values())

    folders = {k: str(tmp_path / k) for k in ("A", "A0", "B", "Boff", "B0")}

    def run(root, out, previous, tails):
        cfg = make_cfg(tmp_path / "out", root, history_length=H, history_tails=tails,
                       previous_artifacts=previous)
        return preprocess.run(cfg, ["--direct_num_workers=1"], adapter=TsvAdapter(),
                              data_dir=root, out_dir=out, verbose=False)

    run(root_a, folders["A"], "", True)
    shutil.copytree(folders["A"], folders["A0"])
    shutil.rmtree(os.path.join(folders["A0"], "history_tails"))
    stats = run(root_b, folders["B"], folders["A"], True)
    run(root_b, folders["Boff"], folders["A"], False)
    run(root_b, folders["B0"], folders["A0"], True)

    # A's tails: each user's last H clicks of A (every split).
    assert ht.read_history_tails(folders["A"]) == {u: tuple(c[-H:]) for u, c in before.items()}
    # B: histories over A + B, on B's (grown) vocabulary; tails over A + B.
    vocab = read_vocab(os.path.join(folders["B"], "vocab", "item_id.txt"))
    got, _ = _read_examples(folders["B"])
    assert got == _reference(before, window, vocab)
    assert len(got) == n_b
    assert {len(h) for u, _, _, h in got if u == short} >= {3, H}  # short tail + window
    everything = {u: before.get(u, []) + window.get(u, []) for u in set(before) | set(window)}
    tails = ht.read_history_tails(folders["B"])
    assert tails == {u: tuple(c[-H:]) for u, c in everything.items()}
    assert tails["u00"] == tuple(before["u00"][-H:]) and tails["v00"] == tuple(window["v00"][-H:])
    state = ht.read_tails_state(folders["B"])
    assert state == {"history_length": H, "num_shards": 2, "users": len(everything),
                     "grown_from": folders["A"]}
    assert stats["history_tails"] == {"users": len(everything),
                                      "users_carried": sum(1 for u in window if u in before)}
    # history_tails false: the window's own histories, and the bytes of a run whose previous
    # folder has no tails (which starts the tails from the window alone).
    off, off_raw = _read_examples(folders["Boff"])
    assert off == _reference({}, window, vocab) and off != got
    assert not os.path.exists(os.path.join(folders["Boff"], "history_tails"))
    assert "history_tails" not in json.load(open(os.path.join(folders["Boff"], "stats.json")))
    _, b0_raw = _read_examples(folders["B0"])
    assert b0_raw == off_raw
    assert ht.read_history_tails(folders["B0"]) == {u: tuple(c[-H:]) for u, c in window.items()}


def test_update_turns_history_tails_on_when_the_previous_artifacts_have_them(tmp_path):
    from micrec_tf.update import format_cost, has_history_tails, stage_configs

    prev = {"artifacts_dir": str(tmp_path / "prev"), "version_dir": str(tmp_path / "v1")}
    os.makedirs(prev["artifacts_dir"])
    cfg = from_dict({"name": "x"})
    on = from_dict({"name": "x", "preprocess": {"history_tails": True}})
    gen = str(tmp_path / "gen")
    assert not has_history_tails(prev["artifacts_dir"])
    assert stage_configs(cfg, str(tmp_path), prev, gen).preprocess.history_tails is False
    assert stage_configs(on, str(tmp_path), prev, gen).preprocess.history_tails is True
    os.makedirs(os.path.join(prev["artifacts_dir"], "history_tails"))
    with open(os.path.join(prev["artifacts_dir"], ht.STATE_FILE), "w") as fh:
        fh.write("{}")
    assert has_history_tails(prev["artifacts_dir"])
    assert stage_configs(cfg, str(tmp_path), prev, gen).preprocess.history_tails is True
    record = {"timing_s": {}, "rows_added": {}, "window_clicks": {"train": 1}, "examples": {},
              "previous": {"version": 1}, "version": 2, "version_dir": "v", "generation": 1,
              "epochs_run": 1, "optimizer_iterations": 1, "histories": "previous tails + window"}
    assert any(line.endswith("histories: previous tails + window") for line in format_cost(record))

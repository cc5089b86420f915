"""History tails (issue 29, ``preprocess.history_tails``, ``pipelines/history_tails.py``).

Fast: the merge (previous tails + a window's clicks -> new tails) and the carried part of a
tail against hand computations; the example writer's histories with a tail against hand lists;
the shard files; the config key; the refusals. Slow (Beam): a small synthetic click log cut at a
time t into two raw folders; folder A preprocessed with ``history_tails``, then folder B with
``previous_artifacts`` = A: every example of B (read back from its TFRecords) has the history a
plain-Python computation over A's and B's clicks gives; with ``history_tails`` false B's
histories are the window's alone (as before) and the bytes equal a run whose previous folder
has no tails; a third folder C repeating B's test split (the rolling overlap) with
``previous_artifacts`` = B: every example's history is the plain-Python one over all clicks.
"""
from __future__ import annotations

import collections
import glob
import gzip
import json
import math
import os
import random

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


def test_tail_keeps_the_test_split_beyond_h_and_the_overlap_carries_h_clicks_by_hand():
    """H = 3; a user with 5 train/valid clicks (after a previous tail) and m = 2 test clicks:
    tail = the last 3 of train/valid + both test clicks. The next run holds the 2 test clicks
    again (the rolling overlap) and one new click: the carried part is the 3 clicks before them,
    and every history is the last 3 of the user's real earlier clicks (hand lists)."""
    prev = ((1, "p"), (2, "q"))
    clicks = ((10, "a"), (11, "b"), (12, "c"), (13, "d"), (14, "e"), (20, "t1"), (21, "t2"))
    row = ("u", (), clicks, 4, 1, True)
    assert ht.num_test_clicks(row) == 2
    tail = ((12, "c"), (13, "d"), (14, "e"), (20, "t1"), (21, "t2"))
    assert ht.merge_tail(prev, clicks, 3, 2) == tail
    assert ht.history_tails({"u": prev, "idle": prev}, [row], 3) == {"u": tail, "idle": prev}
    # The rule of before (num_test = 0) kept ((14, "e"), t1, t2): one click before the overlap.
    assert ht.merge_tail(prev, clicks, 3) == ((14, "e"), (20, "t1"), (21, "t2"))
    nxt = ((20, "t1"), (21, "t2"), (30, "n"))
    carried = ht.carried_tail(tail, nxt)
    assert carried == ((12, "c"), (13, "d"), (14, "e"))
    feats = {i: (n + 1, (), 0, (), "") for n, i in enumerate("abcdeqn")}
    feats.update({"t1": (8, (), 0, (), ""), "t2": (9, (), 0, (), "")})
    user = ("u", (), nxt, 2, 0, True)
    got = [(s, _decode(d)[2]) for s, d in _writer(3).records(user, feats, {}, carried)]
    # real earlier clicks: c d e | t1 | t2 -> [c d e], [d e t1], [e t1 t2]
    assert got == [("train", [3, 4, 5]), ("train", [4, 5, 8]), ("test", [5, 8, 9])]
    # A real daily update (no overlap): the whole tail is carried, the histories take its last 3.
    daily = ((30, "n"), (31, "a"))
    assert ht.carried_tail(tail, daily) == tail
    got = [_decode(d)[2] for _, d in _writer(3).records(("u", (), daily, 2, 0, True), feats, {},
                                                          tail)]
    assert got == [[5, 8, 9], [8, 9, 7]]
    # Next tails of the overlap run: 1 test click (n), then 2 (t2, n), then none.
    assert ht.history_tails({"u": tail}, [("u", (), nxt, 2, 0, True)], 3)["u"] == \
        ((14, "e"), (20, "t1"), (21, "t2"), (30, "n"))
    assert ht.history_tails({"u": tail}, [("u", (), nxt, 1, 0, True)], 3)["u"] == \
        ((13, "d"), (14, "e"), (20, "t1"), (21, "t2"), (30, "n"))
    assert ht.history_tails({"u": tail}, [("u", (), nxt, 2, 1, True)], 3)["u"] == \
        ((20, "t1"), (21, "t2"), (30, "n"))
    # leave_last_out rows (n_train = n - 2, n_valid = 1): the last click is the test split.
    assert ht.history_tails({}, [("w", (), clicks, 5, 1, True)], 2)["w"] == \
        ((14, "e"), (20, "t1"), (21, "t2"))
    # Only test clicks: all of them, after the carried previous tail's last H.
    assert ht.merge_tail(prev + ((3, "r"), (4, "s")), clicks[:2], 3, 2) == \
        ((2, "q"), (3, "r"), (4, "s"), (10, "a"), (11, "b"))
    for bad in (-1, 8, 1.0, True):
        with pytest.raises(ValueError, match="num_test must be"):
            ht.merge_tail(prev, clicks, 3, bad)


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
    ht.ReadHistoryTails(str(tmp_path), 2)  # longer tails are read whole
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


def _test_start(clicks_by_user, fractions=(0.8, 0.1, 0.1)):
    """The timestamp where a ``global_time`` split's test split starts: the click at rank
    round((f_train + f_valid) n), halves up, in time order (None: no test split)."""
    ts = sorted(t for c in clicks_by_user.values() for t, _ in c)
    rank = int(math.floor((fractions[0] + fractions[1]) * len(ts) + 0.5))
    return ts[rank] if rank < len(ts) else None


def _tails(clicks_by_user, test_start):
    """Plain Python: each user's last H clicks before ``test_start`` + every click after it."""
    return {u: tuple([c for c in clicks if c[0] < test_start][-H:]
                     + [c for c in clicks if c[0] >= test_start])
            for u, clicks in clicks_by_user.items()}


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
    ``previous_artifacts`` = A: B's examples have the histories of A + B's clicks; the tails
    are each user's last H clicks before the run's test split + its test clicks (A's; B's over
    A + B). ``history_tails`` false: the window's histories, the bytes of a run whose previous
    folder has no tails. Folder C = B's test split again + later clicks (the rolling overlap)
    with ``previous_artifacts`` = B: every example's history is the last H of all earlier
    clicks (the rule of before carried only H - m clicks before m repeated ones)."""
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

    folders = {k: str(tmp_path / k) for k in ("A", "A0", "B", "Boff", "B0", "C")}

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

    # A's tails: each user's last H clicks of A before A's test split + its test clicks.
    start_a = _test_start(before)
    tails_a = _tails(before, start_a)
    assert ht.read_history_tails(folders["A"]) == tails_a
    assert any(len(t) > H for t in tails_a.values())  # test clicks kept beyond H
    # B: histories over A + B, on B's (grown) vocabulary; tails over A + B.
    vocab = read_vocab(os.path.join(folders["B"], "vocab", "item_id.txt"))
    got, _ = _read_examples(folders["B"])
    assert got == _reference(before, window, vocab)
    assert len(got) == n_b
    assert {len(h) for u, _, _, h in got if u == short} >= {3, H}  # short tail + window
    everything = {u: before.get(u, []) + window.get(u, []) for u in set(before) | set(window)}
    tails = ht.read_history_tails(folders["B"])
    start_b = _test_start(window)
    tails_b = {**tails_a, **_tails({u: everything[u] for u in window}, start_b)}
    assert tails == tails_b
    assert tails["u00"] == tails_a["u00"]
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
    assert ht.read_history_tails(folders["B0"]) == _tails(window, start_b)

    # C: the rolling overlap. C's folder holds B's test split again (its lines in B's order)
    # and new clicks after it; with previous_artifacts = B every example's history is the last H
    # of the user's clicks over A + B + C's new ones, in (timestamp, input order).
    root_c = str(tmp_path / "rawC")
    os.makedirs(root_c)
    for name in ("items.tsv", "users.tsv"):
        shutil.copy(os.path.join(root_b, name), os.path.join(root_c, name))
    with open(os.path.join(root_b, "interactions.tsv"), encoding="utf-8") as fh:
        header, lines_b = fh.readline(), fh.readlines()
    repeated = [line for line in lines_b if int(line.split("\t")[2]) >= start_b]
    rng = random.Random(5)
    t_end = max(int(line.split("\t")[2]) for line in lines_b)
    users_c = sorted(window)
    items_c = sorted({line.split("\t")[1] for line in lines_b})
    fresh = [f"{rng.choice(users_c)}\t{rng.choice(items_c)}\t"
             f"{t_end + 1 + rng.randint(0, 5 * 86400)}\n" for _ in range(80)]
    with open(os.path.join(root_c, "interactions.tsv"), "w", encoding="utf-8") as fh:
        fh.write(header + "".join(repeated + fresh))
    later, _ = timelines(root_c)
    new_c = {u: [c for c in clicks if c[0] > t_end] for u, clicks in later.items()}
    run(root_c, folders["C"], folders["B"], True)
    full = {u: everything.get(u, []) + new_c.get(u, []) for u in set(everything) | set(new_c)}
    # The overlap matters: users with test clicks of B repeated in C and >= H earlier clicks
    # (the rule of before carried H - m of them).
    assert sum(1 for u in later if any(t >= start_b for t, _ in window.get(u, []))
               and sum(1 for t, _ in everything[u] if t < start_b) >= H) >= 3
    vocab_c = read_vocab(os.path.join(folders["C"], "vocab", "item_id.txt"))
    index = {v: k + 1 for k, v in enumerate(vocab_c)}
    want = []
    for u, clicks in full.items():
        for k, (ts, item) in enumerate(clicks):
            if ts >= start_b:  # the clicks of C's folder
                want.append((u, ts, index.get(item, 0),
                             tuple(index.get(i, 0) for _, i in clicks[:k][-H:])))
    got_c, _ = _read_examples(folders["C"])
    assert len(got_c) == len(repeated) + len(fresh)
    assert got_c == sorted(want)
    # C's tails: C's users over all clicks at C's test boundary; the others keep B's tails.
    start_c = _test_start(later)
    assert ht.read_history_tails(folders["C"]) == {
        **tails_b, **_tails({u: full[u] for u in later}, start_c)}


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

"""Issue 29: the incrementally updated co-occurrence table
(:func:`pipelines.cooccurrence.update_cooccurrence`) against a pure-Python count written here on
the union of the windows.

- hand-made clicks: sessions that span a window boundary (3600 s apart counts, 3601 s does not,
  the same second on both sides), a user absent from the middle window, new items appended to
  the vocabulary, unclicked items; uncapped and capped (``max_pairs_per_click``);
- a tiny generated synthetic set (micrec_tf.data.synthetic) cut into three windows by time;
- what an update refuses: a window earlier than the state, a vocabulary that is not append-only,
  a top-M table, other session settings;
- (slow) a full preprocess with ``preprocess.session_tails`` then one update equals the count on
  every training click.
"""
import collections
import json
import os

import numpy as np
import pytest

import micrec_tf  # noqa: F401  (before tensorflow)
from micrec_tf.config import ConfigError, from_dict
from micrec_tf.data.artifacts import load_cooccurrence
from pipelines import cooccurrence

W = 3600


def _pc(**kw):
    return from_dict({"preprocess": kw}).preprocess


def _reference(user_clicks, window_s, cap=0):
    """{(a, b) unordered: count} by brute force over each user's whole click list (sorted)."""
    counts = collections.Counter()
    for clicks in user_clicks.values():
        for j in range(len(clicks)):
            taken = 0
            for i in range(j - 1, -1, -1):
                if clicks[j][0] - clicks[i][0] > window_s:
                    break
                if cap and taken >= cap:
                    break
                if clicks[i][1] != clicks[j][1]:
                    counts[tuple(sorted((clicks[i][1], clicks[j][1])))] += 1
                    taken += 1
    return counts


def _write_artifacts(folder, vocab, tags):
    """vocab/item_id.txt and items/items.jsonl (tags: {item_id: [tag ints]}; provider 0)."""
    os.makedirs(os.path.join(folder, "vocab"), exist_ok=True)
    os.makedirs(os.path.join(folder, "items"), exist_ok=True)
    with open(os.path.join(folder, "vocab", "item_id.txt"), "w", encoding="utf-8") as fh:
        fh.write("".join(v + "\n" for v in vocab))
    with open(os.path.join(folder, "items", "items.jsonl"), "w", encoding="utf-8") as fh:
        for i, v in enumerate(vocab, 1):
            fh.write(json.dumps({"item": i, "item_id": v, "title": v, "tags": tags.get(v, []),
                                 "provider": 0, "extra": {}}) + "\n")


def _rows(window):
    """{user: [(ts, item)]} -> UserTimelines rows, every click a training click."""
    return [(u, (), tuple(c), len(c), 0, True) for u, c in sorted(window.items())]


def _run_windows(tmp, windows, tags, pc, extra_items=()):
    """Each window in turn: vocabulary grown append-only (new items by first click), then an
    update from the previous folder. Returns the last folder and the final vocabulary."""
    vocab, prev = [], None
    for w, window in enumerate(windows):
        for u in sorted(window):
            for _, item in window[u]:
                if item not in vocab:
                    vocab.append(item)
        vocab += [x for x in extra_items if x not in vocab and w == len(windows) - 1]
        folder = os.path.join(tmp, f"w{w}")
        _write_artifacts(folder, vocab, tags)
        cooccurrence.update_cooccurrence(prev, _rows(window), folder, pc)
        prev = folder
    return prev, vocab


def _check_table(folder, vocab, expected, tags):
    table = load_cooccurrence(folder, num_items=len(vocab) + 1)
    index = {v: i + 1 for i, v in enumerate(vocab)}
    got = {}
    for item in range(1, len(vocab) + 1):
        nb, counts, same = table.row(item)
        # rows sorted by count desc, then neighbour index asc
        assert [(-c, n) for n, c in zip(nb.tolist(), counts.tolist())] == sorted(
            (-c, n) for n, c in zip(nb.tolist(), counts.tolist()))
        for n, c, s in zip(nb.tolist(), counts.tolist(), same.tolist()):
            a, b = vocab[item - 1], vocab[n - 1]
            got[tuple(sorted((a, b)))] = c
            assert s == int(bool(set(tags.get(a, [])) & set(tags.get(b, []))))
    assert got == dict(expected)
    assert table.num_entries == 2 * len(expected)
    assert index  # every id of the reference is in the vocabulary
    return table


# Hand-made: three windows; u1's session spans both boundaries, u2 has an old click just out of
# reach, u3 clicks in the same second on both sides, u4 skips the middle window, u5 is new.
WINDOWS = [
    {"u1": [(1000, "a"), (2000, "b")],
     "u2": [(0, "a"), (5000, "c"), (5000, "b")],
     "u3": [(9000, "c"), (9000, "a")],
     "u4": [(9100, "d"), (9200, "a")]},
    {"u1": [(4600, "e"), (5000, "a"), (5600, "f")],  # e: 3600 s after a (counts), b 2600 s
     "u2": [(8601, "e"), (8601, "d")],               # c, b at 5000: 3601 s (not), 3601 s (not)
     "u3": [(9000, "e")]},                           # same second as the window-0 clicks
    {"u1": [(9200, "g"), (9201, "b")],               # 3600 s after f, then 3601 after f
     "u4": [(9300, "g"), (12800, "h"), (12801, "a")],  # u4 skipped window 1; h new
     "u5": [(20000, "h"), (20001, "h"), (20002, "c")]},
]
TAGS = {"a": [1, 2], "b": [2], "c": [3], "d": [1], "e": [4], "f": [3, 4], "g": [5], "h": [2]}


def _union(windows):
    out = collections.defaultdict(list)
    for window in windows:
        for u, clicks in window.items():
            out[u] += clicks
    return out


@pytest.mark.parametrize("cap", [0, 1, 2])
def test_hand_made_windows_equal_the_count_on_their_union(tmp_path, cap):
    pc = _pc(max_pairs_per_click=cap)
    folder, vocab = _run_windows(str(tmp_path), WINDOWS, TAGS, pc, extra_items=("z",))
    expected = _reference(_union(WINDOWS), W, cap)
    # the boundary sessions are in the reference: (a, e) from u1 across the first boundary,
    # (a, e) from u3 in the same second, (f, g) across the second
    assert expected[("a", "e")] >= 2 and expected[("f", "g")] == 1
    assert ("c", "d") not in expected  # u2's c at 5000 vs d at 8601: 3601 s
    _check_table(folder, vocab, expected, TAGS)
    assert vocab[-1] == "z"  # an unclicked item: an empty row
    assert load_cooccurrence(folder).degree[len(vocab)] == 0


def test_counting_each_window_alone_would_miss_the_boundary_sessions(tmp_path):
    """The reference differs from the sum of per-window counts: the test above is not vacuous."""
    alone = collections.Counter()
    for window in WINDOWS:
        alone.update(_reference(window, W))
    union = _reference(_union(WINDOWS), W)
    assert union != alone
    assert union[("a", "e")] > alone[("a", "e")]


def test_state_written_by_the_update_is_each_users_last_window_of_clicks(tmp_path):
    folder, _ = _run_windows(str(tmp_path), WINDOWS, TAGS, _pc())
    meta, tails = cooccurrence.read_session_state(folder)
    union = _union(WINDOWS)
    for u, clicks in union.items():
        last = clicks[-1][0]
        assert list(tails[u]) == [c for c in clicks if c[0] >= last - W]
    assert meta["updates"] == 3 and meta["session_window_s"] == W
    assert meta["grown_from"] == os.path.join(str(tmp_path), "w1")


def test_tiny_synthetic_set_in_three_windows_equals_the_count_on_all_clicks(tmp_path):
    from micrec_tf.data.synthetic import generate

    cfg = from_dict({"data": {"dataset": "synthetic", "data_dir": str(tmp_path / "syn"),
                              "synthetic": {"num_users": 40, "num_items": 60, "num_events": 800,
                                            "num_topics": 4, "seed": 5}}})
    generate(cfg.data.synthetic, str(tmp_path / "syn"))
    with open(tmp_path / "syn" / "items.tsv", encoding="utf-8") as fh:
        next(fh)
        tag_ids, tags = {}, {}
        for line in fh:
            f = line.rstrip("\n").split("\t")
            tags[f[0]] = [tag_ids.setdefault(t, len(tag_ids) + 1) for t in f[2].split("|") if t]
    clicks = []  # (ts, line, user, item), global time order then file order
    with open(tmp_path / "syn" / "interactions.tsv", encoding="utf-8") as fh:
        next(fh)
        for n, line in enumerate(fh):
            u, item, ts = line.rstrip("\n").split("\t")
            clicks.append((int(ts), n, u, item))
    clicks.sort()

    def cut_inside_a_session(k):
        """The first index >= k whose click follows the same user's click within W."""
        last = {}
        for n, (ts, _, u, _) in enumerate(clicks):
            if n >= k and u in last and 0 < ts - last[u] <= W:
                return n
            last[u] = ts
        raise AssertionError("no session to cut")

    cuts = [0, cut_inside_a_session(len(clicks) // 3),
            cut_inside_a_session(2 * len(clicks) // 3), len(clicks)]
    windows = []
    for a, b in zip(cuts[:-1], cuts[1:]):
        window = collections.defaultdict(list)
        for ts, _, u, item in clicks[a:b]:
            window[u].append((ts, item))
        windows.append(dict(window))
    union = _union(windows)
    for w in (1, 2):  # a session spans each boundary
        assert [u for u in windows[w] if u in windows[w - 1]
                and windows[w][u][0][0] - windows[w - 1][u][-1][0] <= W]
    for cap in (0, 3):
        folder, vocab = _run_windows(str(tmp_path / f"cap{cap}"), windows, tags,
                                     _pc(max_pairs_per_click=cap))
        _check_table(folder, vocab, _reference(union, W, cap), tags)


def test_session_tail_keeps_the_clicks_within_the_window_of_the_last():
    clicks = [(0, "a"), (100, "b"), (3700, "c"), (3700, "d")]
    assert cooccurrence.session_tail(clicks, W) == ((100, "b"), (3700, "c"), (3700, "d"))
    assert cooccurrence.session_tail([], W) == ()


def test_pair_chunks_first_later_keeps_only_pairs_ending_at_or_after_it():
    rng = np.random.default_rng(0)
    ts = np.sort(rng.integers(0, 20_000, 60))
    codes = rng.integers(1, 8, 60)
    for cap in (0, 2):
        for first in (0, 1, 17, 59, 60):
            got = collections.Counter()
            for a, b in cooccurrence.cooccurrence_pair_chunks(ts, codes, W, cap, chunk=7,
                                                              first_later=first):
                got.update(zip(a.tolist(), b.tolist()))
            want = collections.Counter()
            for j in range(max(first, 1), 60):
                taken = 0
                for i in range(j - 1, -1, -1):
                    if ts[j] - ts[i] > W or (cap and taken >= cap):
                        break
                    if codes[i] != codes[j]:
                        want[(int(codes[i]), int(codes[j]))] += 1
                        taken += 1
            assert got == want


def _two_folders(tmp):
    first = os.path.join(tmp, "w0")
    _write_artifacts(first, ["a", "b"], TAGS)
    cooccurrence.update_cooccurrence(None, _rows({"u1": [(1000, "a"), (2000, "b")]}), first,
                                     _pc())
    second = os.path.join(tmp, "w1")
    return first, second


def test_update_refuses_a_window_earlier_than_the_state(tmp_path):
    first, second = _two_folders(str(tmp_path))
    _write_artifacts(second, ["a", "b"], TAGS)
    with pytest.raises(ValueError, match="earlier than the user's last click 2000"):
        cooccurrence.update_cooccurrence(first, _rows({"u1": [(1999, "a")]}), second, _pc())


def test_update_refuses_a_vocabulary_that_moved_an_old_id(tmp_path):
    first, second = _two_folders(str(tmp_path))
    _write_artifacts(second, ["b", "a", "c"], TAGS)
    with pytest.raises(ValueError, match="does not extend the previous one"):
        cooccurrence.update_cooccurrence(first, _rows({"u1": [(3000, "c")]}), second, _pc())


def test_update_refuses_other_session_settings_and_top_m(tmp_path):
    first, second = _two_folders(str(tmp_path))
    _write_artifacts(second, ["a", "b"], TAGS)
    rows = _rows({"u1": [(3000, "a")]})
    with pytest.raises(ValueError, match="session_window_s must be 3600"):
        cooccurrence.update_cooccurrence(first, rows, second, _pc(session_window_s=60))
    with pytest.raises(ValueError, match="max_pairs_per_click must be 0"):
        cooccurrence.update_cooccurrence(first, rows, second, _pc(max_pairs_per_click=2))
    with pytest.raises(ValueError, match="cooccurrence_top_m must be 0"):
        cooccurrence.update_cooccurrence(first, rows, second, _pc(cooccurrence_top_m=5))
    with pytest.raises(FileNotFoundError, match="session_tails=true"):
        cooccurrence.update_cooccurrence(str(tmp_path), rows, second, _pc())


def test_config_session_tails_defaults_off_and_needs_full_rows():
    assert from_dict({}).preprocess.session_tails is False
    with pytest.raises(ConfigError, match="preprocess.session_tails needs"):
        from_dict({"preprocess": {"session_tails": True, "cooccurrence_top_m": 5}})


@pytest.mark.slow
def test_preprocess_state_then_one_update_equals_the_count_on_all_clicks(tmp_path):
    """A full preprocess (Beam) with ``session_tails``: its training clicks are those before
    its valid boundary; an update with every later click gives the count over all clicks."""
    from conftest import tiny_config
    from micrec_tf.data.artifacts import read_items, read_vocab
    from micrec_tf.data.synthetic import generate
    from pipelines import preprocess

    cfg = tiny_config(str(tmp_path), preprocess={"num_shards": 1, "session_tails": True,
                                                 "item_vocabulary": "catalogue"})
    data = os.path.join(str(tmp_path), "data")
    generate(cfg.data.synthetic, data)
    prev = os.path.join(str(tmp_path), "prev")
    stats = preprocess.run(cfg, out_dir=prev, verbose=False, data_dir=data)
    valid_start = stats["split_boundaries"]["valid_start"]
    with open(os.path.join(data, "interactions.tsv"), encoding="utf-8") as fh:
        next(fh)
        clicks = sorted((int(ts), n, u, item) for n, (u, item, ts) in enumerate(
            line.rstrip("\n").split("\t") for line in fh))
    union, window = collections.defaultdict(list), collections.defaultdict(list)
    for ts, _, u, item in clicks:
        union[u].append((ts, item))
        if ts >= valid_start:  # ties at the boundary went to the later split
            window[u].append((ts, item))
    assert 0 < sum(map(len, window.values())) < len(clicks)
    assert any(union[u][len(union[u]) - len(c) - 1][0] >= c[0][0] - W
               for u, c in window.items() if len(c) < len(union[u]))  # a boundary session
    vocab = read_vocab(os.path.join(prev, "vocab", "item_id.txt"))
    tags = {r["item_id"]: r["tags"] for r in read_items(prev)}
    new = os.path.join(str(tmp_path), "new")
    _write_artifacts(new, vocab, tags)
    cooccurrence.update_cooccurrence(prev, _rows(window), new, cfg.preprocess)
    _check_table(new, vocab, _reference(union, W), tags)


@pytest.mark.slow
def test_preprocess_of_a_window_grows_the_previous_table(tmp_path):
    """Two preprocess runs (Beam): generation 0 on the clicks before a time t with
    ``session_tails``; then the clicks from t on only, with ``previous_artifacts``: the table
    equals the count over both runs' training clicks (a session across t included), on the
    grown vocabulary."""
    from conftest import tiny_config
    from micrec_tf.data.artifacts import read_items, read_vocab
    from micrec_tf.data.synthetic import generate
    from pipelines import preprocess

    cfg = tiny_config(str(tmp_path), preprocess={"num_shards": 1, "session_tails": True,
                                                 "split_fractions": [1.0, 0.0, 0.0]})
    data = os.path.join(str(tmp_path), "data")
    generate(cfg.data.synthetic, data)
    inter = os.path.join(data, "interactions.tsv")
    with open(inter, encoding="utf-8") as fh:
        header, lines = fh.readline(), fh.readlines()
    clicks = sorted((int(line.split("\t")[2]), n, line) for n, line in enumerate(lines))
    last, t = {}, None  # t: the time of a click in the second half inside a session
    for n, (ts, _, line) in enumerate(clicks):
        u = line.split("\t")[0]
        if n >= len(clicks) // 2 and u in last and 0 < ts - last[u] <= W:
            t = ts
            break
        last[u] = ts
    union = collections.defaultdict(list)
    prev, new = os.path.join(str(tmp_path), "prev"), os.path.join(str(tmp_path), "new")
    for folder, part, previous in ((prev, [c for c in clicks if c[0] < t], ""),
                                   (new, [c for c in clicks if c[0] >= t], prev)):
        with open(inter, "w", encoding="utf-8") as fh:  # file order kept within the part
            fh.write(header + "".join(line for _, _, line in sorted(part, key=lambda c: c[1])))
        cfg.preprocess.previous_artifacts = previous
        stats = preprocess.run(cfg, out_dir=folder, verbose=False, data_dir=data)
        assert stats["split_boundaries"]["valid_start"] is None  # every click trains
        before = {u: c[-1][0] for u, c in union.items()}
        for ts, _, line in part:
            u, item, _ = line.rstrip("\n").split("\t")
            union[u].append((ts, item))
    assert any(u in before and any(ts >= t and ts - before[u] <= W for ts, _ in c)
               for u, c in union.items())  # a session spans the two runs
    vocab = read_vocab(os.path.join(new, "vocab", "item_id.txt"))
    assert vocab[:len(read_vocab(os.path.join(prev, "vocab", "item_id.txt")))] == \
        read_vocab(os.path.join(prev, "vocab", "item_id.txt"))
    tags = {r["item_id"]: r["tags"] for r in read_items(new)}
    _check_table(new, vocab, _reference(union, W), tags)
    meta, _ = cooccurrence.read_session_state(new)
    assert meta["updates"] == 1 and meta["grown_from"] == prev


def test_preprocess_update_step_refuses_previous_artifacts_without_tails(tmp_path):
    with pytest.raises(ConfigError, match="keep no session tails"):
        cooccurrence.UpdateCooccurrence(str(tmp_path / "out"), str(tmp_path), _pc(), ())

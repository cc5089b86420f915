"""The synthetic generator: determinism, sizes, sessions, planted structure, ensure_generated."""
import collections
import itertools
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest

from micrec_tf.config import Config, DataConfig, SyntheticConfig
from micrec_tf.data import synthetic

SYN = SyntheticConfig(num_users=300, num_items=240, num_events=9000, num_topics=8, seed=3)
FILES = ("interactions.tsv", "items.tsv", "users.tsv")


def _read(path):
    with open(path, encoding="utf-8") as fh:
        lines = fh.read().split("\n")
    assert lines[-1] == ""
    return [line.split("\t") for line in lines[:-1]]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("syn"))
    counts = synthetic.generate(SYN, out)
    inter = _read(os.path.join(out, "interactions.tsv"))
    items = _read(os.path.join(out, "items.tsv"))
    users = _read(os.path.join(out, "users.tsv"))
    return {"dir": out, "counts": counts, "inter": inter, "items": items, "users": users}


def _sessions(inter_rows, window=3600):
    """Per user, maximal runs of clicks with consecutive gaps <= window: lists of item ids."""
    by_user = collections.defaultdict(list)
    for user, item, ts in inter_rows:
        by_user[user].append((int(ts), item))
    sessions = []
    for clicks in by_user.values():
        clicks.sort()
        cur = [clicks[0][1]]
        for (t0, _), (t1, item) in zip(clicks, clicks[1:]):
            if t1 - t0 <= window:
                cur.append(item)
            else:
                sessions.append(cur)
                cur = [item]
        sessions.append(cur)
    return sessions


def test_headers_and_counts(data):
    assert data["inter"][0] == ["user_id", "item_id", "timestamp"]
    assert data["items"][0] == ["item_id", "title", "tags", "provider", "format"]
    assert data["users"][0] == ["user_id", "gender", "age", "region"]
    inter, items, users = data["inter"][1:], data["items"][1:], data["users"][1:]
    assert len(inter) == SYN.num_events
    assert len(items) == SYN.num_items
    assert len(users) == SYN.num_users
    c = data["counts"]
    assert (c["events"], c["items"], c["users"]) == (SYN.num_events, SYN.num_items, SYN.num_users)
    assert c["topics"] == SYN.num_topics and c["bundles"] > 0
    assert c["sessions"] == len(_sessions(inter))
    item_ids = {r[0] for r in items}
    user_ids = {r[0] for r in users}
    assert len(item_ids) == SYN.num_items and len(user_ids) == SYN.num_users
    assert {r[1] for r in inter} <= item_ids
    assert {r[0] for r in inter} <= user_ids
    assert all(len(r) == 3 and int(r[2]) > 0 for r in inter)
    assert all(len(r) == 5 and r[1] and r[3] and r[4] for r in items)
    assert all(len(r) == 4 and all(r) for r in users)
    # every user has clicks (num_events >= 2 * num_users), activity is heavy-tailed
    per_user = collections.Counter(r[0] for r in inter)
    assert len(per_user) == SYN.num_users
    assert max(per_user.values()) > 4 * np.median(list(per_user.values()))
    with open(os.path.join(data["dir"], synthetic.MARKER)) as fh:
        marker = json.load(fh)
    assert marker["params"] == {"num_users": 300, "num_items": 240, "num_events": 9000,
                                "num_topics": 8, "seed": 3}


def test_deterministic_by_seed(data, tmp_path):
    same = str(tmp_path / "same")
    synthetic.generate(SYN, same)
    for name in FILES:
        with open(os.path.join(data["dir"], name), "rb") as a, \
                open(os.path.join(same, name), "rb") as b:
            assert a.read() == b.read(), name
    other = str(tmp_path / "other")
    synthetic.generate(SyntheticConfig(**{**SYN.__dict__, "seed": 4}), other)
    for name in FILES:
        with open(os.path.join(data["dir"], name), "rb") as a, \
                open(os.path.join(other, name), "rb") as b:
            assert a.read() != b.read(), name


def test_sessions_and_gaps(data):
    inter = data["inter"][1:]
    gaps = []
    for user, rows in itertools.groupby(inter, key=lambda r: r[0]):
        ts = [int(r[2]) for r in rows]
        assert ts == sorted(ts), f"clicks of {user} not in time order"
        gaps.extend(np.diff(ts).tolist())
    gaps = np.array(gaps)
    within = gaps <= 3600
    assert 0.6 < within.mean() < 0.95  # mostly bursts, with session breaks
    assert (gaps[within] <= 900).all()  # clicks inside a session are minutes apart
    assert (gaps[~within] > 3600).all() and np.median(gaps[~within]) > 3 * 3600
    sessions = _sessions(inter)
    lengths = np.array([len(s) for s in sessions])
    assert (lengths >= 2).mean() > 0.5 and lengths.mean() > 2.5
    # all clicks lie in the generation window
    ts = np.array([int(r[2]) for r in inter])
    assert ts.min() >= synthetic.T0 and ts.max() < synthetic.T0 + synthetic.WINDOW_S


def test_long_tail_popularity(data):
    counts = np.sort(np.array(list(
        collections.Counter(r[1] for r in data["inter"][1:]).values())))[::-1]
    top = counts[: SYN.num_items // 10].sum() / counts.sum()
    assert top > 0.35  # the top 10 % of items get a large share
    assert np.median(counts) < counts.mean()  # long tail


def test_items_tags_and_topic_titles(data):
    items = data["items"][1:]
    by_topic = collections.defaultdict(list)
    for item_id, title, tags, provider, fmt in items:
        tag_list = tags.split("|")
        assert 1 <= len(tag_list) <= 4 and len(set(tag_list)) == len(tag_list)
        assert all(t == tag_list[0] or ":" in t or t in synthetic.GLOBAL_TAGS
                   for t in tag_list[1:])
        assert fmt in synthetic.FORMATS and provider.startswith("p")
        assert len(title.split()) >= 2
        by_topic[tag_list[0]].append(set(title.lower().split()) - set(synthetic.GENERIC_WORDS))
    assert len(by_topic) == SYN.num_topics

    def jaccard(a, b):
        return len(a & b) / max(1, len(a | b))

    rng = random.Random(0)
    topics = sorted(by_topic)
    same = [jaccard(*rng.sample(by_topic[rng.choice(topics)], 2)) for _ in range(400)]
    cross = []
    for _ in range(400):
        t1, t2 = rng.sample(topics, 2)
        cross.append(jaccard(rng.choice(by_topic[t1]), rng.choice(by_topic[t2])))
    assert np.mean(same) > 0.1 and np.mean(same) > 5 * np.mean(cross)
    assert np.mean(np.array(same) > 0) > 0.4  # same-topic titles often share a word
    # providers mostly publish in one topic
    providers = collections.defaultdict(collections.Counter)
    for _, _, tags, provider, _ in items:
        providers[provider][tags.split("|")[0]] += 1
    main_share = sum(c.most_common(1)[0][1] for c in providers.values()) / len(items)
    assert main_share > 0.6


def test_profiles_carry_topic_signal(data):
    """Users of one gender click topics in a different mix than users of another."""
    gender = {r[0]: r[1] for r in data["users"][1:]}
    topic = {r[0]: r[2].split("|")[0] for r in data["items"][1:]}
    mix = collections.defaultdict(collections.Counter)
    for user, item, _ in data["inter"][1:]:
        mix[gender[user]][topic[item]] += 1
    f, m = mix["F"], mix["M"]
    topics = sorted(set(f) | set(m))
    pf = np.array([f[t] for t in topics], float) / sum(f.values())
    pm = np.array([m[t] for t in topics], float) / sum(m.values())
    assert 0.5 * np.abs(pf - pm).sum() > 0.1  # total variation distance


def test_planted_cooccurrence(data):
    bundles = synthetic.planted_bundles(SYN)
    assert bundles and all(2 <= len(b) <= 3 for b in bundles)
    topic = {r[0]: r[2].split("|")[0] for r in data["items"][1:]}
    assert all(len({topic[i] for i in b}) == 1 for b in bundles)  # a bundle is one topic
    co, n = collections.Counter(), collections.Counter()
    sessions = _sessions(data["inter"][1:])
    for session in sessions:
        distinct = sorted(set(session))
        n.update(distinct)
        for a, b in itertools.combinations(distinct, 2):
            co[(a, b)] += 1
    planted = {tuple(sorted(p)) for b in bundles for p in itertools.combinations(b, 2)}
    bundled = {i for b in bundles for i in b}
    # control: random pairs of the same topic, among items not in bundles
    rng = random.Random(1)
    by_topic = collections.defaultdict(list)
    for item, t in topic.items():
        if item not in bundled:
            by_topic[t].append(item)
    control = set()
    while len(control) < 3 * len(planted):
        members = by_topic[rng.choice(sorted(by_topic))]
        if len(members) >= 2:
            control.add(tuple(sorted(rng.sample(members, 2))))
    planted_mean = np.mean([co[p] for p in planted])
    control_mean = np.mean([co[p] for p in control])
    assert planted_mean > 4 * control_mean and planted_mean > 1.0
    # the pairs with the highest lift (co-occurrence over chance) are mostly planted
    lift = {p: c * len(sessions) / (n[p[0]] * n[p[1]]) for p, c in co.items() if c >= 3}
    top = sorted(lift, key=lambda p: (-lift[p], p))[:30]
    assert sum(p in planted for p in top) >= 12


def test_ensure_generated(tmp_path):
    out = str(tmp_path / "gen")
    small = SyntheticConfig(num_users=20, num_items=30, num_events=300, num_topics=3, seed=1)
    cfg = Config(data=DataConfig(dataset="synthetic", data_dir=out, synthetic=small))
    assert synthetic.ensure_generated(cfg) == out
    assert synthetic.is_generated(small, out)
    path = os.path.join(out, "interactions.tsv")
    os.utime(path, (1, 1))
    synthetic.ensure_generated(cfg)
    assert os.stat(path).st_mtime == 1  # up to date: not rewritten
    cfg2 = cfg.replace({"data.synthetic.seed": 2})
    synthetic.ensure_generated(cfg2)
    assert os.stat(path).st_mtime != 1
    assert synthetic.is_generated(cfg2.data.synthetic, out)
    os.remove(os.path.join(out, "users.tsv"))  # incomplete output is regenerated
    synthetic.ensure_generated(cfg2)
    assert os.path.exists(os.path.join(out, "users.tsv"))
    with pytest.raises(ValueError, match="synthetic"):
        synthetic.ensure_generated(cfg.replace({"data.dataset": "canonical"}))


def test_small_sizes_and_few_items(tmp_path):
    # fewer items than topics, fewer events than users
    counts = synthetic.generate(
        SyntheticConfig(num_users=50, num_items=3, num_events=20, num_topics=10, seed=0),
        str(tmp_path))
    assert counts["events"] == 20 and counts["topics"] == 3
    assert len(_read(str(tmp_path / "interactions.tsv"))) == 21


def test_cli(tmp_path, capsys):
    out = str(tmp_path / "cli")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    args = ["--config", os.path.join(repo, "configs", "synthetic.yaml"), "--out", out,
            "--set", "data.synthetic.num_events=500", "--set", "data.synthetic.num_users=40"]
    assert synthetic.main(args) == 0
    assert "events=500" in capsys.readouterr().out
    assert len(_read(os.path.join(out, "interactions.tsv"))) == 501
    assert synthetic.main(args) == 0
    assert "up to date" in capsys.readouterr().out


def _peak_rss_mb(out_dir, num_events):
    code = (
        "import resource, sys\n"
        "from micrec_tf.config import SyntheticConfig\n"
        "from micrec_tf.data.synthetic import generate\n"
        f"generate(SyntheticConfig(num_users=5000, num_items=2000, num_events={num_events}, "
        f"num_topics=10, seed=5), {out_dir!r}, verbose=False)\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    return int(res.stdout.split()[-1]) / 1024.0


def test_streaming_memory_is_bounded(tmp_path):
    """Peak memory does not grow with the number of events (they are streamed in chunks)."""
    small = _peak_rss_mb(str(tmp_path / "small"), 300_000)
    large = _peak_rss_mb(str(tmp_path / "large"), 1_200_000)
    size_mb = os.path.getsize(tmp_path / "large" / "interactions.tsv") / 2**20
    # holding 1.2 M events as Python strings or rows would add far more than this
    assert large - small < 0.5 * size_mb + 10, (small, large, size_mb)


def test_million_item_config_keeps_a_zipf_like_long_tail(tmp_path):
    """configs/synthetic-1m.yaml at 1/100 of its size (10k items, 100k clicks): most items have a
    handful of clicks or none, a few take most of them. Counted in pure Python from the TSV; the
    uniform-popularity reference (10 clicks per item on average) would give ~0 % of items without
    a click and ~7 % with at most 5."""
    import dataclasses

    from micrec_tf.config import load_config

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    full = load_config(os.path.join(root, "configs", "synthetic-1m.yaml")).data.synthetic
    assert (full.num_items, full.num_events) == (1_000_000, 10_000_000)
    syn = dataclasses.replace(full, num_users=full.num_users // 100,
                              num_items=full.num_items // 100, num_events=full.num_events // 100)
    synthetic.generate(syn, str(tmp_path))
    clicks = collections.Counter(row[1] for row in _read(str(tmp_path / "interactions.tsv"))[1:])
    catalogue = [row[0] for row in _read(str(tmp_path / "items.tsv"))[1:]]
    assert len(catalogue) == syn.num_items and set(clicks) <= set(catalogue)
    per_item = sorted((clicks.get(i, 0) for i in catalogue), reverse=True)
    n = len(per_item)
    no_click = sum(c == 0 for c in per_item) / n
    at_most_5 = sum(c <= 5 for c in per_item) / n
    top_1pct = sum(per_item[:n // 100]) / sum(per_item)
    assert 0.10 <= no_click <= 0.45, no_click
    assert at_most_5 >= 0.6, at_most_5
    assert top_1pct >= 0.3, top_1pct


# ---- content_topic_p: how much an item's content says about its clicks (issue 28, item 6) ----

CONTENT_SYN = SyntheticConfig(num_users=1500, num_items=1200, num_events=36000, num_topics=10,
                              seed=5)


@pytest.fixture(scope="module")
def content_runs(tmp_path_factory):
    """The same sizes and seed at content_topic_p 0, 0.5 and 1.0: {p: {file: bytes}}."""
    import dataclasses

    runs = {}
    for p in (0.0, 0.5, 1.0):
        out = str(tmp_path_factory.mktemp(f"content{p}"))
        synthetic.generate(dataclasses.replace(CONTENT_SYN, content_topic_p=p), out)
        runs[p] = {"dir": out}
        for name in FILES + (synthetic.MARKER,):
            with open(os.path.join(out, name), "rb") as fh:
                runs[p][name] = fh.read()
    return runs


def _rows(raw: bytes):
    lines = raw.decode("utf-8").split("\n")
    assert lines[-1] == ""
    return [line.split("\t") for line in lines[1:-1]]


def _binomial_band(expected, n, sds=4.5):
    sd = (expected * (1.0 - expected) / n) ** 0.5
    return expected - sds * sd, expected + sds * sd


def test_content_topic_p_validation():
    from micrec_tf.config import ConfigError, validate

    for good in (0, 0.0, 0.5, 1, 1.0):
        validate(Config().replace({"data.synthetic.content_topic_p": good}))
    for bad in (-0.1, 1.5, float("nan"), float("inf"), "0.5", True, None):
        cfg = Config()
        cfg.data.synthetic.content_topic_p = bad
        with pytest.raises(ConfigError, match=r"data\.synthetic\.content_topic_p .*got"):
            validate(cfg)
        with pytest.raises(ValueError, match="content_topic_p"):
            synthetic.generate(SyntheticConfig(num_users=5, num_items=5, num_events=10,
                                               num_topics=2, content_topic_p=bad), os.devnull)
    assert SyntheticConfig().content_topic_p == 1.0


def test_content_topic_p_leaves_clicks_and_users_unchanged(content_runs):
    """Only items.tsv depends on content_topic_p; the marker records it except at 1.0 (whose
    marker is the one written before the key existed: the five size/seed keys)."""
    for p in (0.0, 0.5):
        for name in ("interactions.tsv", "users.tsv"):
            assert content_runs[p][name] == content_runs[1.0][name], (p, name)
        assert content_runs[p]["items.tsv"] != content_runs[1.0]["items.tsv"]
        assert json.loads(content_runs[p][synthetic.MARKER])["params"]["content_topic_p"] == p
    assert sorted(json.loads(content_runs[1.0][synthetic.MARKER])["params"]) == [
        "num_events", "num_items", "num_topics", "num_users", "seed"]
    import dataclasses

    # a marker of another content_topic_p is not up to date
    assert synthetic.is_generated(dataclasses.replace(CONTENT_SYN, content_topic_p=0.5),
                                  content_runs[0.5]["dir"])
    assert not synthetic.is_generated(CONTENT_SYN, content_runs[0.5]["dir"])
    assert not synthetic.is_generated(dataclasses.replace(CONTENT_SYN, content_topic_p=0.0),
                                      content_runs[0.5]["dir"])


def test_content_topic_p_redraws_the_whole_content_of_a_share_of_items(content_runs):
    """Against the run at 1.0 (first tag = click topic): an item keeps its click topic's content
    with probability p + (1 - p) / K (the uniform draw may hit it), counted in pure Python; an item
    whose first tag is kept has the very same row (title, tags, provider, format), and the first
    tags stay uniform over the K topics."""
    k = CONTENT_SYN.num_topics
    ref = _rows(content_runs[1.0]["items.tsv"])
    for p in (0.0, 0.5):
        rows = _rows(content_runs[p]["items.tsv"])
        assert [r[0] for r in rows] == [r[0] for r in ref]
        same_tag = [a[2].split("|")[0] == b[2].split("|")[0] for a, b in zip(rows, ref)]
        lo, hi = _binomial_band(p + (1.0 - p) / k, len(rows))
        assert lo <= np.mean(same_tag) <= hi, (p, np.mean(same_tag), lo, hi)
        assert all(a == b for a, b, s in zip(rows, ref, same_tag) if s)
        topics = collections.Counter(r[2].split("|")[0] for r in rows)
        assert len(topics) == k
        lo, hi = _binomial_band(1.0 / k, len(rows))
        assert all(lo <= c / len(rows) <= hi for c in topics.values()), topics


def _co_click_agreement(run):
    """Share of items (with >= 5 co-clicks) whose first tag is the most frequent first tag among
    the other distinct items of the sessions they were clicked in (ties: smallest tag)."""
    tag = {r[0]: r[2].split("|")[0] for r in _rows(run["items.tsv"])}
    neighbours = collections.defaultdict(collections.Counter)
    for session in _sessions(_rows(run["interactions.tsv"])):
        distinct = set(session)
        for i in distinct:
            for j in distinct - {i}:
                neighbours[i][tag[j]] += 1
    agree = [tag[i] == min(c, key=lambda t: (-c[t], t))
             for i, c in neighbours.items() if sum(c.values()) >= 5]
    return float(np.mean(agree)), len(agree)


def test_content_topic_p_sets_how_far_the_first_tag_agrees_with_clicks(content_runs):
    """The pipeline's category (first tag) against the click topic read from the interactions:
    at 0 the agreement is chance (1/K: an item's tag is drawn independently of all clicks), at
    1.0 it is high (sessions stay on one topic), at 0.5 clearly in between."""
    k = CONTENT_SYN.num_topics
    agree = {}
    for p in (0.0, 0.5, 1.0):
        agree[p], n = _co_click_agreement(content_runs[p])
        assert n > 0.8 * CONTENT_SYN.num_items
    lo, hi = _binomial_band(1.0 / k, n)
    assert lo <= agree[0.0] <= hi, (agree, lo, hi)
    assert agree[1.0] > 0.9, agree
    _, half_hi = _binomial_band(1.0 / k, n, sds=10)
    assert half_hi < agree[0.5] < agree[1.0] - 0.2, agree

"""Synthetic items that arrive over time (issue 29): ``data.synthetic.arrival: news``.

References are independent of the generator: SHA-256 digests recorded from the generator before
the arrival keys existed (commit 22ce80e), pure-Python reads of the written files, binomial
bounds, and the expected share of young clicks computed per click from the publication times
alone (with flat popularity, where that expectation is exact).
"""
import collections
import dataclasses
import hashlib
import json
import math
import os

import numpy as np
import pytest

from micrec_tf.config import Config, ConfigError, SyntheticConfig, load_config, validate
from micrec_tf.data import synthetic

T0 = 1672531200  # 2023-01-01 00:00:00 UTC, the generator's documented start of the click span
DAY = 86400
FILES = ("interactions.tsv", "items.tsv", "users.tsv")

# Digests of the three files, generated at commit 22ce80e (before the arrival keys existed).
BEFORE = [
    (SyntheticConfig(num_users=300, num_items=240, num_events=9000, num_topics=8, seed=3),
     {"interactions.tsv": "fa4c4c66639bb866de4527c37869f0498a4df649c5df3435ca2d7e568d16a840",
      "items.tsv": "dbc8741179050953b2e3f1c6c94901d7e8332c378fc1b6c49fad6a5d1629cc63",
      "users.tsv": "2ecbb6715349f216513cb6555104b9a29abba054d423adc97198955bd002d010"}),
    # two chunks of users (more than CHUNK_EVENTS = 262144 clicks)
    (SyntheticConfig(num_users=4000, num_items=3000, num_events=300000, num_topics=12, seed=11),
     {"interactions.tsv": "4268fdb10a26a622326c2a1826752c844bdab7d9be29223823f39b0964afcb0e",
      "items.tsv": "646228b2cb7b7a3a5c76dbc9de345c60d3e8011e9f55ef4b33c1e0a4650685fe",
      "users.tsv": "35d6648ea1052e0849a61f722adcb9956d85a429e5f496779f191fd15f6eb3a8"}),
    (SyntheticConfig(num_users=200, num_items=150, num_events=5000, num_topics=5, seed=5,
                     content_topic_p=0.5),
     {"interactions.tsv": "5e10e79eb2ef9a16371dd592d9d1d920bb5a3c466e5f42c7cca91ab91e8cb48e",
      "items.tsv": "31e4673d8f9495d596e33c5bd8c1afce5c9ad68c4f5cdc5d1c0fac0855691fa6",
      "users.tsv": "f54de68f23ab09326aeef6d6b2e1a4d3cd30736da7ff51d672fbb0bba4392891"}),
]

NEWS = SyntheticConfig(num_users=3000, num_items=4000, num_events=120000, num_topics=8, seed=3,
                       arrival="news", initial_item_share=0.2, publish_span_s=120 * DAY,
                       interest_half_life_s=2 * DAY)


def _rows(path):
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    assert text.endswith("\n")
    return [line.split("\t") for line in text[:-1].split("\n")]


def _digests(out):
    return {f: hashlib.sha256(open(os.path.join(out, f), "rb").read()).hexdigest()
            for f in FILES}


def _read_news(out):
    """(published {item: int}, topic {item: first tag}, clicks [(user, item, ts)])."""
    pub_rows = _rows(os.path.join(out, "item_published.tsv"))
    assert pub_rows[0] == ["item_id", "published"]
    published = {i: int(p) for i, p in pub_rows[1:]}
    topic = {r[0]: r[2].split("|")[0] for r in _rows(os.path.join(out, "items.tsv"))[1:]}
    clicks = [(u, i, int(t)) for u, i, t in _rows(os.path.join(out, "interactions.tsv"))[1:]]
    return published, topic, clicks


@pytest.fixture(scope="module")
def news(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("news"))
    synthetic.generate(NEWS, out)
    plain = str(tmp_path_factory.mktemp("plain"))
    synthetic.generate(dataclasses.replace(NEWS, arrival="none"), plain)
    published, topic, clicks = _read_news(out)
    return {"dir": out, "plain": plain, "published": published, "topic": topic,
            "clicks": clicks}


# ---- arrival none: the generator before the keys, byte for byte ----

@pytest.mark.parametrize("case", range(len(BEFORE)))
def test_default_output_is_the_recorded_output_of_before(tmp_path, case):
    syn, digests = BEFORE[case]
    assert syn.arrival == "none"
    out = str(tmp_path / "default")
    synthetic.generate(syn, out)
    assert _digests(out) == digests
    assert not os.path.exists(os.path.join(out, "item_published.tsv"))
    # the news keys are not read at arrival none
    other = str(tmp_path / "other")
    synthetic.generate(dataclasses.replace(syn, initial_item_share=0.9, publish_span_s=DAY,
                                           interest_half_life_s=3600), other)
    assert _digests(other) == digests
    # the marker is that of before: no arrival key, so old markers still match
    with open(os.path.join(out, synthetic.MARKER)) as fh:
        params = json.load(fh)["params"]
    assert set(params) == {"num_users", "num_items", "num_events", "num_topics", "seed"} | (
        {"content_topic_p"} if syn.content_topic_p != 1.0 else set())
    assert synthetic.is_generated(syn, out)


def test_news_changes_only_which_item_a_click_lands_on(news):
    """Items, titles, tags, users, click users and click times are those of arrival none."""
    for f in ("items.tsv", "users.tsv"):
        with open(os.path.join(news["dir"], f), "rb") as a, \
                open(os.path.join(news["plain"], f), "rb") as b:
            assert a.read() == b.read(), f
    plain = _rows(os.path.join(news["plain"], "interactions.tsv"))[1:]
    assert len(plain) == len(news["clicks"]) == NEWS.num_events
    assert [(u, int(t)) for u, _, t in plain] == [(u, t) for u, _, t in news["clicks"]]
    moved = sum(p[1] != c[1] for p, c in zip(plain, news["clicks"]))
    assert moved > 0.5 * NEWS.num_events


# ---- arrival news ----

def test_no_click_before_its_items_publication(news):
    published = news["published"]
    assert set(published) == set(news["topic"])  # every catalogue item, nothing else
    early = [(u, i, t) for u, i, t in news["clicks"] if t < published[i]]
    assert early == []


def test_publication_times_cover_the_span_as_documented(tmp_path):
    syn = dataclasses.replace(NEWS, num_items=20000, num_users=200, num_events=2000, seed=9,
                              initial_item_share=0.3, publish_span_s=40 * DAY)
    out = str(tmp_path / "pub")
    synthetic.generate(syn, out)
    rows = _rows(os.path.join(out, "item_published.tsv"))
    items = _rows(os.path.join(out, "items.tsv"))[1:]
    assert [r[0] for r in rows[1:]] == [r[0] for r in items]  # catalogue order
    pub = {i: int(p) for i, p in rows[1:]}
    assert all(T0 <= p < T0 + syn.publish_span_s for p in pub.values())
    # every topic's earliest item is at T0 (the first tag is the topic at content_topic_p 1)
    earliest = {}
    for item_id, _, tags, *_ in items:
        k = tags.split("|")[0]
        earliest[k] = min(earliest.get(k, math.inf), pub[item_id])
    assert len(earliest) == syn.num_topics and set(earliest.values()) == {T0}
    # a share initial_item_share at T0 (binomial, 5 sigma; plus at most one per topic)
    n = syn.num_items
    at_start = sum(p == T0 for p in pub.values())
    sigma = math.sqrt(n * 0.3 * 0.7)
    assert abs(at_start - 0.3 * n) < 5 * sigma + syn.num_topics
    # the others uniform over [T0, T0 + span): each tenth holds a tenth of them (5 sigma)
    rest = [p - T0 for p in pub.values() if p != T0]
    tenths = collections.Counter(p * 10 // syn.publish_span_s for p in rest)
    assert set(tenths) == set(range(10))
    for k in range(10):
        assert abs(tenths[k] - len(rest) / 10) < 5 * math.sqrt(len(rest) * 0.1 * 0.9), tenths
    assert max(rest) > syn.publish_span_s * 0.99


def _young_share_reference(published, topic, clicks, half_life, decay=None):
    """Per click at ts in topic k, with flat popularity: sum over the items of k published in
    (ts - h, ts] of 2^(-age/d), over the same sum for all items of k published by ts (h =
    ``half_life``, d = ``decay``, default h); returns (observed share of clicks with age < h,
    mean of that expectation)."""
    decay = decay or half_life
    by_topic = collections.defaultdict(list)
    for item, p in published.items():
        by_topic[topic[item]].append(p)
    prefix = {}
    for k, ps in by_topic.items():
        ps = np.sort(np.array(ps, dtype=np.int64))
        w = np.exp2((ps - T0) / decay)  # 2^(-age/d) = 2^(-(ts-T0)/d) * 2^((p-T0)/d)
        prefix[k] = (ps, np.concatenate(([0.0], np.cumsum(w))))
    observed, expected = [], []
    for _, item, ts in clicks:
        ps, cw = prefix[topic[item]]
        total = cw[np.searchsorted(ps, ts, side="right")]
        old = cw[np.searchsorted(ps, ts - half_life, side="right")]  # published <= ts - h
        expected.append((total - old) / total)
        observed.append(ts - published[item] < half_life)
    return float(np.mean(observed)), float(np.mean(expected))


@pytest.mark.parametrize("half_life", [2 * DAY, 20000])
def test_click_age_follows_the_decay(tmp_path, monkeypatch, half_life):
    """Flat popularity and no bundle follows (module constants patched), so a click at ts in
    topic k lands on an item of k published by ts with probability proportional to 2^(-age/h):
    the share of clicks younger than one half-life equals the expectation computed from the
    publication times alone (about 120 k clicks: the binomial sigma is about 0.0015)."""
    monkeypatch.setattr(synthetic, "ZIPF_ALPHA", 0.0)
    monkeypatch.setattr(synthetic, "BUNDLE_FOLLOW_P", 0.0)
    syn = dataclasses.replace(NEWS, interest_half_life_s=half_life)
    out = str(tmp_path / "flat")
    synthetic.generate(syn, out)
    published, topic, clicks = _read_news(out)
    observed, expected = _young_share_reference(published, topic, clicks, half_life)
    assert abs(observed - expected) < 0.01, (observed, expected)
    # the reference tells decays apart: a 4x slower decay expects far fewer young clicks
    _, expected_slow = _young_share_reference(published, topic, clicks, half_life,
                                              decay=4 * half_life)
    assert expected_slow < observed - 0.1, (observed, expected_slow)


def test_late_items_have_fewer_clicks_than_early_ones(news):
    counts = collections.Counter(i for _, i, _ in news["clicks"])
    span = NEWS.publish_span_s

    def mean_clicks(lo, hi):
        ids = [i for i, p in news["published"].items() if lo <= p - T0 < hi]
        assert len(ids) > 100
        return sum(counts[i] for i in ids) / len(ids)

    assert mean_clicks(0, span // 2) > 1.5 * mean_clicks(span * 9 // 10, span)
    # and clicks concentrate on young items at the default (Zipf) popularity too
    young = sum(t - news["published"][i] < NEWS.interest_half_life_s
                for _, i, t in news["clicks"])
    assert young / len(news["clicks"]) > 0.3


def test_marker_and_stale_publication_file(tmp_path):
    syn = dataclasses.replace(NEWS, num_users=100, num_items=200, num_events=3000)
    out = str(tmp_path / "m")
    synthetic.generate(syn, out)
    with open(os.path.join(out, synthetic.MARKER)) as fh:
        params = json.load(fh)["params"]
    assert params["arrival"] == "news" and params["interest_half_life_s"] == 2 * DAY
    assert synthetic.is_generated(syn, out)
    assert not synthetic.is_generated(dataclasses.replace(syn, interest_half_life_s=DAY), out)
    assert not synthetic.is_generated(dataclasses.replace(syn, arrival="none"), out)
    os.remove(os.path.join(out, "item_published.tsv"))
    assert not synthetic.is_generated(syn, out)
    synthetic.generate(syn, out)
    # back to none: the publication file of the news run is removed
    synthetic.generate(dataclasses.replace(syn, arrival="none"), out)
    assert not os.path.exists(os.path.join(out, "item_published.tsv"))
    assert synthetic.is_generated(dataclasses.replace(syn, arrival="none"), out)


def test_arrival_validation():
    assert SyntheticConfig().arrival == "none"
    for good in ({"data.synthetic.arrival": "news"},
                 {"data.synthetic.arrival": "news", "data.synthetic.initial_item_share": 0},
                 {"data.synthetic.arrival": "news", "data.synthetic.publish_span_s": 3600,
                  "data.synthetic.interest_half_life_s": 4}):
        validate(Config().replace(good))
    bad = [("arrival", "daily"),
           ("initial_item_share", 1.5), ("initial_item_share", -0.1),
           ("publish_span_s", 0), ("publish_span_s", 120 * DAY + 1),
           ("interest_half_life_s", 0),
           ("interest_half_life_s", 11520 - 1)]  # span 120 days / 900 = 11520 s
    for key, value in bad:
        cfg = Config().replace({"data.synthetic.arrival": "news"})
        setattr(cfg.data.synthetic, key, value)
        with pytest.raises(ConfigError, match=rf"data\.synthetic\.{key} .*got {value!r}"):
            validate(cfg)
        with pytest.raises(ValueError, match=key):
            synthetic.generate(dataclasses.replace(cfg.data.synthetic, num_users=2, num_items=2,
                                                   num_events=4, num_topics=2), os.devnull)
    # at arrival none the news keys are not read
    cfg = Config()
    cfg.data.synthetic.interest_half_life_s = 0
    validate(cfg)


def test_the_arrival_config_is_the_scale_benchmarks_100k_world():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = load_config(os.path.join(root, "configs", "synthetic-arrival.yaml"))
    syn = cfg.data.synthetic
    assert (syn.num_items, syn.num_users, syn.num_events) == (100000, 50000, 1000000)
    assert syn.arrival == "news" and syn.seed == 7 and syn.num_topics == 20
    assert cfg.data.data_dir == "data/generated/synthetic-arrival"

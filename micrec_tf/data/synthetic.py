"""Deterministic synthetic dataset in the canonical TSV format (docs/ARCHITECTURE.md).

``generate(syn, out_dir)`` writes ``interactions.tsv``, ``items.tsv`` and ``users.tsv`` (UTF-8,
tab-separated, one header line) and returns the counts. The same :class:`SyntheticConfig` (seed
included) always gives the same bytes. What is planted in the data:

* **Topics.** Every item belongs to one of ``num_topics`` topics. Its first tag is the topic
  (so the pipeline's ``category`` is the topic), 0-3 more tags are drawn around the topic
  (sub-topic tags, sometimes a global tag), its provider mostly publishes in that topic, and its
  title is made of topic words (plus a few generic words), so title neighbours share topics.
* **Users** have a gender, an age bucket and a region, and sparse topic preferences (Dirichlet)
  mixed with a prior that depends on those profile fields, so profiles carry signal.
* **Popularity** is Zipf-like (``1 / rank^1.05`` within the sampling of each topic): a few hits
  and a long tail.
* **Sessions.** Each user's clicks come in sessions (bursts of a few clicks, seconds to minutes
  apart, well within an hour); sessions are more than an hour apart (hours to days). Each session
  has a topic drawn from the user's preferences; some clicks stray to other topics.
* **Content topic** (``content_topic_p``, default 1.0). With probability ``content_topic_p`` an
  item's side information (title words, tags including the first one, provider, format) comes
  from its click topic as above; otherwise from a content topic drawn uniformly over all topics
  (it may happen to be the click topic), independently of everything else, while its clicks,
  popularity and bundle still follow its click topic. At 0 the content says nothing about who
  clicks an item (an honest control for content-based transfer, issue 28); at 1.0 (the default)
  the output is byte for byte that of the generator before the knob existed: the content draws
  come from a separate random stream (the fourth child of ``SeedSequence(seed)``), read only
  when ``content_topic_p < 1``.
* **Bundles.** About a third of the items form bundles of 2-3 items of one topic; after a click on
  a bundled item the next click of the session is its bundle partner with probability 0.5, so
  bundle pairs co-occur in sessions far more often than chance.
* **Arrival** (``arrival``, default ``none``; issue 29). At ``none`` every item exists from the
  start: the output is byte for byte that of the generator before the key (``initial_item_share``,
  ``publish_span_s`` and ``interest_half_life_s`` are then not read). At ``news`` each item gets a
  publication time: a share ``initial_item_share`` of the items (and the earliest item of every
  topic) at ``T0``, the others uniform over ``[T0, T0 + publish_span_s)`` (whole seconds), drawn
  from a separate random stream (the fifth child of ``SeedSequence(seed)``), so the items,
  titles, tags, bundles and users are those of ``none``, byte for byte, and the click times and
  session topics too. Only which item a click lands on changes: a click at time ``t`` in topic
  ``k`` picks an item of topic ``k`` published at or before ``t`` with probability proportional
  to ``popularity * 2^(-(t - published) / interest_half_life_s)`` (interest decays with age, as in
  news), and a bundle follow goes to the partner only when it is published by then. The
  publication times are written to ``item_published.tsv`` (``item_id  published``, Unix seconds,
  catalogue order; not an item extra field, which every reader would turn into a categorical
  feature), so the rolling protocol can tell when an item appeared.

Events are generated in chunks of users and streamed to the files (memory stays bounded up to
10 M events and beyond); each user's clicks are written in time order, users one after another.
``ensure_generated(cfg)`` generates into ``cfg.data.data_dir`` only when the files are missing or
were generated with other parameters (recorded in ``_generated.json``).

CLI: ``python -m micrec_tf.data.synthetic --config configs/synthetic.yaml [--out DIR] [--force]``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

import numpy as np

from micrec_tf.config import (SYNTHETIC_WINDOW_S, Config, SyntheticConfig,
                              synthetic_arrival_error)

GENERATOR_VERSION = 1
MARKER = "_generated.json"
FILES = ("interactions.tsv", "items.tsv", "users.tsv")
PUBLISHED_FILE = "item_published.tsv"  # arrival news only: item_id, published (Unix seconds)
USER_FIELDS = ("gender", "age", "region")
ITEM_EXTRA_FIELDS = ("format",)
ARRIVAL_KEYS = ("arrival", "initial_item_share", "publish_span_s", "interest_half_life_s")

T0 = 1672531200  # 2023-01-01 00:00:00 UTC
# 120 days: every user's clicks lie in [T0, T0 + WINDOW_S) (unless very heavy); config.validate
# bounds data.synthetic.publish_span_s by it
WINDOW_S = SYNTHETIC_WINDOW_S
SESSION_GAP_MIN_S = 3700  # sessions are always more than an hour apart
MEAN_SESSION_LEN = 5.0
BUNDLE_FOLLOW_P = 0.5
OFF_TOPIC_P = 0.12  # a click from another topic of the user's preferences
RANDOM_TOPIC_P = 0.03  # a click from a uniformly random topic
ZIPF_ALPHA = 1.05
CHUNK_EVENTS = 1 << 18

GENDERS = ("F", "M", "U")
GENDER_P = (0.48, 0.48, 0.04)
AGES = ("<18", "18-24", "25-34", "35-44", "45-54", "55+")
AGE_P = (0.06, 0.22, 0.30, 0.20, 0.13, 0.09)
REGIONS = ("north", "south", "east", "west", "central", "coast", "mountain", "islands")
FORMATS = ("article", "video", "gallery", "podcast", "review", "howto")
GLOBAL_TAGS = ("trending", "editors-pick", "classic", "new", "longread", "local")
GENERIC_WORDS = ("the", "new", "best", "guide", "top", "how", "why", "inside", "story", "week",
                 "first", "look", "ultimate", "daily", "big", "secret", "complete", "today")

# (topic name, topic words); the first six words also name its sub-topic tags.
THEMES = (
    ("sports", "football soccer tennis goal stadium league coach champion match score "
               "tournament athlete"),
    ("finance", "stocks market investor bank dividend inflation bonds portfolio trading "
                "economy budget savings"),
    ("cooking", "recipe pasta kitchen baking chef dessert soup grill spice flavor dinner "
                "bread"),
    ("travel", "beach island flight hotel passport journey resort cruise backpacking "
               "destination luggage sightseeing"),
    ("technology", "smartphone software laptop processor robot startup gadget internet "
                   "algorithm chip cloud app"),
    ("music", "guitar album concert singer band piano melody festival rapper jazz orchestra "
              "lyrics"),
    ("movies", "film director actor cinema trailer blockbuster sequel oscar screenplay "
               "studio premiere comedy"),
    ("health", "fitness diet vitamin doctor sleep workout nutrition heart yoga wellness "
               "therapy immune"),
    ("science", "physics telescope galaxy experiment molecule genome laboratory quantum "
                "fossil climate research planet"),
    ("politics", "election senate president campaign vote policy congress governor debate "
                 "parliament minister law"),
    ("automotive", "car engine electric truck racing motor tires sedan hybrid dealership "
                   "horsepower garage"),
    ("fashion", "dress style designer runway jacket shoes trend model boutique denim "
                "accessories couture"),
    ("gaming", "console videogame multiplayer esports quest controller level boss arcade "
               "rpg streamer puzzle"),
    ("gardening", "garden flowers seeds soil tomato orchard compost roses lawn herbs "
                  "greenhouse harvest"),
    ("pets", "dog cat puppy kitten veterinarian leash aquarium parrot grooming breed "
             "adoption hamster"),
    ("home", "furniture kitchenware decor sofa renovation lighting carpet interior "
             "storage bedroom cleaning paint"),
    ("books", "novel author poetry library bestseller chapter fiction memoir publisher "
              "reading biography thriller"),
    ("weather", "storm rain snow forecast hurricane temperature wind sunshine flood "
                "drought tornado heatwave"),
    ("parenting", "baby toddler school parents family homework childcare teenager "
                  "playground nursery bedtime toys"),
    ("art", "painting museum sculpture gallery canvas artist exhibition portrait sketch "
            "watercolor mural photography"),
)

_SYLLABLES = ("ka", "lo", "mi", "ren", "tas", "vo", "shi", "dor", "pel", "zu", "qua", "bri",
              "nel", "tor", "fa", "gim", "xe", "hul", "sor", "yan")


def _topics(num_topics: int, rng: np.random.Generator) -> list[tuple[str, list[str]]]:
    """Topic names and word lists; beyond the 20 themes a theme is reused with new words."""
    out, seen = [], set()
    for k in range(num_topics):
        name, words = THEMES[k % len(THEMES)]
        words = words.split()
        if k >= len(THEMES):
            name = f"{name}{k // len(THEMES) + 1}"
            fresh = []
            while len(fresh) < 6:
                word = "".join(rng.choice(_SYLLABLES, size=3))
                if word not in seen:
                    seen.add(word)
                    fresh.append(word)
            words = fresh + words[6:]  # distinct sub-topic tags and title words
        out.append((name, words))
    return out


@dataclasses.dataclass
class _World:
    """Everything about items and the profile -> topic prior, shared by all user chunks."""

    num_topics: int
    topic_of: np.ndarray  # [I]
    # Items sorted by topic; cum[j] = topic + within-topic CDF, so searchsorted(cum, k + u) picks
    # an item of topic k with probability proportional to its popularity.
    sorted_items: np.ndarray
    cum: np.ndarray
    partner: np.ndarray  # [I], -1 if not in a bundle
    prior_gender: np.ndarray  # [3, K] logits
    prior_age: np.ndarray  # [6, K]
    prior_region: np.ndarray  # [R, K]
    num_bundles: int
    pop: np.ndarray | None = None  # [I] Zipf-like popularity (read by arrival news)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _content_topics(syn: SyntheticConfig, topic_of: np.ndarray, k_eff: int) -> np.ndarray:
    """[I] the topic of each item's side information: its click topic with probability
    ``syn.content_topic_p``, else uniform over the ``k_eff`` topics. Drawn from the fourth child
    of ``SeedSequence(syn.seed)`` (the world, activity and event streams are the first three), so
    the other draws do not move; at 1.0 nothing is drawn and the click topics are returned."""
    p = float(syn.content_topic_p)
    if p >= 1.0:
        return topic_of
    rng = np.random.default_rng(np.random.SeedSequence(syn.seed).spawn(4)[3])
    keep = rng.random(len(topic_of)) < p
    drawn = rng.integers(0, k_eff, size=len(topic_of))
    return np.where(keep, topic_of, drawn).astype(np.int64)


def _make_items(syn: SyntheticConfig, rng: np.random.Generator, items_path: str) -> _World:
    num_items = syn.num_items
    k_eff = min(syn.num_topics, num_items)  # every topic used has at least one item
    topics = _topics(k_eff, rng)
    num_words = len(topics[0][1])
    topic_of = (rng.permutation(num_items) % k_eff).astype(np.int64)
    content_of = _content_topics(syn, topic_of, k_eff)  # == topic_of at content_topic_p 1.0

    # Zipf-like popularity from a random rank per item.
    rank = rng.permutation(num_items)
    pop = 1.0 / np.power(rank + 1.0, ZIPF_ALPHA)

    order = np.argsort(topic_of, kind="stable")  # items sorted by topic
    sizes = np.bincount(topic_of, minlength=k_eff)
    first = np.concatenate(([0], np.cumsum(sizes)[:-1]))
    cum = np.empty(num_items, dtype=np.float64)
    for k in range(k_eff):
        c = np.cumsum(pop[order[first[k]:first[k] + sizes[k]]])
        cum[first[k]:first[k] + sizes[k]] = k + c / c[-1]
        cum[first[k] + sizes[k] - 1] = k + 1.0  # exact upper end despite round-off

    # Bundles of 2-3 items of one topic; partner = the next item of the bundle (cyclic).
    partner = np.full(num_items, -1, dtype=np.int64)
    num_bundles = 0
    for k in range(k_eff):
        members = order[first[k]:first[k] + sizes[k]]
        chosen = rng.permutation(members)[: int(len(members) * 0.35)]
        triple = rng.random(len(chosen)) < 0.3
        i = 0
        while len(chosen) - i >= 2:
            size = 3 if (len(chosen) - i >= 3 and triple[i]) else 2
            group = chosen[i:i + size]
            partner[group] = np.roll(group, -1)
            num_bundles += 1
            i += size

    # Providers: each has a home topic; an item's provider is mostly one of its topic.
    num_providers = max(k_eff, num_items // 40)
    provider_topic = np.arange(num_providers) % k_eff
    by_topic = [np.flatnonzero(provider_topic == k) for k in range(k_eff)]
    format_p = rng.dirichlet(np.full(len(FORMATS), 0.7), size=k_eff)

    # All per-item random draws at once (the loop below only formats strings).
    n_tags = rng.integers(0, 4, size=num_items)
    sub_tag = rng.integers(0, 6, size=(num_items, 3))
    global_tag = np.where(rng.random((num_items, 3)) < 0.85, -1,
                          rng.integers(0, len(GLOBAL_TAGS), size=(num_items, 3)))
    n_topic_words = rng.integers(2, 5, size=num_items)
    topic_words = np.argsort(rng.random((num_items, num_words)), axis=1)[:, :4]
    n_generic = rng.integers(0, 3, size=num_items)
    generic = np.argsort(rng.random((num_items, len(GENERIC_WORDS))), axis=1)[:, :2]
    other_topic = np.where(rng.random(num_items) < 0.1,
                           (topic_of + rng.integers(1, max(k_eff, 2), size=num_items)) % k_eff,
                           -1) if k_eff > 1 else np.full(num_items, -1)
    # the stray title word is of a topic other than the content topic (same offset)
    other_topic = np.where(other_topic >= 0, (other_topic - topic_of + content_of) % k_eff, -1)
    other_word = rng.integers(0, num_words, size=num_items)
    shuffle_key = rng.random((num_items, 7))
    own_provider = rng.random(num_items) < 0.8
    provider_pick = rng.integers(0, 1 << 30, size=num_items)
    any_provider = rng.integers(0, num_providers, size=num_items)
    fmt = _sample_rows(format_p[content_of], rng)  # one uniform per item, whatever the rows

    with open(items_path, "w", encoding="utf-8", newline="\n") as fh:
        fh.write("\t".join(("item_id", "title", "tags", "provider") + ITEM_EXTRA_FIELDS) + "\n")
        lines = []
        for item in range(num_items):
            k = int(content_of[item])  # side information follows the content topic
            name, words = topics[k]
            # tags: topic first, then 0-3 sub-topic tags (sometimes a global tag)
            tags = [name]
            for j in range(int(n_tags[item])):
                g = int(global_tag[item, j])
                tag = GLOBAL_TAGS[g] if g >= 0 else f"{name}:{words[int(sub_tag[item, j])]}"
                if tag not in tags:
                    tags.append(tag)
            # title: 2-4 topic words, 0-2 generic words, rarely a word of another topic
            parts = [words[int(w)] for w in topic_words[item, :n_topic_words[item]]]
            parts += [GENERIC_WORDS[int(w)] for w in generic[item, :n_generic[item]]]
            if other_topic[item] >= 0:
                parts.append(topics[int(other_topic[item])][1][int(other_word[item])])
            key = shuffle_key[item]
            parts = [parts[j] for j in sorted(range(len(parts)), key=lambda j: key[j])]
            title = " ".join(p.capitalize() for p in parts)
            if own_provider[item]:
                prov = int(by_topic[k][provider_pick[item] % len(by_topic[k])])
            else:
                prov = int(any_provider[item])
            lines.append(f"i{item}\t{title}\t{'|'.join(tags)}\tp{prov}\t{FORMATS[fmt[item]]}\n")
            if len(lines) >= 100000:
                fh.write("".join(lines))
                lines = []
        fh.write("".join(lines))

    return _World(
        num_topics=k_eff, topic_of=topic_of, sorted_items=order, cum=cum, partner=partner,
        prior_gender=rng.normal(0.0, 1.0, size=(len(GENDERS), k_eff)),
        prior_age=rng.normal(0.0, 1.0, size=(len(AGES), k_eff)),
        prior_region=rng.normal(0.0, 0.7, size=(len(REGIONS), k_eff)),
        num_bundles=num_bundles, pop=pop)


def publication_times(syn: SyntheticConfig, topic_of: np.ndarray) -> np.ndarray:
    """[I] int64 Unix publication second of each item (arrival ``news``).

    A share ``syn.initial_item_share`` of the items (a Bernoulli draw per item) is published at
    ``T0``, the others uniformly over ``[T0, T0 + publish_span_s)``; then the earliest item of
    each topic (``topic_of`` [I], the click topics) is moved to ``T0``. Drawn from the fifth child
    of ``SeedSequence(syn.seed)``, so no other draw moves."""
    rng = np.random.default_rng(np.random.SeedSequence(syn.seed).spawn(5)[4])
    n = len(topic_of)
    initial = rng.random(n) < float(syn.initial_item_share)
    offset = np.floor(rng.random(n) * int(syn.publish_span_s)).astype(np.int64)
    offset[initial] = 0
    by_topic = np.lexsort((offset, topic_of))  # topic, then publication, then item
    firsts = by_topic[np.concatenate(([True], np.diff(topic_of[by_topic]) != 0))]
    offset[firsts] = 0
    return T0 + offset


@dataclasses.dataclass
class _Arrival:
    """Items of each topic in publication order, with the prefix sums of their decay weights."""

    published: np.ndarray  # [I] int64 Unix seconds
    order: np.ndarray  # [I] items by (topic, publication, item)
    first: np.ndarray  # [K] start of each topic in ``order``
    sizes: np.ndarray  # [K]
    # within each topic's segment: cumulative popularity * 2^((published - T0) / half-life)
    cum: np.ndarray  # [I] float64
    pub_sorted: np.ndarray  # [I] int64 published of ``order``


def _make_arrival(syn: SyntheticConfig, world: "_World", pop: np.ndarray) -> _Arrival:
    published = publication_times(syn, world.topic_of)
    order = np.lexsort((published, world.topic_of))
    k_eff = world.num_topics
    sizes = np.bincount(world.topic_of, minlength=k_eff)
    first = np.concatenate(([0], np.cumsum(sizes)[:-1]))
    # popularity * 2^(-age/h) = 2^(-(t - T0)/h) * popularity * 2^((published - T0)/h): the first
    # factor is common to every item at time t, so prefix sums of the second sample exactly
    weight = pop[order] * np.exp2((published[order] - T0) / float(syn.interest_half_life_s))
    cum = np.empty(len(order), dtype=np.float64)
    for k in range(k_eff):
        cum[first[k]:first[k] + sizes[k]] = np.cumsum(weight[first[k]:first[k] + sizes[k]])
    return _Arrival(published=published, order=order, first=first, sizes=sizes, cum=cum,
                    pub_sorted=published[order])


def _pick_published(arr: _Arrival, topic: np.ndarray, ts: np.ndarray,
                    u: np.ndarray) -> np.ndarray:
    """[n] items: for each click, an item of ``topic`` published at or before ``ts``, with
    probability proportional to its decay weight at ``ts``; ``u`` [n] uniforms in [0, 1)."""
    out = np.empty(len(topic), dtype=np.int64)
    for k in np.unique(topic).tolist():
        sel = np.flatnonzero(topic == k)
        a, size = int(arr.first[k]), int(arr.sizes[k])
        pub, cum = arr.pub_sorted[a:a + size], arr.cum[a:a + size]
        end = np.searchsorted(pub, ts[sel], side="right")  # >= 1: the first is at T0 <= ts
        end = np.maximum(end, 1)
        j = np.searchsorted(cum, u[sel] * cum[end - 1], side="right")
        out[sel] = arr.order[a + np.minimum(j, end - 1)]
    return out


def planted_bundles(syn: SyntheticConfig) -> list:
    """The planted bundles of ``syn`` as tuples of item ids (for tests and benchmarks)."""
    world_seq = np.random.SeedSequence(syn.seed).spawn(3)[0]
    world = _make_items(syn, np.random.default_rng(world_seq), os.devnull)
    seen, out = set(), []
    for item in np.flatnonzero(world.partner >= 0).tolist():
        if item in seen:
            continue
        group, cur = [], item
        while cur not in seen:
            seen.add(cur)
            group.append(f"i{cur}")
            cur = int(world.partner[cur])
        out.append(tuple(group))
    return out


def _events_per_user(syn: SyntheticConfig, rng: np.random.Generator) -> np.ndarray:
    """Heavy-tailed activity, summing exactly to ``num_events``."""
    u, e = syn.num_users, syn.num_events
    w = rng.lognormal(0.0, 1.0, size=u)
    w = np.minimum(w, 20.0 * np.median(w))
    base = min(2, e // u)  # everyone gets a couple of clicks when there are enough events
    counts = np.full(u, base, dtype=np.int64)
    counts += rng.multinomial(e - base * u, w / w.sum())
    return counts


def _sample_rows(cdf_rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One categorical draw per row of probabilities (rows sum to 1)."""
    cum = np.cumsum(cdf_rows, axis=1)
    u = rng.random(len(cdf_rows))[:, None]
    return np.minimum((u > cum).sum(axis=1), cdf_rows.shape[1] - 1)


def _chunk(world: _World, counts: np.ndarray, first_user: int, rng: np.random.Generator,
           users_fh, inter_fh, arrival: _Arrival | None = None) -> int:
    """Users ``first_user ..`` with ``counts`` clicks each: writes their rows, returns sessions.

    ``arrival`` (news) defers the choice of items until the click times are known; the random
    draws are the same, in the same order, either way."""
    b = len(counts)
    k = world.num_topics
    gender = rng.choice(len(GENDERS), size=b, p=GENDER_P)
    age = rng.choice(len(AGES), size=b, p=AGE_P)
    region = rng.integers(0, len(REGIONS), size=b)
    prior = _softmax(world.prior_gender[gender] + world.prior_age[age]
                     + world.prior_region[region])
    pref = 0.6 * rng.dirichlet(np.full(k, 0.3), size=b) + 0.4 * prior

    users_fh.write("".join(
        f"u{first_user + j}\t{GENDERS[g]}\t{AGES[a]}\t{REGIONS[r]}\n"
        for j, (g, a, r) in enumerate(zip(gender.tolist(), age.tolist(), region.tolist()))))

    n = int(counts.sum())
    if n == 0:
        return 0
    local = np.repeat(np.arange(b), counts)  # local user of each event
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    pos = np.arange(n) - np.repeat(starts, counts)
    new = (pos == 0) | (rng.random(n) < 1.0 / MEAN_SESSION_LEN)
    sid = np.cumsum(new) - 1
    num_sessions = int(sid[-1]) + 1

    # topics: one per session from the user's preferences; some clicks stray
    topic = _sample_rows(pref[local[new]], rng)[sid]
    r = rng.random(n)
    stray = r < OFF_TOPIC_P
    if stray.any():
        topic[stray] = _sample_rows(pref[local[stray]], rng)
    rand = (r >= OFF_TOPIC_P) & (r < OFF_TOPIC_P + RANDOM_TOPIC_P)
    topic[rand] = rng.integers(0, k, size=int(rand.sum()))
    if arrival is None:
        idx = np.searchsorted(world.cum, topic + rng.random(n), side="right")
        items = world.sorted_items[np.minimum(idx, len(world.sorted_items) - 1)]

        # planted bundles: the next click of the session is often the partner
        if n > 1:
            nxt = world.partner[items[:-1]]
            follow = (nxt >= 0) & ~new[1:] & (rng.random(n - 1) < BUNDLE_FOLLOW_P)
            items[1:][follow] = nxt[follow]
    else:  # the same draws; the items are picked once the click times are known (below)
        u_item = rng.random(n)
        u_follow = rng.random(n - 1) if n > 1 else None

    # time gaps: seconds to minutes inside a session, hours to days between sessions
    within = np.minimum(5.0 + rng.exponential(90.0, size=n), 900.0)
    between = SESSION_GAP_MIN_S + rng.lognormal(np.log(12 * 3600.0), 1.1, size=n)
    gap = np.where(new, between, within)
    gap[pos == 0] = 0.0
    # squeeze the extra part of the session gaps so that a user's clicks fit in the window
    extra = np.where(new & (pos > 0), gap - SESSION_GAP_MIN_S, 0.0)
    fixed = np.bincount(local, weights=gap - extra, minlength=b)
    extra_sum = np.bincount(local, weights=extra, minlength=b)
    budget = np.maximum(0.9 * WINDOW_S - fixed, 0.0)
    scale = np.minimum(1.0, budget / np.maximum(extra_sum, 1.0))
    gap = np.floor(gap - extra + extra * scale[local])
    gap = np.maximum(gap, np.where(pos == 0, 0.0, 1.0))
    t = np.cumsum(gap)
    t -= np.repeat(t[starts], counts)
    span = np.zeros(b)
    span[counts > 0] = t[starts[counts > 0] + counts[counts > 0] - 1]
    offset = np.floor(rng.random(b) * np.maximum(WINDOW_S - span, 0.0))
    ts = (T0 + offset[local] + t).astype(np.int64)

    if arrival is not None:
        items = _pick_published(arrival, topic, ts, u_item)
        if n > 1:  # as above, and only to a partner already published at the click's time
            nxt = world.partner[items[:-1]]
            follow = (nxt >= 0) & ~new[1:] & (u_follow < BUNDLE_FOLLOW_P)
            follow &= arrival.published[np.maximum(nxt, 0)] <= ts[1:]
            items[1:][follow] = nxt[follow]

    users = (first_user + local).tolist()
    inter_fh.write("".join(
        f"u{u}\ti{i}\t{s}\n" for u, i, s in zip(users, items.tolist(), ts.tolist())))
    return num_sessions


def generate(syn: SyntheticConfig, out_dir: str, verbose: bool | None = None) -> dict:
    """Writes the three canonical TSV files into ``out_dir``; returns counts.

    Deterministic: the same ``syn`` gives the same bytes. ``verbose`` (default: at 1 M events
    and more) prints progress to stderr.
    """
    for key in ("num_users", "num_items", "num_events", "num_topics"):
        if getattr(syn, key) <= 0:
            raise ValueError(f"synthetic.{key} must be > 0, got {getattr(syn, key)!r}")
    p = syn.content_topic_p
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
        raise ValueError(f"synthetic.content_topic_p must be a number in [0, 1], got {p!r}")
    arrival_error = synthetic_arrival_error(syn)
    if arrival_error:
        raise ValueError(arrival_error)
    if verbose is None:
        verbose = syn.num_events >= 1_000_000
    os.makedirs(out_dir, exist_ok=True)
    marker = os.path.join(out_dir, MARKER)
    if os.path.exists(marker):
        os.remove(marker)
    start = time.time()
    root = np.random.SeedSequence(syn.seed)
    world_seq, activity_seq, events_seq = root.spawn(3)
    world = _make_items(syn, np.random.default_rng(world_seq),
                        os.path.join(out_dir, "items.tsv"))
    counts = _events_per_user(syn, np.random.default_rng(activity_seq))
    published_path = os.path.join(out_dir, PUBLISHED_FILE)
    arrival = None
    if syn.arrival == "news":
        arrival = _make_arrival(syn, world, world.pop)
        with open(published_path, "w", encoding="utf-8", newline="\n") as fh:
            fh.write("item_id\tpublished\n")
            fh.write("".join(f"i{i}\t{s}\n" for i, s in enumerate(arrival.published.tolist())))
    elif os.path.exists(published_path):
        os.remove(published_path)  # a stale file of an earlier news run

    sessions = 0
    done = 0
    with open(os.path.join(out_dir, "users.tsv"), "w", encoding="utf-8", newline="\n") as ufh, \
            open(os.path.join(out_dir, "interactions.tsv"), "w", encoding="utf-8",
                 newline="\n") as ifh:
        ufh.write("\t".join(("user_id",) + USER_FIELDS) + "\n")
        ifh.write("user_id\titem_id\ttimestamp\n")
        # chunks of whole users with about CHUNK_EVENTS events each
        bounds = np.searchsorted(np.cumsum(counts),
                                 np.arange(CHUNK_EVENTS, syn.num_events, CHUNK_EVENTS),
                                 side="left") + 1
        bounds = np.unique(np.concatenate(([0], bounds, [syn.num_users])))
        bounds = bounds[bounds <= syn.num_users]
        chunk_seqs = events_seq.spawn(len(bounds) - 1)
        for c, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
            sessions += _chunk(world, counts[a:b], int(a), np.random.default_rng(chunk_seqs[c]),
                               ufh, ifh, arrival)
            done += int(counts[a:b].sum())
            if verbose:
                el = time.time() - start
                print(f"synthetic: {done:,}/{syn.num_events:,} events, {b:,} users, {el:.0f}s",
                      file=sys.stderr, flush=True)
    result = {"users": syn.num_users, "items": syn.num_items, "events": syn.num_events,
              "sessions": sessions, "topics": world.num_topics, "bundles": world.num_bundles}
    with open(marker, "w", encoding="utf-8") as fh:
        json.dump({"version": GENERATOR_VERSION, "params": marker_params(syn),
                   "counts": result}, fh, indent=1, sort_keys=True)
        fh.write("\n")
    if verbose:
        print(f"synthetic: wrote {out_dir} in {time.time() - start:.1f}s: {result}",
              file=sys.stderr, flush=True)
    return result


def marker_params(syn: SyntheticConfig) -> dict:
    """The parameters recorded in ``_generated.json``: every key of ``syn``, except
    ``content_topic_p`` at its default 1.0 and the arrival keys at ``arrival`` none (which write
    the same bytes as before those keys existed), so markers written before them still match."""
    params = dataclasses.asdict(syn)
    if params.get("content_topic_p") == 1.0:
        del params["content_topic_p"]
    if params.get("arrival") == "none":
        for key in ARRIVAL_KEYS:
            params.pop(key, None)
    return params


def is_generated(syn: SyntheticConfig, out_dir: str) -> bool:
    """True when ``out_dir`` holds a complete dataset generated with exactly ``syn``."""
    marker = os.path.join(out_dir, MARKER)
    files = FILES + ((PUBLISHED_FILE,) if syn.arrival == "news" else ()) + (MARKER,)
    if not all(os.path.isfile(os.path.join(out_dir, f)) for f in files):
        return False
    try:
        with open(marker, encoding="utf-8") as fh:
            meta = json.load(fh)
    except (OSError, ValueError):
        return False
    return (meta.get("version") == GENERATOR_VERSION
            and meta.get("params") == marker_params(syn))


def ensure_generated(cfg: Config, verbose: bool | None = None) -> str:
    """Generates ``cfg.data.synthetic`` into ``cfg.data.data_dir`` unless already there."""
    if cfg.data.dataset != "synthetic":
        raise ValueError(f"ensure_generated needs data.dataset 'synthetic', got "
                         f"{cfg.data.dataset!r} (it would write into {cfg.data.data_dir!r})")
    out_dir = cfg.data.data_dir
    if not is_generated(cfg.data.synthetic, out_dir):
        generate(cfg.data.synthetic, out_dir, verbose=verbose)
    return out_dir


def main(argv=None) -> int:
    from micrec_tf import cli

    parser = cli.parser(__doc__.split("\n")[0], config_default="configs/synthetic.yaml")
    parser.add_argument("--out", default=None, help="output dir (default: data.data_dir)")
    parser.add_argument("--force", action="store_true", help="regenerate even if up to date")
    args = parser.parse_args(argv)
    cfg = cli.load(args)
    out_dir = args.out or cfg.data.data_dir
    if not args.force and is_generated(cfg.data.synthetic, out_dir):
        print(f"synthetic data in {out_dir} is up to date "
              f"({dataclasses.asdict(cfg.data.synthetic)})")
        return 0
    counts = generate(cfg.data.synthetic, out_dir)
    print(f"wrote {out_dir}: " + ", ".join(f"{k}={v:,}" for k, v in counts.items()))
    return 0


if __name__ == "__main__":
    from micrec_tf import cli

    sys.exit(cli.run(main))

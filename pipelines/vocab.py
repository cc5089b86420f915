"""Vocabularies from training clicks only: each field's values by training-click frequency
descending, then value; index 0 is out-of-vocabulary, so value k of ``vocab/<field>.txt`` has
index k + 1.

The item vocabulary (``preprocess.item_vocabulary``, issue 28): ``clicked`` (the default, the
vocabulary as before, byte for byte) holds the items with a training click; ``catalogue`` holds
every item of the item file: the clicked items first, in the same order (training-click
frequency descending, then raw id), then every item without a training click, by raw id (under
``item_cold_start`` that includes every cold item). ``tag``, ``provider``, ``user_*`` and
``item_<field>`` stay built from training clicks in both modes (an unclicked item's tags may be
out of vocabulary). Both modes write ``vocab/item_id_counts.txt``: line k is the number of
training clicks of line k of ``vocab/item_id.txt`` (0 for an unclicked catalogue item), read by
the trainer for ``model.min_id_clicks``.

Append-only vocabularies (``preprocess.previous_artifacts``, issue 29; default ``""`` = the
vocabularies above, byte for byte): every value of the previous folder's ``vocab/<field>.txt``
keeps its line, in every field; the values this run meets for the first time follow in the
order above (training count descending, then value; with ``catalogue`` the new unclicked items
last, by raw id) (:func:`append_order`). A previous value without a training click in this run
keeps its line with count 0 (``item_id_counts.txt`` holds this run's clicks; the running total
over the lineage is ``item_id_counts_total.txt`` at the folder's root). :mod:`pipelines.lineage`
reads and checks the previous folder and writes ``lineage.json`` and the running total.

Fields (:func:`micrec_tf.data.contract.vocab_names`): ``item_id``, ``tag``,
``provider``, ``user_id``, ``user_<field>`` per user field and ``item_<field>`` per item extra
field. A user's training clicks count for its id and each non-empty profile value; an item's
training clicks count for its id, each of its first ``max_tags`` distinct tags, its provider and
each non-empty extra value.

Transforms (PCollections they take and give):

- :class:`Vocabularies`: ``(users, items)`` -> ``{"index": one {field: {value: index}}, STATS}``
  and ``vocab/<field>.txt``; STATS also holds the training-period counts of
  :class:`UserTrainStats` (users, events per split, sessions).

``users`` are the rows of :class:`pipelines.split.UserTimelines`; ``items`` are ``(item_id, item
tuple)``, one per item of the table.
"""
from __future__ import annotations

import collections
import os

from pipelines.common import STATS, BundleCounter, windowed, write_lines
from pipelines.cooccurrence import count_sessions
from pipelines.items import item_values

import apache_beam as beam  # noqa: E402  (after pipelines.common: its import is quiet)

from micrec_tf.config import ITEM_VOCABULARIES  # noqa: E402
from micrec_tf.data.contract import item_feature, user_feature, vocab_names  # noqa: E402


class UserTrainStats(beam.DoFn, BundleCounter):
    """Training-period counts per user: vocab entries, item click counts and sessions."""

    def __init__(self, user_fields, window_s):
        self.user_fields = tuple(user_fields)
        self.window_s = window_s

    def start_bundle(self):
        self._reset_stats()
        self._items = collections.Counter()

    def process(self, user):
        # An item_cold_start row's 7th element (its cold clicks) counts for nothing here: cold
        # items' clicks are in no vocabulary count.
        yield from self._user(*user[:6])

    def _user(self, user_id, profile, clicks, n_train, n_valid, has_profile):
        n = len(clicks)
        st = self._stats
        st["users"] += 1
        st["events.train"] += n_train
        st["events.valid"] += n_valid
        st["events.test"] += n - n_train - n_valid
        st["sessions"] += count_sessions(clicks, self.window_s)
        if not has_profile:
            st["events_unknown_user"] += n
            st["users_unknown"] += 1
        if n_train == 0:
            return
        st["users.train"] += 1
        train = clicks[:n_train]
        st["sessions.train"] += count_sessions(train, self.window_s)
        yield beam.pvalue.TaggedOutput("vocab", (("user_id", user_id), n_train))
        for field, value in zip(self.user_fields, profile):
            if value:
                yield beam.pvalue.TaggedOutput("vocab", ((user_feature(field), value), n_train))
        for _, item in train:
            self._items[item] += 1

    def finish_bundle(self):
        for item, n in sorted(self._items.items()):
            yield beam.pvalue.TaggedOutput("item_counts", windowed((item, n)))
        self._items = collections.Counter()
        yield from self._flush_stats()


# The training-click count of each line of vocab/item_id.txt, one integer a line.
ITEM_COUNTS_FILE = "item_id_counts.txt"


def _item_vocab_entries(kv, max_tags, extra_fields, catalogue=False):
    """Training click counts of one item spread onto its item_id, tags, provider and extras.

    With ``catalogue`` an item without a training click still yields ``(("item_id", id), 0)``
    (and nothing for its tags, provider or extras)."""
    item_id, groups = kv
    n = sum(groups["count"])
    if not n:
        if catalogue and groups["item"]:
            yield ("item_id", item_id), 0
        return
    item = groups["item"][0]
    tags, provider, extras = item_values(item, max_tags)
    yield ("item_id", item_id), n
    for t in tags:
        yield ("tag", t), n
    if provider:
        yield ("provider", provider), n
    for f, v in zip(extra_fields, extras):
        if v:
            yield (item_feature(f), v), n


def append_order(previous, entries):
    """``[(value, count)]`` of one field: the ``previous`` values (issue 29) at their lines, each
    with its count in ``entries`` (0 when absent: no click in this run), then the values of
    ``entries`` not in ``previous`` by count descending, then value (the order of a run without
    previous artifacts, so a new unclicked catalogue item comes after every new clicked one).

    ``previous``: the values of the previous ``vocab/<field>.txt`` in line order (empty: the
    vocabulary of before, byte for byte); ``entries``: ``[(value, count)]``, values distinct."""
    ordered = [(v, -m) for m, v in sorted((-n, v) for v, n in entries)]
    if not previous:
        return ordered
    counts, known = dict(entries), set(previous)
    return ([(v, counts.get(v, 0)) for v in previous]
            + [(v, n) for v, n in ordered if v not in known])


def _sorted_vocab(kv):
    """(field, groups) -> (field, [(value, count)]) by count descending, then value: a count 0
    (unclicked catalogue items only) sorts after every clicked value, by value. With previous
    values (``groups["expected"]``, issue 29) they keep their lines: :func:`append_order`."""
    field, groups = kv
    entries = [e for lst in groups["entries"] for e in lst]
    previous = [v for lst in groups["expected"] for v in lst]
    return field, append_order(previous, entries)


class WriteVocab(beam.DoFn):
    def __init__(self, out_dir):
        self.out_dir = out_dir

    def process(self, kv):
        field, entries = kv
        values = [v for v, _ in entries]
        for v in values:
            if "\n" in v or "\r" in v:
                raise ValueError(f"vocab value {v!r} of field {field!r} holds a line break")
        write_lines(os.path.join(self.out_dir, "vocab", f"{field}.txt"), values)
        if field == "item_id":
            write_lines(os.path.join(self.out_dir, "vocab", ITEM_COUNTS_FILE),
                        [str(n) for _, n in entries])
        yield beam.pvalue.TaggedOutput(STATS, (f"vocab.{field}", len(values) + 1))


def _vocab_index(vocabs):
    """[(field, [(value, count)])] -> {field: {value: index}} with index 0 = OOV."""
    return {field: {v: i + 1 for i, (v, _) in enumerate(entries)} for field, entries in vocabs}


class Vocabularies(beam.PTransform):
    """``(users, items)`` -> ``{"index", STATS}``; writes ``<out_dir>/vocab/<field>.txt``.

    ``index``: one ``{field: {value: index}}`` dict (index 0 = out of vocabulary; every field of
    :func:`~micrec_tf.data.contract.vocab_names` present, empty when nothing counted). ``STATS``: ``vocab.<field>``
    (the vocabulary size, OOV included) and the :class:`UserTrainStats` counts.

    ``item_vocabulary``: ``"clicked"`` (default, the vocabulary as before) or ``"catalogue"``
    (every item of ``items`` gets an index; the unclicked ones after the clicked ones, by raw
    id). Also writes ``vocab/item_id_counts.txt`` (training clicks per ``item_id`` line).

    ``previous`` (issue 29): ``{field: [value, ...]}``, the previous artifacts' vocabularies in
    line order (:func:`pipelines.lineage.read_previous`): every previous value keeps its index
    (count 0 when this run has no click on it) and new values follow (:func:`append_order`).
    None or empty (default): the vocabularies of before, byte for byte.
    """

    def __init__(self, out_dir: str, user_fields, extra_fields, max_tags: int, window_s: int,
                 item_vocabulary: str = "clicked", previous=None):
        super().__init__()
        if item_vocabulary not in ITEM_VOCABULARIES:
            raise ValueError(f"item_vocabulary must be one of {ITEM_VOCABULARIES}. Received: "
                             f"{item_vocabulary!r}")
        self.previous = {f: list(v) for f, v in (previous or {}).items()}
        self.catalogue = item_vocabulary == "catalogue"
        self.out_dir, self.max_tags, self.window_s = out_dir, max_tags, window_s
        self.user_fields, self.extra_fields = tuple(user_fields), tuple(extra_fields)

    def expand(self, inputs):
        users, items = inputs
        train = users | "TrainStats" >> beam.ParDo(UserTrainStats(
            self.user_fields, self.window_s)).with_outputs("vocab", "item_counts", STATS)
        item_counts = train.item_counts | "SumItemCounts" >> beam.CombinePerKey(sum)
        item_entries = ({"count": item_counts, "item": items}
                        | "JoinItemCounts" >> beam.CoGroupByKey()
                        | "ItemVocabEntries" >> beam.FlatMap(_item_vocab_entries, self.max_tags,
                                                             self.extra_fields, self.catalogue))
        per_field = (
            (item_entries, train.vocab) | "FlattenVocab" >> beam.Flatten()
            | "SumVocab" >> beam.CombinePerKey(sum)
            | "ByField" >> beam.Map(lambda kv: (kv[0][0], (kv[0][1], kv[1])))
            | "GroupField" >> beam.GroupByKey()
            | "FieldList" >> beam.MapTuple(lambda f, es: (f, list(es))))
        fields = vocab_names(self.user_fields, self.extra_fields)
        unknown = sorted(set(self.previous) - set(fields))
        if unknown:
            raise ValueError(f"previous vocabularies must be among {fields}. Received: {unknown}")
        expected = users.pipeline | "VocabFields" >> beam.Create(
            [(f, self.previous.get(f, [])) for f in fields])
        vocabs = ({"entries": per_field, "expected": expected}
                  | "JoinFields" >> beam.CoGroupByKey() | "SortVocab" >> beam.Map(_sorted_vocab))
        written = vocabs | "WriteVocab" >> beam.ParDo(WriteVocab(self.out_dir)).with_outputs(
            STATS, main="none")
        index = (vocabs | "AllVocabs" >> beam.combiners.ToList()
                 | "VocabIndex" >> beam.Map(_vocab_index))
        stats = (train[STATS], written[STATS]) | "FlattenStats" >> beam.Flatten()
        return {"index": index, STATS: stats}

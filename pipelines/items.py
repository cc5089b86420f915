"""The item table: every item of the catalogue on vocabulary indices, and ``items/items.jsonl``.

Transforms (PCollections they take and give):

- :class:`ItemTable`: ``(items, index)`` -> ``{"features": (item_id, (idx, tag indices,
  provider index, extra indices, title)), STATS}`` and ``items.jsonl`` (one line per item of
  the ``item_id`` vocabulary, by index).

``items`` are the ``(item_id, item tuple, n_duplicates)`` of :class:`pipelines.rows.OnePerId`
(item tuple: ``(item_id, title, tags, provider, extras)``); ``index`` is the one-element
``{field: {value: index}}`` of :class:`pipelines.vocab.Vocabularies` (0 = out of vocabulary).
"""
from __future__ import annotations

import json
import os

from pipelines.common import STATS, write_lines

import apache_beam as beam  # noqa: E402  (after pipelines.common: its import is quiet)

from micrec_tf.data.contract import item_feature  # noqa: E402


def item_values(item, max_tags):
    """(tags, provider, extras) of an item tuple: tags deduplicated, first ``max_tags`` kept."""
    _, _, tags, provider, extras = item
    seen = []
    for t in tags:
        if t and t not in seen:
            seen.append(t)
    return tuple(seen[:max_tags]), provider, extras


def _item_features(kv, index, max_tags, extra_fields):
    """item_id, item tuple -> (item_id, (idx, tags idx, provider idx, extras idx, title))."""
    item_id, item, _ = kv
    tags, provider, extras = item_values(item, max_tags)
    tag_idx = tuple(i for i in (index["tag"].get(t, 0) for t in tags) if i)
    extra_idx = tuple(index[item_feature(f)].get(v, 0) for f, v in zip(extra_fields, extras))
    return item_id, (index["item_id"].get(item_id, 0), tag_idx,
                     index["provider"].get(provider, 0), extra_idx, item[1])


def _write_items(rows, out_dir, extra_fields):
    lines = []
    for item_id, (idx, tags, provider, extras, title) in sorted(rows, key=lambda r: r[1][0]):
        if not idx:
            continue
        lines.append(json.dumps({
            "item": idx, "item_id": item_id, "title": title, "tags": list(tags),
            "provider": provider,
            "extra": {item_feature(f): v for f, v in zip(extra_fields, extras)}}, ensure_ascii=False))
    write_lines(os.path.join(out_dir, "items", "items.jsonl"), lines)
    return [("items.vocab", len(lines)), ("items.catalogue", len(rows))]


class ItemTable(beam.PTransform):
    """``(items, index)`` -> ``{"features", STATS}``; writes ``<out_dir>/items/items.jsonl``.

    ``features``: ``(item_id, (idx, tag indices, provider index, extra indices, title))`` for
    every catalogue item (``idx`` 0 for an item outside the ``item_id`` vocabulary: an item
    without a training click under ``preprocess.item_vocabulary: clicked``, none under
    ``catalogue``; tags deduplicated, the first ``max_tags``, out-of-vocabulary ones dropped). ``STATS``: ``items.vocab`` (lines
    written) and ``items.catalogue`` (items in the table).
    """

    def __init__(self, out_dir: str, max_tags: int, extra_fields):
        super().__init__()
        self.out_dir, self.max_tags, self.extra_fields = out_dir, max_tags, tuple(extra_fields)

    def expand(self, inputs):
        items, index = inputs
        feats = items | "ItemFeatures" >> beam.Map(
            _item_features, beam.pvalue.AsSingleton(index), self.max_tags, self.extra_fields)
        stats = (feats | "AllItemFeatures" >> beam.combiners.ToList()
                 | "WriteItems" >> beam.FlatMap(_write_items, self.out_dir, self.extra_fields))
        return {"features": feats, STATS: stats}

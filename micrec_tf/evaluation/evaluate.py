"""Evaluates a trained two-tower model: HIT@N and item coverage over the whole item corpus.

For every evaluation click, the user vector is computed from that click's own history (the clicks
before it), and the top-N items are retrieved from all catalogue items by exact brute force (or
ScaNN). With ``exclude_clicked`` the items the user clicked before that click (training period
included, not only the 20 most recent; see
:func:`micrec_tf.evaluation.data.earlier_clicks_exclusion`) are removed from the ranking.
"""
from __future__ import annotations

import numpy as np

from micrec_tf.data.contract import (HIST_LEN, ITEM, ITEM_PROVIDER, ITEM_TAGS, TIMESTAMP,
                                     USER_ID, item_feature)
from micrec_tf.evaluation import metrics
from micrec_tf.evaluation.cold_start import SLICES, check_catalogue_vocabulary, cold_start_metrics

# Example features the user tower does not read (the ids, the click time, the target item and its
# fields); every other feature of the split arrays goes to the tower.
_NON_USER_FEATURES = (USER_ID, TIMESTAMP, ITEM, ITEM_TAGS, ITEM_PROVIDER)
_ITEM_FIELD_PREFIX = item_feature("")  # item_<extra field>


def user_vectors(model, arrays: dict, batch_size: int = 1024) -> np.ndarray:
    """[N, D] user vectors for N examples, computed in batches by the model's graph function
    (``graph_user_embeddings``, else ``user_embeddings``).

    Every batch has ``batch_size`` rows (the last one padded with the first rows, the padding
    dropped from the result), so the function is traced once, with a static batch size that
    lets the user tower pick its faster history path.
    """
    keys = [k for k in arrays
            if k not in _NON_USER_FEATURES and not k.startswith(_ITEM_FIELD_PREFIX)]
    n = len(arrays[ITEM])
    embed = getattr(model, "graph_user_embeddings", model.user_embeddings)
    size = min(batch_size, n)
    out = []
    for start in range(0, n, batch_size):
        rows = (np.arange(start, start + size) % n if start + size > n
                else slice(start, start + size))
        batch = {k: np.asarray(arrays[k])[rows] for k in keys}
        out.append(np.asarray(embed(batch), np.float32)[:min(size, n - start)])
    return np.concatenate(out, axis=0) if out else np.zeros((0, 1), np.float32)


def item_vectors(model, num_items: int, batch_size: int = 4096) -> np.ndarray:
    """[V, D] item vectors for every item index (row 0 = padding; never retrieved): the model's own
    chunked ``item_embeddings(indices, batch_size)``."""
    return np.asarray(model.item_embeddings(np.arange(num_items, dtype=np.int64), batch_size),
                      np.float32)


def evaluate_model(model, arrays: dict, num_items: int, hit_n=(50, 100, 200, 500),
                   coverage_n=(50, 500), exclude=None, use_scann: bool = False,
                   batch_size: int = 1024, slices: dict | None = None,
                   exact_engine: str = "numpy") -> dict:
    """HIT@N and coverage@N of ``model`` on the examples in ``arrays``.

    ``exclude``: items to drop from the ranking per example, in any form
    :func:`micrec_tf.search.as_exclusion` takes (or None).
    ``slices``: name -> bool mask over examples; each adds ``<name>/hit@N`` entries.
    ``exact_engine``: ``eval.exact_engine`` (default ``numpy``, the behaviour before the
    argument; ``tensorflow``: :mod:`micrec_tf.evaluation.tf_top_k`).
    Returns ``{"hit@50": ..., "coverage@50": ..., "num_examples": N}``; with no example
    (an update's window without clicks: issue 29) only ``{"num_examples": 0}``: no metric is
    defined, none is reported.
    """
    if len(arrays[ITEM]) == 0:
        return {"num_examples": 0}
    users = user_vectors(model, arrays, batch_size)
    items = item_vectors(model, num_items)
    result = metrics.evaluate_retrieval(
        users, items, np.asarray(arrays[ITEM]), ns=list(hit_n), coverage_ns=list(coverage_n),
        exclude=exclude, use_scann=use_scann, slices=slices, exact_engine=exact_engine)
    result["num_examples"] = int(len(arrays[ITEM]))
    return result


def evaluate_cold_start(model, arrays: dict, num_items: int, raw_item_ids, split: str,
                        item_vocabulary: str, batch_size: int = 1024,
                        slices=SLICES) -> dict:
    """The item-cold-start metrics (cold / warm / all, issue 28) of ``model`` on one evaluation
    split: :func:`micrec_tf.evaluation.cold_start.cold_start_metrics` on the model's user vectors
    of ``arrays`` and item vectors of every index. ``raw_item_ids``: the lines of
    ``vocab/item_id.txt``; ``split``: ``"valid"`` or ``"test"``; ``slices``: which of cold /
    warm / all to rank."""
    check_catalogue_vocabulary(item_vocabulary)
    users = user_vectors(model, arrays, batch_size)
    items = item_vectors(model, num_items)
    return cold_start_metrics(users, items, np.asarray(arrays[ITEM]), np.asarray(arrays[HIST_LEN]),
                              raw_item_ids, split, item_vocabulary, batch_size=batch_size,
                              slices=slices)

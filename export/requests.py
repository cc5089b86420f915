"""Raw serving requests rebuilt from preprocessed examples (the inverse of the vocab lookup).

Used by the exporter (warm-up requests, the export's self-check) and by the retrieval client
(:meth:`micrec_tf.retrieval.Retriever.test_users`); both send these rows to the serving signature
of :mod:`export.serving`.
"""
from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import numpy as np

from micrec_tf.data.contract import HIST_ITEMS, HIST_LEN, user_feature

from export.serving import HISTORY_INPUT


def oov_string(vocab: Sequence[str], avoid_empty: bool) -> str:
    """A value absent from ``vocab`` (so the serving lookup maps it to index 0)."""
    values = set(vocab)
    cand = "__oov__" if avoid_empty else ""
    while cand in values:
        cand += "_"
    return cand


def raw_requests(arrays: Mapping, rows: Iterable[int], vocabs: Mapping[str, Sequence[str]],
                 user_fields: Sequence[str]) -> list:
    """Raw request rows ``{field: str, "history": [ids]}`` for examples ``rows`` of split arrays.

    ``vocabs``: ``item_id`` and ``user_<field>`` lists (position p = index p + 1). Index 0 (OOV)
    becomes a string absent from the vocabulary, so the request maps back to exactly the example's
    indices.
    """
    item_vocab = vocabs["item_id"]
    oov_item = oov_string(item_vocab, avoid_empty=True)
    oov_user = {f: oov_string(vocabs[user_feature(f)], avoid_empty=False) for f in user_fields}
    out = []
    for r in rows:
        row = {}
        for f in user_fields:
            idx = int(arrays[user_feature(f)][r])
            row[f] = vocabs[user_feature(f)][idx - 1] if idx > 0 else oov_user[f]
        n = int(arrays[HIST_LEN][r])
        row[HISTORY_INPUT] = [item_vocab[i - 1] if i > 0 else oov_item
                              for i in np.asarray(arrays[HIST_ITEMS][r][:n], np.int64)]
        out.append(row)
    return out

"""The non-neural content baseline of the item-cold-start protocol (issue 28, item 5, first row).

A user profile is built from the example's history (``hist_items`` int [B, H], oldest first,
left-aligned; the history-length feature ``hist_len`` [B] says how many positions are real) and
every catalogue item is scored against it; no training, no ID rows, so a cold item scores like a
warm one with the same content:

* **tags** (``alpha = 1``): the counts of the history clicks' tags (``ItemTable.tags``, a tag
  counted once per item, an item clicked twice counted twice), L2-normalised, dotted with each
  candidate's L2-normalised 0/1 tag indicator vector (a cosine in [0, 1]);
* **text** (``alpha = 0``): the cosine between the mean of the history clicks' text vectors
  (:func:`micrec_tf.data.artifacts.load_text_vectors`, ``title_embeddings/``) and each
  candidate's text vector;
* **mix**: ``alpha * tags + (1 - alpha) * text``.

A zero profile or a zero candidate vector (empty history, an item without tags or text) scores 0,
so with an empty history every item scores 0 and the ranking's tie rule (the smaller item index
first, :func:`micrec_tf.search.top_k_by_score_fn`) decides. The variant is chosen on the
cold-valid slice by :func:`choose_and_evaluate`; the metrics come from
:func:`micrec_tf.evaluation.cold_start.cold_start_metrics_from_scores` (the cold / warm / all keys
of every trained model).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from micrec_tf.evaluation import cold_start
from micrec_tf.evaluation.baselines import history_clicks

__all__ = ["VARIANTS", "SELECTION_METRIC", "ContentProfileBaseline", "evaluate_variant",
           "choose_and_evaluate"]

# Variant name -> alpha (the weight of the tag profile); evaluated, and ties broken, in this order.
VARIANTS = {"tags": 1.0, "text": 0.0, "mix0.25": 0.25, "mix0.5": 0.5, "mix0.75": 0.75}
# The metric the variant is chosen on (cold-valid slice).
SELECTION_METRIC = "cold/hit@50"


def _l2_rows(x: np.ndarray) -> np.ndarray:
    """Rows divided by their L2 norm; zero rows stay zero."""
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)


class ContentProfileBaseline:
    """Scores every item for each click from the content of its history.

    Args:
      tags: int [V, T] tag indices per item, 0-padded (``ItemTable.tags``); row 0 is padding.
      text_vectors: float [V, D_t] text vectors (row 0 and items without a vector zeros), or None
        for the tag profile alone (then ``alpha`` must be 1).
      alpha: weight of the tag profile in [0, 1] (1: tags only, 0: text only).
    """

    def __init__(self, tags: np.ndarray, text_vectors: np.ndarray | None = None,
                 alpha: float = 1.0):
        tags = np.asarray(tags, np.int64)
        if tags.ndim != 2:
            raise ValueError(f"tags must be [V, T]. Received: shape {tags.shape}")
        if tags.size and tags.min() < 0:
            raise ValueError(f"tags must be non-negative indices. Received: min {tags.min()}")
        alpha = float(alpha)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1]. Received: alpha={alpha}")
        if text_vectors is None and alpha < 1.0:
            raise ValueError(f"alpha < 1 needs text_vectors. Received: alpha={alpha}, "
                             f"text_vectors=None")
        v = tags.shape[0]
        import scipy.sparse as sp  # deferred, as in baselines.py

        # 0/1 item-tag indicator [V, T'] (tag 0 is padding, each tag once per item).
        rows = np.repeat(np.arange(v, dtype=np.int64), tags.shape[1])
        flat = tags.ravel()
        keep = flat > 0
        num_tags = int(flat.max()) + 1 if flat.size else 1
        ind = sp.csr_matrix((np.ones(int(keep.sum())), (rows[keep], flat[keep])),
                            shape=(v, num_tags), dtype=np.float64)
        ind.sum_duplicates()
        ind.data[:] = 1.0
        self._indicator = ind
        norms = np.sqrt(np.asarray(ind.sum(axis=1)).reshape(-1))
        inv = np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)
        self._indicator_normed_t = (sp.diags(inv) @ ind).T.tocsr()  # [T', V]
        self._text = None
        if text_vectors is not None:
            text = np.asarray(text_vectors, np.float64)
            if text.ndim != 2 or text.shape[0] != v:
                raise ValueError(f"text_vectors must be [V={v}, D]. Received: shape {text.shape}")
            self._text = text
            self._text_normed_t = np.ascontiguousarray(_l2_rows(text).T)
        self.alpha = alpha

    @property
    def num_items(self) -> int:
        return int(self._indicator.shape[0])

    def _history(self, hist_items, hist_len) -> np.ndarray:
        """int64 [B, H] history with the padding positions (and out-of-range indices) 0."""
        hist = np.array(hist_items, dtype=np.int64, ndmin=2)
        length = np.asarray(hist_len, dtype=np.int64).reshape(-1)
        if length.size != hist.shape[0]:
            raise ValueError(f"{hist.shape[0]} histories and {length.size} history lengths")
        hist = np.where(np.arange(hist.shape[1])[None, :] < length[:, None], hist, 0)
        hist[(hist < 0) | (hist >= self.num_items)] = 0
        return hist

    def tag_scores(self, hist_items, hist_len) -> np.ndarray:
        """float64 [B, V] cosine of the history's tag counts with each item's tag indicator."""
        import scipy.sparse as sp

        clicks = history_clicks(self._history(hist_items, hist_len), self.num_items)
        profile = np.asarray((clicks @ self._indicator).toarray())  # [B, T'] tag counts
        return np.asarray((sp.csr_matrix(_l2_rows(profile)) @ self._indicator_normed_t)
                          .toarray(), np.float64)

    def text_scores(self, hist_items, hist_len) -> np.ndarray:
        """float64 [B, V] cosine of the history's mean text vector with each item's."""
        if self._text is None:
            raise ValueError("text_scores needs text_vectors. Received: text_vectors=None")
        hist = self._history(hist_items, hist_len)
        n = (hist > 0).sum(axis=1, keepdims=True)
        mean = (self._text[hist] * (hist > 0)[:, :, None]).sum(axis=1) / np.maximum(n, 1)
        mean[n[:, 0] == 0] = 0.0
        return _l2_rows(mean) @ self._text_normed_t

    def scores(self, hist_items, hist_len) -> np.ndarray:
        """float64 [B, V]: ``alpha * tag_scores + (1 - alpha) * text_scores``."""
        if self.alpha == 1.0:
            return self.tag_scores(hist_items, hist_len)
        if self.alpha == 0.0:
            return self.text_scores(hist_items, hist_len)
        return (self.alpha * self.tag_scores(hist_items, hist_len)
                + (1.0 - self.alpha) * self.text_scores(hist_items, hist_len))


def evaluate_variant(model: ContentProfileBaseline, clicks: Mapping[str, np.ndarray],
                     raw_item_ids: Sequence[str], split: str, batch_size: int = 1024,
                     item_vocabulary: str = "catalogue",
                     ns: Sequence[int] = cold_start.COLD_START_NS) -> dict:
    """Cold / warm / all metrics of ``model`` on one evaluation split.

    ``clicks``: ``hist_items`` int [U, H], ``hist_len`` int [U], ``targets`` int [U]; scored
    ``batch_size`` clicks at a time (a [batch_size, V] float64 block).
    """
    hist, hlen = np.asarray(clicks["hist_items"]), np.asarray(clicks["hist_len"]).reshape(-1)
    return cold_start.cold_start_metrics_from_scores(
        lambda rows: model.scores(hist[rows], hlen[rows]), clicks["targets"], hlen, raw_item_ids,
        split, item_vocabulary=item_vocabulary, ns=ns, batch_size=batch_size)


def choose_and_evaluate(valid: Mapping[str, np.ndarray], test: Mapping[str, np.ndarray],
                        tags: np.ndarray, text_vectors: np.ndarray | None,
                        raw_item_ids: Sequence[str], metric: str = SELECTION_METRIC,
                        variants: Mapping[str, float] | None = None,
                        batch_size: int = 1024, item_vocabulary: str = "catalogue",
                        ns: Sequence[int] = cold_start.COLD_START_NS) -> dict:
    """Chooses the variant on the cold-valid slice and reports its test metrics.

    Every variant of ``variants`` (default :data:`VARIANTS`; without ``text_vectors`` only the
    tag profile) is evaluated on ``valid`` (split ``"valid"``); the one with the highest
    ``metric`` (default ``cold/hit@50``; a tie goes to the earlier variant, NaN never wins over a
    number) is evaluated on ``test`` (split ``"test"``). ``ns``: the N of hit@N / coverage@N
    (the selection metric must be among the keys they give).

    Returns ``{"variant": name, "alpha": float, "metric": metric, "valid_scores": {name: value},
    "valid": chosen variant's valid metrics, "test": its test metrics}``.
    """
    variants = dict(VARIANTS if variants is None else variants)
    if text_vectors is None:
        variants = {k: a for k, a in variants.items() if a == 1.0}
    if not variants:
        raise ValueError("no variant to evaluate. Received: variants without alpha 1 and "
                         "text_vectors=None")
    valid_scores, valid_metrics, best = {}, {}, None
    for name, alpha in variants.items():
        model = ContentProfileBaseline(tags, text_vectors if alpha < 1.0 else None, alpha)
        res = evaluate_variant(model, valid, raw_item_ids, "valid", batch_size, item_vocabulary,
                               ns)
        if metric not in res:
            raise ValueError(f"metric {metric!r} is not a cold-start key. Received: "
                             f"metric={metric!r}")
        valid_scores[name], valid_metrics[name] = float(res[metric]), res
        if not np.isnan(valid_scores[name]) and (best is None or valid_scores[name]
                                                 > valid_scores[best]):
            best = name
    if best is None:
        best = next(iter(variants))
    alpha = variants[best]
    model = ContentProfileBaseline(tags, text_vectors if alpha < 1.0 else None, alpha)
    return {"variant": best, "alpha": alpha, "metric": metric, "valid_scores": valid_scores,
            "valid": valid_metrics[best],
            "test": evaluate_variant(model, test, raw_item_ids, "test", batch_size,
                                     item_vocabulary, ns)}

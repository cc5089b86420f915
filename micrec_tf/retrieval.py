"""Top-K retrieval from an export version: user tower SavedModel + ANN index over item vectors.

::

    r = Retriever.load("exports/ml-1m")            # latest version (or a version directory)
    ids, scores = r.retrieve([{"gender": "F", "age": "25", "occupation": "4", "zip": "4",
                               "history": ["1193", "661", "914"]}], k=500, exclude="history")
    ids[0][:10], scores[0][:10]                     # item ids (str) and dot-product scores

Requests are raw features, as the serving signature takes them (docs/SERVING.md): one dict per
user ``{<profile field>: str, "history": [item ids, oldest first]}`` (histories may differ in
length here; they are padded with ""), a columnar dict ``{<field>: [...], "history": [[...]]}``, or
a TF Serving REST body (``{"instances": ...}`` / ``{"inputs": ...}``, checked strictly as TF
Serving would). Every form goes through the REST parser's checks (``rest.parse_python_request``):
a malformed request is a one-line ``rest.RequestError`` naming the request and the input; the
dict forms also take ``bytes`` values. User vectors come from the exported SavedModel, so
retrieval here is exactly what production does with TF Serving + the index; the index is the
serialised ScaNN searcher (reloaded, not rebuilt) or, for ``brute_force`` exports, an exact
product with the dump.

``exclude``: ``None``; ``"history"`` (drop each user's history items); or one iterable of item ids
per user. Excluded items are removed before the top K is cut, so K items still come back when the
catalogue allows; rows are padded with id ``""`` and score ``-inf`` otherwise.

:meth:`Retriever.test_users` builds requests for users of the artifacts' test split (their latest
test click: profile + the 20 clicks before it, and every item they clicked before it).
"""
from __future__ import annotations

import json
import os
import sys
from typing import Sequence

import micrec_tf  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)
import numpy as np

from micrec_tf import search
from micrec_tf.data.artifacts import ArtifactError
from micrec_tf.data.contract import (EVAL_FEATURES, HIST_ITEMS, ITEM, TIMESTAMP, USER_ID,
                                     user_feature)

from export import item_index, rest, serving
from export.requests import raw_requests


def resolve_version_dir(path: str, version: int | str | None = None) -> str:
    """``path`` is a version directory (has metadata.json) or an export root (``exports/<name>``);
    for a root, ``version`` (default: the latest published one) picks the directory.

    First repairs a half-published version of the root (an export killed between publishing the
    version and its TF Serving view, see ``export/export_model.py``), so that TF Serving serves
    the user tower of the version retrieval uses. Where the root's ``serving/`` cannot be written
    (a read-only tree), the repair is left undone, one stderr line says so, and the default
    version is the newest one that TF Serving serves (the newest published one if none is).
    """
    if version is None and os.path.exists(os.path.join(path, "metadata.json")):
        name = os.path.basename(os.path.normpath(path))
        _repair_serving_views(os.path.dirname(os.path.abspath(path)),
                              int(name) if name.isdigit() else None)
        return path
    if version is not None:
        _repair_serving_views(path, int(version) if str(version).isdigit() else None)
        return serving.version_dir(path, version)
    if not _repair_serving_views(path, None, default=True):
        return serving.version_dir(path)
    served = serving.served_versions(path)
    return serving.version_dir(path, served[-1] if served else None)


def _repair_serving_views(export_root: str, chosen: int | None, default: bool = False) -> list:
    """Repairs what can be written (see :func:`resolve_version_dir`); returns the versions left
    half-published, after one stderr line naming them and the version used (``chosen``, or for
    ``default`` the newest that TF Serving serves)."""
    failed = []
    serving.repair_serving_views(export_root, log=lambda msg: print(msg, file=sys.stderr),
                                 unwritable=failed)
    if not failed:
        return []
    versions = [v for v, _ in failed]
    err = failed[0][1]
    where = os.path.join(export_root, serving.SERVING_DIR)
    if default:
        served = serving.served_versions(export_root)
        use = (f"using version {served[-1]}, the newest that TF Serving serves" if served else
               f"using version {serving.latest_version(export_root)}, which TF Serving does not "
               "serve (it serves no version)")
    else:
        use = (f"using version {chosen} as asked"
               + (", which TF Serving does not serve" if chosen in versions else ""))
    print(f"[retrieval] {where} is not writable ({err.strerror or err}): the TF Serving view of "
          f"half-published version(s) {', '.join(map(str, versions))} cannot be created; {use}",
          file=sys.stderr)
    return versions


class Retriever:
    """A loaded export version; see the module docstring."""

    def __init__(self, version_dir: str, metadata: dict, signature_fn, ids: list,
                 vectors: np.ndarray, searcher=None, index_params: dict | None = None):
        self.version_dir, self.metadata = version_dir, metadata
        self.signature_fn = signature_fn
        self.ids, self.vectors = ids, vectors
        self.searcher, self.index_params = searcher, index_params
        self.row_of = {item_id: r for r, item_id in enumerate(ids)}
        self.specs = rest.specs_from_signature(signature_fn)
        self.user_fields = [n for n in self.specs if n != serving.HISTORY_INPUT]
        self.top_k = int(metadata.get("top_k", 500))

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, path: str, version: int | str | None = None,
             index: str | None = None) -> "Retriever":
        """Loads ``path`` (a version dir, or an export root -> latest / ``version``).

        ``index``: ``None`` (as exported), or ``"brute_force"`` to score every item exactly.
        """
        return cls.load_version_dir(resolve_version_dir(path, version), index)

    @classmethod
    def load_version_dir(cls, vdir: str, index: str | None = None) -> "Retriever":
        """Loads the version folder ``vdir`` as it is: nothing resolved, repaired or written
        (the online service loads versions of a possibly read-only tree this way)."""
        import tensorflow as tf

        with open(os.path.join(vdir, "metadata.json"), encoding="utf-8") as fh:
            metadata = json.load(fh)
        loaded = tf.saved_model.load(os.path.join(vdir, "user_tower"))
        fn = loaded.signatures[serving.SIGNATURE_NAME]
        ids, vectors = item_index.load_item_embeddings(os.path.join(vdir, "item_embeddings"))
        searcher = params = None
        kind = index or metadata.get("index", {}).get("kind", "brute_force")
        if kind == "scann":
            searcher, params = item_index.load_scann(os.path.join(vdir, "scann"))
        elif kind != "brute_force":
            raise ValueError(f"unknown index kind {kind!r} in {vdir}/metadata.json")
        r = cls(vdir, metadata, fn, ids, vectors, searcher, params)
        r._loaded = loaded  # keeps the SavedModel's resources alive with the signature
        return r

    @property
    def index_kind(self) -> str:
        return "scann" if self.searcher is not None else "brute_force"

    # ------------------------------------------------------------------ requests -> vectors
    def to_columns(self, requests) -> dict:
        """Any accepted request form -> ``{input: object array of bytes}`` (signature shapes).

        One validation for every form (:func:`export.rest.parse_python_request`, the REST
        parser's own checks): a malformed request raises :class:`export.rest.RequestError` naming
        the request index and the input. No per-request cap: the tower runs in batches.
        """
        return rest.parse_python_request(requests, self.specs)

    def user_vectors(self, requests, batch_size: int = 1024) -> np.ndarray:
        """float32 [B, D] from the exported user tower."""
        return self._vectors(self.to_columns(requests), batch_size)

    def _vectors(self, cols: dict, batch_size: int = 1024) -> np.ndarray:
        import tensorflow as tf

        n = len(cols[serving.HISTORY_INPUT])
        out = []
        for start in range(0, n, batch_size):
            feed = {}
            for k, v in cols.items():
                part = v[start:start + batch_size]
                feed[k] = (tf.constant(part, tf.string) if part.size
                           else tf.zeros(part.shape, tf.string))
            out.append(self.signature_fn(**feed)[serving.OUTPUT_NAME].numpy())
        dim = self.vectors.shape[1]
        return np.concatenate(out) if out else np.zeros((0, dim), np.float32)

    # ------------------------------------------------------------------ search
    def _exclusions(self, exclude, cols: dict | None, n: int) -> list:
        if exclude is None:
            return [np.zeros(0, np.int64)] * n
        if isinstance(exclude, str):
            if exclude != "history" or cols is None:
                raise ValueError("exclude must be None, 'history' (with requests) or one "
                                 "iterable of item ids per user")
            exclude = [[_id_text(h) for h in row if h] for row in cols[serving.HISTORY_INPUT]]
        exclude = list(exclude)
        if len(exclude) != n:
            raise ValueError(f"exclude has {len(exclude)} entries for {n} users")
        out = []
        for items in exclude:
            rows = {self.row_of[_id_text(i)] for i in (items or []) if _id_text(i) in self.row_of}
            out.append(np.asarray(sorted(rows), np.int64))
        return out

    def search(self, user_vectors: np.ndarray, k: int | None = None,
               exclude=None, _cols: dict | None = None,
               max_k: int = rest.DEFAULT_MAX_K) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` items per user vector: ``(ids [B, k] object (str), scores float32 [B, k])``.

        ``k`` None: the export's ``top_k``. An explicit ``k`` must be an integer in 1..``max_k``
        (default :data:`export.rest.DEFAULT_MAX_K`, the service's ``export.serve_max_k`` default,
        2000), checked by :func:`export.rest.check_k` like the service's ``:retrieve``: a
        :class:`export.rest.RequestError` (a ValueError) with the server's message otherwise.
        Before this check ``k=0`` meant ``top_k`` and any ``k`` was accepted; pass ``k=None`` for
        ``top_k`` and a larger ``max_k`` for larger lists.
        """
        k = self.top_k if k is None else rest.check_k(k, max_k)
        q = np.asarray(user_vectors, np.float32)
        excl = self._exclusions(exclude, _cols, q.shape[0])
        extra = max([len(e) for e in excl] + [0])
        want = k + extra
        n = self.vectors.shape[0]
        if self.searcher is not None:
            rows, scores = search.search_scann(self.searcher, self.index_params, q, want, n)
        else:
            rows, scores = search.top_k_dot(q, self.vectors, want)
        out_rows = np.full((q.shape[0], k), -1, np.int64)
        out_scores = np.full((q.shape[0], k), -np.inf, np.float32)
        for i in range(q.shape[0]):
            keep = rows[i] >= 0
            if excl[i].size:
                keep &= ~np.isin(rows[i], excl[i])
            r, s = rows[i][keep][:k], scores[i][keep][:k]
            out_rows[i, :len(r)], out_scores[i, :len(r)] = r, s
        ids = np.empty(out_rows.shape, dtype=object)
        ids[...] = ""
        valid = out_rows >= 0
        ids[valid] = np.asarray(self.ids, dtype=object)[out_rows[valid]]
        return ids, out_scores

    def retrieve(self, requests, k: int | None = None, exclude=None,
                 batch_size: int = 1024,
                 max_k: int = rest.DEFAULT_MAX_K) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` (default: the export's ``top_k``, 500) item ids and scores per request.

        ``k`` and ``max_k`` as in :meth:`search` (checked before any request is converted)."""
        if k is not None:
            k = rest.check_k(k, max_k)
        cols = self.to_columns(requests)
        n = len(cols[serving.HISTORY_INPUT])
        all_ids, all_scores = [], []
        for start in range(0, max(n, 1), batch_size):
            part = {c: v[start:start + batch_size] for c, v in cols.items()}
            ex = exclude
            if exclude is not None and not isinstance(exclude, str):
                ex = list(exclude)[start:start + batch_size]
            vecs = self._vectors(part, batch_size)
            ids, scores = self.search(vecs, k, ex, _cols=part, max_k=max_k)
            all_ids.append(ids)
            all_scores.append(scores)
        return np.concatenate(all_ids), np.concatenate(all_scores)

    # ------------------------------------------------------------------ users of the test split
    def vocabularies(self) -> dict:
        """``item_id`` and ``user_<field>`` vocab lists, from the export's own copies."""
        read, root = item_index.read_vocab_file, self.version_dir
        vocabs = {"item_id": read(os.path.join(root, "item_embeddings", "vocab.txt"))}
        for name in map(user_feature, self.user_fields):
            vocabs[name] = read(os.path.join(root, "user_tower", "assets", f"{name}.txt"))
        return vocabs

    def test_users(self, artifacts_dir: str, user_ids: Sequence[str] | None = None,
                   num_users: int = 1, split: str = "test") -> list:
        """Requests for users of ``split``: their latest click there, as the model would see it.

        Returns one dict per user: ``user_id``, ``request`` (raw features), ``target`` (the item id
        clicked at that example), ``clicked`` (every item id the user clicked before it, training
        period included). ``user_ids`` default: the first ``num_users`` users of the split.
        """
        from micrec_tf.data.arrays import load_split_arrays

        feats = list(EVAL_FEATURES) + [user_feature(f) for f in self.user_fields]
        arrays = load_split_arrays(artifacts_dir, split, feats)
        users = [u.decode() if isinstance(u, bytes) else str(u) for u in arrays[USER_ID]]
        if user_ids is None:
            seen = []
            for u in users:
                if u not in seen:
                    seen.append(u)
                if len(seen) >= num_users:
                    break
            user_ids = seen
        user_ids = [str(u) for u in user_ids]
        wanted = set(user_ids)
        latest = {}
        for pos, u in enumerate(users):
            if u in wanted:
                key = (int(arrays[TIMESTAMP][pos]), pos)
                if u not in latest or key > latest[u][0]:
                    latest[u] = (key, pos)
        unknown = [u for u in user_ids if u not in latest]
        if unknown:
            raise KeyError(f"user(s) {unknown[:5]} have no click in the {split} split of "
                           f"{artifacts_dir!r}")
        vocabs = self.vocabularies()
        rows = [latest[u][1] for u in user_ids]
        requests = raw_requests(arrays, rows, vocabs, self.user_fields)
        clicked = _earlier_clicks(artifacts_dir, split, rows, arrays)
        item_vocab = vocabs["item_id"]
        name = lambda i: item_vocab[i - 1] if 0 < i <= len(item_vocab) else ""  # noqa: E731
        return [{"user_id": u, "request": req, "target": name(int(arrays[ITEM][row])),
                 "clicked": [name(int(i)) for i in clicked[j]]}
                for j, (u, req, row) in enumerate(zip(user_ids, requests, rows))]


def _earlier_clicks(artifacts_dir: str, split: str, rows: Sequence[int],
                    split_arrays: dict) -> list:
    """Per example ``rows[j]`` of ``split``, the item indices its user clicked before it (sorted):
    the evaluation's own definition, :class:`micrec_tf.evaluation.data.EarlierClicksExclusion`
    (earlier timestamps in every split, plus the example's history), so ``--exclude-clicked``
    drops what the evaluation's "exclude clicked" option drops."""
    from micrec_tf.evaluation.data import earlier_clicks_exclusion, load_split_arrays

    history = []
    for name in ("train", "valid", "test"):
        if name == split:
            history.append(split_arrays)
            continue
        try:
            history.append(load_split_arrays(artifacts_dir, name, [USER_ID, ITEM, TIMESTAMP]))
        except ArtifactError:  # a damaged split is an error, not an absent one
            raise
        except FileNotFoundError:
            continue
    rows = np.asarray(rows, np.int64)
    query = {f: np.asarray(split_arrays[f])[rows] for f in (USER_ID, ITEM, TIMESTAMP, HIST_ITEMS)}
    excl = earlier_clicks_exclusion(query, history)
    return [excl.items_of(j) for j in range(len(rows))]


def _id_text(item_id) -> str:
    """An item id as the catalogue's ``str`` keys; bytes that are not UTF-8 (valid ids for the
    tower) keep their bytes as surrogates, so they match no catalogue id instead of raising."""
    if isinstance(item_id, bytes):
        return item_id.decode("utf-8", "surrogateescape")
    return str(item_id)

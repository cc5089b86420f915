"""Item-embedding dump and the ANN index built from it.

``item_embeddings/`` (written by :func:`dump_item_embeddings`)::

    embeddings.npy   float32 [N, D]  row r = the item tower's vector of catalogue item index r + 1
    ids.txt          N lines         row r's item id (so ids.txt line r <-> embeddings.npy row r)
    vocab.txt        the artifacts' vocab/item_id.txt, verbatim (line i = item index i + 1); it is
                     the vocabulary the user tower's history lookup uses
    info.json        {"num_items": N, "dim": D, "dtype": "float32", "first_index": 1}

Every catalogue item (indices 1 .. V-1 of the item vocabulary) is in the dump; index 0 (OOV /
padding) is not. ``ids.txt`` has the same lines as ``vocab.txt``; it is kept separately so the
dump stays self-describing if it is ever filtered.

``scann/`` (written by :func:`build_index` when the index kind is ``scann``): a ScaNN searcher over
``embeddings.npy`` (dot product; tree + asymmetric hashing + exact re-ordering), serialised with
``searcher.serialize(dir, relative_path=True)`` so that the directory can be renamed or moved and
still reload with ``scann.scann_ops_pybind.load_searcher(dir)``; ``params.json`` records the
parameters. Searcher neighbour ``j`` is embeddings row ``j``.

Parameters (:func:`scann_params`), for a catalogue of N items and top-k retrieval (k = 500):

* ``num_leaves`` = round(sqrt(N)) partitions (k-means tree), at least 1;
* ``num_leaves_to_search`` = enough leaves that the searched partitions hold about 20·k items on
  average, and never fewer than 5 % of the leaves (top-500 needs far more candidates than top-10);
  for catalogues up to 20·k items (10 000 for k = 500, e.g. MovieLens) that is every leaf;
* asymmetric hashing with 2 dimensions per block, anisotropic threshold 0.2 (dot product);
* exact re-ordering of the best ``reorder_k`` = max(4 k, 1000) AH candidates, so the returned
  scores are exact dot products;
* the export then measures top-k recall against brute force on (up to 500) real test users' vectors
  and doubles ``num_leaves_to_search`` until it reaches 0.95 (a query-time parameter: the searcher
  is not rebuilt; ``params.json`` holds the final value and ``measured_recall``).

Where ScaNN does not pay, ``export.index: scann`` builds the brute-force index instead and says why
(:func:`choose_index`; metadata.json ``index.reason``): catalogues under ``SCANN_MIN_ITEMS`` (256)
items, on which the tree and the hashing codebooks cannot be trained, and catalogues of at most k
items, where every query returns the whole catalogue.

Brute force (``export.index: brute_force``, or the fallback above) writes no ``scann/``: retrieval
then multiplies by the whole matrix, which is exact and fast enough up to
``export.brute_force_max_items`` items.
"""
from __future__ import annotations

import errno
import json
import math
import os
import shutil

import numpy as np

from micrec_tf import search
from micrec_tf.cli import UsageError

from export import write_checks

SCANN_MIN_ITEMS = 256
TARGET_RECALL = 0.95


def read_vocab_file(path: str) -> list:
    """Lines split on "\\n" only (as the vocab files are written and the serving tables read)."""
    with open(path, "rb") as fh:
        lines = fh.read().split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return [line.decode("utf-8") for line in lines]


def item_vectors(model, indices: np.ndarray, batch_size: int = 4096) -> np.ndarray:
    """float32 [len(indices), D]: the model's own chunked
    ``item_embeddings(indices, batch_size)``."""
    if len(indices) == 0:
        raise ValueError("the item vocabulary is empty: nothing to export")
    return np.asarray(model.item_embeddings(np.asarray(indices, np.int64), batch_size),
                      dtype=np.float32)


def dump_item_embeddings(model, item_vocab_file: str, out_dir: str,
                         batch_size: int = 4096) -> dict:
    """Writes ``out_dir`` (see the module docstring); returns its ``info.json`` content."""
    ids = read_vocab_file(item_vocab_file)
    if not ids:
        raise ValueError(f"item vocabulary {item_vocab_file!r} is empty")
    indices = np.arange(1, len(ids) + 1, dtype=np.int64)
    vectors = item_vectors(model, indices, batch_size)
    if not np.all(np.isfinite(vectors)):
        raise ValueError("the item tower produced non-finite vectors; refusing to export them")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "embeddings.npy")
    try:
        np.save(path, vectors)
        path = os.path.join(out_dir, "ids.txt")
        with open(path, "w", encoding="utf-8", newline="\n") as fh:
            fh.write("".join(i + "\n" for i in ids))
        path = os.path.join(out_dir, "vocab.txt")
        shutil.copyfile(item_vocab_file, path)
        info = {"num_items": int(vectors.shape[0]), "dim": int(vectors.shape[1]),
                "dtype": "float32", "first_index": 1}
        path = os.path.join(out_dir, "info.json")
        with open(path, "w") as fh:
            json.dump(info, fh, indent=1)
    except OSError as err:
        if err.filename is None:  # a failed write() names no file: name the one being written
            raise OSError(err.errno, err.strerror, path) from err
        raise
    return info


def load_item_embeddings(dump_dir: str) -> tuple[list, np.ndarray]:
    """``(ids, vectors)`` of a dump: ``ids[r]`` is the id of ``vectors[r]``."""
    vectors = np.load(os.path.join(dump_dir, "embeddings.npy"))
    ids = read_vocab_file(os.path.join(dump_dir, "ids.txt"))
    if len(ids) != vectors.shape[0]:
        raise ValueError(f"{dump_dir}: {len(ids)} ids for {vectors.shape[0]} vectors")
    return ids, vectors


def choose_index(kind: str, num_items: int, k: int) -> tuple[str, str]:
    """``(kind to build, why)`` for the configured ``export.index`` ``kind`` (module docstring)."""
    n = int(num_items)
    if kind == "brute_force":
        return "brute_force", "export.index is brute_force"
    if kind != "scann":
        raise ValueError(f"unknown index kind {kind!r}: expected 'scann' or 'brute_force'")
    if n < SCANN_MIN_ITEMS:
        return "brute_force", (f"{n} items are fewer than the {SCANN_MIN_ITEMS} ScaNN needs to "
                               "train its tree and hashing codebooks; exact scoring is as fast")
    if n <= k:
        return "brute_force", (f"top-{k} retrieval returns all {n} items, so an approximate "
                               "index prunes nothing")
    return "scann", f"{n} items, more than top-{k} and at least {SCANN_MIN_ITEMS}"


def describe_index(info: dict) -> str:
    """One log line for a :func:`build_index` result."""
    line = f"{info['kind']} over {info['num_items']} items ({info['reason']})"
    if "measured_recall" in info:
        line += (f"; recall@{info['num_neighbors']} vs brute force on {info['recall_queries']} "
                 f"test users: {info['measured_recall']:.4f} "
                 f"({info['num_leaves_to_search']}/{info['num_leaves']} leaves)")
    return line


def scann_params(num_items: int, k: int = 500) -> dict:
    """ScaNN parameters for ``num_items`` items and top-``k`` retrieval (module docstring)."""
    n = int(num_items)
    if n < SCANN_MIN_ITEMS:
        raise ValueError(f"ScaNN needs at least {SCANN_MIN_ITEMS} items to train its tree and "
                         f"codebooks. Received: num_items={n}; use the brute-force index")
    leaves = max(1, int(round(math.sqrt(n))))
    per_leaf = n / leaves
    to_search = max(math.ceil(0.05 * leaves), math.ceil(20 * k / per_leaf))
    return {
        "mode": "tree_ah",
        "num_neighbors": min(k, n),
        "num_leaves": leaves,
        "num_leaves_to_search": int(min(leaves, to_search)),
        "training_sample_size": int(min(n, 250000)),
        "dimensions_per_block": 2,
        "anisotropic_quantization_threshold": 0.2,
        "reorder_k": int(min(n, max(4 * k, 1000))),
        "distance_measure": "dot_product",
    }


def build_index(vectors: np.ndarray, kind: str, out_dir: str, k: int = 500,
                brute_force_max_items: int = 20000, queries: np.ndarray | None = None,
                target_recall: float = TARGET_RECALL) -> dict:
    """Builds the index :func:`choose_index` picks for ``kind`` into ``out_dir`` (``scann``) or
    nothing (``brute_force``).

    ``queries``: sample user vectors (real test users) to check, and if needed raise,
    ``num_leaves_to_search`` until top-``k`` recall against brute force reaches
    ``target_recall`` (see :func:`tune_leaves_to_search`).
    Returns the index description stored in metadata.json (``kind``, ``requested``, ``reason``,
    ``num_items``, and the ScaNN parameters when ``kind`` is ``scann``).
    """
    n = int(vectors.shape[0])
    if n == 0:
        raise ValueError("the item dump is empty: no index to build")
    chosen, reason = choose_index(kind, n, k)
    info = {"kind": chosen, "requested": kind, "reason": reason, "num_items": n}
    if chosen == "brute_force":
        if n > brute_force_max_items:
            raise UsageError(
                f"export.index is brute_force but the catalogue has {n} items, more than "
                f"export.brute_force_max_items={brute_force_max_items}; use export.index: scann "
                "(or raise the limit if exact scoring of every item per request is affordable)")
        return info
    params = scann_params(n, k)
    searcher = search.build_scann(vectors, params)
    if queries is not None and len(queries):
        params = tune_leaves_to_search(searcher, params, vectors, queries, k, target_recall)
    save_scann(searcher, params, out_dir)
    return {**info, "path": os.path.basename(out_dir), **params}


def tune_leaves_to_search(searcher, params: dict, vectors: np.ndarray, queries: np.ndarray,
                          k: int, target_recall: float = TARGET_RECALL) -> dict:
    """Measures top-``k`` recall of ``searcher`` vs brute force on ``queries``; while it is below
    ``target_recall``, doubles ``num_leaves_to_search`` (a query-time parameter: no rebuild).

    Trained embeddings are far less clustered than synthetic ones (on MovieLens-1M, searching 10 %
    of the leaves finds under half of the exact top 500), hence the check. Returns new params with
    ``measured_recall`` and ``recall_queries``.
    """
    params = dict(params)
    n = vectors.shape[0]
    exact, _ = search.top_k_dot(np.asarray(queries, np.float32), vectors, k)
    while True:
        rows, _ = search.search_scann(searcher, params, queries, k, n)
        recall = recall_at_k(rows, exact)
        if (recall >= target_recall
                or params["num_leaves_to_search"] >= params["num_leaves"]):
            break
        params["num_leaves_to_search"] = int(min(params["num_leaves"],
                                                 2 * params["num_leaves_to_search"]))
    params["measured_recall"] = round(float(recall), 5)
    params["recall_queries"] = int(len(queries))
    return params


def save_scann(searcher, params: dict, out_dir: str) -> None:
    """Serialises ``searcher`` with paths relative to ``out_dir`` (movable), plus params.json.

    ScaNN's native writer reports a failed write as a ``RuntimeError`` ("Failed to extract
    SingleMachineFactoryOptions: I/O error", or "...: Failed to write proto to <file>"); it is
    raised again as an ``OSError`` with the cause found here (:func:`scann_write_error`).
    """
    os.makedirs(out_dir, exist_ok=True)
    try:
        searcher.serialize(out_dir, relative_path=True)
    except RuntimeError as err:
        raise scann_write_error(err, out_dir) from err
    with open(os.path.join(out_dir, "params.json"), "w") as fh:
        json.dump(params, fh, indent=1)


def scann_write_error(err: RuntimeError, out_dir: str) -> OSError:
    """An ``OSError`` for ScaNN's failure ``err`` to serialise into ``out_dir``: ENOSPC when the
    disk is full, else the errno of a small test write to the file ScaNN names (or to a new file
    in ``out_dir``), else EIO. Its message keeps ScaNN's."""
    message = str(err)
    named = message.rsplit("Failed to write proto to ", 1)
    target = named[1].strip() if len(named) == 2 else os.path.join(out_dir, ".write-probe")
    code = errno.EIO
    if write_checks.disk_full(out_dir):
        code = errno.ENOSPC
    else:
        try:
            with open(target, "wb") as fh:
                fh.write(b"\0" * 4096)
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as probe:
            code = probe.errno or errno.EIO
        finally:
            if len(named) != 2 and os.path.isfile(target):
                os.remove(target)
    return OSError(code, f"{os.strerror(code)} (ScaNN: {message})", out_dir)


def load_scann(index_dir: str):
    """Reloads a :func:`save_scann` index (no rebuilding): ``(searcher, params)``; search it with
    :func:`micrec_tf.search.search_scann` (neighbour j = dump row j)."""
    with open(os.path.join(index_dir, "params.json")) as fh:
        params = json.load(fh)
    return search.load_scann_searcher(index_dir), params


def recall_at_k(approx_rows: np.ndarray, exact_rows: np.ndarray) -> float:
    """Mean over queries of |approx top-k ∩ exact top-k| / |exact top-k| (padding ignored)."""
    rec = []
    for a, e in zip(approx_rows, exact_rows):
        e = set(int(x) for x in e if x >= 0)
        if e:
            rec.append(len(e & set(int(x) for x in a if x >= 0)) / len(e))
    return float(np.mean(rec)) if rec else 1.0

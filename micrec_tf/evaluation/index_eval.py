"""Evaluation through the exported item index (issue 31): HIT@N as served, and the index's recall.

    python -m micrec_tf.evaluation.index_eval --config configs/synthetic-1m.yaml \\
        --set eval.search=index [--run-dir runs/<name>] [--export exports/<name>] \\
        [--version V] [--split test] [--recall-queries 2000] [--out metrics-index.json]

``eval.search`` (:data:`micrec_tf.config.EVAL_SEARCHES`) picks how the queries are ranked:

* ``exact`` (default): :func:`micrec_tf.evaluation.evaluate.evaluate_model`, the function train's
  final evaluation calls, on the run's restored model: every catalogue item scored, bit for bit
  the numbers of ``runs/<name>/metrics.json`` for the same split, subsample and exclusions.
* ``index``: the items come from the export version's index, as the service retrieves them:
  its ScaNN searcher (``scann/``, searched with the version's ``params.json``, i.e. its tuned
  ``num_leaves_to_search``) over its item dump (``item_embeddings/embeddings.npy``, row r =
  catalogue index r + 1); a ``brute_force`` export scores the whole dump. The candidates are
  rescored exactly and ordered by the project's tie rule (:mod:`micrec_tf.search`), excluded
  items dropped, so the ranking differs from the exact one only by the items the index missed.
  Beside HIT@N and coverage@N (of the index's lists) it reports, per N of ``eval.hit_n``:
  ``index_recall@N`` = mean over queries of |index top-N ∩ exact top-N| / |exact top-N| (exact
  search over the same user vectors, item vectors and exclusions; queries whose exact list is
  empty are left out) and ``exact_hit@N`` (the exact HIT@N on the recall queries).

The queries are those of the run's final evaluation, under the run's own config
(``runs/<name>/config.yaml``): the split's clicks (``test``: a seeded subset of
``eval.test_max_examples`` with ``train.seed + 1``, and the ``long_tail`` slice; ``valid``: of
``train.validation_max_examples`` with ``train.seed``), each user vector from the run's model
restored from its checkpoint, ``eval.exclude_clicked`` as in training. Exact search at 1 M items
costs minutes per 10 k queries: ``--recall-queries N`` measures the recall on a seeded subset of
N queries (0 = all), reported as ``index_recall_queries``.
"""
from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

from micrec_tf import search
from micrec_tf.evaluation import metrics

__all__ = ["index_top_k", "recall_at_n", "evaluate_with_index", "evaluate_export",
           "load_export_index"]


def _check_vectors(user_vectors, item_vectors) -> tuple:
    q = np.asarray(user_vectors, np.float32)
    items = np.asarray(item_vectors, np.float32)
    if q.ndim != 2 or items.ndim != 2 or q.shape[1] != items.shape[1]:
        raise ValueError(f"need user vectors [U, D] and item vectors [V, D]. Received: shapes "
                         f"{q.shape} and {items.shape}")
    if items.shape[0] < 2:
        raise ValueError(f"item vectors must hold the padding row 0 and at least one item. "
                         f"Received: {items.shape[0]} row(s)")
    return q, items


def index_top_k(user_vectors: np.ndarray, item_vectors: np.ndarray, k: int, searcher=None,
                params: dict | None = None, exclude=None, batch_size: int = 1024):
    """Top-``k`` catalogue items per query, the candidates found by an index.

    Args:
      user_vectors: float32 [U, D] query vectors.
      item_vectors: float32 [V, D]; row 0 is padding (never retrieved), row i = item index i.
      k: items per query.
      searcher: a ScaNN searcher over ``item_vectors[1:]`` (searcher neighbour j = item j + 1),
        searched with ``params`` (:func:`micrec_tf.search.search_scann`; ``mode`` ``tree_ah`` or
        ``brute_force``); None = a brute-force index: every item scored (exact).
      exclude: per-query item sets removed from the ranking (:func:`micrec_tf.search.as_exclusion`
        formats); the index is asked for ``k`` + the batch's largest set so ``k`` remain.
      batch_size: queries per search call.

    Returns: ``indices int64 [U, k]`` (catalogue indices, -1 padding) and ``scores float32
    [U, k]``: the index's candidates rescored exactly, tie rule of :mod:`micrec_tf.search`.
    """
    q, items = _check_vectors(user_vectors, item_vectors)
    if searcher is None:
        return metrics.top_k_items(q, items, k, exclude=exclude, batch_size=batch_size)
    if params is None:
        raise ValueError("a searcher needs its params (mode, num_leaves_to_search, reorder_k)")
    n = items.shape[0] - 1
    excl = search.as_exclusion(exclude, q.shape[0])
    out_idx, out_scores = [], []
    for start in range(0, q.shape[0], batch_size):
        stop = min(q.shape[0], start + batch_size)
        rows = cols = np.zeros(0, np.int64)
        extra = 0
        if excl is not None:
            rows, cols = excl.rows_cols(start, stop)
            extra = int(np.bincount(rows, minlength=stop - start).max()) if rows.size else 0
        nn, _ = search.search_scann(searcher, params, q[start:stop], int(min(n, k + extra)), n)
        cand = np.where(nn >= 0, nn + 1, -1)
        idx, sc = search.rescore_candidates(q[start:stop], items, cand, k, rows, cols)
        out_idx.append(idx)
        out_scores.append(sc)
    if not out_idx:
        return np.zeros((0, k), np.int64), np.zeros((0, k), np.float32)
    return np.concatenate(out_idx), np.concatenate(out_scores)


def recall_at_n(approx: np.ndarray, exact: np.ndarray, ns) -> dict:
    """``{N: mean over queries of |approx[:, :N] ∩ exact[:, :N]| / |exact[:, :N]|}``.

    Entries < 0 (padding) count in neither list; queries whose exact top-N is empty are left out
    (recall 1.0 when none is left). ``approx`` and ``exact``: int [U, >= N] item indices, each row
    without repeats.
    """
    approx, exact = np.asarray(approx, np.int64), np.asarray(exact, np.int64)
    if approx.shape[0] != exact.shape[0]:
        raise ValueError(f"{approx.shape[0]} approximate lists for {exact.shape[0]} exact ones")
    out = {}
    width = int(max(approx.max(initial=0), exact.max(initial=0))) + 1
    rows = np.arange(approx.shape[0], dtype=np.int64)[:, None]
    for n in ns:
        n = int(n)
        if n <= 0 or n > min(approx.shape[1], exact.shape[1]):
            raise ValueError(f"N={n} is outside 1..{min(approx.shape[1], exact.shape[1])} "
                             "(the lists' width)")
        a, e = approx[:, :n], exact[:, :n]
        a_codes = (rows * width + a)[a >= 0]
        e_codes = rows * width + e
        found = np.isin(e_codes, a_codes) & (e >= 0)
        size = (e >= 0).sum(axis=1)
        keep = size > 0
        out[n] = float(np.mean(found.sum(axis=1)[keep] / size[keep])) if keep.any() else 1.0
    return out


def evaluate_with_index(user_vectors: np.ndarray, item_vectors: np.ndarray, targets: np.ndarray,
                        searcher=None, params: dict | None = None, ns=(50, 100, 200, 500),
                        coverage_ns=(50, 500), exclude=None, batch_size: int = 1024,
                        slices=None, recall_rows: np.ndarray | None = None,
                        exact_engine: str = "numpy") -> dict:
    """HIT@N / coverage@N of the index's rankings (:func:`index_top_k`) and its recall.

    Returns :func:`micrec_tf.evaluation.metrics.summarize_topk`'s dict for the index's top lists,
    plus ``index_recall@N`` and ``exact_hit@N`` for every N of ``ns`` over the queries
    ``recall_rows`` (int indices; None = all), ``index_recall_queries`` (their number) and
    ``index_kind`` (``scann`` / ``brute_force``). Exact lists come from
    :func:`micrec_tf.evaluation.metrics.top_k_items` on the same vectors and exclusions, with
    ``exact_engine`` (``eval.exact_engine``; default ``numpy``, the behaviour before the argument).
    """
    ns, coverage_ns = [int(n) for n in ns], [int(n) for n in coverage_ns]
    q, items = _check_vectors(user_vectors, item_vectors)
    targets = np.asarray(targets).reshape(-1)
    k = max(ns + coverage_ns)
    idx, _ = index_top_k(q, items, k, searcher, params, exclude, batch_size)
    out = metrics.summarize_topk(idx, targets, items.shape[0], ns, coverage_ns, slices)
    rows = (np.arange(q.shape[0]) if recall_rows is None
            else np.asarray(recall_rows, np.int64).reshape(-1))
    excl = search.as_exclusion(exclude, q.shape[0])
    sub_excl = None
    if excl is not None:
        lists = []
        for r in rows:
            _, cols = excl.rows_cols(int(r), int(r) + 1)
            lists.append(cols)
        sub_excl = search.CSRExclusion.from_lists(lists)
    kr = max(ns)
    exact, _ = metrics.top_k_items(q[rows], items, kr, exclude=sub_excl, batch_size=batch_size,
                                   engine=exact_engine)
    for n, val in recall_at_n(idx[rows][:, :kr], exact, ns).items():
        out[f"index_recall@{n}"] = val
    if rows.size:
        for n, val in metrics.hit_at_n(exact, targets[rows], ns).items():
            out[f"exact_hit@{n}"] = val
    out["index_recall_queries"] = int(rows.size)
    out["index_kind"] = "brute_force" if searcher is None else "scann"
    return out


# ----------------------------------------------------------------------------- the export
def load_export_index(version_dir: str, vocab_file: str | None = None) -> tuple:
    """``(item_vectors [V, D] with a zero padding row 0, searcher or None, params or None,
    index info)`` of one export version folder.

    ``vocab_file``: the artifacts' ``vocab/item_id.txt``; when given, the dump's ids must be its
    lines in order (dump row r = catalogue index r + 1), else a ``ValueError`` says where they
    differ: the export was made from other artifacts than the run's.
    """
    from export import item_index

    with open(os.path.join(version_dir, "metadata.json"), encoding="utf-8") as fh:
        metadata = json.load(fh)
    ids, vectors = item_index.load_item_embeddings(os.path.join(version_dir, "item_embeddings"))
    if vocab_file is not None:
        vocab = item_index.read_vocab_file(vocab_file)
        if ids != vocab:
            first = next((i for i, (a, b) in enumerate(zip(ids, vocab)) if a != b),
                         min(len(ids), len(vocab)))
            raise ValueError(f"{version_dir}: its item dump ({len(ids)} ids) is not the item "
                             f"vocabulary {vocab_file} ({len(vocab)} lines); first difference "
                             f"at line {first + 1}: export the run again")
    info = dict(metadata.get("index", {}))
    kind = info.get("kind", "brute_force")
    searcher = params = None
    if kind == "scann":
        searcher, params = item_index.load_scann(os.path.join(version_dir, "scann"))
    elif kind != "brute_force":
        raise ValueError(f"unknown index kind {kind!r} in {version_dir}/metadata.json")
    vectors = np.asarray(vectors, np.float32)
    items = np.concatenate([np.zeros((1, vectors.shape[1]), np.float32), vectors])
    return items, searcher, params, info


def _subsample(arrays: dict, max_examples: int, seed: int) -> dict:
    """Train's final-evaluation subset (``micrec_tf.train._subsample``; 0 = every example)."""
    from micrec_tf.train import _subsample as train_subsample

    return train_subsample(arrays, max_examples, seed) if max_examples else arrays


def evaluate_export(cfg, run_dir: str | None = None, export_path: str | None = None,
                    version=None, split: str = "test", recall_queries: int = 0,
                    log=print) -> dict:
    """The metrics of ``split`` ranked as ``cfg.eval.search`` says (module docstring).

    The queries and metrics follow the run's own config (``runs/<name>/config.yaml``: its
    ``eval.*`` keys, ``train.seed``, ``train.validation_max_examples``), so that ``exact`` is its
    final evaluation; ``cfg`` gives only ``eval.search``, ``eval.exact_engine`` (the engine of
    the exact rankings, default ``numpy``) and the default folders.

    ``run_dir`` (default ``cfg.run_dir``): the finished run whose model gives the user vectors;
    ``export_path`` (default ``cfg.export_dir``): an export root (``version``: default the newest)
    or a version folder, read only for ``eval.search: index``.
    """
    from micrec_tf.data.arrays import load_split_arrays, train_item_counts
    from micrec_tf.data.contract import ITEM
    from micrec_tf.evaluation.data import earlier_clicks_exclusion
    from micrec_tf.evaluation.evaluate import evaluate_model, user_vectors
    from micrec_tf.train import restore_model

    from export import serving

    if split not in ("valid", "test"):
        raise ValueError(f"split must be 'valid' or 'test'. Received: {split!r}")
    run_dir = run_dir or cfg.run_dir
    model, run_cfg, art = restore_model(run_dir)
    art_dir = run_cfg.artifacts_dir
    ev, seed = run_cfg.eval, run_cfg.train.seed
    splits = {s: load_split_arrays(art_dir, s) for s in ("train", "valid", "test")}
    num_items = int(art.item_table.num_items)  # as train's evaluation
    if split == "test":
        arrays = _subsample(splits["test"], ev.test_max_examples, seed + 1)
        tail = metrics.long_tail_items(train_item_counts(art_dir, splits["train"]))
        slices = {"long_tail": tail[arrays[ITEM]]}
    else:
        arrays = _subsample(splits["valid"], run_cfg.train.validation_max_examples, seed)
        slices = None
    excl = (earlier_clicks_exclusion(arrays, list(splits.values()))
            if ev.exclude_clicked else None)
    start = time.time()
    if cfg.eval.search == "exact":
        result = evaluate_model(model, arrays, num_items, ev.hit_n, ev.coverage_n,
                                exclude=excl, batch_size=ev.batch_size, slices=slices,
                                exact_engine=cfg.eval.exact_engine)
        result["search"] = "exact"
    else:
        export_path = export_path or cfg.export_dir
        vdir = (export_path if os.path.exists(os.path.join(export_path, "metadata.json"))
                else serving.version_dir(export_path, version))
        items, searcher, params, info = load_export_index(
            vdir, os.path.join(art_dir, "vocab", "item_id.txt"))
        if items.shape[0] != num_items:
            raise ValueError(f"{vdir}: {items.shape[0] - 1} exported items, the run's catalogue "
                             f"has {num_items - 1}")
        users = user_vectors(model, arrays, ev.batch_size)
        rows = None
        if recall_queries and recall_queries < users.shape[0]:
            rows = np.sort(np.random.default_rng(seed).choice(
                users.shape[0], int(recall_queries), replace=False))
        result = evaluate_with_index(users, items, np.asarray(arrays[ITEM]), searcher, params,
                                     ev.hit_n, ev.coverage_n, excl, ev.batch_size, slices,
                                     rows, cfg.eval.exact_engine)
        result.update(search="index", export_version_dir=vdir,
                      index_leaves_to_search=(params or {}).get("num_leaves_to_search"),
                      index_num_leaves=(params or {}).get("num_leaves"))
        result["num_examples"] = int(len(arrays[ITEM]))
    result["split"] = split
    result["seconds"] = round(time.time() - start, 3)
    shown = " ".join(f"{k}={v:.4f}" for k, v in result.items()
                     if isinstance(v, float) and "/" not in k)
    log(f"[index_eval] {split} ({result['search']}, {result['num_examples']} clicks): {shown}")
    return result


def main(argv=None) -> int:
    from micrec_tf import cli

    parser = cli.parser(__doc__)
    parser.add_argument("--run-dir", default=None, help="finished run (default runs/<name>)")
    parser.add_argument("--export", default=None,
                        help="export root or version folder (default exports/<name>)")
    parser.add_argument("--version", default=None, help="export version (default: the newest)")
    parser.add_argument("--split", default="test", choices=("valid", "test"))
    parser.add_argument("--recall-queries", type=int, default=0,
                        help="queries the index recall is measured on (seeded subset; 0 = all)")
    parser.add_argument("--out", default=None, help="also write the metrics to this JSON file")
    args = parser.parse_args(argv)
    if args.recall_queries < 0:
        parser.error(f"--recall-queries must be >= 0. Received: {args.recall_queries}")
    cfg = cli.load(args)
    result = evaluate_export(cfg, args.run_dir, args.export, args.version, args.split,
                             args.recall_queries)
    cli.print_json(result, args.out)
    return 0


if __name__ == "__main__":
    from micrec_tf import cli as _cli

    sys.exit(_cli.run(main))

"""The two non-neural reference rows (most-popular, co-occurrence item-kNN) on a split.

    python -m experiments.reference_rows --config configs/ml-1m.yaml [--split test]
        [--exclude-clicked both|on|off] [--knn-variant count|sqrt_pop|cosine|count_top50]
        [--out results.json]

Reads ``artifacts/<name>/`` (examples, feature spec, ``cooccurrence.npz``), ranks the whole
corpus for every click of the split and prints HIT@N (``eval.hit_n``), coverage@N
(``eval.coverage_n``) and HIT@N on the long-tail clicks (targets among the 80 % least-clicked
training items). The item-kNN weighting (``baselines.KNN_VARIANTS``) is chosen on the validation
split by HIT@N for the first N of ``eval.hit_n``, under the same exclusion setting as the row,
unless ``--knn-variant`` fixes it; the row names the variant and every variant's validation HIT@N.
"""
from __future__ import annotations

import glob
import json
import os
import sys
import time

import numpy as np

from micrec_tf import cli
from micrec_tf.evaluation.baselines import (KNN_VARIANTS, CooccurrenceItemKNN, MostPopular,
                                            choose_variant)
from micrec_tf.data.arrays import load_split_arrays, num_items, train_item_counts
from micrec_tf.data.artifacts import load_cooccurrence
from micrec_tf.data.contract import HIST_ITEMS, HIST_LEN, ITEM, TIMESTAMP, USER_ID
from micrec_tf.evaluation.data import earlier_clicks_exclusion
from micrec_tf.evaluation.metrics import long_tail_items, summarize_topk

# The stats.json entries the rows depend on (written next to them by --out): these keys, and
# every key starting with one of the prefixes (the co-occurrence pair counts and settings).
ROW_STATS = ("items", "events_by_split", "num_examples", "split", "split_boundaries")
ROW_STATS_PREFIXES = ("pairs", "cooc", "session", "max_pairs")


def reference_rows(artifacts_dir: str, split: str = "test", ns=(50, 100, 200, 500),
                   coverage_ns=(50, 500), exclude_clicked=(False, True),
                   batch_size: int = 1024, long_tail_fraction: float = 0.8, *,
                   knn_variants=KNN_VARIANTS, knn_variant: str | None = None,
                   select_split: str = "valid", select_n: int | None = None) -> dict:
    """{"<baseline>/exclude_clicked=<bool>": metrics dict} for both baselines (summarize_topk keys,
    plus ``long_tail/...`` and ``seconds``, the ranking time of the row's split).

    The item-kNN rows also hold ``cooccurrence_entries`` (E of the table), ``variant`` (the
    weighting used) and ``variant_selection``:
    ``{"split", "metric", "hit": {variant: HIT@N on that split}, "seconds"}`` when the variant
    was chosen among ``knn_variants`` on ``select_split`` by HIT@``select_n`` (default: ``ns[0]``),
    or ``{"split": None, "reason": ...}`` when ``knn_variant`` fixed it, only one variant was
    offered, or ``select_split`` has no examples (then ``knn_variants[0]`` is used).
    """
    ns, coverage_ns = list(ns), list(coverage_ns)
    knn_variants = list(knn_variants)
    for name in knn_variants + ([knn_variant] if knn_variant is not None else []):
        if name not in KNN_VARIANTS:
            raise ValueError(f"item-kNN variants must be among {KNN_VARIANTS}. Received: {name!r}")
    if not knn_variants:
        raise ValueError(f"knn_variants must name at least one of {KNN_VARIANTS}. "
                         f"Received: {knn_variants!r}")
    k = max(ns + coverage_ns)
    select_n = int(ns[0] if select_n is None else select_n)
    v = num_items(artifacts_dir)
    cols = [USER_ID, ITEM, TIMESTAMP]

    def present(name):
        return bool(glob.glob(os.path.join(glob.escape(artifacts_dir), "examples", f"{name}-*")))

    selecting = knn_variant is None and len(knn_variants) > 1 and (
        select_split == split or present(select_split))
    queries = {split} | ({select_split} if selecting else set())
    splits = {}
    for name in ("train", "valid", "test"):
        if name in queries or present(name):
            feats = cols + [HIST_ITEMS, HIST_LEN] if name in queries else cols
            splits[name] = load_split_arrays(artifacts_dir, name, feats)
    query = splits[split]
    counts = train_item_counts(artifacts_dir, splits["train"])
    table = load_cooccurrence(artifacts_dir, v)
    targets = np.asarray(query[ITEM], dtype=np.int64)
    slices = {"long_tail": long_tail_items(counts, long_tail_fraction)[targets]}
    exclusion = earlier_clicks_exclusion(query, list(splits.values()))
    if selecting:
        sel_query = splits[select_split]
        sel_exclusion = earlier_clicks_exclusion(sel_query, list(splits.values()))
    out = {}
    for excl in exclude_clicked:
        if selecting:
            chosen, hits, secs = choose_variant(
                table, counts, sel_query, sel_query[ITEM], select_n, knn_variants,
                exclude=sel_exclusion if excl else None, batch_size=batch_size)
            selection = {"split": select_split, "metric": f"hit@{select_n}", "hit": hits,
                         "seconds": secs}
        else:
            chosen = knn_variant or knn_variants[0]
            reason = ("given" if knn_variant is not None else "only one variant offered"
                      if len(knn_variants) == 1 else f"no {select_split} split")
            selection = {"split": None, "reason": reason}
        models = {"most_popular": MostPopular(counts),
                  "cooccurrence_itemknn": CooccurrenceItemKNN(table, counts, variant=chosen)}
        for name, model in models.items():
            t0 = time.time()
            idx, _ = model.rank(query, k, exclude=exclusion if excl else None,
                                batch_size=batch_size)
            res = summarize_topk(idx, targets, v, ns, coverage_ns, slices)
            res["seconds"] = round(time.time() - t0, 2)
            if name == "cooccurrence_itemknn":
                res["variant"] = chosen
                res["variant_selection"] = selection
                res["cooccurrence_entries"] = table.num_entries
            out[f"{name}/exclude_clicked={str(excl).lower()}"] = res
    return out


def to_markdown(rows: dict, ns, coverage_ns) -> str:
    head = (["row"] + [f"HIT@{n}" for n in ns] + [f"cov@{n}" for n in coverage_ns]
            + [f"tail HIT@{n}" for n in ns])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in rows.items():
        vals = ([r[f"hit@{n}"] for n in ns] + [r[f"coverage@{n}"] for n in coverage_ns]
                + [r[f"long_tail/hit@{n}"] for n in ns])
        label = f"{name} ({r['variant']})" if "variant" in r else name
        lines.append("| " + " | ".join([label] + [f"{x:.4f}" for x in vals]) + " |")
    return "\n".join(lines)


def selection_lines(rows: dict) -> list:
    """One line per item-kNN row: which variant, chosen how (every variant's held-out HIT@N)."""
    out = []
    for name, r in rows.items():
        sel = r.get("variant_selection")
        if sel is None:
            continue
        if sel.get("split"):
            hits = ", ".join(f"{k} {h:.4f}" for k, h in sel["hit"].items())
            out.append(f"{name}: variant {r['variant']} chosen on {sel['split']} "
                       f"{sel['metric']} ({hits}; {sel['seconds']}s)")
        else:
            out.append(f"{name}: variant {r['variant']} ({sel['reason']})")
    return out


def _stats(artifacts_dir: str) -> dict:
    path = os.path.join(artifacts_dir, "stats.json")
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as fh:
        stats = json.load(fh)
    return {key: val for key, val in stats.items()
            if key in ROW_STATS or key.startswith(ROW_STATS_PREFIXES)}


def main(argv=None) -> int:
    p = cli.parser(__doc__.splitlines()[0])
    p.add_argument("--split", default="test", choices=["valid", "test"])
    p.add_argument("--exclude-clicked", default="both", choices=["both", "on", "off"])
    p.add_argument("--knn-variant", default=None, choices=list(KNN_VARIANTS),
                   help="fix the item-kNN weighting (default: chosen on the validation split)")
    p.add_argument("--out", default="", help="write the metrics as JSON here")
    args = p.parse_args(argv)
    cfg = cli.load(args)
    excl = {"both": (False, True), "on": (True,), "off": (False,)}[args.exclude_clicked]
    t0 = time.time()
    rows = reference_rows(cfg.artifacts_dir, args.split, cfg.eval.hit_n, cfg.eval.coverage_n,
                          excl, cfg.eval.batch_size, knn_variant=args.knn_variant)
    seconds = round(time.time() - t0, 1)
    any_row = next(iter(rows.values()))
    print(f"{cfg.artifacts_dir} split={args.split} clicks={any_row['num_clicks']} "
          f"oov={any_row['num_oov_clicks']} long_tail={any_row['long_tail/num_clicks']} "
          f"({seconds}s)")
    print("\n".join(selection_lines(rows)))
    print(to_markdown(rows, cfg.eval.hit_n, cfg.eval.coverage_n))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as fh:
            json.dump({"artifacts": cfg.artifacts_dir, "split": args.split, "rows": rows,
                       "artifacts_stats": _stats(cfg.artifacts_dir), "seconds": seconds,
                       "command": "python -m experiments.reference_rows "
                                  + " ".join(argv if argv is not None else sys.argv[1:])},
                      fh, indent=1, sort_keys=True)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))

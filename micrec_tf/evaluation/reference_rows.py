"""The two non-neural reference rows (most-popular, co-occurrence item-kNN) on a split.

    python -m micrec_tf.evaluation.reference_rows --config configs/ml-1m.yaml [--split test]
        [--exclude-clicked both|on|off] [--out results.json]

Reads ``artifacts/<name>/`` (examples, feature spec, co-occurrence table), ranks the whole corpus
for every click of the split and prints HIT@N (``eval.hit_n``), coverage@N (``eval.coverage_n``)
and HIT@N on the long-tail clicks (targets among the 80 % least-clicked training items).
"""
from __future__ import annotations

import sys
import glob
import json
import os
import time

import numpy as np

from micrec_tf import cli
from micrec_tf.evaluation.baselines import CooccurrenceItemKNN, MostPopular
from micrec_tf.evaluation.data import (earlier_clicks_exclusion, load_cooccurrence,
                                       load_split_arrays, num_items, train_item_counts)
from micrec_tf.evaluation.metrics import long_tail_items, summarize_topk

BASELINES = ("most_popular", "cooccurrence_itemknn")


def reference_rows(artifacts_dir: str, split: str = "test", ns=(50, 100, 200, 500),
                   coverage_ns=(50, 500), exclude_clicked=(False, True),
                   batch_size: int = 1024, long_tail_fraction: float = 0.8) -> dict:
    """{"<baseline>/exclude_clicked=<bool>": metrics dict} for both baselines (summarize_topk keys,
    plus ``long_tail/...`` and ``seconds``)."""
    ns, coverage_ns = list(ns), list(coverage_ns)
    k = max(ns + coverage_ns)
    v = num_items(artifacts_dir)
    cols = ["user_id", "item", "timestamp"]
    splits = {}
    for name in ("train", "valid", "test"):
        if name == split or glob.glob(os.path.join(artifacts_dir, "examples", f"{name}-*")):
            feats = cols + ["hist_items", "hist_len"] if name == split else cols
            splits[name] = load_split_arrays(artifacts_dir, name, feats)
    query = splits[split]
    counts = train_item_counts(artifacts_dir, splits["train"])
    targets = np.asarray(query["item"], dtype=np.int64)
    slices = {"long_tail": long_tail_items(counts, long_tail_fraction)[targets]}
    models = {"most_popular": MostPopular(counts),
              "cooccurrence_itemknn": CooccurrenceItemKNN(load_cooccurrence(artifacts_dir, v),
                                                          counts)}
    exclusion = earlier_clicks_exclusion(query, list(splits.values()))
    out = {}
    for excl in exclude_clicked:
        for name, model in models.items():
            t0 = time.time()
            idx, _ = model.rank(query, k, exclude=exclusion if excl else None,
                                batch_size=batch_size)
            res = summarize_topk(idx, targets, v, ns, coverage_ns, slices)
            res["seconds"] = round(time.time() - t0, 2)
            out[f"{name}/exclude_clicked={str(excl).lower()}"] = res
    return out


def to_markdown(rows: dict, ns, coverage_ns) -> str:
    head = (["row"] + [f"HIT@{n}" for n in ns] + [f"cov@{n}" for n in coverage_ns]
            + [f"tail HIT@{n}" for n in ns])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in rows.items():
        vals = ([r[f"hit@{n}"] for n in ns] + [r[f"coverage@{n}"] for n in coverage_ns]
                + [r[f"long_tail/hit@{n}"] for n in ns])
        lines.append("| " + " | ".join([name] + [f"{x:.4f}" for x in vals]) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = cli.parser(__doc__.splitlines()[0])
    p.add_argument("--split", default="test", choices=["valid", "test"])
    p.add_argument("--exclude-clicked", default="both", choices=["both", "on", "off"])
    p.add_argument("--out", default="", help="write the metrics as JSON here")
    args = p.parse_args(argv)
    cfg = cli.load(args)
    excl = {"both": (False, True), "on": (True,), "off": (False,)}[args.exclude_clicked]
    t0 = time.time()
    rows = reference_rows(cfg.artifacts_dir, args.split, cfg.eval.hit_n, cfg.eval.coverage_n,
                          excl, cfg.eval.batch_size)
    any_row = next(iter(rows.values()))
    print(f"{cfg.artifacts_dir} split={args.split} clicks={any_row['num_clicks']} "
          f"oov={any_row['num_oov_clicks']} long_tail={any_row['long_tail/num_clicks']} "
          f"({time.time() - t0:.1f}s)")
    print(to_markdown(rows, cfg.eval.hit_n, cfg.eval.coverage_n))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as fh:
            json.dump({"artifacts": cfg.artifacts_dir, "split": args.split, "rows": rows}, fh,
                      indent=1, sort_keys=True)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))

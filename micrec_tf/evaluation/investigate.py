"""Why does MicRec not beat ICAN here? Targeted runs on the validation split (seed 0).

``python -m micrec_tf.evaluation.investigate --config configs/ml-100k.yaml`` trains ICAN and
MicRec variants that differ in one knob at a time (loss weights, temperature, which CL term) at
the learning rate ICAN's tuning chose, and writes ``docs/results/<name>-investigation.md`` with
validation HIT@50 (the selection metric) and test HIT@50 / coverage@50 / long-tail HIT@50 for
reference. Runs are cached like the reproduction runs.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys

from micrec_tf.config import load_config, parse_overrides
from micrec_tf.evaluation.reproduce import Runner, _slug

ALL = ["feature", "semantic", "session"]


def variants(lr: float) -> dict:
    base = {"model.name": "ican", "train.learning_rate": lr, "train.seed": 0}
    out = {"ICAN": {**base, "model.cl": []}}
    for tau in (0.1, 1.0):
        for scale in (1.0, 0.3, 0.1):
            out[f"MicRec, tau {tau}, lambdas x{scale}"] = {
                **base, "model.cl": ALL, "loss.temperature": tau,
                "loss.lambda_feature": 1.0 * scale, "loss.lambda_semantic": 0.3 * scale,
                "loss.lambda_session": 0.1 * scale}
    for task, lam in (("feature", 0.1), ("semantic", 0.1), ("session", 0.1)):
        out[f"ICAN + {task} only, lambda {lam}, tau 0.1"] = {
            **base, "model.cl": [task], "loss.temperature": 0.1, f"loss.lambda_{task}": lam}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--lr", type=float, default=0.003)
    parser.add_argument("--out", default="docs/results")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, parse_overrides(args.set))
    runner = Runner(cfg, os.path.join(cfg.run_dir, "investigate"), grid="none")
    rows = []
    for name, ov in variants(args.lr).items():
        res = runner.run(_slug(name), ov, evaluate_test=True)
        rows.append((name, res))
    ican_val = rows[0][1]["valid"]["hit@50"]
    lines = [f"# Investigation: {cfg.name}", "",
             f"- command: `python -m micrec_tf.evaluation.investigate {' '.join(argv or sys.argv[1:])}`",
             f"- date: {datetime.date.today().isoformat()}; seed 0; learning rate {args.lr}; "
             f"epochs <= {cfg.train.epochs}",
             "- selection metric: validation HIT@50; test columns are shown for reference only", "",
             "| variant | valid HIT@50 | vs ICAN (valid) | test HIT@50 | test coverage@50 | "
             "test tail HIT@50 | final losses (softmax / fea / sem / sess) |",
             "|---|---|---|---|---|---|---|"]
    for name, res in rows:
        v, t, h = res["valid"], res["test"], res["history"]
        losses = " / ".join(f"{h[k][-1]:.2f}" if k in h else "-" for k in (
            "sampled_softmax_loss", "feature_cl_loss", "semantic_cl_loss", "session_cl_loss"))
        lines.append(f"| {name} | {v['hit@50']:.4f} | {(v['hit@50'] / ican_val - 1) * 100:+.1f} % | "
                     f"{t['hit@50']:.4f} | {t['coverage@50']:.4f} | "
                     f"{t.get('long_tail/hit@50', float('nan')):.4f} | {losses} |")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"{cfg.name}-investigation.md")
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

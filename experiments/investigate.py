"""Why does MicRec not beat ICAN here? Targeted runs on the validation split (seed 0).

``python -m experiments.investigate --config configs/ml-100k.yaml`` trains ICAN and
MicRec variants that differ in one knob at a time at the learning rate ICAN's tuning chose
(``--study weights``: loss weights, temperature, which CL term; ``--study similarity``: cosine
vs dot-product CL similarity, temperature, field dropout, learning rate; ``--study sampling``:
which items get CL, how many CL negatives, how session positives are drawn), and writes
``docs/results/<name>-investigation-<study>.md`` with validation HIT@50 (the selection metric)
and test HIT@50 / coverage@50 / long-tail HIT@50 for reference. Runs are cached like the
reproduction runs, under ``runs/<name>/investigate/<study>/``.
"""
from __future__ import annotations

import datetime
import inspect
import os
import sys

import numpy as np

from micrec_tf import cli
from micrec_tf.data.arrays import train_item_counts

from experiments.report import paired_p
from experiments.run_cache import Runner, slug
from experiments.variants import ALL_CL as ALL, scaled_lambdas


def weights_study(lr: float) -> dict:
    """Loss weights x temperature with the paper's dot-product similarity, each term alone."""
    base = {"model.name": "ican", "train.learning_rate": lr, "train.seed": 0,
            "loss.cl_similarity": "dot"}
    out = {"ICAN": {**base, "model.cl": []}}
    for tau in (0.1, 1.0):
        for scale in (1.0, 0.3, 0.1):
            out[f"MicRec, tau {tau}, lambdas x{scale}"] = {
                **base, "model.cl": ALL, "loss.temperature": tau, **scaled_lambdas(scale)}
    for task, lam in (("feature", 0.1), ("semantic", 0.1), ("session", 0.1)):
        out[f"ICAN + {task} only, lambda {lam}, tau 0.1"] = {
            **base, "model.cl": [task], "loss.temperature": 0.1, f"loss.lambda_{task}": lam}
    return out


def similarity_study(lr: float) -> dict:
    """Cosine instead of dot-product CL similarity (projected vectors L2-normalised), its
    temperature and loss-weight scale, field-level feature dropout, session CL alone, and a
    lower learning rate. The paper's lambdas are (1.0, 0.3, 0.1) x the scale shown."""
    base = {"model.name": "ican", "train.learning_rate": lr, "train.seed": 0}
    cos = {**base, "model.cl": ALL, "loss.cl_similarity": "cosine", **scaled_lambdas(1.0)}
    return {
        "ICAN": {**base, "model.cl": []},
        "MicRec, dot, tau 0.1, lambdas x0.1": {**base, "model.cl": ALL, "loss.temperature": 0.1,
                                               "loss.cl_similarity": "dot",
                                               **scaled_lambdas(0.1)},
        "MicRec, cosine, tau 0.2, lambdas x1": {**cos, "loss.temperature": 0.2},
        "MicRec, cosine, tau 0.2, lambdas x0.3": {**cos, "loss.temperature": 0.2,
                                                  **scaled_lambdas(0.3)},
        "MicRec, cosine, tau 0.2, lambdas x0.1": {**cos, "loss.temperature": 0.2,
                                                  **scaled_lambdas(0.1)},
        "MicRec, cosine, tau 0.5, lambdas x1": {**cos, "loss.temperature": 0.5},
        "MicRec, cosine, tau 0.2, lambdas x1, field dropout": {
            **cos, "loss.temperature": 0.2, "loss.feature_dropout": "field"},
        "ICAN + session only, cosine, tau 0.2, lambda 0.3": {
            **base, "model.cl": ["session"], "loss.cl_similarity": "cosine",
            "loss.temperature": 0.2, "loss.lambda_session": 0.3},
        "ICAN, lr 0.001": {**base, "model.cl": [], "train.learning_rate": 0.001},
        "MicRec, cosine, tau 0.2, lambdas x1, lr 0.001": {
            **cos, "loss.temperature": 0.2, "train.learning_rate": 0.001},
    }


def sampling_study(lr: float) -> dict:
    """Sampling of the CL anchors, negatives and positives, at the config's CL setting: CL
    computed on the batch's clicked items (default; popular items dominate) or on items drawn
    uniformly from the catalogue, or both; 10 / 50 / 500 random negatives for semantic and
    session CL; session positives drawn in proportion to co-occurrence counts (paper) or
    uniformly from the list; uniform anchors at the paper's lambdas x0.3 (3x the configs')."""
    base = {"model.name": "ican", "train.learning_rate": lr, "train.seed": 0}
    final = {**base, "model.cl": ALL}
    return {
        "ICAN": {**base, "model.cl": []},
        "MicRec (config setting: batch anchors, 50 CL negatives, count positives)": final,
        "MicRec, uniform anchors": {**final, "loss.cl_anchors": "uniform"},
        "MicRec, batch + uniform anchors": {**final, "loss.cl_anchors": "both"},
        "MicRec, uniform anchors, paper lambdas x0.3": {**final, "loss.cl_anchors": "uniform",
                                                  **scaled_lambdas(0.3)},
        "MicRec, 10 CL negatives": {**final, "loss.num_cl_negatives": 10},
        "MicRec, 500 CL negatives": {**final, "loss.num_cl_negatives": 500},
        "MicRec, uniform session positives": {**final, "loss.session_positives": "uniform"},
    }


STUDIES = {"weights": weights_study, "similarity": similarity_study, "sampling": sampling_study}


def norm_popularity(item_vectors, train_counts) -> tuple:
    """How the item vectors' norms follow popularity: ``(Spearman rho of norm vs training click
    count, mean norm of the 20 % most-clicked items / mean norm of the rest)``.

    Args: item_vectors [V, d] (row 0, the padding item, is left out); train_counts [V].
    """
    from scipy import stats

    norms = np.linalg.norm(np.asarray(item_vectors, np.float64)[1:], axis=1)
    counts = np.asarray(train_counts, np.float64)[1:]
    if len(norms) != len(counts) or len(norms) < 5:
        raise ValueError(f"need >= 5 items and one count per item, got {len(norms)} vectors and "
                         f"{len(counts)} counts")
    head = np.argsort(-counts, kind="stable")[: max(1, len(counts) // 5)]
    rest = np.setdiff1d(np.arange(len(counts)), head)
    return float(stats.spearmanr(norms, counts).correlation), float(
        norms[head].mean() / norms[rest].mean())


def mean_metrics(runs: list) -> dict:
    """Seed-mean of the runs' ``valid`` / ``test`` metrics and final-epoch losses (the keys the
    first run has); one run is returned as it is."""
    if len(runs) == 1:
        return runs[0]
    out = {part: {k: float(np.mean([r[part][k] for r in runs])) for k in runs[0][part]}
           for part in ("valid", "test")}
    out["history"] = {k: [float(np.mean([r["history"][k][-1] for r in runs]))]
                      for k in runs[0]["history"]}
    return out


def _norm_columns(run_dir: str, counts) -> str:
    """The norm / popularity cells of one finished run ("-" when it has no checkpoint)."""
    if not os.path.exists(os.path.join(run_dir, "checkpoint")):
        return "- | -"
    from micrec_tf.train import restore_model

    model = restore_model(run_dir)[0]
    rho, ratio = norm_popularity(model.item_embeddings().numpy(), counts)
    return f"{rho:+.2f} | {ratio:.2f}"


def main(argv=None) -> int:
    parser = cli.parser(__doc__.splitlines()[0])
    parser.add_argument("--lr", type=float, default=0.003)
    parser.add_argument("--study", choices=sorted(STUDIES), default="weights",
                        help="which one-knob-at-a-time study to run (default: weights)")
    parser.add_argument("--seeds", type=int, default=1,
                        help="seeds per variant (0..S-1); cells are means over seeds")
    parser.add_argument("--out", default="docs/results")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error(f"--seeds must be >= 1, got {args.seeds}")
    cfg = cli.load(args)
    runner = Runner(cfg, os.path.join(cfg.run_dir, "investigate", args.study), grid="none")
    rows = []
    for name, ov in STUDIES[args.study](args.lr).items():
        runs = [runner.run(slug(name) if s == 0 else f"{slug(name)}_seed{s}",
                           {**ov, "train.seed": s}, evaluate_test=True)
                for s in range(args.seeds)]
        rows.append((name, mean_metrics(runs), [r["valid"]["hit@50"] for r in runs]))
    ican_val = rows[0][1]["valid"]["hit@50"]
    # With several seeds: paired t-tests of validation HIT@50 against ICAN and the second row
    # (each study's reference MicRec setting).
    tests = [(rows[0][2], "ICAN"), (rows[1][2], "row 2")] if args.seeds > 1 else []
    lines = [f"# Investigation ({args.study}): {cfg.name}", "",
             " ".join(inspect.cleandoc(STUDIES[args.study].__doc__).split()), "",
             f"- command: `python -m experiments.investigate {' '.join(argv or sys.argv[1:])}`",
             f"- date: {datetime.date.today().isoformat()}; "
             f"{'seed 0' if args.seeds == 1 else f'mean over seeds 0..{args.seeds - 1}'}; "
             f"learning rate {args.lr}; "
             f"epochs <= {cfg.train.epochs}",
             "- selection metric: validation HIT@50; test columns are shown for reference only", "",
             "- item vector norms (seed 0): Spearman rho of an item's norm vs its training "
             "clicks, and the mean norm of the 20 % most-clicked items over that of the rest", "",
             "| variant | valid HIT@50 | vs ICAN (valid) | "
             + "".join(f"p vs {label} (valid) | " for _, label in tests)
             + "test HIT@50 | test coverage@50 | "
             "test tail HIT@50 | final losses (softmax / fea / sem / sess) | rho(norm, clicks) | "
             "norm head / rest |",
             "|---|---|---|" + "---|" * len(tests) + "---|---|---|---|---|---|"]
    counts = train_item_counts(cfg.artifacts_dir)
    for name, res, per_seed in rows:
        v, t, h = res["valid"], res["test"], res["history"]
        p_cells = "".join("- | " if ref is per_seed else f"{paired_p(per_seed, ref):.3f} | "
                          for ref, _ in tests)
        losses = " / ".join(f"{h[k][-1]:.2f}" if k in h else "-" for k in (
            "sampled_softmax_loss", "feature_cl_loss", "semantic_cl_loss", "session_cl_loss"))
        gain = (v["hit@50"] / ican_val - 1) * 100
        lines.append(f"| {name} | {v['hit@50']:.4f} | {gain:+.1f} % | "
                     f"{p_cells}{t['hit@50']:.4f} | {t['coverage@50']:.4f} | "
                     f"{t.get('long_tail/hit@50', float('nan')):.4f} | {losses} | "
                     f"{_norm_columns(os.path.join(runner.root, slug(name)), counts)} |")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"{cfg.name}-investigation-{args.study}.md")
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))

"""Reproduction runner: ``make reproduce CONFIG=configs/ml-1m.yaml`` (paper 5.4, 5.6, 5.7), or
``python -m experiments.reproduce --config configs/ml-1m.yaml``.

For one dataset config it runs, over ``eval.seeds`` seeds:

* Table 2: FM, YoutubeDNN, DeepFM, AutoInt, ICAN, RFM* (= fea), MicRec (fea+sess), MicRec (final);
* Table 4: MicRec minus each CL term (and minus all = ICAN);
* Fig. 3: YoutubeDNN and AutoInt with each CL term added;
* the sparsity sweep: ICAN and MicRec (final) on 100 %, 50 %, 20 % of the users' training clicks;
* two non-neural reference rows: most-popular and the 1-hour co-occurrence item-kNN.

Hyper-parameters are chosen on the **validation** split only, with one bounded grid per variant
(:mod:`experiments.variants`, the same number of trials for every model, baselines included),
seed 0, early stopping on validation HIT@50 within ``train.epochs``. Test metrics of the chosen
setting are then measured over the seeds. Every finished run trains under
``runs/<name>/reproduce/<key>/`` and leaves one small JSON in the committed cache
(``docs/results/runs/<name>/<key>.json``, :mod:`experiments.run_cache`), skipped on the next
call, so the job is resumable.

Writes ``docs/results/<name>.md`` (tables: mean +- std over seeds, relative gain over ICAN, paired
t-test p-values of MicRec (final) vs each row), ``docs/results/<name>.json`` (all per-seed numbers)
and PNG plots under ``docs/results/<name>/``.
"""
from __future__ import annotations

import json
import os
import sys
import time

from micrec_tf import cli
from micrec_tf.config import Config, ConfigError

from experiments.report import plots, summarise, to_markdown
from experiments.run_cache import Runner, slug
from experiments.variants import (BASE, FINAL, GRIDS, SPARSITY, VARIANTS, base_of,
                                  canonical_name)


def reproduce(cfg: Config, variants=None, seeds: int | None = None, sparsity=True,
              grid: str = "full", out_dir="docs/results", command="", log=print,
              cached_only: bool = False) -> str:
    """Runs everything (cached) and writes the report; returns the markdown path.

    ``cached_only``: train nothing; report what the committed cache holds, marked partial.
    """
    start = time.time()
    seeds = seeds or cfg.eval.seeds
    if cfg.train.early_stopping_patience < 2:
        raise ConfigError(f"a reproduction stops every run by early stopping: "
                          f"train.early_stopping_patience must be >= 2. Received: "
                          f"{cfg.train.early_stopping_patience}")
    names = [n for n in VARIANTS if variants is None or n in variants]
    runner = Runner(cfg, os.path.join(cfg.run_dir, "reproduce"), grid, log,
                    cache_dir=os.path.join(out_dir, "runs", cfg.name), cached_only=cached_only)
    settings, per_seed, histories, seed0 = {}, {}, {}, {}
    # Models with CL terms start from their base model's chosen setting, so bases run first:
    # those not asked for, then the asked-for names in VARIANTS order (bases precede CL rows).
    # Every model is tuned first; then the seeds run seed by seed across the models, so an
    # interrupted reproduction holds paired seeds of every model.
    bases = [b for b in dict.fromkeys(base_of(VARIANTS[n][1]) for n in names) if b]
    order = [*[b for b in bases if b not in names], *names]
    for name in order:
        overrides, same = VARIANTS[name][1], canonical_name(name)
        if same in seed0:  # same model as an earlier row ("MicRec - sem" = "MicRec (fea+sess)")
            settings[name], seed0[name] = settings[same], seed0[same]
            continue
        base = base_of(overrides)
        if base and settings.get(base) is None:  # its base model is not tuned yet (cached_only)
            settings[name] = seed0[name] = None
            runner.trials[same] = [{"setting": {}, "key": f"tune/{slug(same)}/...",
                                    "valid": None, "missing": True}]
            runner.missing.append(f"tune/{slug(same)}/* (after {base})")
            continue
        settings[name], seed0[name] = runner.tune(same, overrides,
                                                  inherited=settings[base] if base else None)
    for s in range(seeds):
        for name in order:
            same = canonical_name(name)
            if same != name and same in per_seed:
                per_seed[name] = per_seed[same]
                continue
            if settings[name] is None:
                continue
            run = runner.run(seed0[name] if s == 0 else f"{slug(same)}/seed{s}",
                             {**VARIANTS[name][1], **settings[name], "train.seed": s},
                             evaluate_test=True)
            if run is not None:
                per_seed.setdefault(name, []).append(run)
    for name in order:
        if per_seed.get(name):
            histories[name] = per_seed[name][0]["history"]
    settings = {k: v for k, v in settings.items() if v is not None}
    sweep = {}
    if sparsity and BASE in settings and FINAL in settings and not cached_only:
        for frac in SPARSITY:
            pair = []
            if frac == 1.0:  # the main runs already are the 100 % point
                sweep[frac] = tuple([r["test"][f"hit@{cfg.eval.hit_n[0]}"] for r in per_seed[n]]
                                    for n in (BASE, FINAL))
                continue
            for name in (BASE, FINAL):
                ov = {**VARIANTS[name][1], **settings[name], "train.train_fraction": frac}
                pair.append([runner.run(f"sparsity/{slug(name)}/f{int(frac * 100)}/seed{s}",
                                        {**ov, "train.seed": s}, True)["test"]
                             [f"hit@{cfg.eval.hit_n[0]}"] for s in range(seeds)])
            sweep[frac] = tuple(pair)
    from experiments.reference_rows import reference_rows

    ref = reference_rows(cfg.artifacts_dir, ns=cfg.eval.hit_n, coverage_ns=cfg.eval.coverage_n,
                         exclude_clicked=(cfg.eval.exclude_clicked,))
    ref = {("Most popular" if k.startswith("most_popular") else
            f"Item-kNN (1 h co-occurrence, {v.get('variant', 'count')} weights)"): v
           for k, v in ref.items()}
    summary = summarise(per_seed, cfg.eval.hit_n, cfg.eval.coverage_n)
    os.makedirs(out_dir, exist_ok=True)
    md_path = os.path.join(out_dir, f"{cfg.name}.md")
    pngs = plots(os.path.join(out_dir, cfg.name), cfg, summary, sweep,
                 {n: histories[n] for n in (BASE, FINAL) if n in histories})
    md = to_markdown(cfg, summary, ref, settings, sweep, seeds, command, time.time() - start, grid,
                     run_seconds=sum(runner.run_seconds.values()),
                     convergence={n: per_seed[n] for n in names if n in per_seed},
                     trials={n: runner.trials[canonical_name(n)] for n in names
                             if canonical_name(n) in runner.trials},
                     missing=runner.missing)
    md += "\n## Plots\n\n" + "\n".join(
        f"![{os.path.basename(p)}]({cfg.name}/{os.path.basename(p)})" for p in pngs) + "\n"
    with open(md_path, "w") as fh:
        fh.write(md)
    with open(os.path.join(out_dir, f"{cfg.name}.json"), "w") as fh:
        json.dump({"per_seed": {n: [r["test"] for r in runs] for n, runs in per_seed.items()},
                   "best_epochs": {n: [r.get("best_epoch") for r in runs]
                                   for n, runs in per_seed.items()},
                   "trials": runner.trials, "missing": runner.missing,
                   "settings": settings, "reference": ref,
                   "sparsity": {str(k): v for k, v in sweep.items()}}, fh, indent=1)
    log(f"[reproduce] wrote {md_path}")
    return md_path


def main(argv=None) -> int:
    parser = cli.parser("MicRec reproduction: baselines, ablations, seeds")
    parser.add_argument("--seeds", type=int, default=None, help="default: eval.seeds")
    parser.add_argument("--variants", default=None,
                        help=f"comma-separated subset of: {', '.join(VARIANTS)}")
    parser.add_argument("--tables", default=None,
                        help="comma-separated subset of: main, ablation, universality")
    parser.add_argument("--grid", choices=sorted(GRIDS), default="full",
                        help="validation grid per variant (default: full, 4 trials)")
    parser.add_argument("--no-sparsity", action="store_true")
    parser.add_argument("--cached-only", action="store_true",
                        help="train nothing: write a partial report of the runs already cached")
    parser.add_argument("--out", default="docs/results")
    args = parser.parse_args(argv)
    cfg = cli.load(args)
    variants = None
    if args.variants:
        variants = [v.strip() for v in args.variants.split(",")]
        unknown = [v for v in variants if v not in VARIANTS]
        if unknown:
            parser.error(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    if args.tables:
        tables = [t.strip() for t in args.tables.split(",")]
        bad = [t for t in tables if t not in ("main", "ablation", "universality")]
        if bad:
            parser.error(f"unknown table(s) {bad}")
        variants = [v for v in (variants or VARIANTS) if VARIANTS[v][0] in tables]
    reproduce(cfg, variants, args.seeds, sparsity=not args.no_sparsity, grid=args.grid,
              cached_only=args.cached_only,
              out_dir=args.out, command="python -m experiments.reproduce " +
              " ".join(argv if argv is not None else sys.argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))

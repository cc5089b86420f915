"""Reproduction runner: ``make reproduce CONFIG=configs/ml-1m.yaml`` (paper 5.4, 5.6, 5.7), or
``python -m experiments.reproduce --config configs/ml-1m.yaml``.

For one dataset config it runs, over ``eval.seeds`` seeds:

* Table 2: FM, YoutubeDNN, DeepFM, AutoInt, ICAN, RFM* (= fea), MicRec (fea+sess), MicRec (final);
* Table 4: MicRec minus each CL term (and minus all = ICAN);
* Fig. 3: YoutubeDNN and AutoInt with each CL term added;
* the sparsity sweep: ICAN and MicRec (final) on 100 %, 50 %, 20 % of the users' training clicks
  (:func:`sparsity_sweep`; ``--sparsity-mode rebuilt``, the default, trains each fraction on
  artifacts rebuilt from the kept users' clicks alone; ``batch``, the sweep of before, drops users
  at batch time from the 100 % artifacts);
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

from experiments.report import names_arg, plots, summarise, to_markdown
from experiments.run_cache import Runner, slug
from experiments.variants import (BASE, FINAL, GRIDS, SPARSITY, VARIANTS, base_of,
                                  canonical_name)


# How the sparsity sweep thins the training clicks (--sparsity-mode; see sparsity_sweep).
SPARSITY_MODES = ("rebuilt", "batch")
SPARSITY_NOTES = {
    "rebuilt": "Each fraction f < 100 % trains on artifacts rebuilt from the training clicks of "
               "the users kept at f (`preprocess.train_user_fraction`, `--sparsity-mode "
               "rebuilt`): vocabularies, item counts, co-occurrence table and title neighbours "
               "see those clicks only; validation and test clicks (and their histories) are the "
               "100 % run's.",
    "batch": "Each fraction f < 100 % drops users at batch time (`train.train_fraction`, "
             "`--sparsity-mode batch`): vocabularies, item counts, co-occurrence table and title "
             "neighbours are still built from 100 % of the training clicks (which favours "
             "session CL).",
}


def thinned_artifacts(cfg: Config, fraction: float, log=print, build: bool = True) -> Config:
    """``cfg`` on the artifacts rebuilt from the clicks of the users kept at ``fraction``
    (``name`` -> :func:`pipelines.thinning.thinned_name`, ``preprocess.train_user_fraction``).

    With ``build``, the preprocessing and title-neighbour jobs run into that folder unless it
    already holds artifacts of this fraction on the same split as ``cfg``'s (same split,
    boundaries, catalogue size, and valid / test example counts); never over ``cfg``'s own.
    """
    from pipelines.thinning import thinned_name

    tcfg = cfg.replace({"name": thinned_name(cfg.name, fraction),
                        "preprocess.train_user_fraction": float(fraction)})
    if build and not _same_split(cfg.artifacts_dir, tcfg.artifacts_dir, fraction):
        from pipelines import preprocess, title_neighbours

        log(f"[reproduce] sparsity {fraction:.0%}: building {tcfg.artifacts_dir}")
        preprocess.run(tcfg, verbose=False)
        title_neighbours.run(tcfg, verbose=False)
    return tcfg


def _same_split(full_dir: str, thinned_dir: str, fraction: float) -> bool:
    """Whether ``thinned_dir`` holds finished artifacts of ``fraction`` on ``full_dir``'s split."""
    def stats(d, name):
        path = os.path.join(d, name)
        if not os.path.exists(path):
            return None
        with open(path) as fh:
            return json.load(fh)

    full, thin = stats(full_dir, "stats.json"), stats(thinned_dir, "stats.json")
    if full is None or thin is None or stats(os.path.join(thinned_dir, "title_neighbours"),
                                             "stats.json") is None:
        return False
    same = [k for k in ("split", "split_fractions", "split_boundaries", "items_in_table")
            if full.get(k) != thin.get(k)]
    same += [s for s in ("valid", "test")
             if full["num_examples"].get(s) != thin["num_examples"].get(s)]
    return not same and thin.get("train_user_fraction", {}).get("fraction") == float(fraction)


def sparsity_sweep(cfg: Config, runner: Runner, settings: dict, per_seed: dict, seeds: int,
                   mode: str = "rebuilt", log=print) -> dict:
    """``{fraction: ([ICAN test HIT@N per seed], [MicRec (final) ...])}`` over :data:`SPARSITY`.

    100 % is the main runs. ``rebuilt``: fraction f trains on :func:`thinned_artifacts` (built
    when missing), its runs cached under ``<cache root>/<name>-users<pct>/<model>/seed<s>``.
    ``batch`` (the sweep of before, as in docs/results/ml-100k.md): ``train.train_fraction`` f on
    the 100 % artifacts, cached as ``sparsity/<model>/f<pct>/seed<s>``. Both use each model's
    setting chosen on the 100 % validation split.
    """
    if mode not in SPARSITY_MODES:
        raise ValueError(f"sparsity mode must be one of {SPARSITY_MODES}. Received: {mode!r}")
    metric = f"hit@{cfg.eval.hit_n[0]}"
    sweep = {}
    for frac in SPARSITY:
        if frac == 1.0:  # the main runs already are the 100 % point
            sweep[frac] = tuple([r["test"][metric] for r in per_seed[n]] for n in (BASE, FINAL))
            continue
        pair = []
        if mode == "batch":
            frac_runner, extra = runner, {"train.train_fraction": frac}

            def key(name, s):
                return f"sparsity/{slug(name)}/f{int(frac * 100)}/seed{s}"
        else:
            tcfg = thinned_artifacts(cfg, frac, log)
            frac_runner = Runner(tcfg, os.path.join(tcfg.run_dir, "reproduce"), runner.grid,
                                 log, cache_dir=os.path.join(os.path.dirname(runner.cache_dir),
                                                             tcfg.name))
            extra = {}

            def key(name, s):
                return f"{slug(name)}/seed{s}"
        for name in (BASE, FINAL):
            ov = {**VARIANTS[name][1], **settings[name], **extra}
            pair.append([frac_runner.run(key(name, s), {**ov, "train.seed": s}, True)["test"]
                         [metric] for s in range(seeds)])
        if frac_runner is not runner:
            runner.run_seconds.update({f"{frac_runner.cfg.name}/{k}": v
                                       for k, v in frac_runner.run_seconds.items()})
        sweep[frac] = tuple(pair)
    return sweep


def reproduce(cfg: Config, variants=None, seeds: int | None = None, sparsity=True,
              grid: str = "full", out_dir="docs/results", command="", log=print,
              cached_only: bool = False, sparsity_mode: str = "rebuilt") -> str:
    """Runs everything (cached) and writes the report; returns the markdown path.

    ``cached_only``: train nothing; report what the committed cache holds, marked partial.
    ``sparsity_mode``: ``rebuilt`` or ``batch`` (:func:`sparsity_sweep`).
    """
    if sparsity_mode not in SPARSITY_MODES:
        raise ConfigError(f"sparsity_mode must be one of {SPARSITY_MODES}. Received: "
                          f"{sparsity_mode!r}")
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
        sweep = sparsity_sweep(cfg, runner, settings, per_seed, seeds, sparsity_mode, log)
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
    heading = "## Sparsity sweep (fraction of users' training clicks)\n\n"
    if sweep and heading in md:
        md = md.replace(heading, heading + SPARSITY_NOTES[sparsity_mode] + "\n\n", 1)
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
                   "sparsity": {str(k): v for k, v in sweep.items()},
                   **({"sparsity_mode": sparsity_mode} if sweep else {})}, fh, indent=1)
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
    parser.add_argument("--sparsity-mode", choices=SPARSITY_MODES, default="rebuilt",
                        help="rebuilt (default): each fraction on artifacts rebuilt from the kept "
                             "users' clicks; batch: users dropped at batch time from the 100 %% "
                             "artifacts (the sweep of docs/results/ml-100k.md)")
    parser.add_argument("--cached-only", action="store_true",
                        help="train nothing: write a partial report of the runs already cached")
    parser.add_argument("--out", default="docs/results")
    args = parser.parse_args(argv)
    cfg = cli.load(args)
    variants = names_arg(parser, args.variants, VARIANTS, "variant")
    if args.tables:
        tables = [t.strip() for t in args.tables.split(",")]
        bad = [t for t in tables if t not in ("main", "ablation", "universality")]
        if bad:
            parser.error(f"unknown table(s) {bad}")
        variants = [v for v in (variants or VARIANTS) if VARIANTS[v][0] in tables]
    reproduce(cfg, variants, args.seeds, sparsity=not args.no_sparsity, grid=args.grid,
              cached_only=args.cached_only, sparsity_mode=args.sparsity_mode,
              out_dir=args.out, command="python -m experiments.reproduce " +
              " ".join(argv if argv is not None else sys.argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))

"""Whether an opt-in speed option keeps a committed reproduction's results (issue 31):
``python -m experiments.option_check --config configs/ml-1m.yaml --option
train.mixed_precision=bfloat16 --tag bf16 --variants "ICAN,MicRec (final)" --seeds 3``.

For each variant, at the setting the committed reproduction chose (``docs/results/<name>.json``
``settings``), it trains seeds 0..S-1 with the ``--option`` keys set, and compares them, paired
by seed, with the committed runs of the same variant, setting and seed
(``docs/results/runs/<name>/``). The committed runs are read only: one that is missing, or was
made with another config or on other artifacts, is reported missing and never retrained or
overwritten (run ``experiments.reproduce`` for it). The option's runs are cached one JSON each
under ``docs/results/runs/<name>-<tag>/`` (resumable on another machine, like every
reproduction); writes ``docs/results/<name>-<tag>.md`` and ``.json``; ``--cached-only`` trains
nothing and reports what is cached.

Every run stops by the reproduction's early stopping (``train.early_stopping_patience`` >= 2):
the report gives each side's best and run epochs and flags a run that stopped at its cap.
"""
from __future__ import annotations

import datetime
import os
import sys
import time

import numpy as np

from micrec_tf import cli
from micrec_tf.config import Config, ConfigError

from experiments.report import names_arg, paired_p, unconverged, write_report
from experiments.run_cache import Runner, slug
from experiments.variants import VARIANTS, canonical_name

TAG_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789_-")


def parse_options(items) -> dict:
    """``["k=v", ...]`` -> ``{k: v}`` with YAML values (``bfloat16``, ``0.5``, ``true``); a
    malformed item or a key that is not a config key is a ``ConfigError`` naming it."""
    import yaml

    out = {}
    for item in items or []:
        key, sep, value = str(item).partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--option must be KEY=VALUE. Received: {item!r}")
        out[key.strip()] = yaml.safe_load(value)
    if not out:
        raise ConfigError("option_check needs at least one --option KEY=VALUE")
    Config().replace(out)  # unknown keys and bad values: one-line ConfigError
    return out


def _seed0_key(results: dict, name: str, setting: dict) -> str:
    """The committed run key of ``name``'s seed 0: the grid trial whose setting was chosen."""
    for trial in results.get("trials", {}).get(canonical_name(name), []):
        if trial.get("setting") == setting:
            return trial["key"]
    raise ConfigError(f"the committed results list no trial of {name!r} with its chosen setting "
                      f"{setting!r}: rerun experiments.reproduce first")


def option_check(cfg: Config, options: dict, tag: str, variants, seeds: int,
                 out_dir: str = "docs/results", command: str = "", log=print,
                 cached_only: bool = False) -> str:
    """Trains (or reads) the option's runs, writes the report; returns the markdown path."""
    import json

    if not tag or set(tag) - TAG_CHARS:
        raise ConfigError(f"tag must be a non-empty name of a-z, 0-9, '_' and '-'. Received: "
                          f"{tag!r}")
    if not isinstance(seeds, int) or seeds < 1:
        raise ConfigError(f"seeds must be an int >= 1. Received: {seeds!r}")
    if cfg.train.early_stopping_patience < 2:
        raise ConfigError("option_check stops every run by early stopping: "
                          "train.early_stopping_patience must be >= 2. Received: "
                          f"{cfg.train.early_stopping_patience}")
    path = os.path.join(out_dir, f"{cfg.name}.json")
    if not os.path.exists(path):
        raise ConfigError(f"no committed reproduction {path!r} to compare with: run "
                          f"experiments.reproduce --config ... first")
    with open(path) as fh:
        results = json.load(fh)
    missing_rows = [n for n in variants if n not in results.get("settings", {})]
    if missing_rows:
        raise ConfigError(f"{path} has no chosen setting for {missing_rows}")
    start = time.time()
    base = Runner(cfg, os.path.join(cfg.run_dir, "reproduce"), log=log, cached_only=True,
                  cache_dir=os.path.join(out_dir, "runs", cfg.name))
    option = Runner(cfg.replace(options), os.path.join(cfg.run_dir, f"option-{tag}"), log=log,
                    cached_only=cached_only,
                    cache_dir=os.path.join(out_dir, "runs", f"{cfg.name}-{tag}"))
    keys = {n: _seed0_key(results, n, results["settings"][n]) for n in variants}
    runs = {n: {"base": {}, "option": {}} for n in variants}
    for s in range(seeds):  # seed by seed across the variants: an interrupted check stays paired
        for name in variants:
            key = keys[name] if s == 0 else f"{slug(canonical_name(name))}/seed{s}"
            overrides = {**VARIANTS[name][1], **results["settings"][name], "train.seed": s}
            for side, runner in (("base", base), ("option", option)):
                run = runner.run(key, overrides, evaluate_test=True)
                if run is not None:
                    runs[name][side][s] = run
    md, js = _report(cfg, options, tag, variants, seeds, runs, base.missing + option.missing,
                     command, time.time() - start)
    return write_report(out_dir, f"{cfg.name}-{tag}", md, js, log, tag="option_check")


def _mean_std(values) -> str:
    return "n/a" if not values else f"{np.mean(values):.4f} +- {np.std(values):.4f}"


def _report(cfg, options, tag, variants, seeds, runs, missing, command, wall_s):
    hit_n, cov_n = cfg.eval.hit_n, cfg.eval.coverage_n
    main = f"hit@{hit_n[0]}"  # the reproduction's selection metric
    metrics = list(dict.fromkeys([main, f"hit@{hit_n[-1]}", f"coverage@{cov_n[0]}"]))
    opt_text = ", ".join(f"`{k}: {v}`" for k, v in options.items())
    lines = [f"# Option check: {cfg.name} with {opt_text}", ""]
    if missing:
        lines += [f"**Partial**: {len(missing)} run(s) missing (listed at the end).", ""]
    lines += [f"- command: `{command}`",
              f"- date: {datetime.date.today().isoformat()}; wall time of this call "
              f"{wall_s / 60:.1f} min",
              f"- base: the committed runs of `docs/results/runs/{cfg.name}/` at each variant's "
              f"chosen setting (`docs/results/{cfg.name}.json`); option: the same setting and "
              f"seed with {opt_text}, cached under `docs/results/runs/{cfg.name}-{tag}/`",
              "- test metrics, mean +- std over the seeds both sides have; p: two-sided paired "
              "t-test over those seeds; seconds: each run's wall time on whatever machine and "
              "load it had (the step times of record are in docs/BENCHMARKS.md)", "",
              "| variant | side | seeds | " + " | ".join(f"test {m}" for m in metrics)
              + f" | change test {main} | p ({main}) | mean seconds | epochs (best / run) |",
              "|---|---|---|" + "---|" * len(metrics) + "---|---|---|---|"]
    js = {"config": cfg.name, "options": options, "tag": tag, "seeds": seeds, "metric": main,
          "rows": {}, "missing": missing}
    for name in variants:
        both = sorted(set(runs[name]["base"]) & set(runs[name]["option"]))
        row = {}
        for side in ("base", "option"):
            sel = [runs[name][side][s] for s in both]
            row[side] = {"seeds": both, **{m: [r["test"][m] for r in sel] for m in metrics},
                         "seconds": [r.get("seconds") for r in sel],
                         "best_epoch": [r.get("best_epoch") for r in sel],
                         "epochs_run": [r.get("epochs_run") for r in sel]}
        b, o = row["base"][main], row["option"][main]
        row["change"] = float(np.mean(o) / np.mean(b) - 1.0) if both else None
        row["p"] = paired_p(b, o) if len(both) >= 2 else None
        js["rows"][name] = row
        for side in ("base", "option"):
            r = row[side]
            change = ("" if side == "base" or row["change"] is None
                      else f"{100 * row['change']:+.1f} %")
            p = "" if side == "base" or row["p"] is None else f"{row['p']:.3g}"
            secs = f"{np.mean(r['seconds']):.0f}" if r["seconds"] else "n/a"
            epochs = ", ".join(f"{a} / {e}" for a, e in zip(r["best_epoch"], r["epochs_run"]))
            lines.append(f"| {name} | {side} | {len(r['seeds'])} | "
                         + " | ".join(_mean_std(r[m]) for m in metrics)
                         + f" | {change} | {p} | {secs} | {epochs} |")
    capped = [f"{n} ({side}, `{key}`)" for n in variants for side in ("base", "option")
              for _, key in unconverged({n: list(runs[n][side].values())})]
    if capped:
        lines += ["", "Runs that stopped at their epoch cap (not converged): "
                  + ", ".join(capped)]
    if missing:
        lines += ["", "## Missing", ""] + [f"- `{k}`" for k in missing]
    return "\n".join(lines) + "\n", js


def main(argv=None) -> int:
    parser = cli.parser(__doc__)
    parser.add_argument("--option", action="append", default=[],
                        help="KEY=VALUE set on every run of the check (repeatable)")
    parser.add_argument("--tag", required=True,
                        help="short name of the option set: runs/<name>-<tag>, <name>-<tag>.md")
    parser.add_argument("--variants", default="ICAN,MicRec (final)",
                        help="comma-separated variants of the committed reproduction")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--cached-only", action="store_true",
                        help="train nothing: report what is cached")
    parser.add_argument("--out", default="docs/results")
    args = parser.parse_args(argv)
    cfg = cli.load(args)
    variants = names_arg(parser, args.variants, VARIANTS, "variant")
    option_check(cfg, parse_options(args.option), args.tag, variants, args.seeds,
                 out_dir=args.out, command="python -m experiments.option_check "
                 + " ".join(sys.argv[1:] if argv is None else argv),
                 cached_only=args.cached_only)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))

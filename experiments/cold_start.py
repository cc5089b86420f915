"""The item-cold-start reproduction (issue 28):
``python -m experiments.cold_start --config configs/ml-1m-cold.yaml``.

On a config with ``preprocess.split: item_cold_start`` and ``preprocess.item_vocabulary:
catalogue`` (artifacts and title neighbours built), it runs the rows of the protocol:

* **Content profile**: the non-neural baseline of :mod:`micrec_tf.evaluation.content_baseline`
  (variant chosen on cold-validation HIT@50);
* **ICAN** (ID, genres / tags, year and the other item fields), **ICAN + text** (the frozen MiniLM
  title vector as one more item field, ``model.item_text``), **ICAN + text + ID dropout** (the
  DropoutNet-style peer, ``loss.id_dropout``), **MicRec (final)** on that tower (all three CL
  terms), **MicRec (final) without ID dropout** (the same CL grid on ICAN + text's chosen
  setting: whether the dropout under it helps), the **TFRS two-tower** peer with the same content features as ICAN + text (its item
  tower an MLP over ID, item fields and the text field; in-batch softmax; ``model.item_text``);
* each CL term alone on the ID-dropout tower (``+ fea``, ``+ sem``, ``+ sess``; fewer seeds).

Every trial and seed is chosen and stopped on the **cold-validation** items: early stopping
reads ``val_cold_hit_at_50`` (:class:`micrec_tf.train.ColdValidation`), and a grid trial is
chosen by the finished run's cold-validation HIT@50. Every trained model gets the same budget:
four grid trials plus one method option (seed 0), then the other seeds at the chosen setting:

* models without a base (ICAN, ICAN + text): learning rate x sampled negatives, option = the
  main loss without the history mask (as in ``docs/results/ml-1m.md``);
* the TFRS peer: learning rate x batch size, option = batch 8192 (as there);
* ICAN + text + ID dropout: ICAN + text's chosen setting and the dropout probability
  {0.1, 0.25, 0.5, 0.75}, option = the other learning rate;
* CL rows: the ID-dropout row's chosen setting and the CL grid of ``docs/results/ml-1m.md``,
  option = semantic CL over all title neighbours (rows with semantic CL).

Runs are cached one JSON each under ``docs/results/runs/<name>/`` (committed: a reproduction
resumes on another machine) by :class:`experiments.run_cache.Runner`. Writes
``docs/results/<name>.md`` and ``.json``; ``--cached-only`` reports what is cached, marked
partial.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import sys
import time

import numpy as np

from micrec_tf import cli
from micrec_tf.config import CL_TASKS, Config, ConfigError

from experiments.report import (convergence_text, names_arg, paired_p, trial_table,
                                write_report)
from experiments.run_cache import Runner, artifacts_fingerprint, slug
from experiments.variants import GRIDS, OPTIONS, PEER_MODEL

SELECT = "cold/hit@50"  # chosen and stopped on the cold-validation items' HIT@50
CONTENT = "Content profile (non-neural)"
ICAN, TEXT, DROP, FINAL = "ICAN", "ICAN + text", "ICAN + text + ID dropout", "MicRec (final)"
# MicRec (final) on ICAN + text's chosen setting instead of the ID-dropout row's: whether the ID
# dropout under MicRec (final) helps or hinders it (the same CL grid and budget).
FINAL_NO_DROP = "MicRec (final) without ID dropout"
PEER = "TFRS two-tower"
_TOWER = {"model.name": "ican", "model.cl": [], "model.item_text": False, "loss.id_dropout": 0.0}
_TEXT = {**_TOWER, "model.item_text": True}
# name -> (overrides, base row whose chosen setting it starts from, table)
ROWS = {
    ICAN: (_TOWER, None, "main"),
    TEXT: (_TEXT, None, "main"),
    DROP: (_TEXT, TEXT, "main"),
    FINAL: ({**_TEXT, "model.cl": list(CL_TASKS)}, DROP, "main"),
    FINAL_NO_DROP: ({**_TEXT, "model.cl": list(CL_TASKS)}, TEXT, "main"),
    PEER: ({**_TEXT, "model.name": PEER_MODEL}, None, "main"),  # ICAN + text's content fields
    **{f"{DROP} + {short}": ({**_TEXT, "model.cl": [task]}, DROP, "alone")
       for short, task in (("fea", "feature"), ("sem", "semantic"), ("sess", "session"))},
}
ID_DROPOUT = {"full": (0.1, 0.25, 0.5, 0.75), "small": (0.25, 0.5), "none": (0.5,)}
ALONE_SEEDS = 3
# The report's columns: (label, cold_start key).
COLUMNS = [("cold HIT@20", "cold/hit@20"), ("cold HIT@50", "cold/hit@50"),
           ("cold NDCG@20", "cold/ndcg@20"), ("cold HIT@50, empty history",
                                              "cold_empty_history/hit@50"),
           ("cold coverage@50", "cold/coverage@50"), ("warm HIT@50", "warm/hit@50"),
           ("warm HIT@500", "warm/hit@500"), ("all HIT@50", "all/hit@50"),
           ("all HIT@500", "all/hit@500")]


def check_config(cfg: Config) -> None:
    """One-line refusals of a config the protocol cannot run on."""
    if cfg.preprocess.split != "item_cold_start":
        raise ConfigError(f"the cold-start reproduction needs preprocess.split=item_cold_start. "
                          f"Received: {cfg.preprocess.split!r}")
    if cfg.preprocess.item_vocabulary != "catalogue":
        raise ConfigError(f"the cold-start reproduction needs preprocess.item_vocabulary="
                          f"catalogue. Received: {cfg.preprocess.item_vocabulary!r}")
    if cfg.train.early_stopping_patience < 2:
        raise ConfigError(f"every run stops by early stopping: train.early_stopping_patience "
                          f"must be >= 2. Received: {cfg.train.early_stopping_patience}")


def id_dropout_trials(inherited: dict, grid: str) -> list:
    return [{**inherited, "loss.id_dropout": p} for p in ID_DROPOUT[grid]]


def other_learning_rate(setting: dict, cfg: Config):
    lr = setting.get("train.learning_rate", cfg.train.learning_rate)
    return ("train.learning_rate", 0.003 if abs(lr - 0.001) < 1e-12 else 0.001)


def content_baseline(cfg: Config, cache_dir: str, log=print) -> dict:
    """The content-profile row, cached as ``<cache_dir>/content_baseline.json`` (recomputed when
    the artifacts' fingerprint changed)."""
    path = os.path.join(cache_dir, "content_baseline.json")
    fingerprint = artifacts_fingerprint(cfg.artifacts_dir)
    if os.path.exists(path):
        with open(path) as fh:
            cached = json.load(fh)
        if cached.get("artifacts") == fingerprint:
            return cached
    from micrec_tf.data.arrays import load_split_arrays
    from micrec_tf.data.artifacts import load_artifacts, load_text_vectors, read_vocab
    from micrec_tf.evaluation.content_baseline import choose_and_evaluate

    start = time.time()
    art = load_artifacts(cfg.artifacts_dir)
    table = art.item_table
    text = load_text_vectors(table.text_vectors_dir, table.num_items)
    raw_ids = read_vocab(os.path.join(cfg.artifacts_dir, "vocab", "item_id.txt"))

    def clicks(split):
        a = load_split_arrays(cfg.artifacts_dir, split)
        return {"hist_items": np.asarray(a["hist_items"]), "hist_len": np.asarray(a["hist_len"]),
                "targets": np.asarray(a["item"])}

    log(f"[cold_start] content baseline: {len(raw_ids)} items")
    res = choose_and_evaluate(clicks("valid"), clicks("test"), table.tags, text, raw_ids,
                              metric=SELECT, batch_size=cfg.eval.batch_size)
    res.update({"seconds": time.time() - start, "artifacts": fingerprint,
                "date": datetime.date.today().isoformat()})
    os.makedirs(cache_dir, exist_ok=True)
    with open(path + ".tmp", "w") as fh:
        json.dump(res, fh, indent=1)
    os.replace(path + ".tmp", path)
    return res


def run_rows(cfg: Config, names: list, seeds: int, grid: str, runner: Runner) -> tuple:
    """The main rows first, then the CL-terms-alone rows: within each group every row is tuned
    (bases first), then the seeds run across the rows seed by seed, so an interrupted
    reproduction holds paired seeds. Returns ``(settings, per_seed)``."""
    settings, seed0, per_seed = {}, {}, {}
    order = []
    for name in names:  # a row's base first, even when the base was not asked for
        chain, b = [], name
        while b is not None:
            chain.insert(0, b)
            b = ROWS[b][1]
        order += [c for c in chain if c not in order]
    for table in ("main", "alone"):
        group = [n for n in order if ROWS[n][2] == table]
        _tune(cfg, group, grid, runner, settings, seed0)
        for s in range(seeds if table == "main" else min(seeds, ALONE_SEEDS)):
            for name in group:
                if settings[name] is None:
                    continue
                run = runner.run(seed0[name] if s == 0 else f"{slug(name)}/seed{s}",
                                 {**ROWS[name][0], **settings[name], "train.seed": s},
                                 evaluate_test=True)
                if run is not None:
                    per_seed.setdefault(name, []).append(run)
    return {k: v for k, v in settings.items() if v is not None}, per_seed


def _tune(cfg: Config, order: list, grid: str, runner: Runner, settings: dict,
          seed0: dict) -> None:
    """Chooses the setting of every row of ``order`` into ``settings`` / ``seed0``."""
    for name in order:
        overrides, base, _ = ROWS[name]
        inherited = settings.get(base) if base else None
        if base and inherited is None:  # the base is not chosen yet (cached_only)
            settings[name] = seed0[name] = None
            runner.missing.append(f"tune/{slug(name)}/* (after {base})")
            continue
        if name == DROP:
            trials = id_dropout_trials(inherited, grid)
            option = None if grid == "none" else other_learning_rate(inherited, cfg)
        elif base:
            trials = [{**inherited, **t} for t in GRIDS[grid][0]]
            option = (OPTIONS["cl"] if "semantic" in overrides["model.cl"] and grid != "none"
                      else None)
        else:
            trials, option = None, _default_option(overrides, grid)
        settings[name], seed0[name] = runner.tune(name, overrides, inherited=None,
                                                  trials=trials, option=option)


def _default_option(overrides: dict, grid: str):
    if grid == "none":
        return None
    return OPTIONS["peer"] if overrides["model.name"] == PEER_MODEL else OPTIONS["base"]


def _cpu() -> str:
    model, flags = platform.processor() or "?", set()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name") and model in ("?", ""):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    simd = "AVX-512" if "avx512f" in flags else ("AVX2 only" if "avx2" in flags else "no AVX2")
    return f"{model}, {simd}, {os.cpu_count()} cores"


def _fmt(values) -> str:
    v = np.asarray(values, float)
    return f"{v.mean():.4f}" if v.size == 1 else f"{v.mean():.4f} +- {v.std(ddof=0):.4f}"


def empty_history_note(artifacts_dir: str) -> list:
    """Markdown lines on the test split's empty-history cold clicks
    (:func:`micrec_tf.evaluation.cold_start.empty_history_composition`, titles from
    ``items/items.jsonl``); one line saying so when the artifacts are not on this machine."""
    from micrec_tf.data.arrays import load_split_arrays
    from micrec_tf.data.artifacts import read_vocab
    from micrec_tf.data.contract import HIST_LEN, ITEM
    from micrec_tf.evaluation.cold_start import empty_history_composition

    vocab = os.path.join(artifacts_dir, "vocab", "item_id.txt")
    if not os.path.exists(vocab):
        return [f"Empty-history cold clicks: not described ({vocab} is not on this machine)."]
    raw_ids = read_vocab(vocab)
    test = load_split_arrays(artifacts_dir, "test", features=[ITEM, HIST_LEN])
    comp = empty_history_composition(test[ITEM], test[HIST_LEN], raw_ids, "test")
    titles = {}
    items_path = os.path.join(artifacts_dir, "items", "items.jsonl")
    if os.path.exists(items_path):
        want = {i for i, _ in comp["empty_top"]}
        with open(items_path) as fh:
            for line in fh:
                row = json.loads(line)
                if row.get("item") in want:
                    titles[row["item"]] = row.get("title") or row.get("item_id")
    top = ", ".join(f"{titles.get(i, raw_ids[i - 1])} ({n})" for i, n in comp["empty_top"])
    return [f"Empty-history cold clicks (the cold HIT@50, empty history column): "
            f"{comp['empty_clicks']:,} of the {comp['cold_clicks']:,} cold test clicks, on "
            f"{comp['empty_distinct_items']} distinct items; the 3 most clicked take "
            f"{100 * comp['empty_top_share']:.0f} % of them: {top} (over all cold test clicks: "
            f"{comp['cold_distinct_items']} items, the 3 most clicked "
            f"{100 * comp['cold_top_share']:.0f} %). A ranking that puts those few items first "
            f"scores well on this slice whatever the user: read it with that in mind."]


def report(cfg: Config, names: list, settings: dict, per_seed: dict, content: dict | None,
           runner: Runner, seeds: int, grid: str, command: str, wall: float) -> tuple:
    """Markdown and JSON of the rows (test split), with per-row seeds and paired p-values."""
    stats = {}
    path = os.path.join(cfg.artifacts_dir, "stats.json")
    if os.path.exists(path):
        with open(path) as fh:
            stats = json.load(fh).get("cold_split", {})
    partial = bool(runner.missing)
    lines = [f"# Results: {cfg.name} (item cold start, issue 28)", ""]
    if partial:
        lines += [f"**Partial**: {len(runner.missing)} run(s) not done yet (listed at the end); "
                  f"rows with fewer seeds than asked say so.", ""]
    lines += [
        f"- command: `{command}`",
        f"- date: {datetime.date.today().isoformat()}; machine: {_cpu()}; wall time of this call "
        f"{wall / 60:.1f} min; training time of the runs it reports, cached ones included, "
        f"{sum(runner.run_seconds.values()) / 60:.1f} min",
        "- protocol (`preprocess.split: item_cold_start`, docs/COLD_START.md): an item is cold "
        "when `int(sha256(raw_id).hexdigest(), 16) % 10` is 0 (cold-validation) or 1 "
        "(cold-test); every click on it is an evaluation click; **cold** ranks a cold click among "
        "all catalogue items of its bucket, **warm** a warm test click among warm items, **all** "
        "every test click over the whole catalogue; no exclusion of clicked items",
        f"- split counts (stats.json): {json.dumps(stats, sort_keys=True) if stats else 'n/a'}",
        f"- selection and early stopping: cold-validation HIT@50 (patience "
        f"{cfg.train.early_stopping_patience}, best epoch restored, <= {cfg.train.epochs} "
        f"epochs); seeds: {seeds} for the main rows, {min(ALONE_SEEDS, seeds)} for each CL term "
        f"alone; mean +- std over seeds; p: two-sided paired t-test over seeds of "
        f"{FINAL} vs the row on cold HIT@50",
        "",
        "## Test metrics", "",
        "| model | " + " | ".join(c for c, _ in COLUMNS) + " | gain cold HIT@50 vs "
        f"{TEXT} | p vs final (cold HIT@50) | seeds |",
        "|---" * (len(COLUMNS) + 4) + "|",
    ]
    rows_json = {}

    def cold(run, split="test"):
        return run["cold_start"][split]

    ref = per_seed.get(TEXT)
    ref_mean = np.mean([cold(r)[SELECT] for r in ref]) if ref else None
    if content is not None:
        t = content["test"]
        gain = (f"{100 * (t[SELECT] / ref_mean - 1):+.1f} %" if ref_mean else "n/a")
        lines.append(f"| {CONTENT} (variant {content['variant']}) | "
                     + " | ".join(f"{t[k]:.4f}" for _, k in COLUMNS)
                     + f" | {gain} | (deterministic) | - |")
        rows_json[CONTENT] = {"variant": content["variant"], "test": t,
                              "valid_scores": content["valid_scores"]}
    final = {r["seed"]: cold(r)[SELECT] for r in per_seed.get(FINAL, [])}
    for name in names:
        runs = per_seed.get(name)
        if not runs:
            lines.append(f"| {name} | " + " | ".join("not run yet" for _ in COLUMNS)
                         + " | | | 0 |")
            continue
        vals = {k: [cold(r)[k] for r in runs] for _, k in COLUMNS}
        mean = float(np.mean(vals[SELECT]))
        gain = f"{100 * (mean / ref_mean - 1):+.1f} %" if ref_mean else "n/a"
        p = ("" if name == FINAL else "n/a (no final run yet)" if not final else
             f"{paired_p(final, {r['seed']: cold(r)[SELECT] for r in runs}):.3g}")
        lines.append(f"| {name} | " + " | ".join(_fmt(vals[k]) for _, k in COLUMNS)
                     + f" | {gain} | {p} | {len(runs)} |")
        rows_json[name] = {"seeds": [r["seed"] for r in runs],
                           "test": [cold(r) for r in runs],
                           "valid": [cold(r, "valid") for r in runs],
                           "best_epochs": [r.get("best_epoch") for r in runs],
                           "setting": settings.get(name)}
    lines += [""] + empty_history_note(cfg.artifacts_dir)
    lines += ["", "Best (restored) epoch of each seed's run:", ""]
    lines += [f"- {n}: {convergence_text(per_seed[n])}" for n in names if per_seed.get(n)]
    lines += ["", "## Chosen settings (cold-validation HIT@50, seed 0)", "",
              "| model | setting |", "|---|---|"]
    lines += [f"| {n} | `{json.dumps(settings[n])}` |" for n in names if n in settings]
    if content is not None:
        lines += ["", f"{CONTENT}: cold-validation HIT@50 per variant "
                  + ", ".join(f"{k} {v:.4f}" for k, v in content["valid_scores"].items())
                  + f"; chosen {content['variant']} ({content['seconds']:.0f} s)"]
    lines += ["", "### Every trial (seed 0): cold-validation HIT@50", ""]
    lines += trial_table(names, runner.trials, settings)
    if runner.missing:
        lines += ["", "## Not run yet", ""] + [f"- `{k}`" for k in runner.missing]
    return "\n".join(lines) + "\n", {"rows": rows_json, "settings": settings,
                                     "trials": runner.trials, "missing": runner.missing}


def reproduce_cold_start(cfg: Config, names=None, seeds: int | None = None, grid: str = "full",
                         out_dir: str = "docs/results", command: str = "", log=print,
                         cached_only: bool = False) -> str:
    """Runs (cached) every asked-for row and writes the report; returns the markdown path."""
    check_config(cfg)
    start = time.time()
    seeds = seeds or cfg.eval.seeds
    names = [n for n in ROWS if names is None or n in names]
    cache_dir = os.path.join(out_dir, "runs", cfg.name)
    path = os.path.join(cache_dir, "content_baseline.json")
    if not cached_only:
        content = content_baseline(cfg, cache_dir, log)
    elif os.path.exists(path):
        with open(path) as fh:
            content = json.load(fh)
    else:
        content = None
    runner = Runner(cfg, os.path.join(cfg.run_dir, "cold_start"), grid, log, cache_dir=cache_dir,
                    cached_only=cached_only, select=lambda res: res["cold_start"]["valid"][SELECT],
                    select_name="cold-validation HIT@50")
    settings, per_seed = run_rows(cfg, names, seeds, grid, runner)
    md, js = report(cfg, names, settings, per_seed, content, runner, seeds, grid, command,
                    time.time() - start)
    return write_report(out_dir, cfg.name, md, js, log, "cold_start")


def main(argv=None) -> int:
    parser = cli.parser("MicRec item-cold-start reproduction (issue 28)")
    parser.add_argument("--seeds", type=int, default=None, help="default: eval.seeds")
    parser.add_argument("--rows", default=None,
                        help=f"comma-separated subset of: {', '.join(ROWS)}")
    parser.add_argument("--grid", choices=sorted(GRIDS), default="full")
    parser.add_argument("--cached-only", action="store_true",
                        help="train nothing: write a partial report of the runs already cached")
    parser.add_argument("--out", default="docs/results")
    args = parser.parse_args(argv)
    cfg = cli.load(args)
    names = names_arg(parser, args.rows, ROWS, "row")
    reproduce_cold_start(cfg, names, args.seeds, args.grid, args.out, cached_only=args.cached_only,
                         command="python -m experiments.cold_start " +
                         " ".join(argv if argv is not None else sys.argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))

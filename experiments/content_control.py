"""The honest synthetic control of the item-cold-start gain (issue 28, item 6):
``python -m experiments.content_control --config configs/synthetic-cold.yaml [--seeds 3]
[--grid small]``.

The synthetic generator writes an item's title, tags, provider and format from its click topic
with probability ``data.synthetic.content_topic_p`` (1.0, the default, is the generator of
before), else from a topic drawn independently of who clicks it. At 1.0 content transfer to cold
items is favoured by construction; at 0 an item's content says nothing about its clicks, so a gain
of semantic CL (title neighbours) over the same tower without it should vanish there: if it does
not, something other than content leaks into the cold items' vectors.

For each ``content_topic_p`` of :data:`P_VALUES` (0.0 and 1.0) the driver

* builds its own data and artifacts (:func:`config_for`: ``<name>-p<p>`` for the artifacts,
  runs and run cache, ``<data_dir>-p<p>`` for the generated files; the two values never share or
  overwrite a folder) by the synthetic generator, ``pipelines.preprocess`` and
  ``pipelines.title_neighbours`` (MiniLM title vectors: the text field and semantic CL read them);
  a build is skipped when its marker (:data:`BUILD_MARKER`, the data / preprocess / semantic
  sections) matches;
* runs the rows :data:`NAMES` through :func:`experiments.cold_start.run_rows` (the same
  :data:`experiments.cold_start.ROWS`, grids, method options, cold-validation selection and early
  stopping as the cold-start reproduction, the same grid for every row): **ICAN + text**,
  **ICAN + text + ID dropout** (the base that the CL rows start from, reported for reference),
  **MicRec (final)** and semantic CL alone (``ICAN + text + ID dropout + sem``, at most
  :data:`experiments.cold_start.ALONE_SEEDS` seeds);
* caches every run under ``<out>/runs/<name>-p<p>/`` (:class:`experiments.run_cache.Runner`:
  committed, so the control resumes on another machine; a cached run is reused only when its
  config and the artifacts' counts match).

It writes ``<out>/<name>-control.md`` and ``.json``: per ``content_topic_p`` the test cold HIT@50
and all HIT@50 of each row (mean +- std over seeds), the cold HIT@50 of a random ranking, and the
gain of MicRec (final) and of semantic CL alone over ICAN + text (and over the ID-dropout tower
they both start from, :data:`GAINS`), with two-sided paired t-test p-values over the seeds both
rows ran (:func:`gain`). ``--cached-only`` trains and builds nothing and reports what is cached
(partial).
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import sys
import time

import numpy as np

from micrec_tf import cli
from micrec_tf.config import Config, ConfigError

from experiments import cold_start
from experiments.report import convergence_text, paired_p, trial_table, write_report
from experiments.run_cache import Runner
from experiments.variants import GRIDS

P_VALUES = (0.0, 1.0)
TEXT, DROP, FINAL = cold_start.TEXT, cold_start.DROP, cold_start.FINAL
SEM = f"{cold_start.DROP} + sem"  # semantic CL alone, on the ID-dropout tower
NAMES = (TEXT, DROP, FINAL, SEM)  # the rows run, in the report's order
COMPARED = (FINAL, SEM)  # the rows whose gain over TEXT the summary reports
# (row, reference, metric keys): every gain the control computes. FINAL and SEM over TEXT are the
# issue's numbers; DROP over TEXT is what ID dropout alone does; FINAL and SEM over DROP are their
# CL terms' own effect (SEM is DROP plus semantic CL, nothing else).
GAINS = ((DROP, TEXT, ("cold/hit@50", "all/hit@50")), (FINAL, TEXT, ("cold/hit@50", "all/hit@50")),
         (SEM, TEXT, ("cold/hit@50", "all/hit@50")), (FINAL, DROP, ("cold/hit@50",)),
         (SEM, DROP, ("cold/hit@50",)))
METRICS = (("cold HIT@50", "cold/hit@50"), ("all HIT@50", "all/hit@50"))
BUILD_MARKER = "_content_control_build.json"


def p_tag(p: float) -> str:
    """``p0``, ``p1``, ``p0.5``: the suffix of a ``content_topic_p``'s folders."""
    return f"p{float(p):g}"


def config_for(cfg: Config, p: float) -> Config:
    """The config of one ``content_topic_p``: name ``<name>-p<p>`` (artifacts/, runs/ and the run
    cache follow the name) and data_dir ``<data_dir>-p<p>``, so two values never share a folder."""
    tag = p_tag(p)
    return cfg.replace({"name": f"{cfg.name}-{tag}",
                        "data.data_dir": f"{cfg.data.data_dir.rstrip('/')}-{tag}",
                        "data.synthetic.content_topic_p": float(p)})


def check_config(cfg: Config) -> None:
    """One-line refusals: the cold-start protocol's (:func:`experiments.cold_start.check_config`),
    the synthetic generator (the knob is its own) and MiniLM title vectors (``semantic.source:
    title``: the text field of the rows reads ``title_embeddings/``)."""
    cold_start.check_config(cfg)
    if cfg.data.dataset != "synthetic":
        raise ConfigError(f"the content control needs data.dataset=synthetic (content_topic_p is "
                          f"a knob of the generator). Received: {cfg.data.dataset!r}")
    if cfg.semantic.source != "title":
        raise ConfigError(f"the content control needs semantic.source=title (the item text field "
                          f"reads the MiniLM title vectors). Received: {cfg.semantic.source!r}")


def build_signature(cfg: Config) -> dict:
    """What the artifacts of one ``content_topic_p`` are built from (a rebuild when it changes)."""
    from micrec_tf.data.synthetic import GENERATOR_VERSION

    d = cfg.to_dict()
    return {"generator_version": GENERATOR_VERSION, "data": d["data"],
            "preprocess": d["preprocess"], "semantic": d["semantic"]}


def build_artifacts(cfg: Config, log=print) -> bool:
    """Generates ``cfg``'s synthetic data (into ``cfg.data.data_dir``), preprocesses it into
    ``cfg.artifacts_dir`` and computes the title vectors and neighbours there, unless the marker
    ``<artifacts_dir>/_content_control_build.json`` says this exact build is done. Returns True
    when it built."""
    marker = os.path.join(cfg.artifacts_dir, BUILD_MARKER)
    signature = build_signature(cfg)
    if os.path.exists(marker):
        with open(marker) as fh:
            if json.load(fh) == signature:
                log(f"[content_control] {cfg.artifacts_dir} is built: reusing it")
                return False
    from micrec_tf.data.synthetic import ensure_generated
    from pipelines import preprocess, title_neighbours

    start = time.time()
    log(f"[content_control] building {cfg.artifacts_dir} (content_topic_p "
        f"{cfg.data.synthetic.content_topic_p:g})")
    ensure_generated(cfg)
    preprocess.run(cfg, verbose=False)
    title_neighbours.run(cfg, verbose=False)
    with open(marker + ".tmp", "w") as fh:
        json.dump(signature, fh, indent=1, sort_keys=True)
    os.replace(marker + ".tmp", marker)
    log(f"[content_control] built {cfg.artifacts_dir} in {time.time() - start:.0f} s")
    return True


def _cold(run: dict, key: str, split: str = "test") -> float:
    return float(run["cold_start"][split][key])


def gain(runs: list, ref_runs: list, key: str) -> dict:
    """The gain of ``runs`` over ``ref_runs`` on test ``key``, over the seeds both ran: relative
    gain of the means in % (``100 * (mean(row) / mean(ref) - 1)``), the mean paired difference,
    and the two-sided paired t-test p-value (nan with fewer than 2 pairs or a constant
    difference)."""
    row = {r["seed"]: _cold(r, key) for r in runs}
    ref = {r["seed"]: _cold(r, key) for r in ref_runs}
    seeds = sorted(set(row) & set(ref))
    if not seeds:
        return {"seeds": [], "gain_pct": None, "diff": None, "p": None}
    a, b = np.array([row[s] for s in seeds]), np.array([ref[s] for s in seeds])
    p = paired_p(list(a), list(b))
    return {"seeds": seeds, "gain_pct": float(100.0 * (a.mean() / b.mean() - 1.0)),
            "diff": float((a - b).mean()), "p": None if np.isnan(p) else p}


def _fmt(values) -> str:
    v = np.asarray(values, float)
    return f"{v.mean():.4f}" if v.size == 1 else f"{v.mean():.4f} +- {v.std(ddof=0):.4f}"


def _gain_text(g: dict) -> str:
    if not g or g["gain_pct"] is None:
        return "n/a"
    p = "n/a" if g["p"] is None else f"{g['p']:.3g}"
    return f"{g['gain_pct']:+.1f} % (p {p}, {len(g['seeds'])} seeds)"


def _chance(runs: list):
    """Cold HIT@50 of a uniformly random ranking: 50 / the cold-test candidates (<= 1)."""
    n = runs[0]["cold_start"]["test"].get("cold/num_candidates") if runs else None
    return min(1.0, 50.0 / n) if n else None


def _reading(results: dict) -> list:
    """Factual lines at the lowest p: each row's cold HIT@50 next to chance, and whether each
    CL gain on cold HIT@50 is significant (paired p < 0.05)."""
    lines = []
    low = min(results)
    r = results[low]
    chance = _chance(r["per_seed"].get(TEXT, []))
    for name in NAMES:
        runs = r["per_seed"].get(name)
        if runs and chance is not None:
            lines.append(f"- content_topic_p {low:g}, {name}: cold HIT@50 "
                         f"{_fmt([_cold(x, 'cold/hit@50') for x in runs])} (chance {chance:.4f})")
    for name, ref, _ in GAINS:
        if name not in COMPARED:
            continue
        g = r["gains"].get(ref, {}).get(name, {}).get("cold/hit@50")
        if not g or g["gain_pct"] is None:
            continue
        if g["p"] is not None and g["p"] < 0.05 and g["gain_pct"] > 0:
            verdict = ("a significant gain (paired p < 0.05) where content carries no click "
                       "signal: look for a leak")
        elif g["p"] is not None and g["p"] < 0.05:
            verdict = "a significant loss (paired p < 0.05)"
        else:
            verdict = "no significant difference (paired p >= 0.05 or not computable)"
        lines.append(f"- content_topic_p {low:g}, {name} vs {ref}: cold HIT@50 "
                     f"{_gain_text(g)}: {verdict}.")
    return lines


def report(cfg: Config, results: dict, seeds: int, grid: str, command: str,
           wall: float) -> tuple:
    """Markdown and JSON of the control; ``results``: p -> {"cfg", "settings", "per_seed",
    "runner", "gains"}; gains: reference -> row -> metric key -> :func:`gain`."""
    missing = sum(len(r["runner"].missing) for r in results.values())
    lines = [f"# Results: {cfg.name} content control (item cold start, issue 28, item 6)", ""]
    if missing:
        lines += [f"**Partial**: {missing} run(s) not done yet (listed at the end).", ""]
    seconds = sum(sum(r["runner"].run_seconds.values()) for r in results.values())
    syn = dataclasses.asdict(cfg.data.synthetic)
    syn.pop("content_topic_p", None)
    lines += [
        f"- command: `{command}`",
        f"- date: {datetime.date.today().isoformat()}; machine: {cold_start._cpu()}; wall time "
        f"of this call {wall / 60:.1f} min; training time of the runs it reports, cached ones "
        f"included, {seconds / 60:.1f} min",
        f"- data: the synthetic generator ({json.dumps(syn, sort_keys=True)}) at "
        f"`data.synthetic.content_topic_p` "
        + ", ".join(f"{p:g}" for p in sorted(results))
        + ": the probability that an item's title, tags, provider and format come from its "
          "click topic (else from an independent uniform topic); each value has its own data, "
          "artifacts and title neighbours ("
        + ", ".join(f"`{results[p]['cfg'].artifacts_dir}`" for p in sorted(results)) + ")",
        "- protocol: `preprocess.split: item_cold_start` (docs/COLD_START.md); **cold** ranks a "
        "cold-test click among all catalogue items of its bucket, **all** every test click over "
        "the whole catalogue",
        f"- rows, grid (`{grid}`), selection and early stopping as `experiments.cold_start` "
        f"(cold-validation HIT@50, patience {cfg.train.early_stopping_patience}, <= "
        f"{cfg.train.epochs} epochs); {SEM} is semantic CL alone on the ID-dropout tower; seeds: "
        f"{seeds} for the main rows, {min(seeds, cold_start.ALONE_SEEDS)} for {SEM}",
        f"- gain: `100 * (mean(row) / mean({TEXT}) - 1)` over the seeds both rows ran; p: "
        f"two-sided paired t-test over those seeds",
        "", "## Summary: test cold HIT@50, gain over " + TEXT, "",
        f"| content_topic_p | {TEXT} | {FINAL} | gain | {SEM} | gain |",
        "|---|---|---|---|---|---|",
    ]
    for p in sorted(results):
        r = results[p]
        cells = []
        for name in (TEXT, *COMPARED):
            runs = r["per_seed"].get(name)
            cells.append(_fmt([_cold(x, "cold/hit@50") for x in runs]) if runs else "not run yet")
            if name != TEXT:
                cells.append(_gain_text(r["gains"].get(TEXT, {}).get(name, {})
                                        .get("cold/hit@50")))
        lines.append(f"| {p:g} | " + " | ".join(cells) + " |")
    lines += ["", "Reading (at the lowest content_topic_p, where content says nothing about "
              "clicks):", ""] + (_reading(results) or ["- not measured yet."])
    js = {"name": cfg.name, "p_values": {}}
    for p in sorted(results):
        r = results[p]
        chance = _chance(r["per_seed"].get(TEXT, []))
        lines += ["", f"## content_topic_p {p:g} (`{r['cfg'].name}`)", "",
                  "Cold HIT@50 of a random ranking: "
                  + (f"{chance:.4f}" if chance is not None else "n/a") + ".", "",
                  "| model | " + " | ".join(label for label, _ in METRICS) + " | "
                  + " | ".join(f"gain {label} vs {TEXT}" for label, _ in METRICS)
                  + f" | gain cold HIT@50 vs {DROP} | seeds | best epochs |",
                  "|---" * (2 * len(METRICS) + 4) + "|"]
        rows_js = {}
        for name in NAMES:
            runs = r["per_seed"].get(name)
            if not runs:
                lines.append(f"| {name} | " + " | ".join("not run yet" for _ in METRICS)
                             + " | " * len(METRICS) + " |  | 0 | |")
                continue
            gains = [("" if name == TEXT else
                      _gain_text(r["gains"].get(TEXT, {}).get(name, {}).get(key)))
                     for _, key in METRICS]
            gains.append("" if name in (TEXT, DROP) else
                         _gain_text(r["gains"].get(DROP, {}).get(name, {}).get("cold/hit@50")))
            lines.append(f"| {name} | "
                         + " | ".join(_fmt([_cold(x, key) for x in runs]) for _, key in METRICS)
                         + " | " + " | ".join(gains)
                         + f" | {len(runs)} | {convergence_text(runs)} |")
            rows_js[name] = {"seeds": [x["seed"] for x in runs],
                             "test": [x["cold_start"]["test"] for x in runs],
                             "valid": [x["cold_start"]["valid"] for x in runs],
                             "best_epochs": [x.get("best_epoch") for x in runs],
                             "setting": r["settings"].get(name)}
        lines += ["", "Chosen settings (cold-validation HIT@50, seed 0):", "",
                  "| model | setting |", "|---|---|"]
        lines += [f"| {n} | `{json.dumps(r['settings'][n])}` |" for n in NAMES
                  if n in r["settings"]]
        lines += ["", "Every trial (seed 0):", ""]
        lines += trial_table(NAMES, r["runner"].trials, r["settings"])
        js["p_values"][f"{p:g}"] = {
            "name": r["cfg"].name, "artifacts_dir": r["cfg"].artifacts_dir,
            "rows": rows_js, "gains": r["gains"], "settings": r["settings"],
            "trials": r["runner"].trials, "missing": r["runner"].missing}
    if missing:
        lines += ["", "## Not run yet", ""]
        for p in sorted(results):
            lines += [f"- p {p:g}: `{k}`" for k in results[p]["runner"].missing]
    return "\n".join(lines) + "\n", js


def content_control(cfg: Config, seeds: int | None = None, grid: str = "small",
                    out_dir: str = "docs/results", command: str = "", log=print,
                    cached_only: bool = False, p_values=P_VALUES) -> str:
    """Builds (unless built), runs (unless cached) and reports the control; returns the
    markdown path ``<out_dir>/<name>-control.md``."""
    check_config(cfg)
    start = time.time()
    seeds = seeds or cfg.eval.seeds
    results = {}
    for p in p_values:
        cfg_p = config_for(cfg, p)
        if not cached_only:
            build_artifacts(cfg_p, log)
        runner = Runner(cfg_p, os.path.join(cfg_p.run_dir, "content_control"), grid, log,
                        cache_dir=os.path.join(out_dir, "runs", cfg_p.name),
                        cached_only=cached_only,
                        select=lambda res: res["cold_start"]["valid"][cold_start.SELECT],
                        select_name="cold-validation HIT@50")
        settings, per_seed = cold_start.run_rows(cfg_p, list(NAMES), seeds, grid, runner)
        gains = {}
        for name, ref, keys in GAINS:
            if per_seed.get(name) and per_seed.get(ref):
                gains.setdefault(ref, {})[name] = {k: gain(per_seed[name], per_seed[ref], k)
                                                   for k in keys}
        results[float(p)] = {"cfg": cfg_p, "settings": settings, "per_seed": per_seed,
                             "runner": runner, "gains": gains}
    md, js = report(cfg, results, seeds, grid, command, time.time() - start)
    return write_report(out_dir, f"{cfg.name}-control", md, js, log, "content_control")


def main(argv=None) -> int:
    parser = cli.parser("Synthetic content control of the item-cold-start gain (issue 28)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds of the main rows")
    parser.add_argument("--grid", choices=sorted(GRIDS), default="small")
    parser.add_argument("--cached-only", action="store_true",
                        help="build and train nothing: a partial report of the cached runs")
    parser.add_argument("--out", default="docs/results")
    args = parser.parse_args(argv)
    cfg = cli.load(args)
    content_control(cfg, args.seeds, args.grid, args.out, cached_only=args.cached_only,
                    command="python -m experiments.content_control " +
                    " ".join(argv if argv is not None else sys.argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))

"""Reproduction runner: ``make reproduce CONFIG=configs/ml-1m.yaml`` (paper 5.4, 5.6, 5.7).

For one dataset config it runs, over ``eval.seeds`` seeds:

* Table 2: FM, YoutubeDNN, DeepFM, AutoInt, ICAN, RFM* (= fea), MicRec (fea+sess), MicRec (final);
* Table 4: MicRec minus each CL term (and minus all = ICAN);
* Fig. 3: YoutubeDNN and AutoInt with each CL term added;
* the sparsity sweep: ICAN and MicRec (final) on 100 %, 50 %, 20 % of the users' training clicks;
* two non-neural reference rows: most-popular and the 1-hour co-occurrence item-kNN.

Hyper-parameters are chosen on the **validation** split only, with one bounded grid per variant
(:data:`GRID`, the same number of trials for every model, baselines included), seed 0, early stopping
on validation HIT@50 within ``train.epochs``. Test metrics of the chosen setting are then measured
over the seeds. Every finished run is cached as ``runs/<name>/reproduce/<run>/metrics.json`` and
skipped on the next call, so the job is resumable.

Writes ``docs/results/<name>.md`` (tables: mean +- std over seeds, relative gain over ICAN, paired
t-test p-values of MicRec (final) vs each row), ``docs/results/<name>.json`` (all per-seed numbers)
and PNG plots under ``docs/results/<name>/``.
"""
from __future__ import annotations

import datetime
import itertools
import json
import os
import platform
import sys
import time

import numpy as np

from micrec_tf import cli
from micrec_tf.config import CL_TASKS, Config, ConfigError, from_dict

ALL_CL = ["feature", "semantic", "session"]
# name -> (table, overrides). Tables: main (Table 2), ablation (Table 4), universality (Fig. 3).
VARIANTS = {
    "FM": ("main", {"model.name": "fm", "model.cl": []}),
    "YoutubeDNN": ("main", {"model.name": "youtubednn", "model.cl": []}),
    "DeepFM": ("main", {"model.name": "deepfm", "model.cl": []}),
    "AutoInt": ("main", {"model.name": "autoint", "model.cl": []}),
    "ICAN": ("main", {"model.name": "ican", "model.cl": []}),
    "TFRS two-tower": ("main", {"model.name": "tfrs_two_tower", "model.cl": []}),
    "RFM* (fea)": ("main", {"model.name": "ican", "model.cl": ["feature"]}),
    "MicRec (fea+sess)": ("main", {"model.name": "ican", "model.cl": ["feature", "session"]}),
    "MicRec (final)": ("main", {"model.name": "ican", "model.cl": ALL_CL}),
    "MicRec - fea": ("ablation", {"model.name": "ican", "model.cl": ["semantic", "session"]}),
    "MicRec - sem": ("ablation", {"model.name": "ican", "model.cl": ["feature", "session"]}),
    "MicRec - sess": ("ablation", {"model.name": "ican", "model.cl": ["feature", "semantic"]}),
    "MicRec - all (ICAN)": ("ablation", {"model.name": "ican", "model.cl": []}),
    **{f"{base} + {short}": ("universality", {"model.name": base.lower(), "model.cl": [task]})
       for base in ("YoutubeDNN", "AutoInt")
       for short, task in (("fea", "feature"), ("sem", "semantic"), ("sess", "session"))},
}
FINAL = "MicRec (final)"
BASE = "ICAN"
PEER = "TFRS two-tower"
SPARSITY = (1.0, 0.5, 0.2)

# The bounded validation grid (the same number of trials for every variant). Models without CL
# search the learning rate and the number of sampled negatives. A model with CL terms starts from
# the setting its base model (the same towers without CL) chose, so it never gets a training
# setting its base did not, and searches only the CL knobs: the paper's setting (dot-product
# similarity, tau 1, lambdas 1.0 / 0.3 / 0.1) and cosine similarity at a few temperatures and
# scales of the paper's lambdas (the region docs/results/ml-100k-investigation-similarity.md
# found on ml-100k's validation split).
_PAPER_CL = {"loss.cl_similarity": "dot", "loss.temperature": 1.0, "_lambda_scale": 1.0}


def _cosine(tau: float, scale: float) -> dict:
    return {"loss.cl_similarity": "cosine", "loss.temperature": tau, "_lambda_scale": scale}


GRIDS = {
    "full": ([_PAPER_CL, _cosine(0.2, 0.1), _cosine(0.2, 0.3), _cosine(0.5, 1.0)],
             [{"train.learning_rate": lr, "loss.num_negatives": n}
              for lr in (0.001, 0.003) for n in (500, 1000)]),
    # Two trials each.
    "small": ([_cosine(0.2, 0.1), _cosine(0.5, 1.0)],
              [{"train.learning_rate": lr} for lr in (0.001, 0.003)]),
    "none": ([{}], [{}]),
}
# The TFRS peer has no sampled negatives to tune: its negatives are the batch's other positives,
# so the batch size takes their place (the same number of trials as every other model).
PEER_GRIDS = {
    "full": [{"train.learning_rate": lr, "train.batch_size": b}
             for lr in (0.001, 0.003) for b in (1024, 4096)],
    "small": [{"train.learning_rate": lr} for lr in (0.001, 0.003)],
    "none": [{}],
}
# One method option per model, chosen on validation after its grid (seed 0, at the grid's
# chosen setting), so every model gets the same number of trials (grid + 1): the main loss's
# history mask for models without CL, semantic CL's positives for models with it.
OPTIONS = {
    "base": ("loss.mask_history_negatives", False),
    "cl": ("loss.semantic_positives", "all"),
    # The TFRS peer has no sampled negatives to mask: its extra trial doubles its in-batch
    # negatives instead (batch 8192).
    "peer": ("train.batch_size", 8192),
}
GRID_TEXT = {
    "full": "models without CL: learning rate {0.001, 0.003} x sampled negatives {500, 1000}; "
            "the TFRS peer: learning rate {0.001, 0.003} x batch size (its in-batch negatives) "
            "{1024, 4096}; models with CL terms: their base model's chosen setting plus either the "
            "paper's CL setting (dot product, tau 1, lambdas 1.0 / 0.3 / 0.1) or cosine "
            "similarity at (tau 0.2, lambdas x0.1), (tau 0.2, x0.3) or (tau 0.5, x1). Four trials "
            "each, then one method option each at the chosen setting, kept if it is better on "
            "validation: the main loss without the history mask (models without CL), semantic CL "
            "over all title neighbours (models with semantic CL), batch 8192 (the TFRS peer).",
    "small": "models without CL: learning rate {0.001, 0.003}; models with CL terms: their base "
             "model's chosen setting plus cosine CL similarity at (tau 0.2, the paper's lambdas "
             "1.0 / 0.3 / 0.1 x0.1) or (tau 0.5, x1). Two trials each, then the method option of "
             "the full grid; everything else at the config's values.",
    "none": "no tuning: every variant at the config's values.",
}


def grid_for(overrides: dict, grid: str = "full") -> list:
    cl_grid, base_grid = GRIDS[grid]
    if overrides.get("model.name") == "tfrs_two_tower":
        return PEER_GRIDS[grid]
    return cl_grid if overrides.get("model.cl") else base_grid


def option_for(overrides: dict, grid: str = "full"):
    """(config key, alternative value) tried after the grid, or None (grid ``none``)."""
    if grid == "none":
        return None
    if overrides.get("model.name") == "tfrs_two_tower":
        return OPTIONS["peer"]
    cl = overrides.get("model.cl") or []
    if not cl:
        return OPTIONS["base"]
    return OPTIONS["cl"] if "semantic" in cl else None


def base_of(overrides: dict) -> str | None:
    """The variant with the same towers and no CL terms (None for a model without CL)."""
    if not overrides.get("model.cl"):
        return None
    for name, (_, ov) in VARIANTS.items():
        if ov["model.name"] == overrides["model.name"] and not ov["model.cl"]:
            return name
    raise ValueError(f"no base variant without CL for model {overrides['model.name']!r}")


def canonical_name(name: str) -> str:
    """The first variant with the same model as ``name`` ("MicRec - sem" -> "MicRec (fea+sess)"):
    its runs are kept under that name, so rows that are the same model share one cache."""
    return next(n for n, (_, ov) in VARIANTS.items() if ov == VARIANTS[name][1])


def scaled_lambdas(scale: float) -> dict:
    """The paper's loss weights (1.0, 0.3, 0.1) times ``scale``, as config overrides."""
    return {"loss.lambda_feature": round(1.0 * scale, 6),
            "loss.lambda_semantic": round(0.3 * scale, 6),
            "loss.lambda_session": round(0.1 * scale, 6)}


def _expand(cfg: Config, overrides: dict) -> Config:
    ov = {k: v for k, v in overrides.items() if not k.startswith("_")}
    scale = overrides.get("_lambda_scale")
    if scale is not None:
        ov.update(scaled_lambdas(scale))
    return cfg.replace(ov)


def run_signature(cfg: Config) -> dict:
    """What a cached run must match to be reused: the whole config except the keys that do not
    change a run's result (where runs are kept, how many seeds the report uses, export, the
    speed-only code paths of the user tower)."""
    return _normalise(cfg.to_dict())


# Loss keys and the CL terms that read them: irrelevant to a run with none of those terms.
_CL_LOSS_KEYS = (
    ({"feature"}, ("lambda_feature", "feature_dropout", "mask_ratio")),
    ({"semantic"}, ("lambda_semantic", "semantic_positives")),
    ({"session"}, ("lambda_session", "same_category_weight", "session_positives",
                   "session_negative_pool")),
    ({"semantic", "session"}, ("num_cl_negatives",)),
    (set(CL_TASKS), ("temperature", "cl_similarity", "cl_anchors")),
)


def _rounded(value):
    """Floats rounded to 9 significant digits (0.1 * 0.3 and 0.03 are the same setting)."""
    if isinstance(value, float):
        return float(f"{value:.9g}")
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


def _normalise(sig: dict) -> dict:
    sig = _rounded(json.loads(json.dumps(sig)))  # a deep copy, float noise rounded away
    sig.pop("export", None)
    sig.get("train", {}).pop("runs_dir", None)
    sig.get("eval", {}).pop("seeds", None)
    for key in ("history_embeddings", "attention"):  # speed only: the same function
        sig.get("model", {}).pop(key, None)
    tasks = set(sig.get("model", {}).get("cl") or [])
    for readers, keys in _CL_LOSS_KEYS:
        if not tasks & readers:
            for key in keys:
                sig.get("loss", {}).pop(key, None)
    return sig


def _cached_signature(cached: dict):
    """The signature of a cached run, re-normalised through today's config: keys added since the
    run take their defaults (which keep the old behaviour), so such runs still match."""
    if "config" not in cached:
        return None
    return run_signature(from_dict(cached["config"]))


def artifacts_fingerprint(artifacts_dir: str) -> dict:
    """The counts of the preprocessing output a run trained on (stats.json without timings), so a
    cached run is not reused on artifacts that were rebuilt differently (another tie rule, another
    co-occurrence table)."""
    path = os.path.join(artifacts_dir, "stats.json")
    if not os.path.exists(path):
        return {}
    with open(path) as fh:
        stats = json.load(fh)
    return {k: v for k, v in sorted(stats.items())
            if isinstance(v, (int, float)) and not isinstance(v, bool)
            and not any(t in k for t in ("second", "wall", "time", "_s"))}


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text).strip("_").lower()


class Runner:
    """Runs (or loads from the committed cache) one training run per (variant, setting, seed).

    ``root``: where runs train (checkpoints; ``runs/<name>/reproduce``, not committed).
    ``cache_dir``: one small JSON per finished run (config signature, seed, per-epoch validation,
    best epoch, test metrics), meant to be committed (``docs/results/runs/<name>/``), so that a
    reproduction continues on another machine instead of re-running what is done. A cached run is
    reused only when its config signature and the artifacts' fingerprint match.
    """

    def __init__(self, cfg: Config, root: str, grid: str = "full", log=print,
                 cache_dir: str | None = None, cached_only: bool = False):
        self.cfg, self.root, self.grid, self.log = cfg, root, grid, log
        # cached_only: never train; a run not in the cache is recorded in ``missing`` and
        # returns None (a partial report of what is done).
        self.cached_only, self.missing = cached_only, []
        self.cache_dir = cache_dir or os.path.join(root, "cache")
        self.run_seconds = {}  # run key -> training seconds, cached runs included
        self.fingerprint = artifacts_fingerprint(cfg.artifacts_dir)
        self.trials = {}  # model name -> [trial rows] (see :meth:`tune`)

    def cache_path(self, key: str) -> str:
        return os.path.join(self.cache_dir, f"{key}.json")

    def cached(self, key: str, overrides: dict, evaluate_test: bool = True):
        """The cached result of ``key`` if it matches today's config and artifacts, else None."""
        path = self.cache_path(key)
        if not os.path.exists(path):
            return None
        with open(path) as fh:
            cached = json.load(fh)
        signature = run_signature(_expand(self.cfg, overrides))
        if _cached_signature(cached) != signature:
            self.log(f"[reproduce] cached {key} was run with another config: running again")
            return None
        if cached.get("artifacts", {}) != self.fingerprint:
            self.log(f"[reproduce] cached {key} was trained on other artifacts "
                     f"({self.cfg.artifacts_dir} was rebuilt): running again")
            return None
        if evaluate_test and "test" not in cached:
            return None
        return cached

    def run(self, key: str, overrides: dict, evaluate_test: bool) -> dict:
        cached = self.cached(key, overrides, evaluate_test)
        if cached is not None:
            self.run_seconds[key] = float(cached.get("seconds", 0.0))
            return cached
        if self.cached_only:
            self.missing.append(key)
            return None
        cfg = _expand(self.cfg, overrides)
        from micrec_tf.train import train  # deferred: TF loads only when a run is needed

        self.log(f"[reproduce] run {key}: {overrides}")
        start = time.time()
        result = train(cfg, run_dir=os.path.join(self.root, key), evaluate_test=evaluate_test,
                       log=self.log)
        out = {"key": key, "seed": cfg.train.seed}
        out.update({k: result[k] for k in ("valid", "test") if k in result})
        out["history"] = result["history"]
        for k in ("best_epoch", "epochs_run", "stopped_early"):
            out[k] = result.get(k)
        out["epochs_cap"] = cfg.train.epochs
        out["seconds"] = time.time() - start
        self.run_seconds[key] = out["seconds"]
        out["overrides"] = dict(overrides)
        out["config"] = run_signature(cfg)
        out["artifacts"] = self.fingerprint
        out["machine"] = f"{platform.node()} ({os.cpu_count()} CPU cores, {platform.machine()})"
        out["date"] = datetime.date.today().isoformat()
        path = self.cache_path(key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".tmp", "w") as fh:
            json.dump(out, fh, indent=1)
        os.replace(path + ".tmp", path)
        # Free the run's graph before the next one.
        import tf_keras
        tf_keras.backend.clear_session()
        return out

    def tune(self, name: str, overrides: dict, inherited: dict | None = None) -> tuple:
        """Best setting of ``name`` by validation HIT@N[0] (seed 0): ``(setting, run key)``.

        The grid's trials (:func:`grid_for`), then the model's method option
        (:func:`option_for`) at the grid's choice, kept if it is better on validation.
        ``inherited``: the setting its base model chose (for models with CL), applied under every
        trial. Trial runs also measure test metrics (so the winner doubles as the seed-0 run), but
        the choice reads validation only. Every trial is listed in ``self.trials[name]``.
        """
        n = self.cfg.eval.hit_n[0]
        rows = self.trials[name] = []

        def trial(setting):
            ov = {**overrides, **setting, "train.seed": 0}
            tag = "_".join(f"{k.split('.')[-1]}{v}" for k, v in sorted(setting.items())) or "default"
            key = f"tune/{_slug(name)}/{_slug(tag)}"
            res = self.run(key, ov, evaluate_test=True)
            if res is None:  # cached_only and not run yet
                rows.append({"setting": setting, "key": key, "valid": None, "missing": True})
                return key, None
            rows.append({"setting": setting, "key": key, "valid": res["valid"][f"hit@{n}"],
                         "best_epoch": res.get("best_epoch"), "epochs_run": res.get("epochs_run"),
                         "epochs_cap": res.get("epochs_cap"),
                         "stopped_early": res.get("stopped_early")})
            return key, res["valid"][f"hit@{n}"]

        best, best_key, best_score, complete = None, None, -1.0, True
        for t in grid_for(overrides, self.grid):
            setting = {**(inherited or {}), **t}
            key, score = trial(setting)
            if score is None:
                complete = False
            elif score > best_score:
                best, best_key, best_score = setting, key, score
        option = option_for(overrides, self.grid)
        if complete and option is not None and best.get(option[0], _UNSET) != option[1]:
            setting = {**best, option[0]: option[1]}
            key, score = trial(setting)
            rows[-1]["option"] = True
            if score is None:
                complete = False
            elif score > best_score:
                best, best_key, best_score = setting, key, score
        if not complete:
            return None, None  # the choice is not made until every trial has run
        return best, best_key


_UNSET = object()


def paired_p(a, b) -> float:
    """Two-sided paired t-test p-value over seeds (nan with fewer than 2 pairs)."""
    from scipy import stats

    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) < 2 or np.allclose(a - b, (a - b)[0]):
        return float("nan")
    return float(stats.ttest_rel(a, b).pvalue)


def summarise(per_seed: dict, ns, coverage_ns) -> dict:
    """name -> metric -> (mean, std, values) over seeds."""
    out = {}
    for name, runs in per_seed.items():
        metrics = {}
        for key in ([f"hit@{n}" for n in ns] + [f"coverage@{n}" for n in coverage_ns]
                    + [f"long_tail/hit@{n}" for n in (ns[0], ns[-1])]):
            vals = [r["test"][key] for r in runs if key in r["test"]]
            if vals:
                metrics[key] = (float(np.mean(vals)), float(np.std(vals)), vals)
        out[name] = metrics
    return out


def convergence_text(runs: list) -> str:
    """"13, 12, 15 of <= 30" from runs' best epochs; a run whose best epoch is the last allowed
    (or that ran without early stopping) is marked "(cap!)": it is not known to be converged."""
    parts = []
    for r in runs:
        best, cap = r.get("best_epoch"), r.get("epochs_cap")
        if best is None:
            parts.append("?")
            continue
        parts.append(f"{best}" + (" (cap!)" if cap is not None and best >= cap else ""))
    caps = sorted({r.get("epochs_cap") for r in runs if r.get("epochs_cap") is not None})
    return ", ".join(parts) + (f" of <= {caps[0]}" if len(caps) == 1 else "")


def unconverged(runs_by_name: dict) -> list:
    """[(row name, run key)] of runs whose best epoch is the epoch cap."""
    return [(name, r.get("key", "?")) for name, runs in runs_by_name.items() for r in runs
            if r.get("best_epoch") is not None and r.get("epochs_cap") is not None
            and r["best_epoch"] >= r["epochs_cap"]]


def to_markdown(cfg: Config, summary: dict, reference: dict, settings: dict, sparsity: dict,
                seeds: int, command: str, seconds: float, grid: str = "full",
                run_seconds: float | None = None, convergence: dict | None = None,
                trials: dict | None = None, missing: list | None = None) -> str:
    ns, cns = cfg.eval.hit_n, cfg.eval.coverage_n
    cols = [f"hit@{n}" for n in ns] + [f"coverage@{n}" for n in cns] + \
        [f"long_tail/hit@{ns[0]}", f"long_tail/hit@{ns[-1]}"]
    head = ["model"] + [c.replace("hit@", "HIT@").replace("long_tail/", "tail ") for c in cols] + \
        [f"gain HIT@{ns[0]} vs ICAN", f"p vs final (HIT@{ns[0]})"]
    lines = [f"# Results: {cfg.name}", "",
             f"- command: `{command}`",
             f"- date: {datetime.date.today().isoformat()}; machine: {platform.node()} "
             f"({os.cpu_count()} CPU cores, {platform.machine()}), wall time of this call "
             f"{seconds / 60:.1f} min"
             + (f"; training time of the runs it reports, cached ones included, "
                f"{run_seconds / 60:.1f} min" if run_seconds is not None else ""),
             f"- split: `{cfg.preprocess.split}`; exclude already-clicked items: "
             f"{cfg.eval.exclude_clicked}; seeds: {seeds}; epochs <= {cfg.train.epochs} with early "
             f"stopping on validation HIT@{ns[0]}",
             "- every number below was measured by this run; mean +- std over seeds; p-values: "
             "two-sided paired t-test over seeds of MicRec (final) vs the row", ""]
    if missing:
        lines += [f"**PARTIAL: a report of the cached runs only (`--cached-only`); {len(missing)} "
                  f"run(s) of the protocol are not done yet:** "
                  + ", ".join(f"`{k}`" for k in missing)
                  + ". Rows show the seeds done so far; a model whose grid is incomplete has no "
                    "chosen setting and no row yet.", ""]
    if convergence:
        flagged = unconverged(convergence)
        lines += ["- convergence: every run stops by early stopping on validation "
                  f"HIT@{ns[0]} (patience {cfg.train.early_stopping_patience}, best epoch "
                  "restored); " + (f"**{len(flagged)} run(s) had their best epoch at the cap and "
                                   f"are not known to be converged: "
                                   f"{', '.join(k for _, k in flagged)}**" if flagged else
                                   "no run's best epoch was the last allowed"), ""]
    base = summary.get(BASE, {}).get(f"hit@{ns[0]}", (float("nan"),))[0]

    def gain_vs_base(value: float) -> float:
        """Relative HIT@N[0] gain over ICAN in %, nan when ICAN was not run."""
        return (value / base - 1) * 100 if base and not np.isnan(base) else float("nan")

    final_vals = summary.get(FINAL, {}).get(f"hit@{ns[0]}", (0, 0, []))[2]
    for table, title in (("main", "Table 2: models"), ("ablation", "Table 4: ablations"),
                         ("universality", "Fig. 3: CL terms on other models")):
        rows = [n for n, (t, _) in VARIANTS.items() if t == table and n in summary]
        if not rows:
            continue
        table_head = head if table != "universality" else head[:-2] + [
            f"gain HIT@{ns[0]} vs its base model", f"p vs its base (HIT@{ns[0]})"]
        lines += [f"## {title}", "", "| " + " | ".join(table_head) + " |",
                  "|" + "---|" * len(table_head)]
        if table == "main":
            for ref_name, ref in reference.items():
                cells = [ref_name] + [f"{ref[c]:.4f}" if c in ref else "" for c in cols]
                gain = gain_vs_base(ref[f"hit@{ns[0]}"])
                lines.append("| " + " | ".join(cells + [f"{gain:+.1f} %", "(deterministic)"]) + " |")
            from micrec_tf.evaluation.reference_rows import selection_lines

            notes = selection_lines(reference)
        for name in rows:
            m = summary[name]
            cells = [name] + [f"{m[c][0]:.4f} +- {m[c][1]:.4f}" if c in m else "" for c in cols]
            base_name = base_of(VARIANTS[name][1])
            if table == "universality" and base_name in summary:
                # Fig. 3 compares a model with a CL term to the same model without it.
                base_vals = summary[base_name][f"hit@{ns[0]}"]
                gain = (m[f"hit@{ns[0]}"][0] / base_vals[0] - 1) * 100
                p = paired_p(m[f"hit@{ns[0]}"][2], base_vals[2])
            else:
                gain = gain_vs_base(m[f"hit@{ns[0]}"][0])
                p = paired_p(final_vals, m[f"hit@{ns[0]}"][2]) if name != FINAL else float("nan")
            lines.append("| " + " | ".join(cells + [f"{gain:+.1f} %", f"{p:.3g}"]) + " |")
        lines.append("")
        if table == "main" and reference:
            lines += [f"- {line}" for line in notes] + [""]
        if convergence and table == "main":
            lines += ["Best (restored) epoch of each seed's run:", ""]
            lines += [f"- {name}: {convergence_text(convergence[name])}" for name in rows
                      if name in convergence]
            lines.append("")
    if sparsity:
        lines += ["## Sparsity sweep (fraction of users' training clicks)", "",
                  f"| fraction | ICAN HIT@{ns[0]} | MicRec (final) HIT@{ns[0]} | relative gain | p |",
                  "|---|---|---|---|---|"]
        for frac, (ican, mic) in sorted(sparsity.items(), reverse=True):
            gain = (np.mean(mic) / np.mean(ican) - 1) * 100
            lines.append(f"| {frac:.0%} | {np.mean(ican):.4f} +- {np.std(ican):.4f} | "
                         f"{np.mean(mic):.4f} +- {np.std(mic):.4f} | {gain:+.1f} % | "
                         f"{paired_p(mic, ican):.3g} |")
        lines.append("")
    lines += ["## Chosen hyper-parameters (validation HIT@50, seed 0)", "",
              "| model | grid setting | values in effect |", "|---|---|---|"]
    lines += [f"| {n} | `{json.dumps(s)}` | {effective_values(cfg, n, s)} |"
              for n, s in settings.items()]
    lines += ["", f"Grid `{grid}`: {GRID_TEXT[grid]}", ""]
    if trials:
        lines += [f"### Every trial (seed 0): validation HIT@{ns[0]}", "",
                  f"| model | setting | validation HIT@{ns[0]} | best epoch | epochs run |",
                  "|---|---|---|---|---|"]
        for name, rows in trials.items():
            for t in rows:
                mark = " (method option)" if t.get("option") else ""
                chosen = " **chosen**" if t["setting"] == settings.get(name) else ""
                if t.get("missing"):
                    lines.append(f"| {name} | `{json.dumps(t['setting'])}`{mark} | not run yet "
                                 f"| | |")
                    continue
                lines.append(f"| {name} | `{json.dumps(t['setting'])}`{mark}{chosen} | "
                             f"{t['valid']:.4f} | {t.get('best_epoch')} | "
                             f"{t.get('epochs_run')} of <= {t.get('epochs_cap')} |")
        lines.append("")
    return "\n".join(lines)


def effective_values(cfg: Config, name: str, setting: dict) -> str:
    """The training and CL values a variant ran with (config + its grid setting), as text."""
    run = _expand(cfg, {**VARIANTS[name][1], **setting})
    t, loss = run.train, run.loss
    text = f"lr {t.learning_rate}, {loss.num_negatives} negatives, <= {t.epochs} epochs"
    if run.model.cl:
        lambdas = ", ".join(f"{task} {getattr(loss, f'lambda_{task}'):g}" for task in run.model.cl)
        text += f"; CL {loss.cl_similarity}, tau {loss.temperature:g}, lambdas {lambdas}"
    return text


def plots(out_dir: str, cfg: Config, summary: dict, sparsity: dict, histories: dict) -> list:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    ns, files = cfg.eval.hit_n, []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, m in summary.items():
        if VARIANTS[name][0] == "main":
            ax.plot(ns, [m[f"hit@{n}"][0] for n in ns], marker="o", label=name)
    ax.set_xlabel("N"), ax.set_ylabel("test HIT@N"), ax.legend(fontsize=7), ax.grid(alpha=.3)
    files.append(os.path.join(out_dir, "hit_at_n.png"))
    fig.savefig(files[-1], dpi=110, bbox_inches="tight"), plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 4.5))
    names = [n for n in summary if VARIANTS[n][0] in ("main", "ablation")]
    for j, cn in enumerate(cfg.eval.coverage_n):
        ax.bar(np.arange(len(names)) + j * 0.4, [summary[n][f"coverage@{cn}"][0] for n in names],
               width=0.4, label=f"coverage@{cn}")
    ax.set_xticks(np.arange(len(names)) + 0.2, names, rotation=40, ha="right", fontsize=7)
    ax.legend(), ax.set_ylabel("item coverage")
    files.append(os.path.join(out_dir, "coverage.png"))
    fig.savefig(files[-1], dpi=110, bbox_inches="tight"), plt.close(fig)

    if histories:
        keys = ["sampled_softmax_loss", "feature_cl_loss", "semantic_cl_loss", "session_cl_loss"]
        fig, axes = plt.subplots(1, len(keys), figsize=(14, 3.2))
        colors = {name: f"C{i}" for i, name in enumerate(histories)}  # one colour per model
        for ax, key in zip(axes, keys):
            for name, hist in histories.items():
                if key in hist:
                    ax.plot(np.arange(1, len(hist[key]) + 1), hist[key], label=name,
                            color=colors[name])
            ax.set_title(key, fontsize=8), ax.set_xlabel("epoch")
        axes[0].legend(fontsize=7)
        files.append(os.path.join(out_dir, "loss_curves.png"))
        fig.savefig(files[-1], dpi=110, bbox_inches="tight"), plt.close(fig)

    if sparsity:
        fr = sorted(sparsity)
        gains = [(np.mean(sparsity[f][1]) / np.mean(sparsity[f][0]) - 1) * 100 for f in fr]
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot([f * 100 for f in fr], gains, marker="o")
        ax.axhline(0, color="grey", lw=.8)
        ax.set_xlabel("% of training clicks"), ax.set_ylabel(f"MicRec gain over ICAN, HIT@{ns[0]} (%)")
        files.append(os.path.join(out_dir, "sparsity.png"))
        fig.savefig(files[-1], dpi=110, bbox_inches="tight"), plt.close(fig)
    return files


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
            runner.trials[same] = [{"setting": {}, "key": f"tune/{_slug(same)}/...",
                                    "valid": None, "missing": True}]
            runner.missing.append(f"tune/{_slug(same)}/* (after {base})")
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
            run = runner.run(seed0[name] if s == 0 else f"{_slug(same)}/seed{s}",
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
                pair.append([runner.run(f"sparsity/{_slug(name)}/f{int(frac * 100)}/seed{s}",
                                        {**ov, "train.seed": s}, True)["test"]
                             [f"hit@{cfg.eval.hit_n[0]}"] for s in range(seeds)])
            sweep[frac] = tuple(pair)
    from micrec_tf.evaluation.reference_rows import reference_rows

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
              out_dir=args.out, command="python -m micrec_tf.evaluation.reproduce " +
              " ".join(argv if argv is not None else sys.argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))

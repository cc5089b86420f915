"""The reproduction's report: summaries over seeds, paired t-tests, markdown tables, plots."""
from __future__ import annotations

import datetime
import json
import os
import platform

import numpy as np

from micrec_tf.config import Config

from experiments.variants import (BASE, FINAL, GRID_TEXT, PEER_MODEL, VARIANTS, base_of,
                                  expand)


def paired_p(a, b) -> float:
    """Two-sided paired t-test p-value over seeds (nan with fewer than 2 pairs).

    ``a``, ``b``: equal-length sequences paired by position, or {seed: value} dicts paired by
    seed (seeds in only one of them are left out: a partial report while seeds are running).
    """
    from scipy import stats

    if isinstance(a, dict) or isinstance(b, dict):
        seeds = sorted(set(a) & set(b))
        a, b = [a[s] for s in seeds], [b[s] for s in seeds]
    a, b = np.asarray(a, float), np.asarray(b, float)
    if a.shape != b.shape:
        raise ValueError(f"paired_p needs pairs. Received: {a.shape} and {b.shape} values")
    if len(a) < 2 or np.allclose(a - b, (a - b)[0]):
        return float("nan")
    return float(stats.ttest_rel(a, b).pvalue)


def summarise(per_seed: dict, ns, coverage_ns) -> dict:
    """name -> metric -> (mean, std, {seed: value}) over seeds."""
    out = {}
    for name, runs in per_seed.items():
        metrics = {}
        for key in ([f"hit@{n}" for n in ns] + [f"coverage@{n}" for n in coverage_ns]
                    + [f"long_tail/hit@{n}" for n in (ns[0], ns[-1])]):
            vals = {r.get("seed", i): r["test"][key] for i, r in enumerate(runs)
                    if key in r["test"]}
            if vals:
                v = list(vals.values())
                metrics[key] = (float(np.mean(v)), float(np.std(v)), vals)
        out[name] = metrics
    return out


def trial_table(names, trials: dict, settings: dict) -> list:
    """Markdown lines of every tuning trial of ``names`` (``Runner.trials``): setting, the
    validation score it was chosen by (the cold-start drivers: cold-validation HIT@50), best
    epoch and epochs run; the chosen setting and the method option marked."""
    lines = ["| model | setting | cold-validation HIT@50 | best epoch | epochs run |",
             "|---|---|---|---|---|"]
    for name in names:
        for t in trials.get(name, []):
            if t.get("missing"):
                lines.append(f"| {name} | `{json.dumps(t['setting'])}` | not run yet | | |")
                continue
            chosen = " **chosen**" if settings.get(name) == t["setting"] else ""
            opt = " (method option)" if t.get("option") else ""
            lines.append(f"| {name} | `{json.dumps(t['setting'])}`{chosen}{opt} | "
                         f"{t['valid']:.4f} | {t.get('best_epoch')} | {t.get('epochs_run')} of "
                         f"<= {t.get('epochs_cap')} |")
    return lines


def write_report(out_dir: str, stem: str, md: str, js: dict, log=print,
                 tag: str = "reproduce") -> str:
    """Writes ``<out_dir>/<stem>.md`` and ``.json``; returns the markdown path."""
    os.makedirs(out_dir, exist_ok=True)
    md_path = os.path.join(out_dir, f"{stem}.md")
    with open(md_path, "w") as fh:
        fh.write(md)
    with open(os.path.join(out_dir, f"{stem}.json"), "w") as fh:
        json.dump(js, fh, indent=1)
    log(f"[{tag}] wrote {md_path}")
    return md_path


def names_arg(parser, text: str | None, allowed, what: str):
    """A comma-separated command-line list checked against ``allowed`` (None when not given);
    an unknown name is a usage error listing the choices."""
    if not text:
        return None
    names = [v.strip() for v in text.split(",")]
    unknown = [v for v in names if v not in allowed]
    if unknown:
        parser.error(f"unknown {what}(s) {unknown}; choose from {list(allowed)}")
    return names


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

    final_vals = summary.get(FINAL, {}).get(f"hit@{ns[0]}", (0, 0, {}))[2]
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
                cells += [f"{gain:+.1f} %", "(deterministic)"]
                lines.append("| " + " | ".join(cells) + " |")
            from experiments.reference_rows import selection_lines

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
                  f"| fraction | ICAN HIT@{ns[0]} | MicRec (final) HIT@{ns[0]} | relative gain "
                  "| p |",
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


def negatives_text(run: Config) -> str:
    """The negatives of the main loss a run trained with: the TFRS peer's in-batch ones (B - 1
    per row, ``train.batch_size``), otherwise ``loss.num_negatives`` sampled ones (plus the
    batch's other positives with ``loss.in_batch_negatives``)."""
    if run.model.name == PEER_MODEL:
        b = run.train.batch_size
        return f"in-batch negatives (batch {b}: {b - 1} per row)"
    loss = run.loss
    if not loss.in_batch_negatives:
        return f"{loss.num_negatives} negatives"
    if not loss.num_negatives:
        return "in-batch negatives"
    return f"{loss.num_negatives} negatives + in-batch"


def effective_values(cfg: Config, name: str, setting: dict) -> str:
    """The training and CL values a variant ran with (config + its grid setting), as text."""
    run = expand(cfg, {**VARIANTS[name][1], **setting})
    t, loss = run.train, run.loss
    text = f"lr {t.learning_rate}, {negatives_text(run)}, <= {t.epochs} epochs"
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
        ax.set_xlabel("% of training clicks")
        ax.set_ylabel(f"MicRec gain over ICAN, HIT@{ns[0]} (%)")
        files.append(os.path.join(out_dir, "sparsity.png"))
        fig.savefig(files[-1], dpi=110, bbox_inches="tight"), plt.close(fig)
    return files

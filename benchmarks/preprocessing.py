"""Benchmark section 1: the Beam preprocessing job on synthetic logs of growing size.

Each run is a child process (:func:`~benchmarks.harness.run_child`): wall time of
``preprocess.run`` (data generation excluded), events/s, peak RSS of that child; the scaling
exponent is the slope of a log-log least-squares fit over the per-size medians
(:func:`power_fit`). Sizes that would not fit the time budget or memory are extrapolated.
"""
from __future__ import annotations

import os
import shutil
import time

import numpy as np

from benchmarks.harness import loadavg, log, median, mem_available_mib, rounded, run_child


def synthetic_spec(num_events: int, p: dict) -> dict:
    return {"num_events": int(num_events),
            "num_users": max(50, int(num_events) // p["events_per_user"]),
            "num_items": int(p["preprocess_items"]), "num_topics": 20, "seed": 7}


def synthetic_overrides(name: str, data_dir: str, artifacts_root: str, syn: dict) -> dict:
    out = {"name": name, "artifacts_root": artifacts_root, "data.dataset": "synthetic",
           "data.data_dir": data_dir}
    out.update({f"data.synthetic.{k}": v for k, v in syn.items()})
    return out


def child_preprocess(args: dict) -> dict:
    from micrec_tf.config import load_config
    from pipelines import preprocess

    cfg = load_config(args["config"], args["overrides"])
    start = time.perf_counter()
    stats = preprocess.run(cfg, data_dir=args["data_dir"], out_dir=args["out_dir"], verbose=False)
    wall = time.perf_counter() - start
    return {"wall_s": wall, "events": int(stats["events"]),
            "num_examples": sum(stats["num_examples"].values()),
            "pairs": int(stats.get("pairs", 0)), "job_timing": stats.get("timing")}


def generate_synthetic(syn: dict, data_dir: str) -> float:
    from micrec_tf.config import SyntheticConfig
    from micrec_tf.data.synthetic import generate, is_generated

    sc = SyntheticConfig(**syn)
    if is_generated(sc, data_dir):
        return 0.0
    start = time.perf_counter()
    generate(sc, data_dir, verbose=False)
    return time.perf_counter() - start


def power_fit(ns, ts):
    """Least-squares fit ``t = a * n^b`` in log-log: ``(a, b)``; ``b`` None for < 2 sizes."""
    ns, ts = np.log(np.asarray(ns, float)), np.log(np.asarray(ts, float))
    if len(ns) < 2:
        return (float(np.exp(ts[0] - ns[0])) if len(ns) else None), None
    b, loga = np.polyfit(ns, ts, 1)
    return float(np.exp(loga)), float(b)


def _estimate_time(n: int, runs: dict) -> float | None:
    """Estimated wall seconds of one run at ``n`` events from the runs so far."""
    sizes = sorted(runs)
    if not sizes:
        return None
    meds = [median(r["wall_s"] for r in runs[s]) for s in sizes]
    a, b = power_fit(sizes, meds)
    if b is None:
        return meds[0] * n / sizes[0]
    # Never extrapolate more optimistically than linear from the largest run.
    return max(a * n ** b, meds[-1] * n / sizes[-1])


def _estimate_rss(n: int, runs: dict) -> float | None:
    sizes = sorted(runs)
    if not sizes:
        return None
    rss = [max(r["peak_rss_mib"] for r in runs[s]) for s in sizes]
    if len(sizes) < 2:
        return rss[0] * n / sizes[0]
    slope = (rss[-1] - rss[0]) / (sizes[-1] - sizes[0])
    return rss[-1] + max(slope, 0.0) * (n - sizes[-1])


def bench_preprocessing(cfg_path: str, cfg, p: dict, work: str, deadline: float | None) -> dict:
    sizes, repeats = list(p["preprocess_sizes"]), list(p["preprocess_repeats"])
    # Runs in passes: every size once (ascending), then the extra repeats, so that noise is spread
    # over the sizes and a tight budget still covers the largest sizes it can.
    plan = []
    for rep in range(max(repeats)):
        plan += [(n, rep) for n, r in zip(sizes, repeats) if rep < r]
    runs: dict = {}
    skipped: dict = {}
    failed: list = []
    gen_s = {}
    for n, rep in plan:
        if n in skipped:
            continue
        est = _estimate_time(n, runs)
        remaining = None if deadline is None else deadline - time.time()
        if est is not None and remaining is not None and runs and est > remaining:
            if rep == 0:
                skipped[n] = (f"estimated {est:.0f} s for one run > {max(remaining, 0):.0f} s left "
                              "in the time budget")
            log(f"preprocessing: skip {n} events (rep {rep + 1}): estimated {est:.0f} s, "
                f"{max(remaining, 0):.0f} s left")
            continue
        est_rss, avail = _estimate_rss(n, runs), mem_available_mib()
        if est_rss is not None and avail is not None and est_rss > 0.8 * avail:
            if rep == 0:
                skipped[n] = (f"estimated peak RSS {est_rss:.0f} MiB > 80 % of the "
                              f"{avail:.0f} MiB available")
            continue
        syn = synthetic_spec(n, p)
        data_dir = os.path.join(work, "preprocess", f"data-{n}")
        gen_s.setdefault(n, generate_synthetic(syn, data_dir))
        out_dir = os.path.join(work, "preprocess", f"artifacts-{n}")
        overrides = synthetic_overrides(f"bench-{n}", data_dir, os.path.join(work, "preprocess"),
                                         syn)
        log(f"preprocessing: {n} events, run {rep + 1}"
            + (f" (estimated {est:.0f} s)" if est else ""))
        try:
            res = run_child("preprocess", {"config": cfg_path, "overrides": overrides,
                                           "data_dir": data_dir, "out_dir": out_dir},
                            os.path.join(work, f"preprocess-{n}-{rep}.log"))
        except RuntimeError as err:  # e.g. killed for memory: keep the other sizes
            first = str(err).splitlines()[0]
            log(f"preprocessing: {n} events, run {rep + 1} failed: {first}")
            failed.append({"target_events": n, "run": rep + 1, "error": str(err)[-2000:]})
            if n not in runs:
                skipped[n] = f"the run failed ({first})"
            shutil.rmtree(out_dir, ignore_errors=True)
            continue
        res["loadavg_after"] = loadavg()
        log(f"preprocessing: {n} events in {res['wall_s']:.1f} s "
            f"({res['events'] / res['wall_s']:.0f} events/s), "
            f"peak RSS {res['peak_rss_mib']:.0f} MiB")
        runs.setdefault(n, []).append(res)
        shutil.rmtree(out_dir, ignore_errors=True)
    measured = sorted(runs)
    if not measured:
        raise RuntimeError("no preprocessing run fitted the budget")
    rows = []
    for n in measured:
        rs = runs[n]
        wall = median(r["wall_s"] for r in rs)
        rows.append({"target_events": n, "events": rs[0]["events"],
                     "users": synthetic_spec(n, p)["num_users"], "items": p["preprocess_items"],
                     "runs": len(rs), "wall_s": rounded(wall),
                     "wall_s_all": [rounded(r["wall_s"]) for r in rs],
                     "events_per_s": rounded(rs[0]["events"] / wall),
                     "peak_rss_mib": rounded(max(r["peak_rss_mib"] for r in rs)),
                     "generate_s": rounded(gen_s.get(n, 0.0)),
                     "co_occurrence_pairs": rs[0]["pairs"]})
    a, b = power_fit([r["events"] for r in rows], [r["wall_s"] for r in rows])
    extrap = []
    for n in sizes:
        if n in runs:
            continue
        t = _estimate_time(n, runs)
        extrap.append({"target_events": n, "estimated_wall_s": rounded(t),
                       "estimated_events_per_s": rounded(n / t),
                       "power_fit_wall_s": rounded(a * n ** b if b is not None else a * n),
                       "estimated_peak_rss_mib": rounded(_estimate_rss(n, runs)),
                       "why_not_run": skipped.get(n, "not run")})
    largest = rows[-1]
    rss_slope = affine = b_top = None
    if len(rows) >= 2:
        # t = start-up + events / rate: the start-up cost explains an exponent below 1.
        slope, icpt = np.polyfit([r["events"] for r in rows], [r["wall_s"] for r in rows], 1)
        affine = {"startup_s": rounded(icpt), "events_per_s_marginal": rounded(1.0 / slope)
                  if slope > 0 else None}
        _, b_top = power_fit([r["events"] for r in rows[-2:]], [r["wall_s"] for r in rows[-2:]])
        rss_slope = float(np.polyfit([r["events"] / 1e6 for r in rows],
                                     [r["peak_rss_mib"] for r in rows], 1)[0])
    headline = {"events_per_s_largest": largest["events_per_s"],
                "largest_events_run": largest["events"],
                "peak_rss_mib_largest": largest["peak_rss_mib"]}
    if b is not None:
        headline["scaling_exponent"] = rounded(b, 3)
    return {"runner": "DirectRunner (default options)",
            "config_preprocess": {k: getattr(cfg.preprocess, k) for k in
                                  ("split", "num_shards", "history_length",
                                   "max_pairs_per_click", "session_window_s")},
            "dataset": f"synthetic, {p['preprocess_items']} items, "
                       f"{p['events_per_user']} events per user on average",
            "sizes": rows, "extrapolated": extrap, "failed_runs": failed,
            "fit": {"a": a, "exponent": rounded(b, 3) if b is not None else None,
                    "points": len(rows),
                    "exponent_two_largest": rounded(b_top, 3) if b_top is not None else None,
                    "affine": affine},
            "peak_rss_mib_per_million_events": rounded(rss_slope),
            "headline": headline}

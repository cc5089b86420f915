"""Benchmarks: ``python -m micrec_tf.bench --config configs/ml-1m.yaml`` (``make bench``).

Runs a fixed suite and writes ``docs/BENCHMARKS.md`` (machine, versions, date, commit, every figure
with what it is the median of) and ``docs/benchmarks.json``. ``BENCH_QUICK=1`` (or ``--quick``)
runs the same code on tiny sizes in about a minute and writes to ``--out`` (default
``$TMPDIR/micrec-bench-quick``, never ``docs/``): it is the smoke test of tests/test_bench.py.

Sections (each figure a median of several repeats; figures that compare two things are measured
side by side in the same run, interleaved):

``preprocessing``
    The Beam job (pipelines/preprocess.py, DirectRunner, the config's ``preprocess`` settings) on
    synthetic logs of growing size (default 0.3 M, 1 M, 3 M, 10 M events; a catalogue of 20 000
    items, 40 events per user). Each run is a child process: wall time of ``preprocess.run`` (data
    generation excluded), events/s, peak RSS from ``os.wait4``'s rusage of that child. Scaling
    exponent = slope of log(time) vs log(events) (least squares over the per-size medians). Runs
    that would not fit the time budget (``--budget-min``, estimated from the fit) or memory are
    skipped and their time extrapolated from the fit, marked as such.
``training``
    Steady-state training step time of the base ICAN model (``cl: []``) and of MicRec (all three
    CL terms) on the config's artifacts (``artifacts/<name>``, with title neighbours; otherwise a
    synthetic fallback, stated in the output): the same fixed batches held in memory (input
    pipeline excluded), the compiled Keras train function, warm-up steps first, then rounds that
    alternate the models (ABBA). Ratio MicRec/base per round, median over rounds. With
    ``--train-breakdown``, one-CL-term variants too, to attribute the overhead.
``title_encoding``
    Titles/s of :class:`micrec_tf.text.encoder.TitleEncoder` (all-MiniLM-L6-v2, the encoder of the
    title-neighbour job) on the artifacts' titles, after one warm-up pass.
``retrieval``
    1 M x 64 clustered synthetic item vectors (1 000 gaussian clusters of lognormal sizes, noise
    as large as the centres so clusters overlap, varying norms; queries from the same mixture):
    brute force (numpy product + argpartition,
    export.item_index.search_brute_force) vs ScaNN (tree + AH + exact reordering), top-500: build
    time, QPS at batch 1 and 256, recall@500 against the exact top 500. The ScaNN query-time
    parameters (leaves to search, reorder candidates) are tuned on a grid over separate tuning
    queries; the pick is the fastest setting with recall >= 0.95 there, then measured on the
    evaluation queries.
``serving``
    The user tower SavedModel as export/serving.py writes it (signature ``serving_default``, raw
    string features), loaded with ``tf.saved_model.load`` in a fresh process as TF Serving loads it:
    latency p50/p99 of single requests, throughput at batch 64 (requests from real test users).
``gpu``
    Training examples/s on GPU, float32 and mixed precision, when TensorFlow sees a GPU; otherwise
    marked not measured.

Runtime on 2 cores: about 4-5 min for training, serving, title encoding and retrieval, then the
preprocessing runs (passes over the sizes: 0.3 M, 1 M, 3 M, 10 M once, then the repeats) until the
budget (``--budget-min``, default 27 min for the whole suite) would be exceeded; a run whose
estimated time does not fit, or whose estimated peak RSS exceeds 80 % of the available memory
(10 M events on DirectRunner needs ~17 GB), is skipped and reported as extrapolated.
``--preprocess-sizes 1e6,3e6,1e7 --preprocess-repeats 3,2,1`` (or ``BENCH_PREPROCESS_SIZES`` /
``BENCH_PREPROCESS_REPEATS``) change the plan; ``--sections`` runs a subset.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

import micrec_tf  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow is imported)
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTIONS = ("training", "serving", "title_encoding", "retrieval", "preprocessing")
ALL_CL = ["feature", "semantic", "session"]
NO_GPU_TEXT = "not measured: no GPU machine was lent to this task"

# Sizes of the full suite (make bench) and of the smoke run (BENCH_QUICK=1).
FULL = {
    "preprocess_sizes": [300_000, 1_000_000, 3_000_000, 10_000_000],
    "preprocess_repeats": [3, 3, 3, 1],
    "preprocess_items": 20_000,
    "events_per_user": 40,
    "train_batches": 8,
    "train_warmup": 3,
    "train_rounds": 5,
    "train_steps": 3,
    "train_breakdown": False,
    "train_overrides": {},
    "fallback_events": 200_000,
    "title_count": 1024,
    "title_repeats": 3,
    "retrieval_items": 1_000_000,
    "retrieval_clusters": 1000,
    "retrieval_dim": 64,
    "retrieval_k": 500,
    "retrieval_queries": 1024,
    "retrieval_single_queries": 100,
    "retrieval_bf_single_queries": 30,
    "retrieval_batch": 256,
    "retrieval_spread": 1.0,
    "retrieval_leaves": 2000,
    "retrieval_grid_leaves": [20, 40, 80, 160, 320, 640],
    "retrieval_grid_reorder": [1000, 2000, 4000],
    "serving_single": 500,
    "serving_batch_calls": 40,
    "serving_repeats": 3,
    "budget_min": 27.0,
}
QUICK = {
    "preprocess_sizes": [4_000, 12_000],
    "preprocess_repeats": [1, 1],
    "preprocess_items": 500,
    "events_per_user": 40,
    "train_batches": 2,
    "train_warmup": 1,
    "train_rounds": 2,
    "train_steps": 2,
    "train_breakdown": False,
    "train_overrides": {"train.batch_size": 128, "loss.num_negatives": 64,
                        "loss.num_cl_negatives": 16},
    "fallback_events": 8_000,
    "title_count": 24,
    "title_repeats": 2,
    "retrieval_items": 20_000,
    "retrieval_clusters": 40,
    "retrieval_dim": 64,
    "retrieval_k": 500,
    "retrieval_queries": 128,
    "retrieval_single_queries": 10,
    "retrieval_bf_single_queries": 5,
    "retrieval_batch": 64,
    "retrieval_spread": 1.0,
    "retrieval_leaves": 100,
    "retrieval_grid_leaves": [10, 30],
    "retrieval_grid_reorder": [1000],
    "serving_single": 30,
    "serving_batch_calls": 5,
    "serving_repeats": 2,
    "budget_min": 10.0,
}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _median(xs):
    xs = [float(x) for x in xs]
    return float(statistics.median(xs)) if xs else float("nan")


def _round(x, digits=4):
    if x is None:
        return None
    x = float(x)
    if not math.isfinite(x):
        return None
    if x == 0:
        return 0.0
    return float(f"{x:.{digits}g}")


def _loadavg():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# ============================================================================ machine
# CPU flags that decide TensorFlow's kernel speed (oneDNN picks its code path from them).
_PERF_FLAGS = re.compile(r"^(avx\w*|fma\w*|amx\w*|sse4_2|f16c)$")


def machine_info() -> dict:
    cpu, flags = None, None  # of the first processor listed
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and cpu is None:
                    cpu = value.strip()
                elif key.strip() == "flags" and flags is None:
                    flags = sorted(f for f in value.split() if _PERF_FLAGS.match(f))
    except OSError:
        pass
    cpu, flags = cpu or platform.processor() or platform.machine(), flags or []
    ram_gib = None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    ram_gib = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    versions = {"python": platform.python_version(), "numpy": np.__version__}
    from importlib import metadata
    for label, dist in (("tensorflow", "tensorflow"), ("tf_keras", "tf-keras"),
                        ("apache_beam", "apache-beam"), ("scann", "scann")):
        try:
            versions[label] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[label] = "not installed"
    commit, dirty = "unknown", None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, timeout=10).stdout.strip() or "unknown"
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                cwd=ROOT, capture_output=True, text=True, timeout=10).stdout
        dirty = bool(status.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return {"cpu": cpu, "cpu_flags": flags, "cores": cores, "ram_gib": ram_gib,
            "os": platform.platform(),
            "versions": versions, "git_commit": commit, "git_dirty": dirty,
            "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")}


def _mem_available_mib() -> float | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


# ============================================================================ child processes
def _child_cmd(kind: str, args: dict) -> list:
    return [sys.executable, "-m", "micrec_tf.bench", "--child", kind, "--child-args",
            json.dumps(args)]


def run_child(kind: str, args: dict, log_path: str, timeout_s: float | None = None) -> dict:
    """Runs ``kind`` in a fresh interpreter; returns its JSON result plus ``peak_rss_mib`` and
    ``child_wall_s`` (rusage of exactly that child, from ``os.wait4``)."""
    out_json = log_path + ".json"
    if os.path.exists(out_json):
        os.remove(out_json)
    args = dict(args, out_json=out_json)
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    start = time.perf_counter()
    with open(log_path, "w") as fh:
        proc = subprocess.Popen(_child_cmd(kind, args), cwd=ROOT, stdout=fh,
                                stderr=subprocess.STDOUT, env=env)
        deadline = None if timeout_s is None else start + timeout_s
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if deadline is not None and time.perf_counter() > deadline:
                proc.kill()
                _, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.05)
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if proc.returncode != 0 or not os.path.exists(out_json):
        with open(log_path, errors="replace") as fh:
            tail = fh.read()[-4000:]
        raise RuntimeError(f"benchmark child {kind!r} failed (exit {proc.returncode}):\n{tail}")
    with open(out_json) as fh:
        result = json.load(fh)
    result["peak_rss_mib"] = usage.ru_maxrss / 1024.0  # Linux: kilobytes
    result["child_wall_s"] = wall
    return result


def _child_main(kind: str, args: dict) -> int:
    if kind == "preprocess":
        result = _child_preprocess(args)
    elif kind == "serve":
        result = _child_serve(args)
    else:
        raise SystemExit(f"unknown child kind {kind!r}")
    with open(args["out_json"], "w") as fh:
        json.dump(result, fh)
    return 0


# ============================================================================ 1. preprocessing
def synthetic_spec(num_events: int, p: dict) -> dict:
    return {"num_events": int(num_events),
            "num_users": max(50, int(num_events) // p["events_per_user"]),
            "num_items": int(p["preprocess_items"]), "num_topics": 20, "seed": 7}


def _synthetic_overrides(name: str, data_dir: str, artifacts_root: str, syn: dict) -> dict:
    out = {"name": name, "artifacts_root": artifacts_root, "data.dataset": "synthetic",
           "data.data_dir": data_dir}
    out.update({f"data.synthetic.{k}": v for k, v in syn.items()})
    return out


def _child_preprocess(args: dict) -> dict:
    from micrec_tf.config import load_config
    from pipelines import preprocess

    cfg = load_config(args["config"], args["overrides"])
    start = time.perf_counter()
    stats = preprocess.run(cfg, data_dir=args["data_dir"], out_dir=args["out_dir"], verbose=False)
    wall = time.perf_counter() - start
    return {"wall_s": wall, "events": int(stats["events"]),
            "num_examples": sum(stats["num_examples"].values()),
            "pairs": int(stats.get("pairs", 0)), "job_timing": stats.get("timing")}


def _generate(syn: dict, data_dir: str) -> float:
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
    meds = [_median(r["wall_s"] for r in runs[s]) for s in sizes]
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
        est_rss, avail = _estimate_rss(n, runs), _mem_available_mib()
        if est_rss is not None and avail is not None and est_rss > 0.8 * avail:
            if rep == 0:
                skipped[n] = (f"estimated peak RSS {est_rss:.0f} MiB > 80 % of the "
                              f"{avail:.0f} MiB available")
            continue
        syn = synthetic_spec(n, p)
        data_dir = os.path.join(work, "preprocess", f"data-{n}")
        gen_s.setdefault(n, _generate(syn, data_dir))
        out_dir = os.path.join(work, "preprocess", f"artifacts-{n}")
        overrides = _synthetic_overrides(f"bench-{n}", data_dir, os.path.join(work, "preprocess"),
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
        res["loadavg_after"] = _loadavg()
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
        wall = _median(r["wall_s"] for r in rs)
        rows.append({"target_events": n, "events": rs[0]["events"],
                     "users": synthetic_spec(n, p)["num_users"], "items": p["preprocess_items"],
                     "runs": len(rs), "wall_s": _round(wall),
                     "wall_s_all": [_round(r["wall_s"]) for r in rs],
                     "events_per_s": _round(rs[0]["events"] / wall),
                     "peak_rss_mib": _round(max(r["peak_rss_mib"] for r in rs)),
                     "generate_s": _round(gen_s.get(n, 0.0)),
                     "co_occurrence_pairs": rs[0]["pairs"]})
    a, b = power_fit([r["events"] for r in rows], [r["wall_s"] for r in rows])
    extrap = []
    for n in sizes:
        if n in runs:
            continue
        t = _estimate_time(n, runs)
        extrap.append({"target_events": n, "estimated_wall_s": _round(t),
                       "estimated_events_per_s": _round(n / t),
                       "power_fit_wall_s": _round(a * n ** b if b is not None else a * n),
                       "estimated_peak_rss_mib": _round(_estimate_rss(n, runs)),
                       "why_not_run": skipped.get(n, "not run")})
    largest = rows[-1]
    rss_slope = affine = b_top = None
    if len(rows) >= 2:
        # t = start-up + events / rate: the start-up cost explains an exponent below 1.
        slope, icpt = np.polyfit([r["events"] for r in rows], [r["wall_s"] for r in rows], 1)
        affine = {"startup_s": _round(icpt), "events_per_s_marginal": _round(1.0 / slope)
                  if slope > 0 else None}
        _, b_top = power_fit([r["events"] for r in rows[-2:]], [r["wall_s"] for r in rows[-2:]])
        rss_slope = float(np.polyfit([r["events"] / 1e6 for r in rows],
                                     [r["peak_rss_mib"] for r in rows], 1)[0])
    headline = {"events_per_s_largest": largest["events_per_s"],
                "largest_events_run": largest["events"],
                "peak_rss_mib_largest": largest["peak_rss_mib"]}
    if b is not None:
        headline["scaling_exponent"] = _round(b, 3)
    return {"runner": "DirectRunner (default options)",
            "config_preprocess": {k: getattr(cfg.preprocess, k) for k in
                                  ("split", "num_shards", "history_length",
                                   "max_pairs_per_click", "session_window_s")},
            "dataset": f"synthetic, {p['preprocess_items']} items, "
                       f"{p['events_per_user']} events per user on average",
            "sizes": rows, "extrapolated": extrap, "failed_runs": failed,
            "fit": {"a": a, "exponent": _round(b, 3) if b is not None else None,
                    "points": len(rows),
                    "exponent_two_largest": _round(b_top, 3) if b_top is not None else None,
                    "affine": affine},
            "peak_rss_mib_per_million_events": _round(rss_slope),
            "headline": headline}


# ============================================================================ 2. training
def training_artifacts(cfg_path: str, cfg, p: dict, work: str) -> tuple:
    """``(artifacts_dir, description)``: the config's artifacts when complete, else synthetic."""
    from micrec_tf.data.artifacts import TITLE_NEIGHBOURS
    path = cfg.artifacts_dir
    if not os.path.isabs(path):
        path = os.path.join(ROOT, path)
    need_titles = "semantic" in ALL_CL
    complete = (os.path.exists(os.path.join(path, "stats.json"))
                and os.path.exists(os.path.join(path, "examples", "feature_spec.json"))
                and (not need_titles or os.path.exists(os.path.join(path, TITLE_NEIGHBOURS))))
    if complete:
        return path, f"{cfg.artifacts_dir} (the config's artifacts)", False
    why = ("missing" if not os.path.exists(os.path.join(path, "stats.json"))
           else "without title neighbours")
    n = int(p["fallback_events"])
    syn = synthetic_spec(n, dict(p, preprocess_items=max(500, min(5000, n // 40))))
    data_dir = os.path.join(work, "fallback", "data")
    _generate(syn, data_dir)
    overrides = _synthetic_overrides("fallback", data_dir, os.path.join(work, "fallback"), syn)
    out_dir = os.path.join(work, "fallback", "artifacts")
    log(f"training: {cfg.artifacts_dir} {why}; preprocessing a synthetic fallback ({n} events)")
    run_child("preprocess", {"config": cfg_path, "overrides": overrides, "data_dir": data_dir,
                             "out_dir": out_dir}, os.path.join(work, "fallback-preprocess.log"))
    from micrec_tf.config import load_config
    from pipelines import title_neighbours
    tcfg = load_config(cfg_path, dict(overrides, **{"semantic.source": "taxonomy"}))
    title_neighbours.run(tcfg, artifacts_dir=out_dir, verbose=False)
    desc = (f"synthetic fallback ({n} events, {syn['num_items']} items; semantic neighbours from "
            f"tags) because {cfg.artifacts_dir} is {why}")
    return out_dir, desc, True


def _fixed_batches(art_dir: str, batch_size: int, count: int, seed: int):
    import tensorflow as tf
    from micrec_tf.data.input import make_dataset

    ds = make_dataset(art_dir, "train", batch_size, shuffle=True, seed=seed, repeat=True,
                      drop_remainder=True, shuffle_buffer=20_000)
    batches = list(ds.take(count))
    stacked = {k: tf.stack([b[k] for b in batches]) for k in batches[0]}
    return tf.data.Dataset.from_tensor_slices(stacked).repeat().prefetch(2)


# The pre-0.2 user-tower code paths (per-slot history embeddings, einsum attention), kept
# selectable so that every run times them beside today's defaults.
OLD_PATHS = {"model.history_embeddings": "slots", "model.attention": "einsum"}


def _train_variants(breakdown: bool) -> dict:
    """``{name: (CL terms, config overrides)}``; ``<name>_old`` runs the old code paths."""
    v = {"base": ([], {}), "micrec": (list(ALL_CL), {}),
         "base_old": ([], OLD_PATHS), "micrec_old": (list(ALL_CL), OLD_PATHS)}
    if breakdown:
        v.update({f"only_{t}": ([t], {}) for t in ALL_CL})
    return v


def bench_training_models(cfg, art, art_dir: str, p: dict, keep_alive: list,
                          precision: str = "float32") -> tuple:
    """Times the training step of every variant; the models, their traced train functions, their
    iterators and the data are appended to ``keep_alive``, a list owned by the benchmark run."""
    import tf_keras
    from micrec_tf.model import build_model

    tf_keras.mixed_precision.set_global_policy(precision)
    batch = int(cfg.train.batch_size)
    data = _fixed_batches(art_dir, batch, p["train_batches"], cfg.train.seed)
    variants = _train_variants(p["train_breakdown"])
    models, fns, iters, build_s, warm_s, losses = {}, {}, {}, {}, {}, {}
    for name, (cl, paths) in variants.items():
        tf_keras.utils.set_random_seed(cfg.train.seed)
        c = cfg.replace({"model.cl": cl, **paths})
        t0 = time.perf_counter()
        m = build_model(c, art.item_table, art.vocab_sizes, art.user_fields, art.cooccurrence,
                        art.title_neighbours)
        m.compile(optimizer=tf_keras.optimizers.Adam(c.train.learning_rate))
        fns[name], iters[name], models[name] = m.make_train_function(), iter(data), m
        build_s[name] = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(p["train_warmup"]):
            logs = fns[name](iters[name])
        float(logs["loss"])
        warm_s[name] = time.perf_counter() - t0
        losses[name] = sorted(logs)
        log(f"training[{precision}]: {name} built in {build_s[name]:.1f} s, "
            f"{p['train_warmup']} warm-up steps (incl. tracing) {warm_s[name]:.1f} s")
    names = list(variants)
    # One more untimed step each, round-robin: the first step after another model ran is slower.
    for name in names:
        float(fns[name](iters[name])["loss"])
    per_round = {n: [] for n in names}
    for r in range(p["train_rounds"]):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            times = []
            for _ in range(p["train_steps"]):
                t0 = time.perf_counter()
                logs = fns[name](iters[name])
                float(logs["loss"])
                times.append(time.perf_counter() - t0)
            per_round[name].append(_median(times))
        log(f"training[{precision}]: round {r + 1}: " + ", ".join(
            f"{n} {per_round[n][-1] * 1000:.0f} ms" for n in names))
    tf_keras.mixed_precision.set_global_policy("float32")
    # Releasing traced train functions costs TF tens of seconds; the run keeps them until its report
    # is written, so that the cost never falls inside a timed section.
    keep_alive.append((models, fns, iters, data))
    out = {}
    for name in names:
        step = _median(per_round[name])
        out[name] = {"cl": variants[name][0], "code_paths": "old" if variants[name][1] else "new",
                     "losses": losses[name],
                     "step_ms": _round(step * 1000),
                     "step_ms_per_round": [_round(x * 1000) for x in per_round[name]],
                     "examples_per_s": _round(batch / step),
                     "build_s": _round(build_s[name]), "warmup_s": _round(warm_s[name])}
    ratios = {name: [a / b for a, b in zip(per_round[name], per_round["base"])]
              for name in names if name != "base"}
    # Today's code paths over the old ones, same model, per round (one number per model).
    for name in ("base", "micrec"):
        ratios[f"{name}_new_over_old"] = [
            a / b for a, b in zip(per_round[name], per_round[f"{name}_old"])]
    return out, {n: _round(_median(r), 4) for n, r in ratios.items()}, \
        {n: [_round(x, 4) for x in r] for n, r in ratios.items()}, models["micrec"]


def bench_training(cfg_path, cfg, p, work, state) -> dict:
    import tensorflow as tf
    from micrec_tf.data.artifacts import load_artifacts

    if p["train_overrides"]:
        cfg = cfg.replace(p["train_overrides"])
    art_dir, desc, fallback = training_artifacts(cfg_path, cfg, p, work)
    art = load_artifacts(art_dir)
    gpus = tf.config.list_physical_devices("GPU")
    device = ("GPU: " + ", ".join(
        tf.config.experimental.get_device_details(g).get("device_name", g.name) for g in gpus)
        if gpus else "CPU")
    models, ratio, ratio_rounds, micrec = bench_training_models(cfg, art, art_dir, p,
                                                                state["keep_alive"])
    state.update(model=micrec, art=art, cfg=cfg)
    n_train = art.feature_spec.get("num_examples", {}).get("train")
    result = {
        "artifacts": desc, "fallback": fallback, "device": device,
        "batch_size": int(cfg.train.batch_size),
        "num_negatives": int(cfg.loss.num_negatives),
        "train_examples": n_train,
        "method": (f"{p['train_batches']} fixed training batches in memory, compiled Keras train "
                   f"function, {p['train_warmup']} warm-up steps per model (+1 round-robin), then "
                   f"{p['train_rounds']} rounds x {p['train_steps']} steps per model, models "
                   "alternated (ABBA); step time = median over rounds of the per-round median"),
        "models": models,
        "ratio_micrec_over_base": ratio["micrec"],
        "ratio_per_round": ratio_rounds["micrec"],
        "ratios_vs_base": {k: v for k, v in ratio.items() if not k.endswith("_new_over_old")},
        "new_over_old": {k: ratio[f"{k}_new_over_old"] for k in ("base", "micrec")},
        "new_over_old_per_round": {k: ratio_rounds[f"{k}_new_over_old"]
                                   for k in ("base", "micrec")},
        "headline": {"base_examples_per_s": models["base"]["examples_per_s"],
                     "micrec_examples_per_s": models["micrec"]["examples_per_s"],
                     "ratio_micrec_over_base": ratio["micrec"],
                     "base_step_new_over_old": ratio["base_new_over_old"],
                     "micrec_step_new_over_old": ratio["micrec_new_over_old"]},
    }
    if gpus:
        try:
            mp, mp_ratio, _, _ = bench_training_models(
                cfg, art, art_dir, dict(p, train_breakdown=False), state["keep_alive"],
                "mixed_float16")
            result["gpu"] = {"device": device,
                             "float32": {k: models[k] for k in ("base", "micrec")},
                             "mixed_float16": mp, "ratio_mixed": mp_ratio}
        except Exception as err:  # noqa: BLE001
            result["gpu"] = {"device": device, "error": repr(err)}
    return result


# ============================================================================ 3. title encoding
def bench_title_encoding(cfg, p, state) -> dict:
    from micrec_tf.data.artifacts import ITEMS
    from micrec_tf.text.encoder import TitleEncoder

    titles, source = [], None
    art_dir = None
    art = state.get("art")
    if art is not None:
        art_dir = art.path
    else:
        cand = cfg.artifacts_dir if os.path.isabs(cfg.artifacts_dir) else os.path.join(
            ROOT, cfg.artifacts_dir)
        art_dir = cand if os.path.exists(os.path.join(cand, ITEMS)) else None
    if art_dir:
        with open(os.path.join(art_dir, ITEMS), encoding="utf-8") as fh:
            titles = [t for t in (json.loads(line).get("title") for line in fh if line.strip())
                      if t and t.strip()]
        shown = os.path.relpath(art_dir, ROOT) if art_dir.startswith(ROOT) else art_dir
        source = f"titles of {shown}"
    if not titles:
        from micrec_tf.data.synthetic import GENERIC_WORDS, THEMES
        rng = np.random.default_rng(0)
        words = [w for _, ws in THEMES for w in ws.split()] + list(GENERIC_WORDS)
        titles = [" ".join(rng.choice(words, rng.integers(3, 9))) for _ in range(2000)]
        source = "synthetic titles (3-8 topic words)"
    pattern = getattr(cfg.semantic, "title_strip_pattern", "") or ""
    if pattern:
        titles = [re.sub(pattern, "", t) for t in titles]
    count = min(int(p["title_count"]), len(titles))
    titles = titles[:count]
    t0 = time.perf_counter()
    enc = TitleEncoder(max_length=cfg.semantic.max_length)
    load_s = time.perf_counter() - t0
    bs = int(cfg.semantic.batch_size)
    t0 = time.perf_counter()
    enc.encode(titles, batch_size=bs)  # warm-up: traces every length bucket
    warm_s = time.perf_counter() - t0
    times = []
    for _ in range(p["title_repeats"]):
        t0 = time.perf_counter()
        enc.encode(titles, batch_size=bs)
        times.append(time.perf_counter() - t0)
    tokens = [len(r) for r in enc.token_ids(titles)]
    t = _median(times)
    return {"titles": count, "source": source, "batch_size": bs,
            "max_length": int(cfg.semantic.max_length),
            "mean_tokens": _round(float(np.mean(tokens))), "load_s": _round(load_s),
            "warmup_s": _round(warm_s), "seconds_all": [_round(x) for x in times],
            "titles_per_s": _round(count / t),
            "headline": {"titles_per_s": _round(count / t)}}


# ============================================================================ 4. retrieval
def clustered_vectors(n: int, d: int, clusters: int, seed: int, centers=None, weights=None,
                      spread: float = 1.0):
    """``n`` x ``d`` float32 vectors from a gaussian mixture: unit-norm centres, lognormal cluster
    sizes, isotropic noise of expected norm ``spread``, norms scaled by lognormal(0, 0.2)."""
    rng = np.random.default_rng(seed)
    if centers is None:
        crng = np.random.default_rng(1234)
        centers = crng.standard_normal((clusters, d)).astype(np.float32)
        centers /= np.linalg.norm(centers, axis=1, keepdims=True)
        weights = crng.lognormal(0.0, 1.0, clusters)
        weights /= weights.sum()
    out = np.empty((n, d), np.float32)
    chunk = 131072
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        a = rng.choice(len(centers), m, p=weights)
        v = centers[a] + (spread / math.sqrt(d)) * rng.standard_normal((m, d)).astype(np.float32)
        v *= rng.lognormal(0.0, 0.2, (m, 1)).astype(np.float32)
        out[s:s + m] = v
    return out, centers, weights


def _recall(approx: np.ndarray, exact: np.ndarray) -> float:
    from export.item_index import recall_at_k
    return recall_at_k(approx, exact)


def bench_retrieval(p) -> dict:
    from export import item_index

    n, d, k = p["retrieval_items"], p["retrieval_dim"], p["retrieval_k"]
    bsz, nq, spread = p["retrieval_batch"], p["retrieval_queries"], p["retrieval_spread"]
    clusters = p["retrieval_clusters"]
    n_tune = min(256, nq)
    t0 = time.perf_counter()
    items, centers, weights = clustered_vectors(n, d, clusters, seed=1, spread=spread)
    queries, _, _ = clustered_vectors(nq, d, clusters, seed=2, centers=centers, weights=weights,
                                      spread=spread)
    tune_q, _, _ = clustered_vectors(n_tune, d, clusters, seed=3, centers=centers,
                                     weights=weights, spread=spread)
    log(f"retrieval: {n} x {d} vectors generated in {time.perf_counter() - t0:.1f} s")

    # Brute force at batch `bsz`: every batch of the evaluation queries timed; the results are
    # the exact top k. Batch 1: the first queries one by one.
    exact, bf_batch_s = [], []
    for s in range(0, nq, bsz):
        t0 = time.perf_counter()
        rows, _ = item_index.search_brute_force(items, queries[s:s + bsz], k, batch_size=64)
        bf_batch_s.append(time.perf_counter() - t0)
        exact.append(rows)
    exact = np.concatenate(exact)
    tune_exact, _ = item_index.search_brute_force(items, tune_q, k, batch_size=64)
    bf_single = []
    for q in queries[:p["retrieval_bf_single_queries"]]:
        t0 = time.perf_counter()
        item_index.search_brute_force(items, q[None], k)
        bf_single.append(time.perf_counter() - t0)
    bf = {"qps_batch1": _round(1.0 / _median(bf_single)),
          "latency_ms_batch1_p50": _round(1000 * _median(bf_single)),
          f"qps_batch{bsz}": _round(bsz / _median(bf_batch_s)),
          "batches_timed": len(bf_batch_s), "single_queries_timed": len(bf_single)}
    log(f"retrieval: brute force {bf['qps_batch1']} QPS (batch 1), "
        f"{bf[f'qps_batch{bsz}']} QPS (batch {bsz})")
    # How clustered the neighbourhoods are: share of a query's exact top k in its largest cluster.
    own = []
    for row in exact[:64]:
        nearest = np.argmax(items[row] @ centers.T, axis=1)
        own.append(np.bincount(nearest).max() / len(row))

    # ScaNN: one build (tree + AH + reorder); the query-time parameters (leaves to search,
    # reorder candidates) are tuned on held-out tuning queries, then measured on the others.
    default = item_index.scann_params(n, k)
    leaves = int(p["retrieval_leaves"])
    params = dict(default, mode="tree_ah", num_leaves=leaves,
                  num_leaves_to_search=max(1, leaves // 40),
                  training_sample_size=int(min(n, 250_000)))
    t0 = time.perf_counter()
    searcher = item_index.build_scann(items, params)
    build_s = time.perf_counter() - t0
    log(f"retrieval: ScaNN built in {build_s:.1f} s ({leaves} leaves)")

    def single_latency(qs, lv, ro):
        lat = []
        for q in qs:
            t0 = time.perf_counter()
            searcher.search(q, final_num_neighbors=k, pre_reorder_num_neighbors=ro,
                            leaves_to_search=lv)
            lat.append(time.perf_counter() - t0)
        return lat

    grid = []
    for lv in [x for x in p["retrieval_grid_leaves"] if x <= leaves]:
        for ro in p["retrieval_grid_reorder"]:
            rows, _ = searcher.search_batched_parallel(tune_q, final_num_neighbors=k,
                                                       pre_reorder_num_neighbors=ro,
                                                       leaves_to_search=lv)
            rec = _recall(np.asarray(rows), tune_exact)
            lat = _median(single_latency(tune_q[:30], lv, ro))
            grid.append({"leaves_to_search": lv, "reorder": ro, "recall_tuning": _round(rec),
                         "qps_batch1": _round(1.0 / lat)})
            log(f"retrieval: ScaNN leaves_to_search={lv} reorder={ro}: recall {rec:.4f} "
                f"(tuning queries), {1.0 / lat:.0f} QPS (batch 1)")
    ok = [g for g in grid if g["recall_tuning"] >= 0.95]
    pick = (max(ok, key=lambda g: g["qps_batch1"]) if ok
            else max(grid, key=lambda g: g["recall_tuning"]))
    lv, ro = pick["leaves_to_search"], pick["reorder"]
    # The picked setting, measured on the evaluation queries.
    rows, _ = searcher.search_batched_parallel(queries, final_num_neighbors=k,
                                               pre_reorder_num_neighbors=ro, leaves_to_search=lv)
    recall = _recall(np.asarray(rows), exact)
    single = single_latency(queries[:p["retrieval_single_queries"]], lv, ro)
    batch_s, batch_s_1t = [], []
    for s in range(0, nq, bsz):
        t0 = time.perf_counter()
        searcher.search_batched_parallel(queries[s:s + bsz], final_num_neighbors=k,
                                         pre_reorder_num_neighbors=ro, leaves_to_search=lv)
        batch_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        searcher.search_batched(queries[s:s + bsz], final_num_neighbors=k,
                                pre_reorder_num_neighbors=ro, leaves_to_search=lv)
        batch_s_1t.append(time.perf_counter() - t0)
    sc = {"num_leaves": leaves, "training_sample_size": params["training_sample_size"],
          "dimensions_per_block": params["dimensions_per_block"],
          "anisotropic_quantization_threshold": params["anisotropic_quantization_threshold"],
          "leaves_to_search": lv, "reorder": ro, "build_s": _round(build_s),
          "recall_at_k": _round(recall), "recall_at_k_tuning": pick["recall_tuning"],
          "qps_batch1": _round(1.0 / _median(single)),
          "latency_ms_batch1_p50": _round(1000 * _median(single)),
          "latency_ms_batch1_p99": _round(1000 * float(np.percentile(single, 99))),
          f"qps_batch{bsz}": _round(bsz / _median(batch_s)),
          f"qps_batch{bsz}_one_thread": _round(bsz / _median(batch_s_1t)),
          "single_queries_timed": len(single), "batches_timed": len(batch_s)}
    speed1 = sc["qps_batch1"] / bf["qps_batch1"]
    speedb = sc[f"qps_batch{bsz}"] / bf[f"qps_batch{bsz}"]
    log(f"retrieval: ScaNN pick leaves_to_search={lv} reorder={ro}: recall {recall:.4f}, "
        f"{speed1:.1f}x (batch 1), {speedb:.1f}x (batch {bsz}) brute force")
    return {"items": n, "dim": d, "clusters": clusters, "k": k, "batch": bsz, "queries": nq,
            "tuning_queries": n_tune,
            "data": f"gaussian mixture: unit-norm centres, lognormal cluster sizes, isotropic "
                    f"noise of norm {spread}, vector norms x lognormal(0, 0.2); queries drawn "
                    "from the same mixture",
            "top_k_share_in_main_cluster": _round(float(np.mean(own))),
            "brute_force": bf, "scann": sc, "grid": grid,
            "export_default_params": {kk: default.get(kk) for kk in
                                      ("num_leaves", "num_leaves_to_search", "reorder_k")},
            "speedup_batch1": _round(speed1), f"speedup_batch{bsz}": _round(speedb),
            "headline": {"scann_recall_at_k": sc["recall_at_k"],
                         "scann_qps_batch1": sc["qps_batch1"],
                         f"scann_qps_batch{bsz}": sc[f"qps_batch{bsz}"],
                         "brute_force_qps_batch1": bf["qps_batch1"],
                         f"brute_force_qps_batch{bsz}": bf[f"qps_batch{bsz}"],
                         "scann_build_s": sc["build_s"],
                         "speedup_batch1": _round(speed1),
                         f"speedup_batch{bsz}": _round(speedb)}}


# ============================================================================ 5. serving
def _child_serve(args: dict) -> dict:
    import tensorflow as tf

    with open(args["requests"]) as fh:
        reqs = json.load(fh)
    fields, hist_key = args["fields"], args["history_input"]

    def columnar(rows):
        width = max([len(r[hist_key]) for r in rows] + [0])
        cols = {f: tf.constant([r[f] for r in rows], tf.string) for f in fields}
        cols[hist_key] = tf.constant([r[hist_key] + [""] * (width - len(r[hist_key]))
                                      for r in rows], tf.string, shape=[len(rows), width])
        return cols

    t0 = time.perf_counter()
    fn = tf.saved_model.load(args["model_dir"]).signatures["serving_default"]
    load_s = time.perf_counter() - t0
    singles = [columnar([r]) for r in reqs]
    bsz = int(args["batch"])
    batches = [columnar([reqs[(i * bsz + j) % len(reqs)] for j in range(bsz)])
               for i in range(max(1, len(reqs) // bsz))]
    t0 = time.perf_counter()
    first = fn(**singles[0])[args["output"]].numpy()
    first_s = time.perf_counter() - t0
    for i in range(20):
        fn(**singles[i % len(singles)])[args["output"]].numpy()
    for b in batches[:3]:
        fn(**b)[args["output"]].numpy()
    out = {"load_s": load_s, "first_call_s": first_s, "dim": int(first.shape[-1]),
           "threads": {"intra_op": tf.config.threading.get_intra_op_parallelism_threads(),
                       "inter_op": tf.config.threading.get_inter_op_parallelism_threads()},
           "repeats": []}
    for _ in range(int(args["repeats"])):
        lat = []
        for i in range(int(args["single"])):
            x = singles[i % len(singles)]
            t = time.perf_counter()
            fn(**x)[args["output"]].numpy()
            lat.append(time.perf_counter() - t)
        blat = []
        for i in range(int(args["batch_calls"])):
            x = batches[i % len(batches)]
            t = time.perf_counter()
            fn(**x)[args["output"]].numpy()
            blat.append(time.perf_counter() - t)
        lat, blat = np.asarray(lat), np.asarray(blat)
        out["repeats"].append({"p50_ms": float(np.percentile(lat, 50) * 1000),
                               "p99_ms": float(np.percentile(lat, 99) * 1000),
                               "mean_ms": float(lat.mean() * 1000),
                               "batch_p50_ms": float(np.percentile(blat, 50) * 1000),
                               "batch_examples_per_s": float(bsz / np.median(blat))})
    return out


def bench_serving(cfg_path, cfg, p, work, state) -> dict:
    from export import export_model, serving
    from micrec_tf.data.artifacts import load_artifacts

    model, art = state.get("model"), state.get("art")
    if model is None:
        import tf_keras
        from micrec_tf.model import build_model
        art_dir, desc, _ = training_artifacts(cfg_path, cfg, p, work)
        art = load_artifacts(art_dir)
        tf_keras.utils.set_random_seed(cfg.train.seed)
        model = build_model(cfg, art.item_table, art.vocab_sizes, art.user_fields,
                            art.cooccurrence, art.title_neighbours)
        weights = "untrained weights (latency does not depend on them)"
    else:
        weights = "the MicRec model of the training benchmark (a few steps trained)"
    history_length = int(art.feature_spec.get("history_length", cfg.preprocess.history_length))
    out_dir = os.path.join(work, "user_tower")
    shutil.rmtree(out_dir, ignore_errors=True)
    t0 = time.perf_counter()
    serving.save_user_tower(model, art.user_fields, export_model._vocab_files(art),
                            history_length, out_dir)
    save_s = time.perf_counter() - t0
    arrays, rows = export_model.sample_test_examples(art, max_rows=256)
    reqs = export_model.requests_from_arrays(arrays, rows, art)
    req_path = os.path.join(work, "serving_requests.json")
    with open(req_path, "w") as fh:
        json.dump(reqs, fh)
    bsz = 64
    res = run_child("serve", {"model_dir": out_dir, "requests": req_path,
                              "fields": list(art.user_fields),
                              "history_input": serving.HISTORY_INPUT,
                              "output": serving.OUTPUT_NAME, "batch": bsz,
                              "single": p["serving_single"],
                              "batch_calls": p["serving_batch_calls"],
                              "repeats": p["serving_repeats"]},
                    os.path.join(work, "serve.log"))
    reps = res["repeats"]
    med = {k: _median(r[k] for r in reps) for k in reps[0]}
    hist = [len(r[serving.HISTORY_INPUT]) for r in reqs]
    return {"model": f"user tower SavedModel of export/serving.py, {weights}",
            "artifacts": os.path.relpath(art.path, ROOT) if art.path.startswith(ROOT) else art.path,
            "requests": f"{len(reqs)} real test users (raw string features, "
                        f"history length mean {np.mean(hist):.1f})",
            "method": (f"fresh process, tf.saved_model.load, signature serving_default called "
                       f"with tf.string tensors built beforehand; {p['serving_single']} single "
                       f"requests and {p['serving_batch_calls']} calls at batch {bsz} per repeat, "
                       f"{p['serving_repeats']} repeats; figures are medians over repeats"),
            "save_s": _round(save_s), "load_s": _round(res["load_s"]),
            "first_call_ms": _round(res["first_call_s"] * 1000),
            "peak_rss_mib": _round(res["peak_rss_mib"]),
            "threads": res["threads"],
            "latency_ms_p50": _round(med["p50_ms"]), "latency_ms_p99": _round(med["p99_ms"]),
            "latency_ms_mean": _round(med["mean_ms"]),
            "batch": bsz, "batch_latency_ms_p50": _round(med["batch_p50_ms"]),
            "batch_examples_per_s": _round(med["batch_examples_per_s"]),
            "repeats": [{k: _round(v) for k, v in r.items()} for r in reps],
            "headline": {"latency_ms_p50": _round(med["p50_ms"]),
                         "latency_ms_p99": _round(med["p99_ms"]),
                         "batch64_examples_per_s": _round(med["batch_examples_per_s"])}}


# ============================================================================ targets
def evaluate_targets(res: dict, total_s: float, budget_min: float, quick: bool) -> list:
    out = []

    def add(name, target, value, met, why):
        out.append({"name": name, "target": target, "value": value,
                    "status": "not measured" if met is None else ("met" if met else "missed"),
                    "why": why})

    pre = res.get("preprocessing", {})
    b = (pre.get("fit") or {}).get("exponent")
    if b is None:
        add("preprocessing scaling", "time ~ events^b with b <= 1.1", None, None,
            "fewer than two sizes measured" if "error" not in pre else pre["error"][:200])
    else:
        sizes = ", ".join(f"{r['events']:,}" for r in pre["sizes"])
        b_top = pre["fit"].get("exponent_two_largest")
        why = (f"log-log fit over the measured sizes ({sizes} events); between the two largest "
               f"{b_top}; judged on the larger of the two")
        extra = [e for e in pre.get("extrapolated", [])]
        if extra:
            why += ("; " + ", ".join(f"{e['target_events']:,}" for e in extra)
                    + " events not run (extrapolated)")
        worst = max(b, b_top if b_top is not None else b)
        if worst > 1.1:
            why += ("; super-linear: per-event work grows with the log (shuffles / sorts "
                    "in the DirectRunner, larger per-user groups)")
        elif worst < 0.9:
            why += ("; sub-linear because the fixed start-up cost of the Beam job weighs more "
                    "on the smaller sizes")
        add("preprocessing scaling", "exponent <= 1.1", b, worst <= 1.1, why)

    tr = res.get("training", {})
    ratio = tr.get("ratio_micrec_over_base")
    if ratio is None:
        add("training overhead", "MicRec/base step time <= 1.3", None, None,
            tr.get("error", "not run")[:200])
    else:
        parts = tr.get("ratios_vs_base", {})
        detail = ", ".join(f"{k.replace('only_', '')} alone x{v}" for k, v in parts.items()
                           if k.startswith("only_"))
        why = f"median over {len(tr.get('ratio_per_round', []))} alternating rounds"
        if detail:
            why += f"; per CL term: {detail}"
        if ratio > 1.3:
            why += ("; the CL terms run extra tower passes per step (feature CL: the user and "
                    "item towers on two masked views; semantic and session CL: item-tower "
                    "passes over sampled neighbours and CL negatives), and on CPU that compute "
                    "is not hidden behind anything. The paper's < 2x is also met only if the "
                    "ratio is < 2")
        add("training overhead", "MicRec/base step time <= 1.3 (paper: < 2x)", ratio,
            ratio <= 1.3, why)
    for name, value in (tr.get("new_over_old") or {}).items():
        rounds = tr["new_over_old_per_round"][name]
        add(f"training speed-up ({name})", "step time of today's code paths <= 0.6 x the old "
            "paths' (history per slot, einsum attention)", value, value <= 0.6,
            f"median of {len(rounds)} per-round ratios {rounds}, both paths timed in the same "
            f"run on {tr.get('artifacts', 'the benchmark artifacts')}")

    rt = res.get("retrieval", {})
    if "scann" in rt:
        bsz = rt["batch"]
        rec = rt["scann"]["recall_at_k"]
        for label, sp in (("batch 1", rt["speedup_batch1"]),
                          (f"batch {bsz}", rt[f"speedup_batch{bsz}"])):
            met = rec >= 0.95 and sp >= 10
            why = (f"recall@{rt['k']} {rec} at {sp}x brute-force QPS "
                   f"(leaves_to_search {rt['scann']['leaves_to_search']} of "
                   f"{rt['scann']['num_leaves']}, reorder {rt['scann']['reorder']})")
            if not met:
                if rec < 0.95:
                    why += "; no grid setting reached recall 0.95"
                else:
                    why += ("; at this batch size brute force is one large matrix product "
                            "(BLAS, both cores) while ScaNN's per-query cost does not shrink "
                            "with the batch")
            add(f"retrieval {label}", "recall@500 >= 0.95 at >= 10x brute-force QPS",
                {"recall": rec, "speedup": sp}, met, why)
    else:
        add("retrieval", "recall@500 >= 0.95 at >= 10x brute-force QPS", None, None,
            rt.get("error", "not run")[:200])

    partial = [s for s in SECTIONS if s not in res]
    full = not quick and not partial
    add("bench runtime", f"make bench < 30 min on 2 cores (budget {budget_min:g} min)",
        round(total_s / 60, 2), (total_s < 30 * 60) if full else None,
        "quick mode: not the full suite" if quick else
        f"only some sections ran ({total_s / 60:.1f} min)" if partial else
        f"{total_s / 60:.1f} min wall for the whole suite")
    return out


# ============================================================================ report
def _fmt(x, unit=""):
    if x is None:
        return "n/a"
    if isinstance(x, float):
        if abs(x) >= 100:
            s = f"{x:,.0f}"
        elif abs(x) >= 10:
            s = f"{x:.1f}"
        else:
            s = f"{x:.3g}"
    elif isinstance(x, int):
        s = f"{x:,}"
    else:
        s = str(x)
    return s + unit


def _table(header, rows) -> list:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        cells = [str(c).replace("|", "\\|").replace("\n", " ") for c in r]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def render_markdown(res: dict) -> str:
    meta, mach = res["meta"], res["meta"]["machine"]
    v = mach["versions"]
    L = ["# Benchmarks", ""]
    if meta["quick"]:
        L += ["> **Quick mode (BENCH_QUICK=1)**: tiny sizes, a smoke run of the suite. These "
              "figures say nothing about performance.", ""]
    L += [f"Generated by `python -m micrec_tf.bench --config {meta['config']}` "
          f"(`make bench CONFIG={meta['config']}`). Every figure is a median of several repeats "
          "(counts are given per section); ratios are measured side by side in the same run. "
          "Raw numbers: `benchmarks.json` next to this file.", "",
          "## Machine", ""]
    L += _table(["", ""], [
        ["CPU", mach["cpu"]],
        ["CPU flags (vector / matrix units)", " ".join(mach.get("cpu_flags") or []) or "unknown"],
        ["cores (usable)", mach["cores"]],
        ["RAM", f"{mach['ram_gib']} GiB"], ["OS", mach["os"]],
        ["Python", v["python"]], ["TensorFlow / tf_keras", f"{v['tensorflow']} / {v['tf_keras']}"],
        ["Apache Beam", v["apache_beam"]], ["ScaNN", v["scann"]], ["NumPy", v["numpy"]],
        ["date (UTC)", mach["date_utc"]],
        ["git commit", f"`{mach['git_commit']}`"
                       + (" (with uncommitted changes)" if mach.get("git_dirty") else "")],
        ["suite wall time", f"{meta['total_s'] / 60:.1f} min"],
        ["load average (1/5/15 min) before / after",
         f"{meta.get('loadavg_start')} / {meta.get('loadavg_end')}"],
    ])
    L += ["", "## Targets", ""]
    L += _table(["target", "value", "status", "why"],
                [[t["name"] + ": " + t["target"],
                  (", ".join(f"{k} {_fmt(x)}" for k, x in t["value"].items())
                   if isinstance(t["value"], dict) else _fmt(t["value"])),
                  f"**{t['status']}**", t["why"]] for t in res["targets"]])

    # 1. preprocessing
    pre = res.get("preprocessing", {})
    L += ["", "## 1. Preprocessing (Beam job)", ""]
    if "sizes" in pre:
        L += [f"`pipelines/preprocess.py` on {pre['dataset']}, {pre['runner']}, one child process "
              f"per run (peak RSS from its rusage; data generation not timed). Config preprocess "
              f"settings: {pre['config_preprocess']}.", ""]
        rows = [[_fmt(r["events"]), _fmt(r["users"]), r["runs"],
                 _fmt(r["wall_s"], " s") + " (" + ", ".join(_fmt(x) for x in r["wall_s_all"]) + ")",
                 _fmt(r["events_per_s"]), _fmt(r["peak_rss_mib"], " MiB"), "measured"]
                for r in pre["sizes"]]
        rows += [[_fmt(e["target_events"]), "", 0, "~" + _fmt(e["estimated_wall_s"], " s"),
                  "~" + _fmt(e["estimated_events_per_s"]),
                  "~" + _fmt(e["estimated_peak_rss_mib"], " MiB"),
                  f"**extrapolated, not run**: {e['why_not_run']}"] for e in pre["extrapolated"]]
        L += _table(["events", "users", "runs", "wall (median; all runs)", "events/s",
                     "peak RSS", "status"], rows)
        fit = pre["fit"]
        if fit["exponent"] is not None:
            L += ["", f"Scaling: time ~ events^**{fit['exponent']}** (least-squares log-log fit "
                  f"over the {fit['points']} measured sizes; between the two largest sizes: "
                  f"{fit['exponent_two_largest']})."]
            if fit.get("affine"):
                af = fit["affine"]
                L += [f"As start-up + events / rate: start-up {_fmt(af['startup_s'], ' s')}, "
                      f"marginal rate {_fmt(af['events_per_s_marginal'])} events/s (linear "
                      "least squares of time vs events)."]
            if pre["extrapolated"]:
                L += ["Extrapolated rows are **estimates, not measurements**: the power-law fit, "
                      "but never faster than linear from the largest measured size (the fit is "
                      "flattered by the start-up cost), and a linear fit of peak RSS."]
        if (pre.get("peak_rss_mib_per_million_events") or 0) >= 1:
            L += ["", f"Peak RSS grows by about {_fmt(pre['peak_rss_mib_per_million_events'])} MiB "
                  "per million events (linear fit): the DirectRunner keeps every PCollection in "
                  "the memory of one process, so logs much larger than these need a distributed "
                  "runner (`--runner=DataflowRunner ...`, see pipelines/preprocess.py)."]
        for f in pre.get("failed_runs", []):
            L += ["", f"Run {f['run']} at {_fmt(f['target_events'])} events **failed**: "
                  f"{f['error'].splitlines()[0]}"]
    else:
        L += [f"Not measured: {pre.get('error', 'section not run')}"]

    # 2. training
    tr = res.get("training", {})
    L += ["", f"## 2. Training step time ({tr.get('device', 'CPU')})", ""]
    if "models" in tr:
        L += [f"Artifacts: {tr['artifacts']}. Device: {tr['device']}. Batch {tr['batch_size']}, "
              f"{tr['num_negatives']} sampled negatives. {tr['method']}.", ""]
        L += _table(["model", "CL terms", "code paths", "step (ms)", "examples/s",
                     "step per round (ms)", "vs base"],
                    [[name, ", ".join(m["cl"]) or "none", m.get("code_paths", "new"),
                      _fmt(m["step_ms"]), _fmt(m["examples_per_s"]),
                      ", ".join(_fmt(x) for x in m["step_ms_per_round"]),
                      "1" if name == "base" else f"x{tr['ratios_vs_base'][name]}"]
                     for name, m in tr["models"].items()])
        L += ["", f"**MicRec / base step time: {tr['ratio_micrec_over_base']}** (median of the "
              f"per-round ratios {tr['ratio_per_round']})."]
        if "new_over_old" in tr:
            no = tr["new_over_old"]
            L += ["", f"**Today's code paths / the old ones (history per slot, einsum "
                  f"attention), same model, same run: base {no['base']}, MicRec "
                  f"{no['micrec']}** (medians of the per-round ratios "
                  f"{tr['new_over_old_per_round']['base']} / "
                  f"{tr['new_over_old_per_round']['micrec']})."]
    else:
        L += [f"Not measured: {tr.get('error', 'section not run')}"]
    L += ["", "### GPU", ""]
    if tr.get("gpu"):
        g = tr["gpu"]
        if "error" in g:
            L += [f"{g['device']}: failed: {g['error']}"]
        else:
            L += [f"Card: {g['device']} (this code path had not been run on a GPU when it was "
                  "written).", ""]
            L += _table(["model", "float32 examples/s", "mixed_float16 examples/s"],
                        [[n, _fmt(g["float32"][n]["examples_per_s"]),
                          _fmt(g["mixed_float16"][n]["examples_per_s"])]
                         for n in ("base", "micrec")])
    else:
        L += [f"GPU training examples/s (float32 and mixed precision): {res['gpu']['status']}."]

    # 3. title encoding
    te = res.get("title_encoding", {})
    L += ["", "## 3. Title encoding", ""]
    if "titles_per_s" in te:
        L += [f"`TitleEncoder` (all-MiniLM-L6-v2, TF, CPU) on {te['titles']} {te['source']} "
              f"(mean {te['mean_tokens']} tokens with [CLS]/[SEP]), batch {te['batch_size']}, "
              f"after one warm-up pass: **{_fmt(te['titles_per_s'])} titles/s** (median of "
              f"{len(te['seconds_all'])} passes: {te['seconds_all']} s). Weight loading "
              f"{_fmt(te['load_s'], ' s')}, warm-up pass (tracing) {_fmt(te['warmup_s'], ' s')}."]
    else:
        L += [f"Not measured: {te.get('error', 'section not run')}"]

    # 4. retrieval
    rt = res.get("retrieval", {})
    L += ["", "## 4. Retrieval: ScaNN vs brute force", ""]
    if "scann" in rt:
        bsz, sc, bf = rt["batch"], rt["scann"], rt["brute_force"]
        L += [f"{_fmt(rt['items'])} x {rt['dim']} float32 item vectors, {rt['clusters']} "
              f"clusters ({rt['data']}; on average {_fmt(rt['top_k_share_in_main_cluster'])} of "
              f"a query's exact top {rt['k']} lie in a single cluster, the rest spreads over "
              f"neighbouring ones); top-{rt['k']} by dot product; {rt['queries']} evaluation "
              f"queries, {rt['tuning_queries']} separate tuning queries. Brute force: numpy "
              "product + argpartition (`export.item_index.search_brute_force`, 64-query blocks; "
              "BLAS uses every core). ScaNN: "
              f"tree ({sc['num_leaves']} leaves, trained on {_fmt(sc['training_sample_size'])} "
              f"vectors) + AH ({sc['dimensions_per_block']} dims/block, anisotropic threshold "
              f"{sc['anisotropic_quantization_threshold']}) + exact reordering; batch 1 = "
              f"`search` (one thread), batch {bsz} = `search_batched_parallel` (every core). "
              f"One build; QPS at batch 1 = 1 / median latency over {sc['single_queries_timed']} "
              f"queries (brute force: {bf['single_queries_timed']}); at batch {bsz}: median over "
              f"{sc['batches_timed']} batches.", ""]
        L += _table(["", "build (s)", f"recall@{rt['k']}", "QPS batch 1", "p50 ms batch 1",
                     f"QPS batch {bsz}"],
                    [["brute force", "0", "1 (exact)", _fmt(bf["qps_batch1"]),
                      _fmt(bf["latency_ms_batch1_p50"]), _fmt(bf[f"qps_batch{bsz}"])],
                     [f"ScaNN (search {sc['leaves_to_search']} leaves, reorder {sc['reorder']})",
                      _fmt(sc["build_s"]), _fmt(sc["recall_at_k"]), _fmt(sc["qps_batch1"]),
                      _fmt(sc["latency_ms_batch1_p50"]), _fmt(sc[f"qps_batch{bsz}"])],
                     ["ScaNN / brute force", "", "", f"x{rt['speedup_batch1']}", "",
                      f"x{rt[f'speedup_batch{bsz}']}"]])
        L += ["", f"ScaNN at batch {bsz} on one thread (`search_batched`): "
              f"{_fmt(sc[f'qps_batch{bsz}_one_thread'])} QPS; batch-1 p99 "
              f"{_fmt(sc['latency_ms_batch1_p99'], ' ms')}.", "",
              "Query-time tuning grid (same build; recall on the tuning queries, QPS at batch 1 "
              "on 30 of them):", ""]
        L += _table(["leaves to search", "reorder", "recall (tuning)", "QPS batch 1"],
                    [[g["leaves_to_search"], g["reorder"], _fmt(g["recall_tuning"]),
                      _fmt(g["qps_batch1"])] for g in rt["grid"]])
        d = rt["export_default_params"]
        L += ["", "The picked setting is the fastest at batch 1 whose recall on the tuning "
              "queries is >= 0.95; the recall in the first table is measured on the evaluation "
              "queries. For reference, `export.item_index.scann_params` would start from "
              f"{d['num_leaves']} leaves, {d['num_leaves_to_search']} searched, reorder "
              f"{d['reorder_k']} for this catalogue size (the export then doubles "
              "leaves_to_search until recall reaches 0.95 on real users)."]
    else:
        L += [f"Not measured: {rt.get('error', 'section not run')}"]

    # 5. serving
    sv = res.get("serving", {})
    L += ["", "## 5. User tower serving", ""]
    if "latency_ms_p50" in sv:
        L += [f"{sv['model']}, artifacts `{sv['artifacts']}`; requests: {sv['requests']}. "
              f"{sv['method']}. TF threads: {sv['threads']} (0 = TF default, all cores).", ""]
        L += _table(["", "value"], [
            ["single request p50", _fmt(sv["latency_ms_p50"], " ms")],
            ["single request p99", _fmt(sv["latency_ms_p99"], " ms")],
            ["single request mean", _fmt(sv["latency_ms_mean"], " ms")],
            [f"batch {sv['batch']}: p50 per call", _fmt(sv["batch_latency_ms_p50"], " ms")],
            [f"batch {sv['batch']}: throughput", _fmt(sv["batch_examples_per_s"], " users/s")],
            ["SavedModel save / load", f"{_fmt(sv['save_s'], ' s')} / {_fmt(sv['load_s'], ' s')}"],
            ["first call (graph warm-up)", _fmt(sv["first_call_ms"], " ms")],
            ["serving process peak RSS", _fmt(sv["peak_rss_mib"], " MiB")]])
        L += ["", "In-process signature calls: TF Serving adds request parsing and (gRPC/REST) "
              "transport on top, and can batch concurrent requests server-side."]
    else:
        L += [f"Not measured: {sv.get('error', 'section not run')}"]
    L += ["", "## Failures", ""]
    fails = [f"- {name}: {res[name]['error'].splitlines()[0]}" for name in SECTIONS
             if isinstance(res.get(name), dict) and "error" in res[name]]
    not_run = [name for name in SECTIONS if name not in res]
    if not_run:
        fails.append(f"- not run (--sections): {', '.join(not_run)}")
    L += fails or ["None: every section ran."]
    return "\n".join(L) + "\n"


def _clean(obj):
    """JSON-safe: non-finite floats -> None, numpy scalars -> Python."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        x = float(obj)
        return x if math.isfinite(x) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


# ============================================================================ main
def run_suite(config: str, out_dir: str, quick: bool, sections=SECTIONS, work_dir=None,
              keep_work: bool = False, overrides: dict | None = None,
              preprocess_sizes=None, preprocess_repeats=None, budget_min=None,
              train_breakdown: bool = False) -> dict:
    from micrec_tf.config import load_config

    start = time.time()
    p = dict(QUICK if quick else FULL)
    if preprocess_sizes:
        p["preprocess_sizes"] = list(preprocess_sizes)
        reps = list(preprocess_repeats or [])
        p["preprocess_repeats"] = (reps + [reps[-1] if reps else 1] * len(preprocess_sizes))[
            :len(preprocess_sizes)]
    elif preprocess_repeats:
        p["preprocess_repeats"] = (list(preprocess_repeats) * len(p["preprocess_sizes"]))[
            :len(p["preprocess_sizes"])]
    if budget_min is not None:
        p["budget_min"] = float(budget_min)
    if train_breakdown:
        p["train_breakdown"] = True
    cfg_path = config if os.path.isabs(config) else os.path.join(ROOT, config)
    cfg = load_config(cfg_path, overrides or {})
    work = work_dir or tempfile.mkdtemp(prefix="micrec-bench-")
    os.makedirs(work, exist_ok=True)
    res = {"meta": {"config": os.path.relpath(cfg_path, ROOT), "quick": quick,
                    "machine": machine_info(), "params": p, "loadavg_start": _loadavg(),
                    "sections_run": list(sections)}}
    # Leave ~1 min for the report; preprocessing runs last and gets what is left of the budget.
    deadline = start + p["budget_min"] * 60 - 60
    # Objects shared between sections; "keep_alive" holds what must outlive the timed sections (the
    # traced train functions), released when the suite returns, after the report is written.
    state: dict = {"keep_alive": []}
    order = [s for s in SECTIONS if s in sections]
    log(f"{'quick' if quick else 'full'} suite {order}, config {res['meta']['config']}, "
        f"work dir {work}")
    try:
        for name in order:
            t0 = time.time()
            la = _loadavg()
            log(f"== {name}")
            try:
                if name == "preprocessing":
                    r = bench_preprocessing(cfg_path, cfg, p, work, deadline)
                elif name == "training":
                    r = bench_training(cfg_path, cfg, p, work, state)
                elif name == "title_encoding":
                    r = bench_title_encoding(cfg, p, state)
                elif name == "retrieval":
                    r = bench_retrieval(p)
                elif name == "serving":
                    r = bench_serving(cfg_path, cfg, p, work, state)
            except Exception as err:  # noqa: BLE001  (one failed section must not hide the rest)
                traceback.print_exc()
                r = {"error": f"{type(err).__name__}: {err}"}
            r["section_s"] = round(time.time() - t0, 1)
            r["loadavg_before"], r["loadavg_after"] = la, _loadavg()
            res[name] = r
            log(f"== {name} done in {r['section_s']} s")
    finally:
        if not keep_work and work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    import tensorflow as tf
    gpus = tf.config.list_physical_devices("GPU")
    res["gpu"] = {"status": ("measured: see training.gpu" if gpus and "gpu" in res.get(
        "training", {}) else NO_GPU_TEXT if not gpus else "not measured: training section failed")}
    total = time.time() - start
    res["meta"]["total_s"] = round(total, 1)
    res["meta"]["loadavg_end"] = _loadavg()
    res["targets"] = evaluate_targets(res, total, p["budget_min"], quick)
    res = _clean(res)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "benchmarks.json"), "w") as fh:
        json.dump(res, fh, indent=1, allow_nan=False)
        fh.write("\n")
    md_path = os.path.join(out_dir, "BENCHMARKS.md")
    old = open(md_path, encoding="utf-8").read() if os.path.exists(md_path) else ""
    with open(md_path, "w") as fh:
        fh.write(keep_hand_sections(old, render_markdown(res)))
    log(f"wrote {out_dir}/BENCHMARKS.md and benchmarks.json ({total / 60:.1f} min)")
    return res


HAND_MARKER = "<!-- Sections below were measured by separate commands; make bench keeps them. -->"


def keep_hand_sections(old: str, new: str) -> str:
    """``new`` followed by everything from :data:`HAND_MARKER` on in ``old`` (sections measured by
    separate commands, e.g. the full co-occurrence table's preprocessing cost), so a regenerated
    BENCHMARKS.md does not lose them."""
    at = old.find(HAND_MARKER)
    if at < 0:
        return new
    return new.rstrip("\n") + "\n\n" + old[at:]


def _int_list(text: str) -> list:
    return [int(float(x)) for x in text.split(",") if x.strip()]


def main(argv=None) -> int:
    from micrec_tf import cli

    parser = cli.parser(__doc__, config_default="configs/ml-1m.yaml")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes (smoke run); also BENCH_QUICK=1")
    parser.add_argument("--out", default=None,
                        help="output folder (default: docs/; in quick mode "
                             "$TMPDIR/micrec-bench-quick, never docs/)")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated subset of {','.join(SECTIONS)}")
    parser.add_argument("--preprocess-sizes", default=os.environ.get("BENCH_PREPROCESS_SIZES"),
                        help="events per preprocessing size, e.g. 1e6,3e6,1e7")
    parser.add_argument("--preprocess-repeats", default=os.environ.get("BENCH_PREPROCESS_REPEATS"),
                        help="runs per size, e.g. 3,2,1")
    parser.add_argument("--budget-min", type=float, default=None,
                        help="wall budget of the suite; preprocessing sizes that would not fit "
                             "are extrapolated instead (default 28)")
    parser.add_argument("--train-breakdown", action="store_true",
                        help="also time one-CL-term models (adds ~3 min on 2 cores)")
    parser.add_argument("--work-dir", default=None, help="keep intermediate files here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-args", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return _child_main(args.child, json.loads(args.child_args))
    from micrec_tf.config import parse_overrides

    quick = args.quick or os.environ.get("BENCH_QUICK", "") not in ("", "0")
    out = args.out or (os.path.join(tempfile.gettempdir(), "micrec-bench-quick") if quick
                       else os.path.join(ROOT, "docs"))
    if quick and os.path.abspath(out) == os.path.join(ROOT, "docs"):
        parser.error("quick mode does not write to docs/: pass another --out")
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {SECTIONS}")
    res = run_suite(args.config, out, quick, sections, work_dir=args.work_dir,
                    keep_work=bool(args.work_dir), overrides=parse_overrides(args.set),
                    preprocess_sizes=_int_list(args.preprocess_sizes)
                    if args.preprocess_sizes else None,
                    preprocess_repeats=_int_list(args.preprocess_repeats)
                    if args.preprocess_repeats else None,
                    budget_min=args.budget_min, train_breakdown=args.train_breakdown)
    failed = [s for s in sections if "error" in res.get(s, {})]
    if failed:
        print(f"bench: sections failed: {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    from micrec_tf import cli

    sys.exit(cli.run(main))

"""The benchmark harness: suite sizes, logging, medians, machine and version info, child processes.

Every section module takes its sizes from :data:`FULL` / :data:`QUICK` (one dict ``p``), logs with
:func:`log`, reports medians rounded by :func:`rounded`, and runs what must be measured in a fresh
interpreter (peak RSS, a SavedModel loaded as TF Serving loads it) through :func:`run_child`.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time

import micrec_tf  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow is imported)
import numpy as np

from micrec_tf import provenance

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTIONS = ("training", "serving", "title_encoding", "retrieval", "preprocessing")
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


def median(xs):
    xs = [float(x) for x in xs]
    return float(statistics.median(xs)) if xs else float("nan")


def rounded(x, digits=4):
    if x is None:
        return None
    x = float(x)
    if not math.isfinite(x):
        return None
    if x == 0:
        return 0.0
    return float(f"{x:.{digits}g}")


def loadavg():
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
    commit, dirty = provenance.git_state(ROOT)
    return {"cpu": cpu, "cpu_flags": flags, "cores": cores, "ram_gib": ram_gib,
            "os": platform.platform(),
            "versions": versions, "git_commit": commit or "unknown", "git_dirty": dirty,
            "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")}


def mem_available_mib() -> float | None:
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
    return [sys.executable, "-m", "benchmarks", "--child", kind, "--child-args",
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


def json_safe(obj):
    """JSON-safe: non-finite floats -> None, numpy scalars -> Python."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        x = float(obj)
        return x if math.isfinite(x) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj

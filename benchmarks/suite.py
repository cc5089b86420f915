"""The benchmark suite: runs the sections in order and writes the report (``python -m benchmarks``).

See :mod:`benchmarks` for what each section measures.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import traceback

import benchmarks
from benchmarks.harness import (FULL, NO_GPU_TEXT, QUICK, ROOT, SECTIONS, json_safe, loadavg,
                                log, machine_info)
from benchmarks.preprocessing import bench_preprocessing, child_preprocess
from benchmarks.report import evaluate_targets, keep_hand_sections, render_markdown
from benchmarks.retrieval import bench_retrieval
from benchmarks.serving import bench_serving, child_serve
from benchmarks.title_encoding import bench_title_encoding
from benchmarks.training import bench_training


def _child_main(kind: str, args: dict) -> int:
    if kind == "preprocess":
        result = child_preprocess(args)
    elif kind == "serve":
        result = child_serve(args)
    else:
        raise SystemExit(f"unknown child kind {kind!r}")
    with open(args["out_json"], "w") as fh:
        json.dump(result, fh)
    return 0


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
                    "machine": machine_info(), "params": p, "loadavg_start": loadavg(),
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
            la = loadavg()
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
            r["loadavg_before"], r["loadavg_after"] = la, loadavg()
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
    res["meta"]["loadavg_end"] = loadavg()
    res["targets"] = evaluate_targets(res, total, p["budget_min"], quick)
    res = json_safe(res)
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


def _int_list(text: str) -> list:
    return [int(float(x)) for x in text.split(",") if x.strip()]


def main(argv=None) -> int:
    from micrec_tf import cli

    parser = cli.parser(benchmarks.__doc__, config_default="configs/ml-1m.yaml")
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

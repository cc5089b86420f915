"""The exact evaluation's top-K, numpy engine against TensorFlow engine (issue 31, item 3).

    python -m benchmarks.exact_eval --items 1000000 --queries 4096 --dim 64 --k 500 \\
        --history 20 [--rounds 3] [--batch-size 1024] [--seed 0] [--out exact_eval.json]

Random float32 item vectors ``[items, dim]`` (row 0 the padding item, never retrieved) and user
vectors ``[queries, dim]`` (standard normal), and per query ``--history`` random catalogue ids
excluded (as ``eval.exclude_clicked`` excludes earlier clicks). Both engines rank through the
evaluation's own entry point, :func:`micrec_tf.evaluation.metrics.top_k_items` with
``engine="numpy"`` (``micrec_tf.search.top_k_dot``) and ``engine="tensorflow"``
(``micrec_tf.evaluation.tf_top_k.top_k_dot_tf``), timed interleaved (numpy, tensorflow, numpy,
tensorflow, ... ``--rounds`` times each, after one untimed TensorFlow warm-up call on a few
queries that traces its function) so that a CPU shared with other jobs slows both alike; each
figure is the median over rounds.

Reported: seconds per round and their medians, seconds per 1,000 queries, queries per second,
``ratio`` = numpy median / tensorflow median, the projected time of a 50,000-click evaluation at
each rate, and ``identical_row_share``: the share of queries whose k indices are the same in both
engines' last round (float rounding between BLAS and Eigen may swap near-equal scores), with the
largest absolute score difference. The JSON holds the CPU model and flags (``/proc/cpuinfo``),
core count and load averages before / after; it is printed and written to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from benchmarks.harness import loadavg, log, machine_info, median, rounded

ENGINES = ("numpy", "tensorflow")
# The evaluation the projection is for: train's final evaluation of 50,000 test clicks.
PROJECTED_CLICKS = 50_000


def parse_args(argv=None) -> argparse.Namespace:
    """The command line; every error is an ``argparse`` error (exit 2) naming the argument."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.exact_eval",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--items", type=int, default=1_000_000, help="catalogue rows (incl. row 0)")
    p.add_argument("--queries", type=int, default=4096, help="user vectors ranked per round")
    p.add_argument("--dim", type=int, default=64, help="embedding dimension")
    p.add_argument("--k", type=int, default=500, help="items retrieved per query")
    p.add_argument("--history", type=int, default=20, help="excluded ids per query")
    p.add_argument("--rounds", type=int, default=3, help="timed calls per engine (>= 1)")
    p.add_argument("--batch-size", type=int, default=1024,
                   help="queries per block (eval's default; capped by SCORE_BLOCK_ENTRIES)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--note", default="", help="free text kept in the JSON (e.g. shared cores)")
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    for name in ("items", "queries", "dim", "k", "rounds", "batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1. Received: {getattr(args, name)}")
    if args.items < 2:
        p.error(f"--items must be >= 2 (row 0 is padding). Received: {args.items}")
    if args.history < 0:
        p.error(f"--history must be >= 0. Received: {args.history}")
    return args


def make_inputs(items: int, queries: int, dim: int, history: int, seed: int):
    """``(users float32 [Q, D], vectors float32 [V, D], exclusion CSR (indptr, indices))``."""
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((items, dim), dtype=np.float32)
    users = rng.standard_normal((queries, dim), dtype=np.float32)
    indices = rng.integers(1, items, size=queries * history, dtype=np.int64)
    indptr = np.arange(queries + 1, dtype=np.int64) * history
    return users, vectors, (indptr, indices)


def identical_rows(a: np.ndarray, b: np.ndarray) -> float:
    """Share of rows whose indices are equal position by position."""
    return float(np.mean(np.all(a == b, axis=1))) if a.shape[0] else float("nan")


def run(args) -> dict:
    from micrec_tf.evaluation import metrics

    users, vectors, excl = make_inputs(args.items, args.queries, args.dim, args.history,
                                       args.seed)
    call = {e: (lambda e=e: metrics.top_k_items(users, vectors, args.k, exclude=excl,
                                                batch_size=args.batch_size, engine=e))
            for e in ENGINES}
    before = loadavg()
    warm = min(args.queries, 8)  # traces the TensorFlow function outside the timed rounds
    metrics.top_k_items(users[:warm], vectors, args.k,
                        exclude=(excl[0][:warm + 1], excl[1][:excl[0][warm]]),
                        batch_size=args.batch_size, engine="tensorflow")
    seconds = {e: [] for e in ENGINES}
    last = {}
    for r in range(args.rounds):
        for e in ENGINES:
            start = time.perf_counter()
            last[e] = call[e]()
            seconds[e].append(time.perf_counter() - start)
            log(f"round {r + 1}/{args.rounds} {e}: {seconds[e][-1]:.2f} s")
    after = loadavg()
    med = {e: median(seconds[e]) for e in ENGINES}
    (ia, sa), (ib, sb) = last["numpy"], last["tensorflow"]
    finite = np.isfinite(sa) & np.isfinite(sb)
    return {
        "benchmark": "exact_eval", "args": vars(args), "machine": machine_info(),
        "loadavg_before": before, "loadavg_after": after,
        "seconds": {e: [rounded(s) for s in seconds[e]] for e in ENGINES},
        "median_s": {e: rounded(med[e]) for e in ENGINES},
        "s_per_1000_queries": {e: rounded(med[e] * 1000 / args.queries) for e in ENGINES},
        "qps": {e: rounded(args.queries / med[e]) for e in ENGINES},
        "ratio": rounded(med["numpy"] / med["tensorflow"]),
        f"projected_s_{PROJECTED_CLICKS}_clicks": {
            e: rounded(med[e] * PROJECTED_CLICKS / args.queries) for e in ENGINES},
        "identical_row_share": rounded(identical_rows(ia, ib), 6),
        "identical_padding": bool(np.array_equal(ia < 0, ib < 0)),
        "max_abs_score_diff": rounded(float(np.max(np.abs(sa[finite] - sb[finite])))
                                      if finite.any() else 0.0),
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    result = run(args)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Session CL's share of the training step (issue 31, item 2), measured in one process.

``python -m benchmarks.session_cl_ratio`` builds, on the same fixed training batches held in
memory (the artifacts' normal dataset reader), the compiled Keras train step of

* ``base``: ICAN without CL;
* ``session_<path>``: ICAN + session CL only;
* ``micrec_<path>``: ICAN + feature, semantic and session CL (the final model);

for each session-CL membership test ``<path>`` in ``--paths`` (``sorted``: the code of before
issue 31; ``bitmap``: the new default for catalogues up to ~23,000 items; both draw the same
negatives), then times them in alternating rounds (A B C ... then ... C B A) so that a CPU shared
with other jobs slows them alike (by default 30 rounds of one step per model, the order rotated
and reversed from round to round). Each figure is the median over rounds of the per-round median
step; each ratio the median of the per-round ratios to ``base``.

Session CL's own cost is split on the same table and the batches' real anchors (the distinct
target items), timed alone as compiled functions, paths alternated: the positive draw (CSR
cumulative counts + searchsorted), the negative pool with its rejection (membership test + first
``num_negatives`` kept) per path, and the rest of the session step (the loss, its projector and
item tower passes, their gradients) = session step - base step - ``sample()``.

Writes a JSON (``--out``) and prints a Markdown fragment for docs/BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from benchmarks.harness import ROOT, loadavg, log, machine_info, median, rounded

PATHS = ("sorted", "bitmap")


def parse_args(argv=None) -> argparse.Namespace:
    """The command line; every error is an ``argparse`` error (exit 2) naming the argument."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.session_cl_ratio",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/ml-1m-cold.yaml",
                   help="config whose model and loss settings are used")
    p.add_argument("--artifacts", default="artifacts/ml-1m-cold",
                   help="preprocessed artifacts (read only): examples, items, cooccurrence, "
                        "title_neighbours")
    p.add_argument("--paths", default="sorted,bitmap",
                   help=f"comma-separated session CL membership tests, of {', '.join(PATHS)}")
    p.add_argument("--batches", type=int, default=8, help="fixed training batches in memory")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per model")
    p.add_argument("--rounds", type=int, default=30,
                   help="rounds; each times every model, in an order rotated and reversed from "
                        "round to round")
    p.add_argument("--steps", type=int, default=1, help="timed steps per model and round")
    p.add_argument("--sampler-repeats", type=int, default=10,
                   help="timed calls per sampler part and round")
    p.add_argument("--no-micrec", action="store_true", help="leave out the micrec_* models")
    p.add_argument("--out", default=None, help="JSON output file")
    args = p.parse_args(argv)
    for name in ("batches", "warmup", "rounds", "steps", "sampler_repeats"):
        value = getattr(args, name)
        if value < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1. Received: {value}")
    paths = [x.strip() for x in args.paths.split(",") if x.strip()]
    bad = [x for x in paths if x not in PATHS]
    if bad or not paths or len(set(paths)) != len(paths):
        p.error(f"--paths must be distinct names of {', '.join(PATHS)}. Received: {args.paths!r}")
    args.paths = paths
    art = args.artifacts if os.path.isabs(args.artifacts) else os.path.join(ROOT, args.artifacts)
    for need in ("stats.json", os.path.join("cooccurrence", "cooccurrence.npz")):
        if not os.path.exists(os.path.join(art, need)):
            p.error(f"--artifacts has no {need}. Received: {args.artifacts!r}")
    args.artifacts = art
    cfg = args.config if os.path.isabs(args.config) else os.path.join(ROOT, args.config)
    if not os.path.isfile(cfg):
        p.error(f"--config is not a file. Received: {args.config!r}")
    args.config = cfg
    return args


def _variants(paths, micrec: bool) -> dict:
    """``{name: config overrides}``."""
    v = {"base": {"model.cl": []}}
    for path in paths:
        v[f"session_{path}"] = {"model.cl": ["session"], "loss.session_membership": path}
    if micrec:
        for path in paths:
            v[f"micrec_{path}"] = {"model.cl": ["feature", "semantic", "session"],
                                   "loss.session_membership": path}
    return v


def _time_steps(fn, it, steps: int) -> tuple:
    """-> (median wall seconds, median process CPU seconds) per step."""
    wall, cpu = [], []
    for _ in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        float(fn(it)["loss"])
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return median(wall), median(cpu)


def _sampler_parts(task):
    """Compiled functions of one session CL task: ``{part: fn(ids)}``."""
    import tensorflow as tf

    compiled = tf.function(input_signature=[tf.TensorSpec([None], tf.int64)], autograph=False)

    @compiled
    def positives(ids):
        has = tf.gather(task.has_positive_table, ids)
        r = task.rng.uniform(tf.shape(ids), dtype=tf.float64)
        target = tf.gather(task.row_start, ids) + r * tf.gather(task.row_total, ids)
        entry = tf.searchsorted(task.cumulative, target, side="right", out_type=tf.int64)
        entry = tf.clip_by_value(entry, tf.gather(task.row_first, ids),
                                 tf.gather(task.row_last, ids))
        return tf.where(has, tf.gather(task.neighbours, entry), tf.zeros_like(ids))

    @compiled
    def negatives(ids):
        pool = task.rng.uniform([task.num_negatives * task.negative_pool_factor], minval=1,
                                maxval=task.num_items, dtype=tf.int64)
        allowed = tf.logical_not(task.co_occurred(ids, pool)
                                 | tf.equal(pool[tf.newaxis, :], ids[:, tf.newaxis]))
        rank = tf.cumsum(tf.cast(allowed, tf.int32), axis=1)
        return allowed & (rank <= task.num_negatives)

    @compiled
    def sample(ids):
        return task.sample(ids)

    return {"positives": positives, "negatives": negatives, "sample": sample}


def main(argv=None) -> int:
    args = parse_args(argv)
    import tensorflow as tf
    import tf_keras

    from benchmarks.training import _fixed_batches
    from micrec_tf.config import load_config
    from micrec_tf.data.artifacts import load_artifacts
    from micrec_tf.model import build_model

    before = loadavg()
    t_start = time.perf_counter()
    cfg = load_config(args.config)
    art = load_artifacts(args.artifacts)
    batch = int(cfg.train.batch_size)
    data = _fixed_batches(args.artifacts, batch, args.batches, cfg.train.seed)
    variants = _variants(args.paths, not args.no_micrec)
    models, fns, iters = {}, {}, {}
    for name, overrides in variants.items():
        tf_keras.utils.set_random_seed(cfg.train.seed)
        c = cfg.replace(overrides)
        t0 = time.perf_counter()
        m = build_model(c, art.item_table, art.vocab_sizes, art.user_fields, art.cooccurrence,
                        art.title_neighbours)
        m.compile(optimizer=tf_keras.optimizers.Adam(c.train.learning_rate))
        fns[name], iters[name], models[name] = m.make_train_function(), iter(data), m
        for _ in range(args.warmup):
            float(fns[name](iters[name])["loss"])
        if m.session_cl is not None:
            assert m.session_cl.membership_path == overrides["loss.session_membership"]
        log(f"session_cl_ratio: {name} built + {args.warmup} warm-up steps in "
            f"{time.perf_counter() - t0:.1f} s")
    names = list(variants)
    for name in names:  # one more untimed step each, round-robin
        float(fns[name](iters[name])["loss"])
    per_round = {n: [] for n in names}
    cpu_round = {n: [] for n in names}
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in (order if r % 2 == 0 else order[::-1]):
            wall, cpu = _time_steps(fns[name], iters[name], args.steps)
            per_round[name].append(wall)
            cpu_round[name].append(cpu)
        log(f"session_cl_ratio: round {r + 1}: " + ", ".join(
            f"{n} {per_round[n][-1] * 1000:.0f} ms" for n in names))

    # The sampler's parts, on the batches' real anchors (distinct target items).
    anchors = [tf.unique(tf.cast(tf.reshape(b["item"], [-1]), tf.int64))[0]
               for b in data.take(args.batches)]
    parts = {p: _sampler_parts(models[f"session_{p}"].session_cl) for p in args.paths}
    for p in args.paths:
        for fn in parts[p].values():
            tf.nest.map_structure(lambda x: x.numpy(), fn(anchors[0]))
    part_rounds = {(p, k): [] for p in args.paths for k in parts[p]}
    for r in range(min(args.rounds, 7)):
        for p in (args.paths if r % 2 == 0 else args.paths[::-1]):
            for k, fn in parts[p].items():
                times = []
                for i in range(args.sampler_repeats):
                    ids = anchors[i % len(anchors)]
                    t0 = time.perf_counter()
                    tf.nest.map_structure(lambda x: x.numpy(), fn(ids))
                    times.append(time.perf_counter() - t0)
                part_rounds[(p, k)].append(median(times))

    step = {n: median(per_round[n]) for n in names}
    ratio_rounds = {n: [a / b for a, b in zip(per_round[n], per_round["base"])] for n in names}
    cpu_ratio_rounds = {n: [a / b for a, b in zip(cpu_round[n], cpu_round["base"])]
                        for n in names}
    sampler = {p: {k: rounded(median(part_rounds[(p, k)]) * 1000) for k in parts[p]}
               for p in args.paths}
    for p in args.paths:
        rest = step[f"session_{p}"] - step["base"] - median(part_rounds[(p, "sample")])
        sampler[p]["session_step_minus_base_ms"] = rounded(
            (step[f"session_{p}"] - step["base"]) * 1000)
        sampler[p]["loss_and_gradients_ms"] = rounded(rest * 1000)
    result = {
        "machine": machine_info(),
        "shared_cpu_note": "the 2 cores were shared with a background experiment (training runs)",
        "loadavg_before": before, "loadavg_after": loadavg(),
        "config": os.path.relpath(args.config, ROOT), "artifacts": args.artifacts,
        "num_items": int(art.cooccurrence.indptr.size - 1),
        "cooccurrence_entries": int(art.cooccurrence.neighbours.size),
        "batch_size": batch, "num_negatives": int(cfg.loss.num_negatives),
        "num_cl_negatives": int(cfg.loss.num_cl_negatives),
        "session_negative_pool": int(cfg.loss.session_negative_pool),
        "anchors_per_batch": [int(a.shape[0]) for a in anchors],
        "method": (f"{args.batches} fixed batches in memory, compiled Keras train function, "
                   f"{args.warmup} warm-up steps per model (+1 round-robin), {args.rounds} "
                   f"rounds x {args.steps} step(s) per model, the model order rotated and "
                   f"reversed from round to round; step = median over rounds of the per-round "
                   f"median, wall and process CPU time; ratio = median of the per-round ratios to base; sampler parts: "
                   f"{min(args.rounds, 7)} rounds x {args.sampler_repeats} calls per part, paths "
                   f"alternated"),
        "step_ms": {n: rounded(step[n] * 1000) for n in names},
        "step_ms_per_round": {n: [rounded(x * 1000) for x in per_round[n]] for n in names},
        "ratio_vs_base": {n: rounded(median(ratio_rounds[n])) for n in names if n != "base"},
        "ratio_vs_base_per_round": {n: [rounded(x) for x in ratio_rounds[n]]
                                    for n in names if n != "base"},
        "cpu_ms": {n: rounded(median(cpu_round[n]) * 1000) for n in names},
        "cpu_ratio_vs_base": {n: rounded(median(cpu_ratio_rounds[n])) for n in names
                              if n != "base"},
        "sampler_ms": sampler,
        "wall_s": rounded(time.perf_counter() - t_start),
    }
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=1, sort_keys=True)
    print(markdown(result))
    return 0


def markdown(r: dict) -> str:
    """The fragment for docs/BENCHMARKS.md."""
    m = r["machine"]
    lines = [f"CPU: {m['cpu']}, {m['cores']} usable cores ({r['shared_cpu_note']}; load average "
             f"before / after {r['loadavg_before']} / {r['loadavg_after']}); flags: "
             f"{' '.join(m['cpu_flags'])}. TensorFlow {m['versions'].get('tensorflow')}, commit "
             f"`{m['git_commit'][:10]}`{' (dirty)' if m['git_dirty'] else ''}, {m['date_utc']} "
             f"UTC. {r['method']}.", "",
             "| model | step wall (ms) | / base (wall) | step CPU time (ms) | / base (CPU) |",
             "|---|---|---|---|---|"]
    for n, ms in r["step_ms"].items():
        lines.append(f"| {n} | {ms} | {r['ratio_vs_base'].get(n, 1)} | {r['cpu_ms'][n]} | "
                     f"{r['cpu_ratio_vs_base'].get(n, 1)} |")
    lines += ["", "| session CL part (ms) | " + " | ".join(r["sampler_ms"]) + " |",
              "|---|" + "---|" * len(r["sampler_ms"])]
    keys = list(next(iter(r["sampler_ms"].values())))
    for k in keys:
        lines.append(f"| {k} | " + " | ".join(str(v[k]) for v in r["sampler_ms"].values()) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

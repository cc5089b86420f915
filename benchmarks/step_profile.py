"""Where the training step's time goes at 1 M items (issue 31): an in-memory microbenchmark.

The real model (:func:`micrec_tf.model.build_model`, ICAN / MicRec) with the vocabulary sizes of
the synthetic 1 M-item world (configs/synthetic-1m.yaml: 1,000,000 items, 25,000 providers
(items / 40), the generator's tags, formats and user fields), the config's batch size, history
length and negatives, fed random batches held in memory as tensors (no Beam job, no files):
items, history clicks and CL anchors drawn from a Zipf-like popularity (p(rank r) ~ r^-exponent
over a random permutation of the catalogue), a symmetric ring co-occurrence table and ring title
neighbours so that every CL sampler has its full catalogue to draw from.

Components of the compiled step, each timed as its own compiled function over the same batches
(median of per-round medians, the functions alternated per round, ABBA):

``step``            ``model.make_train_function()``: the whole training step (Adam included).
``grads``           forward + ``tape.gradient`` of the total loss, no optimizer apply.
``forward``         ``compute_losses(training=True)`` alone.
``history``         the user tower's history path alone (field embeddings of the B x H clicks,
                    ICAN's projection) forward + gradient.
``base_step``       the train step of the model without CL terms (``cl: []``).
``only_<task>``     the train step with one CL term.

Shares of ``step``: optimizer apply = step - grads, backward = grads - forward, CL = step -
base_step (each term: only_<task> - base_step), history = the history function's time.

``--compare history_embeddings=slots,unique`` times two settings of one config key A, B, A, B,
... in the same process (the before/after of a fix); ``--compare train.optimizer=adam,fused_adam``
the optimizer. ``--optimizer-apply GRAD_ROWS`` times one optimizer apply alone
(:func:`optimizer_apply`). CLI::

    python -m benchmarks.step_profile --items 1000000 --rounds 3 --out /tmp/profile.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import micrec_tf  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow is imported)
from micrec_tf import cli
import numpy as np

# configs/synthetic-1m.yaml's world (micrec_tf/data/synthetic.py): 20 topics, each 6 sub-topic
# tags, 6 global tags; formats; gender / age / region profile fields (+1: the OOV row 0).
SYNTHETIC_TAGS = 20 + 20 * 6 + 6 + 1
SYNTHETIC_FORMATS = 6 + 1
SYNTHETIC_USER_VOCAB = {"user_gender": 3 + 1, "user_age": 6 + 1, "user_region": 8 + 1}
COMPONENTS = ("step", "grads", "forward", "history", "base_step", "only_feature",
              "only_semantic", "only_session")


def cpu_info() -> dict:
    """The CPU model and its SIMD flags (``/proc/cpuinfo``), and the core count."""
    model, flags = platform.processor() or "unknown", []
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model in ("unknown", "", "x86_64"):
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = value.split()
                    break
    except OSError:
        pass
    simd = sorted(f for f in flags if f.startswith(("avx", "fma", "sse4")))
    return {"model": model, "cores": os.cpu_count(), "simd_flags": simd,
            "avx512": any(f.startswith("avx512") for f in flags)}


def zipf_ids(rng: np.random.Generator, size, num_items: int, exponent: float,
             permutation: np.ndarray) -> np.ndarray:
    """Item indices in 1..num_items-1 drawn with p(rank r) ~ r^-exponent; rank r is item
    ``permutation[r - 1]``."""
    ranks = np.arange(1, num_items, dtype=np.float64)
    cdf = np.cumsum(ranks ** -exponent)
    cdf /= cdf[-1]
    r = np.searchsorted(cdf, rng.random(size), side="right")
    return permutation[np.minimum(r, num_items - 2)]


def synthetic_world(num_items: int, max_tags: int = 8, neighbours: int = 8, seed: int = 0):
    """``(item_table, vocab_sizes, user_fields, cooccurrence, title_neighbours, permutation)``
    of a synthetic catalogue with the 1 M-item world's vocabulary sizes (built in numpy)."""
    from micrec_tf.data.artifacts import CooccurrenceTable, ItemTable, NeighbourTable

    if num_items < 2 * neighbours + 2:
        raise ValueError(f"num_items must be >= {2 * neighbours + 2} for {neighbours} ring "
                         f"neighbours. Received: {num_items}")
    rng = np.random.default_rng(seed)
    v = num_items
    num_providers = max(21, v // 40) + 1
    topic = rng.integers(0, 20, size=v)
    tags = np.zeros((v, max_tags), np.int64)
    tags[:, 0] = topic + 1
    n_more = rng.integers(0, 4, size=v)
    for j in range(1, min(4, max_tags)):
        sub = 21 + topic * 6 + rng.integers(0, 6, size=v)
        tags[:, j] = np.where(n_more >= j, sub, 0)
    provider = rng.integers(1, num_providers, size=v)
    fmt = rng.integers(1, SYNTHETIC_FORMATS, size=v)
    tags[0], provider[0], fmt[0] = 0, 0, 0
    table = ItemTable(tags=tags, provider=provider, extra={"item_format": fmt},
                      category=tags[:, 0].copy())
    # Ring neighbours: item i co-occurs with i +- 1..k (within 1..V-1, wrapping): symmetric.
    items = np.arange(1, v, dtype=np.int64)
    offsets = np.concatenate([np.arange(1, neighbours + 1), -np.arange(1, neighbours + 1)])
    nb = (items[:, None] - 1 + offsets[None, :]) % (v - 1) + 1  # [V-1, 2k]
    lo, hi = np.minimum(items[:, None], nb), np.maximum(items[:, None], nb)
    counts = 1 + (lo * 7 + hi) % 5
    same = (tags[items, 0][:, None] == tags[nb, 0]).astype(np.int8)
    indptr = np.zeros(v + 1, np.int64)
    indptr[2:] = np.cumsum(np.full(v - 1, 2 * neighbours))
    cooc = CooccurrenceTable(indptr=indptr, neighbours=nb.reshape(-1), counts=counts.reshape(-1),
                             same_category=same.reshape(-1))
    title_nb = np.zeros((v, 10), np.int64)
    title_nb[1:] = (items[:, None] - 1 + np.arange(1, 11)[None, :]) % (v - 1) + 1
    title = NeighbourTable(neighbours=title_nb,
                           weights=np.where(title_nb > 0, 0.8, 0.0).astype(np.float32))
    vocab = {"item_id": v, "tag": SYNTHETIC_TAGS, "provider": num_providers,
             "item_format": SYNTHETIC_FORMATS, **SYNTHETIC_USER_VOCAB}
    return table, vocab, ["gender", "age", "region"], cooc, title, rng.permutation(items)


def random_batches(table, permutation, count: int, batch_size: int, history_length: int,
                   exponent: float, seed: int = 1) -> list:
    """``count`` training batches {feature: int64 tensor}: Zipf-drawn target and history items,
    history lengths uniform in 1..H, profile fields uniform."""
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    v = table.num_items
    out = []
    for _ in range(count):
        items = zipf_ids(rng, batch_size, v, exponent, permutation)
        hist_len = rng.integers(1, history_length + 1, size=batch_size)
        hist = zipf_ids(rng, (batch_size, history_length), v, exponent, permutation)
        hist = hist * (np.arange(history_length)[None, :] < hist_len[:, None])
        b = {"item": items, "item_tags": table.tags[items], "item_provider": table.provider[items],
             "item_format": table.extra["item_format"][items], "hist_items": hist,
             "hist_len": hist_len}
        for name, size in SYNTHETIC_USER_VOCAB.items():
            b[name] = rng.integers(1, size, size=batch_size)
        out.append({k: tf.constant(np.asarray(x, np.int64)) for k, x in b.items()})
    return out


def profile_config(num_items: int, batch_size: int, history_length: int, negatives: int,
                   overrides: dict | None = None):
    """configs/synthetic-1m.yaml's model, loss and batch settings over ``num_items`` items."""
    from micrec_tf.config import load_config

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = load_config(os.path.join(root, "configs", "synthetic-1m.yaml"))
    return cfg.replace({"data.synthetic.num_items": num_items,
                        "train.batch_size": batch_size,
                        "preprocess.history_length": history_length,
                        "loss.num_negatives": negatives, **(overrides or {})})


def _build(cfg, world, cl, batch=None):
    """The compiled model with CL terms ``cl``, its layers built on ``batch`` (None: at its
    first call, outside the policy: float32 only) under the dtype
    policy that ``train.mixed_precision`` gives on this machine (train's
    :func:`~micrec_tf.train.training_policy`: float32 on a CPU unless ``bfloat16``)."""
    import tensorflow as tf
    import tf_keras
    from micrec_tf.model import build_model
    from micrec_tf.optimizers import make_optimizer
    from micrec_tf.precision import policy_scope
    from micrec_tf.train import training_policy

    table, vocab, user_fields, cooc, title, _ = world
    tf_keras.utils.set_random_seed(int(cfg.train.seed))
    c = cfg.replace({"model.cl": list(cl)})
    policy = training_policy(c.train.mixed_precision, tf.config.list_physical_devices("GPU"),
                             log=lambda *a: None)
    with policy_scope(policy):  # layers keep the policy they are built under
        m = build_model(c, table, vocab, user_fields, cooc, title)
        m.compile(optimizer=make_optimizer(c.train))  # train.optimizer (default: Adam, as train's)
        if batch is not None:
            m.compute_losses(batch, training=True)
    return m


def _step_fn(model, batches):
    import tensorflow as tf

    it = iter(tf.data.Dataset.from_tensor_slices(
        {k: tf.stack([b[k] for b in batches]) for k in batches[0]}).repeat())
    fn = model.make_train_function()
    return lambda: float(fn(it)["loss"])


def _grad_sum(grads):
    import tensorflow as tf

    total = tf.constant(0.0)
    for g in grads:
        if g is None:
            continue
        values = g.values if isinstance(g, tf.IndexedSlices) else g
        total += tf.reduce_sum(tf.cast(values, tf.float32))
    return total


def _grads_fn(model, batches, forward_only=False):
    import tensorflow as tf

    @tf.function(reduce_retracing=True, autograph=False)
    def run(features):
        with tf.GradientTape() as tape:
            loss = model.compute_losses(features, training=True)["loss"]
        if forward_only:
            return loss
        return loss + 0.0 * _grad_sum(tape.gradient(loss, model.trainable_variables))

    state = {"i": 0}

    def call():
        state["i"] += 1
        return float(run(batches[state["i"] % len(batches)]))
    return call


def _history_fn(model, batches):
    import tensorflow as tf

    tower = model.user_tower
    transform = getattr(tower, "_flatten_and_project", None)

    @tf.function(reduce_retracing=True, autograph=False)
    def run(features):
        with tf.GradientTape() as tape:
            x, mask = tower.history(features, transform, training=True)
            loss = tf.reduce_sum(tf.cast(x, tf.float32) * tf.cast(mask, tf.float32)[..., None])
        return loss + 0.0 * _grad_sum(tape.gradient(loss, tower.trainable_variables))

    state = {"i": 0}

    def call():
        state["i"] += 1
        return float(run(batches[state["i"] % len(batches)]))
    return call


def _time_rounds(fns: dict, rounds: int, steps: int, warmup: int, log) -> dict:
    """{name: [per-round median seconds]}: warm-up calls each, then rounds alternating order."""
    for name, fn in fns.items():
        t0 = time.perf_counter()
        for _ in range(warmup):
            fn()
        log(f"step_profile: {name} warm-up ({warmup} calls, incl. tracing) "
            f"{time.perf_counter() - t0:.1f} s")
    names = list(fns)
    per_round = {n: [] for n in names}
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            times = []
            for _ in range(steps):
                t0 = time.perf_counter()
                fns[name]()
                times.append(time.perf_counter() - t0)
            per_round[name].append(statistics.median(times))
        log(f"step_profile: round {r + 1}: " + ", ".join(
            f"{n} {per_round[n][-1] * 1000:.0f} ms" for n in names))
    return per_round


def _scope(op_name: str) -> str:
    """The component an op belongs to: its first name scope (``gradient_tape/<scope>`` for a
    backward op), towers one level deeper (``user_tower/transformer_0``)."""
    parts = op_name.split("/")
    grad = parts[0] == "gradient_tape"
    if grad:
        parts = parts[1:]
    depth = 2 if parts[0] in ("user_tower", "item_tower") and len(parts) > 2 else 1
    return ("backward:" if grad else "") + "/".join(parts[:depth])


def trace_ops(fn, steps: int, logdir: str) -> dict:
    """Runs ``fn`` ``steps`` times under ``tf.profiler`` and returns the ops' self time per call
    (ms, summed over threads; idle excluded) grouped by :func:`_scope` and by op type, with each
    group's share of the busy time."""
    import glob

    import tensorflow as tf
    from tensorflow.python.profiler.internal import _pywrap_profiler_plugin as plugin

    tf.profiler.experimental.start(logdir)
    try:
        for _ in range(steps):
            fn()
    finally:
        tf.profiler.experimental.stop()
    planes = glob.glob(os.path.join(glob.escape(logdir), "**", "*.xplane.pb"), recursive=True)
    data, ok = plugin.xspace_to_tools_data(planes, "framework_op_stats", {})
    if not ok:
        raise RuntimeError(f"the profiler could not read {planes}")
    table = json.loads(data)[0]
    cols = [c["id"] for c in table["cols"]]
    rows = [dict(zip(cols, [c.get("v") for c in r["c"]])) for r in table["rows"]]
    rows = [r for r in rows if r["type"] != "IDLE"]
    busy = sum(r["total_self_time"] for r in rows) or 1.0
    out = {"busy_thread_ms_per_call": round(busy / 1000 / steps, 1)}
    for key, group in (("by_scope", lambda r: _scope(r["operation"])),
                       ("by_op_type", lambda r: r["type"])):
        acc = {}
        for r in rows:
            acc[group(r)] = acc.get(group(r), 0.0) + r["total_self_time"]
        top = sorted(acc.items(), key=lambda kv: -kv[1])[:15]
        out[key] = {k: {"ms": round(v / 1000 / steps, 1), "share": round(v / busy, 3)}
                    for k, v in top}
    return out


def _parse_compare(text: str | None):
    """``key=a,b`` -> (``model.key``, [a, b]) (a bare key is taken under ``model.``). Several
    keys changed together: ``k1=a1,b1;k2=a2,b2`` -> (``"k1;k2"``, [``"a1+a2"``, ``"b1+b2"``])
    (setting A is every key's first value, B every key's second); :func:`_compare_settings`
    gives the overrides of each."""
    if not text:
        return None
    keys, firsts, seconds = [], [], []
    for part in text.split(";"):
        key, sep, values = part.partition("=")
        vals = [v for v in values.split(",") if v]
        if not sep or not key or len(vals) != 2:
            raise ValueError(f"--compare must be KEY=A,B (two values; several keys as "
                             f"K1=A1,B1;K2=A2,B2). Received: {text!r}")
        keys.append(key if "." in key else f"model.{key}")
        firsts.append(vals[0])
        seconds.append(vals[1])
    return ";".join(keys), ["+".join(firsts), "+".join(seconds)]


def _compare_settings(key: str, label: str) -> dict:
    """The config overrides of one side of :func:`_parse_compare`'s result."""
    return dict(zip(key.split(";"), label.split("+")))


def run(num_items: int = 1_000_000, batch_size: int = 4096, history_length: int = 20,
        negatives: int = 1000, exponent: float = 1.0, batches: int = 4, rounds: int = 3,
        steps: int = 2, warmup: int = 2, components=COMPONENTS, compare: str | None = None,
        overrides: dict | None = None, trace: str | None = None, log=print) -> dict:
    """Times the components (or, with ``compare``, two settings of one key) and returns the
    report dict (``config``, ``cpu``, ``ms``, ``shares``, ``examples_per_s``, ...); ``trace``
    (a folder) also profiles ``steps`` x ``rounds`` calls of each step function with
    ``tf.profiler`` (``trace[<name>]``: self time by scope and op type, see :func:`trace_ops`)."""
    for name, value in (("num_items", num_items), ("batch_size", batch_size),
                        ("history_length", history_length), ("negatives", negatives),
                        ("batches", batches), ("rounds", rounds), ("steps", steps)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1. Received: {value!r}")
    if not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an int >= 0. Received: {warmup!r}")
    if not exponent > 0:
        raise ValueError(f"exponent must be > 0. Received: {exponent!r}")
    unknown = [c for c in components if c not in COMPONENTS]
    if unknown or not components:
        raise ValueError(f"components must be a non-empty subset of {COMPONENTS}. "
                         f"Received: {list(components)!r}")
    cmp = _parse_compare(compare)
    cfg = profile_config(num_items, batch_size, history_length, negatives, overrides)
    t0 = time.perf_counter()
    world = synthetic_world(num_items, cfg.preprocess.max_tags)
    data = random_batches(world[0], world[5], batches, batch_size, history_length, exponent)
    hist = np.concatenate([b["hist_items"].numpy().reshape(-1) for b in data])
    log(f"step_profile: world of {num_items} items and {batches} batches in "
        f"{time.perf_counter() - t0:.1f} s")
    full_cl = list(cfg.model.cl)
    fns = {}
    if cmp:
        key, values = cmp
        for value in values:
            c = cfg.replace(_compare_settings(key, value))
            fns[f"micrec[{value}]"] = _step_fn(_build(c, world, full_cl, data[0]), data)
            fns[f"base[{value}]"] = _step_fn(_build(c, world, [], data[0]), data)
    else:
        model = _build(cfg, world, full_cl, data[0])
        if "step" in components:
            fns["step"] = _step_fn(model, data)
        if "grads" in components:
            fns["grads"] = _grads_fn(model, data)
        if "forward" in components:
            fns["forward"] = _grads_fn(model, data, forward_only=True)
        if "history" in components:
            fns["history"] = _history_fn(model, data)
        if "base_step" in components:
            fns["base_step"] = _step_fn(_build(cfg, world, [], data[0]), data)
        for task in ("feature", "semantic", "session"):
            if f"only_{task}" in components and task in full_cl:
                fns[f"only_{task}"] = _step_fn(_build(cfg, world, [task], data[0]), data)
    per_round = _time_rounds(fns, rounds, steps, warmup, log)
    traces = {}
    if trace:
        for name, fn in fns.items():
            if name == "step" or name.startswith("micrec["):
                folder = os.path.join(trace, name.replace("[", "_").replace("]", ""))
                traces[name] = trace_ops(fn, max(2, steps), folder)
                log(f"step_profile: traced {name}")
    ms = {n: round(statistics.median(r) * 1000, 2) for n, r in per_round.items()}
    out = {
        "config": {"num_items": num_items, "batch_size": batch_size,
                   "history_length": history_length, "negatives": negatives,
                   "zipf_exponent": exponent, "cl": full_cl,
                   "history_embeddings": cfg.model.history_embeddings,
                   "embedding_dim": cfg.model.embedding_dim, "vocab": dict(world[1])},
        "history_slots": int(hist.size // batches),
        "unique_history_items_per_batch": int(np.mean(
            [np.unique(b["hist_items"].numpy()).size for b in data])),
        "cpu": cpu_info(),
        "method": (f"{batches} random batches in memory; {warmup} warm-up calls per function, "
                   f"then {rounds} rounds x {steps} calls, functions alternated (ABBA); "
                   "figure = median over rounds of the per-round median"),
        "ms": ms, "ms_per_round": {n: [round(x * 1000, 2) for x in r]
                                   for n, r in per_round.items()},
        "examples_per_s": {n: round(batch_size * 1000 / t, 1) for n, t in ms.items()
                           if "step" in n or n.startswith(("only_", "micrec[", "base["))},
    }
    if traces:
        out["trace"] = traces
    if cmp:
        key, (a, b) = cmp
        out["compare"] = {"key": key, "values": [a, b], "ratio_a_over_b": {
            model: round(statistics.median(
                [x / y for x, y in zip(per_round[f"{model}[{a}]"], per_round[f"{model}[{b}]"])]), 3)
            for model in ("micrec", "base")}}
    elif "step" in ms:
        step = ms["step"]
        parts = {}
        if "grads" in ms:
            parts["optimizer_apply"] = step - ms["grads"]
        if "grads" in ms and "forward" in ms:
            parts["backward"] = ms["grads"] - ms["forward"]
        if "forward" in ms:
            parts["forward"] = ms["forward"]
        if "history" in ms:
            parts["history_fwd_bwd (inside forward+backward)"] = ms["history"]
        if "base_step" in ms:
            parts["cl_terms"] = step - ms["base_step"]
            for task in ("feature", "semantic", "session"):
                if f"only_{task}" in ms:
                    parts[f"cl_{task}"] = ms[f"only_{task}"] - ms["base_step"]
        out["shares"] = {k: {"ms": round(v, 1), "share": round(v / step, 3)}
                         for k, v in parts.items()}
    return out


def optimizer_apply(num_rows: int = 1_000_000, dim: int = 64, grad_rows: int = 30_000,
                    rounds: int = 5, steps: int = 1, warmup: int = 1, seed: int = 0,
                    log=print) -> dict:
    """One ``apply_gradients`` of each ``train.optimizer`` (micrec_tf/optimizers.py) on its own
    ``[num_rows, dim]`` float32 table with a ``grad_rows``-row ``IndexedSlices`` gradient
    (distinct random rows), compiled, timed interleaved (ABBA) as :func:`_time_rounds` does:
    ``ms`` (median of per-round medians) and ``ratio_adam_over_fused`` (median of per-round
    ratios; ``ratio_adam_over_lazy`` likewise). The table, moments and gradient are the same for
    every optimizer."""
    for name, value in (("num_rows", num_rows), ("dim", dim), ("grad_rows", grad_rows),
                        ("rounds", rounds), ("steps", steps)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1. Received: {value!r}")
    if grad_rows > num_rows:
        raise ValueError(f"grad_rows must be <= num_rows ({num_rows}). Received: {grad_rows}")
    import tensorflow as tf

    from micrec_tf.config import OPTIMIZERS, TrainConfig
    from micrec_tf.optimizers import make_optimizer

    rng = np.random.default_rng(seed)
    indices = tf.constant(np.sort(rng.choice(num_rows, grad_rows, replace=False)), tf.int64)
    values = tf.constant(rng.standard_normal((grad_rows, dim), dtype=np.float32) * 1e-3)
    start = rng.standard_normal((num_rows, dim), dtype=np.float32) * 0.05
    fns = {}
    for name in OPTIMIZERS:
        var = tf.Variable(start)
        opt = make_optimizer(TrainConfig(optimizer=name))
        opt.build([var])

        @tf.function(autograph=False)
        def apply(opt=opt, var=var):
            opt.apply_gradients([(tf.IndexedSlices(values, indices, tf.shape(var)), var)])

        fns[name] = apply
    per_round = _time_rounds(fns, rounds, steps, warmup, log)
    ms = {n: round(statistics.median(r) * 1000, 2) for n, r in per_round.items()}
    return {"table": [num_rows, dim], "grad_rows": grad_rows, "cpu": cpu_info(), "ms": ms,
            "ms_per_round": {n: [round(x * 1000, 2) for x in r] for n, r in per_round.items()},
            **{f"ratio_adam_over_{n.split('_')[0]}": round(statistics.median(
                [a / b for a, b in zip(per_round["adam"], per_round[n])]), 3)
               for n in per_round if n != "adam"},
            "method": (f"{warmup} warm-up calls each, then {rounds} rounds x {steps} calls, "
                       "optimizers alternated (ABBA); median over rounds of per-round medians")}


def add_world_arguments(ap: argparse.ArgumentParser, items: int) -> None:
    """The synthetic world's size arguments (``--items`` default ``items``, ``--batch-size``,
    ``--history-length``, ``--negatives``), shared with benchmarks/xla_cpu.py."""
    ap.add_argument("--items", type=int, default=items)
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--history-length", type=int, default=20)
    ap.add_argument("--negatives", type=int, default=1000)


def parse_sets(ap: argparse.ArgumentParser, items: list) -> dict:
    """``--set KEY=VALUE`` lines -> ``{key: value}``; a line without ``=`` is an argparse error."""
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            ap.error(f"--set must be KEY=VALUE. Received: {item!r}")
        overrides[key] = value
    return overrides


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.step_profile",
                                 description=__doc__.split("\n")[0])
    add_world_arguments(ap, items=1_000_000)
    ap.add_argument("--exponent", type=float, default=1.0, help="Zipf exponent of popularity")
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--components", default=",".join(COMPONENTS))
    ap.add_argument("--compare", default=None, help="KEY=A,B: two settings timed interleaved "
                    "(several keys changed together: K1=A1,B1;K2=A2,B2)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override (model.*, loss.*)")
    ap.add_argument("--trace", default=None, metavar="DIR",
                    help="also profile the full step(s) with tf.profiler into DIR")
    ap.add_argument("--out", default=None, help="write the JSON report here")
    ap.add_argument("--optimizer-apply", type=int, default=None, metavar="GRAD_ROWS",
                    help="instead: time one apply of each train.optimizer on an [items, 64] "
                         "table with a GRAD_ROWS-row sparse gradient (--rounds/--steps/--warmup)")
    args = ap.parse_args(argv)
    if args.optimizer_apply is not None:
        try:
            result = optimizer_apply(args.items, 64, args.optimizer_apply, args.rounds,
                                     args.steps, args.warmup,
                                     log=lambda msg: print(msg, file=sys.stderr, flush=True))
        except ValueError as err:
            ap.error(str(err))
        cli.print_json(result, args.out)
        return 0
    overrides = parse_sets(ap, args.set)
    try:
        result = run(args.items, args.batch_size, args.history_length, args.negatives,
                     args.exponent, args.batches, args.rounds, args.steps, args.warmup,
                     [c for c in args.components.split(",") if c], args.compare, overrides,
                     args.trace, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    except ValueError as err:
        ap.error(str(err))
    cli.print_json(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

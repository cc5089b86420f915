"""Does XLA (``jit_compile``) speed up the CPU training step? (issue 31): an in-memory benchmark.

The same model, world and batches as :mod:`benchmarks.step_profile` (configs/synthetic-1m.yaml's
ICAN / MicRec over ``--items`` items, batch 4096, history 20, 1000 negatives, Zipf-drawn
batches held in memory), each train step compiled three ways and timed interleaved (ABBA, one
process, median of per-round ratios):

``none``         today's step: ``model.make_train_function()``, no XLA (tf_keras's default on
                 CPU).
``transformer``  only the history transformer compiled: every ``TransformerEncoderBlock`` of
                 the user tower calls its math through ``tf.function(jit_compile=True)``
                 (:func:`jit_transformer_blocks`; the gradient of a compiled function is
                 compiled too).
``step``         the whole train step compiled: ``model.compile(..., jit_compile=True)``
                 (forward, losses, CL samplers, gradient and optimizer apply in one XLA
                 cluster).

Each variant is built for MicRec (``model.cl`` of the config) and for the base model (no CL
terms). A variant whose compilation fails is reported with the ops XLA named
(:func:`unsupported_ops`) and left out of the timing. ``equality``: the user tower's output
and its gradients (loss = sum of squared user vectors) with the transformer compiled, against
the same weights uncompiled. Nothing here changes the model: no option was shipped (see
docs/BENCHMARKS.md, "XLA on CPU (issue 31)"). CLI::

    python -m benchmarks.xla_cpu --items 3900 --rounds 6 --out /tmp/xla.json
"""
from __future__ import annotations

import argparse
import re
import statistics
import sys
import time

import micrec_tf  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow is imported)
from benchmarks import step_profile as sp
from micrec_tf import cli
import numpy as np

VARIANTS = ("none", "transformer", "step")
_UNREGISTERED = re.compile(r"No registered '(\w+)' OpKernel")
_NODE = re.compile(r"Detected at node (\S+)")


def unsupported_ops(message: str) -> dict:
    """What an XLA compilation error names: ``{"ops": [op types without an XLA kernel],
    "nodes": [graph nodes it was detected at], "first_line": the first line naming the
    problem}`` (each list sorted, without repeats)."""
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    first = next((ln for ln in lines if not ln.startswith(("Graph execution error",
                                                           "Detected at node", "<stack"))), "")
    return {"ops": sorted(set(_UNREGISTERED.findall(message))),
            "nodes": sorted(set(_NODE.findall(message))), "first_line": first[:500]}


def jit_transformer_blocks(model) -> int:
    """Makes every ``TransformerEncoderBlock`` of ``model.user_tower`` run its call through
    ``tf.function(jit_compile=True)`` (one compiled function per block and ``training`` value;
    ``mask`` None becomes all true, as the block's own call does; ``block.call.compiled`` holds
    them by ``training``). Returns the number of blocks.
    The variables are the block's own: the weights, and so the function, are unchanged."""
    import tensorflow as tf

    blocks = list(getattr(model.user_tower, "blocks", []))
    for block in blocks:
        plain = block.call
        compiled = {}

        def call(x, mask=None, training=None, plain=plain, compiled=compiled):
            if mask is None:
                mask = tf.ones(tf.shape(x)[:2], dtype=tf.bool)
            key = bool(training)
            if key not in compiled:
                compiled[key] = tf.function(
                    lambda a, m: plain(a, mask=m, training=key), jit_compile=True,
                    autograph=False)
            return compiled[key](x, mask)

        call.compiled = compiled  # {training: the tf.function(jit_compile=True)}
        block.call = call
    return len(blocks)


def _build(cfg, world, cl, variant):
    model = sp._build(cfg, world, cl)
    if variant == "step":
        from micrec_tf.optimizers import make_optimizer

        model.compile(optimizer=make_optimizer(cfg.train), jit_compile=True)
    elif variant == "transformer":
        jit_transformer_blocks(model)
    return model


def tower_equality(cfg, world, batch) -> dict:
    """The user tower with its transformer compiled against the same weights uncompiled, on one
    batch: max |difference| of the user vectors (and their max |value|) and, over the tower's
    variables, max |gradient difference| / max |gradient| of loss = sum(u^2) (variables whose
    gradient is below 1e-6 of the largest are left out: rounding noise around zero)."""
    import tensorflow as tf

    plain, jit = sp._build(cfg, world, []), sp._build(cfg, world, [])
    jit_transformer_blocks(jit)
    plain.user_tower(batch, training=True)
    jit.user_tower(batch, training=True)
    jit.user_tower.set_weights(plain.user_tower.get_weights())
    with tf.GradientTape(persistent=True) as tape:
        ua, ub = plain.user_tower(batch, training=True), jit.user_tower(batch, training=True)
        la, lb = tf.reduce_sum(ua * ua), tf.reduce_sum(ub * ub)
    ga = tape.gradient(la, plain.user_tower.trainable_variables)
    gb = tape.gradient(lb, jit.user_tower.trainable_variables)
    dense = [(tf.convert_to_tensor(x).numpy(), tf.convert_to_tensor(y).numpy())
             for x, y in zip(ga, gb) if x is not None and y is not None]
    top = max(float(np.max(np.abs(x))) for x, _ in dense)
    rel = [float(np.max(np.abs(x - y)) / np.max(np.abs(x))) for x, y in dense
           if np.max(np.abs(x)) > 1e-6 * top]
    return {"user_vec_max_abs_diff": float(np.max(np.abs(ua.numpy() - ub.numpy()))),
            "user_vec_max_abs": float(np.max(np.abs(ua.numpy()))),
            "grad_max_rel_diff": max(rel), "grad_variables": len(rel)}


def probe_step_per_term(cfg, world, data, log=print) -> dict:
    """The whole train step compiled (``jit_compile=True``) for the model with each CL term
    alone and with none: ``{"none" | term: "ok" | unsupported_ops(...)}`` (one step each)."""
    import tensorflow as tf

    out = {}
    for cl in ([],) + tuple([t] for t in cfg.model.cl):
        name = cl[0] if cl else "none"
        try:
            sp._step_fn(_build(cfg, world, cl, "step"), data)()
            out[name] = "ok"
        except (tf.errors.InvalidArgumentError, tf.errors.UnimplementedError) as err:
            out[name] = unsupported_ops(str(err))
        log(f"xla_cpu: whole step compiled, CL terms [{name}]: {out[name]}")
    return out


def run(num_items: int = 3900, batch_size: int = 4096, history_length: int = 20,
        negatives: int = 1000, batches: int = 4, rounds: int = 6, warmup: int = 1,
        variants=VARIANTS, overrides: dict | None = None, probe_terms: bool = False,
        log=print) -> dict:
    """Builds MicRec and base models for each variant, runs each step once (compilation; the
    first loss of each is in ``first_loss``, the same batch and initial weights for all),
    times the ones that compiled (``rounds`` x one step, alternated) and returns the report:
    ``ms``, ``ms_per_round``, ``ratio_none_over`` (median of per-round ratios none / variant:
    > 1 = the variant is faster), ``failed`` ({name: :func:`unsupported_ops`}),
    ``equality`` (:func:`tower_equality`, when ``transformer`` is a variant), ``cpu``;
    ``probe_terms``: also ``step_per_cl_term`` (:func:`probe_step_per_term`)."""
    for name, value in (("num_items", num_items), ("batch_size", batch_size),
                        ("history_length", history_length), ("negatives", negatives),
                        ("batches", batches), ("rounds", rounds)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an int >= 1. Received: {value!r}")
    if not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an int >= 0. Received: {warmup!r}")
    variants = list(variants)
    if not variants or any(v not in VARIANTS for v in variants) or "none" not in variants:
        raise ValueError(f"variants must be a subset of {VARIANTS} that includes 'none'. "
                         f"Received: {variants!r}")
    import tensorflow as tf

    cfg = sp.profile_config(num_items, batch_size, history_length, negatives, overrides)
    world = sp.synthetic_world(num_items, cfg.preprocess.max_tags)
    data = sp.random_batches(world[0], world[5], batches, batch_size, history_length, 1.0)
    fns, first, failed, compile_s = {}, {}, {}, {}
    for variant in variants:
        for kind, cl in (("micrec", list(cfg.model.cl)), ("base", [])):
            name = f"{kind}[{variant}]"
            fn = sp._step_fn(_build(cfg, world, cl, variant), data)
            t0 = time.perf_counter()
            try:
                first[name] = fn()
            except (tf.errors.InvalidArgumentError, tf.errors.UnimplementedError) as err:
                failed[name] = unsupported_ops(str(err))
                log(f"xla_cpu: {name} failed to compile: {failed[name]}")
                continue
            compile_s[name] = round(time.perf_counter() - t0, 1)
            log(f"xla_cpu: {name} first step (tracing + compilation) {compile_s[name]} s, "
                f"loss {first[name]:.7g}")
            fns[name] = fn
    equality = tower_equality(cfg, world, data[0]) if "transformer" in variants else {}
    probe = probe_step_per_term(cfg, world, data, log) if probe_terms else None
    per_round = sp._time_rounds(fns, rounds, 1, warmup, log)
    ratios = {}
    for name in per_round:
        kind = name.split("[")[0]
        if name != f"{kind}[none]" and f"{kind}[none]" in per_round:
            ratios[name] = round(statistics.median(
                [a / b for a, b in zip(per_round[f"{kind}[none]"], per_round[name])]), 3)
    return {"config": {"num_items": num_items, "batch_size": batch_size,
                       "history_length": history_length, "negatives": negatives,
                       "cl": list(cfg.model.cl), "overrides": dict(overrides or {})},
            "cpu": sp.cpu_info(), "tensorflow": tf.__version__, "first_loss": first,
            "first_step_s": compile_s, "failed": failed, "equality": equality,
            "ms": {n: round(statistics.median(r) * 1000, 1) for n, r in per_round.items()},
            "ms_per_round": {n: [round(x * 1000, 1) for x in r] for n, r in per_round.items()},
            "ratio_none_over": ratios,
            **({"step_per_cl_term": probe} if probe is not None else {}),
            "method": (f"{batches} random batches in memory; {warmup} warm-up call(s) each, then "
                       f"{rounds} rounds x 1 step, functions alternated (ABBA); ms = median over "
                       "rounds, ratio = median of per-round ratios none / variant")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.xla_cpu",
                                 description=__doc__.split("\n")[0])
    sp.add_world_arguments(ap, items=3900)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override (model.*, loss.*, train.optimizer)")
    ap.add_argument("--probe-terms", action="store_true",
                    help="also compile the whole step with each CL term alone")
    ap.add_argument("--out", default=None, help="write the JSON report here")
    args = ap.parse_args(argv)
    overrides = sp.parse_sets(ap, args.set)
    try:
        result = run(args.items, args.batch_size, args.history_length, args.negatives,
                     args.batches, args.rounds, args.warmup,
                     [v for v in args.variants.split(",") if v], overrides, args.probe_terms,
                     log=lambda msg: print(msg, file=sys.stderr, flush=True))
    except ValueError as err:
        ap.error(str(err))
    cli.print_json(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark section 2: steady-state training step time of ICAN (no CL) and MicRec (all CL terms).

The same fixed batches held in memory, the compiled Keras train function, warm-up steps, then
rounds that alternate the models (ABBA); also today's user-tower code paths against the old ones,
and float32 vs mixed precision when TensorFlow sees a GPU.
"""
from __future__ import annotations

import os
import time

from micrec_tf.config import CL_TASKS

from benchmarks.harness import ROOT, log, median, rounded, run_child
from benchmarks.preprocessing import generate_synthetic, synthetic_overrides, synthetic_spec

ALL_CL = list(CL_TASKS)


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
    generate_synthetic(syn, data_dir)
    overrides = synthetic_overrides("fallback", data_dir, os.path.join(work, "fallback"), syn)
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
            per_round[name].append(median(times))
        log(f"training[{precision}]: round {r + 1}: " + ", ".join(
            f"{n} {per_round[n][-1] * 1000:.0f} ms" for n in names))
    tf_keras.mixed_precision.set_global_policy("float32")
    # Releasing traced train functions costs TF tens of seconds; the run keeps them until its report
    # is written, so that the cost never falls inside a timed section.
    keep_alive.append((models, fns, iters, data))
    out = {}
    for name in names:
        step = median(per_round[name])
        out[name] = {"cl": variants[name][0], "code_paths": "old" if variants[name][1] else "new",
                     "losses": losses[name],
                     "step_ms": rounded(step * 1000),
                     "step_ms_per_round": [rounded(x * 1000) for x in per_round[name]],
                     "examples_per_s": rounded(batch / step),
                     "build_s": rounded(build_s[name]), "warmup_s": rounded(warm_s[name])}
    ratios = {name: [a / b for a, b in zip(per_round[name], per_round["base"])]
              for name in names if name != "base"}
    # Today's code paths over the old ones, same model, per round (one number per model).
    for name in ("base", "micrec"):
        ratios[f"{name}_new_over_old"] = [
            a / b for a, b in zip(per_round[name], per_round[f"{name}_old"])]
    return out, {n: rounded(median(r), 4) for n, r in ratios.items()}, \
        {n: [rounded(x, 4) for x in r] for n, r in ratios.items()}, models["micrec"]


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

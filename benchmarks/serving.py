"""Benchmark section 5: the user-tower SavedModel, loaded in a fresh process as TF Serving loads it.

Latency p50/p99 of single requests and throughput at batch 64, on requests from real test users.
"""
from __future__ import annotations

import json
import os
import shutil
import time

import numpy as np

from benchmarks.harness import ROOT, median, rounded, run_child
from benchmarks.training import training_artifacts


def child_serve(args: dict) -> dict:
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
    out_dir = os.path.join(work, "user_tower")
    shutil.rmtree(out_dir, ignore_errors=True)
    t0 = time.perf_counter()
    serving.save_user_tower(model, art.user_fields, export_model.vocab_files(art),
                            export_model.history_length(art, cfg), out_dir)
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
    med = {k: median(r[k] for r in reps) for k in reps[0]}
    hist = [len(r[serving.HISTORY_INPUT]) for r in reqs]
    return {"model": f"user tower SavedModel of export/serving.py, {weights}",
            "artifacts": os.path.relpath(art.path, ROOT) if art.path.startswith(ROOT) else art.path,
            "requests": f"{len(reqs)} real test users (raw string features, "
                        f"history length mean {np.mean(hist):.1f})",
            "method": (f"fresh process, tf.saved_model.load, signature serving_default called "
                       f"with tf.string tensors built beforehand; {p['serving_single']} single "
                       f"requests and {p['serving_batch_calls']} calls at batch {bsz} per repeat, "
                       f"{p['serving_repeats']} repeats; figures are medians over repeats"),
            "save_s": rounded(save_s), "load_s": rounded(res["load_s"]),
            "first_call_ms": rounded(res["first_call_s"] * 1000),
            "peak_rss_mib": rounded(res["peak_rss_mib"]),
            "threads": res["threads"],
            "latency_ms_p50": rounded(med["p50_ms"]), "latency_ms_p99": rounded(med["p99_ms"]),
            "latency_ms_mean": rounded(med["mean_ms"]),
            "batch": bsz, "batch_latency_ms_p50": rounded(med["batch_p50_ms"]),
            "batch_examples_per_s": rounded(med["batch_examples_per_s"]),
            "repeats": [{k: rounded(v) for k, v in r.items()} for r in reps],
            "headline": {"latency_ms_p50": rounded(med["p50_ms"]),
                         "latency_ms_p99": rounded(med["p99_ms"]),
                         "batch64_examples_per_s": rounded(med["batch_examples_per_s"])}}

"""The scale benchmark (``BENCH_SCALE=1 make bench``): every stage at 10 k, 100 k and 1 M items.

    python -m benchmarks.scale --config configs/synthetic-1m.yaml [--items 10000 100000 1000000]
                               [--stages generate preprocess ...] [--force]

Each catalogue size ``n`` is the config's synthetic world scaled: ``n`` items, ``n / 2`` users,
``10 n`` events (the 1 M point is ``configs/synthetic-1m.yaml`` itself), named ``scale-<n>``.
Every stage is the product's own command line, run as a child process; its wall time and peak
RSS (``wait4``'s ``ru_maxrss`` of the child) are recorded with what the stage measured itself
(preprocess stats, title-neighbour recall, the trained models' HIT@N, the index recall) in
``docs/results/scale/<n>/<stage>.json``. A finished stage is not run again unless ``--force``:
an interrupted run continues where it stopped, on this machine or another one.

Stages, in order: ``generate`` (synthetic TSV files), ``preprocess`` (Beam, DirectRunner),
``title_neighbours`` (all-MiniLM-L6-v2; ScaNN above ``semantic.exact_max_items``), ``train_ican``
(ICAN, no CL) and ``train_micrec`` (ICAN + feature, semantic and session CL), each
``train.epochs`` epochs of sampled softmax, ``export`` (the MicRec run), ``retrieval`` (the
export's ScaNN index on the MicRec run's test users: recall@K against exact search and QPS at
batch 1 and 256, beside two exact searches: TensorFlow ``matmul`` + ``top_k`` and numpy, the
latter in a child with ``OPENBLAS_CORETYPE`` unset, which this machine's environment sets to a
slower kernel).

The report (``--report``) writes the per-stage tables and the log-log scaling exponent of each
stage's wall time and peak RSS over the sizes measured, into ``docs/results/scale.md``.
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "docs", "results", "scale")
SIZES = (10_000, 100_000, 1_000_000)
STAGES = ("generate", "preprocess", "title_neighbours", "train_ican", "train_micrec", "export",
          "retrieval")
# Per-size overrides: a scaled copy of the config's synthetic world.
EVENTS_PER_ITEM = 10
USERS_PER_ITEM = 0.5


def log(msg: str) -> None:
    print(f"[scale {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def overrides(items: int) -> list:
    name = f"scale-{items}"
    return [f"name={name}", f"data.data_dir=data/generated/{name}",
            f"data.synthetic.num_items={items}",
            f"data.synthetic.num_users={int(items * USERS_PER_ITEM)}",
            f"data.synthetic.num_events={items * EVENTS_PER_ITEM}"]


def run_dir(items: int, model: str) -> str:
    return os.path.join("runs", f"scale-{items}-{model}")


def command(stage: str, config: str, items: int) -> list:
    sets = [a for o in overrides(items) for a in ("--set", o)]
    py = [sys.executable, "-m"]
    base = ["--config", config] + sets
    if stage == "generate":
        return py + ["micrec_tf.data.synthetic"] + base
    if stage == "preprocess":
        return py + ["pipelines.preprocess"] + base
    if stage == "title_neighbours":
        return py + ["pipelines.title_neighbours"] + base
    if stage == "train_ican":
        return py + ["micrec_tf.train"] + base + ["--set", "model.cl=[]",
                                                 "--run-dir", run_dir(items, "ican")]
    if stage == "train_micrec":
        return py + ["micrec_tf.train"] + base + ["--run-dir", run_dir(items, "micrec")]
    if stage == "export":
        return py + ["export.export_model"] + base + ["--run-dir", run_dir(items, "micrec")]
    if stage == "retrieval":
        return py + ["benchmarks.scale", "--config", config, "--measure-retrieval", str(items)]
    raise ValueError(f"unknown stage. Received: {stage!r} (one of {list(STAGES)})")


def run_stage(stage: str, config: str, items: int, log_dir: str) -> dict:
    """Runs one stage in a child process; -> wall_s, peak_rss_mib, rc (and the log's path)."""
    os.makedirs(log_dir, exist_ok=True)
    log_path = os.path.join(log_dir, f"{stage}.log")
    env = dict(os.environ)
    if stage == "retrieval":
        env.pop("OPENBLAS_CORETYPE", None)  # numpy's fast kernel for its exact search
    cmd = command(stage, config, items)
    log(f"{items:,} items: {stage}: {' '.join(cmd[1:])}")
    start = time.time()
    with open(log_path, "w", encoding="utf-8") as fh:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.time() - start
    rc = os.waitstatus_to_exitcode(status)
    out = {"stage": stage, "items": items, "rc": rc, "wall_s": round(wall, 1),
           "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
           "cpu_s": round(usage.ru_utime + usage.ru_stime, 1), "command": cmd[2:],
           "date": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}
    if rc:
        with open(log_path, encoding="utf-8", errors="replace") as fh:
            out["log_tail"] = fh.read()[-3000:]
    log(f"{items:,} items: {stage}: rc {rc}, {wall:.0f} s, peak RSS {out['peak_rss_mib']:,.0f} MiB")
    return out


def _json(path: str):
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def stage_metrics(stage: str, items: int) -> dict:
    """What the stage measured itself, read from its outputs."""
    name = f"scale-{items}"
    art = os.path.join(ROOT, "artifacts", name)
    if stage == "preprocess":
        s = _json(os.path.join(art, "stats.json"))
        return {k: s[k] for k in ("events", "users", "items", "pairs", "pairs_distinct",
                                  "num_examples")}
    if stage == "title_neighbours":
        path = os.path.join(art, "title_neighbours", "stats.json")
        if not os.path.exists(path):
            return {}
        s = _json(path)
        return {k: s.get(k) for k in ("mode", "embedded", "recall_sample", "timing")}
    if stage.startswith("train_"):
        m = _json(os.path.join(ROOT, run_dir(items, stage[len("train_"):]), "metrics.json"))
        return {k: m.get(k) for k in ("seconds", "epochs_run", "best_epoch", "valid", "test")}
    if stage == "export":
        from export.serving import latest_version, version_dir

        root = os.path.join(ROOT, "exports", name)
        if latest_version(root) is None:
            return {}
        params = os.path.join(version_dir(root, latest_version(root)), "scann", "params.json")
        return {"index": _json(params) if os.path.exists(params) else None}
    if stage == "retrieval":
        return _json(os.path.join(OUT, str(items), "retrieval-measured.json"))
    return {}


# ------------------------------------------------------------------------------------ retrieval

def _qps(fn, queries, batch: int, repeats: int) -> dict:
    """Median seconds per call of ``fn`` on ``repeats`` batches -> QPS and p50 latency."""
    times = []
    for r in range(repeats):
        q = queries[(r * batch) % len(queries):][:batch]
        if len(q) < batch:
            q = queries[:batch]
        t = time.perf_counter()
        fn(q)
        times.append(time.perf_counter() - t)
    times.sort()
    med = times[len(times) // 2]
    return {"qps": round(batch / med, 1), "p50_ms": round(med * 1000, 3), "calls": repeats}


def measure_retrieval(config: str, items: int, k: int = 500, num_queries: int = 1024) -> dict:
    """The export's ScaNN index vs exact search on real test users of the MicRec run."""
    import numpy as np

    from export.export_model import recall_queries, restore_for_export
    from export.item_index import recall_at_k
    from export.serving import latest_version, version_dir
    from micrec_tf import search

    import tensorflow as tf

    name = f"scale-{items}"
    model, cfg, art = restore_for_export(os.path.join(ROOT, run_dir(items, "micrec")))
    queries = recall_queries(model, art, max_rows=num_queries, seed=1)
    export_root = os.path.join(ROOT, cfg.export.exports_dir, name)
    version = version_dir(export_root, latest_version(export_root))
    vectors = np.load(os.path.join(version, "item_embeddings", "embeddings.npy"))
    params = _json(os.path.join(version, "scann", "params.json"))
    searcher = search.load_scann_searcher(os.path.join(version, "scann"))
    k = min(k, len(vectors) - 1)

    vt = tf.constant(vectors)

    @tf.function(jit_compile=False)
    def tf_top_k(q):
        return tf.math.top_k(tf.linalg.matmul(q, vt, transpose_b=True), k=k).indices

    def tf_search(q):
        return tf_top_k(tf.constant(q)).numpy()

    def np_search(q):
        return search.top_k_dot(q, vectors, k, batch_size=256)[0]

    def scann_search(q):
        return search.search_scann(searcher, params, q, k, len(vectors))[0]

    exact = np.concatenate([tf_search(queries[i:i + 256]) for i in range(0, len(queries), 256)])
    exact_np = np.concatenate([np_search(queries[i:i + 256])
                               for i in range(0, len(queries), 256)])
    approx = scann_search(queries)
    res = {"items": int(len(vectors)), "dim": int(vectors.shape[1]), "k": int(k),
           "queries": int(len(queries)),
           "scann_params": {key: params.get(key) for key in (
               "num_leaves", "num_leaves_to_search", "reorder_k", "measured_recall")},
           "recall_at_k_scann": round(float(recall_at_k(approx, exact)), 4),
           "recall_at_k_numpy_vs_tf": round(float(recall_at_k(exact_np, exact)), 4),
           "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE")}
    tf_search(queries[:1])  # trace both shapes once
    tf_search(queries[:256])
    for label, fn in (("scann", scann_search), ("tf_matmul_top_k", tf_search),
                      ("numpy", np_search)):
        res[label] = {"batch_1": _qps(fn, queries, 1, 100 if label == "scann" else 30),
                      "batch_256": _qps(fn, queries, 256, 4)}
        log(f"retrieval {label}: {res[label]}")
    for b in ("batch_1", "batch_256"):
        scann_qps = res["scann"][b]["qps"]
        res[f"speedup_vs_tf_{b}"] = round(scann_qps / res["tf_matmul_top_k"][b]["qps"], 2)
        res[f"speedup_vs_numpy_{b}"] = round(scann_qps / res["numpy"][b]["qps"], 2)
    return res


# ------------------------------------------------------------------------------------ report

def fit_exponent(xs, ys):
    """Least-squares slope of log y on log x (None with fewer than 2 positive points)."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x > 0 and y and y > 0]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    den = sum((p[0] - mx) ** 2 for p in pts)
    return round(sum((p[0] - mx) * (p[1] - my) for p in pts) / den, 3) if den else None


def load_results(out_dir: str = OUT) -> dict:
    res = {}
    for path in glob.glob(os.path.join(out_dir, "*", "*.json")):
        if path.endswith("-measured.json"):
            continue
        r = _json(path)
        res.setdefault(r["items"], {})[r["stage"]] = r
    return res


def _size(n: int) -> str:
    return f"{n // 1_000_000}M" if n % 1_000_000 == 0 else f"{n // 1000}k"


def _cell(x, fmt: str = "{:.4f}") -> str:
    return "" if x is None else fmt.format(x)


def model_table(res: dict) -> list:
    """Markdown rows: the trained models' test metrics at each size (exact ranking over the whole
    catalogue; ``clicks`` = test clicks ranked, a fixed sample where the config caps them)."""
    rows = ["| items | model | epochs | epoch s | test clicks | HIT@50 | HIT@500 | coverage@50 "
            "| coverage@500 | long-tail HIT@50 (clicks) |", "|---" * 10 + "|"]
    for n in sorted(res):
        for stage, label in (("train_ican", "ICAN"), ("train_micrec", "MicRec (feature + "
                                                                      "semantic + session CL)")):
            r = res[n].get(stage)
            m = (r or {}).get("metrics") or {}
            t = m.get("test") or {}
            if r is None or r["rc"] or not t:
                continue
            tail = (f"{t['long_tail/hit@50']:.4f} ({t['long_tail/num_clicks']:,})"
                    if "long_tail/hit@50" in t else "")
            rows.append(f"| {n:,} | {label} | {m.get('epochs_run')} | "
                        f"{_cell(m.get('seconds'), '{:,.0f}')} | {t.get('num_clicks', 0):,} | "
                        f"{_cell(t.get('hit@50'))} | {_cell(t.get('hit@500'))} | "
                        f"{_cell(t.get('coverage@50'), '{:.5f}')} | "
                        f"{_cell(t.get('coverage@500'), '{:.5f}')} | "
                        f"{tail} |")
    return rows


def retrieval_table(res: dict) -> list:
    """Markdown rows: the export's ScaNN index against the two exact searches at each size."""
    rows = ["| items | queries | ScaNN recall@K | search | QPS batch 1 | QPS batch 256 |",
            "|---|---|---|---|---|---|"]
    for n in sorted(res):
        r = res[n].get("retrieval")
        m = (r or {}).get("metrics") or {}
        if r is None or r["rc"] or "scann" not in m:
            continue
        for label, name in (("scann", "ScaNN (export's index)"),
                            ("tf_matmul_top_k", "exact: TF matmul + top_k"),
                            ("numpy", "exact: numpy (OPENBLAS_CORETYPE unset)")):
            q = m[label]
            rows.append(f"| {n:,} | {m['queries']:,} | "
                        f"{m['recall_at_k_scann']:.4f} @ {m['k']} | {name} | "
                        f"{q['batch_1']['qps']:,.0f} | {q['batch_256']['qps']:,.0f} |")
    return rows


def report(out_dir: str = OUT) -> str:
    text = report_text(load_results(out_dir))
    with open(os.path.join(os.path.dirname(out_dir), "scale.md"), "w", encoding="utf-8") as fh:
        fh.write(text)
    update_benchmarks_md(text)
    return text


def report_text(res: dict) -> str:
    """The scale report (markdown) from ``{items: {stage: result}}``."""
    sizes = sorted(res)
    L = ["# Scale: every stage at 10 k, 100 k and 1 M items", "",
         "Generated by `python -m benchmarks.scale --report` from the stage results in "
         "`docs/results/scale/<items>/` (`BENCH_SCALE=1 make bench` runs the stages; each size "
         f"is the synthetic-1m world scaled: n items, n/2 users, {EVENTS_PER_ITEM} n events). "
         "Wall time and peak RSS per stage are those of the stage's own command, run as a child "
         "process on this machine (2 cores); a stage not listed at a size has not been run yet.",
         "", "| stage | " + " | ".join(f"{n:,} items" for n in sizes)
         + " | exponent (time) | exponent (RSS) |",
         "|---|" + "---|" * len(sizes) + "---|---|"]
    for stage in STAGES:
        cells, ts, rs, xs = [], [], [], []
        for n in sizes:
            r = res[n].get(stage)
            if not r:
                cells.append("not run")
                continue
            if r["rc"]:
                cells.append(f"failed (rc {r['rc']})")
                continue
            cells.append(f"{r['wall_s']:,.0f} s, {r['peak_rss_mib']:,.0f} MiB")
            xs.append(n)
            ts.append(r["wall_s"])
            rs.append(r["peak_rss_mib"])
        et, er = fit_exponent(xs, ts), fit_exponent(xs, rs)
        # An exponent over fewer sizes than the table's says which ones it spans.
        span = "" if xs == sizes else f" ({_size(xs[0])}-{_size(xs[-1])} only)" if xs else ""
        L.append(f"| {stage} | " + " | ".join(cells)
                 + f" | {'' if et is None else f'{et}{span}'} "
                 f"| {'' if er is None else f'{er}{span}'} |")
    L += ["", "Exponent: least-squares slope of log(wall time) or log(peak RSS) on log(items) "
          "over the sizes measured (1 = linear; fixed start-up costs pull it below 1 at small "
          "sizes).", ""]
    vocab = [f"{_size(n)}: {res[n]['preprocess']['metrics']['items']:,}" for n in sizes
             if (res[n].get("preprocess") or {}).get("metrics", {}).get("items")]
    if vocab:
        L += ["Items with a training click (the models' vocabulary, the exported vectors and the "
              "index; a test click on any other catalogue item is an out-of-vocabulary miss): "
              + ", ".join(vocab) + ".", ""]
    models, retrieval = model_table(res), retrieval_table(res)
    if len(models) > 2:
        L += ["### Models (test split, exact ranking over the catalogue)", ""] + models + [
            "", "Each run stopped at its epoch cap (`train.epochs`): not converged. Long tail: "
            "the test clicks on the 80 % least-clicked catalogue items (training clicks).", ""]
    if len(retrieval) > 2:
        L += ["### Retrieval (the MicRec export, real test users; recall against the TF exact "
              "search)", ""] + retrieval + [""]
    for n in sizes:
        L += [f"## {n:,} items", ""]
        for stage in STAGES:
            r = res[n].get(stage)
            if r and r.get("metrics"):
                L.append(f"- **{stage}**: `{json.dumps(r['metrics'], sort_keys=True)}`")
        L.append("")
    return "\n".join(L)


SCALE_BEGIN, SCALE_END = "<!-- scale:begin -->", "<!-- scale:end -->"


def update_benchmarks_md(text: str, path: str = os.path.join(ROOT, "docs", "BENCHMARKS.md")):
    """Puts ``text`` (its title demoted to a section) between the scale markers of
    BENCHMARKS.md, after the sections ``make bench`` keeps (appended the first time)."""
    from benchmarks.report import HAND_MARKER

    with open(path, encoding="utf-8") as fh:
        old = fh.read()
    body = text.replace("# Scale:", "## Scale:", 1).replace("\n## ", "\n### ")
    block = f"{SCALE_BEGIN}\n{body.rstrip()}\n{SCALE_END}"
    if SCALE_BEGIN in old and SCALE_END in old:
        head, rest = old.split(SCALE_BEGIN, 1)
        new = head + block + rest.split(SCALE_END, 1)[1]
    else:
        if HAND_MARKER not in old:
            old = old.rstrip("\n") + "\n\n" + HAND_MARKER + "\n"
        new = old.rstrip("\n") + "\n\n" + block + "\n"
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(new)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/synthetic-1m.yaml")
    ap.add_argument("--items", type=int, nargs="+", default=list(SIZES))
    ap.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    ap.add_argument("--force", action="store_true", help="re-run finished stages")
    ap.add_argument("--report", action="store_true", help="only write docs/results/scale.md")
    ap.add_argument("--measure-retrieval", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.measure_retrieval:
        res = measure_retrieval(args.config, args.measure_retrieval)
        path = os.path.join(OUT, str(args.measure_retrieval), "retrieval-measured.json")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(res, fh, indent=1, sort_keys=True)
        return 0
    if not args.report:
        for n in args.items:
            for stage in args.stages:
                path = os.path.join(OUT, str(n), f"{stage}.json")
                if os.path.exists(path) and not args.force and not _json(path)["rc"]:
                    log(f"{n:,} items: {stage}: done before ({path})")
                    continue
                r = run_stage(stage, args.config, n, os.path.join(ROOT, "runs", "scale-logs",
                                                                 str(n)))
                if not r["rc"]:
                    r["metrics"] = stage_metrics(stage, n)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "w", encoding="utf-8") as fh:
                    json.dump(r, fh, indent=1, sort_keys=True)
                if r["rc"]:
                    log(f"{n:,} items: {stage} failed; later stages of this size skipped "
                        f"(log: runs/scale-logs/{n}/{stage}.log)")
                    break
    print(report())
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Load generator for the online service (``python -m export.server``): bounded request loops.

``python -m benchmarks.serve_load --url http://127.0.0.1:8501 --model user_tower --verb retrieve
--concurrency 1,8,32 --requests 2000 --body-file body.json [--inprocess exports/ml-1m/<v>]
[--output serve_load.json]``

For each concurrency ``c``: exactly ``--requests`` requests, sent by ``c`` threads (one keep-alive
``http.client`` connection each: the standard library, no new dependency; an HTTP/1.1 client per
thread measures what a pool of blocking clients sees, which is how TF Serving's REST clients are
usually written) that take the next request number from a shared counter and stop when it passes
``--requests``. The loops end by themselves; each request has a socket timeout (``--timeout``).

``--body-file``: one JSON request body (an object), a JSON list of bodies, or JSON lines; request
``i`` sends body ``i mod len(bodies)``.

Prints one line per concurrency and writes JSON (``--output``, default ``serve_load.json``)::

    {"url", "model", "verb", "requests", "bodies",
     "levels": [{"concurrency", "requests", "seconds", "throughput_rps", "p50_ms", "p99_ms",
                 "mean_ms", "max_ms", "codes": {"200": n, "503": n, "error:ConnectionError": n},
                 "versions": {"100": n}}, ...],
     "inprocess": {...} | null, "overhead_p50": {"<c>": ratio} | null}

``latency`` is the wall time of one request (send to last byte read) in milliseconds, over all
requests of the level, successful or not; ``p50`` / ``p99`` are nearest-rank percentiles.
``versions`` counts the ``model_version`` of the ``:retrieve`` answers (a swap under load shows
as two keys). ``--inprocess <version dir>`` also runs the same bodies through the in-process
:class:`micrec_tf.retrieval.Retriever` (parsed by the server's own parser, then the tower and the
search the server runs, one request at a time), and reports ``overhead_p50``: the service's p50
at each concurrency over the in-process p50.
"""
from __future__ import annotations

import argparse
import http.client
import itertools
import json
import math
import sys
import threading
import time
import urllib.parse
from collections import Counter

VERBS = ("retrieve", "predict")


def read_bodies(path: str) -> list:
    """Request bodies (JSON text, bytes) from ``path``: an object, a list of objects or JSON lines."""
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    try:
        data = json.loads(text)
        bodies = data if isinstance(data, list) else [data]
    except json.JSONDecodeError:
        bodies = [json.loads(line) for line in text.splitlines() if line.strip()]
    if not bodies or not all(isinstance(b, dict) for b in bodies):
        raise ValueError(f"{path}: needs one JSON object, a JSON list of objects or JSON lines "
                         "of objects")
    return [json.dumps(b).encode("utf-8") for b in bodies]


def percentile(values: list, q: float) -> float:
    """Nearest-rank ``q`` percentile (0 < q <= 100) of ``values`` (non-empty)."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return float(ordered[rank - 1])


def summarize(latencies_s: list, codes: Counter, versions: Counter, seconds: float,
              concurrency: int) -> dict:
    """One level's figures (module docstring)."""
    ms = [x * 1000.0 for x in latencies_s]
    return {"concurrency": concurrency, "requests": len(ms), "seconds": seconds,
            "throughput_rps": len(ms) / seconds if seconds > 0 else None,
            "p50_ms": percentile(ms, 50) if ms else None,
            "p99_ms": percentile(ms, 99) if ms else None,
            "mean_ms": sum(ms) / len(ms) if ms else None, "max_ms": max(ms) if ms else None,
            "codes": dict(sorted(codes.items())), "versions": dict(sorted(versions.items()))}


def run_level(url: str, path: str, bodies: list, requests: int, concurrency: int,
              timeout: float = 60.0) -> dict:
    """``requests`` POSTs of ``bodies`` (cycled) to ``url`` + ``path`` by ``concurrency`` threads."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"--url must be http://host:port, got {url!r}")
    host, port = parts.hostname, parts.port or 80
    counter, lock = itertools.count(), threading.Lock()
    results: list = []  # (latency s, code key, version or None), appended under lock

    def worker():
        conn, local = None, []
        while True:
            with lock:
                i = next(counter)
            if i >= requests:
                break
            body = bodies[i % len(bodies)]
            start = time.perf_counter()
            version = None
            try:
                if conn is None:
                    conn = http.client.HTTPConnection(host, port, timeout=timeout)
                conn.request("POST", path, body=body,
                             headers={"Content-Type": "application/json"})
                resp = conn.getresponse()
                data = resp.read()
                code = str(resp.status)
                if resp.status == 200:
                    try:
                        version = json.loads(data).get("model_version")
                    except (ValueError, AttributeError):
                        version = None
                if resp.getheader("connection", "").lower() == "close":
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException) as err:
                code = f"error:{type(err).__name__}"
                if conn is not None:
                    conn.close()
                conn = None
            local.append((time.perf_counter() - start, code, version))
        if conn is not None:
            conn.close()
        with lock:
            results.extend(local)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    return summarize([r[0] for r in results], Counter(r[1] for r in results),
                     Counter(str(r[2]) for r in results if r[2] is not None), seconds,
                     concurrency)


def run_inprocess(version_dir: str, bodies: list, requests: int, verb: str) -> dict:
    """The same bodies through the in-process Retriever, one at a time: the server's parser,
    then its tower call (``predict`` stops there) and its search."""
    import numpy as np

    from export import server, serving
    from micrec_tf.retrieval import Retriever

    r = Retriever.load(version_dir)
    dim = int(r.vectors.shape[1])
    limits = server.Limits()

    def one(body: bytes):
        if verb == "predict":
            tensors, _ = server.parse_predict_request(body, r.specs, limits)
            return r._vectors(tensors)
        req = server.parse_retrieve_request(body, r.specs, dim, r.top_k, limits)
        vectors = req.vectors if req.vectors is not None else r._vectors(req.columns)
        exclude = req.exclude
        if exclude == "history":
            exclude = [[h for h in row if h] for row in req.columns[serving.HISTORY_INPUT]]
        return r.search(np.asarray(vectors, np.float32), req.k, exclude)

    one(bodies[0])  # warm-up, not counted
    latencies = []
    start = time.perf_counter()
    for i in range(requests):
        t0 = time.perf_counter()
        one(bodies[i % len(bodies)])
        latencies.append(time.perf_counter() - t0)
    seconds = time.perf_counter() - start
    out = summarize(latencies, Counter({"ok": requests}), Counter(), seconds, 1)
    out["version_dir"] = version_dir
    return out


def _concurrency(text: str) -> list:
    try:
        levels = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        levels = []
    if not levels or any(c < 1 for c in levels):
        raise argparse.ArgumentTypeError(f"--concurrency takes positive integers separated by "
                                         f"commas. Received: {text!r}")
    return levels


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer. Received: {text!r}")
    return n


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.serve_load", description=__doc__
                                .split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--url", required=True, help="http://host:port of the service")
    p.add_argument("--model", default="user_tower", help="<name> of /v1/models/<name>")
    p.add_argument("--verb", default="retrieve", choices=VERBS)
    p.add_argument("--concurrency", type=_concurrency, default=[1, 8, 32],
                   help="comma-separated client counts (default 1,8,32)")
    p.add_argument("--requests", type=_positive, default=1000,
                   help="requests per concurrency level (default 1000)")
    p.add_argument("--body-file", required=True, help="request body JSON (module docstring)")
    p.add_argument("--timeout", type=float, default=60.0, help="socket timeout per request (s)")
    p.add_argument("--inprocess", default=None,
                   help="export version dir: also time the in-process Retriever on the bodies")
    p.add_argument("--output", default="serve_load.json", help="JSON results (default "
                   "serve_load.json)")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    bodies = read_bodies(args.body_file)
    path = f"/v1/models/{args.model}:{args.verb}"
    levels = []
    for c in args.concurrency:
        level = run_level(args.url, path, bodies, args.requests, c, args.timeout)
        levels.append(level)
        print(f"c={c:<4} n={level['requests']} {level['throughput_rps']:.1f} req/s "
              f"p50 {level['p50_ms']:.2f} ms p99 {level['p99_ms']:.2f} ms codes {level['codes']}",
              flush=True)
    inprocess = overhead = None
    if args.inprocess:
        inprocess = run_inprocess(args.inprocess, bodies, args.requests, args.verb)
        overhead = {str(lv["concurrency"]): lv["p50_ms"] / inprocess["p50_ms"] for lv in levels
                    if inprocess["p50_ms"]}
        print(f"in-process: {inprocess['throughput_rps']:.1f} req/s p50 "
              f"{inprocess['p50_ms']:.2f} ms p99 {inprocess['p99_ms']:.2f} ms; service p50 / "
              f"in-process p50: {overhead}", flush=True)
    result = {"url": args.url, "model": args.model, "verb": args.verb,
              "requests": args.requests, "bodies": len(bodies), "levels": levels,
              "inprocess": inprocess, "overhead_p50": overhead}
    with open(args.output, "w", encoding="utf-8") as fh:
        json.dump(result, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

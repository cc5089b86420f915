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
                 "mean_ms", "max_ms", "reconnects",
                 "codes": {"200": n, "503": n, "error:ConnectionError": n},
                 "versions": {"100": n}}, ...],
     "inprocess": {...} | null, "overhead_p50": {"<c>": ratio} | null}

``latency`` is the wall time of one request (send to last byte read) in milliseconds, over all
requests of the level, successful or not; ``p50`` / ``p99`` are nearest-rank percentiles.

**Stale keep-alive connections** (both loops; :func:`post_json_counted`): a request whose
attempt on a REUSED connection fails before any byte of the answer with ``BrokenPipeError``,
``ConnectionResetError`` or ``http.client.RemoteDisconnected`` (the server closed the idle
connection: uvicorn does after 5 s) is sent once more on a fresh connection, as urllib3 /
requests do for a stale pooled connection; its status is the retry's, and its latency counts
from the FIRST attempt (the time a user would have waited). Each level's ``reconnects``
counts those requests (open loop: and the per-rate line). A failure on a fresh connection (a
refusal, a drop, the retry's own failure) is a connection error (``"error:<exception>"``),
never retried. Before this rule (2026-12-07 20:00 UTC) such a request was one connection
error. (``benchmarks.serve_swap`` keeps one attempt: :func:`post_json`.)

**Open loop** (``--rate R[,R2,...]`` with ``--duration S`` or ``--requests N``, instead of
``--concurrency``): per rate, requests are sent on a schedule, whatever the answers.
``--arrivals fixed`` (the default, the only schedule before ``--arrivals`` existed): a
FIXED-INTERVAL schedule, request ``i`` at ``i / R`` seconds after the level's start: ``N``
requests, or with ``--duration`` every ``i`` with ``i / R < S``, i.e. ``ceil(R x S)`` (exactly
``R x S`` when that is a whole number). ``--arrivals poisson [--seed K]`` (default seed 0): a
Poisson process, exponential gaps of mean ``1 / R`` drawn from ``numpy.random.default_rng(K)``
(the first request after one gap): ``N`` requests, or every arrival before ``S`` (a random count
of mean ``R x S``); the same seed gives the same schedule (:func:`schedule`). The summary's
``arrivals`` says which (and the file's ``seed`` for Poisson). They are sent by a pool of
``--workers`` threads (default 256, each with its
own keep-alive connection); a request whose time comes while every worker is busy is NOT sent
and counted as ``"dropped_client"`` (the schedule is never delayed). Its latency runs from its
SCHEDULED time to the last byte of the answer, so a late send (the client's own queueing)
counts. Per rate: ``arrivals``, ``scheduled``, ``sent``, ``dropped_client``, ``offered_rps`` (= R),
``achieved_rps`` (HTTP answers of any status per second) and ``ok_rps`` (200s per second) over
``seconds`` = max(N / R, the last answer's time) (Poisson with ``--duration``: max(S, the last
answer's time)), latency ``p50_ms`` / ``p99_ms`` / ``mean_ms`` /
``max_ms`` over the sent requests, ``reconnects``, and ``ok_p50_ms`` / ``ok_p99_ms`` /
``ok_max_ms`` over the 200s,
``codes`` (``"dropped_client"`` included), ``share_503`` (503s / scheduled), ``retry_after`` (503s
that carried a ``Retry-After`` header) and ``versions``. ``--inprocess`` is for the closed loop.
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
import queue
import sys
import threading
import time
import urllib.parse
from collections import Counter

from micrec_tf import cli

VERBS = ("retrieve", "predict")
# Open loop: sending threads by default (each one request at a time on its own connection).
DEFAULT_WORKERS = 256


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
              concurrency: int, reconnects: int = 0) -> dict:
    """One level's figures (module docstring); ``reconnects``: requests retried on a fresh
    connection (:func:`post_json_counted`)."""
    ms = [x * 1000.0 for x in latencies_s]
    return {"concurrency": concurrency, "requests": len(ms), "seconds": seconds,
            "reconnects": int(reconnects),
            "throughput_rps": len(ms) / seconds if seconds > 0 else None,
            "p50_ms": percentile(ms, 50) if ms else None,
            "p99_ms": percentile(ms, 99) if ms else None,
            "mean_ms": sum(ms) / len(ms) if ms else None, "max_ms": max(ms) if ms else None,
            "codes": dict(sorted(codes.items())), "versions": dict(sorted(versions.items()))}


def _host_port(url: str) -> tuple:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"--url must be http://host:port, got {url!r}")
    return parts.hostname, parts.port or 80


# A failure of a REUSED keep-alive connection before any byte of the answer: the server closed it
# while idle (uvicorn's keep-alive timeout is 5 s); retried once on a fresh connection
# (:func:`post_json_counted`), as urllib3 / requests do for a stale pooled connection.
# (http.client.RemoteDisconnected is a ConnectionResetError.)
STALE_ERRORS = (BrokenPipeError, ConnectionResetError, http.client.RemoteDisconnected)


def _post_once(conn, host: str, port: int, path: str, body, timeout: float) -> tuple:
    """One attempt: ``(conn, code, version, retry_after, stale)``; ``stale``: the attempt failed
    with one of :data:`STALE_ERRORS` while sending or waiting for the status line (no byte of
    an answer read)."""
    version, retry, phase = None, False, "send"
    try:
        if conn is None:
            conn = http.client.HTTPConnection(host, port, timeout=timeout)
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        phase = "read"
        data = resp.read()
        code = str(resp.status)
        retry = resp.getheader("retry-after") is not None
        if resp.status == 200:
            try:
                version = json.loads(data).get("model_version")
            except (ValueError, AttributeError):
                version = None
        if resp.getheader("connection", "").lower() == "close":
            conn.close()
            conn = None
        return conn, code, version, retry, False
    except (OSError, http.client.HTTPException) as err:
        if conn is not None:
            conn.close()
        return None, f"error:{type(err).__name__}", None, False, \
            phase == "send" and isinstance(err, STALE_ERRORS)


def post_json_counted(conn, host: str, port: int, path: str, body, timeout: float,
                      retry_stale: bool = True) -> tuple:
    """POST one JSON body on a keep-alive connection (``None``: open one).

    Returns ``(conn, code, version, retry_after, reconnected)``: the connection to reuse
    (``None`` after a failure or a ``Connection: close`` answer), the status as a string
    (``"error:<exception>"`` for a connection failure), the answer's ``model_version`` for a 200
    (else ``None``), whether the answer carried ``Retry-After``, and whether the request was
    retried on a fresh connection.

    ``retry_stale=True`` (serve_load's loops): when ``conn`` was given (a REUSED connection)
    and the attempt fails with :data:`STALE_ERRORS` before any byte of the answer (while
    sending, or waiting for the status line: the server had closed the idle connection), the
    request is sent once more on a fresh connection (``reconnected`` True) and that attempt's
    outcome is the request's; a failure on a fresh connection (the first attempt's or the
    retry's) stays a connection error, and nothing is retried twice. The caller's clock runs
    from before this call, so a retried request's latency counts from its FIRST attempt.
    ``retry_stale=False``: one attempt (:func:`post_json`'s behaviour)."""
    reused = conn is not None
    conn, code, version, retry, stale = _post_once(conn, host, port, path, body, timeout)
    if not (retry_stale and reused and stale):
        return conn, code, version, retry, False
    conn, code, version, retry, _ = _post_once(None, host, port, path, body, timeout)
    return conn, code, version, retry, True


def post_json(conn, host: str, port: int, path: str, body, timeout: float) -> tuple:
    """POST one JSON body on a keep-alive connection (``None``: open one), ONE attempt.

    Returns ``(conn, code, version, retry_after)``: the connection to reuse (``None`` after a
    failure or a ``Connection: close`` answer), the status as a string (``"error:<exception>"``
    for a connection failure), the answer's ``model_version`` for a 200 (else ``None``) and
    whether the answer carried ``Retry-After``. Used by ``benchmarks.serve_swap``, which keeps
    one attempt per request on purpose: a request the server drops during a swap must count as
    failed, not be retried (its clients never idle past a keep-alive timeout). serve_load's
    loops use :func:`post_json_counted`, which retries a stale keep-alive connection once."""
    conn, code, version, retry, _ = post_json_counted(conn, host, port, path, body, timeout,
                                                      retry_stale=False)
    return conn, code, version, retry


def run_level(url: str, path: str, bodies: list, requests: int, concurrency: int,
              timeout: float = 60.0) -> dict:
    """``requests`` POSTs of ``bodies`` (cycled) to ``url`` + ``path`` by ``concurrency`` threads."""
    host, port = _host_port(url)
    counter, lock = itertools.count(), threading.Lock()
    results: list = []  # (latency s, code key, version or None, reconnected), under lock

    def worker():
        conn, local = None, []
        while True:
            with lock:
                i = next(counter)
            if i >= requests:
                break
            start = time.perf_counter()   # before the first attempt (a retry counts in)
            conn, code, version, _, again = post_json_counted(conn, host, port, path,
                                                              bodies[i % len(bodies)], timeout)
            local.append((time.perf_counter() - start, code, version, again))
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
                     concurrency, sum(1 for r in results if r[3]))


ARRIVALS = ("fixed", "poisson")


def schedule(rate: float, duration: float | None = None, requests: int | None = None,
             arrivals: str = "fixed", seed: int = 0) -> list:
    """Offsets in seconds of the open loop's schedule. Exactly one of ``duration`` /
    ``requests``.

    ``arrivals="fixed"`` (the default, and the only schedule before ``arrivals`` existed):
    ``i / rate`` for ``i`` in ``0..requests-1``, or (``duration``) for every ``i`` with
    ``i / rate < duration``. ``arrivals="poisson"``: a Poisson process of intensity ``rate``:
    arrival ``i`` at ``g_0 + ... + g_i``, the gaps ``g`` independent exponential draws of mean
    ``1 / rate`` from ``numpy.random.default_rng(seed)`` (drawn in order, so the ``requests=N``
    schedule is the first ``N`` offsets of any longer one of the same seed); ``requests``
    offsets, or every arrival before ``duration`` (a Poisson count of mean ``rate x
    duration``; possibly none). Offsets are strictly increasing (a gap too small to move a
    float is widened to the next float). A pure function: the same arguments give the same
    list."""
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not math.isfinite(rate) \
            or rate <= 0:
        raise ValueError(f"rate must be a finite number > 0. Received: rate={rate!r}")
    if (duration is None) == (requests is None):
        raise ValueError("give exactly one of duration and requests. Received: "
                         f"duration={duration!r}, requests={requests!r}")
    if arrivals not in ARRIVALS:
        raise ValueError(f"arrivals must be one of {', '.join(ARRIVALS)}. Received: "
                         f"arrivals={arrivals!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0. Received: seed={seed!r}")
    if requests is None:
        if not math.isfinite(duration) or duration <= 0:
            raise ValueError(f"duration must be a finite number > 0. Received: "
                             f"duration={duration!r}")
    elif isinstance(requests, bool) or not isinstance(requests, int) or requests < 1:
        raise ValueError(f"requests must be an int >= 1. Received: requests={requests!r}")
    if arrivals == "poisson":
        return _poisson_schedule(float(rate), duration, requests, seed)
    if requests is None:
        n = math.ceil(rate * duration)
        while n > 0 and (n - 1) / rate >= duration:   # float rounding of rate x duration
            n -= 1
        while n / rate < duration:
            n += 1
    else:
        n = requests
    return [i / rate for i in range(n)]


def _poisson_schedule(rate: float, duration: float | None, requests: int | None,
                      seed: int) -> list:
    """:func:`schedule`'s Poisson arrivals (arguments already checked)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    chunk = requests if requests is not None else max(64, math.ceil(rate * duration * 1.1) + 64)
    offsets: list = []
    t = 0.0
    while True:
        for gap in rng.exponential(1.0 / rate, size=chunk).tolist():
            nxt = t + gap
            if nxt <= t:                               # a gap below the float spacing at t
                nxt = math.nextafter(t, math.inf)
            t = nxt
            if duration is not None and t >= duration:
                return offsets
            offsets.append(t)
            if requests is not None and len(offsets) == requests:
                return offsets


def summarize_open(records: list, rate: float, scheduled: int, arrivals: str = "fixed",
                   span: float | None = None, reconnects: int = 0) -> dict:
    """One open-loop level's figures from ``records``: one ``(scheduled offset s, answered offset
    s or None, code key, version or None, retry_after bool)`` per scheduled request
    (``"dropped_client"`` ones have no answer). Offsets from the level's start. ``span``: the
    schedule's length in seconds (``seconds`` = max(span, the last answer)); None (the fixed
    schedule's, and the only one before Poisson arrivals): ``scheduled / rate``. ``arrivals``
    is reported as given. ``reconnects``: sent requests retried once on a fresh connection
    (:func:`post_json_counted`; their latency runs from the scheduled time, first attempt
    included)."""
    sent = [r for r in records if r[2] != "dropped_client"]
    ms = [(r[1] - r[0]) * 1000.0 for r in sent]
    ok = [(r[1] - r[0]) * 1000.0 for r in sent if r[2] == "200"]
    codes = Counter(r[2] for r in records)
    answered = sum(n for code, n in codes.items() if code.isdigit())
    seconds = max([scheduled / rate if span is None else span] + [r[1] for r in sent])
    return {"rate": rate, "arrivals": arrivals, "scheduled": scheduled, "sent": len(sent),
            "dropped_client": codes.get("dropped_client", 0), "reconnects": int(reconnects),
            "seconds": seconds, "offered_rps": float(rate),
            "achieved_rps": answered / seconds, "ok_rps": codes.get("200", 0) / seconds,
            "p50_ms": percentile(ms, 50) if ms else None,
            "p99_ms": percentile(ms, 99) if ms else None,
            "mean_ms": sum(ms) / len(ms) if ms else None, "max_ms": max(ms) if ms else None,
            "ok_p50_ms": percentile(ok, 50) if ok else None,
            "ok_p99_ms": percentile(ok, 99) if ok else None,
            "ok_max_ms": max(ok) if ok else None,
            "codes": dict(sorted(codes.items())),
            "share_503": codes.get("503", 0) / scheduled if scheduled else None,
            "retry_after": sum(1 for r in sent if r[2] == "503" and r[4]),
            "versions": dict(sorted(Counter(str(r[3]) for r in sent
                                            if r[3] is not None).items()))}


def run_open_level(url: str, path: str, bodies: list, rate: float, duration: float | None = None,
                   requests: int | None = None, workers: int = DEFAULT_WORKERS,
                   timeout: float = 60.0,
                   after_schedule=None, arrivals: str = "fixed", seed: int = 0) -> dict:
    """The open loop at ``rate`` (module docstring): POSTs of ``bodies`` (request ``i`` sends
    body ``i mod len``) on :func:`schedule`'s times (``arrivals``, ``seed``: see there) by a
    pool of ``workers`` threads; a request due while all are busy is ``"dropped_client"``.
    ``after_schedule()`` (tests) is called once every request was sent or dropped, before
    waiting for the answers. Poisson levels span ``duration`` (or, with ``requests``,
    ``requests / rate``)."""
    host, port = _host_port(url)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an int >= 1. Received: workers={workers!r}")
    offsets = schedule(rate, duration, requests, arrivals, seed)
    jobs: queue.Queue = queue.Queue()
    lock = threading.Lock()
    idle = [workers]
    reconnects = [0]     # requests retried on a fresh connection, under lock
    records: list = []   # appended under lock
    start = 0.0          # set when the schedule starts, before any job is queued

    def worker():
        conn = None
        while True:
            job = jobs.get()
            if job is None:
                break
            i, due = job
            conn, code, version, retry, again = post_json_counted(
                conn, host, port, path, bodies[i % len(bodies)], timeout)
            done = time.perf_counter() - start
            with lock:
                records.append((due, done, code, version, retry))
                reconnects[0] += again
                idle[0] += 1
        if conn is not None:
            conn.close()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(workers)]
    for t in threads:
        t.start()
    start = time.perf_counter()
    for i, due in enumerate(offsets):
        delay = start + due - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        with lock:
            if idle[0] > 0:
                idle[0] -= 1
                jobs.put((i, due))
            else:
                records.append((due, None, "dropped_client", None, False))
    if after_schedule is not None:
        after_schedule()
    for _ in threads:
        jobs.put(None)
    for t in threads:
        t.join()
    if arrivals == "fixed":
        return summarize_open(records, float(rate), len(offsets), reconnects=reconnects[0])
    span = duration if duration is not None else len(offsets) / rate
    return summarize_open(records, float(rate), len(offsets), arrivals, span,
                          reconnects=reconnects[0])


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


def concurrency_levels(text: str) -> list:
    try:
        levels = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        levels = []
    if not levels or any(c < 1 for c in levels):
        raise argparse.ArgumentTypeError(f"--concurrency takes positive integers separated by "
                                         f"commas. Received: {text!r}")
    return levels


def _rates(text: str) -> list:
    try:
        rates = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        rates = []
    if not rates or any(not math.isfinite(r) or r <= 0 for r in rates):
        raise argparse.ArgumentTypeError(f"--rate takes numbers > 0 (requests per second) "
                                         f"separated by commas. Received: {text!r}")
    return rates


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.serve_load", description=__doc__
                                .split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--url", required=True, help="http://host:port of the service")
    p.add_argument("--model", default="user_tower", help="<name> of /v1/models/<name>")
    p.add_argument("--verb", default="retrieve", choices=VERBS)
    p.add_argument("--concurrency", type=concurrency_levels, default=None,
                   help="closed loop: comma-separated client counts (default 1,8,32)")
    p.add_argument("--rate", type=_rates, default=None,
                   help="open loop: comma-separated requests per second (fixed interval)")
    p.add_argument("--duration", type=cli.positive_seconds, default=None,
                   help="open loop: seconds of schedule per rate (or --requests)")
    p.add_argument("--workers", type=cli.positive_int, default=None,
                   help="open loop: sending threads (default 256); none idle = dropped_client")
    p.add_argument("--arrivals", type=cli.one_of(*ARRIVALS), default=None,
                   help="open loop: fixed (default; request i at i / rate) or poisson "
                        "(exponential gaps of mean 1 / rate)")
    p.add_argument("--seed", type=cli.non_negative_int, default=None,
                   help="open loop, --arrivals poisson: seed of the gaps (default 0)")
    p.add_argument("--requests", type=cli.positive_int, default=None,
                   help="requests per level (closed loop default 1000)")
    p.add_argument("--body-file", required=True, help="request body JSON (module docstring)")
    p.add_argument("--timeout", type=float, default=60.0, help="socket timeout per request (s)")
    p.add_argument("--inprocess", default=None,
                   help="export version dir: also time the in-process Retriever on the bodies")
    p.add_argument("--output", default="serve_load.json", help="JSON results (default "
                   "serve_load.json)")
    return p


def _check_args(parser: argparse.ArgumentParser, args) -> None:
    """Open and closed loop options do not mix; each error one line (exit 2)."""
    if args.rate is None:
        for name in ("duration", "workers", "arrivals", "seed"):
            if getattr(args, name) is not None:
                parser.error(f"--{name} needs --rate (the open loop). Received: "
                             f"--{name} {getattr(args, name)}")
        return
    if args.concurrency is not None:
        parser.error("--rate (open loop) and --concurrency (closed loop) exclude each other. "
                     f"Received: --rate {args.rate} --concurrency {args.concurrency}")
    if (args.duration is None) == (args.requests is None):
        parser.error("--rate needs exactly one of --duration and --requests. Received: "
                     f"--duration {args.duration} --requests {args.requests}")
    if args.seed is not None and args.arrivals != "poisson":
        parser.error("--seed draws Poisson arrivals; it needs --arrivals poisson. Received: "
                     f"--seed {args.seed} --arrivals {args.arrivals or 'fixed'}")
    if args.inprocess:
        parser.error("--inprocess compares closed-loop levels; run it without --rate. "
                     f"Received: --inprocess {args.inprocess}")


def main_open(args, bodies: list, path: str) -> int:
    levels = []
    args.workers = args.workers or DEFAULT_WORKERS
    arrivals = args.arrivals or "fixed"
    seed = 0 if args.seed is None else args.seed
    for rate in args.rate:
        level = run_open_level(args.url, path, bodies, rate, args.duration, args.requests,
                               args.workers, args.timeout, arrivals=arrivals, seed=seed)
        levels.append(level)
        p50 = "-" if level["p50_ms"] is None else f"{level['p50_ms']:.2f}"
        p99 = "-" if level["p99_ms"] is None else f"{level['p99_ms']:.2f}"
        share = "-" if level["share_503"] is None else f"{level['share_503']:.3f}"
        print(f"rate={rate:g} n={level['scheduled']} offered {level['offered_rps']:.1f} req/s "
              f"achieved {level['achieved_rps']:.1f} (200s {level['ok_rps']:.1f}) p50 {p50} ms "
              f"p99 {p99} ms 503 share {share} codes {level['codes']} reconnects "
              f"{level['reconnects']}",
              flush=True)
    result = {"url": args.url, "model": args.model, "verb": args.verb, "mode": "open",
              "arrivals": arrivals, "duration": args.duration, "requests": args.requests,
              "workers": args.workers, "bodies": len(bodies), "levels": levels}
    if arrivals == "poisson":   # (fixed-arrival files keep the keys they had before)
        result["seed"] = seed
    with open(args.output, "w", encoding="utf-8") as fh:
        json.dump(result, fh, indent=1)
    return 0


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    bodies = read_bodies(args.body_file)
    path = f"/v1/models/{args.model}:{args.verb}"
    if args.rate is not None:
        return main_open(args, bodies, path)
    args.concurrency = args.concurrency or [1, 8, 32]
    args.requests = args.requests or 1000
    levels = []
    for c in args.concurrency:
        level = run_level(args.url, path, bodies, args.requests, c, args.timeout)
        levels.append(level)
        print(f"c={c:<4} n={level['requests']} {level['throughput_rps']:.1f} req/s "
              f"p50 {level['p50_ms']:.2f} ms p99 {level['p99_ms']:.2f} ms codes {level['codes']} "
              f"reconnects {level['reconnects']}",
              flush=True)
    inprocess = overhead = None
    if args.inprocess:
        inprocess = run_inprocess(args.inprocess, bodies, args.requests, args.verb)
        overhead = {str(lv["concurrency"]): lv["p50_ms"] / inprocess["p50_ms"] for lv in levels
                    if inprocess["p50_ms"]}
        print(f"in-process: {inprocess['throughput_rps']:.1f} req/s p50 "
              f"{inprocess['p50_ms']:.2f} ms p99 {inprocess['p99_ms']:.2f} ms; service p50 / "
              f"in-process p50: {overhead}", flush=True)
    result = {"url": args.url, "model": args.model, "verb": args.verb, "mode": "closed",
              "requests": args.requests, "bodies": len(bodies), "levels": levels,
              "inprocess": inprocess, "overhead_p50": overhead}
    with open(args.output, "w", encoding="utf-8") as fh:
        json.dump(result, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""One-command serving benchmark of one export: the load levels, a swap under load, overload.

``python -m benchmarks.serve_bench --config configs/<x>.yaml [--export-dir exports/<name>]
[--set export.serve_...=...] [--concurrency 1,8,32] [--requests 2000] [--swap-concurrency 32]
[--swap-requests 4000] [--no-overload | --overload-rate R] [--overload-duration 20]
[--overload-arrivals poisson|fixed] [--overload-seed 0] [--overload-latency-bound SECONDS]
[--body-file F] [--output serve_bench.json] [--markdown serve_bench.md]``
(``make serve-bench CONFIG=... [EXPORT=exports/<name>]``).

1. A scratch copy of the export's newest version (``benchmarks.serve_swap.scratch_copy``: hard
   links where possible; the user's tree is never written), a server (``python -m
   export.server``, ``--config`` / ``--set`` passed on) on a free loopback port over it, and
   ``python -m benchmarks.serve_load --verb retrieve --concurrency <levels> --requests N
   --inprocess <the copied version>`` run as a subprocess against it (its JSON read back); the
   server is stopped with SIGTERM (exit code recorded).
2. ``benchmarks.serve_swap.run_swap`` (a fresh scratch copy and server): ``--swap-concurrency``
   clients, ``--swap-requests`` requests, the next version published after
   ``--swap-publish-after`` answered requests.
3. **Overload** (skipped with ``--no-overload``): a fresh scratch copy and server (the config's
   ``export.serve_max_queue`` / ``serve_max_batch_size`` / ``serve_max_wait_ms`` /
   ``serve_request_timeout_s``, ``--set`` included), then ``python -m benchmarks.serve_load
   --verb retrieve --rate 2S --duration D --arrivals A [--seed K]`` (a subprocess; bounded: it
   stops after ``D`` = ``--overload-duration``, default 20 s, and the last answers), ``S`` the
   sustainable rate = the highest closed-loop throughput of step 1 (``--overload-rate R``
   offers ``R`` instead), ``A`` = ``--overload-arrivals`` (default poisson, seed
   ``--overload-seed`` 0); then ``GET /healthz`` and SIGTERM. Checks (:func:`overload_summary`):
   ``no_5xx_but_503_504`` (no 500 / 502: the excess is refused, not failed),
   ``server_alive`` (``/healthz`` 200 after the load), ``latency_bounded`` (the 200s' p99
   below :func:`latency_bound`: ``--overload-latency-bound``, else the config's request
   timeout when one is set, else ``2 x (serve_max_queue / S + serve_max_wait_ms) + 1 s``, with
   ``serve_max_queue_delay_ms`` > 0 each stage's ``serve_max_queue / S`` capped at
   ``R / S x (serve_max_wait_ms + serve_max_queue_delay_ms)``, and with ``serve_max_in_flight``
   = C > 0 the two stages' term capped at ``C / S + 2 x serve_max_wait_ms``),
   ``server_exit_0``. 503s are counted, not required: a server whose larger batches absorb 2S
   passes too.

Bodies: ``--body-file``, else the export's warm-up requests (``serve_swap.warmup_bodies``: the
export's own sample test users), written to one file that both steps read.

Writes ``--output`` (JSON, default ``serve_bench.json``)::

    {"export_dir", "version", "items", "dim", "config", "sets", "bodies", "machine": {"cpu_model",
     "cpu_flags" [all of /proc/cpuinfo's], "simd_flags" [the vector / matrix ones], "cores",
     "python"}, "date_utc",
     "load": <serve_load's JSON>, "load_server_exit_code",
     "table": [{"concurrency", "requests", "throughput_rps", "p50_ms", "p99_ms",
                "overhead_p50"}, ...],            # rounded as the markdown shows them
     "inprocess": {"requests", "throughput_rps", "p50_ms", "p99_ms"} | null,
     "swap": <serve_swap's result>,
     "swap_table": {"requests", "failed", "versions", "switch_s", "server_load_s",
                    "server_warmup_s", "stale_after_switch", "client_regressions",
                    "server_exit_code", "ok"},
     "overload": {"rate", "rate_source", "sustainable_rps", "factor", "duration_s", "arrivals",
                  "seed", "max_queue", "max_batch_size", "max_wait_ms", "request_timeout_s",
                  "max_queue_delay_ms", "max_in_flight",
                  "latency_bound_s", "latency_bound_source", "ready_s", "workers",
                  "healthz_code",
                  "scheduled", "sent", "offered_rps", "achieved_rps", "ok_rps", "ok",
                  "ok_p50_ms", "ok_p99_ms", "ok_max_ms", "rejected_503", "retry_after",
                  "share_503", "expired_504", "other_codes", "dropped_client",
                  "connection_errors", "reconnects" (serve_load's stale keep-alive retries),
                  "server_alive", "server_exit_code", "checks", "passed",
                  "load": <serve_load's JSON>} | null,
     "overload_table": {...: the overload row as the markdown rounds it} | null, "ok"}

and ``--markdown`` (default ``serve_bench.md``): a fragment for docs/BENCHMARKS.md whose numbers
are the ``table`` / ``inprocess`` / ``swap_table`` / ``overload_table`` values (2 decimals for ms
and s, 1 for req/s, 2 for ratios). Exit 0 when every load request was answered 200, the servers
exited 0, the swap's checks passed and (unless skipped) the overload's checks passed; 1
otherwise (the files are written either way).
"""
from __future__ import annotations

import argparse
import datetime
import http.client
import json
import os
import platform
import subprocess
import sys
import tempfile

from micrec_tf import cli

from benchmarks import serve_swap
from benchmarks.serve_load import ARRIVALS, DEFAULT_WORKERS, concurrency_levels

# /proc/cpuinfo flags worth a line in the report (vector and matrix units).
SIMD_PREFIXES = ("sse4", "avx", "fma", "f16c", "amx", "vnni")
# The overload step offers OVERLOAD_FACTOR x the sustainable rate (the issue: "twice").
OVERLOAD_FACTOR = 2.0
# Slack of the derived latency bound (seconds; latency_bound).
BOUND_SLACK_S = 1.0
# Client threads of the overload step beyond what the server's two stages can hold.
OVERLOAD_MARGIN = 64


def cpu_info(path: str = "/proc/cpuinfo") -> dict:
    """``cpu_model``, ``cpu_flags`` (sorted), ``simd_flags`` of the first processor in ``path``
    (None / [] where the file or the line is absent), ``cores`` (``os.cpu_count()``)."""
    model, flags = None, []
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model is None:
                    model = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = sorted(value.split())
    except OSError:
        pass
    return {"cpu_model": model, "cpu_flags": flags,
            "simd_flags": [f for f in flags if f.startswith(SIMD_PREFIXES)],
            "cores": os.cpu_count(), "python": platform.python_version()}


def item_count(version_dir: str) -> tuple:
    """``(items, dim)`` of the version's ``item_embeddings/embeddings.npy`` (memory-mapped)."""
    import numpy as np

    shape = np.load(os.path.join(version_dir, "item_embeddings", "embeddings.npy"),
                    mmap_mode="r").shape
    return int(shape[0]), int(shape[1])


def _r(x, nd: int):
    return None if x is None else round(float(x), nd)


def tables(load: dict, swap: dict) -> tuple:
    """``(table, inprocess, swap_table)``: the figures the markdown shows, rounded as shown."""
    overhead = load.get("overhead_p50") or {}
    table = [{"concurrency": lv["concurrency"], "requests": lv["requests"],
              "throughput_rps": _r(lv["throughput_rps"], 1), "p50_ms": _r(lv["p50_ms"], 2),
              "p99_ms": _r(lv["p99_ms"], 2),
              "overhead_p50": _r(overhead.get(str(lv["concurrency"])), 2)}
             for lv in load["levels"]]
    ip = load.get("inprocess")
    inprocess = None if not ip else {
        "requests": ip["requests"], "throughput_rps": _r(ip["throughput_rps"], 1),
        "p50_ms": _r(ip["p50_ms"], 2), "p99_ms": _r(ip["p99_ms"], 2)}
    s = swap.get("server_swap") or {}
    swap_table = {"requests": swap["requests"], "failed": swap["failed"],
                  "versions": swap["versions"], "switch_s": _r(swap["switch_s"], 2),
                  "server_load_s": _r(s.get("load_s"), 2),
                  "server_warmup_s": _r(s.get("warmup_s"), 2),
                  "stale_after_switch": swap["stale_after_switch"],
                  "client_regressions": swap["client_regressions"],
                  "server_exit_code": swap["server_exit_code"], "ok": swap["ok"]}
    return table, inprocess, swap_table


def _cell(x, nd: int) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def markdown(result: dict) -> str:
    """The docs/BENCHMARKS.md fragment of one run (numbers = the JSON's rounded figures)."""
    m, s = result["machine"], result["swap_table"]
    lines = [
        f"Export `{result['export_dir']}` version {result['version']}: {result['items']:,} items "
        f"(dimension {result['dim']}); {result['bodies']} request bodies; `:retrieve`; "
        f"{result['date_utc']}.",
        f"CPU: {m['cpu_model'] or 'unknown'}, {m['cores']} cores; vector / matrix flags: "
        f"{' '.join(m['simd_flags']) or 'none listed'}.",
        "",
        "| concurrency | requests | throughput (req/s) | p50 (ms) | p99 (ms) | "
        "p50 / in-process p50 |",
        "|---|---|---|---|---|---|",
    ]
    for row in result["table"]:
        lines.append(f"| {row['concurrency']} | {row['requests']} | "
                     f"{_cell(row['throughput_rps'], 1)} | {_cell(row['p50_ms'], 2)} | "
                     f"{_cell(row['p99_ms'], 2)} | {_cell(row['overhead_p50'], 2)} |")
    ip = result["inprocess"]
    if ip:
        lines.append(f"| in-process (1) | {ip['requests']} | {_cell(ip['throughput_rps'], 1)} | "
                     f"{_cell(ip['p50_ms'], 2)} | {_cell(ip['p99_ms'], 2)} | 1.00 |")
    versions = ", ".join(f"{v}: {n}" for v, n in s["versions"].items())
    lines += [
        "",
        f"Swap under load ({result['swap']['concurrency']} clients, the next version published "
        f"after {result['swap']['publish_after']} answers, server poll "
        f"{result['swap']['poll_s']} s):",
        "",
        "| requests | failed | answers per version | switch (s) | server load (s) | "
        "server warm-up (s) | stale answers | client regressions | server exit |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| {s['requests']} | {s['failed']} | {versions} | {_cell(s['switch_s'], 2)} | "
        f"{_cell(s['server_load_s'], 2)} | {_cell(s['server_warmup_s'], 2)} | "
        f"{s['stale_after_switch']} | {s['client_regressions']} | {s['server_exit_code']} |",
        "",
    ]
    o, ot = result.get("overload"), result.get("overload_table")
    if ot:
        rate = (f"{o['factor']:g} x the sustainable rate S = {_cell(ot['sustainable_rps'], 1)} "
                "req/s (the best closed-loop throughput above)" if o["factor"] is not None else
                f"--overload-rate; S = {_cell(ot['sustainable_rps'], 1)} req/s")
        seed = f", seed {o['seed']}" if o["seed"] is not None else ""
        other = ", ".join(f"{k}: {n}" for k, n in ot["other_codes"].items()) or "0"
        delay = (f", queue delay {o['max_queue_delay_ms']:g} ms"
                 if o.get("max_queue_delay_ms") else "")
        if o.get("max_in_flight"):
            delay += f", in flight at most {o['max_in_flight']}"
        lines += [
            f"Overload ({rate}; {o['arrivals']} arrivals{seed}, {o['duration_s']:g} s; server "
            f"queue {o['max_queue']} per stage{delay}, batches of {o['max_batch_size']}, "
            f"request timeout {o['request_timeout_s']:g} s; latency bound: "
            f"{o['latency_bound_source']}):",
            "",
            "| offered (req/s) | scheduled | 200 | 200 p50 (ms) | 200 p99 (ms) | bound (ms) | "
            "503 (Retry-After) | 504 | other | client drops | connection errors | "
            "server alive | server exit |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
            f"| {_cell(ot['offered_rps'], 1)} | {ot['scheduled']} | {ot['ok']} | "
            f"{_cell(ot['ok_p50_ms'], 2)} | {_cell(ot['ok_p99_ms'], 2)} | "
            f"{_cell(ot['latency_bound_ms'], 2)} | {ot['rejected_503']} ({ot['retry_after']}) | "
            f"{ot['expired_504']} | {other} | {ot['dropped_client']} | "
            f"{ot['connection_errors']} | {'yes' if ot['server_alive'] else 'no'} | "
            f"{ot['server_exit_code']} |",
            "",
            f"Client reconnects (a request on a keep-alive connection the server had closed, "
            f"retried once on a fresh one; latency from the first attempt): "
            f"{ot.get('reconnects', 0)}.",
            "",
        ]
    return "\n".join(lines)


def run_load_levels(config: str, sets: list, root: str, version: int, body_path: str,
                    levels: list, requests: int, scratch: str, ready_timeout: float,
                    timeout: float, log=print) -> tuple:
    """A server over ``root`` and serve_load (subprocess) at ``levels``; returns
    ``(serve_load's JSON, the server's exit code)``."""
    from micrec_tf.config import load_config, parse_overrides

    model = load_config(config, parse_overrides(sets)).export.serve_model_name
    server = serve_swap.ServerProcess(config, root, sets, os.path.join(scratch, "load.log"))
    try:
        ready_s = server.wait_ready(ready_timeout)
        log(f"[serve_bench] server ready on port {server.port} in {ready_s:.1f} s; serve_load at "
            f"concurrency {','.join(map(str, levels))}, {requests} requests each")
        out = os.path.join(scratch, "serve_load.json")
        cmd = [sys.executable, "-m", "benchmarks.serve_load",
               "--url", f"http://127.0.0.1:{server.port}", "--model", model, "--verb",
               "retrieve", "--concurrency", ",".join(map(str, levels)),
               "--requests", str(requests), "--body-file", body_path,
               "--timeout", str(timeout), "--inprocess", os.path.join(root, str(version)),
               "--output", out]
        load = _run_serve_load(cmd, out, "serve_load")
    finally:
        code = server.stop()
    return load, code


def sustainable_rate(load: dict) -> float | None:
    """S: the highest closed-loop throughput (req/s) of serve_load's ``levels`` (None: none)."""
    rates = [lv["throughput_rps"] for lv in load.get("levels", [])
             if lv.get("throughput_rps") is not None]
    return max(rates) if rates else None


def latency_bound(request_timeout_s: float, max_queue: int, max_wait_ms: float,
                  sustainable: float | None, explicit: float | None = None,
                  max_queue_delay_ms: float = 0.0, rate: float | None = None,
                  max_in_flight: int = 0) -> tuple:
    """``(bound_s, source)``: what the overload step's p99 of 200 answers must stay below.

    ``explicit`` (``--overload-latency-bound``) when given; else the config's
    ``export.serve_request_timeout_s`` when > 0 (a request still queued then is answered 504,
    not run); else derived from the queue limits: ``2 x (serve_max_queue / S +
    serve_max_wait_ms / 1000) + 1 s``: a :retrieve request passes two micro-batcher stages (the
    tower's, the search's), each a queue of at most ``serve_max_queue`` requests, assumed to
    drain at least at the sustainable rate ``S`` (under overload the batches are larger, so the
    drain is no slower), plus each stage's batching window, plus one second of slack for the
    client and the work itself. ``(None, reason)`` when there is no S to derive it from.

    With ``export.serve_max_queue_delay_ms`` = ``d`` > 0 (export/batcher.py, "Queue delay") a
    request is admitted only while the oldest one queued in its stage has waited at most ``w +
    d`` (``w`` = ``serve_max_wait_ms``), so every request ahead of it arrived within the last ``w
    + d``: at most ``R x (w + d)`` of them at the offered rate ``R`` (``rate``; None: ``2 x S``),
    drained at S in ``R / S x (w + d)``. Each stage's ``serve_max_queue / S`` becomes
    ``min(serve_max_queue / S, R / S x (w + d))``: ``2 x (min(q / S, R / S x (w + d)) + w) +
    1 s``. ``d`` = 0 (the default, the rule off) is the formula above.

    With ``export.serve_max_in_flight`` = ``C`` > 0 (export/admission.py) at most ``C`` admitted
    requests are in the app at once, wherever they wait (event loop, both queues), so one
    admitted request has at most ``C - 1`` ahead of it, drained at S in ``C / S``, plus both
    batching windows: the two-stage term above (without its slack) becomes ``min(<it>, C / S + 2
    x w)``, then + 1 s. ``C`` = 0 (the default, the cap off) leaves the formulas above."""
    if explicit is not None:
        return float(explicit), "--overload-latency-bound"
    if request_timeout_s > 0:
        return float(request_timeout_s), "export.serve_request_timeout_s"
    if not sustainable:
        return None, "no sustainable rate measured"
    if max_queue_delay_ms > 0:
        factor = (rate / sustainable) if rate else OVERLOAD_FACTOR
        stage = min(max_queue / sustainable,
                    factor * (max_wait_ms + max_queue_delay_ms) / 1000.0)
        stages = 2.0 * (stage + max_wait_ms / 1000.0)
        source = ("2 x (min(export.serve_max_queue / S, R / S x (export.serve_max_wait_ms + "
                  "export.serve_max_queue_delay_ms)) + export.serve_max_wait_ms)")
    else:
        stages = 2.0 * (max_queue / sustainable + max_wait_ms / 1000.0)
        source = "2 x (export.serve_max_queue / S + export.serve_max_wait_ms)"
    if max_in_flight > 0:
        stages = min(stages, max_in_flight / sustainable + 2.0 * max_wait_ms / 1000.0)
        source = (f"min({source}, export.serve_max_in_flight / S + 2 x "
                  "export.serve_max_wait_ms)")
    return stages + BOUND_SLACK_S, source + " + 1 s"


def overload_summary(level: dict, bound_s: float | None, alive: bool,
                     exit_code: int) -> dict:
    """The overload step's counts and ``checks`` from serve_load's one open-loop ``level``.

    ``no_5xx_but_503_504``: every HTTP status >= 500 is 503 or 504 (no 500, no 502);
    ``server_alive``: ``/healthz`` answered 200 after the load; ``latency_bounded``: the 200
    answers' p99 below ``bound_s`` (false when there is no 200 or no bound); ``server_exit_0``:
    SIGTERM then exit code 0."""
    codes = level["codes"]
    http_codes = {k: v for k, v in codes.items() if k.isdigit()}
    other = {k: v for k, v in http_codes.items() if k not in ("200", "503", "504")}
    p99 = level.get("ok_p99_ms")
    checks = {
        "no_5xx_but_503_504": all(int(k) < 500 or k in ("503", "504") for k in http_codes),
        "server_alive": bool(alive),
        "latency_bounded": p99 is not None and bound_s is not None and p99 < bound_s * 1000.0,
        "server_exit_0": exit_code == 0,
    }
    return {"scheduled": level["scheduled"], "sent": level["sent"],
            "offered_rps": level["offered_rps"], "achieved_rps": level["achieved_rps"],
            "ok_rps": level["ok_rps"], "ok": codes.get("200", 0),
            "ok_p50_ms": level.get("ok_p50_ms"), "ok_p99_ms": p99,
            "ok_max_ms": level.get("ok_max_ms"),
            "rejected_503": codes.get("503", 0), "retry_after": level["retry_after"],
            "share_503": level["share_503"], "expired_504": codes.get("504", 0),
            "other_codes": other, "dropped_client": codes.get("dropped_client", 0),
            "connection_errors": sum(v for k, v in codes.items() if k.startswith("error:")),
            "reconnects": level.get("reconnects", 0),
            "server_alive": bool(alive), "server_exit_code": exit_code,
            "latency_bound_s": bound_s, "checks": checks, "passed": all(checks.values())}


def healthz(port: int, timeout: float = 10.0) -> int | None:
    """``GET /healthz`` status on the loopback port (None: no answer)."""
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        try:
            conn.request("GET", "/healthz")
            resp = conn.getresponse()
            resp.read()
            return resp.status
        finally:
            conn.close()
    except (OSError, http.client.HTTPException):
        return None


def overload_workers(max_queue: int, max_batch_size: int, workers: int | None = None) -> int:
    """serve_load's client threads for the overload step: ``workers`` when given, else enough to
    hold more requests in flight than the server can (two stages, each ``max_queue`` queued plus
    a batch of ``max_batch_size`` running) plus a margin, and never fewer than serve_load's
    default (256, what the 2026-12-07 figures used: with the default queue of 512 those threads,
    not the server, were the bound, and no request was rejected)."""
    if workers is not None:
        return int(workers)
    return max(DEFAULT_WORKERS, 2 * (int(max_queue) + int(max_batch_size)) + OVERLOAD_MARGIN)


def run_overload(config: str, sets: list, export_dir: str, body_path: str, sustainable,
                 rate, duration: float, arrivals: str, seed: int, explicit_bound,
                 scratch_dir, ready_timeout: float, timeout: float, log=print,
                 workers: int | None = None) -> dict:
    """Step 3 (module docstring): a fresh scratch copy and server, serve_load's open loop at
    ``rate`` (None: ``OVERLOAD_FACTOR x sustainable``) for ``duration`` seconds with
    :func:`overload_workers` client threads, ``/healthz``, SIGTERM. Returns the ``"overload"``
    dict."""
    from micrec_tf.config import load_config, parse_overrides

    ecfg = load_config(config, parse_overrides(sets)).export
    if rate is None:
        if not sustainable:
            raise RuntimeError("the overload step needs a sustainable rate: step 1 measured no "
                               "throughput; pass --overload-rate or --no-overload")
        rate, source = OVERLOAD_FACTOR * sustainable, f"{OVERLOAD_FACTOR:g} x S"
    else:
        source = "--overload-rate"
    bound_s, bound_source = latency_bound(ecfg.serve_request_timeout_s, ecfg.serve_max_queue,
                                          ecfg.serve_max_wait_ms, sustainable, explicit_bound,
                                          ecfg.serve_max_queue_delay_ms, rate,
                                          ecfg.serve_max_in_flight)
    workers = overload_workers(ecfg.serve_max_queue, ecfg.serve_max_batch_size, workers)
    scratch = tempfile.mkdtemp(prefix="serve_overload-", dir=scratch_dir)
    server = None
    try:
        root, _ = serve_swap.scratch_copy(export_dir, scratch)
        server = serve_swap.ServerProcess(config, root, sets, os.path.join(scratch,
                                                                           "server.log"))
        ready_s = server.wait_ready(ready_timeout)
        log(f"[serve_bench] overload: server ready on port {server.port} in {ready_s:.1f} s; "
            f"{arrivals} arrivals at {rate:.1f} req/s ({source}) for {duration:g} s")
        out = os.path.join(scratch, "serve_load.json")
        cmd = [sys.executable, "-m", "benchmarks.serve_load",
               "--url", f"http://127.0.0.1:{server.port}", "--model", ecfg.serve_model_name,
               "--verb", "retrieve", "--rate", repr(float(rate)), "--duration", repr(duration),
               "--arrivals", arrivals, "--body-file", body_path, "--timeout", str(timeout),
               "--workers", str(workers), "--output", out]
        if arrivals == "poisson":
            cmd += ["--seed", str(seed)]
        load = _run_serve_load(cmd, out, "serve_load (overload)")
        health = healthz(server.port)
        code = server.stop()
        server_log = server.log_text()
        server = None
    finally:
        if server is not None:
            server.stop()
        serve_swap.remove_scratch(scratch)
    (level,) = load["levels"]
    summary = overload_summary(level, bound_s, health == 200, code)
    result = {"rate": float(rate), "rate_source": source, "sustainable_rps": sustainable,
              "factor": OVERLOAD_FACTOR if source != "--overload-rate" else None,
              "duration_s": duration, "arrivals": arrivals,
              "seed": seed if arrivals == "poisson" else None,
              "max_queue": ecfg.serve_max_queue, "max_batch_size": ecfg.serve_max_batch_size,
              "max_wait_ms": ecfg.serve_max_wait_ms,
              "request_timeout_s": ecfg.serve_request_timeout_s,
              "max_queue_delay_ms": ecfg.serve_max_queue_delay_ms,
              "max_in_flight": ecfg.serve_max_in_flight,
              "latency_bound_source": bound_source, "ready_s": ready_s, "workers": workers,
              "healthz_code": health, **summary, "load": load}
    if not summary["passed"]:
        result["server_log_tail"] = server_log[-4000:]
    return result


def overload_table(o: dict) -> dict:
    """The overload figures the markdown shows, rounded as shown."""
    return {"offered_rps": _r(o["offered_rps"], 1), "sustainable_rps": _r(o["sustainable_rps"], 1),
            "scheduled": o["scheduled"], "ok": o["ok"], "ok_p50_ms": _r(o["ok_p50_ms"], 2),
            "ok_p99_ms": _r(o["ok_p99_ms"], 2), "latency_bound_ms":
                None if o["latency_bound_s"] is None else _r(o["latency_bound_s"] * 1000.0, 2),
            "rejected_503": o["rejected_503"], "retry_after": o["retry_after"],
            "expired_504": o["expired_504"], "other_codes": o["other_codes"],
            "dropped_client": o["dropped_client"], "connection_errors": o["connection_errors"],
            "reconnects": o.get("reconnects", 0), "server_alive": o["server_alive"],
            "server_exit_code": o["server_exit_code"],
            "passed": o["passed"]}


def run_bench(args, export_dir: str, log=print) -> dict:
    scratch = tempfile.mkdtemp(prefix="serve_bench-", dir=args.scratch_dir)
    try:
        root, version = serve_swap.scratch_copy(export_dir, scratch)
        vdir = os.path.join(root, str(version))
        items, dim = item_count(vdir)
        bodies = serve_swap.load_bodies(args.body_file, vdir)
        body_path = os.path.join(scratch, "bodies.jsonl")
        with open(body_path, "wb") as fh:
            fh.write(b"".join(b + b"\n" for b in bodies))
        load, load_code = run_load_levels(args.config, args.set, root, version, body_path,
                                          args.concurrency, args.requests, scratch,
                                          args.ready_timeout, args.timeout, log)
        swap = serve_swap.run_swap(args.config, export_dir, args.set, args.swap_concurrency,
                                   args.swap_requests, args.swap_publish_after,
                                   args.swap_timeout, args.swap_after_switch, body_path,
                                   args.scratch_dir, False, args.ready_timeout, args.timeout, log)
        overload = None
        if not args.no_overload:
            overload = run_overload(args.config, args.set, export_dir, body_path,
                                    sustainable_rate(load), args.overload_rate,
                                    args.overload_duration, args.overload_arrivals,
                                    args.overload_seed, args.overload_latency_bound,
                                    args.scratch_dir, args.ready_timeout, args.timeout, log,
                                    args.overload_workers)
    finally:
        serve_swap.remove_scratch(scratch)
    table, inprocess, swap_table = tables(load, swap)
    all_200 = all(set(lv["codes"]) == {"200"} for lv in load["levels"])
    return {
        "export_dir": os.path.abspath(export_dir), "version": version, "items": items,
        "dim": dim, "config": args.config, "sets": list(args.set), "bodies": len(bodies),
        "machine": cpu_info(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "load": load, "load_server_exit_code": load_code, "table": table,
        "inprocess": inprocess, "swap": swap, "swap_table": swap_table,
        "overload": overload,
        "overload_table": None if overload is None else overload_table(overload),
        "ok": all_200 and load_code == 0 and swap["ok"] and (overload is None
                                                             or overload["passed"]),
    }


def _rate(text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        x = 0.0
    if not 0 < x < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of requests per second > 0. "
                                         f"Received: {text!r}")
    return x


def _run_serve_load(cmd: list, out: str, what: str) -> dict:
    """Runs a ``benchmarks.serve_load`` command line and returns the JSON it wrote to ``out``;
    a non-zero exit raises with the tail of its output."""
    proc = subprocess.run(cmd, cwd=serve_swap.ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} exited with {proc.returncode}:\n"
                           f"{(proc.stdout + proc.stderr)[-4000:]}")
    with open(out, encoding="utf-8") as fh:
        return json.load(fh)


def _parser() -> argparse.ArgumentParser:
    p = cli.parser(__doc__)
    p.prog = "python -m benchmarks.serve_bench"
    serve_swap.add_common_arguments(p)
    p.add_argument("--concurrency", type=concurrency_levels, default=[1, 8, 32],
                   help="serve_load's client counts (default 1,8,32)")
    p.add_argument("--requests", type=cli.positive_int, default=2000,
                   help="serve_load's requests per level (default 2000)")
    serve_swap.add_swap_arguments(p, prefix="swap-")
    p.add_argument("--no-overload", action="store_true", help="skip step 3, the overload run")
    p.add_argument("--overload-rate", type=_rate, default=None,
                   help="step 3's offered req/s (default 2 x S, S the best closed-loop "
                        "throughput of step 1)")
    p.add_argument("--overload-duration", type=cli.positive_seconds, default=20.0,
                   help="step 3's seconds of schedule (default 20)")
    p.add_argument("--overload-arrivals", type=cli.one_of(*ARRIVALS), default="poisson",
                   help="step 3's arrivals: poisson (default) or fixed")
    p.add_argument("--overload-seed", type=cli.non_negative_int, default=0,
                   help="step 3's seed of the Poisson gaps (default 0)")
    p.add_argument("--overload-latency-bound", type=cli.positive_seconds, default=None,
                   help="seconds the 200s' p99 must stay below (default: "
                        "export.serve_request_timeout_s when > 0, else derived from the queue "
                        "limits and S)")
    p.add_argument("--overload-workers", type=cli.positive_int, default=None,
                   help="step 3's client threads (default: more than the server's two queues "
                        "and batches can hold, at least 256; 256 reproduces the 2026-12-07 "
                        "figures)")
    p.add_argument("--output", default="serve_bench.json", help="JSON (default serve_bench.json)")
    p.add_argument("--markdown", default="serve_bench.md",
                   help="markdown fragment for docs/BENCHMARKS.md (default serve_bench.md)")
    return p


def main(argv=None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    args.swap_publish_after = serve_swap.check_publish_after(
        p, args.swap_requests, args.swap_publish_after, prefix="swap-")
    if args.no_overload and args.overload_rate is not None:
        p.error("--no-overload skips the step that --overload-rate sets. Received: "
                f"--no-overload --overload-rate {args.overload_rate:g}")
    cfg = cli.load(args)
    export_dir = args.export_dir or cfg.export_dir
    if not os.path.isdir(export_dir):
        raise cli.UsageError(f"export root {export_dir!r} not found: run `make export` first")
    result = run_bench(args, export_dir)
    with open(args.output, "w", encoding="utf-8") as fh:
        json.dump(result, fh, indent=1)
    with open(args.markdown, "w", encoding="utf-8") as fh:
        fh.write(markdown(result))
    for row in result["table"]:
        print(f"[serve_bench] c={row['concurrency']}: {row['throughput_rps']} req/s, p50 "
              f"{row['p50_ms']} ms, p99 {row['p99_ms']} ms, x{row['overhead_p50']} in-process p50",
              flush=True)
    print(serve_swap.summary_line(result["swap"]), flush=True)
    o = result["overload"]
    if o is not None:
        print(f"[serve_bench] overload at {o['offered_rps']:.1f} req/s ({o['rate_source']}, "
              f"{o['arrivals']}): {o['scheduled']} scheduled, 200: {o['ok']} (p99 "
              f"{o['ok_p99_ms'] if o['ok_p99_ms'] is None else round(o['ok_p99_ms'], 2)} ms), "
              f"503: {o['rejected_503']}, 504: {o['expired_504']}, other: {o['other_codes']}, "
              f"connection errors: {o['connection_errors']}, reconnects: "
              f"{o.get('reconnects', 0)}, server exit "
              f"{o['server_exit_code']}; checks {o['checks']}", flush=True)
    print(f"[serve_bench] {args.output}, {args.markdown}: " + ("ok" if result["ok"] else "FAILED"),
          flush=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(cli.run(main))

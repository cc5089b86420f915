"""One-command serving benchmark of one export: the load levels, then a swap under load.

``python -m benchmarks.serve_bench --config configs/<x>.yaml [--export-dir exports/<name>]
[--set export.serve_...=...] [--concurrency 1,8,32] [--requests 2000] [--swap-concurrency 32]
[--swap-requests 4000] [--body-file F] [--output serve_bench.json] [--markdown serve_bench.md]``
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
                    "server_exit_code", "ok"}, "ok"}

and ``--markdown`` (default ``serve_bench.md``): a fragment for docs/BENCHMARKS.md whose numbers
are the ``table`` / ``inprocess`` / ``swap_table`` values (2 decimals for ms and s, 1 for req/s,
2 for ratios). Exit 0 when every load request was answered 200, both servers exited 0 and the
swap's checks passed; 1 otherwise (the files are written either way).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile

from micrec_tf import cli

from benchmarks import serve_swap
from benchmarks.serve_load import concurrency_levels

# /proc/cpuinfo flags worth a line in the report (vector and matrix units).
SIMD_PREFIXES = ("sse4", "avx", "fma", "f16c", "amx", "vnni")


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
        proc = subprocess.run(cmd, cwd=serve_swap.ROOT, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"serve_load exited with {proc.returncode}:\n"
                               f"{(proc.stdout + proc.stderr)[-4000:]}")
        with open(out, encoding="utf-8") as fh:
            load = json.load(fh)
    finally:
        code = server.stop()
    return load, code


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
        "ok": all_200 and load_code == 0 and swap["ok"],
    }


def _parser() -> argparse.ArgumentParser:
    p = cli.parser(__doc__)
    p.prog = "python -m benchmarks.serve_bench"
    serve_swap.add_common_arguments(p)
    p.add_argument("--concurrency", type=concurrency_levels, default=[1, 8, 32],
                   help="serve_load's client counts (default 1,8,32)")
    p.add_argument("--requests", type=cli.positive_int, default=2000,
                   help="serve_load's requests per level (default 2000)")
    serve_swap.add_swap_arguments(p, prefix="swap-")
    p.add_argument("--output", default="serve_bench.json", help="JSON (default serve_bench.json)")
    p.add_argument("--markdown", default="serve_bench.md",
                   help="markdown fragment for docs/BENCHMARKS.md (default serve_bench.md)")
    return p


def main(argv=None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    args.swap_publish_after = serve_swap.check_publish_after(
        p, args.swap_requests, args.swap_publish_after, prefix="swap-")
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
    print(f"[serve_bench] {args.output}, {args.markdown}: " + ("ok" if result["ok"] else "FAILED"),
          flush=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(cli.run(main))

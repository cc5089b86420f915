"""Swap under load: publish a new export version while closed-loop clients hit the service.

``python -m benchmarks.serve_swap --config configs/<x>.yaml [--export-dir exports/<name>]
[--set export.serve_...=...] --concurrency 32 --requests 4000 [--publish-after N]
[--swap-timeout 120] [--body-file F] [--scratch-dir D] [--keep-scratch] [--output F]``

1. **Scratch copy.** The newest complete version of ``--export-dir`` (default ``exports/<name>``
   of the config; ``export.serving.served_versions``), and its ``serving/<v>`` view when there is
   one, are copied into a fresh folder under ``--scratch-dir`` (default the system temp folder)
   with hard links where the file system allows (``export.serving.copy_tree_linked``), so the
   user's tree is never written: the server never writes, and this module only creates folders,
   renames folders and replaces ``metadata.json`` by a new file (``os.replace``) in the scratch
   copy. The scratch folder is removed at the end (``--keep-scratch`` keeps it).
2. **Staging.** The next version ``v + 1`` is assembled before the load starts: a copy of version
   ``v`` under a dot name (``export.serving.tmp_path``, which the server never reads) whose
   ``metadata.json`` says ``"version": v + 1``.
3. **Server.** ``python -m export.server --config C [--set ...] --export-dir <scratch copy>
   --port <a free loopback port>`` in a subprocess (log in the scratch folder); the load starts
   once ``GET /readyz`` answers 200 (``--ready-timeout``).
4. **Load.** ``--concurrency`` threads, one keep-alive ``http.client`` connection each (as
   ``benchmarks.serve_load``), POST ``:retrieve`` bodies in a closed loop, taking request numbers
   from a shared counter (request ``i`` sends body ``i mod len(bodies)``). Once ``--publish-after``
   requests are answered (any status), the staged version is published the way the export
   publishes (``micrec_tf.publish.publish_numbered``: one rename, then
   ``export.serving.publish_serving_view`` when the copy has ``serving/``); the publish time is
   taken after the last rename, when the server can first see the version. The clients stop at
   ``--requests`` requests, but go on while no answer from the new version came (until one comes
   or ``--swap-timeout`` seconds after the publish pass) and for at least ``--after-switch``
   requests (default ``--publish-after``) sent after the first new-version answer: bounded
   either way.
5. **Stop.** SIGTERM to the server; its exit code must be 0.

Bodies: ``--body-file`` (one JSON object, a list or JSON lines, ``serve_load.read_bodies``), else
one ``{"inputs": {...}}`` body per request of the version's own warm-up file
(``user_tower/assets.extra/tf_serving_warmup_requests``: the export's sample test users, one
single user and two unknown users), ``k`` and ``exclude`` left to the server's defaults.

**What is checked** (``checks``; all true gives exit 0, else 1, the JSON written either way):
``no_failures`` (every response 200: a 503 or a connection error counts as failed),
``every_answer_has_a_version`` (every 200 names ``model_version``), ``only_old_and_new`` (no
third version), ``both_versions_seen``, ``no_stale_answer``, ``no_client_regression``,
``server_exit_0``. **Ordering**: ``stale_after_switch`` counts the answers from the OLD version to
requests SENT after the first answer from the new version was RECEIVED by any client. The
service's swap is one assignment and a request takes its version when the server starts it, so a
request sent after an answer from the new version existed must start after the swap and be
answered by the new version (whatever the connection). ``client_regressions`` counts, per client
thread (its requests are sequential), an old-version answer after a new-version answer on that
client: implied by the first, reported on its own. Answers from the old version to requests sent
between the publish and the first new answer are expected (the server polls every
``export.serve_poll_s`` seconds, then loads and warms up the new version while the old one
serves): ``old_after_publish`` counts them.

**Reported** (JSON ``--output``, default ``serve_swap.json``): ``requests`` (sent = answered:
each request ends with a status or a connection error), ``failed``, ``codes``, ``versions``
(200 answers per ``model_version``), ``switch_s`` (publish -> first new-version answer
received, wall clock of this process: includes up to ``serve_poll_s`` of polling), ``last_old_s``
(publish -> last old-version answer received), the server's own figures from its log lines
``[versions] serving version ... (loaded in X s, warmed up in Y s)`` at start and ``swapped
version A -> B (loaded in X s, warmed up in Y s)`` (``server_swap``: ``load_s``, ``warmup_s``,
0.1 s resolution as the server prints them), ``ready_s`` (process start -> ``/readyz`` 200),
latency (nearest-rank p50 / p99 / max ms, as ``serve_load``) over all requests and by phase:
``before`` (sent before the publish), ``switching`` (sent between the publish and the first new
answer), ``after``; ``seconds`` and ``throughput_rps`` of the whole load.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter

from micrec_tf import cli

from benchmarks.serve_load import percentile, post_json, read_bodies

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
START_RE = re.compile(r"\[versions\] serving version (\d+) from .* \(loaded in ([\d.]+) s, "
                      r"warmed up in ([\d.]+) s\)")
SWAP_RE = re.compile(r"\[versions\] swapped version (\d+) -> (\d+) \(loaded in ([\d.]+) s, "
                     r"warmed up in ([\d.]+) s\)")
CHECKS = ("no_failures", "every_answer_has_a_version", "only_old_and_new", "both_versions_seen",
          "no_stale_answer", "no_client_regression", "server_exit_0")


# ----------------------------------------------------------------------------- the export copy
def newest_version(export_dir: str) -> int:
    """The newest version of ``export_dir`` the server would serve (UsageError when none)."""
    from export import serving

    versions = serving.served_versions(export_dir)
    if not versions:
        raise cli.UsageError(f"--export-dir {export_dir!r} holds no complete export version "
                             "(<version>/metadata.json, and serving/<version> where serving/ "
                             "exists): run `make export` first")
    return versions[-1]


def scratch_copy(export_dir: str, scratch: str) -> tuple:
    """Copies the newest version of ``export_dir`` (and its ``serving/`` view) into
    ``scratch/<basename>`` with hard links where possible; returns ``(root, version)``."""
    from export import serving

    version = newest_version(export_dir)
    root = os.path.join(scratch, os.path.basename(os.path.abspath(export_dir)) or "export")
    os.makedirs(root)
    serving.copy_tree_linked(os.path.join(export_dir, str(version)),
                             os.path.join(root, str(version)))
    view = os.path.join(export_dir, serving.SERVING_DIR, str(version))
    if os.path.isdir(view):
        os.makedirs(os.path.join(root, serving.SERVING_DIR))
        serving.copy_tree_linked(view, os.path.join(root, serving.SERVING_DIR, str(version)))
    return root, version


def stage_version(root: str, version: int) -> tuple:
    """A copy of ``root/<version>`` under a dot name, its metadata saying ``version + 1``;
    returns ``(tmp dir, version + 1)``. ``metadata.json`` is replaced by a new file, never
    written in place (it may be a hard link to the user's file)."""
    from export import serving

    new = version + 1
    tmp = serving.tmp_path(root, new)
    serving.copy_tree_linked(os.path.join(root, str(version)), tmp)
    os.chmod(tmp, os.stat(tmp).st_mode | stat.S_IWUSR)  # copytree copies a read-only mode
    meta_path = os.path.join(tmp, "metadata.json")
    with open(meta_path, encoding="utf-8") as fh:
        meta = json.load(fh)
    meta["version"] = new
    with open(meta_path + ".new", "w", encoding="utf-8") as fh:
        json.dump(meta, fh, indent=1)
    os.replace(meta_path + ".new", meta_path)
    return tmp, new


def publish(root: str, tmp: str, version: int) -> int:
    """Publishes the staged ``tmp`` as ``root/<version>`` as the export does; returns the
    version published (the next free number from ``version`` on)."""
    from export import serving
    from micrec_tf import publish as publishing

    published = publishing.publish_numbered(tmp, root, version)
    if os.path.isdir(os.path.join(root, serving.SERVING_DIR)):
        serving.publish_serving_view(root, published)
    return published


def remove_scratch(scratch: str) -> None:
    """Removes the scratch folder (folders made writable first: they are this module's copies;
    files are never chmod-ed, they may be hard links to the user's files)."""
    for dirpath, _, _ in os.walk(scratch):
        try:
            os.chmod(dirpath, os.stat(dirpath).st_mode | stat.S_IWUSR | stat.S_IXUSR)
        except OSError:
            pass
    shutil.rmtree(scratch, ignore_errors=True)


def warmup_bodies(version_dir: str) -> list:
    """One ``{"inputs": {input: values}}`` body (JSON bytes) per request of the version's
    warm-up file; [] when the file is absent."""
    from export import serving

    path = os.path.join(version_dir, "user_tower", serving.WARMUP_FILE)
    if not os.path.exists(path):
        return []

    def plain(value):
        if isinstance(value, list):
            return [plain(v) for v in value]
        return value.decode("utf-8") if isinstance(value, bytes) else value

    return [json.dumps({"inputs": {name: plain(value.tolist()) for name, value in row.items()
                                   if not name.startswith("__")}}).encode("utf-8")
            for row in serving.read_warmup_requests(path)]


def load_bodies(body_file: str | None, version_dir: str) -> list:
    """``--body-file``'s bodies, else the version's warm-up bodies (UsageError when neither)."""
    if body_file:
        try:
            return read_bodies(body_file)
        except (OSError, ValueError) as err:
            raise cli.UsageError(f"--body-file: {err}") from err
    bodies = warmup_bodies(version_dir)
    if not bodies:
        raise cli.UsageError(f"{version_dir} has no warm-up requests (user_tower/assets.extra/"
                             "tf_serving_warmup_requests) to build request bodies from: pass "
                             "--body-file")
    return bodies


# ----------------------------------------------------------------------------- the server process
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``python -m export.server`` over ``export_dir`` on a free loopback port, log in a file."""

    def __init__(self, config: str, export_dir: str, sets: list, log_path: str):
        self.port = free_port()
        self.log_path = log_path
        self._log = open(log_path, "w", encoding="utf-8")
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "export.server", "--config", os.path.abspath(config),
             "--export-dir", os.path.abspath(export_dir), "--host", "127.0.0.1",
             "--port", str(self.port), *[a for s in sets for a in ("--set", s)]],
            cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT)

    def log_text(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as fh:
            return fh.read()

    def wait_ready(self, timeout: float) -> float:
        """Seconds from the process start to ``/readyz`` 200; RuntimeError (with the log's tail)
        if the process exits or ``timeout`` passes first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode} before it was "
                                   f"ready:\n{self.log_text()[-4000:]}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                try:
                    conn.request("GET", "/readyz")
                    if conn.getresponse().status == 200:
                        return time.perf_counter() - self.started
                finally:
                    conn.close()
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"the server was not ready after {timeout:.0f} s:\n"
                           f"{self.log_text()[-4000:]}")

    def stop(self, timeout: float = 120.0) -> int:
        """SIGTERM, then the exit code (SIGKILL and -9 when it has not exited by ``timeout``)."""
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                return -9
        finally:
            self._log.close()


def server_figures(log: str) -> dict:
    """The version manager's own seconds from the server log: ``start`` (version, load_s,
    warmup_s) and ``swaps`` (one per swap line: old, new, load_s, warmup_s)."""
    start = START_RE.search(log)
    return {"start": {"version": int(start.group(1)), "load_s": float(start.group(2)),
                      "warmup_s": float(start.group(3))} if start else None,
            "swaps": [{"old": int(m.group(1)), "new": int(m.group(2)),
                       "load_s": float(m.group(3)), "warmup_s": float(m.group(4))}
                      for m in SWAP_RE.finditer(log)]}


# ----------------------------------------------------------------------------- the load
def run_load(port: int, path: str, bodies: list, requests: int, concurrency: int,
             publish_after: int, publish_fn, new_version: str, swap_timeout: float,
             after_switch: int = 1, timeout: float = 60.0) -> tuple:
    """The closed loop with a publish in the middle (module docstring). Returns ``(records,
    publish_t, seconds)``: one record per request ``(client, seq, sent_t, received_t, code,
    version or None)`` (``perf_counter`` seconds), ``publish_t`` when ``publish_fn()``
    returned. At least ``after_switch`` requests are sent after the first new-version answer."""
    lock = threading.Condition()
    state = {"next": 0, "done": 0, "publish_t": None, "first_new": None, "stop": False,
             "stop_at": requests}
    records: list = []

    def more() -> bool:
        """Under the lock: may one more request be sent?"""
        if state["stop"]:
            return False
        if state["next"] < state["stop_at"]:
            return True
        if state["first_new"] is not None:
            return False
        return (state["publish_t"] is None
                or time.perf_counter() < state["publish_t"] + swap_timeout)

    def worker(client: int):
        conn, local, seq = None, [], 0
        while True:
            with lock:
                if not more():
                    break
                i = state["next"]
                state["next"] += 1
            sent = time.perf_counter()
            conn, code, version, _ = post_json(conn, "127.0.0.1", port, path,
                                               bodies[i % len(bodies)], timeout)
            received = time.perf_counter()
            local.append((client, seq, sent, received, code,
                          None if version is None else str(version)))
            seq += 1
            with lock:
                state["done"] += 1
                if str(version) == new_version and state["first_new"] is None:
                    state["first_new"] = received
                    state["stop_at"] = max(requests, state["next"] + after_switch)
                lock.notify_all()
        if conn is not None:
            conn.close()
        with lock:
            records.extend(local)

    threads = [threading.Thread(target=worker, args=(c,), daemon=True)
               for c in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    try:
        with lock:
            while state["done"] < publish_after and any(t.is_alive() for t in threads):
                lock.wait(0.5)
        publish_fn()
        with lock:
            state["publish_t"] = time.perf_counter()
    except BaseException:
        with lock:
            state["stop"] = True
        for t in threads:
            t.join()
        raise
    for t in threads:
        t.join()
    return records, state["publish_t"], time.perf_counter() - start


def _latency(records: list) -> dict:
    ms = [(r[3] - r[2]) * 1000.0 for r in records]
    return {"requests": len(ms), "p50_ms": percentile(ms, 50) if ms else None,
            "p99_ms": percentile(ms, 99) if ms else None, "max_ms": max(ms) if ms else None}


def analyze(records: list, publish_t: float, old: str, new: str) -> dict:
    """Counts and orderings of one swap run (module docstring); pure, on ``run_load``'s
    records."""
    ok = [r for r in records if r[4] == "200"]
    new_recv = [r[3] for r in ok if r[5] == new]
    first_new = min(new_recv) if new_recv else None
    old_recv = [r[3] for r in ok if r[5] == old]
    stale = sum(1 for r in ok if r[5] == old and first_new is not None and r[2] > first_new)
    regressions = 0
    by_client: dict = {}
    for r in sorted(records, key=lambda r: (r[0], r[1])):
        by_client.setdefault(r[0], []).append(r)
    for seq in by_client.values():
        seen_new = False
        for r in seq:
            if r[5] == new:
                seen_new = True
            elif r[5] == old and seen_new:
                regressions += 1
    versions = Counter(r[5] for r in ok if r[5] is not None)
    if first_new is None:
        phases = {"before": [r for r in records if r[2] < publish_t],
                  "switching": [r for r in records if r[2] >= publish_t], "after": []}
    else:
        phases = {"before": [r for r in records if r[2] < publish_t],
                  "switching": [r for r in records if publish_t <= r[2] <= first_new],
                  "after": [r for r in records if r[2] > first_new]}
    return {
        "requests": len(records),
        "failed": len(records) - len(ok),
        "codes": dict(sorted(Counter(r[4] for r in records).items())),
        "versions": dict(sorted(versions.items())),
        "missing_version": sum(1 for r in ok if r[5] is None),
        "other_versions": sorted(v for v in versions if v not in (old, new)),
        "switch_s": first_new - publish_t if first_new is not None else None,
        "last_old_s": max(old_recv) - publish_t if old_recv else None,
        "old_after_publish": sum(1 for r in ok if r[5] == old and r[2] >= publish_t),
        "stale_after_switch": stale,
        "client_regressions": regressions,
        "latency": {"all": _latency(records),
                    **{name: _latency(rs) for name, rs in phases.items()}},
    }


def checks(result: dict) -> dict:
    """The pass/fail checks of a finished run (module docstring)."""
    return {
        "no_failures": result["failed"] == 0,
        "every_answer_has_a_version": result["missing_version"] == 0,
        "only_old_and_new": not result["other_versions"],
        "both_versions_seen": {str(result["old_version"]), str(result["new_version"])}
        <= set(result["versions"]),
        "no_stale_answer": result["stale_after_switch"] == 0,
        "no_client_regression": result["client_regressions"] == 0,
        "server_exit_0": result["server_exit_code"] == 0,
    }


# ----------------------------------------------------------------------------- one run
def run_swap(config: str, export_dir: str, sets: list, concurrency: int, requests: int,
             publish_after: int | None = None, swap_timeout: float = 120.0,
             after_switch: int | None = None,
             body_file: str | None = None, scratch_dir=None,
             keep_scratch: bool = False, ready_timeout: float = 600.0,
             timeout: float = 60.0, log=print) -> dict:
    """One swap-under-load run (module docstring); returns the result dict (``checks`` and
    ``ok`` included). ``config`` and ``sets`` are the server's (``export.serve_model_name``
    names the model, ``export.serve_poll_s`` is reported as ``poll_s``)."""
    from micrec_tf.config import load_config, parse_overrides

    cfg = load_config(config, parse_overrides(sets))
    model = cfg.export.serve_model_name
    publish_after = requests // 4 if publish_after is None else publish_after
    after_switch = max(1, publish_after) if after_switch is None else after_switch
    scratch = tempfile.mkdtemp(prefix="serve_swap-", dir=scratch_dir)
    server = None
    try:
        root, old = scratch_copy(export_dir, scratch)
        bodies = load_bodies(body_file, os.path.join(root, str(old)))
        tmp, new = stage_version(root, old)
        server = ServerProcess(config, root, sets, os.path.join(scratch, "server.log"))
        ready_s = server.wait_ready(ready_timeout)
        log(f"[serve_swap] server ready on port {server.port} in {ready_s:.1f} s serving "
            f"version {old}; {requests} requests at concurrency {concurrency}, version {new} "
            f"published after {publish_after}")
        published: list = []
        records, publish_t, seconds = run_load(
            server.port, f"/v1/models/{model}:retrieve", bodies, requests, concurrency,
            publish_after, lambda: published.append(publish(root, tmp, new)), str(new),
            swap_timeout, after_switch, timeout)
        new = published[0]
        code = server.stop()
        server_log = server.log_text()
        server = None
        result = {"export_dir": os.path.abspath(export_dir), "config": config, "sets": list(sets),
                  "model": model, "poll_s": cfg.export.serve_poll_s, "concurrency": concurrency,
                  "requests_target": requests,
                  "publish_after": publish_after, "after_switch": after_switch,
                  "swap_timeout_s": swap_timeout,
                  "bodies": len(bodies), "old_version": old, "new_version": new,
                  "ready_s": ready_s, "seconds": seconds,
                  **analyze(records, publish_t, str(old), str(new)),
                  "server": server_figures(server_log), "server_exit_code": code}
        result["throughput_rps"] = result["requests"] / seconds if seconds > 0 else None
        swaps = [s for s in result["server"]["swaps"] if s["new"] == new]
        result["server_swap"] = swaps[0] if swaps else None
        result["checks"] = checks(result)
        result["ok"] = all(result["checks"].values())
        if not result["ok"]:
            result["server_log_tail"] = server_log[-4000:]
        return result
    finally:
        if server is not None:
            server.stop()
        if keep_scratch:
            log(f"[serve_swap] scratch kept: {scratch}")
        else:
            remove_scratch(scratch)


def summary_line(r: dict) -> str:
    swap = r["server_swap"]
    return (f"[serve_swap] {r['requests']} requests, {r['failed']} failed, versions "
            f"{r['versions']}; switch {_fmt(r['switch_s'])} s after the publish (server: load "
            f"{_fmt(swap and swap['load_s'])} s + warm-up {_fmt(swap and swap['warmup_s'])} s); "
            f"stale answers {r['stale_after_switch']}, client regressions "
            f"{r['client_regressions']}; server exit {r['server_exit_code']}; "
            + ("ok" if r["ok"] else "FAILED: " + ", ".join(k for k, v in r["checks"].items()
                                                           if not v)))


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.2f}"


# ----------------------------------------------------------------------------- CLI
def add_common_arguments(p: argparse.ArgumentParser) -> None:
    """The export, bodies and scratch arguments shared with ``benchmarks.serve_bench``."""
    p.add_argument("--export-dir", default=None,
                   help="export root (default exports/<name> of the config); never written")
    p.add_argument("--body-file", default=None,
                   help="request bodies (serve_load's forms); default: the export's warm-up "
                        "requests")
    p.add_argument("--scratch-dir", default=None,
                   help="parent of the scratch copy (default the system temp folder)")
    p.add_argument("--keep-scratch", action="store_true", help="keep the scratch copy")
    p.add_argument("--ready-timeout", type=cli.positive_seconds, default=600.0,
                   help="seconds to wait for /readyz (default 600)")
    p.add_argument("--timeout", type=cli.positive_seconds, default=60.0,
                   help="socket timeout per request in seconds (default 60)")


def add_swap_arguments(p: argparse.ArgumentParser, prefix: str = "") -> None:
    p.add_argument(f"--{prefix}concurrency", type=cli.positive_int, default=32,
                   help="client threads (default 32)")
    p.add_argument(f"--{prefix}requests", type=cli.positive_int, default=4000,
                   help="requests (at least; more while no new-version answer came; default 4000)")
    p.add_argument(f"--{prefix}publish-after", type=cli.positive_int, default=None,
                   help="answered requests before the publish (default requests // 4; "
                        "< requests)")
    p.add_argument(f"--{prefix}after-switch", type=cli.positive_int, default=None,
                   help="requests sent after the first new-version answer, at least (default "
                        "--publish-after, 1 at least)")
    p.add_argument("--swap-timeout", type=cli.positive_seconds, default=120.0,
                   help="seconds after the publish to wait for the new version (default 120)")


def check_publish_after(p: argparse.ArgumentParser, requests: int, publish_after,
                        prefix: str = "") -> int:
    publish_after = requests // 4 if publish_after is None else publish_after
    if not 0 <= publish_after < requests:
        p.error(f"--{prefix}publish-after must be below --{prefix}requests ({requests}). "
                f"Received: {publish_after}")
    return publish_after


def _parser() -> argparse.ArgumentParser:
    p = cli.parser(__doc__)
    p.prog = "python -m benchmarks.serve_swap"
    add_common_arguments(p)
    add_swap_arguments(p)
    p.add_argument("--output", default="serve_swap.json",
                   help="JSON results (default serve_swap.json)")
    return p


def main(argv=None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    publish_after = check_publish_after(p, args.requests, args.publish_after)
    cfg = cli.load(args)
    export_dir = args.export_dir or cfg.export_dir
    if not os.path.isdir(export_dir):
        raise cli.UsageError(f"export root {export_dir!r} not found: run `make export` first")
    result = run_swap(args.config, export_dir, args.set, args.concurrency, args.requests,
                      publish_after, args.swap_timeout, args.after_switch, args.body_file,
                      args.scratch_dir, args.keep_scratch, args.ready_timeout, args.timeout)
    with open(args.output, "w", encoding="utf-8") as fh:
        json.dump(result, fh, indent=1)
    print(summary_line(result), flush=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(cli.run(main))

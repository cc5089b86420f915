"""``benchmarks.serve_swap`` (swap under load) and ``benchmarks.serve_bench`` (one command).

Fast: the counts and orderings of :func:`serve_swap.analyze` on hand-made request records with
every figure worked out by hand in the comments; the server's log lines written out by hand; the
scratch copy, staging and publish on a hand-made tree (the user's tree compared by an lstat
snapshot and its bytes, the published version by its files); the markdown cells of a hand-made
result; argument errors (one line each, exit 2). Slow: REAL ``python -m export.server`` processes
over tests/test_server.py's tiny export: serve_swap at concurrency 4, 60 requests (zero failed,
both versions, counts adding up to the requests sent, SIGTERM exit 0, the user's tree unchanged,
the scratch folder removed); serve_bench with bodies from a warm-up file written here (every JSON
key, the markdown numbers equal to the JSON's). No wall-clock assertion.

Overload (serve_bench step 3): the sustainable rate, the latency bound (each source, the derived
one worked out by hand), the counts and checks from hand-made serve_load levels (a 500 and a
502 fail ``no_5xx_but_503_504``; a 429 is an "other" status; connection errors and client drops
counted apart), the markdown row of a hand-made result. Slow: the serve_bench run above against
a server whose queue holds 2 requests and waits 200 ms per batch (about 5 requests/s), offered
40 requests/s of Poisson arrivals for 2 s: 503s > 0 each with Retry-After, every answer 200 /
503 / 504, the server alive and exiting 0, the markdown row equal to the JSON's.
"""
from __future__ import annotations

import json
import os

import pytest
import yaml

from benchmarks import serve_bench, serve_swap


def _snapshot(root: str) -> dict:
    """{relative path: (mode, size, mtime_ns, bytes or None)} of every entry under ``root``."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            data = None
            if name in filenames:
                with open(path, "rb") as fh:
                    data = fh.read()
            out[os.path.relpath(path, root)] = (st.st_mode, st.st_size, st.st_mtime_ns, data)
    return out


# ----------------------------------------------------------------------------- fast: analysis
# (client, seq, sent, received, code, version); old "1", new "2", published at t = 10.
RECORDS = [
    (0, 0, 1.0, 2.0, "200", "1"), (0, 1, 11.0, 12.0, "200", "1"),
    (0, 2, 13.0, 14.0, "200", "2"), (0, 3, 15.0, 16.0, "200", "2"),
    (1, 0, 1.0, 3.0, "200", "1"),
    (1, 1, 12.0, 14.8, "200", "1"),                       # received after 14, sent before: fine
    (1, 2, 14.5, 15.0, "200", "1"),                       # sent after the first new answer (14)
    (2, 0, 2.0, 4.0, "503", None), (2, 1, 11.0, 14.2, "200", "2"),
    (2, 2, 14.3, 15.0, "200", "1"),                       # stale, and old after new on client 2
    (2, 3, 15.0, 16.0, "200", None),                      # a 200 without a version
]


def test_analyze_counts_and_orderings_worked_by_hand():
    got = serve_swap.analyze(list(reversed(RECORDS)), 10.0, "1", "2")
    assert got["requests"] == 11 and got["failed"] == 1
    assert got["codes"] == {"200": 10, "503": 1}
    assert got["versions"] == {"1": 6, "2": 3}          # client 0: 1 1 2 2, 1: 1 1 1, 2: 2 1
    assert got["missing_version"] == 1 and got["other_versions"] == []
    assert got["switch_s"] == pytest.approx(4.0)       # first new answer received at 14
    assert got["last_old_s"] == pytest.approx(5.0)     # last old answers received at 15
    assert got["old_after_publish"] == 4               # old answers sent at 11, 12, 14.5, 14.3
    assert got["stale_after_switch"] == 2              # sent at 14.5 and 14.3, after 14
    assert got["client_regressions"] == 1              # client 2: 2 then 1
    lat = got["latency"]
    assert [lat[p]["requests"] for p in ("all", "before", "switching", "after")] == [11, 3, 4, 4]
    # before: latencies 1 s, 2 s, 2 s -> nearest-rank p50 = 2nd = 2000 ms, p99 = max = 2000 ms
    assert (lat["before"]["p50_ms"], lat["before"]["p99_ms"], lat["before"]["max_ms"]) == \
        pytest.approx((2000.0, 2000.0, 2000.0))
    # after: 1 s (0,3), 0.5 s (1,2), 0.7 s (2,2), 1 s (2,3) -> sorted .5 .7 1 1: p50 = 2nd
    assert lat["after"]["p50_ms"] == pytest.approx(700.0)


def test_analyze_without_a_new_answer_and_with_a_third_version():
    records = [(0, 0, 1.0, 2.0, "200", "1"), (0, 1, 11.0, 12.0, "200", "7"),
               (1, 0, 11.0, 13.0, "error:ConnectionResetError", None)]
    got = serve_swap.analyze(records, 10.0, "1", "2")
    assert got["switch_s"] is None and got["stale_after_switch"] == 0
    assert got["other_versions"] == ["7"] and got["failed"] == 1
    assert got["latency"]["switching"]["requests"] == 2 and got["latency"]["after"]["requests"] == 0
    result = {**got, "old_version": 1, "new_version": 2, "server_exit_code": -9}
    assert serve_swap.checks(result) == {
        "no_failures": False, "every_answer_has_a_version": True, "only_old_and_new": False,
        "both_versions_seen": False, "no_stale_answer": True, "no_client_regression": True,
        "server_exit_0": False}


def test_server_figures_read_the_version_manager_lines():
    log = ("[server] exports/x: model 'user_tower' on http://127.0.0.1:5 (ready once ...)\n"
           "[versions] serving version 100 from /s/x/100 (loaded in 2.5 s, warmed up in 0.3 s)\n"
           "[versions] swapped version 100 -> 101 (loaded in 1.2 s, warmed up in 0.4 s) "
           "(requests still on 100 finish there)\n"
           "[versions] released version 100\n")
    assert serve_swap.server_figures(log) == {
        "start": {"version": 100, "load_s": 2.5, "warmup_s": 0.3},
        "swaps": [{"old": 100, "new": 101, "load_s": 1.2, "warmup_s": 0.4}]}
    assert serve_swap.server_figures("") == {"start": None, "swaps": []}


# ----------------------------------------------------------------------------- fast: the copy
def _tree(root: str) -> None:
    """Versions 5 and 7 (7 newest, metadata ``{"version": 7}``), serving/5 and serving/7, and a
    half-published 9 (no serving view: not served)."""
    for v in (5, 7, 9):
        os.makedirs(os.path.join(root, str(v), "user_tower"))
        with open(os.path.join(root, str(v), "metadata.json"), "w") as fh:
            json.dump({"version": v, "top_k": 3}, fh)
        with open(os.path.join(root, str(v), "user_tower", "saved_model.pb"), "w") as fh:
            fh.write(f"tower {v}")
    for v in (5, 7):
        os.makedirs(os.path.join(root, "serving", str(v)))
        with open(os.path.join(root, "serving", str(v), "saved_model.pb"), "w") as fh:
            fh.write(f"tower {v}")


def test_scratch_copy_stage_and_publish_leave_the_user_tree_unchanged(tmp_path):
    user = str(tmp_path / "exports" / "x")
    _tree(user)
    before = _snapshot(user)
    scratch = str(tmp_path / "scratch")
    os.makedirs(scratch)
    root, version = serve_swap.scratch_copy(user, scratch)
    assert version == 7 and root == os.path.join(scratch, "x")
    assert sorted(os.listdir(root)) == ["7", "serving"]
    assert os.listdir(os.path.join(root, "serving")) == ["7"]
    tmp, new = serve_swap.stage_version(root, version)
    assert new == 8 and os.path.basename(tmp).startswith(".tmp-8-")
    assert serve_swap.publish(root, tmp, new) == 8
    assert sorted(os.listdir(root)) == ["7", "8", "serving"]
    assert sorted(os.listdir(os.path.join(root, "serving"))) == ["7", "8"]
    with open(os.path.join(root, "8", "metadata.json")) as fh:
        assert json.load(fh) == {"version": 8, "top_k": 3}
    with open(os.path.join(root, "serving", "8", "saved_model.pb")) as fh:
        assert fh.read() == "tower 7"
    with open(os.path.join(root, "7", "metadata.json")) as fh:
        assert json.load(fh) == {"version": 7, "top_k": 3}
    serve_swap.remove_scratch(scratch)
    assert not os.path.exists(scratch)
    assert _snapshot(user) == before


def test_no_complete_version_is_a_usage_error(tmp_path):
    from micrec_tf import cli

    with pytest.raises(cli.UsageError, match="holds no complete export version"):
        serve_swap.newest_version(str(tmp_path))


def test_body_file_errors_are_usage_errors(tmp_path):
    from micrec_tf import cli

    bad = tmp_path / "b.json"
    bad.write_text("[1]")
    with pytest.raises(cli.UsageError, match="--body-file: .*JSON object"):
        serve_swap.load_bodies(str(bad), str(tmp_path))
    with pytest.raises(cli.UsageError, match="no warm-up requests .*pass --body-file"):
        serve_swap.load_bodies(None, str(tmp_path))


# ----------------------------------------------------------------------------- fast: markdown
def test_markdown_cells_are_the_rounded_figures():
    load = {"levels": [{"concurrency": 1, "requests": 10, "throughput_rps": 123.456,
                        "p50_ms": 7.996, "p99_ms": 10.0, "codes": {"200": 10}},
                       {"concurrency": 8, "requests": 10, "throughput_rps": 400.04,
                        "p50_ms": 19.123, "p99_ms": 30.5551, "codes": {"200": 10}}],
            "inprocess": {"requests": 10, "throughput_rps": 900.0, "p50_ms": 1.0,
                          "p99_ms": 2.0},
            "overhead_p50": {"1": 7.996, "8": 19.123}}
    swap = {"requests": 60, "failed": 0, "versions": {"100": 40, "101": 20}, "switch_s": 0.456,
            "server_swap": {"load_s": 0.1, "warmup_s": 0.3}, "stale_after_switch": 0,
            "client_regressions": 0, "server_exit_code": 0, "ok": True, "concurrency": 4,
            "publish_after": 15, "poll_s": 0.2}
    table, inprocess, swap_table = serve_bench.tables(load, swap)
    assert table == [
        {"concurrency": 1, "requests": 10, "throughput_rps": 123.5, "p50_ms": 8.0,
         "p99_ms": 10.0, "overhead_p50": 8.0},
        {"concurrency": 8, "requests": 10, "throughput_rps": 400.0, "p50_ms": 19.12,
         "p99_ms": 30.56, "overhead_p50": 19.12}]
    assert swap_table["switch_s"] == 0.46
    text = serve_bench.markdown({
        "export_dir": "/e/x", "version": 100, "items": 1234, "dim": 4, "bodies": 3,
        "date_utc": "2026-12-07 12:00", "machine": {"cpu_model": "CPU", "cores": 2,
                                                    "simd_flags": ["avx2"]},
        "table": table, "inprocess": inprocess, "swap": swap, "swap_table": swap_table})
    assert "| 1 | 10 | 123.5 | 8.00 | 10.00 | 8.00 |" in text
    assert "| 8 | 10 | 400.0 | 19.12 | 30.56 | 19.12 |" in text
    assert "| in-process (1) | 10 | 900.0 | 1.00 | 2.00 | 1.00 |" in text
    assert "| 60 | 0 | 100: 40, 101: 20 | 0.46 | 0.10 | 0.30 | 0 | 0 | 0 |" in text
    assert "1,234 items" in text and "avx2" in text


# ----------------------------------------------------------------------------- fast: overload
def test_sustainable_rate_is_the_best_closed_loop_throughput():
    load = {"levels": [{"throughput_rps": 50.0}, {"throughput_rps": 180.5},
                       {"throughput_rps": 170.0}, {"throughput_rps": None}]}
    assert serve_bench.sustainable_rate(load) == 180.5
    assert serve_bench.sustainable_rate({"levels": []}) is None


def test_latency_bound_sources_and_the_derived_bound_by_hand():
    # explicit first, then the request timeout, then the queues: 2 x (512 / 256 + 2 / 1000) + 1
    assert serve_bench.latency_bound(3.0, 512, 2.0, 256.0, explicit=0.5) == \
        (0.5, "--overload-latency-bound")
    assert serve_bench.latency_bound(3.0, 512, 2.0, 256.0) == \
        (3.0, "export.serve_request_timeout_s")
    bound, source = serve_bench.latency_bound(0.0, 512, 2.0, 256.0)
    assert bound == pytest.approx(5.004) and source.startswith("2 x (export.serve_max_queue")
    bound, _ = serve_bench.latency_bound(0.0, 2, 300.0, 5.0)    # 2 x (0.4 + 0.3) + 1
    assert bound == pytest.approx(2.4)
    assert serve_bench.latency_bound(0.0, 512, 2.0, None)[0] is None


def _level(codes: dict, ok_p99_ms=120.0, retry_after=None) -> dict:
    """A serve_load open-loop level with ``codes`` (other figures filler, except ok_p99)."""
    sent = sum(v for k, v in codes.items() if k != "dropped_client")
    return {"scheduled": sum(codes.values()), "sent": sent, "offered_rps": 40.0,
            "achieved_rps": 30.0, "ok_rps": 10.0, "ok_p50_ms": 50.0, "ok_p99_ms": ok_p99_ms,
            "ok_max_ms": 130.0, "share_503": 0.5, "codes": codes,
            "retry_after": codes.get("503", 0) if retry_after is None else retry_after}


def test_overload_counts_and_checks_from_a_hand_made_level():
    level = _level({"200": 5, "503": 9, "504": 2, "429": 1, "dropped_client": 3,
                    "error:ConnectionResetError": 2, "error:TimeoutError": 1}, retry_after=8)
    got = serve_bench.overload_summary(level, 0.5, True, 0)
    assert (got["ok"], got["rejected_503"], got["retry_after"], got["expired_504"]) == \
        (5, 9, 8, 2)
    assert got["other_codes"] == {"429": 1}
    assert (got["dropped_client"], got["connection_errors"]) == (3, 3)
    assert (got["scheduled"], got["sent"]) == (23, 20)
    assert got["checks"] == {"no_5xx_but_503_504": True, "server_alive": True,
                             "latency_bounded": True, "server_exit_0": True}
    assert got["passed"] is True
    # 120 ms is not below a 0.1 s bound; no bound or no 200 at all is not "bounded" either
    assert not serve_bench.overload_summary(level, 0.1, True, 0)["checks"]["latency_bounded"]
    assert not serve_bench.overload_summary(level, None, True, 0)["checks"]["latency_bounded"]
    no_ok = _level({"503": 4}, ok_p99_ms=None)
    assert not serve_bench.overload_summary(no_ok, 5.0, True, 0)["checks"]["latency_bounded"]
    for bad in ("500", "502"):
        got = serve_bench.overload_summary(_level({"200": 3, "503": 1, bad: 1}), 5.0, True, 0)
        assert got["checks"]["no_5xx_but_503_504"] is False and got["passed"] is False
        assert got["other_codes"] == {bad: 1}
    dead = serve_bench.overload_summary(_level({"200": 3}), 5.0, False, -9)
    assert dead["checks"]["server_alive"] is False and dead["checks"]["server_exit_0"] is False


def test_overload_markdown_row_is_the_rounded_figures():
    level = _level({"200": 30, "503": 48, "504": 1, "error:ConnectionResetError": 1},
                   ok_p99_ms=412.3456)
    summary = serve_bench.overload_summary(level, 2.4, True, 0)
    overload = {"rate": 41.234, "rate_source": "2 x S", "sustainable_rps": 20.617,
                "factor": 2.0, "duration_s": 2.0, "arrivals": "poisson", "seed": 0,
                "max_queue": 2, "max_batch_size": 256, "max_wait_ms": 200.0,
                "request_timeout_s": 0.0, "latency_bound_source": "derived", **summary}
    overload["offered_rps"] = 41.234
    table = serve_bench.overload_table(overload)
    assert (table["offered_rps"], table["sustainable_rps"], table["ok_p99_ms"],
            table["latency_bound_ms"]) == (41.2, 20.6, 412.35, 2400.0)
    swap = {"requests": 60, "failed": 0, "versions": {"100": 60}, "switch_s": 0.5,
            "server_swap": None, "stale_after_switch": 0, "client_regressions": 0,
            "server_exit_code": 0, "ok": True, "concurrency": 4, "publish_after": 15,
            "poll_s": 0.2}
    load = {"levels": [], "inprocess": None, "overhead_p50": None}
    tbl, inprocess, swap_table = serve_bench.tables(load, swap)
    text = serve_bench.markdown({
        "export_dir": "/e/x", "version": 100, "items": 40, "dim": 4, "bodies": 3,
        "date_utc": "2026-12-07 12:00", "machine": {"cpu_model": "CPU", "cores": 2,
                                                    "simd_flags": []},
        "table": tbl, "inprocess": inprocess, "swap": swap, "swap_table": swap_table,
        "overload": overload, "overload_table": table})
    assert "| 41.2 | 80 | 30 | 50.00 | 412.35 | 2400.00 | 48 (48) | 1 | 0 | 0 | 1 | yes | 0 |" \
        in text
    assert "2 x the sustainable rate S = 20.6 req/s" in text and "poisson arrivals, seed 0" \
        in text
    # without the step there is no overload paragraph
    assert "Overload" not in serve_bench.markdown({
        "export_dir": "/e/x", "version": 100, "items": 40, "dim": 4, "bodies": 3,
        "date_utc": "2026-12-07 12:00", "machine": {"cpu_model": "CPU", "cores": 2,
                                                    "simd_flags": []},
        "table": tbl, "inprocess": inprocess, "swap": swap, "swap_table": swap_table,
        "overload": None, "overload_table": None})


def test_cpu_info_reads_the_first_processor(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text("processor\t: 0\nmodel name\t: Test CPU 9000\nflags\t\t: fpu avx2 sse4_2 "
                    "fma avx512f ht\n\nprocessor\t: 1\nmodel name\t: other\nflags\t: x\n")
    info = serve_bench.cpu_info(str(path))
    assert info["cpu_model"] == "Test CPU 9000"
    assert info["cpu_flags"] == ["avx2", "avx512f", "fma", "fpu", "ht", "sse4_2"]
    assert info["simd_flags"] == ["avx2", "avx512f", "fma", "sse4_2"]
    assert serve_bench.cpu_info(str(tmp_path / "absent"))["cpu_model"] is None


# ----------------------------------------------------------------------------- fast: arguments
@pytest.mark.parametrize("argv", [
    ["--concurrency", "0"], ["--requests", "x"], ["--requests", "10", "--publish-after", "10"],
    ["--swap-timeout", "0"], ["--after-switch", "-1"], ["--ready-timeout", "nan"]])
def test_serve_swap_bad_arguments_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as err:
        serve_swap.main(["--config", "c.yaml", *argv])
    assert err.value.code == 2
    assert "Received" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    ["--concurrency", "1,0"], ["--requests", "0"], ["--swap-concurrency", "a"],
    ["--swap-requests", "4", "--swap-publish-after", "5"], ["--overload-rate", "0"],
    ["--overload-rate", "inf"], ["--overload-duration", "-2"], ["--overload-arrivals", "burst"],
    ["--overload-seed", "-1"], ["--overload-latency-bound", "0"],
    ["--no-overload", "--overload-rate", "5"]])
def test_serve_bench_bad_arguments_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as err:
        serve_bench.main(["--config", "c.yaml", *argv])
    assert err.value.code == 2
    assert "Received" in capsys.readouterr().err


def test_missing_export_root_is_one_error_line(tmp_path, capsys):
    from micrec_tf import cli

    cfg = tmp_path / "c.yaml"
    cfg.write_text("name: tiny\n")
    code = cli.run(serve_swap.main, ["--config", str(cfg), "--export-dir",
                                     str(tmp_path / "none")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "not found" in err[0]


# ----------------------------------------------------------------------------- slow: real servers
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """tests/test_server.py's tiny export (version 100) with a warm-up file of 3 requests, a
    config whose server polls every 0.2 s, and one request body file."""
    from test_server import make_export

    from export import serving

    tmp = tmp_path_factory.mktemp("serve_swap")
    root = os.path.join(str(tmp), "exports", "tiny")
    os.makedirs(root)
    vdir = make_export(root, 100)
    serving.write_warmup_requests(
        os.path.join(vdir, "user_tower", serving.WARMUP_FILE),
        [{"gender": ["F", "M"], "age": ["25", "35"], "region": ["r1", "r2"],
          "history": [["i1", "i2"], ["i3", ""]]},
         {"gender": ["U"], "age": ["x"], "region": ["nowhere"], "history": [["i5"]]},
         {"gender": ["F"], "age": ["1"], "region": ["r"], "history": [[""]]}])
    cfg = os.path.join(str(tmp), "serve.yaml")
    with open(cfg, "w", encoding="utf-8") as fh:
        yaml.safe_dump({"name": "tiny", "export": {"serve_poll_s": 0.2}}, fh)
    bodies = os.path.join(str(tmp), "bodies.json")
    with open(bodies, "w", encoding="utf-8") as fh:
        json.dump([{"instances": [{"gender": "F", "age": "25", "region": "r1",
                                   "history": ["i1", "i2"]}], "k": 3},
                   {"user_vector": [0.5, -1.0, 2.0, 0.25], "k": 5}], fh)
    return str(tmp), root, cfg, bodies


@pytest.mark.slow
def test_swap_under_load_on_the_tiny_export(tiny, tmp_path):
    _, root, cfg, bodies = tiny
    before = _snapshot(root)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    out = tmp_path / "swap.json"
    code = serve_swap.main(["--config", cfg, "--export-dir", root, "--concurrency", "4",
                            "--requests", "60", "--body-file", bodies, "--scratch-dir",
                            str(scratch), "--output", str(out)])
    r = json.loads(out.read_text())
    assert code == 0, r.get("server_log_tail")
    assert r["failed"] == 0 and r["codes"] == {"200": r["requests"]}
    assert set(r["versions"]) == {"100", "101"} and r["old_version"] == 100 \
        and r["new_version"] == 101
    # every request sent is counted once: answers per version add up to the requests sent
    assert sum(r["versions"].values()) == r["requests"] >= 60
    assert r["missing_version"] == 0 and r["stale_after_switch"] == 0 \
        and r["client_regressions"] == 0
    assert r["server_exit_code"] == 0 and all(r["checks"].values())
    assert r["bodies"] == 2 and r["concurrency"] == 4 and r["publish_after"] == 15
    assert r["switch_s"] is not None and r["switch_s"] > 0
    assert r["server_swap"]["old"] == 100 and r["server_swap"]["new"] == 101
    assert r["server"]["start"]["version"] == 100
    lat = r["latency"]
    assert lat["all"]["requests"] == r["requests"] == sum(
        lat[p]["requests"] for p in ("before", "switching", "after"))
    assert lat["after"]["requests"] >= 15                   # --after-switch defaults to 15
    assert os.listdir(scratch) == []                        # the scratch copy is gone
    assert _snapshot(root) == before                        # the user's tree is untouched


@pytest.mark.slow
def test_serve_bench_writes_every_key_and_the_markdown_of_its_json(tiny, tmp_path):
    """Every step on servers whose user tower and search each hold at most 2 waiting requests
    and wait 200 ms for company per batch (about 5 requests/s): steps 1 and 2 have at most 2
    clients (never refused); step 3 offers 40 requests/s (Poisson, seed 0) for 2 s."""
    _, root, cfg, _ = tiny
    out, md = tmp_path / "bench.json", tmp_path / "bench.md"
    code = serve_bench.main(["--config", cfg, "--export-dir", root, "--concurrency", "1,2",
                             "--requests", "6", "--swap-concurrency", "2", "--swap-requests",
                             "20", "--set", "export.serve_max_queue=2",
                             "--set", "export.serve_max_wait_ms=200", "--overload-rate", "40",
                             "--overload-duration", "2", "--scratch-dir", str(tmp_path),
                             "--output", str(out), "--markdown", str(md)])
    r = json.loads(out.read_text())
    assert code == 0, (r["swap"].get("server_log_tail"), r["overload"].get("server_log_tail"),
                       r["overload"]["checks"])
    assert set(r) == {"export_dir", "version", "items", "dim", "config", "sets", "bodies",
                      "machine", "date_utc", "load", "load_server_exit_code", "table",
                      "inprocess", "swap", "swap_table", "overload", "overload_table", "ok"}
    # step 3: the excess refused with 503 + Retry-After, nothing else failed, the server alive
    o = r["overload"]
    codes = o["load"]["levels"][0]["codes"]
    assert o["load"]["arrivals"] == "poisson" and o["load"]["seed"] == 0
    # the schedule is the Poisson draw of seed 0 at 40 /s over 2 s, sent whole
    from benchmarks.serve_load import schedule

    n = len(schedule(40.0, duration=2.0, arrivals="poisson", seed=0))
    assert o["scheduled"] == n and sum(codes.values()) == n
    assert set(codes) <= {"200", "503", "504"}, codes
    assert o["rejected_503"] > 0 and o["retry_after"] == o["rejected_503"]
    assert o["ok"] == codes.get("200", 0) > 0
    assert o["rate"] == 40.0 and o["rate_source"] == "--overload-rate"
    assert o["sustainable_rps"] == max(lv["throughput_rps"] for lv in r["load"]["levels"])
    assert o["max_queue"] == 2 and o["healthz_code"] == 200 and o["server_exit_code"] == 0
    assert o["workers"] == max(256, 2 * (2 + o["max_batch_size"]) + 64)  # more than it holds
    assert all(o["checks"].values()) and o["passed"]
    assert (r["version"], r["items"], r["dim"], r["bodies"]) == (100, 40, 4, 3)  # 3 warm-ups
    assert set(r["machine"]) == {"cpu_model", "cpu_flags", "simd_flags", "cores", "python"}
    assert [row["concurrency"] for row in r["table"]] == [1, 2]
    for level in r["load"]["levels"]:
        assert level["requests"] == 6 and level["codes"] == {"200": 6}
        assert level["versions"] == {"100": 6}
    assert r["load_server_exit_code"] == 0 and r["swap"]["ok"] and r["ok"]
    assert r["swap_table"]["failed"] == 0 and set(r["swap_table"]["versions"]) == {"100", "101"}
    assert sorted(os.listdir(tmp_path)) == ["bench.json", "bench.md"]  # scratch copies gone
    # the markdown's numbers are the JSON's: parse its two tables back
    before_overload = md.read_text().split("\nOverload (")[0]
    rows = [line.strip("|").split("|") for line in before_overload.splitlines()
            if line.startswith("| ") and not line.startswith("| concurrency")
            and not line.startswith("| requests")]
    cells = [[c.strip() for c in row] for row in rows]
    for row, want in zip(cells, r["table"]):
        assert [int(row[0]), int(row[1])] == [want["concurrency"], want["requests"]]
        assert [float(x) for x in row[2:6]] == [want["throughput_rps"], want["p50_ms"],
                                                 want["p99_ms"], want["overhead_p50"]]
    ip = cells[len(r["table"])]
    assert ip[0] == "in-process (1)" and [float(x) for x in ip[2:5]] == \
        [r["inprocess"]["throughput_rps"], r["inprocess"]["p50_ms"], r["inprocess"]["p99_ms"]]
    s, sw = cells[-1], r["swap_table"]
    assert [int(s[0]), int(s[1])] == [sw["requests"], sw["failed"]]
    assert s[2] == ", ".join(f"{v}: {n}" for v, n in sw["versions"].items())
    assert [float(x) for x in s[3:6]] == [sw["switch_s"], sw["server_load_s"],
                                           sw["server_warmup_s"]]
    assert [int(x) for x in s[6:9]] == [sw["stale_after_switch"], sw["client_regressions"],
                                        sw["server_exit_code"]]
    assert f"{r['items']:,} items" in md.read_text()
    ot = r["overload_table"]
    lines = md.read_text().splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| offered (req/s)"))
    row = [c.strip() for c in lines[header + 2].strip("|").split("|")]
    assert row[0] == f"{ot['offered_rps']:.1f}" and [int(x) for x in row[1:3]] == \
        [ot["scheduled"], ot["ok"]]
    assert [float(x) for x in row[3:6]] == [ot["ok_p50_ms"], ot["ok_p99_ms"],
                                             ot["latency_bound_ms"]]
    assert row[6] == f"{ot['rejected_503']} ({ot['retry_after']})"
    assert row[7:] == [str(ot["expired_504"]), "0", "0", "0", "yes", "0"]


def test_overload_workers_outnumber_what_the_server_holds():
    # two stages, each 512 queued + a batch of 256 running, + 64: 1,600 threads
    assert serve_bench.overload_workers(512, 256) == 2 * (512 + 256) + 64 == 1600
    assert serve_bench.overload_workers(2, 4) == 256          # never below serve_load's default
    assert serve_bench.overload_workers(512, 256, workers=256) == 256   # the 2026-12-07 setting
    with pytest.raises(SystemExit):
        serve_bench._parser().parse_args(["--config", "c.yaml", "--overload-workers", "0"])

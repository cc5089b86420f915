"""``python -m benchmarks.serve_load``: bounded loops, counts and percentiles.

References: hand-computed nearest-rank percentiles; a stdlib HTTP server in this process that
counts what it received and answers 200 or 503 by body (fast); a real ``python -m export.server``
process over tests/test_server.py's tiny export (slow): every response 200 and carrying version
100, exactly ``--requests`` per level. No wall-clock assertion.

Open loop (``--rate``): the fixed-interval schedule written out by hand (``i / R``, ``ceil(R x
S)`` requests, float rounding of ``R x S`` included); the level's figures from hand-made records
(percentiles, rates and shares computed by hand); the counting server's tallies for ``R x S``
requests; ``dropped_client`` made deterministic by a server that holds its answers until the
whole schedule has been dispatched; one-line argument errors. Poisson arrivals: determinism
for a seed, strictly increasing offsets below the duration, the mean gap of 20,000 draws within
3 % of 1 / rate and their coefficient of variation within 5 % of 1 (the exponential law's, by
pure-Python sums over a fixed seed), the counting server's tallies of the drawn schedule.
Slow: overload of a real server
(queue of 2, a 300 ms batching window) at 40 requests/s: 503s with ``Retry-After``, every 200
run in a batch of at most ``max_queue`` requests (counts from /metrics), ``/healthz`` 200 after.

Stale keep-alive connections: a stdlib server that closes every connection after one answer
without ``Connection: close`` (the client's next request on it fails): each later request is
retried once on a fresh connection (``reconnects`` = requests - 1, every request answered 200,
the server's own count of connections and answers); the same in the open loop with one worker
(sent = 200s = reconnects + 1, whatever the timing dropped); a drop on a fresh connection (the
retry's or a first one) is a connection error, never retried twice (the server's connection
count); one attempt only with ``post_json`` (serve_swap's). The old code gave 2 connection
errors of 5 requests on that server. serve_bench's summary, table and markdown carry the count.
"""
import http.server
import json
import threading
from collections import Counter

import pytest

from benchmarks import serve_load


def test_percentile_is_nearest_rank():
    values = [5, 1, 4, 2, 3]  # sorted 1..5
    assert serve_load.percentile(values, 50) == 3.0   # ceil(2.5) = 3rd
    assert serve_load.percentile(values, 99) == 5.0   # ceil(4.95) = 5th
    assert serve_load.percentile(values, 20) == 1.0   # ceil(1.0) = 1st
    assert serve_load.percentile(list(range(1, 101)), 99) == 99.0


def test_read_bodies_takes_an_object_a_list_or_json_lines(tmp_path):
    one, many, lines = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "c.jsonl"
    one.write_text('{"k": 1}')
    many.write_text('[{"k": 1}, {"k": 2}]')
    lines.write_text('{"k": 1}\n\n{"k": 3}\n')
    assert [json.loads(b) for b in serve_load.read_bodies(str(one))] == [{"k": 1}]
    assert [json.loads(b) for b in serve_load.read_bodies(str(many))] == [{"k": 1}, {"k": 2}]
    assert [json.loads(b) for b in serve_load.read_bodies(str(lines))] == [{"k": 1}, {"k": 3}]
    bad = tmp_path / "d.json"
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        serve_load.read_bodies(str(bad))


@pytest.mark.parametrize("argv", [["--concurrency", "0"], ["--concurrency", "a,2"],
                                  ["--requests", "0"]])
def test_bad_arguments_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as err:
        serve_load._parser().parse_args(["--url", "http://127.0.0.1:1", "--body-file", "x",
                                         *argv])
    assert err.value.code == 2
    assert "Received" in capsys.readouterr().err


@pytest.fixture()
def counting_server():
    """A loopback HTTP server: 503 for bodies with ``"busy"``, else 200 ``{"model_version":
    "7"}``; ``received`` counts the bodies it got."""
    received, lock = Counter(), threading.Lock()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            with lock:
                received[(self.path, body)] += 1
            busy = b"busy" in body
            data = b'{"error": "busy"}' if busy else b'{"model_version": "7", "ids": [[]]}'
            self.send_response(503 if busy else 200)
            if busy:
                self.send_header("Retry-After", "1")
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}", received
    finally:
        srv.shutdown()
        srv.server_close()


def test_levels_send_exactly_n_requests_and_count_codes(counting_server, tmp_path):
    url, received = counting_server
    bodies = tmp_path / "bodies.json"
    bodies.write_text(json.dumps([{"k": 1}, {"k": 2}, {"busy": 1}]))
    out = tmp_path / "out.json"
    assert serve_load.main(["--url", url, "--model", "m", "--concurrency", "1,4",
                            "--requests", "10", "--body-file", str(bodies),
                            "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    # request i (0..9) sends body i mod 3: body 0 four times, bodies 1 and 2 three times each
    for level, c in zip(result["levels"], (1, 4)):
        assert level["concurrency"] == c and level["requests"] == 10
        assert level["codes"] == {"200": 7, "503": 3}
        assert level["versions"] == {"7": 7}
        assert level["p50_ms"] <= level["p99_ms"] <= level["max_ms"]
    path = "/v1/models/m:retrieve"
    assert received == Counter({(path, b'{"k": 1}'): 8, (path, b'{"k": 2}'): 6,
                                (path, b'{"busy": 1}'): 6})
    assert result["inprocess"] is None and result["overhead_p50"] is None


def test_a_refused_connection_is_counted_not_raised(tmp_path):
    import socket

    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    level = serve_load.run_level(f"http://127.0.0.1:{port}", "/v1/models/m:retrieve",
                                 [b"{}"], 3, 2, timeout=5)
    assert level["requests"] == 3
    assert sum(level["codes"].values()) == 3
    assert all(code.startswith("error:") for code in level["codes"])
    assert level["reconnects"] == 0   # a refusal on a fresh connection is never retried


@pytest.mark.slow
def test_against_the_real_server_every_answer_is_200_from_version_100(tmp_path):
    from test_server import Server, make_export

    root = tmp_path / "exports" / "tiny"
    root.mkdir(parents=True)
    vdir = make_export(str(root), 100)
    rows = [{"gender": "F", "age": "25", "region": "r1", "history": ["i1", "i2"]},
            {"gender": "M", "age": "35", "region": "r2", "history": ["i3", ""]}]
    bodies = tmp_path / "bodies.json"
    bodies.write_text(json.dumps([{"instances": rows[:1], "k": 3},
                                  {"instances": rows, "k": 5, "exclude": [["i0"], []]}]))
    srv = Server(str(tmp_path), str(root))
    try:
        srv.wait_ready()
        out = tmp_path / "out.json"
        assert serve_load.main(["--url", f"http://127.0.0.1:{srv.port}", "--verb", "retrieve",
                                "--concurrency", "1,3", "--requests", "6",
                                "--body-file", str(bodies), "--inprocess", vdir,
                                "--output", str(out)]) == 0
    finally:
        code = srv.stop()
    assert code == 0, srv.stderr()
    result = json.loads(out.read_text())
    assert [lv["concurrency"] for lv in result["levels"]] == [1, 3]
    for level in result["levels"]:
        assert level["requests"] == 6
        assert level["codes"] == {"200": 6}, srv.stderr()
        assert level["versions"] == {"100": 6}
    assert result["inprocess"]["requests"] == 6
    assert set(result["overhead_p50"]) == {"1", "3"}
    assert all(r > 0 for r in result["overhead_p50"].values())


# ----------------------------------------------------------------------------- open loop
def test_schedule_is_a_fixed_interval_written_out_by_hand():
    assert serve_load.schedule(4, duration=1) == [0.0, 0.25, 0.5, 0.75]
    assert serve_load.schedule(2.5, duration=1) == [0.0, 0.4, 0.8]      # ceil(2.5) = 3
    # 10 x 0.3 is 3.0000000000000004 in floats: still the 3 times 0, 0.1, 0.2 (< 0.3)
    assert serve_load.schedule(10, duration=0.3) == [0.0, 0.1, 0.2]
    assert len(serve_load.schedule(50, duration=0.4)) == 20
    assert serve_load.schedule(5, requests=3) == [0.0, 0.2, 0.4]
    for kwargs, message in [({"rate": 0, "duration": 1}, "rate must be"),
                            ({"rate": 5}, "exactly one of duration and requests"),
                            ({"rate": 5, "duration": 1, "requests": 2}, "exactly one"),
                            ({"rate": 5, "duration": 0}, "duration must be"),
                            ({"rate": 5, "requests": 0}, "requests must be")]:
        with pytest.raises(ValueError, match=message):
            serve_load.schedule(**kwargs)


class _OneAnswerPerConnection(http.server.BaseHTTPRequestHandler):
    """HTTP/1.1, answers 200 ``{"model_version": "7"}`` with a Content-Length and NO
    ``Connection: close``, then closes the connection anyway (what uvicorn does to a keep-alive
    connection idle past its timeout): the client's next request on it fails. ``server.log``
    counts (connection number, request number on it); ``server.drop_after`` > 0: connections
    from that number on are closed before reading anything."""
    protocol_version = "HTTP/1.1"

    def handle(self):
        with self.server.lock:
            self.server.connections += 1
            self.conn_no = self.server.connections
        if self.server.drop_after and self.conn_no >= self.server.drop_after:
            return          # closed without a byte read or written
        self.close_connection = True
        self.handle_one_request()

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        with self.server.lock:
            self.server.answered += 1
        data = b'{"model_version": "7"}'
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        self.close_connection = True   # no Connection header: the client keeps it alive

    def log_message(self, *args):
        pass


@pytest.fixture()
def closing_server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _OneAnswerPerConnection)
    srv.lock, srv.connections, srv.answered, srv.drop_after = threading.Lock(), 0, 0, 0
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()


def test_a_stale_keep_alive_connection_is_retried_once_on_a_fresh_one(closing_server):
    url = f"http://127.0.0.1:{closing_server.server_address[1]}"
    path = "/v1/models/m:retrieve"
    # one thread, 5 requests: request 1 on a fresh connection, requests 2..5 each on the
    # connection the previous answer left open (closed by the server): 4 retries, 5 answers
    level = serve_load.run_level(url, path, [b"{}"], 5, 1, timeout=10)
    assert level["codes"] == {"200": 5} and level["versions"] == {"7": 5}
    assert level["reconnects"] == 4
    assert closing_server.answered == 5
    # 5 first connections + 4 fresh ones for the retries (each failed attempt opened none)
    assert closing_server.connections == 5
    # the function itself: a fresh connection is not a reconnect, the reused one is
    host, port = "127.0.0.1", closing_server.server_address[1]
    conn, code, version, _, again = serve_load.post_json_counted(None, host, port, path, b"{}",
                                                                 10)
    assert (code, version, again) == ("200", "7", False) and conn is not None
    conn, code, version, _, again = serve_load.post_json_counted(conn, host, port, path, b"{}",
                                                                 10)
    assert (code, version, again) == ("200", "7", True)
    conn.close()
    # one attempt only (serve_swap's post_json): the stale connection is a connection error
    conn, code, _, _ = serve_load.post_json(None, host, port, path, b"{}", 10)
    conn, code, _, _ = serve_load.post_json(conn, host, port, path, b"{}", 10)
    assert code.startswith("error:") and conn is None


def test_open_loop_retries_stale_connections_too(closing_server):
    url = f"http://127.0.0.1:{closing_server.server_address[1]}"
    # one worker, one connection: every request it sends after its first one finds the
    # connection closed by the server; whatever the timing drops, sent = 200s = retries + 1
    level = serve_load.run_open_level(url, "/v1/models/m:retrieve", [b"{}"], rate=20,
                                      requests=4, workers=1, timeout=10)
    assert set(level["codes"]) <= {"200", "dropped_client"}
    assert level["codes"]["200"] == level["sent"] >= 1
    assert level["reconnects"] == level["sent"] - 1
    assert closing_server.answered == level["sent"]


def test_a_failure_on_a_fresh_connection_stays_a_connection_error(closing_server):
    url = f"http://127.0.0.1:{closing_server.server_address[1]}"
    # connection 1 answers, every later connection is dropped unanswered: request 2 fails on
    # the stale connection, is retried once on a fresh one, which is dropped: one connection
    # error, one reconnect, nothing retried twice (2 connections in all)
    closing_server.drop_after = 2
    level = serve_load.run_level(url, "/v1/models/m:retrieve", [b"{}"], 2, 1, timeout=10)
    assert level["codes"]["200"] == 1 and level["requests"] == 2
    errors = {k: v for k, v in level["codes"].items() if k != "200"}
    assert sum(errors.values()) == 1 and all(k.startswith("error:") for k in errors)
    assert level["reconnects"] == 1 and closing_server.connections == 2
    # a drop on a first (fresh) connection: a connection error, no retry
    closing_server.drop_after = 1
    level = serve_load.run_level(url, "/v1/models/m:retrieve", [b"{}"], 3, 1, timeout=10)
    assert level["requests"] == 3 and level["reconnects"] == 0
    assert all(k.startswith("error:") for k in level["codes"])
    assert sum(level["codes"].values()) == 3 and closing_server.connections == 5


def test_open_level_figures_are_the_hand_computed_ones():
    # (scheduled s, answered s, code, version, Retry-After): rate 10/s, 5 scheduled
    records = [(0.0, 0.010, "200", "7", False), (0.1, 0.130, "200", "7", False),
               (0.2, 0.205, "503", None, True), (0.3, None, "dropped_client", None, False),
               (0.4, 0.440, "error:ConnectionRefusedError", None, False)]
    got = serve_load.summarize_open(records, 10.0, 5)
    # latencies of the 4 sent, from their scheduled times: 10, 30, 5, 40 ms -> sorted 5 10 30 40
    assert got["p50_ms"] == pytest.approx(10.0)       # rank ceil(0.5 x 4) = 2
    assert got["p99_ms"] == pytest.approx(40.0)       # rank ceil(0.99 x 4) = 4
    assert got["max_ms"] == pytest.approx(40.0) and got["mean_ms"] == pytest.approx(21.25)
    assert got["ok_p50_ms"] == pytest.approx(10.0) and got["ok_p99_ms"] == pytest.approx(30.0)
    assert (got["scheduled"], got["sent"], got["dropped_client"]) == (5, 4, 1)
    assert got["seconds"] == pytest.approx(0.5)       # max(5 / 10, last answer 0.44)
    assert got["offered_rps"] == 10.0
    assert got["achieved_rps"] == pytest.approx(6.0)  # 3 HTTP answers / 0.5 s
    assert got["ok_rps"] == pytest.approx(4.0)
    assert got["share_503"] == pytest.approx(0.2) and got["retry_after"] == 1
    assert got["codes"] == {"200": 2, "503": 1, "dropped_client": 1,
                            "error:ConnectionRefusedError": 1}
    assert got["versions"] == {"7": 2} and got["arrivals"] == "fixed"


def test_open_loop_sends_rate_times_duration_requests(counting_server, tmp_path):
    url, received = counting_server
    bodies = tmp_path / "bodies.json"
    bodies.write_text(json.dumps([{"k": 1}, {"k": 2}, {"busy": 1}]))
    out = tmp_path / "out.json"
    assert serve_load.main(["--url", url, "--model", "m", "--verb", "predict",
                            "--rate", "50,25", "--duration", "0.4", "--workers", "32",
                            "--body-file", str(bodies), "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["mode"] == "open" and result["arrivals"] == "fixed"
    # 50/s x 0.4 s = 20 requests: bodies i mod 3 -> 7, 7, 6; 25/s x 0.4 s = 10 -> 4, 3, 3
    (fast, slow) = result["levels"]
    assert (fast["rate"], fast["scheduled"], fast["sent"]) == (50.0, 20, 20)
    assert fast["codes"] == {"200": 14, "503": 6} and fast["retry_after"] == 6
    assert fast["share_503"] == pytest.approx(6 / 20) and fast["versions"] == {"7": 14}
    assert (slow["rate"], slow["scheduled"], slow["sent"]) == (25.0, 10, 10)
    assert slow["codes"] == {"200": 7, "503": 3}
    for level in (fast, slow):
        assert level["p50_ms"] <= level["p99_ms"] <= level["max_ms"]
        assert level["offered_rps"] == level["rate"]
    path = "/v1/models/m:predict"
    assert received == Counter({(path, b'{"k": 1}'): 11, (path, b'{"k": 2}'): 10,
                                (path, b'{"busy": 1}'): 9})


def test_an_exhausted_pool_drops_instead_of_delaying():
    """2 workers, 5 requests; the server holds every answer until all 5 were dispatched: the
    first 2 are sent, the other 3 find no idle worker and are dropped_client, never sent late."""
    received, gate = [], threading.Event()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):
            received.append(self.rfile.read(int(self.headers["Content-Length"])))
            assert gate.wait(60)
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        level = serve_load.run_open_level(
            f"http://127.0.0.1:{srv.server_address[1]}", "/v1/models/m:retrieve",
            [b'{"n": 0}', b'{"n": 1}', b'{"n": 2}', b'{"n": 3}', b'{"n": 4}'], rate=100,
            requests=5, workers=2, timeout=60, after_schedule=gate.set)
    finally:
        gate.set()
        srv.shutdown()
        srv.server_close()
    assert level["codes"] == {"200": 2, "dropped_client": 3}
    assert (level["scheduled"], level["sent"], level["dropped_client"]) == (5, 2, 3)
    assert sorted(received) == [b'{"n": 0}', b'{"n": 1}']
    assert level["share_503"] == 0.0


def _gaps(offsets: list) -> list:
    """Inter-arrival gaps, the first from 0 (pure Python)."""
    return [b - a for a, b in zip([0.0] + offsets[:-1], offsets)]


def test_poisson_schedule_is_deterministic_increasing_and_bounded():
    one = serve_load.schedule(40, duration=3, arrivals="poisson", seed=7)
    assert one == serve_load.schedule(40, duration=3, arrivals="poisson", seed=7)
    assert one != serve_load.schedule(40, duration=3, arrivals="poisson", seed=8)
    assert all(b > a for a, b in zip(one, one[1:])) and one[0] > 0
    assert max(one) < 3
    # the requests=N schedule is the first N arrivals of the same draws; the next one is >= 3 s
    longer = serve_load.schedule(40, requests=len(one) + 1, arrivals="poisson", seed=7)
    assert longer[:-1] == one and longer[-1] >= 3
    assert len(serve_load.schedule(5, requests=37, arrivals="poisson", seed=1)) == 37
    # not a fixed interval: the gaps differ
    assert len({round(g, 9) for g in _gaps(one)}) == len(one)
    # a long duration beyond the first block of draws: still every arrival < duration, and the
    # same draws as a requests=N schedule
    long_one = serve_load.schedule(10, duration=60, arrivals="poisson", seed=3)
    assert max(long_one) < 60 and all(b > a for a, b in zip(long_one, long_one[1:]))
    assert serve_load.schedule(10, requests=len(long_one), arrivals="poisson",
                               seed=3) == long_one
    for kwargs, message in [({"arrivals": "burst"}, "arrivals must be one of"),
                            ({"arrivals": "poisson", "seed": -1}, "seed must be"),
                            ({"arrivals": "poisson", "seed": 1.5}, "seed must be")]:
        with pytest.raises(ValueError, match=message):
            serve_load.schedule(5, duration=1, **kwargs)


def test_poisson_gaps_have_mean_one_over_rate_and_unit_variation():
    """20,000 draws at 50 /s, a fixed seed (deterministic): an exponential law has mean 1 / rate
    and standard deviation = mean (coefficient of variation 1); the fixed schedule's CV is 0."""
    gaps = _gaps(serve_load.schedule(50, requests=20000, arrivals="poisson", seed=0))
    n = len(gaps)
    mean = sum(gaps) / n
    std = (sum((g - mean) ** 2 for g in gaps) / (n - 1)) ** 0.5
    assert n == 20000
    assert abs(mean - 1 / 50) <= 0.03 * (1 / 50)
    assert abs(std / mean - 1.0) <= 0.05
    # a Poisson count: the arrivals in [0, 400 s) at 50 /s number 20,000 on average (sd 141)
    count = len(serve_load.schedule(50, duration=400, arrivals="poisson", seed=0))
    assert abs(count - 20000) <= 5 * 141


def test_poisson_open_loop_sends_the_schedule_and_reports_it(counting_server, tmp_path):
    url, received = counting_server
    bodies = tmp_path / "bodies.json"
    bodies.write_text(json.dumps([{"k": 1}, {"busy": 1}]))
    out = tmp_path / "out.json"
    want = serve_load.schedule(60, duration=0.5, arrivals="poisson", seed=4)
    assert serve_load.main(["--url", url, "--model", "m", "--rate", "60", "--duration", "0.5",
                            "--arrivals", "poisson", "--seed", "4", "--workers", "32",
                            "--body-file", str(bodies), "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["arrivals"] == "poisson" and result["seed"] == 4
    (level,) = result["levels"]
    n = len(want)
    busy = n // 2          # request i sends body i mod 2: odd i are the busy ones
    assert level["arrivals"] == "poisson"
    assert (level["scheduled"], level["sent"]) == (n, n)
    assert n > 2 and level["codes"] == {"200": n - busy, "503": busy}
    assert level["seconds"] >= 0.5 and level["offered_rps"] == 60.0
    path = "/v1/models/m:retrieve"
    assert received == Counter({(path, b'{"k": 1}'): n - busy, (path, b'{"busy": 1}'): busy})


@pytest.mark.parametrize("argv", [
    ["--rate", "0", "--duration", "1"], ["--rate", "a", "--duration", "1"],
    ["--rate", "5", "--duration", "1", "--arrivals", "burst"],
    ["--rate", "5", "--duration", "1", "--arrivals", "poisson", "--seed", "-3"],
    ["--rate", "5", "--duration", "1", "--arrivals", "poisson", "--seed", "x"],
    ["--rate", "5", "--duration", "1", "--seed", "2"], ["--arrivals", "poisson"],
    ["--rate", "5"], ["--rate", "5", "--duration", "1", "--requests", "3"],
    ["--duration", "1"], ["--workers", "4"], ["--rate", "5", "--duration", "-1"],
    ["--rate", "5", "--duration", "1", "--concurrency", "2"],
    ["--rate", "5", "--duration", "1", "--inprocess", "exports/x/1"]])
def test_open_loop_argument_errors_are_one_line(argv, capsys):
    with pytest.raises(SystemExit) as err:
        serve_load.main(["--url", "http://127.0.0.1:1", "--body-file", "x", *argv])
    assert err.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in lines if ": error: " in line]
    assert len(errors) == 1 and errors[0] == lines[-1] and "Received" in errors[0], lines
    for value in ("burst", "-3", "'x'"):   # a bad value is named in the message
        if value.strip("'") in argv:
            assert value in errors[0], errors


@pytest.mark.slow
def test_overload_open_loop_gets_503s_and_the_server_survives(tmp_path):
    """A tiny server whose user tower takes at most 2 waiting requests (serve_max_queue=2) and
    waits 300 ms for company before each batch (it never fills 256 rows): it runs at most 2
    requests per batch, about 7 per second, so 40 per second for 2 s is far above it. Expected:
    503s with Retry-After, one per rejection the server counted; every 200 went through a batch
    of at most max_queue requests (200s = rows run <= 2 x batches: the 200s' latency is bounded by
    the queue, never a backlog); the queue never held more than 2; /healthz 200 afterwards."""
    from test_server import Server, _samples, make_export

    root = tmp_path / "exports" / "tiny"
    root.mkdir(parents=True)
    make_export(str(root), 100)
    bodies = tmp_path / "bodies.json"
    bodies.write_text(json.dumps({"instances": [{"gender": "F", "age": "25", "region": "r1",
                                                 "history": ["i1", "i2"]}]}))
    srv = Server(str(tmp_path), str(root), "export.serve_max_queue=2",
                 "export.serve_max_wait_ms=300")
    try:
        srv.wait_ready()
        out = tmp_path / "out.json"
        assert serve_load.main(["--url", f"http://127.0.0.1:{srv.port}", "--verb", "predict",
                                "--rate", "40", "--duration", "2", "--workers", "64",
                                "--body-file", str(bodies), "--output", str(out)]) == 0
        metrics = _samples(srv.request("GET", "/metrics")[2].decode())
        health = srv.request("GET", "/healthz")[0]
    finally:
        code = srv.stop()
    assert code == 0, srv.stderr()
    level = json.loads(out.read_text())["levels"][0]
    codes = level["codes"]
    assert level["scheduled"] == 80 and set(codes) <= {"200", "503"}, codes
    assert codes.get("200", 0) + codes.get("503", 0) == 80
    assert codes.get("503", 0) >= 1 and codes.get("200", 0) >= 1, codes
    assert level["retry_after"] == codes["503"]
    tower = (("stage", "user_tower"),)
    assert metrics[("micrec_rejected_total", tower)] == codes["503"]
    assert metrics[("micrec_requests_total", (("code", "503"), ("endpoint", "predict")))] == \
        codes["503"]
    assert metrics[("micrec_stage_batch_size_sum", tower)] == codes["200"]   # 1 user each
    assert codes["200"] <= 2 * metrics[("micrec_stage_batch_size_count", tower)]
    assert metrics[("micrec_queue_depth_max", tower)] <= 2
    assert health == 200


def test_serve_bench_reports_the_reconnects_apart_from_the_connection_errors():
    from benchmarks import serve_bench

    level = {"scheduled": 10, "sent": 10, "offered_rps": 40.0, "achieved_rps": 30.0,
             "ok_rps": 10.0, "ok_p50_ms": 50.0, "ok_p99_ms": 120.0, "ok_max_ms": 130.0,
             "share_503": 0.0, "retry_after": 0, "reconnects": 3,
             "codes": {"200": 9, "error:ConnectionRefusedError": 1}}
    summary = serve_bench.overload_summary(level, 2.0, True, 0)
    assert (summary["reconnects"], summary["connection_errors"]) == (3, 1)
    overload = {"rate": 40.0, "rate_source": "2 x S", "sustainable_rps": 20.0, "factor": 2.0,
                "duration_s": 2.0, "arrivals": "fixed", "seed": None, "max_queue": 2,
                "max_batch_size": 4, "max_wait_ms": 2.0, "request_timeout_s": 0.0,
                "latency_bound_source": "derived", **summary}
    table = serve_bench.overload_table(overload)
    assert table["reconnects"] == 3
    swap = {"requests": 4, "failed": 0, "versions": {"1": 4}, "switch_s": 0.5,
            "server_swap": None, "stale_after_switch": 0, "client_regressions": 0,
            "server_exit_code": 0, "ok": True, "concurrency": 2, "publish_after": 2,
            "poll_s": 0.2}
    tbl, inprocess, swap_table = serve_bench.tables({"levels": []}, swap)
    text = serve_bench.markdown({
        "export_dir": "/e", "version": 1, "items": 4, "dim": 2, "bodies": 1,
        "date_utc": "2026-12-07 20:00", "machine": {"cpu_model": "CPU", "cores": 2,
                                                    "simd_flags": []},
        "table": tbl, "inprocess": inprocess, "swap": swap, "swap_table": swap_table,
        "overload": overload, "overload_table": table})
    assert "retried once on a fresh one; latency from the first attempt): 3." in text
    # a level from before the rule (no "reconnects" key) reads as 0
    del level["reconnects"]
    assert serve_bench.overload_summary(level, 2.0, True, 0)["reconnects"] == 0

"""``python -m benchmarks.serve_load``: bounded loops, counts and percentiles.

References: hand-computed nearest-rank percentiles; a stdlib HTTP server in this process that
counts what it received and answers 200 or 503 by body (fast); a real ``python -m export.server``
process over tests/test_server.py's tiny export (slow): every response 200 and carrying version
100, exactly ``--requests`` per level. No wall-clock assertion.
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

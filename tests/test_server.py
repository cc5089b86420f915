"""export/server.py: the HTTP retrieval service.

Fast tests check the request parsing and limits against hand-written expectations (no server, no
TensorFlow). The slow ones start REAL server processes (``python -m export.server``) on a free
loopback port over a tiny export made in a fixture: a hand-written user tower saved as a
SavedModel (hashed profile and history embeddings, 4 floats) and 40 random item vectors, brute
force (no training: the export is the one thing under test). References: the SavedModel loaded in
this process and run through :func:`export.rest.predict` (the JSON TF Serving returns), a numpy
brute-force top-k over the export's own ``embeddings.npy`` (independent of
:mod:`micrec_tf.search`), and :class:`micrec_tf.retrieval.Retriever` on the same requests; the
fuzzed bodies are tests/test_rest_fuzz.py's, judged by :func:`export.rest.parse_request`.

Root writes through chmod, so the read-only test compares an lstat snapshot of the whole tree
(entries, sizes, mtimes) before and after a server has loaded it, answered and stopped.
"""
from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml
from hypothesis import given

from conftest import ROOT
from export import rest, server

USER_TOWER = rest.specs_from_metadata({"gender": {"shape": [-1]}, "age": {"shape": [-1]},
                                       "region": {"shape": [-1]}, "history": {"shape": [-1, -1]}})
LIMITS = server.Limits(max_bytes=65536, max_instances=8, max_k=50)
NUM_ITEMS, DIM, TOP_K = 40, 4, 5


def _row(**values):
    return {"gender": "F", "age": "25-34", "region": "north", "history": ["i1", "i2"], **values}


# ----------------------------------------------------------------------------- fast: parsing
def test_retrieve_defaults_k_from_the_export_and_excludes_history():
    req = server.parse_retrieve_request(json.dumps({"instances": [_row(), _row(history=[""] * 2)]}),
                                        USER_TOWER, DIM, default_k=7, limits=LIMITS)
    assert req.k == 7 and req.exclude == "history" and req.vectors is None and req.size == 2
    assert req.columns["history"].tolist() == [[b"i1", b"i2"], [b"", b""]]
    assert req.columns["gender"].tolist() == [b"F", b"F"]


def test_retrieve_takes_vectors_k_and_explicit_exclusions():
    req = server.parse_retrieve_request(
        {"user_vectors": [[1, 2.5, 0, -1], [0, 0, 0, 1e-3]], "k": 3, "exclude": [["i3"], None]},
        USER_TOWER, DIM, default_k=7, limits=LIMITS)
    assert req.columns is None and req.k == 3 and req.exclude == [["i3"], None]
    assert req.vectors.dtype == np.float32 and req.vectors.tolist() == \
        [[1.0, 2.5, 0.0, -1.0], [0.0, 0.0, 0.0, np.float32(1e-3)]]
    one = server.parse_retrieve_request({"user_vector": [1, 2, 3, 4]}, USER_TOWER, DIM, 7, LIMITS)
    assert one.vectors.shape == (1, DIM) and one.exclude is None


@pytest.mark.parametrize("body, message", [
    ({"instances": [_row()], "k": 0}, r"\"k\" must be between 1 and 50 .*got 0"),
    ({"instances": [_row()], "k": 51}, r"between 1 and 50 .*got 51"),
    ({"instances": [_row()], "k": True}, r"\"k\" must be an integer, got bool"),
    ({"instances": [_row()], "k": 2.0}, r"\"k\" must be an integer, got number"),
    ({"instances": [_row()], "k": "5"}, r"\"k\" must be an integer, got string"),
    ({"instances": [_row()], "kk": 5}, r"unknown top-level key\(s\) \['kk'\]"),
    ({"k": 5}, r"exactly one of .*got none"),
    ({"instances": [_row()], "user_vector": [1, 2, 3, 4]}, r"exactly one of .*instances, user_vector"),
    ({"user_vector": [1, 2, 3]}, r"\"user_vector\" must be a list of 4 numbers"),
    ({"user_vectors": [[1, 2, 3, 4], [1, 2]]}, r"\"user_vectors\"\[1\] must be a list of 4"),
    ({"user_vectors": []}, r"must be a non-empty list"),
    ({"user_vector": [1, 2, "3", 4]}, r"\"user_vector\"\[2\]: expected a finite number"),
    ({"user_vector": [1, 2, True, 4]}, r"\[2\]: expected a finite number, got true"),
    ({"user_vector": [1, 2, 1e300, 4]}, r"must fit float32"),
    ({"user_vector": [1, 2, 3, 4], "exclude": "history"}, r"\"history\" needs user features"),
    ({"user_vector": [1, 2, 3, 4], "signature_name": "serving_default"}, r"does not run it"),
    ({"instances": [_row()], "exclude": [["i1"], ["i2"]]}, r"a list of 1 lists of item ids"),
    ({"instances": [_row()], "exclude": [[3]]}, r"\"exclude\"\[0\] must be a list of item id"),
    ({"instances": [_row()] * 9}, r"9 instances, over the limit of 8"),
    ({"user_vectors": [[0, 0, 0, 0]] * 9}, r"9 instances, over the limit of 8"),
    ({"instances": [_row(gender=5)]}, r"input 'gender' .*expected a string"),
    ({"instances": [_row()], "signature_name": "other"}, r"signature name \"other\" not found"),
    ('{"instances": [' + "9" * 5000 + "]}", r"integer literal too large"),
    (b'{"instances": [{"gender": "\xff"}]}', r"not valid UTF-8"),
    ('{"k": ' + "[" * 20_000 + "]" * 20_000 + "}", r"too deeply"),
    ({"user_vector": [1, 2, 10 ** 400, 4]}, r"must fit float32"),
    ("[1, 2]", r"must be a JSON object, got list"),
])
def test_malformed_retrieve_requests_are_one_line_request_errors(body, message):
    with pytest.raises(rest.RequestError, match=message) as info:
        server.parse_retrieve_request(body, USER_TOWER, DIM, default_k=5, limits=LIMITS)
    assert "\n" not in str(info.value)


def test_body_over_the_byte_limit_is_too_large_before_parsing():
    # 65537 bytes of UTF-8: 65535 ASCII characters and one 2-byte character, not even JSON.
    text = "x" * 65535 + "é"
    for parse in (lambda b: server.parse_retrieve_request(b, USER_TOWER, DIM, 5, LIMITS),
                  lambda b: server.parse_predict_request(b, USER_TOWER, LIMITS)):
        with pytest.raises(server.TooLarge, match="65537 bytes, over the limit of 65536"):
            parse(text)
        with pytest.raises(rest.RequestError, match="not valid JSON"):
            parse(text[:-2])  # 65534 bytes: parsed, and refused as JSON


def test_predict_parse_is_rest_parse_with_the_instance_cap():
    body = {"inputs": {"gender": ["F", "M"], "age": ["a", "b"], "region": ["r", "s"],
                       "history": [["i1"], [""]]}}
    tensors, fmt = server.parse_predict_request(json.dumps(body), USER_TOWER, LIMITS)
    assert fmt == "columnar" and tensors["history"].tolist() == [[b"i1"], [b""]]
    with pytest.raises(rest.RequestError, match="9 instances, over the limit of 8"):
        server.parse_predict_request({"instances": [_row()] * 9}, USER_TOWER, LIMITS)


@pytest.mark.parametrize("kwargs", [{"max_bytes": 0}, {"max_instances": -1}, {"max_k": True},
                                    {"max_k": 2.5}])
def test_limits_are_validated(kwargs):
    with pytest.raises(ValueError, match=r"must be a positive int\. Received: "):
        server.Limits(**kwargs)


@pytest.mark.parametrize("path, label", [
    ("/v1/models/user_tower:predict", "predict"), ("/v1/models/x/versions/3:retrieve", "retrieve"),
    ("/v1/models/user_tower", "status"), ("/v1/models/user_tower:explode", "other"),
    ("/healthz", "healthz"), ("/readyz", "readyz"), ("/metrics", "metrics"), ("/", "other"),
    ("/v1/models/a/b/c", "other"),
])
def test_endpoint_labels_are_a_bounded_set(path, label):
    assert server.endpoint_of(path) == label


def test_serve_config_defaults_and_validation():
    from micrec_tf.config import ConfigError, from_dict

    e = from_dict({}).export
    assert (e.serve_model_name, e.serve_host, e.serve_port, e.serve_max_request_bytes,
            e.serve_max_k, e.serve_shutdown_timeout_s, e.serve_poll_s) == \
        ("user_tower", "127.0.0.1", 8080, 8 * 1024 * 1024, 2000, 30, 10.0)
    assert server.Limits.from_config(e) == server.Limits(8 * 1024 * 1024, 1024, 2000)
    for key, value, message in [("serve_port", 70000, "export.serve_port must be <= 65535"),
                                ("serve_max_k", 0, "export.serve_max_k must be > 0, got 0"),
                                ("serve_poll_s", 0, "export.serve_poll_s must be > 0"),
                                ("serve_model_name", "a/b", "export.serve_model_name must be")]:
        with pytest.raises(ConfigError, match=message):
            from_dict({"export": {key: value}})


# ----------------------------------------------------------------------------- slow: a real server
def make_export(root: str, version: int, seed: int = 0) -> str:
    """A tiny export version published with one rename: a hand-written user tower SavedModel
    (signature of the synthetic data: gender, age, region [B], history [B, L] -> user_embedding
    float32 [B, 4]: the hashed profile's row of a random table plus the rows of the non-empty
    history ids), ``NUM_ITEMS`` random item vectors ``i0..i39``, brute force, top_k 5."""
    import tensorflow as tf

    rs = np.random.RandomState(seed)
    table = rs.normal(size=(97, DIM)).astype(np.float32)

    class Tower(tf.Module):
        def __init__(self):
            super().__init__()
            self.table = tf.Variable(table)

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="gender"),
                                      tf.TensorSpec([None], tf.string, name="age"),
                                      tf.TensorSpec([None], tf.string, name="region"),
                                      tf.TensorSpec([None, None], tf.string, name="history")])
        def serve(self, gender, age, region, history):
            profile = tf.strings.join([gender, age, region], "|")
            vec = tf.gather(self.table, tf.strings.to_hash_bucket_fast(profile, 97))
            hist = tf.gather(self.table, tf.strings.to_hash_bucket_fast(history, 97))
            mask = tf.cast(history != "", tf.float32)[..., None]
            return {"user_embedding": vec + tf.reduce_sum(hist * mask, axis=1)}

    tmp = os.path.join(root, f".tmp-{version}")
    tower = Tower()
    tf.saved_model.save(tower, os.path.join(tmp, "user_tower"),
                        signatures={"serving_default": tower.serve.get_concrete_function()})
    os.makedirs(os.path.join(tmp, "item_embeddings"))
    np.save(os.path.join(tmp, "item_embeddings", "embeddings.npy"),
            rs.normal(size=(NUM_ITEMS, DIM)).astype(np.float32))
    with open(os.path.join(tmp, "item_embeddings", "ids.txt"), "w", encoding="utf-8") as fh:
        fh.write("".join(f"i{r}\n" for r in range(NUM_ITEMS)))
    with open(os.path.join(tmp, "metadata.json"), "w", encoding="utf-8") as fh:
        json.dump({"top_k": TOP_K, "index": {"kind": "brute_force"}}, fh)
    os.rename(tmp, os.path.join(root, str(version)))
    return os.path.join(root, str(version))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A ``python -m export.server`` process on a free loopback port; stderr in a file."""

    def __init__(self, tmp, export_dir: str, *overrides: str):
        cfg = os.path.join(tmp, "serve.yaml")
        with open(cfg, "w", encoding="utf-8") as fh:
            yaml.safe_dump({"name": "tiny"}, fh)
        self.port = _free_port()
        self.log_path = os.path.join(tmp, f"server-{self.port}.log")
        self.log = open(self.log_path, "w", encoding="utf-8")
        sets = [a for o in overrides for a in ("--set", o)]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "export.server", "--config", cfg, "--export-dir", export_dir,
             "--port", str(self.port), *sets], cwd=ROOT, stdout=self.log, stderr=self.log)

    def stderr(self) -> str:
        with open(self.log_path, encoding="utf-8") as fh:
            return fh.read()

    def wait_ready(self, timeout: float = 240.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.stderr()
            try:
                if self.request("GET", "/readyz")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.3)
        raise AssertionError("server not ready:\n" + self.stderr())

    def request(self, method: str, path: str, body=None, headers=None):
        """``(status, headers dict (lower-case names), body bytes)``."""
        if body is not None and not isinstance(body, (bytes, str)):
            body = json.dumps(body)
        if isinstance(body, str):
            body = body.encode("utf-8", "surrogateescape")
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()

    def json(self, method: str, path: str, body=None):
        status, _, data = self.request(method, path, body)
        return status, json.loads(data)

    def stop(self, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self.log.close()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("server")
    root = os.path.join(str(tmp), "exports", "tiny")
    os.makedirs(root)
    vdir = make_export(root, 100)
    return tmp, root, vdir


@pytest.fixture(scope="module")
def served(exported):
    """One server over version 100 with small limits (65536 bytes, 8 instances, k <= 50)."""
    tmp, root, vdir = exported
    srv = Server(str(tmp), root, "export.serve_max_request_bytes=65536",
                 "export.max_request_instances=8", "export.serve_max_k=50")
    try:
        srv.wait_ready()
        yield srv
    finally:
        code = srv.stop()
    assert code == 0, srv.stderr()


@pytest.fixture(scope="module")
def reference(exported):
    """The version's SavedModel signature and item vectors, loaded in this process."""
    import tensorflow as tf

    _, _, vdir = exported
    loaded = tf.saved_model.load(os.path.join(vdir, "user_tower"))
    fn = loaded.signatures["serving_default"]
    fn._keep = loaded
    vectors = np.load(os.path.join(vdir, "item_embeddings", "embeddings.npy"))
    return fn, vectors


def _tower(fn, rows):
    import tensorflow as tf

    width = max(len(r["history"]) for r in rows)
    feed = {f: tf.constant([r[f] for r in rows]) for f in ("gender", "age", "region")}
    feed["history"] = tf.constant([r["history"] + [""] * (width - len(r["history"]))
                                   for r in rows], tf.string)
    return fn(**feed)["user_embedding"].numpy()


def _brute_force(vectors, items, k, exclude):
    """Top-k item ids and scores of each user vector by numpy, excluded ids dropped first."""
    out_ids, out_scores = [], []
    for q, ex in zip(np.asarray(vectors, np.float32), exclude):
        scores = items @ q
        order = [r for r in np.argsort(-scores, kind="stable") if f"i{r}" not in set(ex)][:k]
        out_ids.append([f"i{r}" for r in order])
        out_scores.append(scores[order])
    return out_ids, out_scores


ROWS = [_row(), _row(gender="M", age="45-54", region="west", history=["i12", "", ""]),
        _row(gender="U", age="55+", region="nowhere", history=[])]


@pytest.mark.slow
def test_status_health_and_readiness(served):
    assert served.json("GET", "/healthz") == (200, {"status": "ok"})
    assert served.json("GET", "/readyz") == (200, {"status": "ready", "version": 100})
    ok = {"model_version_status": [{"version": "100", "state": "AVAILABLE",
                                    "status": {"error_code": "OK", "error_message": ""}}]}
    assert served.json("GET", "/v1/models/user_tower") == (200, ok)
    assert served.json("GET", "/v1/models/user_tower/versions/100") == (200, ok)
    for path in ("/v1/models/other", "/v1/models/user_tower/versions/7", "/v1/nothing"):
        status, body = served.json("GET", path)
        assert status == 404 and body["error"] and "\n" not in body["error"], (path, body)


@pytest.mark.slow
@pytest.mark.parametrize("form", ["row", "columnar"])
def test_predict_is_tf_servings_answer(served, reference, form):
    fn, _ = reference
    padded = [dict(r, history=r["history"] + [""] * (3 - len(r["history"]))) for r in ROWS]
    body = ({"signature_name": "serving_default", "instances": padded} if form == "row" else
            {"inputs": {f: [r[f] for r in padded] for f in ("gender", "age", "region",
                                                          "history")}})
    want = rest.predict(json.dumps(body), fn)
    key = "predictions" if form == "row" else "outputs"
    assert list(want) == [key]
    expected = _tower(fn, ROWS)
    for path in ("/v1/models/user_tower:predict", "/v1/models/user_tower/versions/100:predict"):
        status, got = served.json("POST", path, body)
        assert status == 200 and list(got) == [key], got
        np.testing.assert_allclose(np.asarray(got[key]), np.asarray(want[key]), rtol=0, atol=1e-6)
        np.testing.assert_allclose(np.asarray(got[key]), expected, rtol=0, atol=1e-6)
    status, got = served.json("POST", "/v1/models/user_tower/versions/99:predict", body)
    assert status == 404 and "version 100" in got["error"]


@pytest.mark.slow
def test_retrieve_is_the_brute_force_top_k_and_the_retrievers(served, reference, exported):
    from micrec_tf.retrieval import Retriever

    fn, items = reference
    retriever = Retriever.load(exported[2])
    vectors = _tower(fn, ROWS)
    history = [[h for h in r["history"] if h] for r in ROWS]
    padded = [dict(r, history=r["history"] + [""] * (3 - len(r["history"]))) for r in ROWS]
    columns = {f: [r[f] for r in ROWS[1:2]] for f in ("gender", "age", "region", "history")}
    cases = [  # (body, user vectors, exclusions per user, k)
        ({"instances": ROWS[:1]}, vectors[:1], history[:1], TOP_K),
        ({"inputs": columns, "k": 12}, vectors[1:2], history[1:2], 12),
        ({"instances": padded, "k": 7, "exclude": None}, vectors, [[]] * 3, 7),
        ({"instances": ROWS[:1], "k": 3, "exclude": [["i5", "nope"]]}, vectors[:1], [["i5"]], 3),
        ({"user_vectors": vectors.tolist(), "k": 40}, vectors, [[]] * 3, 40),
        ({"user_vector": vectors[2].tolist(), "exclude": [["i0", "i1"]]}, vectors[2:],
         [["i0", "i1"]], TOP_K),
    ]
    for body, q, exclude, k in cases:
        status, got = served.json("POST", "/v1/models/user_tower:retrieve", body)
        assert status == 200 and got["model_version"] == "100", got
        want_ids, want_scores = _brute_force(q, items, k, exclude)
        assert got["ids"] == want_ids, (body, got["ids"], want_ids)
        assert len(got["scores"]) == len(want_scores)
        for g, w in zip(got["scores"], want_scores):
            np.testing.assert_allclose(g, w, rtol=0, atol=1e-5)
    # The in-process Retriever on a features request: the same ids.
    status, got = served.json("POST", "/v1/models/user_tower:retrieve",
                              {"instances": padded, "k": 9})
    ids, _ = retriever.retrieve(ROWS, k=9, exclude="history")
    assert status == 200 and got["ids"] == [list(row) for row in ids]


BAD = [  # (method, path, body, status, what the error says)
    ("POST", "/v1/models/user_tower:retrieve", {"instances": [_row()], "k": 0}, 400, "\"k\""),
    ("POST", "/v1/models/user_tower:retrieve", {"instances": [_row()], "k": 51}, 400, "50"),
    ("POST", "/v1/models/user_tower:retrieve", {"user_vector": [1, 2]}, 400, "4 numbers"),
    ("POST", "/v1/models/user_tower:predict", {"instances": [_row()] * 9}, 400, "limit of 8"),
    ("POST", "/v1/models/user_tower:predict", {"instances": [_row(gender=3)]}, 400, "'gender'"),
    ("POST", "/v1/models/user_tower:predict", b'{"instances": [\xff]}', 400, "UTF-8"),
    ("POST", "/v1/models/user_tower:predict", "[" * 30_000 + "]" * 30_000, 400, "too deeply"),
    ("POST", "/v1/models/user_tower:predict", '{"instances": ' + "7" * 5000 + "}", 400,
     "too large"),
    ("POST", "/v1/models/user_tower:predict", "x" * 70_000, 413, "over the limit of 65536"),
    ("POST", "/v1/models/user_tower:retrieve", "x" * 70_000, 413, "over the limit of 65536"),
    ("POST", "/v1/models/user_tower:predict", "", 400, "not valid JSON"),
    ("POST", "/v1/models/nobody:predict", {"instances": [_row()]}, 404, "nobody"),
    ("POST", "/v1/models/user_tower:classify", {"instances": [_row()]}, 404, ":classify"),
    ("POST", "/v1/models/user_tower", {"instances": [_row()]}, 404, "needs a verb"),
    ("GET", "/v1/models/user_tower:predict", None, 404, "no verb"),
    ("POST", "/v1/models/user_tower/versions/abc:predict", {"instances": [_row()]}, 404,
     "'abc'"),
]


@pytest.mark.slow
@pytest.mark.parametrize("method, path, body, code, what", BAD)
def test_bad_requests_are_4xx_with_one_line(served, method, path, body, code, what):
    status, _, data = served.request(method, path, body)
    error = json.loads(data)["error"]
    assert status == code and what in error and "\n" not in error, (status, error)


@pytest.mark.slow
def test_wrong_method_is_405(served):
    for method, path in (("PUT", "/v1/models/user_tower:predict"), ("POST", "/healthz")):
        status, headers, data = served.request(method, path, b"{}")
        assert status == 405 and "Method Not Allowed" in json.loads(data)["error"]
        assert "GET" in headers["allow"]


@pytest.mark.slow
def test_fuzzed_bodies_get_what_the_rest_parser_says_never_5xx(served):
    """tests/test_rest_fuzz.py's malformed bodies, sent to :predict and :retrieve: 200 exactly
    when :func:`export.rest.parse_request` accepts the body under the same limits (413 when the
    body is over the byte limit), 400 with a message otherwise."""
    from test_rest_fuzz import _fuzz, malformed

    @_fuzz(120)
    @given(malformed())
    def check(case):
        _, body = case
        raw = (body if isinstance(body, bytes) else
               body.encode("utf-8", "surrogateescape") if isinstance(body, str) else
               json.dumps(body).encode("utf-8"))
        try:
            rest.parse_request(raw, USER_TOWER, max_instances=8, max_bytes=65536)
            want = 200
        except rest.RequestError:
            want = 413 if len(raw) > 65536 else 400
        for verb in ("predict", "retrieve"):
            status, _, data = served.request("POST", f"/v1/models/user_tower:{verb}", raw)
            assert status < 500, (verb, raw[:300], data[:300])
            if verb == "predict":
                assert status == want, (raw[:300], data[:300])
            elif want != 200:
                assert status in (400, 413), (raw[:300], data[:300])
            if status != 200:
                assert json.loads(data)["error"], data

    check()


def _samples(text: str) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


@pytest.mark.slow
def test_metrics_are_prometheus_text_and_count_the_requests(served):
    def scrape():
        status, headers, data = served.request("GET", "/metrics")
        assert status == 200 and headers["content-type"].startswith("text/plain")
        return _samples(data.decode("utf-8"))

    def count(samples, endpoint, code):
        return samples.get(("micrec_requests_total", (("code", code), ("endpoint", endpoint))), 0)

    before = scrape()
    for _ in range(3):
        assert served.request("POST", "/v1/models/user_tower:predict",
                              {"instances": [_row()] * 2})[0] == 200
    assert served.request("POST", "/v1/models/user_tower:retrieve", {"user_vector": [1]})[0] == 400
    assert served.request("GET", "/v1/models/zzz")[0] == 404
    after = scrape()
    assert count(after, "predict", "200") - count(before, "predict", "200") == 3
    assert count(after, "retrieve", "400") - count(before, "retrieve", "400") == 1
    assert count(after, "status", "404") - count(before, "status", "404") == 1
    assert count(after, "metrics", "200") - count(before, "metrics", "200") == 1  # the 1st scrape
    lat = ("micrec_request_latency_seconds_count", (("endpoint", "predict"),))
    assert after[lat] - before.get(lat, 0) == 3
    batch = ("micrec_batch_size_bucket", (("le", "2.0"),))
    assert after[batch] - before.get(batch, 0) == 3  # three tower calls of 2 users
    assert after[("micrec_serving_version", ())] == 100
    assert after[("micrec_ready", ())] == 1


def _send_partial(port: int, body: bytes, first: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=60)
    s.sendall(b"POST /v1/models/user_tower:predict HTTP/1.1\r\nHost: t\r\nContent-Type: "
              b"application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body[:first])
    return s


def _read_response(s: socket.socket) -> tuple[int, bytes]:
    data = b""
    while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < int(
            [h for h in data.split(b"\r\n") if h.lower().startswith(b"content-length")][0]
            .split(b":")[1]):
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    head, payload = data.split(b"\r\n\r\n", 1)
    return int(head.split(b" ")[1]), payload


@pytest.mark.slow
def test_sigterm_finishes_the_request_in_flight_and_exits_0(exported, reference, tmp_path):
    _, root, _ = exported
    fn, _ = reference
    srv = Server(str(tmp_path), root)
    try:
        srv.wait_ready()
        body = json.dumps({"instances": [_row()]}).encode("utf-8")
        s = _send_partial(srv.port, body, 10)  # the request has started: headers + 10 bytes
        time.sleep(0.5)
        srv.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # stops accepting new connections
            try:
                socket.create_connection(("127.0.0.1", srv.port), timeout=1).close()
                time.sleep(0.1)
            except OSError:
                break
        else:
            raise AssertionError("still accepting connections after SIGTERM")
        assert srv.proc.poll() is None  # ... but waits for the request in flight
        s.sendall(body[10:])
        status, payload = _read_response(s)
        s.close()
        assert status == 200, payload
        np.testing.assert_allclose(json.loads(payload)["predictions"], _tower(fn, [_row()]),
                                   rtol=0, atol=1e-6)
        assert srv.proc.wait(60) == 0, srv.stderr()
        assert "[server] stopped" in srv.stderr()
    finally:
        srv.stop()


def _snapshot(root: str) -> dict:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            out[os.path.relpath(p, root)] = (st.st_size, st.st_mtime_ns, stat.S_IMODE(st.st_mode))
    st = os.lstat(root)
    out["."] = (st.st_mtime_ns,)
    return out


@pytest.mark.slow
def test_a_read_only_export_tree_is_served_and_left_untouched(exported, tmp_path):
    _, root, _ = exported
    ro = str(tmp_path / "ro" / "tiny")
    shutil.copytree(root, ro)
    os.makedirs(os.path.join(ro, "serving", "100"))  # a complete serving view (no repair due)
    for dirpath, dirnames, filenames in os.walk(ro, topdown=False):
        for name in filenames:
            os.chmod(os.path.join(dirpath, name), 0o444)
        os.chmod(dirpath, 0o555)
    before = _snapshot(ro)
    srv = Server(str(tmp_path), ro)
    try:
        srv.wait_ready()
        assert srv.request("POST", "/v1/models/user_tower:predict",
                           {"instances": [_row()]})[0] == 200
        assert srv.request("POST", "/v1/models/user_tower:retrieve",
                           {"instances": [_row()]})[0] == 200
        assert srv.stop() == 0, srv.stderr()
        after = _snapshot(ro)
    finally:
        srv.stop()
        for dirpath, _, _ in os.walk(ro):
            os.chmod(dirpath, 0o755)
    assert after == before, {k: (before.get(k), after.get(k)) for k in set(before) | set(after)
                             if before.get(k) != after.get(k)}


@pytest.mark.slow
def test_a_new_version_is_swapped_in_and_answers_carry_it(exported, reference, tmp_path):
    """A version published while the server runs: after the swap every answer names 200 and is
    computed by version 200 (its own item vectors), before it by 100."""
    _, root, _ = exported
    swap_root = str(tmp_path / "swap" / "tiny")
    shutil.copytree(root, swap_root)
    srv = Server(str(tmp_path), swap_root, "export.serve_poll_s=0.2")
    try:
        srv.wait_ready()
        vec = [[0.5, -1.0, 2.0, 0.25]]
        status, first = srv.json("POST", "/v1/models/user_tower:retrieve",
                                 {"user_vectors": vec, "k": 6})
        assert status == 200 and first["model_version"] == "100"
        vdir = make_export(swap_root, 200, seed=7)
        items = np.load(os.path.join(vdir, "item_embeddings", "embeddings.npy"))
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            status, got = srv.json("POST", "/v1/models/user_tower:retrieve",
                                   {"user_vectors": vec, "k": 6})
            assert status == 200, got
            if got["model_version"] == "200":
                break
            assert got == first
            time.sleep(0.1)
        else:
            raise AssertionError("version 200 never answered:\n" + srv.stderr())
        assert got["ids"] == _brute_force(vec, items, 6, [[]])[0]
        assert srv.json("GET", "/v1/models/user_tower")[1]["model_version_status"][0][
            "version"] == "200"
    finally:
        assert srv.stop() == 0, srv.stderr()


@pytest.mark.slow
def test_no_version_is_one_error_line_and_exit_2(tmp_path):
    empty = tmp_path / "exports" / "tiny"
    empty.mkdir(parents=True)
    srv = Server(str(tmp_path), str(empty))
    code = srv.proc.wait(240)
    lines = [ln for ln in srv.stderr().splitlines() if ln.startswith("error:")]
    srv.stop()
    assert code == 2 and len(lines) == 1 and "no complete export version" in lines[0], \
        srv.stderr()
    assert "Traceback" not in srv.stderr()


@pytest.mark.slow
@pytest.mark.parametrize("override, message", [
    ("export.serve_port=70000", "export.serve_port must be <= 65535"),
    ("export.serve_max_k=0", "export.serve_max_k must be > 0"),
])
def test_a_bad_serve_key_is_one_error_line_and_exit_2(tmp_path, override, message):
    srv = Server(str(tmp_path), str(tmp_path), override)
    code = srv.proc.wait(240)
    text = srv.stderr()
    srv.stop()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") \
        and message in lines[0], text


# ----------------------------------------------------------------------------- micro-batching
def test_concat_pads_histories_and_runs_group_consecutive_equal_keys():
    a = {"gender": np.array([b"F"], object), "history": np.array([[b"i1", b"i2"]], object)}
    b = {"gender": np.array([b"M", b"U"], object),
         "history": np.empty((2, 0), object)}
    got = server._concat([a, b])
    assert got["gender"].tolist() == [b"F", b"M", b"U"]
    assert got["history"].tolist() == [[b"i1", b"i2"], [b"", b""], [b"", b""]]
    assert server._runs([1, 1, 2, 1, 1], key=lambda x: x) == [(1, [1, 1]), (2, [2]),
                                                              (1, [1, 1])]


def test_batching_settings_come_from_the_config():
    from micrec_tf.config import from_dict

    assert server.Batching.from_config(from_dict({}).export) == server.Batching(256, 2.0, 512)
    assert server.Batching.from_config(
        from_dict({"export": {"serve_max_batch_size": 0}}).export) is None


@pytest.mark.slow
def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(exported, reference,
                                                                      tmp_path):
    """24 clients at once, each with its own user (and k): a 300 ms batching window gathers them;
    every answer is the brute-force answer of its own request, and the tower saw every user
    exactly once."""
    from concurrent.futures import ThreadPoolExecutor

    _, root, _ = exported
    fn, items = reference
    srv = Server(str(tmp_path), root, "export.serve_max_wait_ms=300")
    try:
        srv.wait_ready()
        rows = [_row(gender=f"g{i}", history=[f"i{i % 7}"] * (i % 4)) for i in range(24)]
        vectors = _tower(fn, rows)

        def one(i):
            if i % 2:
                return srv.json("POST", "/v1/models/user_tower:predict", {"instances": [rows[i]]})
            return srv.json("POST", "/v1/models/user_tower:retrieve",
                            {"instances": [rows[i]], "k": 3 + i % 3})

        before = _samples(srv.request("GET", "/metrics")[2].decode())
        with ThreadPoolExecutor(24) as pool:
            answers = list(pool.map(one, range(24)))
        after = _samples(srv.request("GET", "/metrics")[2].decode())
        for i, (status, got) in enumerate(answers):
            assert status == 200, got
            if i % 2:
                np.testing.assert_allclose(got["predictions"], vectors[i:i + 1], rtol=0,
                                           atol=1e-5)
            else:
                want, _ = _brute_force(vectors[i:i + 1], items, 3 + i % 3,
                                       [[h for h in rows[i]["history"] if h]])
                assert got["ids"] == want, (i, got, want)
        key = ("micrec_stage_batch_size_sum", (("stage", "user_tower"),))
        assert after[key] - before[key] == 24
        calls = ("micrec_stage_batch_size_count", (("stage", "user_tower"),))
        assert after[calls] - before[calls] <= 24
    finally:
        assert srv.stop() == 0, srv.stderr()


@pytest.mark.slow
def test_a_full_queue_answers_503_with_retry_after(exported, tmp_path):
    """max_queue 2 and a 5 s batching window: with two requests waiting (seen on /metrics), a
    third is refused at once with 503 + Retry-After, and the two waiting ones still get 200."""
    from concurrent.futures import ThreadPoolExecutor

    _, root, _ = exported
    srv = Server(str(tmp_path), root, "export.serve_max_wait_ms=5000", "export.serve_max_queue=2")
    depth = ("micrec_queue_depth", (("stage", "user_tower"),))
    try:
        srv.wait_ready()
        body = {"instances": [_row()]}
        with ThreadPoolExecutor(2) as pool:
            waiting = [pool.submit(srv.request, "POST", "/v1/models/user_tower:predict", body)
                       for _ in range(2)]
            deadline = time.monotonic() + 60
            while _samples(srv.request("GET", "/metrics")[2].decode()).get(depth) != 2:
                assert time.monotonic() < deadline and not any(w.done() for w in waiting)
                time.sleep(0.05)
            status, headers, data = srv.request("POST", "/v1/models/user_tower:predict", body)
            assert status == 503 and int(headers["retry-after"]) >= 1, (status, headers, data)
            assert "max_queue=2" in json.loads(data)["error"]
            assert [w.result()[0] for w in waiting] == [200, 200]
        metrics = _samples(srv.request("GET", "/metrics")[2].decode())
        assert metrics[("micrec_rejected_total", (("stage", "user_tower"),))] == 1
        assert metrics[("micrec_requests_total", (("code", "503"), ("endpoint", "predict")))] == 1
    finally:
        assert srv.stop() == 0, srv.stderr()


# ----------------------------------------------------------------------------- a trained export
@pytest.fixture(scope="module")
def trained_export(tiny_pipeline, tmp_path_factory):
    """The tiny synthetic model trained one epoch and exported with a ScaNN index (300 items,
    top_k 10): the real signature (vocabulary lookups, history truncation), warm-up file and
    serving/ view."""
    from conftest import tiny_config
    from export import export_model
    from micrec_tf.train import train

    _, tmp = tiny_pipeline
    root = tmp_path_factory.mktemp("server_trained")
    cfg = tiny_config(tmp, train={"epochs": 1, "runs_dir": str(root / "runs")},
                      export={"exports_dir": str(root / "exports"), "index": "scann",
                              "top_k": 10})
    train(cfg, evaluate_test=False, log=lambda *a: None)
    vdir = export_model.export_run(cfg, log=lambda *a: None)
    return cfg, str(root), vdir


@pytest.mark.slow
def test_a_trained_scann_export_answers_as_rest_predict_and_the_retriever(trained_export):
    import tensorflow as tf

    from micrec_tf.retrieval import Retriever

    cfg, tmp, vdir = trained_export
    retriever = Retriever.load(vdir)
    assert retriever.index_kind == "scann"
    users = retriever.test_users(cfg.artifacts_dir, num_users=5)
    requests = [u["request"] for u in users]
    fn = tf.saved_model.load(os.path.join(vdir, "user_tower")).signatures["serving_default"]
    width = max(len(r["history"]) for r in requests)
    padded = [dict(r, history=r["history"] + [""] * (width - len(r["history"])))
              for r in requests]
    srv = Server(tmp, cfg.export_dir)
    try:
        srv.wait_ready()
        version = os.path.basename(vdir)
        status, got = srv.json("POST", "/v1/models/user_tower:predict", {"instances": padded})
        want = rest.predict(json.dumps({"instances": padded}), fn)
        assert status == 200 and list(got) == ["predictions"]
        np.testing.assert_allclose(got["predictions"], want["predictions"], rtol=0, atol=1e-5)
        for request, user in zip(requests, users):  # one at a time: each search alone
            status, got = srv.json("POST", "/v1/models/user_tower:retrieve",
                                   {"instances": [request], "k": 10,
                                    "exclude": [user["clicked"]]})
            ids, scores = retriever.retrieve([request], k=10, exclude=[user["clicked"]])
            assert status == 200 and got["model_version"] == version
            assert got["ids"] == [[i for i in ids[0] if i]], (got["ids"], ids)
            np.testing.assert_allclose(got["scores"][0], scores[0][:len(got["scores"][0])],
                                       rtol=0, atol=1e-5)
        status, body = srv.json("GET", "/v1/models/user_tower")
        assert body["model_version_status"][0]["version"] == version
    finally:
        assert srv.stop() == 0, srv.stderr()


@pytest.mark.slow
def test_sigkill_and_restart_serve_the_same_version(exported, tmp_path):
    _, root, _ = exported
    kill_root = str(tmp_path / "kill" / "tiny")
    shutil.copytree(root, kill_root)
    make_export(kill_root, 50, seed=3)  # an older version beside 100
    body = {"user_vector": [0.5, -1.0, 2.0, 0.25], "k": 6}
    answers = []
    for _ in range(2):
        srv = Server(str(tmp_path), kill_root)
        try:
            srv.wait_ready()
            status, got = srv.json("POST", "/v1/models/user_tower:retrieve", body)
            assert status == 200, got
            answers.append(got)
            srv.proc.send_signal(signal.SIGKILL)
            assert srv.proc.wait(60) == -signal.SIGKILL
        finally:
            srv.stop()
    assert answers[0]["model_version"] == "100" and answers[1] == answers[0]

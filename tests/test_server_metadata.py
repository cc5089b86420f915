"""``GET /v1/models/<name>[/versions/<v>]/metadata``: TF Serving's GetModelMetadata JSON of the
user tower, and refused versions listed with string version numbers in the status answer.

The expected signature is written out by hand from the tiny export's tower
(tests/test_server.py ``make_export``: gender, age, region DT_STRING [-1], history DT_STRING
[-1, -1] -> user_embedding DT_FLOAT [-1, 4]), in TF Serving's proto-JSON shape (sizes as strings).
"""
import os
import shutil

import pytest

from export import server
from test_server import DIM, Server, make_export


@pytest.mark.parametrize("path, label", [
    ("/v1/models/user_tower/metadata", "metadata"),
    ("/v1/models/user_tower/versions/3/metadata", "metadata"),
    ("/v1/models/user_tower:predict/metadata", "other"),
    ("/v1/models/user_tower", "status"),
])
def test_metadata_endpoint_label(path, label):
    assert server.endpoint_of(path) == label


def _dims(*sizes):
    return {"dim": [{"size": str(s), "name": ""} for s in sizes], "unknown_rank": False}


@pytest.fixture(scope="module")
def two_versions(tmp_path_factory):
    """Version 100 (good) and 101 (its item vectors replaced by bytes that are no .npy file)."""
    tmp = tmp_path_factory.mktemp("server_metadata")
    root = os.path.join(str(tmp), "exports", "tiny")
    os.makedirs(root)
    good = make_export(root, 100)
    shutil.copytree(good, os.path.join(root, ".tmp-101"))
    with open(os.path.join(root, ".tmp-101", "item_embeddings", "embeddings.npy"), "wb") as fh:
        fh.write(b"not a numpy file")
    os.rename(os.path.join(root, ".tmp-101"), os.path.join(root, "101"))
    srv = Server(str(tmp), root)
    try:
        srv.wait_ready()
        yield srv
    finally:
        code = srv.stop()
    assert code == 0, srv.stderr()


@pytest.mark.slow
def test_metadata_is_tf_servings_signature_def(two_versions):
    for path in ("/v1/models/user_tower/metadata", "/v1/models/user_tower/versions/100/metadata"):
        status, body = two_versions.json("GET", path)
        assert status == 200, body
        assert body["model_spec"] == {"name": "user_tower", "signature_name": "",
                                      "version": "100"}
        sigs = body["metadata"]["signature_def"]["signature_def"]
        sig = sigs["serving_default"]
        assert sig["method_name"] == "tensorflow/serving/predict"
        got_in = {n: (t["dtype"], t["tensor_shape"]) for n, t in sig["inputs"].items()}
        assert got_in == {"gender": ("DT_STRING", _dims(-1)), "age": ("DT_STRING", _dims(-1)),
                          "region": ("DT_STRING", _dims(-1)),
                          "history": ("DT_STRING", _dims(-1, -1))}
        got_out = {n: (t["dtype"], t["tensor_shape"]) for n, t in sig["outputs"].items()}
        assert got_out == {"user_embedding": ("DT_FLOAT", _dims(-1, DIM))}
        for t in list(sig["inputs"].values()) + list(sig["outputs"].values()):
            assert isinstance(t["name"], str) and t["name"].endswith(":0"), t
    for path, code in (("/v1/models/user_tower/versions/7/metadata", 404),
                       ("/v1/models/other/metadata", 404),
                       ("/v1/models/user_tower:predict/metadata", 404)):
        status, body = two_versions.json("GET", path)
        assert status == code and body["error"] and "\n" not in body["error"], (path, body)
    status, _, _ = two_versions.request("POST", "/v1/models/user_tower/metadata", b"{}")
    assert status in (404, 405)


@pytest.mark.slow
def test_a_refused_version_is_listed_with_a_string_version(two_versions):
    status, body = two_versions.json("GET", "/v1/models/user_tower")
    assert status == 200
    entries = body["model_version_status"]
    assert [(e["version"], e["state"]) for e in entries] == [("100", "AVAILABLE"), ("101", "END")]
    assert entries[1]["status"]["error_code"] == "UNKNOWN"
    assert entries[1]["status"]["error_message"]
    status, body = two_versions.json("GET", "/v1/models/user_tower/versions/101")
    assert status == 200 and [e["version"] for e in body["model_version_status"]] == ["101"]

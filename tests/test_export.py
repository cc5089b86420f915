"""Export and serving: user-tower SavedModel, REST/gRPC formats, item dump, ScaNN index,
atomic versions, retrieval.

One module-scoped pipeline run on a tiny synthetic config in a tmp dir: preprocessing job
(subprocess), one training epoch (in-process, so the trained model itself is the reference), then
``export.export_model.export_run`` on the checkpoint. Takes about a minute on 2 CPU cores.
"""
import json
import os
import re
import subprocess
import sys
import types

import numpy as np
import pytest
import yaml

import micrec_tf  # noqa: F401  (before tensorflow)
import tensorflow as tf

from export import export_model, item_index, rest, serving
from export.requests import raw_requests
from micrec_tf import search
from micrec_tf.config import load_config
from micrec_tf.retrieval import Retriever

from conftest import tiny_export_raw

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
H = 20
DOCS = os.path.join(ROOT, "docs", "SERVING.md")


def _run(cmd, timeout, **kw):
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, **kw)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from micrec_tf.data.artifacts import load_artifacts
    from micrec_tf.train import train

    root = tmp_path_factory.mktemp("export_env")
    raw = tiny_export_raw(root)
    cfg_path = root / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    _run([sys.executable, "-m", "pipelines.preprocess", "--config", str(cfg_path)], 300)
    cfg = load_config(str(cfg_path))
    result = train(cfg, evaluate_test=False, log=lambda *a: None)
    version_dir = export_model.export_run(cfg, log=lambda *a: None)
    art = load_artifacts(cfg.artifacts_dir)
    return types.SimpleNamespace(root=root, cfg=cfg, cfg_path=str(cfg_path), model=result["model"],
                                 art=art, version_dir=version_dir,
                                 export_root=cfg.export_dir)


@pytest.fixture(scope="module")
def signature(env):
    loaded = tf.saved_model.load(os.path.join(env.version_dir, "user_tower"))
    fn = loaded.signatures["serving_default"]
    fn._keep = loaded
    return fn


# ----------------------------------------------------------------------------- references
def ref_features(rows, art):
    """Independent reference of the in-graph string -> index mapping (docs/SERVING.md)."""
    item_index_of = {v: i + 1 for i, v in enumerate(art.vocabs["item_id"])}
    feats = {}
    for f in art.user_fields:
        voc = {v: i + 1 for i, v in enumerate(art.vocabs[f"user_{f}"])}
        feats[f"user_{f}"] = np.array([voc.get(r[f], 0) for r in rows], np.int64)
    hist = np.zeros((len(rows), H), np.int64)
    lens = np.zeros(len(rows), np.int64)
    for i, r in enumerate(rows):
        ids = [x for x in r["history"] if x != ""][-H:]
        hist[i, :len(ids)] = [item_index_of.get(x, 0) for x in ids]
        lens[i] = len(ids)
    feats["hist_items"], feats["hist_len"] = hist, lens
    return feats


def D(env):
    """The user/item vector size."""
    return env.cfg.model.output_dim


def model_vectors(env, rows):
    return np.asarray(env.model.user_embeddings(ref_features(rows, env.art)), np.float32)


def sample_rows(env, n=12):
    """Real test-split users as raw requests, plus edge cases (unknown ids, long/empty history)."""
    from micrec_tf.evaluation.data import load_split_arrays

    feats = ["hist_items", "hist_len"] + [f"user_{f}" for f in env.art.user_fields]
    arrays = load_split_arrays(env.art.path, "test", feats)
    rows_idx = list(range(min(n, len(arrays["hist_len"]))))
    rows = raw_requests(arrays, rows_idx, env.art.vocabs, env.art.user_fields)
    # The raw requests map back to exactly the examples' integer features.
    back = ref_features(rows, env.art)
    for k, v in back.items():
        np.testing.assert_array_equal(v, np.asarray(arrays[k])[rows_idx], err_msg=k)
    fields = env.art.user_fields
    items = env.art.vocabs["item_id"]
    extra = [
        {**{f: "never-seen-value" for f in fields}, "history": ["no-such-item", items[0]]},
        {**{f: env.art.vocabs[f"user_{f}"][0] for f in fields}, "history": []},
        {**{f: env.art.vocabs[f"user_{f}"][-1] for f in fields},
         "history": ["old-unknown"] * 5 + items[:H]},  # 25 clicks: only the last 20 count
        {**{f: "" for f in fields}, "history": [items[3], "", items[4]]},  # "" is padding
    ]
    return rows + extra


def columns(rows, fields):
    return serving.columnar(rows, fields)


# ----------------------------------------------------------------------------- layout
def test_version_layout_metadata_and_serving_view(env):
    root = env.export_root
    name = os.path.basename(env.version_dir)
    assert name.isdigit() and abs(int(name) - __import__("time").time()) < 3600
    assert serving.published_versions(root) == [int(name)]
    assert not [d for d in os.listdir(root) if d.startswith(".")]
    for rel in ("user_tower/saved_model.pb", "user_tower/variables/variables.index",
                "user_tower/assets.extra/tf_serving_warmup_requests",
                "item_embeddings/embeddings.npy", "item_embeddings/ids.txt",
                "item_embeddings/vocab.txt", "scann/scann_assets.pbtxt", "scann/params.json",
                "metadata.json"):
        assert os.path.exists(os.path.join(env.version_dir, rel)), rel
    meta = json.load(open(os.path.join(env.version_dir, "metadata.json")))
    assert meta["version"] == int(name)
    assert meta["config"]["name"] == "tiny"
    assert meta["vocab_sizes"]["item_id"] == len(env.art.vocabs["item_id"]) + 1
    assert meta["training_metrics"]["valid"]["hit@50"] >= 0
    assert meta["code_version"]["micrec_tf"] == micrec_tf.__version__
    assert re.fullmatch(r"[0-9a-f]{40}", meta["code_version"]["git_commit"] or "0" * 40)
    assert meta["index"]["kind"] == "scann" and meta["index"]["mode"] == "tree_ah"
    assert meta["index"]["measured_recall"] >= 0.95 and meta["index"]["recall_queries"] > 0
    assert meta["user_tower"]["self_check_max_abs_diff"] <= 1e-5
    assert set(meta["user_tower"]["inputs"]) == set(env.art.user_fields) | {"history"}
    # TF Serving's base path: serving/<version>/saved_model.pb, the same files (hard links).
    served = os.path.join(root, "serving", name)
    for rel in ("saved_model.pb", "variables/variables.index",
                "assets.extra/tf_serving_warmup_requests"):
        a, b = os.path.join(served, rel), os.path.join(env.version_dir, "user_tower", rel)
        assert open(a, "rb").read() == open(b, "rb").read()
        assert os.stat(a).st_ino == os.stat(b).st_ino or os.stat(a).st_nlink == 1


# ----------------------------------------------------------------------------- user tower
_FRESH = r"""
import json, sys
import numpy as np
import tensorflow as tf
model_dir, req_path, out_path = sys.argv[1:4]
req = json.load(open(req_path))
fn = tf.saved_model.load(model_dir).signatures["serving_default"]
out = fn(**{k: tf.constant(v, tf.string) for k, v in req.items()})
np.save(out_path, out["user_embedding"].numpy())
print(json.dumps({"foreign": [m for m in ("scann", "tensorflow_text", "tf_keras", "micrec_tf",
                                          "export") if m in sys.modules],
                  "keys": sorted(out)}))
"""


def test_fresh_tensorflow_process_matches_trained_model(env, tmp_path):
    rows = sample_rows(env)
    req = tmp_path / "req.json"
    req.write_text(json.dumps(columns(rows, env.art.user_fields)))
    script = tmp_path / "fresh.py"
    script.write_text(_FRESH)
    env_vars = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    proc = _run([sys.executable, str(script), os.path.join(env.version_dir, "user_tower"),
                 str(req), str(tmp_path / "out.npy")], 180, env=env_vars)
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report == {"foreign": [], "keys": ["user_embedding"]}
    got = np.load(tmp_path / "out.npy")
    want = model_vectors(env, rows)
    assert got.shape == (len(rows), D(env)) and got.dtype == np.float32
    diff = float(np.max(np.abs(got - want)))
    assert diff <= 1e-5, diff
    # Long history: only the 20 most recent clicks count (the 5 older ones change nothing).
    long_row = rows[-2]
    short = {**long_row, "history": long_row["history"][5:]}
    np.testing.assert_allclose(got[-2], model_vectors(env, [short])[0], atol=1e-5)


def test_saved_model_cli_lists_the_documented_signature(env):
    cli = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
    out = _run([cli, "show", "--dir", os.path.join(env.version_dir, "user_tower"), "--all"],
               180).stdout
    sig = out[out.index("signature_def['serving_default']"):]
    sig = sig[:sig.index("Method name is")] + sig[sig.index("Method name is"):].splitlines()[0]
    for f in env.art.user_fields:
        assert re.search(rf"inputs\['{f}'\] tensor_info:\s+dtype: DT_STRING\s+"
                         r"shape: \(-1\)", sig), f
    assert re.search(r"inputs\['history'\] tensor_info:\s+dtype: DT_STRING\s+"
                     r"shape: \(-1, -1\)", sig)
    assert re.search(r"outputs\['user_embedding'\] tensor_info:\s+dtype: DT_FLOAT\s+"
                     rf"shape: \(-1, {D(env)}\)", sig)
    assert sig.count("inputs['") == len(env.art.user_fields) + 1
    assert sig.count("outputs['") == 1
    assert "Method name is: tensorflow/serving/predict" in sig
    # The docs show this very signature for the synthetic data's fields.
    docs = open(DOCS).read()
    for f in env.art.user_fields + ["history"]:
        assert f"inputs['{f}']" in docs


def _doc_block(tag, lang="json"):
    docs = open(DOCS).read()
    m = re.search(rf"<!-- serving-example: {tag} -->\s*```{lang}\n(.*?)```", docs, re.S)
    assert m, f"docs/SERVING.md lacks the {tag} example"
    return m.group(1)


def test_documented_rest_bodies_give_the_model_vectors(env, signature):
    row_body = json.loads(_doc_block("rest-row"))
    col_body = json.loads(_doc_block("rest-columnar"))
    rows = row_body["instances"]
    want = model_vectors(env, rows)
    row_resp = rest.predict(json.dumps(row_body), signature)
    col_resp = rest.predict(col_body, signature)
    assert set(row_resp) == {"predictions"} and set(col_resp) == {"outputs"}
    got_row = np.asarray(row_resp["predictions"], np.float32)
    got_col = np.asarray(col_resp["outputs"], np.float32)
    assert got_row.shape == (len(rows), D(env))
    assert np.max(np.abs(got_row - want)) <= 1e-5
    np.testing.assert_array_equal(got_row, got_col)
    # Both bodies convert to the same tensors; the columnar one equals the documented rows.
    specs = rest.specs_from_signature(signature)
    t_row, fmt_row = rest.parse_request(row_body, specs)
    t_col, fmt_col = rest.parse_request(col_body, specs)
    assert (fmt_row, fmt_col) == ("row", "columnar")
    for k in specs:
        np.testing.assert_array_equal(t_row[k], t_col[k])
    # Real users through REST, both formats.
    real = sample_rows(env, 6)
    cols = columns(real, env.art.user_fields)
    body = {"instances": [{k: cols[k][i] for k in cols} for i in range(len(real))]}
    got = np.asarray(rest.predict(body, signature)["predictions"], np.float32)
    assert np.max(np.abs(got - model_vectors(env, real))) <= 1e-5
    # b64-encoded strings are strings too.
    import base64
    b64 = {"inputs": {**{k: [{"b64": base64.b64encode(v.encode()).decode()} for v in cols[k]]
                         for k in env.art.user_fields}, "history": cols["history"]}}
    np.testing.assert_array_equal(np.asarray(rest.predict(b64, signature)["outputs"], np.float32),
                                  got)


def test_unknown_ids_and_empty_histories_give_vectors(env, signature):
    fields = env.art.user_fields
    rows = [{**{f: "zzz-unknown" for f in fields}, "history": ["nope-1", "nope-2"]},
            {**{f: "zzz-unknown" for f in fields}, "history": []}]
    for body in ({"instances": [{**{f: r[f] for f in fields}, "history": []} for r in rows]},
                 {"inputs": {**{f: [r[f] for r in rows] for f in fields},
                             "history": [[], []]}},
                 {"inputs": {**{f: [r[f] for r in rows] for f in fields},
                             "history": [["nope-1", "nope-2"], ["", ""]]}}):
        out = np.asarray(rest.predict(body, signature)["predictions" if "instances" in body
                                                        else "outputs"], np.float32)
        assert out.shape == (2, D(env)) and np.all(np.isfinite(out))
    # A [B, 0] history tensor straight into the signature.
    out = signature(**{f: tf.constant(["zzz"], tf.string) for f in fields},
                    history=tf.zeros([1, 0], tf.string))["user_embedding"].numpy()
    np.testing.assert_allclose(out, model_vectors(env, [{**{f: "zzz" for f in fields},
                                                        "history": []}]), atol=1e-5)
    np.testing.assert_allclose(
        np.asarray(rest.predict({"inputs": {**{f: [r[f] for r in rows] for f in fields},
                                            "history": [["nope-1", "nope-2"], ["", ""]]}},
                                signature)["outputs"], np.float32),
        model_vectors(env, rows), atol=1e-5)


@pytest.mark.parametrize("mutate, message", [
    (lambda r, f: {"instances": [{**r, f[1]: 25}]},
     r"input '.+?' .*expected a string .*got number 25"),
    (lambda r, f: {"instances": [{k: v for k, v in r.items() if k != f[0]}]},
     r"missing input\(s\) \['" + "FIELD0"),
    (lambda r, f: {"instances": [{**r, "history": "i1"}]}, r"input 'history'.*expected a list"),
    (lambda r, f: {"instances": [{**r, "history": ["a"]}, {**r, "history": ["a", "b"]}]},
     r"different lengths.*pad history"),
    (lambda r, f: {"instances": [{**r, "history": [1, 2]}]}, r"expected a string .*got number 1"),
    (lambda r, f: {"instances": [{**r, "extra": "x"}]}, r"unknown input\(s\) \['extra'\]"),
    (lambda r, f: {"inputs": {k: [v] for k, v in r.items() if k != "history"}},
     r"missing input\(s\) \['history'\]"),
    (lambda r, f: {"inputs": {**{k: [v] for k, v in r.items()}, f[0]: [r[f[0]], "x"]}},
     r"different batch sizes"),
    (lambda r, f: {"instances": [r], "inputs": {}}, r"exactly one of"),
    (lambda r, f: {"instances": [r], "signature_name": "predict_items"}, r"signature name"),
    (lambda r, f: {"instance": [r]}, r"unknown top-level key"),
    (lambda r, f: "{not json", r"not valid JSON"),
    (lambda r, f: {"instances": [{**r, f[0]: None}]}, r"expected a string .*got null"),
])
def test_malformed_requests_give_clear_errors(env, signature, mutate, message):
    fields = env.art.user_fields
    row = {**{f: env.art.vocabs[f"user_{f}"][0] for f in fields}, "history": ["i1"]}
    body = mutate(row, fields)
    with pytest.raises(rest.RequestError, match=message.replace("FIELD0", fields[0])):
        rest.predict(body, signature)


def test_signature_rejects_wrong_dtype_and_missing_input(env, signature):
    fields = env.art.user_fields
    good = {f: tf.constant(["x"]) for f in fields}
    with pytest.raises((TypeError, ValueError, tf.errors.InvalidArgumentError)):
        signature(**good, history=tf.constant([[1]], tf.int64))
    with pytest.raises(TypeError):
        signature(**good)


# ----------------------------------------------------------------------------- warmup / gRPC
def _varint(buf, i):
    shift = value = 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, i


def _fields(buf):
    """Minimal protobuf wire decoder: [(field number, wire type, value)]."""
    out, i = [], 0
    while i < len(buf):
        key, i = _varint(buf, i)
        num, wt = key >> 3, key & 7
        if wt == 0:
            v, i = _varint(buf, i)
        elif wt == 2:
            n, i = _varint(buf, i)
            v, i = buf[i:i + n], i + n
        elif wt == 1:
            v, i = buf[i:i + 8], i + 8
        elif wt == 5:
            v, i = buf[i:i + 4], i + 4
        else:
            raise AssertionError(f"unexpected wire type {wt}")
        out.append((num, wt, v))
    return out


def test_warmup_requests_are_prediction_logs_of_real_requests(env, signature):
    from tensorflow.core.framework import tensor_pb2, types_pb2

    path = os.path.join(env.version_dir, "user_tower", "assets.extra", "tf_serving_warmup_requests")
    records = list(tf.data.TFRecordDataset(path).as_numpy_iterator())  # parses as TFRecord
    assert 1 <= len(records) <= 1000
    inputs = set(env.art.user_fields) | {"history"}
    for rec in records:
        # Wire level, against tensorflow_serving/apis field numbers: PredictionLog.predict_log = 6,
        # PredictLog.request = 1, PredictRequest.model_spec = 1 / inputs = 2 (map entry key 1,
        # value 2), ModelSpec.name = 1 / signature_name = 3.
        top = _fields(rec)
        assert [(n, w) for n, w, _ in top] == [(6, 2)]
        plog = _fields(top[0][2])
        assert [(n, w) for n, w, _ in plog] == [(1, 2)]
        req = _fields(plog[0][2])
        spec = dict((n, v) for n, w, v in _fields(next(v for n, w, v in req if n == 1)))
        assert spec == {1: b"user_tower", 3: b"serving_default"}
        feed, batch = {}, set()
        for n, w, v in req:
            if n != 2:
                continue
            entry = dict((fn, fv) for fn, _, fv in _fields(v))
            t = tensor_pb2.TensorProto.FromString(entry[2])
            assert t.dtype == types_pb2.DT_STRING
            arr = tf.make_ndarray(t)
            feed[entry[1].decode()] = arr
            batch.add(arr.shape[0])
        assert set(feed) == inputs and len(batch) == 1
        assert feed["history"].ndim == 2 and all(feed[f].ndim == 1 for f in env.art.user_fields)
        out = signature(**{k: tf.constant(v, tf.string) for k, v in feed.items()})
        assert out["user_embedding"].shape == (batch.pop(), D(env))
    # The first request holds real users of the test split (known ids, non-empty histories).
    first = serving.read_warmup_requests(path)[0]
    known = set(env.art.vocabs["item_id"])
    hist = [h.decode() for h in first["history"].ravel() if h]
    assert hist and set(hist) <= known
    assert first["__model_spec__"] == ("user_tower", "serving_default")


def test_documented_grpc_client_against_a_predict_server(env, signature):
    """Runs the docs' dependency-free gRPC snippet against an in-process PredictionService."""
    from concurrent import futures

    import grpc

    _, PredictRequest, PredictResponse = serving.serving_protos()

    def predict(request, context):
        feed = {k: tf.constant(serving.tensor_to_numpy(v), tf.string)
                for k, v in request.inputs.items()}
        assert request.model_spec.name == "user_tower"
        out = signature(**feed)
        resp = PredictResponse()
        resp.model_spec.name = request.model_spec.name
        for k, v in out.items():
            resp.outputs[k].ParseFromString(tf.make_tensor_proto(v.numpy()).SerializeToString())
        return resp

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "tensorflow.serving.PredictionService",
        {"Predict": grpc.unary_unary_rpc_method_handler(
            predict, request_deserializer=PredictRequest.FromString,
            response_serializer=lambda m: m.SerializeToString())})])
    port = server.add_insecure_port("localhost:0")
    server.start()
    try:
        code = _doc_block("grpc-generic", "python").replace("localhost:8500", f"localhost:{port}")
        ns = {}
        exec(compile(code, "docs/SERVING.md:grpc-generic", "exec"), ns)
    finally:
        server.stop(None)
    got = ns["user_vector"]
    want = model_vectors(env, [{"gender": "F", "age": "25-34", "region": "north",
                                "history": ["i354", "i125", "i706"]}])
    assert got.shape == (1, D(env)) and np.max(np.abs(got - want)) <= 1e-5


# ----------------------------------------------------------------------------- items and index
def test_item_dump_equals_item_tower(env):
    ids, vectors = item_index.load_item_embeddings(os.path.join(env.version_dir, "item_embeddings"))
    assert ids == list(env.art.vocabs["item_id"])
    assert vectors.dtype == np.float32 and vectors.shape == (len(ids), D(env))
    want = np.asarray(env.model.item_embeddings(np.arange(1, len(ids) + 1)), np.float32)
    assert np.max(np.abs(vectors - want)) <= 1e-5
    with open(os.path.join(env.art.path, "vocab", "item_id.txt"), "rb") as a, \
            open(os.path.join(env.version_dir, "item_embeddings", "vocab.txt"), "rb") as b:
        assert a.read() == b.read()


def _clustered(rng, n, d=64, clusters=64):
    centers = rng.normal(size=(clusters, d)).astype(np.float32)
    x = centers[rng.integers(0, clusters, n)] + 0.6 * rng.normal(size=(n, d)).astype(np.float32)
    return x.astype(np.float32), centers


def test_scann_recall_on_clustered_catalogue_and_reload(tmp_path):
    rng = np.random.default_rng(0)
    items, centers = _clustered(rng, 20000)
    queries = (centers[rng.integers(0, len(centers), 100)]
               + 0.6 * rng.normal(size=(100, 64))).astype(np.float32)
    k = 500
    params = item_index.scann_params(len(items), k)
    assert params["mode"] == "tree_ah" and params["num_leaves"] == 141
    searcher = search.build_scann(items, params)
    item_index.save_scann(searcher, params, str(tmp_path / "building"))
    os.rename(tmp_path / "building", tmp_path / "published")  # relative asset paths: movable
    reloaded, params2 = item_index.load_scann(str(tmp_path / "published"))
    assert params2 == params
    rows, scores = search.search_scann(searcher, params, queries, k, len(items))
    rows2, scores2 = search.search_scann(reloaded, params, queries, k, len(items))
    np.testing.assert_array_equal(rows, rows2)
    np.testing.assert_array_equal(scores, scores2)
    exact, exact_scores = search.top_k_dot(queries, items, k)
    recall = item_index.recall_at_k(rows, exact)
    print(f"\n[scann] clustered synthetic catalogue N={len(items)}: recall@{k} vs brute force "
          f"= {recall:.4f} ({params['num_leaves_to_search']}/{params['num_leaves']} leaves)")
    assert recall >= 0.95
    # Too few leaves: the export-time check doubles num_leaves_to_search until recall >= 0.95.
    low = {**params, "num_leaves_to_search": 2}
    assert item_index.recall_at_k(search.search_scann(searcher, low, queries, k, len(items))[0],
                                  exact) < 0.95
    tuned = item_index.tune_leaves_to_search(searcher, low, items, queries[:50], k)
    assert tuned["num_leaves_to_search"] > 2 and tuned["measured_recall"] >= 0.95
    assert item_index.recall_at_k(
        search.search_scann(searcher, tuned, queries, k, len(items))[0], exact) >= 0.9
    # Re-ordered scores are exact dot products.
    np.testing.assert_allclose(scores[:, 0], np.max(queries @ items.T, axis=1),
                               rtol=1e-4, atol=1e-4)


def _numpy_top_k(vectors, queries, k):
    """Independent reference: rows by descending dot product, ties by the smaller row; rows
    beyond the catalogue are -1 with score -inf."""
    scores = queries.astype(np.float64) @ vectors.astype(np.float64).T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    pad = k - order.shape[1]
    rows = np.concatenate([order, np.full((len(queries), pad), -1)], axis=1)
    top = np.concatenate([np.take_along_axis(scores, order, 1),
                          np.full((len(queries), pad), -np.inf)], axis=1)
    return rows, top


@pytest.mark.parametrize("n, k, kind, why", [
    (1, 500, "brute_force", "fewer than the 256"),
    (3, 500, "brute_force", "fewer than the 256"),
    (255, 50, "brute_force", "fewer than the 256"),
    (256, 50, "scann", "at least 256"),
    (300, 500, "brute_force", "returns all 300 items"),
    (600, 500, "scann", "more than top-500"),
])
def test_index_for_any_catalogue_size_matches_exact_top_k(tmp_path, n, k, kind, why):
    """Small catalogues (under 256 items, or at most k items) get the exact index, saying why."""
    rng = np.random.default_rng(n)
    vectors = rng.normal(size=(n, 16)).astype(np.float32)
    queries = rng.normal(size=(30, 16)).astype(np.float32)
    out = str(tmp_path / "scann")
    info = item_index.build_index(vectors, "scann", out, k=k, queries=queries)
    assert (info["kind"], info["requested"], info["num_items"]) == (kind, "scann", n)
    assert why in info["reason"] and why in item_index.describe_index(info)
    want_rows, want_scores = _numpy_top_k(vectors, queries, k)
    if kind == "brute_force":
        assert not os.path.exists(out)
        rows, scores = search.top_k_dot(queries, vectors, k)
        np.testing.assert_array_equal(rows, want_rows)
        np.testing.assert_allclose(scores, want_scores, rtol=1e-4, atol=1e-4)
    else:
        searcher, params = item_index.load_scann(out)
        assert params["mode"] == "tree_ah" and params["measured_recall"] >= 0.95
        rows, scores = search.search_scann(searcher, params, queries, k, n)
        assert item_index.recall_at_k(rows, want_rows) >= 0.95
        # Re-ordered scores are the exact dot products of the rows returned.
        got = np.take_along_axis(queries @ vectors.T, np.maximum(rows, 0), 1)
        np.testing.assert_allclose(scores[rows >= 0], got[rows >= 0], rtol=1e-4, atol=1e-4)
    assert rows.shape == (len(queries), k)
    assert np.all((rows == -1) == np.isneginf(scores)) and np.all((rows >= 0).sum(1) == min(n, k))


def test_scann_build_prints_no_native_log_lines(tmp_path, capfd, monkeypatch):
    """ScaNN's C++ INFO / WARNING lines (absl, straight to fd 2) are dropped by default; any
    other line written meanwhile still reaches stderr; ``--verbose`` brings them back."""
    monkeypatch.setattr(sys, "argv", ["export"])
    monkeypatch.delenv("MICREC_VERBOSE", raising=False)
    vectors = np.random.default_rng(1).normal(size=(400, 8)).astype(np.float32)
    native = re.compile(r"^([IWEF]\d{4} |WARNING)", re.M)
    capfd.readouterr()
    info = item_index.build_index(vectors, "scann", str(tmp_path / "a"), k=10, queries=vectors[:5])
    assert info["kind"] == "scann"
    err = capfd.readouterr().err
    assert not native.search(err), err
    with search.quiet_native_logs():
        os.write(2, b"I0101 12:00:00.000001   42 some_file.cc:7] noise\nE0101 a real error\n")
    assert capfd.readouterr().err == "E0101 a real error\n"
    monkeypatch.setenv("MICREC_VERBOSE", "1")
    search.build_scann(vectors, item_index.scann_params(len(vectors), 10))
    assert re.search(r"^I\d{4} .*partitioner", capfd.readouterr().err, re.M)


def test_brute_force_over_the_configured_limit_is_a_usage_error(tmp_path):
    from micrec_tf.cli import UsageError

    with pytest.raises(UsageError, match=r"10 items, more than export.brute_force_max_items=5"):
        item_index.build_index(np.zeros((10, 4), np.float32), "brute_force", str(tmp_path),
                               brute_force_max_items=5)


def _index_recall(version_dir, queries, k=500):
    r = Retriever.load(version_dir)
    assert r.index_kind == "scann"
    approx, _ = r.search(queries, k)
    exact, _ = Retriever.load(version_dir, index="brute_force").search(queries, k)
    rows = np.vectorize(lambda x: r.row_of.get(x, -1), otypes=[np.int64])
    return item_index.recall_at_k(rows(approx), rows(exact))


def test_exported_index_recall_and_reload(env):
    from micrec_tf.evaluation.data import load_split_arrays

    feats = ["hist_items", "hist_len"] + [f"user_{f}" for f in env.art.user_fields]
    arrays = load_split_arrays(env.art.path, "test", feats)
    queries = np.asarray(env.model.user_embeddings({k: arrays[k] for k in feats}), np.float32)
    recall = _index_recall(env.version_dir, queries)
    print(f"\n[scann] exported tiny synthetic catalogue ({len(env.art.vocabs['item_id'])} items): "
          f"recall@500 = {recall:.4f}")
    assert recall >= 0.95
    a = Retriever.load(env.version_dir).search(queries[:20], 500)
    b = Retriever.load(env.version_dir).search(queries[:20], 500)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_ml1m_export_recall_if_available():
    """ScaNN top-500 recall vs brute force on the exported ml-1m catalogue (needs a real export).

    Looks at exports/ml-1m and artifacts/ml-1m, or at $MICREC_ML1M_EXPORT / $MICREC_ML1M_ARTIFACTS.
    """
    root = os.environ.get("MICREC_ML1M_EXPORT", os.path.join(ROOT, "exports", "ml-1m"))
    art = os.environ.get("MICREC_ML1M_ARTIFACTS", os.path.join(ROOT, "artifacts", "ml-1m"))
    if not serving.published_versions(root) or not os.path.isdir(art):
        pytest.skip("no exports/ml-1m version and artifacts/ml-1m (make preprocess train export "
                    "CONFIG=configs/ml-1m.yaml)")
    r = Retriever.load(root)
    users = r.test_users(art, num_users=10 ** 9)[:2000]
    queries = r.user_vectors([u["request"] for u in users])
    recall = _index_recall(r.version_dir, queries)
    print(f"\n[scann] ml-1m export {r.version_dir} ({len(r.ids)} items, {len(users)} test users): "
          f"recall@500 = {recall:.4f}")
    assert recall >= 0.95


# ----------------------------------------------------------------------------- atomicity
def test_interrupted_export_leaves_no_visible_version(env, monkeypatch):
    root = env.export_root
    before = serving.published_versions(root)
    meta_before = open(os.path.join(env.version_dir, "metadata.json")).read()

    def crash(*args, **kwargs):  # after user tower, dump and index are half on disk
        raise RuntimeError("simulated crash while writing metadata.json")

    monkeypatch.setattr(export_model, "_write_metadata", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        export_model.export_model(env.model, env.cfg, env.art, export_root=root,
                                  log=lambda *a: None)
    monkeypatch.undo()
    assert serving.published_versions(root) == before
    assert not [d for d in os.listdir(root) if d.startswith(".")]
    assert sorted(os.listdir(os.path.join(root, "serving"))) == [str(v) for v in before]
    assert open(os.path.join(env.version_dir, "metadata.json")).read() == meta_before
    assert Retriever.load(root).version_dir == env.version_dir

    # A killed export leaves a dot directory: invisible to readers, swept by the next export.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = os.path.join(root, f".tmp-{before[-1] + 5}-{dead.pid}-deadbeef")
    os.makedirs(os.path.join(stale, "user_tower"))
    open(os.path.join(stale, "user_tower", "saved_model.pb"), "wb").write(b"partial")
    assert serving.published_versions(root) == before
    assert Retriever.load(root).version_dir == env.version_dir
    new_dir = export_model.export_model(env.model, env.cfg, env.art, export_root=root,
                                        log=lambda *a: None)
    assert not os.path.exists(stale)
    assert int(os.path.basename(new_dir)) > before[-1]
    assert serving.published_versions(root) == before + [int(os.path.basename(new_dir))]
    assert os.path.exists(os.path.join(root, "serving", os.path.basename(new_dir),
                                       "saved_model.pb"))
    assert Retriever.load(root).version_dir == new_dir


# ----------------------------------------------------------------------------- retrieval
def test_retriever_topk_exclusion_and_batches(env):
    r = Retriever.load(env.export_root)
    exact = Retriever.load(env.export_root, index="brute_force")
    users = r.test_users(env.art.path, num_users=5)
    assert len(users) == 5 and len({u["user_id"] for u in users}) == 5
    reqs = [u["request"] for u in users]
    ids, scores = r.retrieve(reqs, k=50)
    assert ids.shape == (5, 50) and scores.dtype == np.float32
    assert np.all(np.diff(scores, axis=1) <= 1e-6)
    # Same vectors as the trained model; brute force equals an exact numpy ranking.
    vecs = r.user_vectors(reqs)
    assert np.max(np.abs(vecs - model_vectors(env, reqs))) <= 1e-5
    e_ids, e_scores = exact.retrieve(reqs, k=50)
    order = np.argsort(-(vecs @ exact.vectors.T), axis=1, kind="stable")[:, :50]
    np.testing.assert_array_equal(e_ids, np.asarray(exact.ids, dtype=object)[order])
    assert item_index.recall_at_k(
        np.vectorize(r.row_of.get)(ids), np.vectorize(r.row_of.get)(e_ids)) >= 0.95
    # Exclusions: history items, or every earlier click; still k items.
    h_ids, _ = r.retrieve(reqs, k=50, exclude="history")
    for row, u in zip(h_ids, users):
        assert not set(row) & set(u["request"]["history"]) and "" not in set(row)
    c_ids, _ = r.retrieve(reqs, k=50, exclude=[u["clicked"] for u in users])
    for row, u in zip(c_ids, users):
        assert not set(row) & set(u["clicked"]) and len(row) == 50
        assert set(u["request"]["history"]) & set(r.ids) <= set(u["clicked"])
    # Batch mode = one user at a time, up to float32 rounding (oneDNN picks the tower's kernels
    # by batch shape and instruction set: on AVX2 the vectors differ in the 7th digit), so the
    # same scores, and an id differs only where near-tied items trade places; REST bodies and
    # columnar dicts (the same batch of 5) give the same ids exactly.
    for i, req in enumerate(reqs):
        one, one_scores = r.retrieve([req], k=50)
        np.testing.assert_allclose(one_scores[0], scores[i], rtol=0, atol=1e-5)
        for p in np.flatnonzero(one[0] != ids[i]):
            at = np.flatnonzero(ids[i] == one[0][p])
            near = scores[i][at[0]] if at.size else scores[i][-1]  # cut off at k: a tie there
            assert abs(float(near) - float(one_scores[0][p])) <= 1e-5, (i, p, one[0][p])
    cols = columns(reqs, r.user_fields)
    np.testing.assert_array_equal(r.retrieve({"inputs": cols}, k=50)[0], ids)
    np.testing.assert_array_equal(r.retrieve(cols, k=50)[0], ids)
    with pytest.raises(rest.RequestError, match="must be a string"):
        r.retrieve([{**reqs[0], r.user_fields[0]: 3}])
    # Tiny catalogue edge: k beyond the catalogue pads with "" / -inf.
    big, big_scores = exact.retrieve(reqs[:1], k=len(exact.ids) + 3)
    assert list(big[0][-3:]) == ["", "", ""] and np.all(np.isneginf(big_scores[0][-3:]))


def test_retrieve_cli_prints_topk(env, capsys, tmp_path):
    from micrec_tf import retrieve

    assert retrieve.main(["--config", env.cfg_path, "--k", "25", "--exclude-clicked"]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if re.match(r"^\s+\d+\s+\S+\s+-?\d+\.\d{4}", line)]
    assert len(lines) == 25 and out.startswith("user ")
    user = out.split()[1]
    assert retrieve.main(["--config", env.cfg_path, "--user", user, "--k", "10",
                          "--num-users", "3", "--output", str(tmp_path / "top.jsonl")]) == 0
    rows = [json.loads(x) for x in open(tmp_path / "top.jsonl")]
    assert [r["user_id"] for r in rows] == [user] and len(rows[0]["items"]) == 10
    assert retrieve.main(["--config", env.cfg_path, "--num-users", "3", "--k", "5",
                          "--output", str(tmp_path / "batch.jsonl")]) == 0
    assert len(open(tmp_path / "batch.jsonl").readlines()) == 3

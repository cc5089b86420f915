"""One validation for every request form, and the per-request caps of ``export/rest.predict``.

The Python retrieval API (:meth:`micrec_tf.retrieval.Retriever.to_columns` / ``retrieve``) takes
a list of dicts or a columnar dict besides TF Serving REST bodies. Every malformed request, in any
form, is a :class:`export.rest.RequestError` whose one-line message names the request (index) and
the input; never a TypeError / IndexError / KeyError, and never accepted by accident (a ``history``
dict used to be read by its keys). ``rest.predict`` refuses a request over
``export.max_request_instances`` instances (or a body over its byte cap) before it converts
anything to arrays.

The Retriever here wraps a hand-written ``tf.function`` user tower over four string inputs (no
training): the checks under test run before the tower.
"""
import json

import numpy as np
import pytest

from export import rest
from micrec_tf.config import ConfigError, ExportConfig, from_dict


FIELDS = ("gender", "age", "region")


def _row(**values):
    return {"gender": "F", "age": "25-34", "region": "north", "history": ["i1", "i2"], **values}


@pytest.fixture(scope="module")
def tower():
    """A concrete signature with the serving inputs: [len(gender), non-empty history ids]."""
    import tensorflow as tf

    spec1 = tf.TensorSpec([None], tf.string)

    @tf.function
    def fn(*, gender, age, region, history):
        filled = tf.reduce_sum(tf.cast(tf.strings.length(history) > 0, tf.float32), axis=1)
        length = tf.cast(tf.strings.length(gender), tf.float32)
        return {"user_embedding": tf.stack([length, filled], axis=1)}

    return fn.get_concrete_function(gender=spec1, age=spec1, region=spec1,
                                    history=tf.TensorSpec([None, None], tf.string))


@pytest.fixture(scope="module")
def retriever(tower):
    from micrec_tf.retrieval import Retriever

    ids = ["i1", "i2", "i3", "i4"]
    vectors = np.asarray([[1, 0], [0, 1], [1, 1], [-1, 0]], np.float32)
    return Retriever("unused", {"top_k": 2}, tower, ids, vectors)


# ----------------------------------------------------------------------------- Python API forms
COLUMNS = {"gender": ["F", "M"], "age": ["25-34", "45-54"], "region": ["north", "west"],
           "history": [["i1", "i2"], ["i3"]]}


@pytest.mark.parametrize("requests, message", [
    # history=5: a TypeError ("'int' object is not iterable") on main
    ([_row(history=5)], r"input 'history' \(requests\)\[0\]: expected a list .*got 5"),
    # a dict history was read by its keys on main
    ([_row(), _row(history={"i1": 1, "i2": 2})],
     r"input 'history' \(requests\)\[1\]: expected a list .*got \{\"i1\": 1"),
    ([_row(history="i1")], r"input 'history' \(requests\)\[0\]: expected a list .*got \"i1\""),
    ([_row(history=["i1", 7])], r"input 'history' \(requests\)\[0\]\[1\]: expected a string "
                                r".*got number 7"),
    ([_row(history=[["i1"]])], r"input 'history' \(requests\)\[0\]\[0\]: expected a string here, "
                               r"got a list"),
    ([_row(), _row(gender=3)], r"input 'gender' \(requests\)\[1\]: expected a string .*got "
                               r"number 3; every value must be a string"),
    ([_row(age=None)], r"input 'age' \(requests\)\[0\]: expected a string .*got null"),
    ([_row(region=["north"])], r"input 'region' \(requests\)\[0\]: expected a string here, got "
                               r"a list"),
    ([_row(), "F"], r"requests\[1\]: expected an object with the named inputs .*got \"F\""),
    ([{k: v for k, v in _row().items() if k != "age"}], r"requests\[0\]: missing input\(s\) "
                                                        r"\['age'\]"),
    ([_row(extra="x")], r"requests\[0\]: unknown input\(s\) \['extra'\]"),
    (5, r"a list of dicts .*got number 5"),
    # uneven columns: an IndexError on main
    ({**COLUMNS, "age": ["25-34"]}, r"different batch sizes .*'age': 1"),
    ({**COLUMNS, "history": [["i1"]]}, r"different batch sizes .*'history': 1"),
    ({**COLUMNS, "gender": "F"}, r"input 'gender': expected a list .*got \"F\""),
    ({**COLUMNS, "history": [["i1"], 5]}, r"input 'history'\[1\]: expected a list .*got 5"),
    ({**COLUMNS, "history": [{"i1": 1}, ["i3"]]}, r"input 'history'\[0\]: expected a list"),
    ({**COLUMNS, "region": ["north", 4.5]}, r"input 'region'\[1\]: expected a string .*got "
                                            r"number 4.5"),
    ({k: v for k, v in COLUMNS.items() if k != "region"}, r"missing input\(s\) \['region'\]"),
    ({**COLUMNS, "extra": ["x", "y"]}, r"unknown input\(s\) \['extra'\]"),
])
def test_malformed_python_requests_are_request_errors(retriever, requests, message):
    for call in (retriever.to_columns, retriever.retrieve):
        with pytest.raises(rest.RequestError, match=message) as err:
            call(requests)
        assert "\n" not in str(err.value)


def test_python_forms_give_the_rest_tensors(retriever):
    """A list of dicts, a columnar dict and both REST formats of one content: the same tensors.

    Python forms may leave ``history`` ragged (padded with ""), omit it or give None (empty),
    and give bytes as they are; the reference is written out by hand.
    """
    rows = [_row(history=["i1", "i2", "i3"]), _row(gender=b"M\xff", history=("i4",)),
            {k: v for k, v in _row(age="55+").items() if k != "history"},
            _row(region=np.str_("west"), history=None)]
    want = {"gender": [b"F", b"M\xff", b"F", b"F"], "age": [b"25-34", b"25-34", b"55+", b"25-34"],
            "region": [b"north", b"north", b"north", b"west"],
            "history": [[b"i1", b"i2", b"i3"], [b"i4", b"", b""], [b"", b"", b""],
                        [b"", b"", b""]]}
    cols = {f: [r.get(f) for r in rows] for f in (*FIELDS, "history")}
    rest_rows = [{"gender": "F", "age": "25-34", "region": "north", "history": ["i1", "i2", "i3"]},
                 {"gender": {"b64": "Tf8="}, "age": "25-34", "region": "north",
                  "history": ["i4", "", ""]},
                 {"gender": "F", "age": "55+", "region": "north", "history": ["", "", ""]},
                 {"gender": "F", "age": "25-34", "region": "west", "history": ["", "", ""]}]
    bodies = [{"instances": rest_rows},
              json.dumps({"inputs": {f: [r[f] for r in rest_rows] for f in want}})]
    for request in (rows, cols, np.asarray(rows, dtype=object), *bodies):
        got = retriever.to_columns(request)
        assert set(got) == set(want)
        for name, values in want.items():
            assert got[name].dtype == object and got[name].tolist() == values, (name, request)


def test_empty_python_requests_give_empty_tensors(retriever):
    got = retriever.to_columns([])
    assert {k: v.shape for k, v in got.items()} == {**{f: (0,) for f in FIELDS},
                                                    "history": (0, 0)}


def test_python_api_batches_instead_of_capping(retriever):
    """The Python API runs the tower ``batch_size`` users at a time, so it takes more users
    than the REST cap in one call: same results as one user at a time."""
    cap = 5
    rows = [_row(gender="F" * (i % 3 + 1), history=["i1"] * (i % 4)) for i in range(2 * cap + 1)]
    ids, scores = retriever.retrieve(rows, k=2, batch_size=cap)
    assert ids.shape == (len(rows), 2)
    for i, row in enumerate(rows):
        one_ids, one_scores = retriever.retrieve([row], k=2)
        assert ids[i].tolist() == one_ids[0].tolist()
        np.testing.assert_allclose(scores[i], one_scores[0], rtol=1e-6)
    # The vectors are the hand-written tower's: [len(gender), non-empty history ids].
    vecs = retriever.user_vectors(rows, batch_size=cap)
    np.testing.assert_allclose(vecs, [[i % 3 + 1, i % 4] for i in range(len(rows))])


def test_exclude_history_with_non_utf8_bytes(retriever):
    """Bytes that are not UTF-8 are valid ids for the tower; they match no catalogue item."""
    ids, _ = retriever.retrieve([_row(history=[b"\xff\xfe", "i1"])], k=2, exclude="history")
    assert "i1" not in ids[0].tolist() and len(ids[0]) == 2


# ----------------------------------------------------------------------------- the REST caps
SPECS = rest.specs_from_metadata({"gender": {"shape": [-1]}, "age": {"shape": [-1]},
                                  "region": {"shape": [-1]}, "history": {"shape": [-1, -1]}})


def _bodies(n):
    rows = [_row() for _ in range(n)]
    return [{"instances": rows},
            {"inputs": {k: [r[k] for r in rows] for k in rows[0]}},
            json.dumps({"instances": rows}),
            json.dumps({"inputs": {k: [r[k] for r in rows] for k in rows[0]}}).encode()]


def test_the_default_cap_is_the_configs():
    assert rest.DEFAULT_MAX_INSTANCES == ExportConfig().max_request_instances > 0


@pytest.mark.parametrize("form", range(4))
def test_requests_over_the_instance_cap_are_refused_before_conversion(monkeypatch, form, tower):
    cap = 7
    tensors, _ = rest.parse_request(_bodies(cap)[form], SPECS, max_instances=cap)
    assert tensors["history"].shape == (cap, 2)
    out = rest.predict(_bodies(cap)[form], tower, max_instances=cap)
    assert np.asarray(next(iter(out.values()))).shape == (cap, 2)

    def no_conversion(*args, **kwargs):
        raise AssertionError("the body was converted to arrays before the cap was checked")

    monkeypatch.setattr(rest, "_to_array", no_conversion)
    for call in (lambda b: rest.parse_request(b, SPECS, max_instances=cap),
                 lambda b: rest.predict(b, tower, max_instances=cap)):
        with pytest.raises(rest.RequestError, match=rf"\b{cap + 1} instances\b.*\b{cap}\b") as e:
            call(_bodies(cap + 1)[form])
        assert "\n" not in str(e.value)


def test_predict_caps_at_the_default(monkeypatch, tower):
    monkeypatch.setattr(rest, "_to_array", lambda *a, **k: pytest.fail("converted"))
    n = rest.DEFAULT_MAX_INSTANCES + 1
    with pytest.raises(rest.RequestError, match=rf"{n} instances.*{n - 1}"):
        rest.predict({"instances": [_row()] * n}, tower)


def test_a_single_inputs_bare_tensor_counts_too():
    specs = rest.specs_from_metadata({"history": {"shape": [-1, -1]}})
    with pytest.raises(rest.RequestError, match=r"4 instances.*3"):
        rest.parse_request({"inputs": [["a"]] * 4}, specs, max_instances=3)
    tensors, _ = rest.parse_request({"inputs": [["a"]] * 3}, specs, max_instances=3)
    assert tensors["history"].shape == (3, 1)


def test_bodies_over_the_byte_cap_are_refused_before_json_parsing(monkeypatch):
    body = json.dumps({"instances": [_row()]})
    size = len(body.encode("utf-8"))
    assert rest.parse_request(body, SPECS, max_bytes=size)[0]["gender"].tolist() == [b"F"]
    monkeypatch.setattr(rest.json, "loads", lambda *a, **k: pytest.fail("parsed"))
    for b in (body, body.encode("utf-8")):
        with pytest.raises(rest.RequestError, match=rf"{size + 1} bytes.*limit of {size} bytes"):
            rest.parse_request(b[:-1] + b[-1:] * 2, SPECS, max_bytes=size)
    # The limit counts UTF-8 bytes, not characters.
    wide = json.dumps({"instances": [_row(region="ñ" * 10)]}, ensure_ascii=False)
    with pytest.raises(rest.RequestError, match=r"bytes"):
        rest.parse_request(wide, SPECS, max_bytes=len(wide))


@pytest.mark.parametrize("value", [0, -1])
def test_the_config_cap_must_be_positive(value):
    assert from_dict({"export": {"max_request_instances": 3}}).export.max_request_instances == 3
    with pytest.raises(ConfigError, match=rf"export.max_request_instances .*{value}"):
        from_dict({"export": {"max_request_instances": value}})

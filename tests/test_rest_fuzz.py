"""export/rest.py's request parser against malformed bodies (fuzzed) and a hand-written reference.

The contract (docs/SERVING.md, export/rest.py): :func:`rest.parse_request` maps a TF Serving REST
``:predict`` body onto the signature's string tensors, and every body that does not fit raises
:class:`rest.RequestError`, never another exception. The fuzzing is bounded and deterministic
(``derandomize=True``, no example database), so it runs the same cases on every machine. No
TensorFlow: the parser is pure Python + numpy.
"""
import base64
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from export import rest


def _fuzz(max_examples: int):
    return settings(max_examples=max_examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


# The synthetic data's user tower (docs/SERVING.md), and single-input signatures of either rank
# (where the row format's objects and the columnar ``inputs`` object may be bare values).
SIGNATURES = {
    "user_tower": {"gender": [-1], "age": [-1], "region": [-1], "history": [-1, -1]},
    "history_only": {"history": [-1, -1]},
    "id_only": {"user_id": [-1]},
    "fixed_history": {"gender": [-1], "history": [-1, 3]},
}
SPECS = {name: rest.specs_from_metadata({n: {"shape": s} for n, s in sig.items()})
         for name, sig in SIGNATURES.items()}


# ----------------------------------------------------------------------------- reference
def reference(rows: list, specs: dict) -> dict:
    """The tensors a well-formed request for ``rows`` means, written out by hand.

    ``rows``: one dict per example, ``{input: bytes}`` for a ``[-1]`` input and
    ``{input: [bytes, ...]}`` (all the same length) for ``history``.
    """
    out = {}
    for name, spec in specs.items():
        values = [row[name] for row in rows]
        shape = (len(rows),) if len(spec.shape) == 1 else (len(rows), len(values[0]) if rows else 0)
        arr = np.empty(shape, dtype=object)
        for i, v in enumerate(values):
            arr[i] = v if len(spec.shape) == 1 else list(v)
        out[name] = arr
    return out


def assert_fits_signature(tensors: dict, fmt: str, specs: dict) -> None:
    """What every parsed request is: one object array of bytes per input, signature shapes."""
    assert fmt in ("row", "columnar")
    assert set(tensors) == set(specs)
    batch = set()
    for name, arr in tensors.items():
        spec = specs[name]
        assert isinstance(arr, np.ndarray) and arr.dtype == object, name
        assert arr.ndim == len(spec.shape), (name, arr.shape)
        for got, want in zip(arr.shape, spec.shape):
            assert want is None or got == want, (name, arr.shape, spec)
        assert all(isinstance(x, bytes) for x in arr.ravel()), name
        batch.add(arr.shape[0])
    assert len(batch) == 1, batch


def parse_or_reject(body, specs):
    """``(tensors, fmt)``, or ``None`` for a :class:`RequestError`; anything else propagates."""
    try:
        tensors, fmt = rest.parse_request(body, specs)
    except rest.RequestError as err:
        assert str(err), "a RequestError must say what is wrong"
        return None
    assert_fits_signature(tensors, fmt, specs)
    return tensors, fmt


# ----------------------------------------------------------------------------- strategies
# One string element: its JSON form and the bytes it stands for. Text is valid Unicode (no lone
# surrogates); b64 carries any bytes, invalid UTF-8 included.
ELEMENT = st.one_of(
    st.text(max_size=8).map(lambda t: (t, t.encode("utf-8"))),
    st.sampled_from(["", "F", "25-34", "i354", "history", "gender", "user_id", "b64", "ñ", "😀"])
    .map(lambda t: (t, t.encode("utf-8"))),
    st.binary(max_size=8).map(lambda b: ({"b64": base64.b64encode(b).decode("ascii")}, b)),
)

# Any JSON value, NaN and the infinities included (Python's json writes and reads them).
JSON_SCALAR = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(),
                        st.integers(min_value=10 ** 30, max_value=10 ** 60), st.text(max_size=6))
JSON_VALUE = st.recursive(
    JSON_SCALAR, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                         st.dictionaries(st.text(max_size=6), inner, max_size=4)),
    max_leaves=12)


@st.composite
def requests(draw, specs=None):
    """A well-formed request: ``(specs, body as a JSON value, the reference tensors)``."""
    specs = specs or SPECS[draw(st.sampled_from(sorted(SPECS)))]
    names = list(specs)
    n = draw(st.integers(1, 4))
    fixed = [d for s in specs.values() for d in s.shape[1:] if d is not None]
    length = fixed[0] if fixed else draw(st.integers(0, 4))
    json_rows, byte_rows = [], []
    for _ in range(n):
        jrow, brow = {}, {}
        for name in names:
            if len(specs[name].shape) == 1:
                jrow[name], brow[name] = draw(ELEMENT)
            else:
                pairs = [draw(ELEMENT) for _ in range(length)]
                jrow[name], brow[name] = [p[0] for p in pairs], [p[1] for p in pairs]
        json_rows.append(jrow)
        byte_rows.append(brow)
    bare = len(names) == 1 and draw(st.booleans())
    if draw(st.booleans()):
        key, payload = "instances", [r[names[0]] if bare else r for r in json_rows]
    else:
        cols = {name: [r[name] for r in json_rows] for name in names}
        key, payload = "inputs", cols[names[0]] if bare else cols
    body = {key: payload}
    if draw(st.booleans()):
        body["signature_name"] = "serving_default"
    return specs, body, reference(byte_rows, specs)


def encode(draw, body) -> str | bytes | dict:
    """The body as the parser may get it: the parsed object, its text, or UTF-8 bytes."""
    how = draw(st.sampled_from(["object", "text", "ascii_text", "bytes"]))
    if how == "object":
        return body
    text = json.dumps(body, ensure_ascii=(how == "ascii_text"))
    return text.encode("utf-8") if how == "bytes" else text


def paths(value, prefix=()):
    """Every path (tuple of keys / indices) into a JSON value, the root included."""
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from paths(v, prefix + (i,))


def element_paths(body):
    """Paths of the tensor elements (a string or a ``{"b64": ...}`` object) of a built body."""
    def walk(v, path):
        if isinstance(v, str):
            yield path
        elif isinstance(v, dict) and set(v) == {"b64"}:
            yield path
        elif isinstance(v, dict):
            for k, x in v.items():
                if path or k != "signature_name":
                    yield from walk(x, path + (k,))
        elif isinstance(v, list):
            for i, x in enumerate(v):
                yield from walk(x, path + (i,))
    return list(walk(body, ()))


def replaced(body, path, new):
    """A copy of ``body`` with the value at ``path`` replaced by ``new``."""
    if not path:
        return new
    body = json.loads(json.dumps(body))
    parent = body
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = new
    return body


def deleted(body, path):
    """A copy of ``body`` without the key or list entry at ``path``."""
    body = json.loads(json.dumps(body))
    parent = body
    for key in path[:-1]:
        parent = parent[key]
    del parent[path[-1]]
    return body


# Byte strings that break a body where they land: invalid UTF-8 (a lone continuation byte, a
# truncated sequence, an encoded surrogate, an overlong form), JSON's non-standard literals, an
# integer past Python's 4300-digit conversion limit, nesting thousands deep, stray syntax.
SPLICES = [b"\xff", b"\x80", b"\xc3", b"\xe2\x82", b"\xed\xa0\x80", b"\xc0\xaf", b"\x00",
           b"NaN", b"Infinity", b"-Infinity", b"9" * 5000, b"-" + b"1" * 4400, b"1e999999",
           b"[" * 3000, b"{\"a\":" * 3000, b'"\\ud800"', b'"\\udfff\\ud800"', b'"\\u00"',
           b"{", b"}", b"[", b"]", b",", b":", b'"', b"\\", b"null", b"true", b"\xef\xbb\xbf"]


@st.composite
def malformed(draw):
    """``(specs, body)``: a well-formed request broken in one of many ways (it may still fit)."""
    specs, body, _ = draw(requests())
    how = draw(st.sampled_from(["replace", "delete", "add", "wrap", "splice", "truncate",
                                "flip", "deep"]))
    if how in ("replace", "delete", "add", "wrap"):
        path = draw(st.sampled_from(list(paths(body))))
        if how == "replace":
            body = replaced(body, path, draw(JSON_VALUE))
        elif how == "delete" and path:
            body = deleted(body, path)
        elif how == "add":
            key = draw(st.sampled_from(["instances", "inputs", "signature_name", "b64", "x",
                                        *specs]))
            body = json.loads(json.dumps(body))
            parent = body
            for k in path:
                parent = parent[k]
            if isinstance(parent, dict):
                parent[key] = draw(JSON_VALUE)
            elif isinstance(parent, list):
                parent.append(draw(JSON_VALUE))
        elif how == "wrap":
            depth = draw(st.integers(1, 40))
            value = body
            for k in path:
                value = value[k]
            for _ in range(depth):
                value = draw(st.sampled_from([[value], {"b64": value}, {"x": value}]))
            body = replaced(body, path, value)
        return specs, encode(draw, body)
    raw = json.dumps(body, ensure_ascii=draw(st.booleans())).encode("utf-8")
    at = draw(st.integers(0, len(raw)))
    if how == "splice":
        raw = raw[:at] + draw(st.sampled_from(SPLICES)) + raw[at:]
    elif how == "truncate":
        raw = raw[:at]
    elif how == "flip" and raw:
        at = min(at, len(raw) - 1)
        raw = raw[:at] + bytes([draw(st.integers(0, 255))]) + raw[at + 1:]
    elif how == "deep":
        depth = draw(st.sampled_from([10, 100, 900, 5000, 100_000]))
        opener, closer = draw(st.sampled_from([(b"[", b"]"), (b'{"a":', b"}")]))
        raw = raw[:at] + opener * depth + b'"x"' + closer * depth + raw[at:]
    return specs, (raw if draw(st.booleans()) else raw.decode("utf-8", "surrogateescape"))


# ----------------------------------------------------------------------------- properties
@_fuzz(400)
@given(requests(), st.data())
def test_well_formed_requests_parse_to_the_reference(request, data):
    specs, body, expected = request
    tensors, fmt = rest.parse_request(encode(data.draw, body), specs)
    assert fmt == ("row" if "instances" in body else "columnar")
    assert_fits_signature(tensors, fmt, specs)
    for name, want in expected.items():
        assert tensors[name].shape == want.shape, name
        assert tensors[name].tolist() == want.tolist(), name


@_fuzz(400)
@given(st.sampled_from(sorted(SPECS)), st.one_of(
    st.binary(max_size=300),
    st.text(max_size=200),
    st.text(st.characters(exclude_categories=()), max_size=60),  # lone surrogates too
    JSON_VALUE.map(json.dumps)))
def test_random_bodies_are_rejected_or_fit(signature, body):
    parse_or_reject(body, SPECS[signature])


@_fuzz(500)
@given(malformed())
def test_broken_requests_are_rejected_or_fit(case):
    specs, body = case
    parse_or_reject(body, specs)


NOT_A_STRING = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(),
    st.lists(JSON_VALUE, max_size=3),
    st.dictionaries(st.text(max_size=6).filter(lambda k: k not in ("b64", "history", "gender",
                                                                   "age", "region", "user_id")),
                    JSON_VALUE, max_size=3),
    st.fixed_dictionaries({"b64": st.one_of(JSON_SCALAR.filter(lambda v: not isinstance(v, str)),
                                            st.just("not base64!"))}))


@_fuzz(300)
@given(requests(), st.data())
def test_a_non_string_element_is_always_rejected(request, data):
    """Any one tensor element replaced by a non-string (a number, NaN, null, a list, an object,
    a bad b64 object) makes the request a RequestError: DT_STRING inputs take strings only."""
    specs, body, _ = request
    where = element_paths(body)
    if not where:  # every history empty and no [-1] input
        return
    path = data.draw(st.sampled_from(where))
    broken = replaced(body, path, data.draw(NOT_A_STRING))
    with pytest.raises(rest.RequestError):
        rest.parse_request(encode(data.draw, broken), specs)


# ----------------------------------------------------------------------------- Python API forms
# :meth:`micrec_tf.retrieval.Retriever.to_columns` is ``rest.parse_python_request``: a list of
# dicts or a columnar dict, checked by the REST parser's own code (bytes allowed as they are,
# ``history`` optional and ragged). The same malformed values must be RequestErrors there too.
def python_form(body, specs, draw=None):
    """The Python API form of a REST body's content: a list of dicts for ``instances``, a
    columnar dict for ``inputs`` (a single input's bare values named); with ``draw``, some
    ``{"b64": ...}`` elements become the bytes they stand for, some lists tuples."""
    names = list(specs)
    if "instances" in body:
        form = [row if isinstance(row, dict) and (len(names) > 1 or names[0] in row)
                else {names[0]: row} for row in body["instances"]]
    else:
        inputs = body["inputs"]
        form = inputs if isinstance(inputs, dict) and names[0] in inputs else {names[0]: inputs}
    form = json.loads(json.dumps(form))
    if draw is None:
        return form

    def loosen(v):
        if isinstance(v, dict) and set(v) == {"b64"} and draw(st.booleans()):
            return base64.b64decode(v["b64"])
        if isinstance(v, dict):
            return {k: loosen(x) for k, x in v.items()}
        if isinstance(v, list):
            items = [loosen(x) for x in v]
            return tuple(items) if draw(st.booleans()) else items
        return v
    return loosen(form) if isinstance(form, dict) else [loosen(row) for row in form]


@_fuzz(300)
@given(requests(), st.data())
def test_python_forms_parse_to_the_rest_tensors(request, data):
    """A list of dicts / columnar dict of one content gives the reference and the REST tensors."""
    specs, body, expected = request
    got = rest.parse_python_request(python_form(body, specs, data.draw), specs)
    rest_tensors, _ = rest.parse_request(body, specs)
    assert_fits_signature(got, "row", specs)
    for name, want in expected.items():
        assert got[name].shape == want.shape, name
        assert got[name].tolist() == want.tolist() == rest_tensors[name].tolist(), name


@_fuzz(300)
@given(requests(), st.data())
def test_a_non_string_element_is_rejected_in_python_forms(request, data):
    """The REST test's replacement values (numbers, NaN, null, lists, objects, bad b64 objects)
    in a Python form: RequestError too, never TypeError / IndexError / KeyError."""
    specs, body, _ = request
    where = element_paths(body)
    if not where:
        return
    broken = replaced(body, data.draw(st.sampled_from(where)), data.draw(NOT_A_STRING))
    with pytest.raises(rest.RequestError):
        rest.parse_python_request(python_form(broken, specs), specs)


# Values a Python caller may put anywhere: JSON values, bytes, tuples, numpy arrays, sets, None.
PY_VALUE = st.one_of(JSON_VALUE, st.binary(max_size=6), st.tuples(st.text(max_size=3)),
                     st.lists(st.text(max_size=3), max_size=3).map(np.asarray),
                     st.frozensets(st.text(max_size=3), max_size=3), st.none())


@_fuzz(400)
@given(requests(), st.data())
def test_broken_python_forms_are_rejected_or_fit(request, data):
    """A Python form with a value replaced, deleted (uneven columns, a missing input) or added:
    a RequestError, or tensors that fit the signature."""
    specs, body, _ = request
    form = python_form(body, specs)
    path = data.draw(st.sampled_from(list(paths(form))))
    how = data.draw(st.sampled_from(["replace", "delete", "add"]))
    if how == "replace" or not path:
        if not path:
            form = data.draw(PY_VALUE)
        else:
            parent = form
            for key in path[:-1]:
                parent = parent[key]
            parent[path[-1]] = data.draw(PY_VALUE)
    elif how == "delete":
        form = deleted(form, path)
    else:
        parent = form
        for key in path:
            parent = parent[key]
        if isinstance(parent, dict):
            parent[data.draw(st.sampled_from(["x", "b64", *specs]))] = data.draw(PY_VALUE)
        elif isinstance(parent, list):
            parent.append(data.draw(PY_VALUE))
    try:
        tensors = rest.parse_python_request(form, specs)
    except rest.RequestError as err:
        assert str(err) and "\n" not in str(err)
        return
    assert_fits_signature(tensors, "row", specs)


@pytest.mark.parametrize("form, message", [
    ([{"gender": "F", "age": "a", "region": "r", "history": 5}],
     r"input 'history' \(requests\)\[0\]: expected a list"),
    ({"gender": ["F", "M"], "age": ["a"], "region": ["r", "s"], "history": [[], []]},
     r"different batch sizes"),
    ([{"gender": "F", "age": "a", "region": "r", "history": {"i1": 1}}],
     r"input 'history' \(requests\)\[0\]: expected a list"),
])
def test_python_form_regressions(form, message):
    with pytest.raises(rest.RequestError, match=message):
        rest.parse_python_request(form, SPECS["user_tower"])


# ----------------------------------------------------------------------------- regressions
USER_TOWER = SPECS["user_tower"]


def _row(**values):
    return {"gender": "F", "age": "25-34", "region": "north", "history": ["i1", "i2"], **values}


@pytest.mark.parametrize("body, message", [
    (b'{"instances": [{"gender": "\xff", "age": "a", "region": "r", "history": []}]}',
     r"not valid UTF-8: byte 0xff at offset 27"),
    (json.dumps({"instances": [_row()]}).encode("utf-8")[:-3] + b"\xe2\x82]}",
     r"not valid UTF-8"),
    (json.dumps({"instances": [_row(history=["i1", "\ud800"])]}),  # written as "\ud800"
     r"input 'history' \(instances\)\[0\]\[1\]: the string is not valid Unicode"),
    (json.dumps({"inputs": {**{k: [v] for k, v in _row().items()}, "age": ["\udfff"]}}),
     r"input 'age'\[0\]: .*unpaired surrogate"),
])
def test_invalid_utf8_is_a_request_error(body, message):
    with pytest.raises(rest.RequestError, match=message):
        rest.parse_request(body, USER_TOWER)


@pytest.mark.parametrize("body, message", [
    ('{"instances": ' + "[" * 100_000 + "]" * 100_000 + "}", r"too deeply .* at most 5 levels"),
    ('{"inputs": {"history": ' + '{"a": ' * 50_000 + "1" + "}" * 50_000 + "}}", r"too deeply"),
    ("[" * 100_000, r"too deeply"),
    (json.dumps({"instances": [_row(history=[[["i1"]]])]}), r"more dimensions than the input's"),
    (json.dumps({"inputs": {**{k: [v] for k, v in _row().items()}, "history": [[[["i1"]]]]}}),
     r"input 'history'\[0\]\[0\]: expected a string here, got a list"),
])
def test_nesting_deeper_than_the_signature_is_a_request_error(body, message):
    with pytest.raises(rest.RequestError, match=message):
        rest.parse_request(body, USER_TOWER)


def test_deeply_nested_values_are_quoted_briefly():
    """Error messages quote a value at bounded depth and length, however deep it nests."""
    deep = '{"a": ' * 900 + '"x"' + "}" * 900
    for body in ('{"instances": [{"gender": ' + deep + ', "age": "a", "region": "r", '
                 '"history": []}]}',
                 '{"signature_name": ' + "[" * 900 + "]" * 900 + ', "inputs": {}}'):
        with pytest.raises(rest.RequestError) as err:
            rest.parse_request(body, USER_TOWER)
        assert len(str(err.value)) < 300, str(err.value)


@pytest.mark.parametrize("body, message", [
    ('{"instances": [' + "9" * 5000 + "]}", r"integer literal too large to convert"),
    ('{"instances": [{"gender": -' + "1" * 4301 + ', "age": "a", "region": "r", "history": []}]}',
     r"integer literal too large"),
    ('{"signature_name": ' + "7" * 10_000 + ', "instances": []}', r"integer literal too large"),
    # A Python int past the conversion limit in an already-parsed body: still a clean message.
    ({"instances": [_row(gender=10 ** 5000)]}, r"expected a string .*got number <integer of"),
    ('{"instances": [' + json.dumps(_row())[:-1] + ', "x": ' + "1" * 4000 + "}]}",
     r"unknown input\(s\) \['x'\]"),
])
def test_huge_integers_are_a_request_error(body, message):
    with pytest.raises(rest.RequestError, match=message):
        rest.parse_request(body, USER_TOWER)


@pytest.mark.parametrize("body", [
    {"inputs": ["user_id", {"b64": "eA=="}]},  # the bare tensor holds the input's own name
    {"inputs": ["user_id", "x"]},
    {"instances": ["user_id", {"b64": "eA=="}]},
])
def test_a_single_inputs_bare_tensor_may_hold_any_string(body):
    tensors, _ = rest.parse_request(body, SPECS["id_only"])
    assert tensors["user_id"].tolist() == [b"user_id", b"x"]


@pytest.mark.parametrize("body, message", [
    ({"instances": [_row(gender=b"F")]}, r"input 'gender' .*expected a string .*got bytes"),
    ({"instances": [_row()], 3: 1}, r"unknown top-level key\(s\) \[3\]"),
    ({"instances": [_row()], "signature_name": ["serving_default"]},
     r"\"signature_name\" must be a string, got list"),
    ('"serving_default"', r"must be a JSON object .*got string"),
    ({"inputs": "x"}, r"\"inputs\" must be an object .*got string"),
])
def test_other_malformed_bodies_are_request_errors(body, message):
    with pytest.raises(rest.RequestError, match=message):
        rest.parse_request(body, USER_TOWER)

"""TF Serving's REST ``:predict`` JSON, for the user-tower signature, without TF Serving.

Implements the request -> tensors and outputs -> response mapping of TF Serving's RESTful API
(https://www.tensorflow.org/tfx/serving/api_rest, "Predict API") for a signature of string
inputs, so that tests, the retrieval code and clients can check a request body offline and get
exactly the JSON TF Serving would return:

* Row format ``{"signature_name": ..., "instances": [{<input>: <value>, ...}, ...]}``: one object
  per example with every named input; each value is that example's slice of the tensor (a string
  for a ``[-1]`` input, a list of strings for ``history``). All examples' lists must have the same
  length (TF Serving does not pad): pad ``history`` with ``""``. When the signature has exactly one
  input the objects may be replaced by bare values.
* Columnar format ``{"signature_name": ..., "inputs": {<input>: <tensor as nested lists>}}``.
* String values are JSON strings or ``{"b64": "<base64>"}``. Numbers, booleans and null are not
  strings: a request with them is rejected, as TF Serving rejects them.
* A body given as bytes must be UTF-8 (RFC 8259); a JSON string must be valid Unicode (no unpaired
  ``\\ud800``-style surrogate escapes: send other bytes as ``{"b64": ...}``).
* Response: row format -> ``{"predictions": [...]}`` (with a single output its value per example;
  with several, one object per example); columnar -> ``{"outputs": ...}`` (the single output's
  nested list, or an object of all outputs).

Errors raise :class:`RequestError` (HTTP 400 in TF Serving) with a message naming the input. Every
malformed body does, whatever it holds (invalid UTF-8, nesting deeper than the signature allows or
than the parser can follow, integers too large to convert, non-JSON values in a ``Mapping`` body):
no other exception escapes :func:`parse_request` (tests/test_rest_fuzz.py fuzzes it).

Caps (a service needs them; TF Serving itself has none): :func:`parse_request` and :func:`predict`
refuse a text body over ``max_bytes`` before parsing its JSON, and a request of more than
``max_instances`` examples (default: the config's ``export.max_request_instances``) before
converting anything to arrays, since :func:`predict` runs the signature on the whole batch at once.

The Python retrieval API's own request forms (a list of dicts, a columnar dict) go through the same
checks: :func:`parse_python_request`.
"""
from __future__ import annotations

import base64
import binascii
import itertools
import json
import sys
from typing import Any, Mapping, Sequence

import numpy as np

from micrec_tf.config import ExportConfig

# One request's examples at most, unless the caller passes its config's value: the signature runs
# on a request's whole batch at once (about 62 KB and 0.4 ms of tower per example with a
# 20-click history, from a 45k-example request that took 2.8 GB and 18 s).
DEFAULT_MAX_INSTANCES = ExportConfig.max_request_instances
# A text body's UTF-8 bytes at most, checked before JSON parsing: parsing and conversion peak at
# ~15x the text (160 MiB for a 10.5 MB body of 45k examples). 8 KiB per example at the default
# instance cap: room for histories far longer than the model reads.
DEFAULT_MAX_BYTES = 8 * 1024 * 1024


class RequestError(ValueError):
    """A REST request body does not fit the signature; the message says what and where."""


# Largest ``k`` of one retrieval, shared by the service (``export.serve_max_k``, whose default this
# is) and the Python API (``Retriever.search`` / ``retrieve`` and ``micrec_tf.retrieve``).
DEFAULT_MAX_K = ExportConfig.serve_max_k


def check_k(k: Any, max_k: int = DEFAULT_MAX_K) -> int:
    """``k`` of a retrieval: an integer in 1..``max_k`` (as ``int``); :class:`RequestError` (one
    line, the same for the service's ``:retrieve`` and the Python API) otherwise."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise RequestError(f"\"k\" must be an integer, got {_kind(k)} {_preview(k)}")
    if not 1 <= k <= max_k:
        raise RequestError(f"\"k\" must be between 1 and {max_k} (export.serve_max_k), got {k}")
    return int(k)


class InputSpec:
    """What the converter needs of one signature input: dtype (``string`` only here) and shape."""

    def __init__(self, name: str, shape: Sequence[int | None], dtype: str = "string"):
        if dtype != "string":
            raise NotImplementedError("only DT_STRING inputs are supported by this converter")
        self.name, self.dtype = name, dtype
        self.shape = [None if (d is None or d < 0) else int(d) for d in shape]

    def __repr__(self):
        dims = ", ".join("-1" if d is None else str(d) for d in self.shape)
        return f"{self.name}: DT_STRING [{dims}]"


def specs_from_signature(fn) -> dict:
    """``{name: InputSpec}`` from a loaded signature (``loaded.signatures["serving_default"]``)."""
    _, kwargs = fn.structured_input_signature
    out = {}
    for name, spec in kwargs.items():
        if spec.dtype.name != "string":
            raise NotImplementedError(f"input {name!r} is {spec.dtype.name}, not string")
        out[name] = InputSpec(name, list(spec.shape))
    return out


def specs_from_metadata(inputs: Mapping[str, Mapping]) -> dict:
    """``{name: InputSpec}`` from metadata.json's ``user_tower.inputs`` description."""
    return {name: InputSpec(name, d["shape"], d.get("dtype", "string"))
            for name, d in inputs.items()}


_PREVIEW_ITEMS = 4  # list items / object members an error message quotes per level
_PREVIEW_DEPTH = 3  # nesting levels an error message quotes


def _preview(value: Any, limit: int = 60) -> str:
    """``value`` as short JSON-like text for an error message, at most ``limit`` characters.

    Bounded in depth and width, so any value can be quoted: nested thousands deep, huge, or not
    JSON at all (bytes, a huge Python int, ...).
    """
    text = _render(value, _PREVIEW_DEPTH, limit)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _render(v: Any, depth: int, limit: int) -> str:
    if isinstance(v, (list, tuple, Mapping)):
        opener, closer = ("{", "}") if isinstance(v, Mapping) else ("[", "]")
        if not v:
            return opener + closer
        if depth == 0:
            return opener + "..." + closer
        items = itertools.islice(v.items() if isinstance(v, Mapping) else v, _PREVIEW_ITEMS)
        parts = [f"{_render(x[0], 0, limit)}: {_render(x[1], depth - 1, limit)}"
                 if isinstance(v, Mapping) else _render(x, depth - 1, limit) for x in items]
        more = ", ..." if len(v) > _PREVIEW_ITEMS else ""
        return opener + ", ".join(parts) + more + closer
    if isinstance(v, str):
        return json.dumps(v[:limit])
    if v is None or isinstance(v, (bool, float)):
        return json.dumps(v)  # null, true, NaN, Infinity, 1.5
    if isinstance(v, int):
        try:
            return str(v)
        except ValueError:  # past sys.get_int_max_str_digits()
            return f"<integer of {v.bit_length()} bits>"
    return f"<{type(v).__name__}>"


def _key_list(keys, most: int = 5) -> str:
    """Sorted ``keys`` as a Python list literal (``['extra']``), at most ``most`` of them."""
    shown = sorted(keys, key=_preview)
    text = ", ".join(repr(k[:40]) if isinstance(k, str) else _preview(k, 40) for k in shown[:most])
    return "[" + text + (f", ... ({len(shown)} in all)" if len(shown) > most else "") + "]"


def _kind(value: Any) -> str:
    """The JSON kind of a value, for "expected ..., got <kind>" messages."""
    if isinstance(value, str):
        return "string"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    return "object" if isinstance(value, Mapping) else type(value).__name__


def _utf8(text: str, where: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise RequestError(f"{where}: the string is not valid Unicode (unpaired surrogate "
                           f"{text[err.start]!r} at character {err.start}); send text as UTF-8 "
                           "or other bytes as {\"b64\": <base64>}") from None


def _decode_string(value: Any, where: str, accept_bytes: bool = False) -> bytes:
    """One tensor element -> bytes: a string, a ``{"b64": ...}`` object, or (Python API forms,
    ``accept_bytes``) ``bytes`` as they are; :class:`RequestError` for anything else."""
    if isinstance(value, str):
        return _utf8(value, where)
    if accept_bytes and isinstance(value, bytes):
        return bytes(value)
    if isinstance(value, Mapping):
        if set(value) != {"b64"} or not isinstance(value["b64"], str):
            raise RequestError(f"{where}: an object value must be {{\"b64\": <base64 string>}}, "
                               f"got {_preview(value, 80)}")
        try:
            return base64.b64decode(value["b64"], validate=True)
        except (binascii.Error, ValueError) as err:
            raise RequestError(f"{where}: invalid base64 in b64 value: {err}") from None
    kind, shown = _kind(value), _preview(value)
    got = kind if value is None else f"{kind} {shown}"
    example = f', e.g. "{shown}"' if kind == "number" else ""
    how = "str (or bytes)" if accept_bytes else "JSON strings"
    raise RequestError(f"{where}: expected a string (DT_STRING), got {got}; every value must be a "
                       f"string: send ids and profile values as {how}{example}")


def _to_array(value: Any, rank: int, where: str, accept_bytes: bool = False) -> np.ndarray:
    """Nested lists of exactly ``rank`` levels -> object array of bytes with a rectangular shape."""
    def shape_of(v, depth, path):
        if depth == rank:
            if isinstance(v, list):
                raise RequestError(f"{where}{path}: expected a string here, got a list (the value "
                                   f"has more dimensions than the input's rank {rank})")
            return ()
        if not isinstance(v, list):
            raise RequestError(f"{where}{path}: expected a list (the input has rank {rank}), "
                               f"got {_preview(v)}")
        shapes = {shape_of(x, depth + 1, f"{path}[{i}]") for i, x in enumerate(v)}
        if len(shapes) > 1:
            raise RequestError(f"{where}{path}: lists of different lengths {sorted(shapes)}; "
                               "tensors must be rectangular (pad history with \"\")")
        inner = shapes.pop() if shapes else (0,) * (rank - depth - 1)
        return (len(v),) + inner

    shape = shape_of(value, 0, "")
    flat = []

    def collect(v, path):
        if isinstance(v, list):
            for i, x in enumerate(v):
                collect(x, f"{path}[{i}]")
        else:
            flat.append(_decode_string(v, f"{where}{path}", accept_bytes))

    collect(value, "")
    return np.asarray(flat + [b""], dtype=object)[:-1].reshape(shape)


def _check_shape(arr: np.ndarray, spec: InputSpec) -> None:
    for axis, (got, want) in enumerate(zip(arr.shape, spec.shape)):
        if want is not None and got != want:
            raise RequestError(f"input {spec.name!r}: dimension {axis} is {got}, the signature "
                               f"wants {want} ({spec})")


def _max_depth(specs: Mapping[str, InputSpec]) -> int:
    """How deep a well-formed body for ``specs`` nests JSON arrays and objects.

    Body object, ``instances`` list / ``inputs`` object, then the input's rank of lists (the row
    format's instance object stands for the batch list), then a ``{"b64": ...}`` object.
    """
    return max((len(s.shape) for s in specs.values()), default=1) + 3


def _load_body(body: str | bytes | bytearray, specs: Mapping[str, InputSpec]) -> Any:
    """A REST body's text (``bytes``: UTF-8) -> the JSON value; :class:`RequestError` if it is
    not UTF-8, not JSON, nested past what the parser can follow, or has an integer literal too
    long to convert (Python's ``sys.get_int_max_str_digits()``, 4300 digits by default)."""
    if isinstance(body, (bytes, bytearray)):
        try:
            body = bytes(body).decode("utf-8")
        except UnicodeDecodeError as err:
            bad = err.object[err.start]
            raise RequestError(f"request body is not valid UTF-8: byte 0x{bad:02x} at offset "
                               f"{err.start} ({err.reason})") from None
    try:
        return json.loads(body)
    except json.JSONDecodeError as err:
        raise RequestError(f"request body is not valid JSON: {err}") from None
    except RecursionError:
        raise RequestError("request body nests arrays/objects too deeply to parse; a request for "
                           f"this signature nests at most {_max_depth(specs)} levels") from None
    except ValueError:  # int("9" * 5000): past the digit limit of int conversion
        raise RequestError("request body has an integer literal too large to convert (over "
                           f"{sys.get_int_max_str_digits()} digits); DT_STRING inputs take JSON "
                           "strings") from None


def _text_size(body: str | bytes | bytearray, limit: int) -> int:
    """The UTF-8 size of a text body, exact whenever it may exceed ``limit`` (a ``str`` of n
    characters has n to 4n bytes, so only a long one is encoded to count)."""
    if isinstance(body, str) and len(body) * 4 > limit:
        return len(body.encode("utf-8", "surrogatepass"))
    return len(body)


def _count_instances(payload: Any, names: list, rows: bool) -> int:
    """How many examples an ``instances`` list / ``inputs`` object holds, without converting it:
    the list's length, or the longest input's outer list (a bare tensor's for a single input)."""
    if not rows and isinstance(payload, Mapping) and not (len(names) == 1
                                                          and names[0] not in payload):
        return max((len(v) for v in payload.values() if isinstance(v, list)), default=0)
    return len(payload) if isinstance(payload, list) else 0


def _check_batch(tensors: Mapping[str, np.ndarray]) -> None:
    batch = {name: arr.shape[0] if arr.ndim else None for name, arr in tensors.items()}
    if len(set(batch.values())) > 1:
        raise RequestError(f"inputs have different batch sizes {batch}; every input needs one "
                           "entry per user")


def parse_request(body: str | bytes | Mapping, specs: Mapping[str, InputSpec],
                  signature_name: str = "serving_default", *,
                  max_instances: int | None = DEFAULT_MAX_INSTANCES,
                  max_bytes: int | None = DEFAULT_MAX_BYTES) -> tuple[dict, str]:
    """A REST ``:predict`` body -> ``({input: object array of bytes}, "row" | "columnar")``.

    ``body``: the request's text (``str``, or UTF-8 ``bytes``) or its parsed JSON object. Any body
    that does not fit raises :class:`RequestError`, never another exception. ``max_bytes`` caps a
    text body's UTF-8 size (checked before parsing), ``max_instances`` the examples of a request
    (checked before conversion); ``None``: no cap.
    """
    for name, cap in (("max_instances", max_instances), ("max_bytes", max_bytes)):
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
            raise ValueError(f"{name} must be a positive int or None, got {cap!r}")
    if isinstance(body, (str, bytes, bytearray)):
        size = _text_size(body, max_bytes) if max_bytes is not None else 0
        if max_bytes is not None and size > max_bytes:
            raise RequestError(f"request body is {size} bytes, over the limit of {max_bytes} "
                               "bytes per request; send fewer instances per request")
        body = _load_body(body, specs)
    if not isinstance(body, Mapping):
        raise RequestError("request body must be a JSON object with \"instances\" or \"inputs\", "
                           f"got {_kind(body)} {_preview(body)}")
    unknown = set(body) - {"signature_name", "instances", "inputs"}
    if unknown:
        raise RequestError(f"unknown top-level key(s) {_key_list(unknown)}; expected "
                           "\"instances\" (row format) or \"inputs\" (columnar format), and "
                           "optional \"signature_name\"")
    sig = body.get("signature_name", signature_name)
    if not isinstance(sig, str):
        raise RequestError(f"\"signature_name\" must be a string, got {_kind(sig)} "
                           f"{_preview(sig)}")
    if sig != signature_name:
        raise RequestError(f"serving signature name {_preview(sig)} not found; this model serves "
                           f"{signature_name!r}")
    has_rows, has_cols = "instances" in body, "inputs" in body
    if has_rows == has_cols:
        raise RequestError("request must have exactly one of \"instances\" (row format) or "
                           "\"inputs\" (columnar format)" + (", not both" if has_rows else ""))
    names = list(specs)
    payload = body["instances"] if has_rows else body["inputs"]
    count = _count_instances(payload, names, has_rows)
    if max_instances is not None and count > max_instances:
        raise RequestError(f"request has {count} instances, over the limit of {max_instances} "
                           "per request (export.max_request_instances); split it into requests "
                           f"of at most {max_instances}")
    if has_rows:
        tensors = _parse_rows(payload, specs, names)
        fmt = "row"
    else:
        tensors = _parse_columns(payload, specs, names)
        fmt = "columnar"
    _check_batch(tensors)
    return tensors, fmt


def _parse_rows(instances: Any, specs: Mapping[str, InputSpec], names: list,
                python: bool = False) -> dict:
    """Row format -> tensors. ``python``: the Python API's list of dicts (messages say
    ``requests[i]``; every entry must be a dict; values may be ``bytes``)."""
    label, unit = ("requests", "request") if python else ("instances", "instance")
    if not isinstance(instances, list):
        raise RequestError("\"instances\" must be a list with one entry per example")
    if not instances:
        raise RequestError("\"instances\" is empty")
    single = len(names) == 1 and not python
    columns = {n: [] for n in names}
    for i, inst in enumerate(instances):
        if isinstance(inst, Mapping) and not (single and set(inst) == {"b64"}):
            missing = [n for n in names if n not in inst]
            extra = set(inst) - set(names)
            if missing:
                raise RequestError(f"{label}[{i}]: missing input(s) {missing}; every {unit} "
                                   f"needs all of {names}")
            if extra:
                raise RequestError(f"{label}[{i}]: unknown input(s) {_key_list(extra)}; "
                                   f"the signature takes {names}")
            for n in names:
                columns[n].append(inst[n])
        elif single:
            columns[names[0]].append(inst)
        else:
            raise RequestError(f"{label}[{i}]: expected an object with the named inputs "
                               f"{names}, got {_preview(inst)}")
    out = {}
    for n in names:
        spec = specs[n]
        arr = _to_array(columns[n], len(spec.shape), f"input {n!r} ({label})", python)
        _check_shape(arr, spec)
        out[n] = arr
    return out


def _parse_columns(inputs: Any, specs: Mapping[str, InputSpec], names: list,
                   python: bool = False) -> dict:
    """Columnar format -> tensors. ``python``: the Python API's columnar dict (values may be
    ``bytes``)."""
    what = "the columnar request" if python else "\"inputs\""
    if len(names) == 1 and not (isinstance(inputs, Mapping) and names[0] in inputs):
        inputs = {names[0]: inputs}  # a single input's bare tensor
    elif not isinstance(inputs, Mapping):
        raise RequestError(f"\"inputs\" must be an object mapping each of {names} to a tensor, "
                           f"got {_kind(inputs)} {_preview(inputs)}")
    missing = [n for n in names if n not in inputs]
    extra = set(inputs) - set(names)
    if missing:
        raise RequestError(f"{what} is missing input(s) {missing}; the signature takes {names}")
    if extra:
        raise RequestError(f"{what} has unknown input(s) {_key_list(extra)}; the "
                           f"signature takes {names}")
    out = {}
    for n in names:
        spec = specs[n]
        arr = _to_array(inputs[n], len(spec.shape), f"input {n!r}", python)
        _check_shape(arr, spec)
        out[n] = arr
    return out


# ----------------------------------------------------------------------------- Python API forms
def _as_list(value: Any) -> Any:
    """A tuple or numpy array -> a list (the parser's one sequence type); anything else as is."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    return list(value) if isinstance(value, tuple) else value


def _padded(rows: list, spec: InputSpec) -> list:
    """A rank-2 input's rows for the Python forms: None -> empty, tuples / arrays -> lists, lists
    padded with "" to the longest (or the signature's fixed width); other values are left for
    :func:`_to_array` to reject."""
    rows = [[] if r is None else _as_list(r) for r in rows]
    width = max([len(r) for r in rows if isinstance(r, list)] + [spec.shape[1] or 0])
    return [r + [""] * (width - len(r)) if isinstance(r, list) else r for r in rows]


def is_rest_body(requests: Any) -> bool:
    """Whether a Python API request is a REST body (text, or an object with ``instances`` or
    ``inputs``) rather than a list of dicts or a columnar dict."""
    return isinstance(requests, (str, bytes, bytearray)) or (
        isinstance(requests, Mapping) and ("instances" in requests or "inputs" in requests))


def parse_python_request(requests: Any, specs: Mapping[str, InputSpec]) -> dict:
    """The Python retrieval API's request -> ``{input: object array of bytes}``.

    ``requests``: a REST body (:func:`is_rest_body`; checked by :func:`parse_request`, without
    its caps: the API runs the tower in batches), a list of dicts (one per user, like the row
    format) or a columnar dict (like the ``inputs`` object). The last two are checked by the
    parser's own code, with three conveniences: values may be ``bytes`` (taken as they are), a
    rank-2 input such as ``history`` may be left out or None (empty) and its rows may differ in
    length (padded with ""), and tuples and numpy arrays count as lists. No users: empty tensors.
    Anything malformed raises :class:`RequestError` naming the request index and the input.
    """
    if is_rest_body(requests):
        return parse_request(requests, specs, max_instances=None, max_bytes=None)[0]
    names = list(specs)
    rank2 = [n for n in names if len(specs[n].shape) == 2]
    if isinstance(requests, Mapping):
        cols = {k: _as_list(v) for k, v in requests.items()}
        sizes = [len(v) for k, v in cols.items() if k not in rank2 and isinstance(v, list)]
        for n in rank2:
            if cols.get(n) is None:
                cols[n] = [[]] * (sizes[0] if sizes else 0)
            if isinstance(cols[n], list):
                cols[n] = _padded(cols[n], specs[n])
        tensors = _parse_columns(cols, specs, names, python=True)
        _check_batch(tensors)
        return tensors
    try:
        rows = list(_as_list(requests))
    except TypeError:
        raise RequestError("requests must be a list of dicts (one per user), a columnar dict or "
                           f"a REST body, got {_kind(requests)} {_preview(requests)}") from None
    if not rows:
        return {n: np.empty((0,) + tuple(d or 0 for d in specs[n].shape[1:]), dtype=object)
                for n in names}
    rows = [dict(r) if isinstance(r, Mapping) else r for r in rows]
    for n in rank2:
        dicts = [r for r in rows if isinstance(r, dict)]
        for r, h in zip(dicts, _padded([r.get(n) for r in dicts], specs[n])):
            r[n] = h
    return _parse_rows(rows, specs, names, python=True)


def format_response(outputs: Mapping[str, Any], fmt: str) -> dict:
    """Signature outputs -> the JSON object TF Serving returns for a ``fmt`` request."""
    arrays = {k: np.asarray(v) for k, v in outputs.items()}
    if fmt == "row":
        if len(arrays) == 1:
            return {"predictions": next(iter(arrays.values())).tolist()}
        n = len(next(iter(arrays.values())))
        return {"predictions": [{k: a[i].tolist() for k, a in arrays.items()} for i in range(n)]}
    if fmt == "columnar":
        if len(arrays) == 1:
            return {"outputs": next(iter(arrays.values())).tolist()}
        return {"outputs": {k: a.tolist() for k, a in arrays.items()}}
    raise ValueError(f"unknown request format {fmt!r}")


def predict(body, signature_fn, *, max_instances: int | None = DEFAULT_MAX_INSTANCES,
            max_bytes: int | None = DEFAULT_MAX_BYTES) -> dict:
    """Runs a REST body through a loaded signature and returns TF Serving's JSON response.

    The signature runs once on the whole request, so the caps of :func:`parse_request` apply (a
    service passes its config's ``export.max_request_instances`` as ``max_instances``)."""
    import tensorflow as tf

    tensors, fmt = parse_request(body, specs_from_signature(signature_fn),
                                 max_instances=max_instances, max_bytes=max_bytes)
    outputs = signature_fn(**{k: tf.constant(v, tf.string) if v.size
                              else tf.zeros(v.shape, tf.string) for k, v in tensors.items()})
    return format_response({k: v.numpy() for k, v in outputs.items()}, fmt)

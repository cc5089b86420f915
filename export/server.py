"""The online retrieval service: user tower + item index of an export version behind HTTP.

``python -m export.server --config configs/<x>.yaml [--host 127.0.0.1] [--port N]
[--export-dir exports/<name>]`` (``make serve``) loads the newest complete version of the export
root (default ``exports/<name>``) and serves, for the model name ``export.serve_model_name``
(default ``user_tower``, TF Serving's name in docs/SERVING.md):

* ``POST /v1/models/<name>:predict`` (also ``/v1/models/<name>/versions/<v>:predict``): TF Serving's
  REST predict contract for the user tower. The body is parsed by :func:`export.rest.parse_request`
  and the answer built by :func:`export.rest.format_response`, the functions that
  :func:`export.rest.predict` runs, so the JSON is the one TF Serving returns (``instances`` ->
  ``{"predictions": ...}``, ``inputs`` -> ``{"outputs": ...}``; ``signature_name`` checked).
* ``POST /v1/models/<name>:retrieve``: ``{"instances" | "inputs": <the same user features>,
  "k": K, "exclude": "history" | null | [[item id, ...] per user]}`` or ``{"user_vectors":
  [[float] * D, ...]}`` / ``{"user_vector": [float] * D}`` with ``k`` and ``exclude`` (no
  ``"history"`` there). ``k`` defaults to the export's ``top_k``; ``exclude`` to ``"history"``
  (each user's history items) for features, to nothing for vectors. Answer: ``{"model_version":
  "<v>", "ids": [[str] per user], "scores": [[float] per user]}``, best first, excluded items
  removed before the top K is cut (:meth:`micrec_tf.retrieval.Retriever.search`); a row is
  shorter than K only when the catalogue is.
* ``GET /v1/models/<name>`` (and ``/versions/<v>``): TF Serving's model status JSON
  (``model_version_status``: version, state, status error_code / error_message); a version the
  loader refused is listed with state ``END`` and its reason.
* ``GET /healthz`` (the process answers), ``GET /readyz`` (200 only once a version is loaded and
  warmed up, 503 before), ``GET /metrics`` (Prometheus text format, :class:`Metrics`).

Requests: bodies over ``export.serve_max_request_bytes`` get 413 before their JSON is parsed; a
body that does not fit (any :class:`export.rest.RequestError`, more than
``export.max_request_instances`` users, ``k`` outside 1..``export.serve_max_k``) gets 400 with
``{"error": "<one line>"}``; an unknown model name or version, or an unknown path, 404; a request
before the first version is ready 503 with ``Retry-After``; with ``export.serve_request_timeout_s``
> 0, a request still waiting in a micro-batcher queue that long after it arrived is dropped
before it runs and answered 504 (:class:`export.batcher.DeadlineExceeded`); with
``export.serve_drop_disconnected``, one whose client disconnected while it waited is taken out of
the queue and "answered" 499 (nobody reads it; the metrics count it). With
``export.serve_max_in_flight`` > 0 (default 256), a ``:predict`` / ``:retrieve`` arriving while
that many are admitted and unanswered gets 503 with ``Retry-After`` at once, before its body is
read (:class:`export.admission.InFlightLimit`; 0: off). A 5xx other than these 503s and 504s is a
bug.

Versions: an :class:`export.versions.VersionManager` loads and warms the newest complete version
in the background (``/readyz`` turns 200 after), then polls every ``export.serve_poll_s`` seconds
and hot-swaps newer ones; no loadable version at start-up is one ``error:`` line and exit 2. One
request is one call on the version serving when it arrived (``VersionManager.acquire`` keeps that
version for the whole request, and its answer names it); the user tower and the search run in
worker threads, off the event loop. SIGTERM (uvicorn's handler): stop accepting, let in-flight requests finish (at most
``export.serve_shutdown_timeout_s``), exit 0. The service never writes into the export tree.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import math
import os
import re
import signal
import sys
import threading
import time
import traceback
from typing import Any, Callable, Iterator, Mapping

import micrec_tf  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)
import numpy as np

from micrec_tf import cli

from export import rest, serving
from export.admission import InFlightLimit, model_call
from export.batcher import Closed, DeadlineExceeded, MicroBatcher, Overloaded
from export.versions import LoadedVersion, NoLoadableVersionError, VersionManager

# Top-level keys of a :retrieve body besides TF Serving's own.
RETRIEVE_KEYS = ("k", "exclude", "user_vector", "user_vectors")
# Latency histogram buckets in seconds (Prometheus ``le`` upper bounds).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Instances per tower call (rows); the micro-batcher's own histogram replaces it when present.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class TooLarge(Exception):
    """A request body over the byte limit (HTTP 413)."""


class Unavailable(Exception):
    """503 with ``Retry-After``: no version ready yet, or the service is shutting down."""


class NotFound(Exception):
    """An unknown model name, version or verb (HTTP 404)."""


class ClientGone(Exception):
    """The client disconnected before its answer (``export.serve_drop_disconnected``): 499."""


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one request may hold; :meth:`from_config` takes them from ``cfg.export``.

    Attributes:
        max_bytes: int, body bytes (``export.serve_max_request_bytes``; 413 above).
        max_instances: int, users per request (``export.max_request_instances``, the cap of
            :func:`export.rest.parse_request`).
        max_k: int, the largest ``k`` of a ``:retrieve`` (``export.serve_max_k``).
    """

    max_bytes: int = rest.DEFAULT_MAX_BYTES
    max_instances: int = rest.DEFAULT_MAX_INSTANCES
    max_k: int = 2000

    def __post_init__(self):
        for name in ("max_bytes", "max_instances", "max_k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int. Received: {name}={value!r}")

    @classmethod
    def from_config(cls, export_cfg) -> "Limits":
        return cls(max_bytes=export_cfg.serve_max_request_bytes,
                   max_instances=export_cfg.max_request_instances, max_k=export_cfg.serve_max_k)


@dataclasses.dataclass(frozen=True)
class Batching:
    """Micro-batching of the user tower and the index search (:class:`export.batcher.MicroBatcher`,
    one per stage); :meth:`from_config` takes ``export.serve_max_batch_size`` (0: ``None``, no
    batching), ``serve_max_wait_ms``, ``serve_max_queue`` and ``serve_max_queue_delay_ms``."""

    max_batch_size: int = 256
    max_wait_ms: float = 2.0
    max_queue: int = 512
    # Seconds from a request's arrival after which it is dropped if still queued (504); 0: no
    # deadline (the old behaviour). export.serve_request_timeout_s.
    request_timeout_s: float = 0.0
    # Drop a queued request whose client disconnected (499); False: run it anyway (the old
    # behaviour). export.serve_drop_disconnected.
    drop_disconnected: bool = False
    # Refuse (503) a request while the oldest one queued in its stage waited longer than
    # max_wait_ms + this (export.serve_max_queue_delay_ms, default 500); 0: off, the old
    # behaviour (only max_queue bounds the queue).
    max_queue_delay_ms: float = 500.0

    @classmethod
    def from_config(cls, export_cfg) -> "Batching | None":
        if export_cfg.serve_max_batch_size == 0:
            return None
        return cls(export_cfg.serve_max_batch_size, float(export_cfg.serve_max_wait_ms),
                   export_cfg.serve_max_queue,
                   float(getattr(export_cfg, "serve_request_timeout_s", 0.0)),
                   bool(getattr(export_cfg, "serve_drop_disconnected", False)),
                   float(getattr(export_cfg, "serve_max_queue_delay_ms", 0.0)))


# ----------------------------------------------------------------------------- request parsing
@dataclasses.dataclass
class RetrieveRequest:
    """A parsed ``:retrieve`` body: ``columns`` (``{input: object array}``, signature shapes) or
    ``vectors`` (float32 [B, D]); ``k``; ``exclude`` (None, ``"history"`` or one list of item ids
    per user), as :meth:`micrec_tf.retrieval.Retriever.search` takes it."""

    columns: dict | None
    vectors: np.ndarray | None
    k: int
    exclude: Any

    @property
    def size(self) -> int:
        if self.vectors is not None:
            return int(self.vectors.shape[0])
        return int(len(self.columns[serving.HISTORY_INPUT]))


# ``k`` of a request: one validation with the Python API (``Retriever.search`` / ``retrieve``).
check_k = rest.check_k


def _load_json(body: str | bytes | Mapping, specs: Mapping, max_bytes: int) -> Any:
    """A text body -> its JSON value, with :func:`export.rest.parse_request`'s own size check and
    parser (UTF-8, nesting depth, huge integers all give :class:`export.rest.RequestError`)."""
    if isinstance(body, (str, bytes, bytearray)):
        size = rest._text_size(body, max_bytes)
        if size > max_bytes:
            raise TooLarge(f"request body is {size} bytes, over the limit of {max_bytes} bytes "
                           "per request; send fewer instances per request")
        return rest._load_body(body, specs)
    return body


def _vectors(value: Any, key: str, dim: int, max_instances: int) -> np.ndarray:
    rows = [value] if key == "user_vector" else value
    what = f"\"{key}\""
    if not isinstance(rows, list) or not rows:
        raise rest.RequestError(f"{what} must be a non-empty list, got {rest._preview(value)}")
    if len(rows) > max_instances:
        raise rest.RequestError(f"request has {len(rows)} instances, over the limit of "
                                f"{max_instances} per request (export.max_request_instances)")
    for i, row in enumerate(rows):
        where = what if key == "user_vector" else f"{what}[{i}]"
        if not isinstance(row, list) or len(row) != dim:
            raise rest.RequestError(f"{where} must be a list of {dim} numbers (the export's "
                                    f"vector size), got {rest._preview(row)}")
        for j, x in enumerate(row):
            if isinstance(x, bool) or not isinstance(x, (int, float)) or (
                    isinstance(x, float) and not math.isfinite(x)):
                raise rest.RequestError(f"{where}[{j}]: expected a finite number, got "
                                        f"{rest._preview(x)}")
    try:
        arr = np.asarray(rows, np.float64)
    except OverflowError:  # an int too large for a float
        arr = np.full((1,), np.inf)
    if not (np.abs(arr) <= np.finfo(np.float32).max).all():
        raise rest.RequestError(f"{what}: numbers must fit float32 (a value overflows)")
    return arr.astype(np.float32)


def _exclusions(value: Any, n: int, features: bool) -> Any:
    if value is None or value == "history":
        if value == "history" and not features:
            raise rest.RequestError("\"exclude\": \"history\" needs user features (\"instances\" "
                                    "or \"inputs\"); with user vectors give the item ids")
        return value
    if not isinstance(value, list) or len(value) != n:
        raise rest.RequestError(f"\"exclude\" must be \"history\", null or a list of {n} lists "
                                f"of item ids (one per user), got {rest._preview(value)}")
    for i, row in enumerate(value):
        if row is None:
            continue
        if not isinstance(row, list) or not all(isinstance(x, str) for x in row):
            raise rest.RequestError(f"\"exclude\"[{i}] must be a list of item id strings, got "
                                    f"{rest._preview(row)}")
    return value


def parse_retrieve_request(body: str | bytes | Mapping, specs: Mapping, dim: int, default_k: int,
                           limits: Limits = Limits()) -> RetrieveRequest:
    """A ``:retrieve`` body -> :class:`RetrieveRequest` (module docstring for the form).

    The user features go through :func:`export.rest.parse_request` with ``limits.max_instances``
    (the ``:predict`` checks exactly); anything malformed raises
    :class:`export.rest.RequestError` (HTTP 400), a text body over ``limits.max_bytes``
    :class:`TooLarge` (HTTP 413).
    """
    body = _load_json(body, specs, limits.max_bytes)
    if not isinstance(body, Mapping):
        raise rest.RequestError("request body must be a JSON object, got "
                                f"{rest._kind(body)} {rest._preview(body)}")
    unknown = set(body) - {"signature_name", "instances", "inputs", *RETRIEVE_KEYS}
    if unknown:
        raise rest.RequestError(f"unknown top-level key(s) {rest._key_list(unknown)}; a retrieve "
                                "request has \"instances\" or \"inputs\" (user features) or "
                                "\"user_vectors\" / \"user_vector\", and optional \"k\", "
                                "\"exclude\", \"signature_name\"")
    given = [key for key in ("instances", "inputs", "user_vectors", "user_vector") if key in body]
    if len(given) != 1:
        raise rest.RequestError("a retrieve request needs exactly one of \"instances\", "
                                "\"inputs\", \"user_vectors\", \"user_vector\"; got "
                                + (", ".join(given) if given else "none"))
    k = check_k(default_k if body.get("k") is None else body["k"], limits.max_k)
    features = given[0] in ("instances", "inputs")
    columns = vectors = None
    if features:
        tower_body = {key: body[key] for key in ("signature_name", given[0]) if key in body}
        columns, _ = rest.parse_request(tower_body, specs, max_instances=limits.max_instances,
                                        max_bytes=None)
        n = len(columns[serving.HISTORY_INPUT])
    else:
        if "signature_name" in body:
            raise rest.RequestError("\"signature_name\" names the user tower's signature; a "
                                    "request with user vectors does not run it")
        vectors = _vectors(body[given[0]], given[0], dim, limits.max_instances)
        n = vectors.shape[0]
    exclude = _exclusions(body.get("exclude", "history" if features else None), n, features)
    return RetrieveRequest(columns, vectors, k, exclude)


def parse_predict_request(body: str | bytes | Mapping, specs: Mapping,
                          limits: Limits = Limits()) -> tuple[dict, str]:
    """A ``:predict`` body -> ``(tensors, "row" | "columnar")``: :func:`export.rest.parse_request`
    with the limits (a body over ``limits.max_bytes`` raises :class:`TooLarge`)."""
    body = _load_json(body, specs, limits.max_bytes)
    return rest.parse_request(body, specs, max_instances=limits.max_instances, max_bytes=None)


# ----------------------------------------------------------------------------- metrics
class Metrics:
    """The service's Prometheus metrics, in a registry of its own (no process-global state).

    ``micrec_requests_total{endpoint, code}`` (counter), ``micrec_request_latency_seconds
    {endpoint}`` (histogram, :data:`LATENCY_BUCKETS`), ``micrec_batch_size`` (instances per user
    tower call, :data:`BATCH_BUCKETS`), ``micrec_in_flight_requests``, ``micrec_ready`` (1 once
    warmed up), ``micrec_serving_version`` (the version answering, 0 before), and
    ``micrec_model_info{model, version}`` = 1.
    """

    def __init__(self, model_name: str):
        import prometheus_client as prom

        self.registry = prom.CollectorRegistry(auto_describe=True)
        self.model_name = model_name
        self.requests = prom.Counter("micrec_requests", "HTTP requests answered, by endpoint "
                                     "and status code", ["endpoint", "code"],
                                     registry=self.registry)
        self.latency = prom.Histogram("micrec_request_latency_seconds", "Time from request to "
                                      "response, by endpoint", ["endpoint"],
                                      buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_size = prom.Histogram("micrec_batch_size", "Users per user-tower call",
                                         buckets=BATCH_BUCKETS, registry=self.registry)
        self.in_flight = prom.Gauge("micrec_in_flight_requests", "Requests being answered",
                                    registry=self.registry)
        self.ready = prom.Gauge("micrec_ready", "1 once a version is loaded and warmed up",
                                registry=self.registry)
        self.version = prom.Gauge("micrec_serving_version", "The export version answering",
                                  registry=self.registry)

    def watch(self, batchers: Mapping) -> None:
        """Also exposes each micro-batcher's ``stats()`` by ``stage`` (its name):
        ``micrec_queue_depth`` (requests waiting now), ``micrec_queue_depth_max``,
        ``micrec_rejected_total`` (503s: a full queue or, with
        ``export.serve_max_queue_delay_ms``, a queue too slow), ``micrec_rejected_delay_total``
        (those refused for the queue delay) and ``micrec_stage_batch_size`` (users per batch,
        the batcher's own histogram)."""
        if batchers:
            self.registry.register(_BatcherCollector(dict(batchers)))

    def watch_admission(self, admission) -> None:
        """With the in-flight cap on (``export.serve_max_in_flight`` > 0; nothing added at 0):
        ``micrec_rejected_in_flight_total`` (503s sent at arrival by the cap, never in
        ``micrec_rejected_total{stage}``, which counts the batchers' own),
        ``micrec_admitted_in_flight`` (admitted model requests not yet answered) and
        ``micrec_admitted_in_flight_max`` (its high-water mark, <= the cap), read from
        :meth:`export.admission.InFlightLimit.stats`."""
        if admission.max_in_flight > 0:
            self.registry.register(_AdmissionCollector(admission))

    def render(self, versions) -> tuple[bytes, str]:
        import prometheus_client as prom

        status = versions.status()
        self.ready.set(1 if versions.ready else 0)
        self.version.set(status.get("version") or 0)
        return prom.generate_latest(self.registry), prom.CONTENT_TYPE_LATEST


class _AdmissionCollector:
    """A Prometheus collector reading :meth:`export.admission.InFlightLimit.stats` at scrape
    time."""

    def __init__(self, admission):
        self.admission = admission

    def describe(self):
        return []

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        st = self.admission.stats()
        yield CounterMetricFamily("micrec_rejected_in_flight", "Model requests refused with 503 "
                                  "at arrival: export.serve_max_in_flight admitted requests were "
                                  "unanswered", value=st["rejected"])
        yield GaugeMetricFamily("micrec_admitted_in_flight", "Admitted model requests not yet "
                                "answered", value=st["in_flight"])
        yield GaugeMetricFamily("micrec_admitted_in_flight_max", "Most admitted model requests "
                                "ever unanswered at once", value=st["max_seen"])


class _BatcherCollector:
    """A Prometheus collector reading :meth:`export.batcher.MicroBatcher.stats` at scrape time."""

    def __init__(self, batchers: dict):
        self.batchers = batchers

    def describe(self):
        return []

    def collect(self):
        from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                            HistogramMetricFamily)

        depth = GaugeMetricFamily("micrec_queue_depth", "Requests waiting in a micro-batcher",
                                  labels=["stage"])
        high = GaugeMetricFamily("micrec_queue_depth_max", "Most requests ever waiting",
                                 labels=["stage"])
        rejected = CounterMetricFamily("micrec_rejected", "Requests refused with 503 because "
                                       "the queue was full or too slow", labels=["stage"])
        rejected_delay = CounterMetricFamily(
            "micrec_rejected_delay", "Requests refused with 503 because the oldest queued one "
            "had waited past export.serve_max_queue_delay_ms", labels=["stage"])
        expired = CounterMetricFamily("micrec_expired", "Requests dropped from the queue at "
                                      "their deadline (504), never run", labels=["stage"])
        cancelled = CounterMetricFamily("micrec_cancelled", "Requests dropped from the queue "
                                        "because their caller went away, never run",
                                        labels=["stage"])
        sizes = HistogramMetricFamily("micrec_stage_batch_size", "Users per micro-batch",
                                      labels=["stage"])
        for stage, batcher in self.batchers.items():
            st = batcher.stats()
            depth.add_metric([stage], st["queue_depth"])
            high.add_metric([stage], st["max_queue_depth"])
            rejected.add_metric([stage], st["rejected"])
            rejected_delay.add_metric([stage], st.get("rejected_delay", 0))
            expired.add_metric([stage], st.get("expired", 0))
            cancelled.add_metric([stage], st["cancelled"])
            sizes.add_metric([stage], [(le if le == "+Inf" else str(float(le)), count)
                                       for le, count in st["batch_size_buckets"]],
                             st["batch_size_sum"])
        yield from (depth, high, rejected, rejected_delay, expired, cancelled, sizes)


# ----------------------------------------------------------------------------- the app
_MODEL_PATH = re.compile(r"/v1/models/([^/:]+)(?:/versions/([^/:]+))?(?::([A-Za-z_]+))?"
                         r"(/metadata)?")


def signature_metadata(version_dir: str) -> dict:
    """TF Serving's ``metadata.signature_def`` of a version's user tower: ``{"signature_def":
    {<signature name>: SignatureDef as proto JSON (``inputs`` / ``outputs``: ``{name: {"dtype":
    "DT_STRING", "tensor_shape": {"dim": [{"size": "-1", "name": ""}, ...], "unknown_rank":
    false}, "name": "serving_default_gender:0"}}``, ``method_name``)}}``, read from
    ``user_tower/saved_model.pb`` (the meta graph tagged ``serve``), as TF Serving reads it."""
    from google.protobuf import json_format
    from tensorflow.core.protobuf import saved_model_pb2

    sm = saved_model_pb2.SavedModel()
    with open(os.path.join(version_dir, "user_tower", "saved_model.pb"), "rb") as fh:
        sm.ParseFromString(fh.read())
    graphs = [g for g in sm.meta_graphs if "serve" in g.meta_info_def.tags] or list(sm.meta_graphs)
    return {"signature_def": {
        name: json_format.MessageToDict(sig, preserving_proto_field_name=True,
                                        always_print_fields_with_no_presence=True)
        for name, sig in sorted(graphs[0].signature_def.items())}}


def endpoint_of(path: str) -> str:
    """The ``endpoint`` label of a request path (a bounded set, whatever the path)."""
    if path in ("/healthz", "/readyz", "/metrics"):
        return path[1:]
    m = _MODEL_PATH.fullmatch(path)
    if m:
        if m.group(4):
            return "metadata" if m.group(3) is None else "other"
        return m.group(3) if m.group(3) in ("predict", "retrieve") else (
            "status" if m.group(3) is None else "other")
    return "other"


class Service:
    """The ASGI app (:attr:`app`) around an :class:`export.versions.VersionManager`.

    Args:
        versions: the :class:`~export.versions.VersionManager` (or an object with its ``start``,
            ``ready``, ``acquire``, ``status``, ``stop``); the app's start-up starts it in a
            background thread (so ``/healthz`` answers while it loads), its shutdown stops it.
        model_name: str, the ``<name>`` of the URLs.
        limits: :class:`Limits`.
        log: ``(str) -> None`` for one-line messages.
        on_fatal: called with the message when no version can be loaded at start-up (the CLI
            stops the server and exits 2).
        batching: :class:`Batching`, or ``None``: every request runs its own tower call and
            search in a worker thread.
        max_in_flight: int >= 0, admission at arrival (:class:`export.admission.InFlightLimit`):
            a ``POST :predict`` / ``:retrieve`` arriving while this many are admitted and not yet
            answered gets 503 + ``Retry-After`` at once, before its body is read (health,
            readiness, metrics, status and metadata never); 0 (this class's default): off, the
            behaviour before the rule. The CLI passes ``export.serve_max_in_flight`` (256).

    With batching, requests of the same version are concatenated into one tower call (histories
    padded with ``""``, which the tower ignores) and one search per ``k`` (each user keeps its own
    exclusions; ScaNN is asked for ``k`` + the batch's largest exclusion count, so an approximate
    answer may differ slightly from the same request searched alone; brute force is exact either
    way). A full queue, or one whose oldest request waited past ``max_wait_ms +
    max_queue_delay_ms``, is 503 with ``Retry-After`` (:class:`export.batcher.Overloaded`).
    """

    def __init__(self, versions, model_name: str = "user_tower", limits: Limits = Limits(),
                 log: Callable[[str], None] = print,
                 on_fatal: Callable[[str], None] | None = None,
                 batching: Batching | None = None, max_in_flight: int = 0):
        from starlette.applications import Starlette
        from starlette.routing import Route

        if not isinstance(model_name, str) or not model_name or "/" in model_name \
                or ":" in model_name:
            raise ValueError(f"model_name must be a non-empty name without '/' or ':'. "
                             f"Received: model_name={model_name!r}")
        self.versions, self.model_name, self.limits = versions, model_name, limits
        self._log, self._on_fatal = log, on_fatal
        self.metrics = Metrics(model_name)
        self.load_error: str | None = None
        self.batchers: dict = {}
        self.request_timeout_s = batching.request_timeout_s if batching is not None else 0.0
        self.drop_disconnected = batching is not None and batching.drop_disconnected
        if batching is not None:
            self.batchers = {
                "user_tower": MicroBatcher(self._tower_batch, batching.max_batch_size,
                                           batching.max_wait_ms, batching.max_queue,
                                           name="user_tower", rows=lambda item: item[1],
                                           max_queue_delay_ms=batching.max_queue_delay_ms),
                "search": MicroBatcher(self._search_batch, batching.max_batch_size,
                                       batching.max_wait_ms, batching.max_queue, name="search",
                                       rows=lambda item: item[1],
                                       max_queue_delay_ms=batching.max_queue_delay_ms)}
        self.metrics.watch(self.batchers)
        routes = [Route("/healthz", self._healthz), Route("/readyz", self._readyz),
                  Route("/metrics", self._metrics),
                  Route("/v1/models/{rest:path}", self._model, methods=["GET", "POST"])]
        self._starlette = Starlette(routes=routes, lifespan=self._lifespan,
                                    exception_handlers={404: _http_error, 405: _http_error})
        self.admission = InFlightLimit(self._starlette, max_in_flight, model_call)
        self.metrics.watch_admission(self.admission)

    # ------------------------------------------------------------------ ASGI + lifespan
    async def app(self, scope, receive, send):
        """The ASGI entry: the Starlette app, with every HTTP request counted and timed."""
        if scope["type"] != "http":
            return await self._starlette(scope, receive, send)
        endpoint = endpoint_of(scope.get("path", ""))
        code = [500]
        start = time.perf_counter()

        async def send_counted(message):
            if message["type"] == "http.response.start":
                code[0] = message["status"]
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.admission(scope, receive, send_counted)
        finally:
            self.metrics.in_flight.dec()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)
            self.metrics.requests.labels(endpoint, str(code[0])).inc()

    @contextlib.asynccontextmanager
    async def _lifespan(self, _app):
        thread = threading.Thread(target=self._start_versions, name="version-start", daemon=True)
        thread.start()
        for batcher in self.batchers.values():
            batcher.start()
        try:
            yield
        finally:
            for batcher in self.batchers.values():
                await batcher.close()
            await asyncio.to_thread(self.versions.stop)

    def _start_versions(self) -> None:
        try:
            self.versions.start()
        except Exception as err:  # noqa: BLE001 - reported, and the server stops
            what = str(err) if isinstance(err, NoLoadableVersionError) else \
                f"{type(err).__name__}: {err}"
            self.load_error = " ".join(what.split())
            if self._on_fatal is not None:
                self._on_fatal(self.load_error)
            else:
                self._log(f"[server] no version could be loaded: {self.load_error}")

    # ------------------------------------------------------------------ plain endpoints
    async def _healthz(self, request):
        from starlette.responses import JSONResponse

        return JSONResponse({"status": "ok"})

    async def _readyz(self, request):
        from starlette.responses import JSONResponse

        if self.versions.ready:
            return JSONResponse({"status": "ready", "version": self.versions.status()["version"]})
        return _error(503, self._not_ready(), retry=True)

    def _not_ready(self) -> str:
        return "not ready: " + (self.load_error or "loading and warming up the export version")

    def _check_ready(self) -> None:
        if not self.versions.ready:
            raise Unavailable(self._not_ready())

    @contextlib.contextmanager
    def _serving(self, version: str | None):
        """The version serving, held until the block ends (a swap meanwhile does not release
        it); NotFound when ``version`` names another, Unavailable when shutting down."""
        with contextlib.ExitStack() as stack:
            try:
                v = stack.enter_context(self.versions.acquire())
            except RuntimeError as err:  # stopped meanwhile (shutting down)
                raise Unavailable(f"not serving: {err}") from None
            if version is not None and int(version) != v.version:
                raise NotFound(f"Servable not found for request: Specific({self.model_name}, "
                               f"{version}); this service serves version {v.version}")
            yield v

    async def _metrics(self, request):
        from starlette.responses import Response

        body, content_type = self.metrics.render(self.versions)
        return Response(body, media_type=content_type)

    # ------------------------------------------------------------------ /v1/models/...
    async def _model(self, request):
        path = request.url.path
        m = _MODEL_PATH.fullmatch(path)
        try:
            if m is None:
                raise NotFound(f"unknown path {path[:200]!r}")
            name, version, verb, metadata = m.groups()
            if name != self.model_name:
                raise NotFound(f"Servable not found for request: Latest({name[:100]}); this "
                               f"service serves model {self.model_name!r}")
            if version is not None and not version.isdigit():
                raise NotFound(f"invalid version {version[:40]!r} in the URL")
            if metadata and (verb is not None or request.method != "GET"):
                raise NotFound("/metadata takes GET and no verb")
            if request.method == "GET":
                if verb is not None:
                    raise NotFound(f"GET takes no verb (got :{verb})")
                if metadata:
                    return await self._metadata(version)
                return self._status(version)
            if verb not in ("predict", "retrieve"):
                raise NotFound(f"unknown verb :{verb} (this service has :predict and :retrieve)"
                               if verb else "POST needs a verb, e.g. /v1/models/"
                               f"{self.model_name}:predict")
            deadline = (time.monotonic() + self.request_timeout_s
                        if self.request_timeout_s > 0 else None)
            self._check_ready()
            body = await _read_body(request, self.limits.max_bytes)
            with self._serving(version) as v:
                work = (self._predict(v, body, deadline) if verb == "predict"
                        else self._retrieve(v, body, deadline))
                if self.drop_disconnected:
                    return await _unless_disconnected(work, request.receive)
                return await work
        except Unavailable as err:
            return _error(503, str(err), retry=True)
        except NotFound as err:
            return _error(404, str(err))
        except TooLarge as err:
            return _error(413, str(err))
        except rest.RequestError as err:
            return _error(400, " ".join(str(err).split()))
        except Overloaded as err:
            return _error(503, str(err), retry=err.retry_after_header())
        except Closed as err:  # shutting down
            return _error(503, str(err), retry=True)
        except ClientGone as err:  # nobody reads this answer; 499 is what the metrics count
            return _error(499, str(err))
        except DeadlineExceeded as err:  # queued past export.serve_request_timeout_s, not run
            return _error(504, f"{err} (export.serve_request_timeout_s="
                          f"{self.request_timeout_s:g})")
        except Exception as err:  # noqa: BLE001 - a bug: logged with its traceback, 500
            self._log(f"[server] internal error on {path[:200]}: "
                      + "".join(traceback.format_exception(err)))
            return _error(500, f"internal error: {type(err).__name__}")

    def _status(self, version: str | None):
        from starlette.responses import JSONResponse

        status = self.versions.status()
        entries = []
        current = status.get("version")
        if current is not None and (version is None or int(version) == current):
            entries.append({"version": str(current), "state": status.get("state", "AVAILABLE"),
                            "status": {"error_code": "OK", "error_message": ""}})
        for v, reason in sorted((status.get("refused") or {}).items(), reverse=True):
            if version is None or int(version) == int(v):
                entries.append({"version": str(v), "state": "END",
                                "status": {"error_code": "UNKNOWN",
                                           "error_message": str(reason)}})
        if current is None and version is None and not entries:
            entries.append({"version": "0", "state": status.get("state", "START"),
                            "status": {"error_code": "UNAVAILABLE" if self.load_error else "OK",
                                       "error_message": self.load_error or ""}})
        if not entries:
            raise NotFound(f"Could not find version {version} of model {self.model_name}")
        return JSONResponse({"model_version_status": entries})

    async def _metadata(self, version: str | None):
        """TF Serving's GetModelMetadata answer: ``{"model_spec": {"name", "signature_name": "",
        "version"}, "metadata": {"signature_def": ...}}`` (:func:`signature_metadata`) of the
        version serving (404 for another version, 503 before the first one is ready)."""
        from starlette.responses import JSONResponse

        self._check_ready()
        with self._serving(version) as v:
            sigs = await asyncio.to_thread(signature_metadata, v.path)
            return JSONResponse({"model_spec": {"name": self.model_name, "signature_name": "",
                                                "version": str(v.version)},
                                 "metadata": {"signature_def": sigs}})

    async def _predict(self, v: LoadedVersion, body: bytes, deadline: float | None = None):
        from starlette.responses import JSONResponse

        tensors, fmt = await asyncio.to_thread(parse_predict_request, body, v.specs, self.limits)
        outputs = await self._tower(v, tensors, deadline)
        return JSONResponse(rest.format_response(outputs, fmt))

    async def _retrieve(self, v: LoadedVersion, body: bytes, deadline: float | None = None):
        from starlette.responses import JSONResponse

        dim = int(v.retriever.vectors.shape[1])
        req = await asyncio.to_thread(parse_retrieve_request, body, v.specs, dim,
                                      v.retriever.top_k, self.limits)
        vectors = req.vectors
        if vectors is None:
            vectors = (await self._tower(v, req.columns, deadline))[serving.OUTPUT_NAME]
        ids, scores = await self._search(v, vectors, req, deadline)
        out_ids, out_scores = [], []
        for row_ids, row_scores in zip(ids, scores):
            keep = [i for i, item in enumerate(row_ids) if item != ""]
            out_ids.append([row_ids[i] for i in keep])
            out_scores.append([float(row_scores[i]) for i in keep])
        return JSONResponse({"model_version": str(v.version), "ids": out_ids,
                             "scores": out_scores})

    # ------------------------------------------------------------------ tower and search
    async def _tower(self, v: LoadedVersion, tensors: dict, deadline: float | None = None) -> dict:
        """The signature's outputs ``{name: ndarray [B, ...]}`` for one request's tensors: through
        the tower batcher (dropped if still queued at ``deadline``), or alone in a worker
        thread."""
        n = len(tensors[serving.HISTORY_INPUT])
        if "user_tower" in self.batchers:
            return await self.batchers["user_tower"].submit((v, n, tensors), deadline=deadline)
        return await asyncio.to_thread(self._tower_outputs, v, tensors)

    async def _search(self, v: LoadedVersion, vectors: np.ndarray, req: RetrieveRequest,
                      deadline: float | None = None):
        """``(ids [B, k], scores [B, k])`` of :meth:`micrec_tf.retrieval.Retriever.search`."""
        exclude = req.exclude
        if exclude == "history":
            exclude = [[h for h in row if h] for row in req.columns[serving.HISTORY_INPUT]]
        if "search" in self.batchers:
            return await self.batchers["search"].submit((v, len(vectors), vectors, req.k, exclude),
                                                        deadline=deadline)
        return await asyncio.to_thread(v.retriever.search, vectors, req.k, exclude)

    def _tower_outputs(self, v: LoadedVersion, tensors: dict) -> dict:
        """One tower call (blocking) on ``tensors``; counted in ``micrec_batch_size``."""
        import tensorflow as tf

        self.metrics.batch_size.observe(len(tensors[serving.HISTORY_INPUT]))
        feed = {k: tf.constant(a, tf.string) if a.size else tf.zeros(a.shape, tf.string)
                for k, a in tensors.items()}
        return {k: t.numpy() for k, t in v.user_tower(**feed).items()}

    def _tower_batch(self, items: list) -> list:
        """The tower batcher's ``fn``: items ``(version, users, tensors)``; one tower call per run
        of items of the same version, rank-2 inputs padded with ``""`` to the widest."""
        out = []
        for v, group in _runs(items, key=lambda item: item[0]):
            sizes = [item[1] for item in group]
            outputs = self._tower_outputs(v, _concat([item[2] for item in group]))
            starts = np.cumsum([0] + sizes)
            out.extend({k: a[s:e] for k, a in outputs.items()}
                       for s, e in zip(starts[:-1], starts[1:]))
        return out

    def _search_batch(self, items: list) -> list:
        """The search batcher's ``fn``: items ``(version, users, vectors, k, exclude)``; one
        search per run of items with the same version and ``k``."""
        out = []
        for (v, k), group in _runs(items, key=lambda item: (item[0], item[3])):
            vectors = np.concatenate([item[2] for item in group])
            exclude = None
            if any(item[4] is not None for item in group):
                exclude = [row for item in group
                           for row in (item[4] if item[4] is not None else [[]] * item[1])]
            ids, scores = v.retriever.search(vectors, k, exclude)
            start = 0
            for item in group:
                out.append((ids[start:start + item[1]], scores[start:start + item[1]]))
                start += item[1]
        return out


def _runs(items: list, key) -> list:
    """``[(key, [items])]``: consecutive items with the same key (``is`` for versions) grouped."""
    groups: list = []
    for item in items:
        k = key(item)
        if groups and _same(groups[-1][0], k):
            groups[-1][1].append(item)
        else:
            groups.append((k, [item]))
    return groups


def _same(a, b) -> bool:
    if isinstance(a, tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a is b if isinstance(a, LoadedVersion) else a == b


def _concat(parts: list) -> dict:
    """Requests' tensors ``{input: object array}`` -> one batch; rank-2 inputs padded with ``b""``
    at the end of each row to the widest request."""
    out = {}
    for name in parts[0]:
        arrays = [p[name] for p in parts]
        if arrays[0].ndim == 2:
            width = max(a.shape[1] for a in arrays)
            padded = []
            for a in arrays:
                b = np.full((a.shape[0], width), b"", dtype=object)
                b[:, :a.shape[1]] = a
                padded.append(b)
            arrays = padded
        out[name] = np.concatenate(arrays)
    return out


async def _unless_disconnected(work, receive):
    """Awaits the coroutine ``work`` unless the client disconnects first (the ASGI ``receive``
    gives ``http.disconnect``: after the body, uvicorn answers ``receive()`` only when the
    connection is lost or the response is complete); then ``work`` is cancelled (a request still
    queued in a micro-batcher is taken out, never run) and :class:`ClientGone` raised."""
    task = asyncio.ensure_future(work)

    async def disconnected():
        while (await receive())["type"] != "http.disconnect":
            pass

    watch = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait((task, watch), return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watch.cancel()
    if task.done():
        return task.result()
    if not watch.cancelled() and watch.exception() is not None:   # receive() failed: keep going
        return await task
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):  # nobody to tell
        await task
    raise ClientGone("client closed the connection before the answer")


def _error(code: int, message: str, retry: bool | str = False):
    from starlette.responses import JSONResponse

    headers = {"Retry-After": retry if isinstance(retry, str) else "1"} if retry else None
    return JSONResponse({"error": message}, status_code=code, headers=headers)


async def _http_error(request, exc):
    """Starlette's own 404 (no route) and 405 (wrong method) as ``{"error": ...}`` too."""
    response = _error(exc.status_code, f"{exc.detail}: {request.method} {request.url.path[:200]}")
    for name, value in (getattr(exc, "headers", None) or {}).items():
        response.headers[name] = value
    return response


async def _read_body(request, limit: int) -> bytes:
    """The body, refused (:class:`TooLarge`) as soon as it passes ``limit`` bytes, whether the
    ``Content-Length`` says so or the stream does."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise TooLarge(f"request body is {int(length)} bytes, over the limit of {limit} bytes "
                       "per request; send fewer instances per request")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise TooLarge(f"request body is over the limit of {limit} bytes per request; send "
                           "fewer instances per request")
        chunks.append(chunk)
    return b"".join(chunks)


# ----------------------------------------------------------------------------- CLI
def _parser():
    parser = cli.parser(__doc__)
    parser.add_argument("--host", default=None,
                        help="address to listen on (default export.serve_host, 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None,
                        help="port (default export.serve_port, 8080; 0: any free port)")
    parser.add_argument("--export-dir", default=None,
                        help="export root to serve (default exports/<name> of the config)")
    return parser


def main(argv=None) -> int:
    import uvicorn

    args = _parser().parse_args(argv)
    cfg = cli.load(args)
    port = cfg.export.serve_port if args.port is None else args.port
    if not 0 <= port <= 65535:
        raise cli.UsageError(f"--port must be in 0..65535. Received: {port}")
    export_dir = args.export_dir or cfg.export_dir
    if not os.path.isdir(export_dir):
        raise FileNotFoundError(f"export root {export_dir!r} not found: run `make export` first")

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    failed: list = []
    server_box: list = []

    def fatal(message: str) -> None:
        failed.append(message)
        if server_box:
            server_box[0].should_exit = True

    versions = VersionManager(export_dir, poll_s=cfg.export.serve_poll_s, log=log)
    service = Service(versions, cfg.export.serve_model_name,
                      Limits.from_config(cfg.export), log=log, on_fatal=fatal,
                      batching=Batching.from_config(cfg.export),
                      max_in_flight=cfg.export.serve_max_in_flight)
    config = uvicorn.Config(service.app, host=args.host or cfg.export.serve_host, port=port,
                            interface="asgi3", lifespan="on", access_log=False,
                            log_level="warning",
                            timeout_graceful_shutdown=cfg.export.serve_shutdown_timeout_s)
    server = uvicorn.Server(config)
    server_box.append(server)
    if failed:
        server.should_exit = True
    log(f"[server] {export_dir}: model {cfg.export.serve_model_name!r} on "
        f"http://{config.host}:{port} (ready once the version is loaded and warmed up)")
    # uvicorn re-raises a SIGTERM it handled once it has shut down gracefully (with the handler
    # that was there before it): make that one a no-op, so a graceful stop exits 0.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    server.run()
    if failed:
        print(f"error: {failed[0]}", file=sys.stderr)
        return cli.EXIT_USAGE
    log("[server] stopped")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))

"""``/readyz`` is 200 only after the version is loaded AND warmed up (issue 30, "What to build").

Fast (no TensorFlow, no server process): a real :class:`export.versions.VersionManager` over a
hand-made tree (tests/test_versions.py's fake load: one ``value.txt`` per version) whose warm-up
is held on an event, and the server's ASGI app (:class:`export.server.Service`, no batching)
called directly with hand-built HTTP scopes. While the warm-up is held: ``/readyz`` 503 with
``Retry-After`` and a one-line reason, ``/healthz`` 200, ``:predict`` 503 with ``Retry-After``
(its body never parsed), the model status 200 with state ``LOADING`` and version ``"0"``
(TF Serving's GetModelStatus shape). After the warm-up returns: ``/readyz`` 200
naming the version the test published. The reference is the test's own event: which side of
the warm-up each request is on never depends on timing (``_wait_for`` is a hang guard only).
"""
from __future__ import annotations

import asyncio
import json
import threading

from export.server import Service
from test_versions import _manager, _publish_fake, _wait_for, root  # noqa: F401 (fixture)


def _call(app, method: str, path: str, body: bytes = b"") -> tuple:
    """One HTTP request through the ASGI ``app``: ``(status, headers, body)``."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": method, "scheme": "http", "path": path, "raw_path": path.encode(),
             "query_string": b"", "root_path": "", "server": ("127.0.0.1", 8501),
             "client": ("127.0.0.1", 40000),
             "headers": [(b"host", b"127.0.0.1"), (b"content-type", b"application/json"),
                         (b"content-length", str(len(body)).encode())]}
    messages = [{"type": "http.request", "body": body, "more_body": False}]
    sent: list = []

    async def receive():
        if messages:
            return messages.pop(0)
        await asyncio.Event().wait()   # no disconnect: the request is answered first

    async def send(message):
        sent.append(message)

    asyncio.run(asyncio.wait_for(app(scope, receive, send), 60))
    start = sent[0]
    headers = {k.decode().lower(): v.decode() for k, v in start["headers"]}
    return start["status"], headers, b"".join(m.get("body", b"") for m in sent[1:])


def test_readyz_turns_200_only_after_the_warm_up(root):  # noqa: F811 (the fixture)
    _publish_fake(root, 7)
    warming, release = threading.Event(), threading.Event()

    def warm(v):
        warming.set()
        assert release.wait(120)

    manager = _manager(root, warmup_fn=warm, poll_s=3600)
    service = Service(manager, log=lambda msg: None)
    # what the app's start-up does: start the manager in a background thread
    starter = threading.Thread(target=manager.start, daemon=True)
    starter.start()
    try:
        _wait_for(warming.is_set, "the warm-up to start")
        status, headers, body = _call(service.app, "GET", "/readyz")
        assert status == 503 and "retry-after" in headers
        error = json.loads(body)["error"]
        assert error.startswith("not ready") and "\n" not in error
        assert _call(service.app, "GET", "/healthz")[:1] == (200,)
        status, headers, body = _call(service.app, "POST", "/v1/models/user_tower:predict",
                                      b"not even json")
        assert status == 503 and "retry-after" in headers and json.loads(body)["error"]
        # the model status answers as TF Serving's does while a version loads
        status, _, body = _call(service.app, "GET", "/v1/models/user_tower")
        assert status == 200 and json.loads(body) == {"model_version_status": [
            {"version": "0", "state": "LOADING", "status": {"error_code": "OK",
                                                            "error_message": ""}}]}
        release.set()
        _wait_for(lambda: manager.ready, "the version to be served")
        status, _, body = _call(service.app, "GET", "/readyz")
        assert status == 200 and json.loads(body) == {"status": "ready", "version": 7}
    finally:
        release.set()
        starter.join(60)
        manager.stop()

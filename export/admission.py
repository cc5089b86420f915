"""Admission at arrival: a cap on the model requests in flight in the service (issue 30).

:class:`InFlightLimit` is an ASGI middleware. A request it applies to (the service passes
``POST`` ``:predict`` / ``:retrieve``) is **admitted** when it arrives, before its body is read,
if fewer than ``max_in_flight`` admitted requests are still unanswered; it then counts until its
app call returns (the answer sent, an error, a cancellation or a client that went away: always,
in a ``finally``). Otherwise it is answered at once, without reading the body, with 503,
``Retry-After`` and the one-line JSON ``{"error": "..."}``, and counted in
:attr:`InFlightLimit.rejected` (``micrec_rejected_in_flight_total`` on ``/metrics``). Requests it
does not apply to (``/healthz``, ``/readyz``, ``/metrics``, model status and metadata) are never
refused and never counted. ``max_in_flight = 0``: off, every request goes straight to the app,
the behaviour before this rule, bit for bit.

Why a cap on requests in flight rather than an event-loop lag rule (a task that sleeps a fixed
interval and refuses while it wakes late): under overload the wait moved out of the batcher
queues into the one event loop (docs/SERVING.md, "queue-delay admission": 1,089-1,250 requests
in the app, at most 176 + 139 in the queues). Every one of those requests was admitted by the
app; a cap on them bounds the whole backlog the loop carries, wherever it waits (body read, JSON
parsing, the two stages, the continuations, the response), so an admitted request waits at most
about ``max_in_flight / S`` at a drain rate S. It is deterministic (a count, no timer, no
threshold on a noisy lag that must be held "for an interval"), costs one comparison per request,
and its refusal needs no event-loop time beyond writing 503. It counts requests, not
connections: uvicorn's own ``--limit-concurrency`` counts idle keep-alive connections too, so
with many keep-alive clients it would refuse nearly everything. A lag rule would also react to a
loop slowed by things other than requests (a GC pause, a swap loading) and needs a timing
target; it stays possible as a second rule.
"""
from __future__ import annotations

import json
from typing import Awaitable, Callable

# Retry-After of a refused request, whole seconds: the backlog the cap allows drains in about
# max_in_flight / S (about 1 s at the default 256 and the measured S ~ 240-330 req/s), and it
# frees a place with every answer, so a client retrying after 1 s is likely to find one.
DEFAULT_RETRY_AFTER_S = 1


class InFlightLimit:
    """ASGI middleware: at most ``max_in_flight`` admitted requests unanswered (module docstring).

    Args:
        app: the ASGI3 app ``(scope, receive, send)`` behind it.
        max_in_flight: int >= 0, admitted requests answered at the same time at most
            (``export.serve_max_in_flight``); 0: off (every request passes, nothing counted),
            the behaviour before this rule.
        applies: ``(scope) -> bool``, which HTTP requests the cap is for (the others always
            pass, uncounted).
        retry_after_s: int >= 1, the ``Retry-After`` header of a refusal.

    Attributes (plain numbers for ``/metrics``; one event loop, so no lock): ``in_flight``
    (admitted, not yet answered), ``max_seen`` (its high-water mark, <= ``max_in_flight``),
    ``admitted``, ``rejected`` (503s sent by this rule).
    """

    def __init__(self, app: Callable[..., Awaitable[None]], max_in_flight: int,
                 applies: Callable[[dict], bool], retry_after_s: int = DEFAULT_RETRY_AFTER_S):
        if isinstance(max_in_flight, bool) or not isinstance(max_in_flight, int) \
                or max_in_flight < 0:
            raise ValueError("max_in_flight must be an int >= 0 (0: off). Received: "
                             f"max_in_flight={max_in_flight!r}")
        if isinstance(retry_after_s, bool) or not isinstance(retry_after_s, int) \
                or retry_after_s < 1:
            raise ValueError("retry_after_s must be an int >= 1. Received: "
                             f"retry_after_s={retry_after_s!r}")
        if not callable(app) or not callable(applies):
            raise ValueError(f"app and applies must be callables. Received: app={app!r}, "
                             f"applies={applies!r}")
        self.app, self.applies = app, applies
        self.max_in_flight, self.retry_after_s = max_in_flight, retry_after_s
        self.in_flight = self.max_seen = self.admitted = self.rejected = 0

    def stats(self) -> dict:
        return {"max_in_flight": self.max_in_flight, "in_flight": self.in_flight,
                "max_seen": self.max_seen, "admitted": self.admitted, "rejected": self.rejected}

    def message(self) -> str:
        return (f"service overloaded: {self.in_flight} requests in flight, at its limit "
                f"(export.serve_max_in_flight={self.max_in_flight}); retry after "
                f"{self.retry_after_s} s")

    async def __call__(self, scope, receive, send):
        if self.max_in_flight == 0 or scope.get("type") != "http" or not self.applies(scope):
            return await self.app(scope, receive, send)
        if self.in_flight >= self.max_in_flight:
            self.rejected += 1
            await self._refuse(send)
            return
        self.in_flight += 1
        self.admitted += 1
        self.max_seen = max(self.max_seen, self.in_flight)
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1

    async def _refuse(self, send) -> None:
        """503 + ``Retry-After`` + ``{"error": ...}``; the body is never read."""
        body = json.dumps({"error": self.message()}).encode("utf-8")
        await send({"type": "http.response.start", "status": 503,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode("ascii")),
                                (b"retry-after", str(self.retry_after_s).encode("ascii"))]})
        await send({"type": "http.response.body", "body": body})


def model_call(scope: dict) -> bool:
    """The requests the service caps: ``POST`` to a path ending in ``:predict`` or ``:retrieve``
    (``/v1/models/<name>[/versions/<v>]:<verb>``); health, readiness, metrics, status and
    metadata never are."""
    path = scope.get("path", "")
    return scope.get("method") == "POST" and (path.endswith(":predict")
                                              or path.endswith(":retrieve"))

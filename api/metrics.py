"""`GET /metrics` in Prometheus's text format, and the HTTP latency histogram behind it.

    install(app, inst, dispatcher)   # in create_app

Requests are timed by `HttpMetrics`, an ASGI middleware, labelled by the route's template
(`/v1/streams/{stream}`, never the raw path, so the series stay few), method and status.
With `strata api --workers N` each server process counts its own requests in prometheus_client's
multiprocess directory and `/metrics`, whichever process answers it, adds them up
(`services.metrics.exposition`). Jobs by kind and state and the broker's queue depths are read
when Prometheus scrapes (`services.metrics.StateCollector`).

`STRATA_METRICS_TOKEN` set: `/metrics` wants `Authorization: Bearer <that token>` (a plain
secret of its own, so a Prometheus config holds no API token); unset: it is open, like /health.
"""

from __future__ import annotations

import hmac
import time

import anyio.to_thread
from fastapi import FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, Histogram
from starlette.routing import Mount
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api import errors
from registry.instance import Instance
from services.dispatch import Dispatcher
from services.metrics import StateCollector, exposition, metrics_registry

PATH = "/metrics"
UNMATCHED = "<unmatched>"  # no route: 404s, and bodies refused before routing (413)
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

REQUEST_SECONDS = Histogram(
    "strata_http_request_duration_seconds",
    "Time from a request's arrival to its response's last byte, by route template",
    ["method", "route", "status"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)


def route_template(scope: Scope, *, root_path: str = "") -> str:
    """The template of the route that served `scope` (set by routing), or UNMATCHED;
    `root_path`: the scope's before routing (a mount adds its path to it).

    A route of an included router may carry only its own part of the template (FastAPI 0.165:
    `/streams/{stream}` under `/v1`): the prefix is then the request path's leading segments,
    those the route's own part does not cover."""
    route = scope.get("route")
    if isinstance(route, Mount):
        return f"{route.path}/{{path}}"
    template = getattr(route, "path", None)
    if not isinstance(template, str):
        mounted = str(scope.get("root_path", ""))[len(root_path) :]
        return f"{mounted}/{{path}}" if mounted else UNMATCHED
    if ":path}" in template:  # a parameter that spans segments: no prefix to recover
        return template
    parts = str(scope.get("path", "")).split("/")
    return "/".join(parts[: max(1, len(parts) - template.count("/"))]) + template


class HttpMetrics:
    """Observe every HTTP request's duration in `strata_http_request_duration_seconds`; a
    request that raised before answering counts as a 500."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500
        root_path = str(scope.get("root_path", ""))

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            method = scope.get("method", "")
            REQUEST_SECONDS.labels(
                method if method in METHODS else "other",
                route_template(scope, root_path=root_path),
                str(status),
            ).observe(time.perf_counter() - start)


def install(app: FastAPI, inst: Instance, dispatcher: Dispatcher) -> None:
    """Add the middleware and `GET /metrics` (outside /v1: it is for Prometheus, not users)."""
    state = StateCollector(inst.registry.stats, getattr(dispatcher, "queue_depths", None))
    registry = metrics_registry([state])
    token = inst.settings.metrics_token
    # its own threads, like /health's: a scrape must not queue behind requests
    limiter = anyio.CapacityLimiter(2)

    async def metrics(request: Request) -> Response:
        """Prometheus's text format: this server's requests (every process of it), jobs by
        kind and state, queue depths, artifact bytes. Bearer `STRATA_METRICS_TOKEN` if set."""
        if token is not None:
            given = request.headers.get("authorization", "")
            expected = f"Bearer {token.get_secret_value()}"
            if not hmac.compare_digest(given.encode(), expected.encode()):
                return errors.problem(401, "/metrics needs the bearer STRATA_METRICS_TOKEN",
                                      code="unauthorized")  # fmt: skip
        body = await anyio.to_thread.run_sync(exposition, registry, limiter=limiter)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    # not in the OpenAPI document: it is Prometheus's, in its format, not a client's
    app.add_api_route(PATH, metrics, methods=["GET"], include_in_schema=False)
    app.add_middleware(HttpMetrics)

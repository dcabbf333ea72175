"""The FastAPI application: /v1 routes, /health, the dashboard at /ui, problem+json errors,
upload size limits.

    app = create_app(instance, dispatcher)

`dispatcher` sends queued jobs to workers: `workers.celery_app.CeleryDispatcher` for the
service, `workers.inprocess.InProcessWorker` for the embedded `strata serve`.
"""

from __future__ import annotations

import gc
import json
import re
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import anyio.to_thread
from fastapi import APIRouter, FastAPI, HTTPException
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api import dashboard, errors, metrics
from api.routes import (
    adapters,
    datasets,
    evaluations,
    jobs,
    lineage,
    predict,
    schedules,
    streams,
    tasks,
    webhooks,
)
from api.routes import tokens as token_routes
from registry.errors import RegistryError
from registry.instance import Instance
from registry.store.async_reads import open_reads
from services.dispatch import Dispatcher
from services.predict import Predictor

API_VERSION = "v1"


def create_app(
    inst: Instance, dispatcher: Dispatcher, predictor: Predictor | None = None
) -> FastAPI:
    """The API on `inst`: jobs go to `dispatcher`; predictions to `predictor` (a worker queue's
    in a server, a thread's in the embedded server; None: predict answers 503)."""

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        # blocking routes and dependencies run on at most `api_threads` threads of this loop
        anyio.to_thread.current_default_thread_limiter().total_tokens = inst.settings.api_threads
        # token checks, job status and job events are awaited here (on PostgreSQL, no threadpool)
        reads = open_reads(
            inst.registry,
            size=inst.settings.api_threads,
            timeout_s=inst.settings.database_timeout_s,
        )
        await reads.open()
        app.state.reads = reads
        try:
            yield
        finally:
            del app.state.reads
            await reads.close()

    app = FastAPI(
        lifespan=lifespan,
        title="Strata",
        version="0.1.0",
        description="Continual-learning fine-tuning with a versioned adapter registry. Every "
        "route but /health needs `Authorization: Bearer <token>`; errors are problem+json.",
    )
    app.state.inst = inst
    app.state.dispatcher = dispatcher
    app.state.predictor = predictor
    app.state.predict_slots = predict.Slots(inst.settings.predict_concurrency)
    errors.install(app)
    v1 = APIRouter(prefix=f"/{API_VERSION}")
    for module in (streams, tasks, datasets, jobs, adapters, lineage, evaluations, predict,
                   schedules, token_routes, webhooks):  # fmt: skip
        v1.include_router(module.router)
    app.include_router(v1)
    dashboard.mount(app)  # /ui: static files, no token (the page calls /v1 with one)

    checks: dict[str, Callable[[], object]] = {
        "database": lambda: inst.registry.leases.holder("health"),
        "store": inst.artifacts.ping,
    }
    ping = getattr(dispatcher, "ping", None)
    if ping is not None:
        checks["broker"] = ping
    # its own threads: a health check must not queue behind requests that hold the API's
    health_threads = anyio.CapacityLimiter(2 * len(checks))

    @app.get("/health", tags=["health"], response_model=None)
    async def health() -> dict[str, Any] | JSONResponse:
        """Whether the database, the object store and the broker answer, each within its own
        timeout (200, or 503 naming what did not); needs no token."""
        timeouts = {"database": inst.settings.database_timeout_s,
                    "store": inst.settings.store_timeout_s,
                    "broker": inst.settings.broker_timeout_s}  # fmt: skip
        results: dict[str, str] = {}

        async def run(name: str) -> None:
            results[name] = await _check(checks[name], timeouts[name], health_threads)

        async with anyio.create_task_group() as group:
            for name in checks:
                group.start_soon(run, name)
        results = {name: results[name] for name in checks}
        down = [f"{name}: {state}" for name, state in results.items() if state != "ok"]
        if down:
            return errors.problem(503, "; ".join(down), code="unavailable", checks=results)
        return {"status": "ok", "checks": results}

    predict_limit = (predict.BODY_PATH, predict.max_body_bytes(inst.settings))
    app.add_middleware(BodyLimit, max_bytes=inst.settings.max_upload_bytes, limits=[predict_limit])
    metrics.install(app, inst, dispatcher)  # GET /metrics; its middleware times every request
    return app


async def _check(
    probe: Callable[[], object], timeout_s: float, limiter: anyio.CapacityLimiter
) -> str:
    """ "ok", or why the probe failed: its error, or that it did not answer in time (the probe's
    thread is then left to finish on its own; the dependency's timeouts bound it)."""
    with anyio.move_on_after(timeout_s):
        try:
            await anyio.to_thread.run_sync(probe, abandon_on_cancel=True, limiter=limiter)
        except RegistryError as exc:  # unreachable, or never migrated: say which
            return exc.reason
        return "ok"
    return f"no answer within {timeout_s:g} s"


def freeze_startup_objects() -> None:
    """Leave what a server process holds from its start (the imports of torch, transformers and
    the app: about 500,000 objects) out of the cyclic garbage collector's passes. They live as
    long as the process, and a full pass would otherwise scan them all: a pause of about 0.4 s
    on a 2-core machine, paid by whichever request set it off
    (docs/notes/2026-11-23-api-status-reads.md, "Freezing"). Call it once
    the app is built."""
    gc.collect()  # what is garbage now is freed, not frozen
    gc.freeze()


class BodyLimit:
    """Refuse request bodies over `max_bytes` while they stream in: at once from a too large
    Content-Length, else as soon as the bytes received pass the limit (chunked uploads).
    `limits` holds smaller limits for the paths their patterns match (JSON routes)."""

    def __init__(
        self, app: ASGIApp, *, max_bytes: int, limits: Sequence[tuple[re.Pattern[str], int]] = ()
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.limits = limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        max_bytes = min([self.max_bytes] + [n for p, n in self.limits if p.fullmatch(path)])
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > max_bytes:
            await _too_large(send, max_bytes)
            return
        received = 0

        async def counting() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > max_bytes:
                    raise HTTPException(413, _limit_text(max_bytes))
            return message

        await self.app(scope, counting, send)


def _limit_text(max_bytes: int) -> str:
    return f"the request body is larger than the limit of {max_bytes} bytes"


async def _too_large(send: Send, max_bytes: int) -> None:
    body: dict[str, Any] = {
        "type": "https://strata.dev/problems/too_large", "title": "Content Too Large",
        "status": 413, "detail": _limit_text(max_bytes), "code": "too_large", "field": "body",
    }  # fmt: skip
    payload = json.dumps(body).encode()
    await send({
        "type": "http.response.start", "status": 413,
        "headers": [(b"content-type", errors.PROBLEM.encode()),
                    (b"content-length", str(len(payload)).encode()), (b"connection", b"close")],
    })  # fmt: skip
    await send({"type": "http.response.body", "body": payload})

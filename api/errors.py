"""Every error as `application/problem+json` (RFC 9457): a status, a title, what was wrong
(`detail`), the offending `field` when there is one, and a stable `code`.

Errors carry their code; `services.errors.STATUS`, the one table, gives each code its status.
Routes raise typed errors and never build error responses themselves.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from registry.errors import RegistryError
from services.errors import INTERNAL, code_of, describe
from services.predict import PredictTimeout, RemoteError

log = logging.getLogger(__name__)

PROBLEM = "application/problem+json"
RETRY_AFTER_S = 5


class ProblemError(Exception):
    """An error raised by the API layer itself (size limits, bad uploads...)."""

    def __init__(self, status: int, detail: str, *, field: str | None = None, code: str) -> None:
        super().__init__(detail)
        self.status, self.detail, self.field, self.code = status, detail, field, code


def problem(
    status: int, detail: str, *, code: str, field: str | None = None, **extra: Any
) -> JSONResponse:
    body: dict[str, Any] = {
        "type": f"https://strata.dev/problems/{code}",
        "title": _title(status),
        "status": status,
        "detail": detail,
        "code": code,
    }
    if field is not None:
        body["field"] = field
    body.update(extra)
    headers = {}
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="strata"'
    if status in (429, 503):  # too many requests, or a dependency down: both pass soon
        headers["Retry-After"] = str(RETRY_AFTER_S)
    return JSONResponse(body, status_code=status, media_type=PROBLEM, headers=headers)


def _title(status: int) -> str:
    from http import HTTPStatus

    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def install(app: FastAPI) -> None:
    """Register the handlers that turn every exception into a problem document."""

    @app.exception_handler(ProblemError)
    async def api_problem(_r: Request, exc: ProblemError) -> JSONResponse:
        return problem(exc.status, exc.detail, code=exc.code, field=exc.field)

    @app.exception_handler(RequestValidationError)
    async def validation(_r: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path", "header")]
        field = ".".join(loc) or None
        detail = str(first.get("msg", "invalid request"))
        issues = [
            {"field": ".".join(str(p) for p in e.get("loc", ())), "reason": str(e.get("msg"))}
            for e in errors[:20]
        ]
        return problem(422, detail, code="invalid_request", field=field, errors=issues)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_r: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}.get(
            exc.status_code, "http_error"
        )
        return problem(exc.status_code, str(exc.detail), code=code)

    async def coded(_r: Request, exc: Exception) -> JSONResponse:
        """An error with a code of `services.errors.STATUS` (the registry's, the training
        library's, a worker's reply), with that code's status; any other is a 500."""
        if code_of(exc) is None:
            log.error("unexpected error", exc_info=exc)
            return problem(500, "internal error", code=INTERNAL)
        d = describe(exc)
        if d.status >= 500:
            log.warning("%s: %s", d.code, exc)
        return problem(d.status, d.detail, code=d.code, field=d.field, **d.extra)

    # the classes coded errors derive from (the training library's are ValueErrors), so that
    # they are answered by the app's exception middleware, not re-raised past it as 500s are
    for base in (RegistryError, ValueError, RemoteError, PredictTimeout):
        app.add_exception_handler(base, coded)

    @app.exception_handler(Exception)
    async def unexpected(_r: Request, exc: Exception) -> JSONResponse:
        # Not logged here: Starlette re-raises the exception once this response is sent, and
        # the server logs it with its traceback (logging it here too printed it twice).
        return problem(500, "internal error", code=INTERNAL)

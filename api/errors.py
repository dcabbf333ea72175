"""Every error as `application/problem+json` (RFC 9457): a status, a title, what was wrong
(`detail`), the offending `field` when there is one, and a stable `code`.

Typed errors from the registry, the training library and the upload reader are mapped here,
once; routes raise them and never build error responses themselves.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from continual.errors import (
    IncompatibleAdapter,
    InvalidCheckpoint,
    InvalidDataset,
    InvalidHyperparameter,
)
from registry.errors import (
    AlreadyExists,
    ArtifactError,
    BlobNotFound,
    Conflict,
    Forbidden,
    IntegrityError,
    InvalidReference,
    InvalidValue,
    NotFound,
    RegistryError,
    Unauthorized,
    Unavailable,
)

log = logging.getLogger(__name__)

PROBLEM = "application/problem+json"
RETRY_AFTER_S = 5

_STATUS: list[tuple[type[Exception], int]] = [
    (Unauthorized, 401),
    (Forbidden, 403),
    (BlobNotFound, 404),
    (NotFound, 404),
    (AlreadyExists, 409),
    (Conflict, 409),
    (Unavailable, 503),
    (IntegrityError, 500),  # stored data is corrupt: ours to fix, not the client's
    (InvalidReference, 422),
    (InvalidValue, 422),
    (ArtifactError, 422),  # unsafe or malformed artifacts the client sent
    (RegistryError, 400),
]


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

    @app.exception_handler(RegistryError)
    async def registry_error(_r: Request, exc: RegistryError) -> JSONResponse:
        status = next(code for kind, code in _STATUS if isinstance(exc, kind))
        if status >= 500 and not isinstance(exc, Unavailable):
            log.error("registry error: %s", exc)
        detail = exc.reason if status < 500 or isinstance(exc, Unavailable) else "internal error"
        return problem(status, detail, code=exc.code, field=exc.field)

    @app.exception_handler(InvalidHyperparameter)
    async def bad_hyper(_r: Request, exc: InvalidHyperparameter) -> JSONResponse:
        return problem(422, exc.reason, code="invalid_hyperparameter", field=exc.field)

    @app.exception_handler(InvalidDataset)
    async def bad_dataset(_r: Request, exc: InvalidDataset) -> JSONResponse:
        return problem(422, exc.where + exc.reason, code="invalid_dataset", field=exc.field,
                       line=exc.line, record=exc.record)  # fmt: skip

    @app.exception_handler(InvalidCheckpoint)
    async def bad_checkpoint(_r: Request, exc: InvalidCheckpoint) -> JSONResponse:
        return problem(422, str(exc), code="invalid_checkpoint")

    @app.exception_handler(IncompatibleAdapter)
    async def bad_adapter(_r: Request, exc: IncompatibleAdapter) -> JSONResponse:
        return problem(422, str(exc), code="incompatible_adapter", field="adapter")

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

    @app.exception_handler(Exception)
    async def unexpected(_r: Request, exc: Exception) -> JSONResponse:
        # Not logged here: Starlette re-raises the exception once this response is sent, and
        # the server logs it with its traceback (logging it here too printed it twice).
        return problem(500, "internal error", code="internal_error")

"""The one table from error codes to HTTP statuses.

Every error raised on purpose carries a stable `code`: the registry's (`registry.errors`), the
training library's (`continual.errors`), the service layer's (`services.predict`) and the API's
own. The API answers an exception whose code is in `STATUS` with that status and the code (a
problem document); a failed job records the code. Anything else is an internal error: a 500,
and a job failed with `internal_error` and its traceback in the log.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

INTERNAL = "internal_error"

STATUS: dict[str, int] = {
    # registry.errors
    "registry_error": 400,
    "unauthorized": 401,
    "forbidden": 403,
    "not_found": 404,
    "blob_not_found": 404,
    "already_exists": 409,
    "conflict": 409,
    "invalid_reference": 422,
    "invalid_value": 422,
    "artifact_error": 422,  # unsafe or malformed artifacts the client sent
    "unsafe_artifact": 422,
    "invalid_weights": 422,
    "integrity_error": 500,  # stored data is corrupt: ours to fix, not the client's
    "unavailable": 503,  # a dependency is down for a while: retry
    # continual.errors
    "invalid_hyperparameter": 422,
    "invalid_dataset": 422,
    "invalid_checkpoint": 422,
    "incompatible_adapter": 422,
    "missing_weights": 422,
    "consolidation_regressed": 409,  # the stream stays as it was; a larger max_drop may pass
    "cancelled": 409,
    # services.predict
    "client_gone": 499,  # nginx's "client closed request": logged, never read by anyone
    "predict_timeout": 504,
    # the API's own (api.errors.ProblemError, request validation, HTTP routing)
    "invalid_request": 422,
    "too_many_requests": 429,
    "too_large": 413,
    "method_not_allowed": 405,
    "unsupported_media_type": 415,
    INTERNAL: 500,
}


@dataclass(frozen=True)
class Described:
    """What an error tells a client: its status, code, `detail`, `field` and extra members."""

    status: int
    code: str
    detail: str
    field: str | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


def code_of(exc: BaseException) -> str | None:
    """The exception's code when it is one of the table's, else None (an internal error)."""
    code = getattr(exc, "code", None)
    return code if isinstance(code, str) and code in STATUS else None


def describe(exc: BaseException) -> Described:
    """The exception as a client sees it. Internal errors (and a 500 code, corrupt stored data)
    say only "internal error"; a dependency that is down says which and why."""
    code = code_of(exc) or INTERNAL
    status = STATUS[code]
    if status >= 500 and code != "unavailable" and code != "predict_timeout":
        return Described(status, code, "internal error")
    detail = getattr(exc, "detail", None) or getattr(exc, "reason", None) or str(exc)
    extra = {k: getattr(exc, k) for k in ("line", "record") if hasattr(exc, k)}
    field_ = getattr(exc, "field", None)
    return Described(status, code, str(detail), field_ if isinstance(field_, str) else None, extra)

"""Predictions without a model in the API process.

The predict route turns a request into a `PredictQuery` (plain JSON) and hands it to the app's
`Predictor`, which answers with the response's body (also plain JSON):

- `services.broker.CeleryPredictor` (a server, `strata api`): a message on the `predict` queue,
  run by a worker (`workers.celery_app`), its answer through the result backend; the API waits
  at most `settings.predict_timeout_s`, and a client that goes away (or the timeout) stops the
  worker's prediction at its next input or token.
- `workers.predict.InProcessPredictor` (the embedded `strata serve`, tests): a thread of the
  same process.

A worker's refusal (an unknown task, an input over the limits...) comes back as an `error`
object with the exception's `code`; the API raises it again as a `RemoteError`, which the
error table maps to its HTTP status like the original exception.
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class PredictQuery:
    stream: str
    inputs: tuple[str, ...]
    task: str | None = None
    ref: int | str = "production"  # `latest` until a version is promoted
    labels: tuple[str, ...] | None = None
    max_new_tokens: int = 16
    template: bool = True

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PredictQuery:
        labels = data.get("labels")
        return cls(**{**data, "inputs": tuple(data["inputs"]),
                      "labels": None if labels is None else tuple(labels)})  # fmt: skip


class Predictor(Protocol):
    """Answers a prediction query with the predict response's body. Raises `RemoteError` for
    what the worker refused, `PredictCancelled` once `cancel` is set, and `PredictTimeout`."""

    def predict(self, query: PredictQuery, *, cancel: threading.Event) -> dict[str, Any]: ...


class RemoteError(Exception):
    """An error a worker reported by its code (`error_reply`), raised again on the API's side."""

    def __init__(self, *, code: str, detail: str, field: str | None = None) -> None:
        super().__init__(detail)
        self.code, self.detail, self.field = code, detail, field
        self.reason = detail


class PredictCancelled(Exception):
    """The prediction was stopped: its client went away."""

    code = "client_gone"


class PredictTimeout(Exception):
    """No answer within `predict_timeout_s`: no `predict` worker runs, or all are busy."""

    code = "predict_timeout"


def error_reply(exc: Exception) -> dict[str, Any]:
    """The reply that carries a refusal (an exception with a `code`) back to the API."""
    detail = getattr(exc, "reason", None) or str(exc)
    return {"error": {"code": exc.code, "detail": detail,  # type: ignore[attr-defined]
                      "field": getattr(exc, "field", None)}}  # fmt: skip


def unwrap(reply: dict[str, Any]) -> dict[str, Any]:
    """The reply's body, or its error raised as a `RemoteError` (`PredictCancelled` for a
    prediction the worker stopped)."""
    error = reply.get("error")
    if error is None:
        return reply
    if error.get("code") == PredictCancelled.code:
        raise PredictCancelled(error.get("detail"))
    raise RemoteError(code=error["code"], detail=error["detail"], field=error.get("field"))

"""Predict: complete (or classify) a handful of inputs with a stream's current state, or with a
named adapter version on its task's prompt format, so users can check what they trained.

The model runs elsewhere: the app's `Predictor` (`services.predict`) hands the query to a
worker of the `predict` queue (a thread of the embedded server), and this process never loads
one. Each prediction is bounded there (`workers.predict`: input sizes, prompts cut to
`max_length`, a token budget); here at most `STRATA_PREDICT_CONCURRENCY` wait at once per
process (more are refused with 429 and Retry-After, not queued), each at most
`STRATA_PREDICT_TIMEOUT_S` (then 504), and one whose client goes away is stopped at its next
input or generated token."""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import anyio
import anyio.to_thread
from fastapi import APIRouter, Request

from api.deps import ReadToken, StreamDep
from api.errors import ProblemError
from api.schemas_predict import (
    MAX_PREDICT_INPUTS,
    MAX_PREDICT_LABELS,
    PredictRequest,
    PredictResponse,
)
from registry.settings import StrataSettings
from services.predict import PredictCancelled, Predictor, PredictQuery

log = logging.getLogger(__name__)
router = APIRouter(tags=["predict"])
CLIENT_GONE = 499  # nginx's "client closed request": logged, never read by anyone
BODY_PATH = re.compile(r"/v1/streams/[^/]+/predict")


def max_body_bytes(settings: StrataSettings) -> int:
    """The largest predict body that can be valid: 16 inputs and 64 labels, each of at most
    `predict_max_input_bytes` in UTF-8 and at most 6 bytes per byte once written in JSON (a
    control character is `\\u00XX`), and 64 KiB for the rest. Larger bodies are refused (413)
    while they stream in, before they are parsed."""
    texts = MAX_PREDICT_INPUTS + MAX_PREDICT_LABELS
    return texts * 6 * settings.predict_max_input_bytes + 64 * 1024


class Slots:
    """At most `size` predictions at once in this process. Taken and given back on the event
    loop only, so a counter needs no lock."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.busy = 0

    @contextmanager
    def hold(self) -> Iterator[None]:
        """One slot for the block, or ProblemError 429 (with Retry-After) when all are busy."""
        if self.busy >= self.size:
            raise ProblemError(
                429, f"{self.size} predictions are running in this server process, its limit "
                "(STRATA_PREDICT_CONCURRENCY); retry later", code="too_many_requests",
            )  # fmt: skip
        self.busy += 1
        try:
            yield
        finally:
            self.busy -= 1


@router.post("/streams/{stream}/predict", response_model=PredictResponse)
async def run_predict(
    stream: StreamDep, body: PredictRequest, _: ReadToken, request: Request
) -> object:
    """With `task`, each input is rendered by the task's prompt template (shown as `prompt`)
    and a classification task's labels are ranked as evaluation ranks them. Inputs are cut to
    the adapter's `max_length` tokens as training cut them (`truncated`). 422 for an input over
    STRATA_PREDICT_MAX_INPUT_BYTES or a request over STRATA_PREDICT_MAX_TOKENS; 429 with
    Retry-After when STRATA_PREDICT_CONCURRENCY predictions are waiting; 504 when no worker
    answered within STRATA_PREDICT_TIMEOUT_S."""
    predictor: Predictor | None = request.app.state.predictor
    if predictor is None:
        raise ProblemError(503, "this server has no predictor", code="unavailable")
    query = PredictQuery(
        stream=stream.name, inputs=tuple(body.inputs), task=body.task,
        ref=int(body.version) if body.version.isdigit() else body.version,
        labels=None if body.labels is None else tuple(body.labels),
        max_new_tokens=body.max_new_tokens, template=body.template,
    )  # fmt: skip
    slots: Slots = request.app.state.predict_slots
    with slots.hold():
        try:
            return await until_disconnected(
                request, lambda cancel: predictor.predict(query, cancel=cancel)
            )
        except PredictCancelled:
            log.info("prediction on stream %s stopped: its client went away", stream.name)
            raise ProblemError(CLIENT_GONE, "the client went away", code="client_gone") from None


async def until_disconnected(
    request: Request, work: Callable[[threading.Event], dict[str, Any]]
) -> dict[str, Any]:
    """`work(cancel)` on a worker thread; `cancel` is set as soon as the client disconnects (or
    this coroutine is cancelled), and the work checks it between steps. Waits for the thread
    to end either way, so that a slot is held exactly as long as its work runs."""
    cancel = threading.Event()

    def run() -> tuple[dict[str, Any] | None, Exception | None]:
        try:
            return work(cancel), None
        except Exception as exc:  # re-raised below, outside the task group (no ExceptionGroup)
            return None, exc

    async with anyio.create_task_group() as group:
        group.start_soon(_watch, request, cancel)
        value, error = await anyio.to_thread.run_sync(run)
        group.cancel_scope.cancel()  # the watcher's job is done
    if error is not None:
        raise error
    assert value is not None
    return value


async def _watch(request: Request, cancel: threading.Event) -> None:
    """Set `cancel` when the client disconnects (its body was read: the next message is the
    disconnect), or when this task is cancelled."""
    try:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        log.info("predict: the client went away; stopping its prediction")
    finally:
        cancel.set()

"""Predict: complete (or classify) a handful of inputs with a stream's current state, or with a
named adapter version on its task's prompt format, so users can check what they trained.

A prediction runs the model in the API process, so each is bounded (workers.predict: input
sizes, prompts cut to `max_length`, a token budget), at most `STRATA_PREDICT_CONCURRENCY` run at
once per process (more are refused with 429 and Retry-After, not queued), and one whose client
goes away stops at its next input or generated token."""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import anyio
import anyio.to_thread
from fastapi import APIRouter, Request

from api.deps import InstDep, ReadToken, StreamDep
from api.errors import ProblemError
from api.schemas import MAX_PREDICT_INPUTS, MAX_PREDICT_LABELS, PredictRequest, PredictResponse
from continual.errors import EvaluationCancelled
from registry.settings import StrataSettings
from workers.predict import PredictResult, predict

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
    stream: StreamDep, body: PredictRequest, inst: InstDep, _: ReadToken, request: Request
) -> object:
    """With `task`, each input is rendered by the task's prompt template (shown as `prompt`)
    and a classification task's labels are ranked as evaluation ranks them. Inputs are cut to
    the adapter's `max_length` tokens as training cut them (`truncated`). 422 for an input over
    STRATA_PREDICT_MAX_INPUT_BYTES or a request over STRATA_PREDICT_MAX_TOKENS; 429 with
    Retry-After when STRATA_PREDICT_CONCURRENCY predictions are running."""
    ref: int | str = int(body.version) if body.version.isdigit() else body.version
    slots: Slots = request.app.state.predict_slots
    with slots.hold():
        work = partial(
            predict, inst, stream, body.inputs, task=body.task, ref=ref, labels=body.labels,
            max_new_tokens=body.max_new_tokens, template=body.template,
        )  # fmt: skip
        try:
            result = await until_disconnected(request, lambda cancel: work(cancel=cancel))
        except EvaluationCancelled:
            log.info("prediction on stream %s stopped: its client went away", stream.name)
            raise ProblemError(CLIENT_GONE, "the client went away", code="client_gone") from None
    return _response(body, result)


async def until_disconnected(
    request: Request, work: Callable[[threading.Event], PredictResult]
) -> PredictResult:
    """`work(cancel)` on a worker thread; `cancel` is set as soon as the client disconnects (or
    this coroutine is cancelled), and the work checks it between steps. Waits for the thread
    to end either way, so that a slot is held exactly as long as its work runs."""
    cancel = threading.Event()

    def run() -> tuple[PredictResult | None, Exception | None]:
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


def _response(body: PredictRequest, result: PredictResult) -> dict[str, Any]:
    predictions = [
        {
            "input": text,
            "prompt": prompt,
            "output": out,
            "scores": None if result.scores is None else result.scores[i],
            "truncated": result.truncated[i],
        }
        for i, (text, prompt, out) in enumerate(
            zip(body.inputs, result.prompts, result.outputs, strict=True)
        )
    ]
    fmt = result.fmt
    return {
        "snapshot_version": result.snapshot.version,
        "adapters": [f"{a.task_name}@v{a.version}" for a in result.adapters],
        "prompt_template": None if fmt is None else fmt.prompt,
        "completion_template": None if fmt is None else fmt.completion,
        "max_length": result.max_length,
        "predictions": predictions,
    }

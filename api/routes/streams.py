"""Streams: create (queueing the import of the base model as snapshot v0), list, get."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query

from api.deps import Cursor, DispatcherDep, InstDep, ReadToken, StreamDep, WriteToken
from api.schemas import (
    ConsolidateRequest,
    ConsolidationPolicy,
    JobPublic,
    StreamCreate,
    StreamCreated,
    StreamPublic,
    StreamsPublic,
)
from registry.entities import JobKind
from registry.errors import InvalidValue
from services.dispatch import enqueue
from services.policy import FOLDABLE, check_policy
from services.promotion import check_gate
from services.streams import check_foldable_state, queue_stream

router = APIRouter(prefix="/streams", tags=["streams"])


@router.post("", status_code=202, response_model=StreamCreated)
def create(body: StreamCreate, inst: InstDep, dispatcher: DispatcherDep, _: WriteToken) -> object:
    """Create a stream and queue the job that imports its base model as snapshot v0 (202).

    Everything is checked first, without loading the model: the name, method, hyperparameters,
    options and policy, and the base source (a `hf` or `gguf` path only under the server's
    import roots, its config within `STRATA_IMPORT_MAX_PARAMS`, its tensors of the shapes its
    config gives). The stream is `importing` until the job ends (then `ready`, or `failed`);
    tasks submitted meanwhile queue behind the import."""
    stream, job = queue_stream(
        inst, name=body.name, base=body.base.model_dump(exclude_none=True), method=body.method,
        hyperparams=body.hyperparams, method_options=body.method_options,
        consolidation=body.consolidation.model_dump(exclude_none=True),
        roots=inst.settings.import_roots or (),
    )  # fmt: skip
    enqueue(inst, dispatcher, job)
    return StreamCreated(
        **StreamPublic.model_validate(stream).model_dump(),
        job=JobPublic.model_validate(inst.registry.jobs.get(job.id)),
    )


@router.get("", response_model=StreamsPublic)
def list_streams(
    inst: InstDep,
    _: ReadToken,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    cursor: Cursor = 0,
) -> object:
    streams = inst.registry.streams.list_streams(limit=limit, after_id=cursor)
    nxt = streams[-1].id if len(streams) == limit else None
    return {"data": streams, "next_cursor": nxt}


@router.get("/{stream}", response_model=StreamPublic)
def get(stream: StreamDep, _: ReadToken) -> object:
    return stream


@router.delete("/{stream}", response_model=StreamPublic)
def delete_stream(stream: StreamDep, inst: InstDep, _: WriteToken) -> object:
    """Soft-delete the stream: 404 afterwards, its name free, its queued jobs cancelled; 409
    while one of its jobs runs. `POST /v1/streams/{name}/restore` brings it back within
    STRATA_RETENTION_DAYS (default 7)."""
    return inst.registry.streams.delete(stream.id)


@router.post("/{name}/restore", response_model=StreamPublic)
def restore_stream(name: str, inst: InstDep, _: WriteToken) -> object:
    """The newest stream deleted under `name` within the retention period, live again (its
    cancelled jobs stay cancelled); 409 when a stream has taken the name since."""
    return inst.registry.streams.restore(name, retention_days=inst.settings.retention_days)


@router.put("/{stream}/promotion", response_model=StreamPublic)
def set_promotion(stream: StreamDep, body: dict[str, Any], inst: InstDep, _: WriteToken) -> object:
    """Replace the stream's promotion gate: `task_tolerance` (the points a new version may
    score below production on its own task) and `max_other_drop` (the points any other task may
    lose), each in 0..100; absent ones take the defaults (1 and 2)."""
    return inst.registry.streams.set_promotion(stream.id, check_gate(body))


@router.put("/{stream}/consolidation", response_model=StreamPublic)
def set_consolidation(
    stream: StreamDep, body: ConsolidationPolicy, inst: InstDep, _: WriteToken
) -> object:
    """Replace the stream's consolidation policy (an empty body turns it off)."""
    policy = check_policy(body.model_dump(exclude_none=True), method=stream.method)
    return inst.registry.streams.set_consolidation(stream.id, policy)


@router.post("/{stream}/consolidate", status_code=202, response_model=JobPublic)
def consolidate(
    stream: StreamDep,
    body: ConsolidateRequest,
    inst: InstDep,
    dispatcher: DispatcherDep,
    _: WriteToken,
) -> object:
    """Queue a consolidation: after the stream's earlier jobs, its adapters are folded into a
    new base snapshot that becomes current. An exact fold is verified against the adapted
    model; am-lora's is published only if no task drops more than `max_drop` points. 409
    when there would be nothing to fold: no adapter on the current snapshot and no training
    job queued or running ahead of it."""
    if stream.method not in FOLDABLE:
        raise InvalidValue(f"{stream.method} streams cannot be consolidated", field="method")
    check_foldable_state(inst, stream)
    params: dict[str, Any] = {"reason": "requested", "eval_limit": body.eval_limit}
    if body.max_drop is not None:
        params["max_drop"] = body.max_drop
    if body.distill_steps is not None:
        params["distill_steps"] = body.distill_steps
    job = inst.registry.jobs.create(kind=JobKind.CONSOLIDATE, stream_id=stream.id, params=params)
    enqueue(inst, dispatcher, job)
    return inst.registry.jobs.get(job.id)

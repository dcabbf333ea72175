"""Jobs: get, list (cursor pages), cancel, events (cursor pages or a server-sent-events stream)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query
from fastapi.encoders import jsonable_encoder
from fastapi.responses import StreamingResponse

from api.deps import MAX_ID, Cursor, IdPath, InstDep, ReadsDep, ReadToken, WriteToken
from api.schemas import JobEventPublic, JobEventsPublic, JobPublic, JobsPublic
from registry.entities import JobState
from registry.store.async_reads import AsyncReads

router = APIRouter(prefix="/jobs", tags=["jobs"])

SSE_POLL_S = 0.5
SSE_KEEPALIVE_S = 15.0


@router.get("", response_model=JobsPublic)
def list_jobs(
    inst: InstDep,
    _: ReadToken,
    stream: Annotated[str | None, Query(description="Only this stream's jobs")] = None,
    state: Annotated[JobState | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    cursor: Cursor = 0,
) -> object:
    stream_id = inst.registry.streams.get(stream).id if stream is not None else None
    jobs = inst.registry.jobs.list_jobs(
        stream_id=stream_id, state=state, limit=limit, after_id=cursor
    )
    return {"data": jobs, "next_cursor": jobs[-1].id if len(jobs) == limit else None}


@router.get("/{job_id}", response_model=JobPublic)
async def get(job_id: IdPath, reads: ReadsDep, _: ReadToken) -> object:
    """A job's state and progress: the route clients poll, read without a thread hop."""
    return await reads.job(job_id)


@router.post("/{job_id}/cancel", status_code=202, response_model=JobPublic)
def cancel(job_id: IdPath, inst: InstDep, _: WriteToken) -> object:
    """A queued job is cancelled at once; a running one stops at its next training step."""
    return inst.registry.jobs.request_cancel(job_id)


@router.get("/{job_id}/events", response_model=JobEventsPublic)
async def events(
    job_id: IdPath,
    reads: ReadsDep,
    _: ReadToken,
    cursor: Cursor = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> object:
    page = await reads.events(job_id, after_id=cursor, limit=limit)
    return {"data": page, "next_cursor": page[-1].id if len(page) == limit else None}


@router.get(
    "/{job_id}/events/stream",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}}},
)
async def stream_events(
    job_id: IdPath,
    reads: ReadsDep,
    _: ReadToken,
    last_event_id: Annotated[
        int | None, Header(ge=0, le=MAX_ID, description="Resume after this event")
    ] = None,
    cursor: Cursor = 0,
) -> StreamingResponse:
    """Live progress as server-sent events: `event: job-event` for each event (its id is the
    SSE id, so a reconnecting client resumes with Last-Event-ID), `event: state` when the job's
    state or progress changes, and a final `event: end` once the job is finished."""
    await reads.job(job_id)  # 404 before the stream starts
    after = last_event_id if last_event_id is not None else cursor
    return StreamingResponse(
        _sse(reads, job_id, after=after),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _sse(reads: AsyncReads, job_id: int, *, after: int) -> AsyncIterator[str]:
    last_state: tuple[Any, ...] | None = None
    idle = 0.0
    while True:
        page = await reads.events(job_id, after_id=after, limit=500)
        for event in page:
            after = event.id
            data = jsonable_encoder(JobEventPublic.model_validate(event))
            yield f"id: {event.id}\nevent: job-event\ndata: {json.dumps(data)}\n\n"
        job = await reads.job(job_id)
        state = (job.state, round(job.progress, 4))
        if state != last_state:
            last_state = state
            body = {"state": job.state.value, "progress": job.progress}
            yield f"event: state\ndata: {json.dumps(body)}\n\n"
        if job.state.terminal and not page:
            yield f"event: end\ndata: {json.dumps({'state': job.state.value})}\n\n"
            return
        idle = 0.0 if page else idle + SSE_POLL_S
        if idle >= SSE_KEEPALIVE_S:
            idle = 0.0
            yield ": keep-alive\n\n"
        await asyncio.sleep(SSE_POLL_S)

"""Schedules: cron rows that retrain a task from its stored dataset (or another stored one) or
consolidate a stream; the scheduler fires each due time once."""

from __future__ import annotations

from fastapi import APIRouter

from api.deps import IdPath, InstDep, ReadToken, StreamDep, WriteToken
from api.schemas import ScheduleCreate, SchedulePublic, SchedulesPublic
from registry.errors import NotFound
from services.scheduler import create_schedule

router = APIRouter(tags=["schedules"])


@router.post("/streams/{stream}/schedules", status_code=201, response_model=SchedulePublic)
def create(stream: StreamDep, body: ScheduleCreate, inst: InstDep, _: WriteToken) -> object:
    params = dict(body.params)
    if body.dataset is not None:
        params["dataset_id"] = inst.registry.tasks.get_dataset(body.dataset).id
    return create_schedule(
        inst, stream=stream, kind=body.kind, cron=body.cron, task_name=body.task, params=params
    )


@router.get("/streams/{stream}/schedules", response_model=SchedulesPublic)
def list_schedules(stream: StreamDep, inst: InstDep, _: ReadToken) -> object:
    data = inst.registry.schedules.list_schedules(stream_id=stream.id)
    return {"data": data, "count": len(data)}


@router.delete("/schedules/{schedule_id}", status_code=204)
def delete(schedule_id: IdPath, inst: InstDep, _: WriteToken) -> None:
    inst.registry.schedules.delete(schedule_id)


@router.delete("/streams/{stream}/schedules/{schedule_id}", status_code=204)
def delete_of_stream(stream: StreamDep, schedule_id: IdPath, inst: InstDep, _: WriteToken) -> None:
    """Delete one of the stream's schedules (404 for a schedule of another stream)."""
    ours = {s.id for s in inst.registry.schedules.list_schedules(stream_id=stream.id)}
    if schedule_id not in ours:
        raise NotFound(f"schedule {schedule_id} not found in stream '{stream.name}'",
                       field="schedule")  # fmt: skip
    inst.registry.schedules.delete(schedule_id)

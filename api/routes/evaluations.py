"""Evaluations: the stream's accuracy matrix with its continual-learning metrics."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query

from api.deps import DispatcherDep, InstDep, ReadToken, StreamDep, WriteToken
from api.schemas import EvaluateRequest, EvaluationsPublic, JobPublic
from registry.entities import JobKind, StreamState
from registry.errors import Conflict
from services.dispatch import enqueue
from services.evaluations import accuracy_matrix

router = APIRouter(tags=["evaluations"])
SUMMARY = ("average_accuracy", "backward_transfer", "forward_transfer", "forgetting")


@router.get("/streams/{stream}/evaluations", response_model=EvaluationsPublic)
def evaluations(
    stream: StreamDep,
    inst: InstDep,
    _: ReadToken,
    metric: Annotated[
        Literal["accuracy", "loss"], Query(description="loss: the free-form tasks' matrix")
    ] = "accuracy",
) -> object:
    """R[t][i] (task i in the state that learned task t, over the stream's current lineage;
    the last row is the lineage's newest state) with average accuracy (ACC), backward transfer
    (BWT), forward transfer (FWT) and forgetting over the tasks learned so far, and every
    measured state (classification
    tasks are scored by accuracy, free-form ones by completion loss, without the summary)."""
    matrix = inst.registry.evaluations.matrix(stream.id, metric=metric)
    summary: dict[str, float | None] = dict.fromkeys(SUMMARY)
    if metric == "accuracy" and matrix.values:
        learned = accuracy_matrix(matrix)
        for name in SUMMARY:  # each needs its own cells; a task submitted late misses some
            try:
                summary[name] = getattr(learned, name)
            except ValueError:
                summary[name] = None
    return {
        "metric": matrix.metric,
        "task_names": list(matrix.task_names),
        "values": [list(row) for row in matrix.values],
        "baseline": list(matrix.baseline),
        "states": [
            {
                "after_position": st.after_position,
                "state": st.label,
                "snapshot_version": st.snapshot_version,
                "adapters": list(st.adapters),
                "kind": st.kind,
                "job_id": st.job_id,
                "values": list(st.values),
                "in_lineage": st.in_lineage,
                "measured_at": st.measured_at,
            }
            for st in matrix.states
        ],
        **summary,
    }


@router.post("/streams/{stream}/evaluate", status_code=202, response_model=JobPublic)
def evaluate(
    stream: StreamDep,
    body: EvaluateRequest,
    inst: InstDep,
    dispatcher: DispatcherDep,
    _: WriteToken,
) -> object:
    """Queue an evaluation of the stream's current state on every task (on the default
    queue, beside training): it records the row of the newest learned task. 409 when the
    stream has no task to evaluate, or no base model yet (its import has not finished)."""
    if stream.state is not StreamState.READY:  # evaluations do not queue behind the import
        raise Conflict(f"the stream is {stream.state}: its base model is not imported",
                       field="stream")  # fmt: skip
    if not inst.registry.tasks.list_tasks(stream.id):
        raise Conflict("the stream has no tasks to evaluate yet", field="stream")
    job = inst.registry.jobs.create(
        kind=JobKind.EVALUATE, stream_id=stream.id, params={"eval_limit": body.eval_limit}
    )
    enqueue(inst, dispatcher, job)
    return inst.registry.jobs.get(job.id)

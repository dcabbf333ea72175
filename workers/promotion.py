"""The promotion step of a train or retrain job (`services.promotion` decides): after the new
version's state is evaluated, the version becomes its task's `production` alias only if the
gate passes. The decision is the job's `result.promotion` and one job event,
`adapter.promoted` or `adapter.refused`."""

from __future__ import annotations

from collections.abc import Sequence

from registry.entities import AdapterVersion, EvaluationMatrix, Job, Stream, Task
from registry.errors import NotFound
from registry.instance import Instance
from services.promotion import PRODUCTION, Promotion, TaskRow, check_gate, decide
from workers.evaluation import TaskScore
from workers.reporting import JobReporter

ACCURACY = "accuracy"


def _points(value: float | None) -> float | None:
    return None if value is None else round(100 * value, 4)


def _latest(matrix: EvaluationMatrix, column: int) -> float | None:
    """The task's newest measured score in the matrix (None: never measured)."""
    for row in reversed(matrix.values):
        if column < len(row) and row[column] is not None:
            return row[column]
    return None


def promote(
    inst: Instance,
    job: Job,
    reporter: JobReporter,
    *,
    stream: Stream,
    task: Task,
    version: AdapterVersion,
    before: EvaluationMatrix,
    scores: Sequence[TaskScore],
) -> Promotion:
    """Decide, move the alias if promoted, record the decision on the job."""
    reg = inst.registry
    columns = {name: i for i, name in enumerate(before.task_names)}
    after = {s.task.name: s.value for s in scores if s.metric == ACCURACY}
    rows = [
        TaskRow(
            task=name,
            before=_points(_latest(before, columns[name])) if name in columns else None,
            after=_points(after.get(name)),
        )
        for name in [s.task.name for s in scores]
    ]
    base = None
    if task.name in columns and columns[task.name] < len(before.baseline):
        base = _points(before.baseline[columns[task.name]])
    production = None
    try:
        current = reg.adapters.get(task_id=task.id, ref_=PRODUCTION)
        if current.id != version.id:
            production = _points(current.metrics.get(ACCURACY))
    except NotFound:
        pass
    gate = {**stream.promotion, **check_gate(job.params.get("promotion") or {})}
    decision = decide(task=task.name, rows=rows, base=base, production=production, gate=gate)
    if decision.promoted:
        reg.adapters.set_alias(task_id=task.id, alias=PRODUCTION, version_id=version.id)
        reporter.event(f"adapter.promoted: {task.name} v{version.version} is {PRODUCTION}")
    else:
        reporter.event(f"adapter.refused: {task.name} v{version.version} is not {PRODUCTION}: "
                       + "; ".join(decision.reasons), level="warning")  # fmt: skip
    reg.jobs.set_result(job.id, {**(job.result or {}), "promotion": decision.to_json()})
    event = "adapter.promoted" if decision.promoted else "adapter.refused"
    reg.webhooks.emit(event, {
        "stream": stream.name, "task": task.name, "job_id": job.id,
        "adapter": {"id": version.id, "version": version.version},
        "promotion": decision.to_json(),
    })  # fmt: skip
    return decision

"""Scheduled retraining: cron rows in the database, fired by a single-leader scheduler.

`strata scheduler` runs `run_scheduler`: every tick, the process that holds the `scheduler`
lease fires the schedules that are due (each due time queues exactly one job: `fire` moves the
schedule under a row lock in the job's transaction), delivers due webhooks, runs a reconciler
pass and, once per `gc_interval_s`, collects garbage (`services.gc`). Several
scheduler processes may run for availability; one leads at a time, and a leader that dies is
replaced when its lease expires. Missed due times (the scheduler was down) collapse into one
run: the next due time is computed from now, not from the missed one.

Cron expressions: the five standard fields (minute hour day month weekday), `@hourly`-style
nicknames, or six fields whose last one is one second (0-59): a schedule fires at most once a
minute. Times are UTC.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from datetime import UTC, datetime
from typing import Any

from croniter import croniter

from registry.entities import Job, JobKind, Schedule, Stream
from registry.errors import InvalidValue, RegistryError
from registry.instance import Instance
from services.dispatch import Dispatcher, enqueue, safe_reconcile, worker_id
from services.gc import maybe_collect
from services.setup import training_setup
from services.webhooks import deliver_due

log = logging.getLogger(__name__)

LEADER_LEASE = "scheduler"
WEBHOOKS_PER_TICK = 20  # deliveries attempted per tick (each waits at most 5 s)


def check_cron(cron: object) -> str:
    if not isinstance(cron, str) or not cron.strip() or len(cron) > 128:
        raise InvalidValue("must be a cron expression of at most 128 characters", field="cron")
    if not croniter.is_valid(cron.strip()):
        raise InvalidValue(f"{cron!r} is not a valid cron expression", field="cron")
    fields = cron.split()
    if len(fields) == 6 and not (fields[5].isdigit() and int(fields[5]) < 60):
        raise InvalidValue(
            f"{cron!r}: the seconds field must be one second (0-59): a schedule fires at most "
            "once a minute", field="cron",
        )  # fmt: skip
    return cron.strip()


def next_run(cron: str, *, after: datetime) -> datetime:
    """The first due time of `cron` strictly after `after` (UTC)."""
    return croniter(cron, after.astimezone(UTC)).get_next(datetime).astimezone(UTC)


def create_schedule(
    inst: Instance,
    *,
    stream: Stream,
    kind: str,
    cron: str,
    task_name: str | None = None,
    params: dict[str, Any] | None = None,
    now: datetime | None = None,
) -> Schedule:
    """Validate and store a schedule; its first run is the first due time after now."""
    cron = check_cron(cron)
    params = dict(params or {})
    if kind not in (JobKind.RETRAIN, JobKind.CONSOLIDATE):
        raise InvalidValue("must be 'retrain' or 'consolidate'", field="kind")
    task_id = None
    if kind == JobKind.RETRAIN:
        if not task_name:
            raise InvalidValue("a retrain schedule names the task to retrain", field="task")
        task_id = inst.registry.tasks.get(stream_id=stream.id, name=task_name).id
        training_setup(
            method=stream.method, hyperparams=stream.hyperparams, params=params,
            options=stream.method_options,
        )  # fmt: skip
        if "dataset_id" in params:
            inst.registry.tasks.get_dataset_by_id(int(params["dataset_id"]))
    elif params:
        raise InvalidValue("consolidate schedules take no parameters", field="params")
    now = now or datetime.now(UTC)
    return inst.registry.schedules.create(
        stream_id=stream.id, kind=JobKind(kind), cron=cron, task_id=task_id, params=params,
        next_run_at=next_run(cron, after=now),
    )  # fmt: skip


def fire_due(inst: Instance, dispatcher: Dispatcher, *, now: datetime) -> list[Job]:
    """Queue one job for every schedule due at `now`, then send them."""
    fired = []
    for schedule in inst.registry.schedules.due(now=now):
        job = inst.registry.schedules.fire(
            schedule.id, now=now, next_run_at=next_run(schedule.cron, after=now)
        )
        if job is not None:
            log.info("schedule %s queued job %s", schedule.id, job.id)
            enqueue(inst, dispatcher, job)
            fired.append(job)
    return fired


def tick(inst: Instance, dispatcher: Dispatcher, *, holder: str, now: datetime) -> bool:
    """One scheduler tick; False when another process leads."""
    ttl = 3 * inst.settings.scheduler_tick_s
    try:
        if not inst.registry.leases.acquire(LEADER_LEASE, holder=holder, ttl_s=ttl):
            return False
        fire_due(inst, dispatcher, now=now)
        deliver_due(inst, now=now, limit=WEBHOOKS_PER_TICK)  # webhooks, from the outbox
    except RegistryError as exc:  # e.g. the database restarts: try again next tick
        log.warning("scheduler tick failed: %s", exc)
        return False
    safe_reconcile(inst, dispatcher, now=now)
    try:
        maybe_collect(inst, holder=holder)  # garbage collection, once per `gc_interval_s`
    except RegistryError as exc:
        log.warning("garbage collection failed: %s", exc)
    return True


def run_scheduler(
    inst: Instance, dispatcher: Dispatcher, *, stop: threading.Event, holder: str | None = None
) -> None:
    """Tick every `settings.scheduler_tick_s` until `stop` is set; releases the lead on exit."""
    holder = holder or f"scheduler@{worker_id()}"
    log.info("scheduler %s started", holder)
    try:
        while not stop.is_set():
            tick(inst, dispatcher, holder=holder, now=datetime.now(UTC))
            stop.wait(inst.settings.scheduler_tick_s)
    finally:
        with contextlib.suppress(RegistryError):
            inst.registry.leases.release(LEADER_LEASE, holder=holder)

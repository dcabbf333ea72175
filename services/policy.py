"""A stream's consolidation policy: when its adapters fold into a new base snapshot (checked
when the stream is created, read after each training job), and how much a fold that is not
exact may cost a task. The fold itself is `workers.consolidation`'s job."""

from __future__ import annotations

import logging
from typing import Any

from continual.config import (
    FOLD_DISTILL_STEPS,
    FOLDABLE,
    MAX_FOLD_DISTILL_STEPS,
    is_distill_steps,
)
from registry.entities import Job, JobKind, Stream
from registry.errors import InvalidValue
from registry.instance import Instance

log = logging.getLogger(__name__)
__all__ = [
    "FOLDABLE",
    "check_distill_steps",
    "check_max_drop",
    "check_policy",
    "due",
    "queue_if_due",
]

DEFAULT_MAX_DROP = 2.0  # accuracy points a task may lose to a fold that is not exact
POLICY = {
    "every_tasks": "fold once this many adapters sit on the current snapshot",
    "max_adapters": "fold when more adapters than this sit on the current snapshot",
    "max_rank": "fold when their ranks add up to more than this",
}
GATE = {"max_drop": "accuracy points any task may lose to a fold that is not exact (am-lora)"}
FOLD = {"distill_steps": "steps of distillation that correct a fold that is not exact (am-lora)"}
DEFAULT_DISTILL_STEPS = FOLD_DISTILL_STEPS
MAX_DISTILL_STEPS = MAX_FOLD_DISTILL_STEPS


def check_policy(policy: object, *, method: str) -> dict[str, Any]:
    """A stream's consolidation policy: positive integers for any of `POLICY`'s keys (when to
    fold), `max_drop`, a number >= 0 (how much a fold may cost), and `distill_steps`, a whole
    number >= 0 (how a fold that is not exact is corrected)."""
    if not isinstance(policy, dict):
        raise InvalidValue("must be an object", field="consolidation")
    out: dict[str, Any] = {}
    for key, value in policy.items():
        if key not in POLICY and key not in GATE and key not in FOLD:
            raise InvalidValue(f"unknown policy key (known: {sorted({**POLICY, **GATE, **FOLD})})",
                               field=key)  # fmt: skip
        if value is None:
            continue
        if key in GATE:
            out[key] = check_max_drop(value)
        elif key in FOLD:
            out[key] = check_distill_steps(value)
        else:
            out[key] = _positive_int(value, field=key)
    if set(out) & set(POLICY) and method not in FOLDABLE:
        raise InvalidValue(f"{method} streams cannot be consolidated", field="consolidation")
    return out


def check_max_drop(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 100:
        raise InvalidValue(f"must be a number of points in [0, 100], got {value!r}",
                           field="max_drop")  # fmt: skip
    return float(value)


def check_distill_steps(value: object) -> int:
    if not is_distill_steps(value):
        raise InvalidValue(f"must be a whole number in [0, {MAX_DISTILL_STEPS}], got {value!r}",
                           field="distill_steps")  # fmt: skip
    return value


def _positive_int(value: object, *, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidValue(f"must be a positive integer, got {value!r}", field=field)
    return value


def due(inst: Instance, stream: Stream) -> str | None:
    """Why the stream's policy asks for a consolidation now, or None."""
    policy = stream.consolidation
    if not policy:
        return None
    snapshot = inst.registry.streams.current_snapshot(stream.id)
    adapters = inst.registry.adapters.stream_state(stream_id=stream.id, snapshot_id=snapshot.id)
    count = len(adapters)
    rank = sum(int(v.hyperparams.get("rank", 0)) for v in adapters)
    if "every_tasks" in policy and count >= policy["every_tasks"]:
        return f"{count} adapters on snapshot v{snapshot.version} (every {policy['every_tasks']})"
    if "max_adapters" in policy and count > policy["max_adapters"]:
        return f"{count} adapters > max_adapters {policy['max_adapters']}"
    if "max_rank" in policy and rank > policy["max_rank"]:
        return f"total rank {rank} > max_rank {policy['max_rank']}"
    return None


def queue_if_due(inst: Instance, stream_id: int, *, after_job: int) -> Job | None:
    """Queue a consolidation when the stream's policy says so and none is pending already; it
    runs right after `after_job` (the task that made it due), before tasks submitted since."""
    stream = inst.registry.streams.get_by_id(stream_id)
    reason = due(inst, stream)
    if reason is None:
        return None
    open_jobs = inst.registry.jobs.list_jobs(stream_id=stream_id, limit=1000)
    if any(j.kind is JobKind.CONSOLIDATE and not j.state.terminal for j in open_jobs):
        return None
    job = inst.registry.jobs.create(
        kind=JobKind.CONSOLIDATE,
        stream_id=stream_id,
        params={"reason": reason},
        after_job=after_job,
    )
    log.info("stream %s: consolidation queued (%s)", stream.name, reason)
    return job

"""Promotion gated on forgetting: whether a newly published adapter version becomes its task's
`production` alias.

After a train or retrain job publishes a version and evaluates every task of the stream at the
new state, the version is promoted only if

(a) its own task scores at least the production version's accuracy minus `task_tolerance`
    points (for a task's first version: more than the untrained base), and
(b) no other task drops more than `max_other_drop` points from its score before the job.

"Before" is each task's newest measured score in the stream's accuracy matrix when the job
started (the state production serves, once it is promoted); scores are in points (0-100).
The decision is pure: the job computes it and records it as `result.promotion`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from registry.errors import InvalidValue

PRODUCTION = "production"
DEFAULT_GATE: dict[str, float] = {"task_tolerance": 1.0, "max_other_drop": 2.0}


def check_gate(gate: object, *, field_prefix: str = "") -> dict[str, float]:
    """A promotion gate: `task_tolerance` and `max_other_drop`, points in 0..100 (absent keys
    take the defaults at decision time). InvalidValue names the field."""
    if not isinstance(gate, Mapping):
        raise InvalidValue("must be an object", field=field_prefix.rstrip(".") or "promotion")
    out: dict[str, float] = {}
    for key, value in gate.items():
        if key not in DEFAULT_GATE:
            raise InvalidValue(f"not a gate setting (known: {', '.join(DEFAULT_GATE)})",
                               field=f"{field_prefix}{key}")  # fmt: skip
        if value is None:
            continue
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            raise InvalidValue(f"must be a number of points, got {value!r}",
                               field=f"{field_prefix}{key}")  # fmt: skip
        if not 0 <= value <= 100:
            raise InvalidValue(f"must be in 0..100 points, got {value}",
                               field=f"{field_prefix}{key}")  # fmt: skip
        out[key] = float(value)
    return out


@dataclass(frozen=True)
class TaskRow:
    """One task's accuracy (points) before the job and after it; `own`: the job's task."""

    task: str
    before: float | None
    after: float | None
    own: bool = False


@dataclass(frozen=True)
class Promotion:
    promoted: bool
    alias: str
    reasons: list[str]
    table: list[TaskRow] = field(default_factory=list)
    gate: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def decide(
    *,
    task: str,
    rows: Sequence[TaskRow],
    base: float | None,
    production: float | None,
    gate: Mapping[str, float] | None = None,
) -> Promotion:
    """Promote the new version of `task`? `rows` hold every task's before/after scores;
    `production` is the production version's score on the task (None: no production yet, so
    it must beat the untrained `base`)."""
    settings = {**DEFAULT_GATE, **(gate or {})}
    reasons: list[str] = []
    own = next((r for r in rows if r.task == task), None)
    after = own.after if own else None
    if after is None:  # a free-form task (scored by loss): judged by the other tasks alone
        pass
    elif production is not None:
        floor = production - settings["task_tolerance"]
        if after < floor:
            reasons.append(f"{task} scores {after:.1f}, below production's {production:.1f} "
                           f"minus the tolerance of {settings['task_tolerance']:g}")  # fmt: skip
    elif base is not None and after <= base:
        reasons.append(f"{task} scores {after:.1f}, no better than the untrained base's "
                       f"{base:.1f}")  # fmt: skip
    for r in rows:
        if r.task == task or r.before is None or r.after is None:
            continue
        drop = r.before - r.after
        if drop > settings["max_other_drop"]:
            reasons.append(f"{r.task} drops {drop:.1f} points ({r.before:.1f} -> {r.after:.1f}), "
                           f"more than {settings['max_other_drop']:g}")  # fmt: skip
    table = [TaskRow(r.task, r.before, r.after, own=r.task == task) for r in rows]
    return Promotion(promoted=not reasons, alias=PRODUCTION, reasons=reasons, table=table,
                     gate=settings)  # fmt: skip

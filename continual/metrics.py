"""Continual-learning metrics over an accuracy matrix.

R[t][i] is the accuracy on task i after learning tasks 0..t (0-based, T tasks in all); `b[i]` is
task i's accuracy on the untrained base model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class AccuracyMatrix:
    """`values[t][i]`: accuracy on task i after learning task t (None where not measured)."""

    values: tuple[tuple[float | None, ...], ...]
    baseline: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        rows = tuple(tuple(row) for row in self.values)
        object.__setattr__(self, "values", rows)
        if not rows:
            raise ValueError("an accuracy matrix needs at least one row")
        if any(len(row) != len(rows) for row in rows):
            raise ValueError("an accuracy matrix must be square: T rows of T tasks")
        if self.baseline is not None:
            object.__setattr__(self, "baseline", tuple(self.baseline))
            if len(self.baseline) != len(rows):
                raise ValueError("baseline needs one accuracy per task")

    @property
    def num_tasks(self) -> int:
        return len(self.values)

    def at(self, t: int, i: int) -> float:
        """R[t][i], raising when that cell was not measured."""
        value = self.values[t][i]
        if value is None:
            raise ValueError(f"accuracy of task {i + 1} after task {t + 1} was not measured")
        return value

    @property
    def average_accuracy(self) -> float:
        """ACC = 1/T sum_i R[T-1][i]: mean accuracy over all tasks after the last one."""
        last = self.num_tasks - 1
        return sum(self.at(last, i) for i in range(self.num_tasks)) / self.num_tasks

    @property
    def backward_transfer(self) -> float | None:
        """BWT = 1/(T-1) sum_{i<T-1} (R[T-1][i] - R[i][i]) (Lopez-Paz & Ranzato, 2017).

        Negative values mean forgetting. None with a single task.
        """
        last = self.num_tasks - 1
        if last == 0:
            return None
        return sum(self.at(last, i) - self.at(i, i) for i in range(last)) / last

    @property
    def forward_transfer(self) -> float | None:
        """FWT = 1/(T-1) sum_{i>0} (R[i-1][i] - b[i]) (Lopez-Paz & Ranzato, 2017).

        How much earlier tasks help a task before it is learned. None without a baseline, with
        a single task, or when some R[i-1][i] was not measured (future tasks not evaluated).
        """
        if self.baseline is None or self.num_tasks == 1:
            return None
        ahead = [self.values[i - 1][i] for i in range(1, self.num_tasks)]
        if any(value is None for value in ahead):
            return None
        gains = [(value or 0.0) - self.baseline[i] for i, value in enumerate(ahead, start=1)]
        return sum(gains) / len(gains)

    @property
    def forgetting(self) -> float | None:
        """F = 1/(T-1) sum_{i<T-1} max_{l<T-1} (R[l][i] - R[T-1][i]) (Chaudhry et al., 2018).

        For each earlier task, the drop from its best accuracy measured before the final task to
        its final accuracy (unmeasured cells are skipped; R[i][i] must be measured). None with a
        single task.
        """
        last = self.num_tasks - 1
        if last == 0:
            return None
        drops = []
        for i in range(last):
            measured = (self.values[t][i] for t in range(last))
            best = max(self.at(i, i), *(v for v in measured if v is not None))
            drops.append(best - self.at(last, i))
        return sum(drops) / last

    def format_table(self, task_names: Sequence[str], *, digits: int = 3) -> str:
        """Rows "after <task>", one column per task, then the summary metrics."""
        if len(task_names) != self.num_tasks:
            raise ValueError("format_table needs one name per task")
        width = max(digits + 2, *(len(name) for name in task_names))
        head = max(len("after ") + max(len(name) for name in task_names), len("baseline"))

        def cell(value: float | None) -> str:
            return ("-" if value is None else f"{value:.{digits}f}").rjust(width)

        lines = [" " * head + " | " + " ".join(name.rjust(width) for name in task_names)]
        lines.append("-" * len(lines[0]))
        if self.baseline is not None:
            lines.append("baseline".ljust(head) + " | " + " ".join(map(cell, self.baseline)))
        for name, row in zip(task_names, self.values, strict=True):
            lines.append(f"after {name}".ljust(head) + " | " + " ".join(map(cell, row)))
        summary = {
            "ACC": self._measured("average_accuracy"),
            "BWT": self._measured("backward_transfer"),
            "FWT": self._measured("forward_transfer"),
            "forgetting": self._measured("forgetting"),
        }
        parts = [f"{k} {'-' if v is None else f'{v:+.{digits}f}'}" for k, v in summary.items()]
        parts[0] = parts[0].replace("+", "")  # accuracy has no sign
        lines.append("  ".join(parts))
        return "\n".join(lines)

    def _measured(self, name: str) -> float | None:
        """A summary metric, or None when a cell it needs was not measured."""
        try:
            value: float | None = getattr(self, name)
        except ValueError:
            return None
        return value

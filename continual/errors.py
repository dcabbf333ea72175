"""Errors raised by the training library. Each has a stable `code` (and, where one input is at
fault, its `field`); the service's one table (`services.errors.STATUS`) maps codes to HTTP
statuses, and a failed job records the code."""

from __future__ import annotations

NESTED = "JSON nested too deeply"  # json's parser recurses per level: RecursionError, refused


class InvalidHyperparameter(ValueError):
    """A training hyperparameter (or strategy option) is out of range or of the wrong type."""

    code = "invalid_hyperparameter"

    def __init__(self, *, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class InvalidDataset(ValueError):
    """A dataset is malformed; `line` is the 1-based line of a line-based file (JSONL), `record`
    the 1-based record of a JSON list, when known. `where` says which, for messages."""

    code = "invalid_dataset"

    def __init__(
        self, *, field: str, reason: str, line: int | None = None, record: int | None = None
    ) -> None:
        self.field = field
        self.reason = reason
        self.line = line
        self.record = record
        super().__init__(f"{self.where}{field}: {reason}")

    @property
    def where(self) -> str:
        """`line N: `, `record N: ` or nothing."""
        if self.line is not None:
            return f"line {self.line}: "
        return f"record {self.record}: " if self.record is not None else ""

    @property
    def detail(self) -> str:
        """What was wrong, and where: `line 4: missing "completion"`."""
        return self.where + self.reason


class TrainingCancelled(Exception):
    """Training stopped early because `should_stop()` returned True."""

    code = "cancelled"


class EvaluationCancelled(Exception):
    """Scoring or generation stopped early because `should_stop()` returned True."""

    code = "cancelled"


class InvalidCheckpoint(ValueError):
    """A training checkpoint is unreadable or belongs to another model or run."""

    code = "invalid_checkpoint"


class IncompatibleAdapter(ValueError):
    """An adapter cannot be applied to this base model: a layer it adapts is missing, or its
    LoRA matrices' shapes do not match the layer's, or its files are not a safetensors PEFT
    adapter. Raised before anything is loaded."""

    code = "incompatible_adapter"
    field = "adapter"

    def __init__(self, *, adapter: str, reason: str) -> None:
        super().__init__(f"adapter {adapter}: {reason}")
        self.adapter = adapter
        self.reason = reason

    @property
    def detail(self) -> str:
        return str(self)


class MissingWeights(ValueError):
    """A checkpoint lacks weights the model needs. transformers would fill them with random
    values (and a GGUF load can leave them uninitialised); a model like that is refused."""

    code = "missing_weights"

    def __init__(self, *, path: str, keys: list[str]) -> None:
        shown = ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
        super().__init__(f"{path} lacks weights the model needs: {shown}")
        self.path = path
        self.keys = keys


class ConsolidationRegressed(Exception):
    """A fold that is not exact (AM-LoRA's) lost more than `max_drop` accuracy points on some
    task; `table` has every task's accuracy before and after. Nothing is published."""

    code = "consolidation_regressed"

    def __init__(self, *, table: str, max_drop: float, tasks: list[str]) -> None:
        super().__init__(
            f"folding would drop {', '.join(tasks)} by more than {max_drop:g} points "
            f"(max_drop); nothing was published:\n{table}"
        )
        self.table = table
        self.max_drop = max_drop
        self.tasks = tasks

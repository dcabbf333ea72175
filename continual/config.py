"""Training hyperparameters: one frozen dataclass, validated when constructed."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeGuard

from continual.errors import InvalidHyperparameter

DEFAULT_TARGET_MODULES: tuple[str, ...] = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)

PRECISIONS: tuple[str, ...] = ("fp32", "bf16")
MAX_RANK = 4096  # past any hidden size trained here; a larger r only allocates
# how each method's adapters fold into a base snapshot (`continual.fold`): exactly, or by a
# fit whose accuracy the consolidation job checks
EXACT_METHODS = ("seq-lora", "inc-lora", "o-lora")
GATED_METHODS = ("am-lora",)
FOLDABLE = EXACT_METHODS + GATED_METHODS
FOLD_DISTILL_STEPS = 64  # distillation steps correcting a gated fold (`continual.fold_distill`)
# the share of each sequence's distillation loss on its completion (2026-12-05, order 2 seed 1:
# agnews lost 1.0 point instead of 3.5 with every position alike)
FOLD_DISTILL_ANSWER_SHARE = 0.5
MAX_FOLD_DISTILL_STEPS = 10_000  # the most a policy, a request or `strata bench` may ask for


def is_distill_steps(value: object) -> TypeGuard[int]:
    """Whether `value` is a number of distillation steps a fold may be asked for: a whole number
    in [0, MAX_FOLD_DISTILL_STEPS] (a policy, a consolidate request, `strata bench`)."""
    return (
        isinstance(value, int)
        and not isinstance(value, bool)
        and 0 <= value <= MAX_FOLD_DISTILL_STEPS
    )


RELORA_PRUNE_DEFAULT = 0.99  # ReLoRA's magnitude pruning of the optimizer state at a reset


@dataclass(frozen=True)
class LoraHyperparams:
    """LoRA and optimiser settings for training one task.

    The defaults suit the tiny random Llama of `models.build_tiny_llama` on the synthetic tasks
    (each learned to >0.9 accuracy in a few CPU seconds); real models want a lower learning rate.
    """

    rank: int = field(default=8, metadata={"help": "LoRA rank r of the update B @ A."})
    alpha: float = field(
        default=16.0, metadata={"help": "LoRA scaling numerator: the update is (alpha / r) B @ A."}
    )
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input, in [0, 1)."})
    target_modules: tuple[str, ...] = field(
        default=DEFAULT_TARGET_MODULES,
        metadata={"help": "Names of the linear sub-modules that receive a LoRA adapter."},
    )
    learning_rate: float = field(
        default=5e-3, metadata={"help": "Peak AdamW learning rate, reached after warmup."}
    )
    epochs: int = field(default=10, metadata={"help": "Passes over the training examples."})
    max_steps: int | None = field(
        default=None,
        metadata={"help": "Optimiser steps to run; when set it overrides `epochs`."},
    )
    batch_size: int = field(default=16, metadata={"help": "Examples per optimiser step."})
    max_length: int = field(
        default=128,
        metadata={"help": "Longest tokenised prompt + completion; prompts are cut on the left."},
    )
    warmup_ratio: float = field(
        default=0.06,
        metadata={"help": "Fraction of steps with linear warmup before cosine decay, in [0, 1)."},
    )
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW decoupled weight decay."})
    seed: int = field(default=0, metadata={"help": "Seed for shuffling, dropout and LoRA init."})
    grad_clip: float | None = field(
        default=1.0, metadata={"help": "Max global gradient norm; None disables clipping."}
    )
    group_by_length: bool = field(
        default=False,
        metadata={
            "help": "Batch examples of similar prompt length (sorted within shuffled groups of 16 "
            "batches) so little of a batch is padding: faster on inputs of mixed length, but "
            "batches are less mixed (on small tasks whose prompt length tracks the label, worse)."
        },
    )

    precision: str = field(
        default="fp32",
        metadata={
            "help": "Arithmetic of a training step: 'fp32', or 'bf16' mixed precision (autocast: "
            "matmuls in bfloat16, while weights, LoRA factors, gradients and optimiser state stay "
            "fp32). bf16 is what GPUs are fast at; on a CPU without bf16 units it is slower."
        },
    )
    relora_every: int | None = field(
        default=None,
        metadata={
            "help": "ReLoRA: every this many optimiser steps, move the new adapter's update into "
            "a frozen part of that adapter and restart its A (Kaiming) and B (zero); None: off. "
            "The saved adapter holds every cycle: its rank is rank x (resets + 1)."
        },
    )
    relora_prune: float = field(
        default=RELORA_PRUNE_DEFAULT,
        metadata={
            "help": "ReLoRA: fraction of the adapter's optimizer state (Adam moments) zeroed, "
            "smallest magnitudes first, at each reset; in [0, 1). Needs relora_every."
        },
    )
    relora_warmup: int | None = field(
        default=None,
        metadata={
            "help": "ReLoRA: steps over which the learning rate climbs back from 0 after each "
            "reset, < relora_every; None: a tenth of relora_every (rounded up). Needs "
            "relora_every."
        },
    )

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, list):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        _check_int(self, "rank", low=1, high=MAX_RANK)
        _check_float(self, "alpha", low=0.0, low_inclusive=False)
        _check_float(self, "dropout", low=0.0, high=1.0)
        _check_modules(self.target_modules)
        _check_float(
            self, "learning_rate", low=0.0, low_inclusive=False, high=1.0, high_inclusive=True
        )
        _check_int(self, "epochs", low=1)
        if self.max_steps is not None:
            _check_int(self, "max_steps", low=1)
        _check_int(self, "batch_size", low=1)
        _check_int(self, "max_length", low=8)
        _check_float(self, "warmup_ratio", low=0.0, high=1.0)
        _check_float(self, "weight_decay", low=0.0)
        _check_int(self, "seed", low=0, high=2**32 - 1)
        if self.grad_clip is not None:
            _check_float(self, "grad_clip", low=0.0, low_inclusive=False)
        if not isinstance(self.group_by_length, bool):
            raise InvalidHyperparameter(
                field="group_by_length",
                reason=f"must be true or false, got {self.group_by_length!r}",
            )
        if self.precision not in PRECISIONS:
            raise InvalidHyperparameter(
                field="precision",
                reason=f"must be one of {', '.join(PRECISIONS)}, got {self.precision!r}",
            )
        self._check_relora()

    def _check_relora(self) -> None:
        """The ReLoRA fields: a positive cycle length, a re-warmup shorter than a cycle, and no
        ReLoRA setting without cycles (to switch ReLoRA off over a stream's default, a job sets
        relora_every and relora_warmup to null and relora_prune to its default)."""
        _check_float(self, "relora_prune", low=0.0, high=1.0)
        if self.relora_every is None:
            if self.relora_warmup is not None:
                raise InvalidHyperparameter(
                    field="relora_warmup", reason="only applies with relora_every (ReLoRA is off)"
                )
            if self.relora_prune != RELORA_PRUNE_DEFAULT:
                raise InvalidHyperparameter(
                    field="relora_prune", reason="only applies with relora_every (ReLoRA is off)"
                )
            return
        _check_int(self, "relora_every", low=1)  # a run shorter than a cycle has no reset
        if self.relora_warmup is not None:
            _check_int(self, "relora_warmup", low=0)
            if self.relora_warmup >= self.relora_every:
                every, warmup = self.relora_every, self.relora_warmup
                raise InvalidHyperparameter(
                    field="relora_warmup", reason=f"must be < relora_every ({every}), got {warmup}"
                )

    @property
    def relora_warmup_steps(self) -> int:
        """The re-warmup in use: `relora_warmup`, or a tenth of `relora_every` rounded up (below
        a whole cycle); 0 when ReLoRA is off."""
        if self.relora_every is None:
            return 0
        if self.relora_warmup is not None:
            return self.relora_warmup
        return min(math.ceil(self.relora_every / 10), self.relora_every - 1)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> LoraHyperparams:
        """Build from JSON-like input; unknown keys are rejected, lists become tuples."""
        if not isinstance(values, Mapping):
            raise InvalidHyperparameter(field="hyperparameters", reason="must be an object")
        known = {f.name for f in dataclasses.fields(cls)}
        for key in values:
            if key not in known:
                raise InvalidHyperparameter(field=str(key), reason="unknown hyperparameter")
        kwargs: dict[str, Any] = {
            k: tuple(v) if isinstance(v, list) else v for k, v in values.items()
        }
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (tuples become lists); `from_dict(to_dict())` round-trips."""
        out = dataclasses.asdict(self)
        out["target_modules"] = list(self.target_modules)
        return out


def _check_int(obj: object, name: str, *, low: int, high: int | None = None) -> None:
    value = getattr(obj, name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidHyperparameter(field=name, reason=f"must be an integer, got {value!r}")
    if value < low:
        raise InvalidHyperparameter(field=name, reason=f"must be >= {low}, got {value}")
    if high is not None and value > high:
        raise InvalidHyperparameter(field=name, reason=f"must be <= {high}, got {value}")


def _check_float(obj: object, name: str, **bounds: Any) -> None:
    check_number(getattr(obj, name), field=name, **bounds)


def check_number(
    value: object,
    *,
    field: str,
    low: float,
    low_inclusive: bool = True,
    high: float | None = None,
    high_inclusive: bool = False,
) -> float:
    """`value` as a float, if a finite number between low and high (inclusive as flagged);
    ints are accepted, bools are not. InvalidHyperparameter on `field` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidHyperparameter(field=field, reason=f"must be a number, got {value!r}")
    if not math.isfinite(value):
        raise InvalidHyperparameter(field=field, reason=f"must be finite, got {value}")
    if value < low or (value == low and not low_inclusive):
        op = ">=" if low_inclusive else ">"
        raise InvalidHyperparameter(field=field, reason=f"must be {op} {low}, got {value}")
    if high is not None and (value > high or (value == high and not high_inclusive)):
        op = "<=" if high_inclusive else "<"
        raise InvalidHyperparameter(field=field, reason=f"must be {op} {high}, got {value}")
    return float(value)


def _check_modules(modules: object) -> None:
    if not isinstance(modules, tuple) or not modules:
        raise InvalidHyperparameter(
            field="target_modules", reason="must be a non-empty list of module names"
        )
    for name in modules:
        if not isinstance(name, str) or not name.strip():
            raise InvalidHyperparameter(
                field="target_modules", reason=f"module names must be non-empty strings: {name!r}"
            )
    if len(set(modules)) != len(modules):
        raise InvalidHyperparameter(field="target_modules", reason="module names must be unique")

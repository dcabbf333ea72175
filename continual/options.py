"""Each method's options as a frozen dataclass, like `LoraHyperparams`: a field per option with
its default, its bounds and a `help` text. Importing this module loads no model library, so the
API checks a stream's options (and documents them in OpenAPI and `--help`) without torch.

`method_options(method, values)` builds a method's options from JSON, naming the field of
the first bad value (`InvalidHyperparameter`); each strategy takes the result.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from continual.config import check_number
from continual.errors import InvalidHyperparameter

LAMBDA1_NORMS = ("sum", "mean")  # the overlap summed (the paper's), or per layer and earlier rank
LAMBDA2_NORMS = ("params", "update")  # what lambda2 weighs: the paper's, or the weight change
ROUTING_SCOPES = ("causal", "prompt")  # am-lora's router: per token prefix, or the whole prompt


def _number(
    default: float,
    help: str,
    *,
    low: float = 0.0,
    exclusive: bool = False,
    high: float | None = None,
) -> Any:
    """A number >= low (> low if `exclusive`) and, with `high`, < high."""
    meta = {"help": help, "low": low, "exclusive": exclusive, "high": high}
    return field(default=default, metadata=meta)


def _choice(default: str, choices: tuple[str, ...], help: str) -> Any:
    return field(default=default, metadata={"help": help, "choices": choices})


class MethodOptions:
    """Checks every field by its metadata when built: numbers within bounds (stored as
    floats), choices among theirs, flags true or false."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # type: ignore[arg-type]  # subclasses are dataclasses
            value, meta = getattr(self, f.name), f.metadata
            if "choices" in meta:
                if value not in meta["choices"]:
                    reason = f"must be one of {', '.join(meta['choices'])}, got {value!r}"
                    raise InvalidHyperparameter(field=f.name, reason=reason)
            elif "low" in meta:
                number = check_number(value, field=f.name, low=meta["low"],
                                      low_inclusive=not meta["exclusive"],
                                      high=meta["high"])  # fmt: skip
                object.__setattr__(self, f.name, number)
            elif isinstance(f.default, bool) and not isinstance(value, bool):
                reason = f"must be true or false, got {value!r}"
                raise InvalidHyperparameter(field=f.name, reason=reason)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]


@dataclass(frozen=True)
class SeqLoraOptions(MethodOptions):
    """seq-lora has no options: one adapter, trained on task after task."""


@dataclass(frozen=True)
class IncLoraOptions(MethodOptions):
    """inc-lora has no options: a new adapter per task, the earlier ones frozen."""


@dataclass(frozen=True)
class OLoraOptions(MethodOptions):
    """O-LoRA: a new adapter per task, kept orthogonal to the frozen earlier ones."""

    lambda1: float = _number(
        0.5, "Weight of the overlap term |A_old A_new^T| between the new adapter's A and every "
        "earlier adapter's A.")  # fmt: skip
    lambda2: float = _number(0.0, "Weight of the L2 term on the new adapter (see lambda2_norm).")
    orthogonal_init: bool = field(
        default=False,
        metadata={"help": "Start the new A orthogonal to the earlier adapters' rows."},
    )
    lambda2_norm: str = _choice(
        "params", LAMBDA2_NORMS, "What lambda2 weighs: the adapter's parameters (the paper's) "
        "or its weight change B @ A.")  # fmt: skip
    lambda1_norm: str = _choice(
        "mean", LAMBDA1_NORMS, "How the overlap is pooled: averaged over layers per earlier "
        "rank, or summed over layers and earlier tasks (the paper's, which learns new tasks "
        "less well).")  # fmt: skip


@dataclass(frozen=True)
class AmLoraOptions(MethodOptions):
    """AM-LoRA: per-task adapters mixed by a sparse attentional selector and a task router."""

    sparsity_weight: float = _number(
        0.01, "Weight of the L1 term that keeps the selector's mixing weights sparse."
    )
    selector_lr_scale: float = _number(
        1.0, "The selector's learning rate as a multiple of learning_rate.", exclusive=True
    )
    routing_weight: float = _number(
        1.0, "How far the task router's choice overrides the selector (0: the selector alone)."
    )
    lambda1: float = _number(
        0.0, "Weight of O-LoRA's overlap term between the new adapter's A and every earlier "
        "adapter's A (and the folded memory's).")  # fmt: skip
    lambda2: float = _number(0.0, "Weight of the L2 term on the new adapter's parameters.")
    lambda1_norm: str = _choice(
        "mean", LAMBDA1_NORMS, "How the overlap is pooled: summed, or the mean per layer and "
        "earlier rank.")  # fmt: skip
    routing_scope: str = _choice(
        "causal", ROUTING_SCOPES, "What routes each token: the sequence up to it (causal), or "
        "the whole prompt (the first pass of a sequence).")  # fmt: skip
    initial_share: float = _number(
        0.5, "The new adapter's share of every token's mixture when its task starts, against "
        "the earlier adapters and the zero adapter together (0 < share < 1).",
        exclusive=True, high=1.0)  # fmt: skip
    warm_start: bool = field(
        default=False,
        metadata={"help": "Start the new adapter as a copy of the previous task's (A and B) "
                  "instead of A random and B zero."},
    )  # fmt: skip


METHOD_OPTIONS: dict[str, type[MethodOptions]] = {
    "seq-lora": SeqLoraOptions, "inc-lora": IncLoraOptions, "o-lora": OLoraOptions,
    "am-lora": AmLoraOptions,
}  # fmt: skip


def method_options(method: str, values: Mapping[str, Any] | None = None) -> MethodOptions:
    """`method`'s options from JSON-like `values` (defaults for what is absent).
    InvalidHyperparameter names the field: `method` for an unknown method, `options` for a
    value that is not an object, the option's own name otherwise."""
    cls = METHOD_OPTIONS.get(method)
    if cls is None:
        known = ", ".join(sorted(METHOD_OPTIONS))
        raise InvalidHyperparameter(field="method", reason=f"unknown method {method!r} ({known})")
    values = {} if values is None else values
    if not isinstance(values, Mapping):
        raise InvalidHyperparameter(field="options", reason="must be an object")
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for key in values:
        if key not in names:
            known = ", ".join(sorted(names)) or "none"
            raise InvalidHyperparameter(
                field=str(key), reason=f"not an option of method {method!r} (its options: {known})"
            )
    return cls(**values)


def option_fields(method: str) -> list[dataclasses.Field[Any]]:
    """The fields of `method`'s options (for documentation: OpenAPI, `--help`)."""
    return list(dataclasses.fields(METHOD_OPTIONS[method]))  # type: ignore[arg-type]

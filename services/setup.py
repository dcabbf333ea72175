"""How a job trains: the stream's method, its options and LoRA hyperparameters, overridden by
the job's parameters; checked when a stream is created or a task submitted, and read by the
training job."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from continual.config import LoraHyperparams
from continual.errors import InvalidHyperparameter
from continual.options import method_options
from registry.entities import AdapterVersion

if TYPE_CHECKING:
    from continual.strategies import Strategy


def resolved_options(method: str, options: dict[str, Any]) -> dict[str, Any]:
    """`options` with `method`'s defaults for what they leave out: what a stream stores and an
    adapter version records, so that a later release's defaults change neither. Raises
    InvalidHyperparameter (with the field) for an unknown method or a bad option."""
    return method_options(method, options).to_dict()


JOB_PARAMS = frozenset(
    {"method", "hyperparams", "options", "eval_limit", "checkpoint_every", "dataset_id",
     "schedule_id", "dataset_version", "replay", "promotion"}
)  # fmt: skip


@dataclass(frozen=True)
class TrainingSetup:
    """How a job trains: its method, the method's options (every one, defaults included) and the
    LoRA hyperparameters."""

    method: str
    options: dict[str, Any]
    hyper: LoraHyperparams

    def strategy(self) -> Strategy:
        """The method's strategy (imports the training library: workers only)."""
        from continual.strategies import get_strategy

        return get_strategy(self.method, **self.options)

    def record(self) -> dict[str, Any]:
        """What an adapter version records of how it was trained."""
        return {**self.hyper.to_dict(), "method_options": dict(self.options)}


def recorded_setup(version: AdapterVersion) -> TrainingSetup:
    """How an adapter version was trained: its recorded hyperparameters and method options."""
    options = version.hyperparams.get("method_options") or {}
    hyper = {k: v for k, v in version.hyperparams.items() if k != "method_options"}
    return training_setup(method=version.method, hyperparams=hyper, params={}, options=options)


def training_setup(
    *,
    method: str,
    hyperparams: dict[str, Any],
    params: dict[str, Any],
    options: dict[str, Any] | None = None,
) -> TrainingSetup:
    """A job's setup: the stream's defaults (method, its `options`, hyperparameters) overridden
    by the job's `params`. A job that switches method does not inherit the stream's options.

    Raises InvalidHyperparameter (with the field) for unknown methods, options or bad values.
    """
    unknown = sorted(set(params) - JOB_PARAMS)
    if unknown:
        raise InvalidHyperparameter(
            field=unknown[0], reason=f"not a job parameter (known: {sorted(JOB_PARAMS)})"
        )
    for key in ("eval_limit", "checkpoint_every", "dataset_id", "schedule_id", "dataset_version"):
        value = params.get(key)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            raise InvalidHyperparameter(
                field=key, reason=f"must be a positive integer, got {value!r}"
            )
    chosen = params.get("method") or method
    inherited = dict(options or {}) if chosen == method else {}
    overrides, job_options = params.get("hyperparams") or {}, params.get("options") or {}
    for field, value in (("hyperparams", overrides), ("options", job_options)):
        if not isinstance(value, dict):
            raise InvalidHyperparameter(field=field, reason="must be an object")
    return TrainingSetup(
        method=chosen,
        options=resolved_options(chosen, {**inherited, **job_options}),
        hyper=LoraHyperparams.from_dict({**hyperparams, **overrides}),
    )

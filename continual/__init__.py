"""Strata's training math: LoRA strategies, the training loop, evaluation and CL metrics.

Pure library code: it imports torch, transformers, peft, tokenizers and safetensors only, and
reads no environment, database or object store.

The names below are re-exported lazily so that light modules (`continual.config`,
`continual.errors`, `continual.data`, `continual.metrics`) can be imported without paying for
torch / transformers / peft.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS: dict[str, str] = {
    "LoraHyperparams": "continual.config",
    "Example": "continual.data",
    "TaskData": "continual.data",
    "format_prompt": "continual.data",
    "synthetic_tasks": "continual.data",
    "InvalidDataset": "continual.errors",
    "InvalidHyperparameter": "continual.errors",
    "TrainingCancelled": "continual.errors",
    "EvalResult": "continual.evaluation",
    "exact_match": "continual.evaluation",
    "language_model_loss": "continual.evaluation",
    "rank_classification": "continual.evaluation",
    "AccuracyMatrix": "continual.metrics",
    "build_tiny_llama": "continual.models",
    "build_tokenizer": "continual.models",
    "load_causal_lm": "continual.models",
    "STRATEGIES": "continual.strategies",
    "Strategy": "continual.strategies",
    "get_strategy": "continual.strategies",
    "StepInfo": "continual.training",
    "TrainResult": "continual.training",
    "TrainingCallbacks": "continual.training",
    "train": "continual.training",
}

__all__ = [
    "STRATEGIES",
    "AccuracyMatrix",
    "EvalResult",
    "Example",
    "InvalidDataset",
    "InvalidHyperparameter",
    "LoraHyperparams",
    "StepInfo",
    "Strategy",
    "TaskData",
    "TrainResult",
    "TrainingCallbacks",
    "TrainingCancelled",
    "build_tiny_llama",
    "build_tokenizer",
    "exact_match",
    "format_prompt",
    "get_strategy",
    "language_model_loss",
    "load_causal_lm",
    "rank_classification",
    "synthetic_tasks",
    "train",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'continual' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


if TYPE_CHECKING:
    from continual.config import LoraHyperparams
    from continual.data import Example, TaskData, format_prompt, synthetic_tasks
    from continual.errors import InvalidDataset, InvalidHyperparameter, TrainingCancelled
    from continual.evaluation import (
        EvalResult,
        exact_match,
        language_model_loss,
        rank_classification,
    )
    from continual.metrics import AccuracyMatrix
    from continual.models import build_tiny_llama, build_tokenizer, load_causal_lm
    from continual.strategies import STRATEGIES, Strategy, get_strategy
    from continual.training import StepInfo, TrainingCallbacks, TrainResult, train

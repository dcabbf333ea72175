"""The strategy contract and the registry of strategies by method name.

A strategy decides how a stream's adapters relate: which parameters train for a new task, an
optional extra loss term, how the new adapter is written, and how the stream's model is rebuilt
for inference. Every adapter on disk is in PEFT layout (`adapter_config.json` +
`adapter_model.safetensors`), loadable with `PeftModel.from_pretrained(base, dir)`.

PEFT injects adapter layers into the base model in place: pass a fresh (unmodified) base to
every `prepare` / `inference_model` call.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar, runtime_checkable

from peft import PeftModel
from torch import Tensor, nn
from transformers import PreTrainedModel

from continual.config import LoraHyperparams
from continual.errors import InvalidHyperparameter
from continual.options import MethodOptions, method_options


@runtime_checkable
class Strategy(Protocol):
    name: str
    options: MethodOptions  # the method's options (`continual.options`)

    def prepare(
        self, base: PreTrainedModel, *, history: Sequence[Path], hyper: LoraHyperparams
    ) -> PeftModel:
        """Model ready to train the new task; its only trainable params are the new task's
        adapter. `history`: the stream's earlier adapter directories, oldest first."""
        ...

    def extra_loss(self, model: PeftModel) -> Tensor | None:
        """A term added to the task loss at every step (e.g. a regulariser), or None."""
        ...

    def save_adapter(self, model: PeftModel, out_dir: Path) -> None:
        """Write the new task's adapter in PEFT layout at out_dir root (adapter_config.json +
        adapter_model.safetensors), loadable by PeftModel.from_pretrained(base, out_dir)."""
        ...

    def inference_model(self, base: PreTrainedModel, *, history: Sequence[Path]) -> nn.Module:
        """The stream's model after learning every adapter in history (history[-1] is the
        newest); `base` itself when history is empty."""
        ...


STRATEGIES: dict[str, type[Strategy]] = {}

_S = TypeVar("_S", bound=type[Any])


def register_strategy(cls: _S) -> _S:
    """Class decorator: make `cls` available to `get_strategy(cls.name)`."""
    name = cls.name
    if name in STRATEGIES and STRATEGIES[name] is not cls:
        raise ValueError(f"strategy {name!r} is already registered")
    STRATEGIES[name] = cls
    return cls


def get_strategy(name: str, **options: Any) -> Strategy:
    """The strategy registered as `name`, with its options (`continual.options`) built from
    `options`; InvalidHyperparameter names the field of a bad or unknown one."""
    cls = STRATEGIES.get(name)
    if cls is None:
        known = ", ".join(sorted(STRATEGIES)) or "none"
        raise InvalidHyperparameter(field="method", reason=f"unknown method {name!r} ({known})")
    return cls(method_options(name, options))  # type: ignore[call-arg]  # each takes its options

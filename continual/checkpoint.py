"""Training checkpoints: everything `train` needs to continue a run where it stopped.

A checkpoint holds the trainable parameters, the buffers that training accumulates into (marked
with `mark_train_state`, e.g. AM-LoRA's task statistics), the optimizer and LR-scheduler state,
the RNG state (dropout: the CPU generator's, and the GPU's when the model trains on one), the
losses so far and the step. On disk it is two files, neither
pickled: `train_state.safetensors` (every tensor) and `train_state.json` (the rest), so a
checkpoint is stored and verified like any other artifact tree.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from continual.errors import InvalidCheckpoint

logger = logging.getLogger(__name__)

STATE_TENSORS = "train_state.safetensors"
STATE_JSON = "train_state.json"
FORMAT = "strata.train_state/v1"
TRAIN_STATE = "strata_train_state"
"""Attribute of a buffer that training updates, which a checkpoint must therefore keep."""


def mark_train_state(buffer: Tensor) -> None:
    """Make checkpoints save and restore `buffer` (update it in place: the mark is on the
    tensor object)."""
    setattr(buffer, TRAIN_STATE, True)


def train_state_buffers(model: nn.Module) -> dict[str, Tensor]:
    """The model's marked buffers by `named_buffers` name."""
    return {n: b for n, b in model.named_buffers() if getattr(b, TRAIN_STATE, False)}


@dataclass(frozen=True)
class TrainState:
    """The state after `step` optimiser steps of one `train` call."""

    step: int
    params: dict[str, Tensor]  # trainable parameters by `named_parameters` name
    optimizer: dict[str, Any]  # `optimizer.state_dict()`
    scheduler: dict[str, Any]  # `scheduler.state_dict()`
    rng: Tensor  # torch CPU generator state (uint8)
    losses: tuple[float, ...]
    tokens: int
    buffers: dict[str, Tensor] = field(default_factory=dict)  # marked buffers by name
    cuda_rng: Tensor | None = None  # the model's CUDA device's generator state, if it is on one


def capture(
    *,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    losses: list[float],
    tokens: int,
) -> TrainState:
    """A detached copy of the run's state (training may go on while it is written)."""
    params = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return TrainState(
        step=step,
        params=params,
        optimizer=_clone(optimizer.state_dict()),
        scheduler=dict(scheduler.state_dict()),
        rng=torch.get_rng_state(),
        losses=tuple(losses),
        tokens=tokens,
        buffers={n: b.detach().clone() for n, b in train_state_buffers(model).items()},
        cuda_rng=torch.cuda.get_rng_state(device) if (device := _device(model)).type == "cuda"
        else None,
    )  # fmt: skip


def restore(
    state: TrainState,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> None:
    """Load `state` into a freshly set-up run; refuses a state of another model's parameters."""
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(trainable) != set(state.params):
        missing, extra = (
            sorted(set(trainable) - set(state.params)),
            sorted(set(state.params) - set(trainable)),
        )
        raise InvalidCheckpoint(f"parameters differ: missing {missing[:3]}, unexpected {extra[:3]}")
    with torch.no_grad():
        for name, param in trainable.items():
            if param.shape != state.params[name].shape:
                raise InvalidCheckpoint(
                    f"{name}: shape {tuple(state.params[name].shape)} != {tuple(param.shape)}"
                )
            param.copy_(state.params[name])
        for name, buffer in train_state_buffers(model).items():
            saved = state.buffers.get(name)
            if saved is None:
                # Written before the buffer existed: it restarts from its initial value, and
                # holds what the rest of the run adds to it.
                logger.warning("checkpoint has no %s; it restarts from its initial value", name)
                continue
            if saved.shape != buffer.shape:
                raise InvalidCheckpoint(
                    f"{name}: shape {tuple(saved.shape)} != {tuple(buffer.shape)}"
                )
            buffer.copy_(saved)
    try:
        optimizer.load_state_dict(state.optimizer)
        scheduler.load_state_dict(dict(state.scheduler))
    except (KeyError, ValueError, RuntimeError) as exc:
        raise InvalidCheckpoint(f"optimizer or scheduler state does not fit: {exc}") from exc
    torch.set_rng_state(state.rng)
    if state.cuda_rng is not None and (device := _device(model)).type == "cuda":
        torch.cuda.set_rng_state(state.cuda_rng, device)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def save_train_state(state: TrainState, directory: Path) -> None:
    """Write the two checkpoint files into `directory` (created if needed)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, Tensor] = {f"param/{n}": t.contiguous() for n, t in state.params.items()}
    tensors.update({f"buffer/{n}": t.contiguous() for n, t in state.buffers.items()})
    tensors["rng"] = state.rng
    if state.cuda_rng is not None:
        tensors["cuda_rng"] = state.cuda_rng
    optim_state: dict[str, dict[str, Any]] = {}
    for index, entries in state.optimizer.get("state", {}).items():
        plain: dict[str, Any] = {}
        for key, value in entries.items():
            if isinstance(value, Tensor):
                tensors[f"optim/{index}/{key}"] = value.contiguous()
            else:
                plain[key] = value
        optim_state[str(index)] = plain
    meta = {
        "format": FORMAT,
        "step": state.step,
        "losses": list(state.losses),
        "tokens": state.tokens,
        "optimizer": {
            "param_groups": state.optimizer.get("param_groups", []),
            "state": optim_state,
        },
        "scheduler": state.scheduler,
    }
    save_file(tensors, str(directory / STATE_TENSORS), metadata={"format": "pt"})
    (directory / STATE_JSON).write_text(json.dumps(meta, indent=1) + "\n")


def load_train_state(directory: Path) -> TrainState:
    """Read a checkpoint written by `save_train_state`; InvalidCheckpoint when it is not one."""
    directory = Path(directory)
    try:
        meta = json.loads((directory / STATE_JSON).read_text())
        tensors = load_file(str(directory / STATE_TENSORS))
    except (OSError, ValueError) as exc:
        raise InvalidCheckpoint(f"cannot read a checkpoint in {directory}: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or "rng" not in tensors:
        raise InvalidCheckpoint(f"{directory} does not hold a {FORMAT} checkpoint")
    optim_state: dict[int, dict[str, Any]] = {}
    for index, plain in meta["optimizer"]["state"].items():
        optim_state[int(index)] = dict(plain)
    params: dict[str, Tensor] = {}
    buffers: dict[str, Tensor] = {}
    for key, value in tensors.items():
        kind, _, rest = key.partition("/")
        if kind == "param":
            params[rest] = value
        elif kind == "buffer":
            buffers[rest] = value
        elif kind == "optim":
            index, _, name = rest.partition("/")
            optim_state.setdefault(int(index), {})[name] = value
    return TrainState(
        step=int(meta["step"]),
        params=params,
        optimizer={"state": optim_state, "param_groups": meta["optimizer"]["param_groups"]},
        scheduler=dict(meta["scheduler"]),
        rng=tensors["rng"],
        losses=tuple(float(v) for v in meta["losses"]),
        tokens=int(meta["tokens"]),
        buffers=buffers,
        cuda_rng=tensors.get("cuda_rng"),
    )


def _clone(value: Any) -> Any:
    """Deep copy of a state dict whose tensors are detached clones."""
    if isinstance(value, Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clone(v) for v in value]
    return value

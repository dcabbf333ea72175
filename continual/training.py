"""One explicit training loop (torchtune / nanoGPT style) that knows nothing about LoRA.

It optimises whatever parameters have `requires_grad`, on the completion tokens only, and
reports through callbacks. Strategies decide what is trainable and may add a loss term; a
parameter carrying an `lr_scale` attribute (`set_lr_scale`) learns at that multiple of the
learning rate. With `hyper.relora_every` the trainable LoRA adapter runs ReLoRA cycles
(`continual.relora`): the one place the loop knows about LoRA.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from continual.batching import (
    IGNORE_INDEX,
    Batch,
    Encoded,
    completion_loss,
    encode_pair,
    pad_batch,
    pad_id_of,
)
from continual.checkpoint import TrainState, capture, restore
from continual.config import LoraHyperparams, check_number
from continual.data import Example
from continual.errors import InvalidCheckpoint, InvalidDataset, TrainingCancelled
from continual.relora import ReLoraCycles

logger = logging.getLogger(__name__)

FINAL_LOSS_WINDOW = 5  # steps averaged into TrainResult.final_loss
LR_SCALE = "lr_scale"  # a parameter's attribute, and its optimizer group's key


@dataclass(frozen=True)
class StepInfo:
    """Progress after one optimiser step (1-based `step`)."""

    step: int
    total_steps: int
    loss: float
    tokens_per_s: float
    eta_s: float
    learning_rate: float


@dataclass
class TrainingCallbacks:
    """Optional hooks: `on_step` after every step, `should_stop` before every step, and
    `on_checkpoint(state)` every `checkpoint_every` steps (not after the last one): pass the
    state back as `train(..., resume=state)` to continue an interrupted run exactly.

    `after_step(info, model, optimizer)` runs after the optimiser and LR scheduler stepped (and
    after a ReLoRA reset) and before `on_step`; it may edit the model and the optimizer state
    in place."""

    on_step: Callable[[StepInfo], None] | None = None
    should_stop: Callable[[], bool] | None = None
    after_step: Callable[[StepInfo, nn.Module, torch.optim.Optimizer], None] | None = None
    checkpoint_every: int | None = None  # steps between `on_checkpoint` calls
    on_checkpoint: Callable[[TrainState], None] | None = None


@dataclass(frozen=True)
class TrainResult:
    steps: int
    final_loss: float  # mean loss of the last FINAL_LOSS_WINDOW steps
    tokens: int  # non-padding tokens seen
    seconds: float
    losses: tuple[float, ...]  # loss of every step, in order
    relora_resets: int = 0  # ReLoRA cycles ended (the adapter's rank is rank x (resets + 1))


def total_steps(*, num_examples: int, hyper: LoraHyperparams) -> int:
    """`max_steps` when set, otherwise `epochs` passes of ceil(n / batch_size) steps."""
    if hyper.max_steps is not None:
        return hyper.max_steps
    return hyper.epochs * math.ceil(num_examples / hyper.batch_size)


class LrSchedule(Protocol):
    """Multiplier of the peak learning rate at 0-based `step` of `total` (warmup steps given)."""

    def __call__(self, step: int, *, total: int, warmup: int) -> float: ...


def lr_multiplier(step: int, *, total: int, warmup: int) -> float:
    """Linear warmup from 0 over `warmup` steps, then cosine decay to 0 at `total` (0-based)."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def causal_lm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean next-token cross-entropy over positions whose label is not IGNORE_INDEX, from full
    (B, T, V) logits: the reference `batching.completion_loss` (what `train` uses) must equal."""
    vocab = logits.shape[-1]
    shifted_logits = logits[:, :-1].reshape(-1, vocab)  # (B*(T-1), V)
    targets = labels[:, 1:].reshape(-1)  # (B*(T-1),)
    return F.cross_entropy(shifted_logits.float(), targets, ignore_index=IGNORE_INDEX)


ModelT = TypeVar("ModelT", bound=nn.Module)


def train(
    model: ModelT,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    hyper: LoraHyperparams,
    *,
    extra_loss: Callable[[ModelT], Tensor | None] | None = None,
    callbacks: TrainingCallbacks | None = None,
    lr_schedule: LrSchedule = lr_multiplier,
    resume: TrainState | None = None,
) -> TrainResult:
    """Train `model` in place on `examples`; raises TrainingCancelled if `should_stop()`.

    `lr_schedule` scales `hyper.learning_rate` per step (default: warmup, then cosine; with
    ReLoRA it restarts after each reset). `resume`: a checkpoint of this run (same model
    set-up, examples and hyperparameters); training continues after its step with the batches,
    learning rates, dropout masks and ReLoRA cycles the uninterrupted run would have used.
    With ReLoRA the model ends with a plain adapter holding every cycle (`ReLoraCycles.finish`)."""
    if not examples:
        raise InvalidDataset(field="examples", reason="no training examples")
    encoded = [
        encode_pair(
            tokenizer,
            prompt=ex.prompt,
            completion=ex.completion,
            add_eos=True,
            max_length=hyper.max_length,
        )
        for ex in examples
    ]
    steps = total_steps(num_examples=len(encoded), hyper=hyper)
    relora = None  # installed before the optimizer, which must see the parametrized model
    if hyper.relora_every is not None:
        at = resume.step if resume is not None else 0
        relora = ReLoraCycles.install(model, hyper=hyper, total=steps, step=at)
        lr_schedule = relora.schedule(lr_schedule)
    optimizer, scheduler = _setup_optimizer(model, hyper=hyper, steps=steps, schedule=lr_schedule)
    torch.manual_seed(hyper.seed)  # dropout
    loop = _Loop(
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        hyper=hyper,
        extra_loss=extra_loss,
        callbacks=callbacks or TrainingCallbacks(),
        steps=steps,
        relora=relora,
    )
    if resume is not None:
        if resume.step > steps:
            raise InvalidCheckpoint(f"checkpoint at step {resume.step} of a {steps}-step run")
        restore(resume, model=model, optimizer=optimizer, scheduler=scheduler)
        loop.first_step, loop.losses, loop.tokens = (
            resume.step + 1,
            list(resume.losses),
            resume.tokens,
        )
        logger.info("resuming after step %d of %d", resume.step, steps)
    batches = _batches(
        encoded, hyper=hyper, steps=steps, pad_id=pad_id_of(tokenizer), skip=loop.first_step - 1
    )
    was_training = model.training
    model.train()
    try:
        loop.run(batches)
    finally:
        model.train(was_training)
    if relora is not None:
        relora.finish()
    window = loop.losses[-FINAL_LOSS_WINDOW:]
    result = TrainResult(
        steps=steps,
        final_loss=sum(window) / len(window),
        tokens=loop.tokens,
        seconds=time.perf_counter() - loop.start,
        losses=tuple(loop.losses),
        relora_resets=relora.resets if relora is not None else 0,
    )
    logger.info(
        "trained %d steps in %.1fs, final loss %.4f", steps, result.seconds, result.final_loss
    )
    return result


@dataclass
class _Loop:
    """The step loop's state: what `train` needs back, plus the objects every step uses."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    hyper: LoraHyperparams
    extra_loss: Callable[[Any], Tensor | None] | None  # called with `model`
    callbacks: TrainingCallbacks
    steps: int
    relora: ReLoraCycles | None = None
    losses: list[float] = field(default_factory=list)
    tokens: int = 0  # since step 1 (a resumed run counts the checkpoint's)
    first_step: int = 1
    run_tokens: int = 0  # in this call, for the throughput
    start: float = field(default_factory=time.perf_counter)

    def run(self, batches: Iterator[Batch]) -> None:
        device = next(self.model.parameters()).device
        for step, batch in enumerate(batches, start=self.first_step):
            if self.callbacks.should_stop is not None and self.callbacks.should_stop():
                logger.info("training cancelled before step %d of %d", step, self.steps)
                raise TrainingCancelled(f"cancelled before step {step} of {self.steps}")
            lr = float(self.scheduler.get_last_lr()[0])  # the run's rate, not a scaled group's
            lr /= self.optimizer.param_groups[0].get(LR_SCALE, 1.0)
            loss = self._step(batch.to(device))
            self.scheduler.step()
            if self.relora is not None:
                self.relora.after_step(step, self.optimizer)
            self.losses.append(loss)
            self.tokens += batch.num_tokens
            self.run_tokens += batch.num_tokens
            info = self._info(step, loss=loss, lr=lr)
            if self.callbacks.after_step is not None:
                self.callbacks.after_step(info, self.model, self.optimizer)
            if self.callbacks.on_step is not None:
                self.callbacks.on_step(info)
            self._maybe_checkpoint(step)

    def _maybe_checkpoint(self, step: int) -> None:
        every, save = self.callbacks.checkpoint_every, self.callbacks.on_checkpoint
        if every is None or save is None or step % every != 0 or step >= self.steps:
            return
        state = capture(
            step=step, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
            losses=self.losses, tokens=self.tokens,
        )  # fmt: skip
        save(state)

    def _step(self, batch: Batch) -> float:
        with autocast(self.hyper.precision, batch.input_ids.device):
            loss = completion_loss(self.model, batch)  # vocabulary logits at completions only
        # a strategy's own term (O-LoRA's orthogonality penalty) is small and cheap: full fp32
        extra = self.extra_loss(self.model) if self.extra_loss is not None else None
        if extra is not None:
            loss = loss + extra
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.hyper.grad_clip is not None:
            params = [p for group in self.optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.hyper.grad_clip)
        self.optimizer.step()
        return float(loss.detach().item())

    def _info(self, step: int, *, loss: float, lr: float) -> StepInfo:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        done = step - self.first_step + 1  # steps of this call
        return StepInfo(
            step=step,
            total_steps=self.steps,
            loss=loss,
            tokens_per_s=self.run_tokens / elapsed,
            eta_s=elapsed / done * (self.steps - step),
            learning_rate=lr,
        )


def autocast(precision: str, device: torch.device) -> AbstractContextManager[object]:
    """The forward pass's arithmetic for `precision` (`LoraHyperparams.precision`) on `device`:
    'bf16' runs matmuls in bfloat16 under torch's autocast (weights, gradients and the
    optimiser's state stay fp32; the loss's softmax runs in fp32), 'fp32' changes nothing."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def set_lr_scale(param: nn.Parameter, scale: float) -> None:
    """Train `param` at `scale` times the run's learning rate (schedule included)."""
    setattr(param, LR_SCALE, check_number(scale, field=LR_SCALE, low=0.0, low_inclusive=False))


def _setup_optimizer(
    model: nn.Module, *, hyper: LoraHyperparams, steps: int, schedule: LrSchedule
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    groups: dict[float, list[nn.Parameter]] = {}  # one group per lr_scale, in parameter order
    for param in model.parameters():
        if param.requires_grad:
            groups.setdefault(getattr(param, LR_SCALE, 1.0), []).append(param)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    optimizer = torch.optim.AdamW(
        [
            {"params": params, "lr": hyper.learning_rate * scale, LR_SCALE: scale}
            for scale, params in groups.items()
        ],
        lr=hyper.learning_rate,
        weight_decay=hyper.weight_decay,
    )
    warmup = math.ceil(hyper.warmup_ratio * steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: schedule(step, total=steps, warmup=warmup)
    )
    return optimizer, scheduler


GROUP_BATCHES = 16  # batches per length group: sorting within it cuts padding, not randomness


def _batches(
    encoded: Sequence[Encoded], *, hyper: LoraHyperparams, steps: int, pad_id: int, skip: int = 0
) -> Iterator[Batch]:
    """Batches `skip + 1` .. `steps`; each epoch is a fresh seeded permutation (the last batch
    may be short), so a resumed run sees the batches the whole run would have."""
    generator = torch.Generator().manual_seed(hyper.seed)
    produced = 0
    while True:
        for chunk in _epoch(encoded, hyper=hyper, generator=generator):
            if produced == steps:
                return
            produced += 1
            if produced <= skip:
                continue
            yield pad_batch([encoded[i] for i in chunk], pad_id=pad_id)


def _epoch(
    encoded: Sequence[Encoded], *, hyper: LoraHyperparams, generator: torch.Generator
) -> list[list[int]]:
    """One epoch's batches as example indices: `ceil(n / batch_size)` of them either way.

    With `group_by_length` the seeded permutation is cut into groups of `GROUP_BATCHES` batches;
    each group is sorted by prompt length, split into batches, and the batches of the group are
    shuffled (the one short batch, if any, holds the shortest prompts of the last group). A batch
    pads to its longest example, so on prompts of mixed length most padding goes away, and every
    example is still seen once per epoch (as HF Trainer's `group_by_length`). The key leaves the
    completion out: on a classification task it is the label, and sorting by it would give
    batches of one label."""
    size = hyper.batch_size
    order = torch.randperm(len(encoded), generator=generator).tolist()
    if not hyper.group_by_length:
        return [order[begin : begin + size] for begin in range(0, len(order), size)]
    batches: list[list[int]] = []
    span = size * GROUP_BATCHES
    for start in range(0, len(order), span):
        group = sorted(order[start : start + span], key=lambda i: -encoded[i].prompt_len)
        chunks = [group[begin : begin + size] for begin in range(0, len(group), size)]
        shuffled = torch.randperm(len(chunks), generator=generator).tolist()
        batches.extend(chunks[i] for i in shuffled)
    return batches

"""ReLoRA (Lialin et al. 2023) inside one training job: merge-and-reinit cycles of the new adapter.

With `LoraHyperparams.relora_every = N`, `continual.training.train` ends a cycle after optimiser
steps N, 2N, ... (not after the last step): the adapter's update so far is set aside, its
trainable A and B restart (A Kaiming-uniform, B = 0, so the model's function is unchanged),
`relora_prune` of their optimizer state is zeroed by magnitude, and the learning rate drops to 0
and climbs back over `relora_warmup` steps. A sequence of rank-r cycles adds up to an update of
rank up to r (resets + 1).

Where a finished cycle goes: not into the base weight, as the paper merges. A job saves only its
new adapter, and in inc-, o- and am-lora several adapters share the base: a cycle merged there
would be missing from the saved adapter, and under am-lora's per-task gates it would act on every
task's inputs. Each cycle stays in the new adapter as frozen rows: every LoRA factor becomes a
torch parametrization

    A = [A_1; ...; A_k; A_live]  (r (k+1), in)      B = [B_1 ... B_k  B_live]  (out, r (k+1))

whose trainable tensor is A_live (r, in) / B_live (out, r), the very parameters the optimizer
and the strategy hold, and whose frozen part `CycleStack.done` is a buffer that checkpoints keep
(`mark_train_state`). The cycles share the adapter's scaling s, so s B A is the sum of their
updates, exactly. `ReLoraCycles.finish` leaves a plain LoRA adapter of rank r (k+1) with the same
s (lora_alpha = s x rank): PEFT's `add_weighted_adapter(..., "cat")` layout without folding s into
B, so a seq-lora stream that continues the adapter trains it at the same scale. It loads with
`PeftModel.from_pretrained` and is history for every strategy (ranks differ across tasks).

Layers: PEFT's `lora.Linear` (its trainable adapter: seq-, inc- and o-lora), restarted by PEFT's
own `reset_lora_parameters`; am-lora's `AmLoraLinear` (its new adapter), whose frozen stacks are
zero-padded as the new adapter's rank outgrows them (zero rows add nothing, and score nothing).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.nn.functional as F
from peft.tuners import lora
from torch import Tensor, nn
from torch.nn.utils import parametrize

from continual.checkpoint import mark_train_state
from continual.config import RELORA_PRUNE_DEFAULT, LoraHyperparams
from continual.errors import InvalidHyperparameter

if TYPE_CHECKING:
    from continual.strategies.am_lora_layer import AmLoraLinear
    from continual.training import LrSchedule

logger = logging.getLogger(__name__)


class CycleStack(nn.Module):
    """Parametrization of one LoRA factor: the finished cycles' part `done` before the live
    tensor along `dim` (0: A's rows, 1: B's columns); while `paused`, the live tensor itself
    (so that an in-place init through the module's attribute reaches the parameter)."""

    done: Tensor

    def __init__(self, live: Tensor, *, dim: int, cycles: int = 0) -> None:
        super().__init__()
        self.dim, self.paused = dim, False
        shape = list(live.shape)
        shape[dim] *= cycles  # a resumed run's finished cycles, filled by the checkpoint
        self.register_buffer("done", live.detach().new_zeros(shape))
        mark_train_state(self.done)

    def forward(self, live: Tensor) -> Tensor:
        if self.paused or self.done.shape[self.dim] == 0:
            return live
        return torch.cat([self.done, live], dim=self.dim)

    def absorb(self, live: Tensor) -> None:
        """Append the live tensor's value to the finished cycles."""
        self.done = torch.cat([self.done, live.detach()], dim=self.dim)
        mark_train_state(self.done)  # a new tensor: the mark is on the object


class _Slot(Protocol):
    """One layer's trainable adapter, as the cycles see it."""

    path: str

    def factors(self) -> tuple[tuple[nn.Module, str], tuple[nn.Module, str]]:
        """(module, tensor name) of A (r, in) and of B (out, r)."""
        ...

    def scaling(self) -> float: ...

    def reinit(self) -> None:
        """A Kaiming-uniform, B zero, in place (called while the stacks are paused)."""
        ...

    def fit(self, rank: int) -> None:
        """Let the layer take a new adapter of `rank` (its A and B are that wide now)."""
        ...

    def finish(self, rank: int) -> None:
        """Record the new adapter's rank; its scaling stays (lora_alpha = scaling x rank)."""
        ...


@dataclass
class _PeftSlot:
    path: str
    layer: lora.Linear
    name: str  # the PEFT adapter

    def factors(self) -> tuple[tuple[nn.Module, str], tuple[nn.Module, str]]:
        return (self.layer.lora_A[self.name], "weight"), (self.layer.lora_B[self.name], "weight")

    def scaling(self) -> float:
        return float(self.layer.scaling[self.name])

    def reinit(self) -> None:
        self.layer.reset_lora_parameters(self.name, init_lora_weights=True)

    def fit(self, rank: int) -> None:
        return None

    def finish(self, rank: int) -> None:
        self.layer.lora_alpha[self.name] = self.scaling() * rank
        self.layer.r[self.name] = rank
        setattr(self.layer.lora_A[self.name], "out_features", rank)  # noqa: B010  (an int)
        setattr(self.layer.lora_B[self.name], "in_features", rank)  # noqa: B010


@dataclass
class _AmLoraSlot:
    path: str
    layer: AmLoraLinear

    def factors(self) -> tuple[tuple[nn.Module, str], tuple[nn.Module, str]]:
        return (self.layer, "lora_A"), (self.layer, "lora_B")

    def scaling(self) -> float:
        return float(self.layer.scaling)

    def reinit(self) -> None:
        self.layer.reset_lora_parameters()  # PEFT's semantics: A kaiming-uniform, B zero

    def fit(self, rank: int) -> None:
        layer = self.layer
        pad = rank - layer.stack_rank
        if pad <= 0:
            return
        # frozen A (n, R, in) and scaled B (out, n, R) to rank R + pad: zero rows of A and
        # columns of B add nothing to B A, and the selector's probe B^T w is zero there.
        frozen_A = F.pad(layer.frozen_A.detach(), (0, 0, 0, pad))
        frozen_B = F.pad(layer.frozen_B.detach(), (0, pad))
        layer.frozen_A = nn.Parameter(frozen_A, requires_grad=False)
        layer.frozen_B = nn.Parameter(frozen_B, requires_grad=False)
        layer.stack_rank = rank

    def finish(self, rank: int) -> None:
        self.layer.alpha = self.scaling() * rank
        self.layer.rank = rank


def resets_before(step: int, *, every: int, total: int) -> int:
    """Resets done by the end of 1-based `step` of a `total`-step run: after every multiple of
    `every` that is not the last step."""
    return min(step, total - 1) // every


def restart_ramp(step: int, *, every: int, warmup: int) -> float:
    """Factor on the learning rate at 0-based `step` (ReLoRA's jagged schedule on top of the
    run's own): 0 at the first step after each reset (step = k * every, k >= 1), climbing
    linearly back to 1 over `warmup` steps; 1 before the first reset and when warmup = 0. The
    zero-rate step only refills the pruned optimizer moments."""
    if step < every or warmup == 0:
        return 1.0
    return min(1.0, (step % every) / warmup)


@dataclass
class ReLoraCycles:
    """The cycles of one `train` call: `install` before its optimizer exists, `after_step`
    after every optimiser step, `finish` after the last one."""

    every: int
    warmup: int  # re-warmup steps after each reset
    prune: float
    total: int  # the run's steps
    slots: list[_Slot]
    config: Any  # the trained PEFT adapter's LoraConfig (None for am-lora), updated by finish
    resets: int = 0

    @classmethod
    def install(
        cls, model: nn.Module, *, hyper: LoraHyperparams, total: int, step: int = 0
    ) -> ReLoraCycles:
        """Parametrize the trainable adapter of `model`; `step`: the checkpoint a run resumes
        from, whose finished cycles the stacks make room for (the checkpoint fills them)."""
        if hyper.relora_every is None:
            raise InvalidHyperparameter(field="relora_every", reason="ReLoRA is off")
        every = hyper.relora_every
        slots, config = _find_slots(model)
        done = resets_before(step, every=every, total=total)
        for slot in slots:
            for dim, (owner, name) in enumerate(slot.factors()):
                stack = CycleStack(getattr(owner, name), dim=dim, cycles=done)
                parametrize.register_parametrization(owner, name, stack, unsafe=True)
            slot.fit(_rank(slot))
        logger.info(
            "relora: %d layers, a reset every %d steps of %d (%d done)",
            len(slots), every, total, done,
        )  # fmt: skip
        return cls(
            every=every, warmup=hyper.relora_warmup_steps, prune=hyper.relora_prune,
            total=total, slots=slots, config=config, resets=done,
        )  # fmt: skip

    def schedule(self, base: LrSchedule) -> LrSchedule:
        """`base` with the learning rate restarting after each reset."""

        def restarted(step: int, *, total: int, warmup: int) -> float:
            ramp = restart_ramp(step, every=self.every, warmup=self.warmup)
            return base(step, total=total, warmup=warmup) * ramp

        return restarted

    def after_step(self, step: int, optimizer: torch.optim.Optimizer) -> bool:
        """Reset after 1-based `step` if a cycle ends there; whether it did."""
        if step % self.every != 0 or step >= self.total:
            return False
        self.reset(optimizer)
        return True

    @torch.no_grad()
    def reset(self, optimizer: torch.optim.Optimizer) -> None:
        """Move every live A and B into the finished cycles, restart them, prune their state."""
        live: list[nn.Parameter] = []
        for slot in self.slots:
            stacks = [_stack(owner, name) for owner, name in slot.factors()]
            originals = [_original(owner, name) for owner, name in slot.factors()]
            for stack, original in zip(stacks, originals, strict=True):
                stack.absorb(original)
            with _paused(stacks):
                slot.reinit()
            slot.fit(_rank(slot))
            live += originals
        zeroed = prune_optimizer_state(optimizer, live, ratio=self.prune)
        self.resets += 1
        logger.info("relora reset %d (%d optimizer state entries pruned)", self.resets, zeroed)

    @torch.no_grad()
    def finish(self) -> int:
        """Make the new adapter plain again: A and B hold every cycle (rank r (resets + 1)),
        scaling unchanged. Returns that rank."""
        ranks = set()
        for slot in self.slots:
            rank = _rank(slot)
            for owner, name in slot.factors():
                parametrize.remove_parametrizations(owner, name, leave_parametrized=True)
            if self.resets:
                slot.finish(rank)
            ranks.add(rank)
        if len(ranks) != 1:
            raise ValueError(f"the adapter's layers ended with different ranks {sorted(ranks)}")
        rank = ranks.pop()
        if self.config is not None and self.resets:
            self.config.lora_alpha = self.slots[0].scaling() * rank
            self.config.r = rank
        logger.info("relora: %d resets, the adapter has rank %d", self.resets, rank)
        return rank


def _find_slots(model: nn.Module) -> tuple[list[_Slot], Any]:
    """The layers of the model's one trainable adapter, and its PEFT config (None if am-lora)."""
    # Imported here: the strategies package imports continual.training, which imports this.
    from continual.strategies.am_lora_layer import AmLoraLinear

    slots: list[_Slot] = []
    names: set[str] = set()
    for path, module in model.named_modules():
        if isinstance(module, AmLoraLinear):
            if module.lora_A is not None and module.lora_A.requires_grad:
                slots.append(_AmLoraSlot(path=path, layer=module))
                names.add("am-lora")
        elif isinstance(module, lora.LoraLayer):
            for name, down in module.lora_A.items():
                if isinstance(down, nn.Linear) and down.weight.requires_grad:
                    slots.append(_peft_slot(path, module, name))
                    names.add(name)
    if not slots or len(names) != 1:
        found = sorted(names) or "none"
        raise ValueError(f"relora needs one trainable LoRA adapter in the model, found {found}")
    name = names.pop()
    configs = getattr(model, "peft_config", None)
    if name == "am-lora":
        return slots, None
    if not isinstance(configs, dict) or name not in configs:
        raise ValueError(f"relora: no PEFT config for adapter {name!r} (is the model a PeftModel?)")
    config = configs[name]
    if getattr(config, "use_rslora", False) or config.rank_pattern or config.alpha_pattern:
        raise ValueError(f"relora: adapter {name!r} has rsLoRA or per-layer ranks / alphas")
    return slots, config


def _peft_slot(path: str, layer: lora.LoraLayer, name: str) -> _PeftSlot:
    """Refuses layers whose update is not plain scale * B @ A (other layer types, DoRA, LoRA
    bias, merged into the base)."""
    if not isinstance(layer, lora.Linear):
        raise ValueError(f"{path}: relora cycles Linear LoRA layers, not {type(layer).__name__}")
    if layer.merged:
        raise ValueError(f"{path}: adapters are merged into the base weight; unmerge first")
    if layer.use_dora.get(name) or layer.lora_bias.get(name):
        raise ValueError(f"{path}: DoRA / LoRA-bias adapters are not plain scale * B @ A")
    return _PeftSlot(path=path, layer=layer, name=name)


def _parametrizations(owner: nn.Module, name: str) -> parametrize.ParametrizationList:
    found = owner.parametrizations[name]  # type: ignore[index]
    assert isinstance(found, parametrize.ParametrizationList)
    return found


def _stack(owner: nn.Module, name: str) -> CycleStack:
    stack = _parametrizations(owner, name)[0]
    assert isinstance(stack, CycleStack)
    return stack


def _original(owner: nn.Module, name: str) -> nn.Parameter:
    """The live (trainable) tensor under a factor's parametrization."""
    original = _parametrizations(owner, name).original
    assert isinstance(original, nn.Parameter)
    return original


def _rank(slot: _Slot) -> int:
    """The new adapter's rank as the layer sees it: finished cycles plus the live one."""
    (owner, name), _ = slot.factors()
    return int(getattr(owner, name).shape[0])


@contextmanager
def _paused(stacks: Sequence[CycleStack]) -> Iterator[None]:
    for stack in stacks:
        stack.paused = True
    try:
        yield
    finally:
        for stack in stacks:
            stack.paused = False


@torch.no_grad()
def prune_optimizer_state(
    optimizer: torch.optim.Optimizer,
    params: Iterable[nn.Parameter],
    *,
    ratio: float = RELORA_PRUNE_DEFAULT,
    rank_by: str = "exp_avg",
) -> int:
    """Magnitude-prune the optimizer state of `params`: per parameter, the `ratio` fraction
    (rounded to whole entries) of entries smallest in |state[rank_by]| (or in the first state
    tensor of the parameter's shape when there is no `rank_by`) are zeroed in *every* state
    tensor of that shape (Adam's exp_avg and exp_avg_sq); scalars such as the step count are
    kept. Returns the entries zeroed per parameter, summed. ratio=1 resets the state entirely.

    One mask per parameter: pruning exp_avg and exp_avg_sq each by its own magnitude leaves
    entries with a first moment but no second, whose next Adam step is m / eps (unbounded; on
    the tiny model A's norm grew 60x in one step at LR 1e-4)."""
    if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0 <= ratio <= 1:
        raise InvalidHyperparameter(field="ratio", reason=f"must be a number in [0, 1]: {ratio!r}")
    zeroed = 0
    for param in params:
        state = optimizer.state.get(param, {})
        tensors = [v for v in state.values() if torch.is_tensor(v) and v.shape == param.shape]
        if not tensors:
            continue
        count = round(ratio * param.numel())
        ranked = state.get(rank_by, tensors[0])
        smallest = ranked.abs().flatten().topk(count, largest=False, sorted=False).indices
        keep = torch.ones(param.numel(), dtype=torch.bool, device=ranked.device)
        keep[smallest] = False
        for value in tensors:
            value.mul_(keep.view_as(value))
        zeroed += count
    return zeroed

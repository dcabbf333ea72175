"""Fold a stream's state into a plain model, for every method: what a consolidation job and
`strata bench --consolidate-after` both run.

- **seq-lora, inc-lora, o-lora** (PEFT adapters whose updates add up): W <- W + sum_i s_i B_i A_i
  (`continual.consolidation.fold_into_base`). The fold is exact: the folded model's logits on
  the probe sequences are compared with the adapted model's (`Fold.max_logit_diff`), and the
  caller refuses a fold past its tolerance. o-lora keeps the folded tasks' input subspace as
  its memory.
- **am-lora**: each token mixes the adapters by its gates, so no single weight reproduces the
  mixture. The fold fits one: per AM-LoRA layer, the update D that best reproduces the layer's
  mixture output y_t = sum_i g_i(x_t) s_i B_i A_i x_t on the tokens x_t of a few sequences of
  every adapter's task (`probes`), by least squares, pulled towards the mean-gate fold
  P = sum_i gbar_i s_i B_i A_i (gbar_i: adapter i's gate averaged over its own task's tokens)
  in the input directions the probes do not cover:
      D = (Y^T X + lam P) (X^T X + lam I)^-1,  W <- W + D
  (a regression merge in the manner of RegMean, with the routed mixture as its target). With a
  gate that is the same for every token, D = P and the fold is exact. All layers are fitted on
  the routed model's inputs at once; `by_block` fits decoder block after block on the inputs
  the blocks folded before it give (the same accuracy on the generated tasks,
  docs/notes/2026-12-03-folding-am-lora.md,
  for one pass over the probes per block). The fitted fold is then corrected end to end by
  distillation from the routed state (`continual.fold_distill`, `DISTILL`; 2026-12-05: order 2
  seed 1's prompt-scoped fold lost agnews 1.0 points instead of 26.0). The folded tasks are then
  served by the snapshot itself: the memory keeps the router's statistics of every folded task,
  and a later task's router sends their inputs to no adapter (the zero adapter). The fold is
  not exact, so the caller measures every task before and after and gates it (`check_drops`);
  O-LoRA's overlap term (`am-lora.lambda1`) keeps the adapters' input subspaces apart.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel
from torch import Tensor, nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from continual.batching import Encoded, encode_pair
from continual.config import (  # noqa: F401  (re-exported)
    EXACT_METHODS,
    FOLD_DISTILL_ANSWER_SHARE,
    FOLD_DISTILL_STEPS,
    FOLDABLE,
    GATED_METHODS,
)
from continual.consolidation import (
    MEMORY_DIR,
    Subspace,
    fold_into_base,
    folded_subspace,
    folded_weight_names,
    load_memory_adapter,
    save_memory_adapter,
    subspace_of,
)
from continual.data import TaskData
from continual.errors import ConsolidationRegressed
from continual.fold_distill import DistillSettings, distill, final_hidden
from continual.strategies.am_lora import am_lora_layers
from continual.strategies.am_lora_files import is_memory, write_memory_statistics
from continual.strategies.am_lora_layer import AmLoraLinear
from continual.strategies.am_lora_router import ROUTER_MODULE, TaskRouter

logger = logging.getLogger(__name__)

FOLD_ATOL = 1e-3  # fp32: summing B A into W reorders float additions, nothing more
FOLD_ATOL_HALF = 5e-2  # bf16 / fp16 weights round to ~3 significant digits when cast back
PROBES_PER_TASK = 16  # sequences of each adapter's task: the exact check, am-lora's fitted fold
# what `probe_sequences` draws: the fit takes the first PROBES_PER_TASK, the distillation all
# (2026-12-05, order 2 seed 0: 256 took the fold's agnews drop from 2.5 to 1.5 at 64 steps); the
# routed model's final hidden states on them are kept in memory, float32: 256 x T x d per task
SEQUENCES_PER_TASK = 256
RIDGE = 1e-2  # am-lora's fold: pull towards the mean-gate fold, relative to the input energy
FOLD_BY_BLOCK = False  # am-lora's fold: True fits block by block on partly folded inputs
WITH_MEMORY = ("o-lora", "am-lora")  # methods that keep a memory of the folded tasks
# am-lora's fold: corrects the fitted fold
DISTILL = DistillSettings(steps=FOLD_DISTILL_STEPS, answer_share=FOLD_DISTILL_ANSWER_SHARE)


@dataclass(frozen=True)
class Fold:
    """A stream state folded into a plain model."""

    model: PreTrainedModel  # the snapshot-to-be: every adapter's update in its weights
    changed: list[str]  # state-dict names of the weights the fold changed
    exact: bool  # the fold reproduces the adapted model (up to float rounding)
    max_logit_diff: float | None  # exact folds: max |logit difference| on the probes
    mean_gates: tuple[float, ...] | None  # am-lora: adapter i's mean gate on its task's tokens
    subspace: Subspace | None  # the memory's subspace: every folded task's A rows
    statistics: dict[str, Tensor] | None  # am-lora's router statistics of every folded task
    rows: tuple[str, ...] | None = None  # each statistics row's task label, when known
    distill_losses: tuple[float, ...] = ()  # am-lora: each distillation step's KL (nats/token)

    def write_memory(self, out_dir: Path) -> bool:
        """Write the memory of the folded tasks as `out_dir / MEMORY_DIR`; whether there is one."""
        if self.subspace is None:
            return False
        memory = Path(out_dir) / MEMORY_DIR
        save_memory_adapter(self.subspace, memory)
        if self.statistics is not None:
            write_memory_statistics(self.statistics, memory, rows=self.rows)
        return True


def fold_state(
    state: nn.Module,
    *,
    method: str,
    history: Sequence[Path],
    probes: Sequence[Sequence[Tensor]],
    by_block: bool | None = None,
    labels: Sequence[str] | None = None,
    distillation: DistillSettings | None = None,
    on_distill_step: Callable[[int, int, float], None] | None = None,
    prompts: Sequence[Sequence[int]] | None = None,
) -> Fold:
    """Fold `state`, the model `method`'s `inference_model` built from `history` (a memory of
    earlier folds first, if any, then the adapters), into its base weights. `probes[i]` holds
    token-id tensors (1, T) of the task of the i-th adapter after the memory; `labels[i]`, if
    given, its task's label, recorded with am-lora's router rows (after the memory's own).
    The exact check and am-lora's fitted fold use the first `PROBES_PER_TASK` of each task's
    sequences; `distillation` (default `DISTILL`), which corrects am-lora's fitted fold
    (`continual.fold_distill`), trains on all of them and reports each step as
    `on_distill_step(step, steps, kl)`; `prompts[i][j]`, the prompt length of `probes[i][j]`,
    lets it weight the completions (`DistillSettings.answer_share`; without `prompts` every
    position counts alike). Edits `state`'s weights in place."""
    if method not in FOLDABLE:
        raise ValueError(f"{method} streams cannot be consolidated (known: {FOLDABLE})")
    memory = Path(history[0]) if history and is_memory(Path(history[0])) else None
    previous = load_memory_adapter(memory) if memory is not None else None
    if method in GATED_METHODS:
        block = FOLD_BY_BLOCK if by_block is None else by_block
        return _fold_gated(state, probes=probes, previous=previous, by_block=block,
                           labels=labels, distillation=distillation or DISTILL,
                           on_distill_step=on_distill_step, prompts=prompts)  # fmt: skip
    if not isinstance(state, PeftModel):
        raise ValueError(f"{method} does not build a PEFT model to fold")
    inputs = [p for task in probes for p in task[:PROBES_PER_TASK]]
    reference = _logits(state, inputs)
    subspace = folded_subspace(state, previous=previous) if method in WITH_MEMORY else None
    changed = folded_weight_names(state)
    folded = fold_into_base(state)
    gap = max(
        (
            float((a - b).abs().max())
            for a, b in zip(reference, _logits(folded, inputs), strict=True)
        ),
        default=0.0,
    )
    return Fold(folded, changed, True, gap, None, subspace, None)


@torch.no_grad()
def _fold_gated(
    state: nn.Module,
    *,
    probes: Sequence[Sequence[Tensor]],
    previous: Subspace | None,
    by_block: bool,
    labels: Sequence[str] | None,
    distillation: DistillSettings,
    on_distill_step: Callable[[int, int, float], None] | None,
    prompts: Sequence[Sequence[int]] | None,
) -> Fold:
    layers = am_lora_layers(state)
    n = next(iter(layers.values())).num_adapters
    if len(probes) != n or not all(probes):
        raise ValueError(f"am-lora's fold needs probe sequences for each of its {n} adapters")
    sequences = [ids for task in probes for ids in task]
    lengths = None if prompts is None else [length for task in prompts for length in task]
    if lengths is not None and len(lengths) != len(sequences):
        raise ValueError("am-lora's fold needs one prompt length per probe sequence")
    teacher = final_hidden(state, sequences) if distillation.steps else []
    probes = [task[:PROBES_PER_TASK] for task in probes]
    rows: dict[str, list[Tensor]] = {}
    out_features: dict[str, int] = {}
    gates: dict[str, Tensor] = {}
    # Block by block in depth order when `by_block`: a block's inputs are probed with the blocks
    # before it already folded, so each fit sees the inputs the folded model will give it.
    for group in _blocks(list(layers)) if by_block else [list(layers)]:
        seen = _probe(state, probes, only=set(group))
        for path in group:
            layer = layers[path]
            weight = layer.base_layer.weight  # (out, in)
            lora_A, lora_B = layer.frozen_A.double(), layer.frozen_B.double()  # (n,R,in), (out,n,R)
            gated = torch.einsum("onr,n,nri->oi", lora_B, seen.gates[path].to(lora_A), lora_A)
            delta = _least_squares(seen.outputs[path], seen.grams[path], prior=gated)
            weight.copy_((weight.double() + delta).to(weight.dtype))  # (out, in)
            state.set_submodule(path, layer.base_layer)
            rows[path] = [lora_A.flatten(0, 1)]
            out_features[path] = int(weight.shape[0])
            gates[path] = seen.gates[path]
    router = getattr(state, ROUTER_MODULE, None)
    statistics = None
    labelled = None  # the memory's row labels the router was built with, then the adapters'
    if isinstance(router, TaskRouter):
        statistics = router.statistics()
        if router.folded_rows is not None and labels is not None:
            labelled = (*router.folded_rows, *labels)
        router.remove()
        delattr(state, ROUTER_MODULE)
    subspace = subspace_of(rows, out_features=out_features, previous=previous)
    per_task = torch.stack(list(gates.values())).mean(dim=0)  # (n,): over layers
    logger.info("am-lora fold: mean gates %s", [round(float(g), 3) for g in per_task])
    changed = sorted(f"{path}.weight" for path in layers)
    model: PreTrainedModel = state  # type: ignore[assignment]  # the base, with its layers back
    losses: list[float] = []
    if distillation.steps:
        with torch.enable_grad():
            model, losses = distill(
                model, teacher=teacher, sequences=sequences, targets=sorted(layers),
                settings=distillation, prompt_lengths=lengths,
                on_step=None if on_distill_step is None
                else lambda step, kl: on_distill_step(step, distillation.steps, kl),
            )  # fmt: skip
        model.requires_grad_(False)
        logger.info("am-lora fold: distilled, KL %.4f -> %.4f", losses[0], losses[-1])
    return Fold(
        model, changed, False, None, tuple(float(g) for g in per_task), subspace, statistics,
        labelled, tuple(losses),
    )  # fmt: skip


def _blocks(paths: list[str]) -> list[list[str]]:
    """Layer paths grouped by decoder block (`...layers.N.`), in the order given (depth order);
    a path outside any block is a group of its own."""
    groups: dict[str, list[str]] = {}
    for path in paths:
        found = re.match(r"^(.*\.layers\.\d+)\.", path)
        groups.setdefault(found.group(1) if found else path, []).append(path)
    return list(groups.values())


def _least_squares(outputs: Tensor, gram: Tensor, *, prior: Tensor) -> Tensor:
    """argmin_D sum_t ||D x_t - y_t||^2 + lam ||D - prior||_F^2 = (Y^T X + lam P)(X^T X + lam I)^-1
    from `outputs` Y^T X (out, in) and `gram` X^T X (in, in), float64; lam is `RIDGE` times the
    mean input energy per dimension, so directions the probes never saw keep `prior`."""
    dim = gram.shape[0]
    lam = RIDGE * float(gram.diagonal().mean()) + 1e-12
    system = gram + lam * torch.eye(dim, dtype=gram.dtype, device=gram.device)
    return torch.linalg.solve(system, (outputs + lam * prior).T).T  # gram is symmetric


@dataclass(frozen=True)
class _Probed:
    gates: dict[str, Tensor]  # path -> (n,): adapter i's mean gate on probes[i]'s tokens
    outputs: dict[str, Tensor]  # path -> (out, in): sum over tokens of y_t x_t^T, float64
    grams: dict[str, Tensor]  # path -> (in, in): sum over tokens of x_t x_t^T, float64


@torch.no_grad()
def _probe(
    model: nn.Module, probes: Sequence[Sequence[Tensor]], *, only: set[str] | None = None
) -> _Probed:
    """Run every probe sequence alone (no padding) through the routed model and collect, per
    AM-LoRA layer, what the fold needs: each adapter's gates on its own task's tokens, and the
    layer's inputs x_t and adapter outputs y_t (the mixture's part of the output) as sums."""
    layers = {p: m for p, m in am_lora_layers(model).items() if only is None or p in only}
    gates = {path: torch.zeros(len(probes), dtype=torch.float64) for path in layers}
    outputs: dict[str, Tensor] = {}
    grams: dict[str, Tensor] = {}
    counts = torch.zeros(len(probes), dtype=torch.float64)
    current = [0]

    def record(path: str, layer: AmLoraLinear, x: Tensor, out: Tensor) -> None:
        lora_A, lora_B = layer.stacked()  # (n*R, in), (out, n*R)
        h = (x.to(lora_A.dtype) @ lora_A.T).unflatten(-1, (-1, layer.stack_rank))  # (B, T, n, R)
        g = layer.gates(h, lora_B)  # (B, T, n + 1)
        gates[path][current[0]] += float(g[..., 1 + current[0]].sum())
        flat_x = x.reshape(-1, x.shape[-1]).double()  # (B*T, in)
        flat_y = (out - layer.base_layer(x)).reshape(-1, out.shape[-1]).double()  # (B*T, out)
        grams[path] = grams.get(path, 0) + flat_x.T @ flat_x
        outputs[path] = outputs.get(path, 0) + flat_y.T @ flat_x

    handles = [
        layer.register_forward_hook(lambda mod, args, out, p=path: record(p, mod, args[0], out))
        for path, layer in layers.items()
    ]
    device = next(model.parameters()).device
    try:
        model.eval()
        for index, sequences in enumerate(probes):
            current[0] = index
            for ids in sequences:
                model(input_ids=ids.to(device))
                counts[index] += ids.shape[-1]
    finally:
        for handle in handles:
            handle.remove()
    means = {path: (total / counts.clamp(min=1.0)).float() for path, total in gates.items()}
    return _Probed(gates=means, outputs=outputs, grams=grams)


def mean_gates(model: nn.Module, probes: Sequence[Sequence[Tensor]]) -> dict[str, Tensor]:
    """Per AM-LoRA layer, (n,): adapter i's gate averaged over every token of the sequences
    `probes[i]`, each run alone (no padding) through the routed model."""
    return _probe(model, probes).gates


def fold_tolerance(model: nn.Module) -> float:
    """How far an exact fold's logits may be from the adapted model's: fp32 weights, or weights
    that round when cast back to 16 bits."""
    return FOLD_ATOL if next(model.parameters()).dtype == torch.float32 else FOLD_ATOL_HALF


def encode_probes(
    tokenizer: PreTrainedTokenizerBase, data: TaskData, *, max_length: int, count: int | None = None
) -> list[Encoded]:
    """The first `count` (default `SEQUENCES_PER_TASK`) training pairs of a task (prompt and
    completion, cut as training cut them; test examples when it has no training split)."""
    return [
        encode_pair(tokenizer, prompt=ex.prompt, completion=ex.completion, add_eos=False,
                    max_length=max_length)
        for ex in (data.train or data.test)[: SEQUENCES_PER_TASK if count is None else count]
    ]  # fmt: skip


def probe_count(method: str, distillation: DistillSettings | None = None) -> int:
    """How many sequences of each task `fold_state(method=method, distillation=distillation)`
    reads: am-lora's distillation (default `DISTILL`), unless it has no steps, trains on
    `SEQUENCES_PER_TASK`; its fit, and an exact fold's logit check, read the first
    `PROBES_PER_TASK`."""
    distills = (distillation or DISTILL).steps > 0
    return SEQUENCES_PER_TASK if method in GATED_METHODS and distills else PROBES_PER_TASK


def probe_sequences(
    tokenizer: PreTrainedTokenizerBase, data: TaskData, *, max_length: int, count: int | None = None
) -> list[Tensor]:
    """`encode_probes`' sequences, each (1, T): a fold's probes."""
    return task_probes(tokenizer, data, max_length=max_length, count=count)[0]


def task_probes(
    tokenizer: PreTrainedTokenizerBase, data: TaskData, *, max_length: int, count: int | None = None
) -> tuple[list[Tensor], list[int]]:
    """`probe_sequences`' sequences and the prompt length of each (its completion follows):
    a task's `probes` and `prompts` for `fold_state`, from one encoding."""
    encoded = encode_probes(tokenizer, data, max_length=max_length, count=count)
    return [torch.tensor([e.ids]) for e in encoded], [e.prompt_len for e in encoded]


def fold_probes(
    tokenizer: PreTrainedTokenizerBase,
    tasks: Sequence[TaskData],
    *,
    max_length: int,
    count: int | None = None,
) -> tuple[list[list[Tensor]], list[list[int]]]:
    """`task_probes` of each task in order: `fold_state`'s `probes` and `prompts`."""
    probes: list[list[Tensor]] = []
    prompts: list[list[int]] = []
    for data in tasks:
        sequences, lengths = task_probes(tokenizer, data, max_length=max_length, count=count)
        probes.append(sequences)
        prompts.append(lengths)
    return probes, prompts


def _logits(model: nn.Module, inputs: Sequence[Tensor]) -> list[Tensor]:
    device = next(model.parameters()).device
    with torch.no_grad():
        return [model(input_ids=p.to(device)).logits.float().cpu() for p in inputs]


@dataclass(frozen=True)
class TaskCheck:
    """One task's accuracy before and after a fold (fractions; None: not measured). A task the
    folded state has not learned yet (`learned=False`: one queued after the fold) is shown but
    not gated: a fold may only be refused for forgetting what it folds."""

    task: str
    before: float | None
    after: float
    learned: bool = True

    @property
    def drop_points(self) -> float:
        if self.before is None or not self.learned:
            return 0.0
        return 100.0 * (self.before - self.after)


def check_drops(checks: Sequence[TaskCheck], *, max_drop: float) -> None:
    """Raise `ConsolidationRegressed` (with the per-task table) when any task's accuracy drops
    by more than `max_drop` points."""
    # 1e-9: accuracies are fractions, so 0.8 - 0.7 is 10.000000000000002 points
    worst = [c for c in checks if c.drop_points > max_drop + 1e-9]
    if worst:
        raise ConsolidationRegressed(table=drop_table(checks), max_drop=max_drop,
                                     tasks=[c.task for c in worst])  # fmt: skip


def drop_table(checks: Sequence[TaskCheck]) -> str:
    """The checks as a plain-text table: task, before (routed), after (folded), drop."""
    lines = [f"{'task':<24} {'routed':>7} {'folded':>7} {'drop':>6}"]
    for c in checks:
        before = "-" if c.before is None else f"{100 * c.before:.1f}"
        drop = f"{c.drop_points:>6.1f}" if c.learned else "  (not learned yet)"
        lines.append(f"{c.task:<24} {before:>7} {100 * c.after:>7.1f} {drop}")
    return "\n".join(lines)

"""AM-LoRA: one LoRA adapter per task (earlier ones frozen) mixed by an attentional selector.

Every target linear layer becomes an `AmLoraLinear`: W0 x + sum_i g_i(x) DeltaW_i x with
g = softmax over a zero adapter plus every task adapter (see `am_lora_layer`).

Design choices:
- **Zero adapter score**: a learned logit per layer (entry 0 of `selector_bias`), the same for
  every token. Its output is 0, so there is nothing of its own to score; a constant logit lets
  the selector learn how much of the layer to leave untouched without adding a scorer on x.
- **Sparsity penalty**: `sparsity_weight` times the mean (over layers and tokens) Gini impurity
  1 - sum_i g_i^2 of the selector weights. An L1 on the softmax output is the constant 1, and an
  L1 on the pre-softmax scores pushes every score to 0, i.e. towards the *uniform* mixture. The
  impurity is 0 exactly when one adapter (or the zero adapter) takes all the weight and largest
  for the uniform mixture; it is a polynomial in g, so its gradient is bounded and cheap.
  Padding tokens count like the others (the layer does not see the attention mask).
- **Task routing** (`routing_weight`, default 1; 0 turns it off): the selector alone cannot
  route by input (trained on the new task's data only, it gives every task's tokens the same
  mixture; docs/notes/2026-11-23-am-lora-task-routing.md, "Why am-lora forgot"). A
  `TaskRouter` (see `am_lora_router`) keeps
  statistics of each task's training sequences (their mean token embedding's mean, and a pooled
  scatter matrix: no examples) and adds `routing_weight * log p(task | tokens so far)` from a
  linear discriminant to each task adapter's score. A new task trains with the earlier adapters'
  scores at -inf, as the router will use it. A stream whose history lacks statistics (started
  without routing) keeps being mixed by the selector alone.
- **What trains**: the new task's A and B and the selector. Without routing, the whole selector
  of every layer trains (the rows of earlier adapters too: the selector learns to weigh all
  adapters with each task). With routing, only the new adapter's row does; the earlier rows and
  the zero logit are held as saved. Earlier adapters are frozen parameters that no gradient
  reaches. A new adapter's selector row starts with a zero dense layer and a bias that gives it
  `initial_share` of every token's weight at the start of its task (default one half: the
  logsumexp of the earlier logits; see `am_lora_layer._head_start`). Its output is scaled by
  that share, so the share sets how fast the task is learned at a given learning rate.
- **Selector learning rate**: `selector_lr_scale` (default 1) times the run's. Adam moves a
  logit by about the learning rate per step, so at a LoRA rate (1e-3) and a short task the
  selector stays near its start: without routing, each new adapter takes about half of every
  token's weight, halving the earlier adapters' shares. A faster selector (30x) moves the
  shares, but by what helps the task being learned, and it gives every task's tokens the same
  mixture either way. 30x helped in 32-step pilots and hurt in the full 63-step run.
- **Files**: each task's directory holds that task's A and B as a plain PEFT LoRA adapter
  (`adapter_config.json` + `adapter_model.safetensors`, loadable by `PeftModel.from_pretrained`)
  plus `selector.safetensors`, the selector trained with that task (rows for the zero adapter
  and tasks 0..t) and, with routing, the router's statistics of tasks 0..t (d x d + (t + 1) x
  (d + 1) floats: 1.3 MB for SmolLM2's 576-wide embedding). Inference uses the adapters of all
  history directories and the newest selector. Everything is safetensors; nothing is pickled.
- **O-LoRA's terms** (`lambda1`, `lambda2`, default 0): `lambda1` times the L1 overlap
  ||A_old A_new^T||_1 between the new adapter's A and the A rows of every earlier adapter and of
  the folded tasks' memory (`lambda1_norm`: `mean` over layers per earlier rank, the default
  here, or the paper's `sum`; see `o_lora`), and `lambda2` times the Frobenius norms of the new
  A and B. The overlap term keeps the adapters' input subspaces apart, which is what lets a
  consolidation sum them into one weight (`continual.fold`) with less interference.
- **Warm start** (`warm_start`, default off): the new adapter starts as a copy of the newest
  earlier adapter (A and B, at the new adapter's scale) instead of A random and B zero. With
  routing a new task trains with the earlier adapters masked, so without it each task starts
  from the bare base (or the snapshot), where inc-lora's new adapter adds to the earlier ones.
  The composed settings turn it on: on SmolLM2 it ended as high or higher on four of four runs
  (BENCHMARKS.md); on unrelated tasks of a tiny random model a copy can be a worse start.
- **After a consolidation** the history starts with the memory of the folded tasks
  (`am_lora_files`): the snapshot serves those tasks, the router keeps their statistics and
  gives their inputs to no adapter, and only the adapters trained since are mixed.
- **Models**: `prepare` and `inference_model` return the base model itself with its target
  linear layers replaced in place (as PEFT injects its layers), not a `PeftModel`: the mixture
  is no PEFT method, though each task's adapter on disk is a PEFT adapter.
"""

from __future__ import annotations

import json
import logging
import weakref
from collections.abc import Sequence
from pathlib import Path

import peft
import torch
from safetensors.torch import save_file
from torch import Tensor, nn
from transformers import PreTrainedModel

from continual.config import LoraHyperparams
from continual.errors import InvalidHyperparameter
from continual.options import AmLoraOptions
from continual.strategies.am_lora_files import (
    FOLDED_ROWS_KEY,
    SELECTOR_FILE,
    Memory,
    adapter_modules,
    load_adapters,
    load_selector,
    load_statistics,
    saved_folded_rows,
    select_rows,
    split_history,
)
from continual.strategies.am_lora_layer import AmLoraLinear
from continual.strategies.am_lora_router import (
    COUNTS,
    MEANS,
    ROUTER_MODULE,
    WITHIN,
    TaskRouter,
    empty_statistics,
)
from continual.strategies.base import register_strategy
from continual.strategies.common import (
    ADAPTER_WEIGHTS,
    LORA_A_SUFFIX,
    LORA_B_SUFFIX,
    PEFT_PREFIX,
    check_adapter_fits,
)
from continual.strategies.o_lora import PenaltyGroup, overlap_penalty, penalty_groups
from continual.training import set_lr_scale

logger = logging.getLogger(__name__)

Selector = tuple[Tensor, Tensor]  # (weight (n, out), bias (n + 1,)) of one layer


@register_strategy
class AmLora:
    """Per-task adapters mixed per token by a selector trained with every new task."""

    name = "am-lora"

    def __init__(self, options: AmLoraOptions | None = None) -> None:
        self.options = AmLoraOptions() if options is None else options
        self._overlap: tuple[weakref.ref[nn.Module], tuple[PenaltyGroup, ...]] | None = None

    def prepare(
        self, base: PreTrainedModel, *, history: Sequence[Path], hyper: LoraHyperparams
    ) -> PreTrainedModel:
        # Each task draws its A matrices from its own seed, not a copy of the first task's.
        torch.manual_seed(hyper.seed + len(history))
        for adapter_dir in history:
            check_adapter_fits(base, adapter_dir)
        memory, adapters = split_history(history)
        base.requires_grad_(False)
        targets = _target_linears(base, hyper.target_modules)
        frozen = load_adapters(adapters, modules=sorted(targets))
        selector: dict[str, Selector] = {}
        if adapters:
            selector = load_selector(adapters[-1], num_adapters=len(adapters), modules=targets)
        for path in sorted(targets):  # sorted: the random init does not depend on dict order
            weight, bias = selector.get(path, (None, None))
            layer = AmLoraLinear(
                targets[path],
                frozen=frozen.get(path),
                rank=hyper.rank,
                alpha=hyper.alpha,
                dropout=hyper.dropout,
                selector_weight=weight,
                selector_bias=bias,
                initial_share=self.options.initial_share,
            )
            scale = self.options.selector_lr_scale  # 1: the run's group
            set_lr_scale(layer.selector_weight, scale)
            set_lr_scale(layer.selector_bias, scale)
            if self.options.warm_start:
                layer.start_from_last()
            base.set_submodule(path, layer)
        routed = self._route(base, memory=memory, adapters=adapters, learning=True)
        # the earlier rows are copied for the overlap term only when it is on
        groups = _overlap_groups(base, memory=memory) if self.options.lambda1 > 0 else ()
        self._overlap = (weakref.ref(base), groups)
        logger.info(
            "am-lora: %d layers, %d earlier adapters, %d folded tasks, %s",
            len(targets), len(adapters), memory.num_tasks if memory else 0,
            "task routing" if routed else "no task routing",
        )  # fmt: skip
        return base

    def _route(
        self,
        base: PreTrainedModel,
        *,
        memory: Memory | None,
        adapters: Sequence[Path],
        learning: bool,
    ) -> bool:
        """Install a `TaskRouter` on the AM-LoRA model `base` when routing is on and every task
        (folded or with an adapter) has statistics; whether it did."""
        if self.options.routing_weight == 0:
            return False
        embedding = base.get_input_embeddings()
        if not isinstance(embedding, nn.Embedding):
            raise ValueError(
                f"am-lora routing needs a model with an input embedding, not {type(embedding)}"
            )
        dim = int(embedding.weight.shape[1])
        folded = memory.num_tasks if memory is not None else 0
        rows = memory.rows if memory is not None else ()
        if adapters:
            stats = _newest_statistics(adapters[-1], folded_rows=rows, folded=folded,
                                       adapters=len(adapters), dim=dim)  # fmt: skip
        elif memory is not None and memory.statistics is not None:
            stats = memory.statistics
        else:
            stats = empty_statistics(dim)
        if stats is None or bool((stats[COUNTS] <= 0).any()):
            (logger.warning if learning else logger.debug)(
                "am-lora: %s has no task statistics for every task (the stream was started "
                "without routing, or a task saw no data); its adapters are mixed by the selector "
                "alone",
                adapters[-1] if adapters else "the memory of folded tasks",
            )
            return False
        layers = list(am_lora_layers(base).values())
        if learning and adapters:
            for layer in layers:
                layer.hold_history_rows()
        router = TaskRouter(
            embedding,
            layers,
            means=stats[MEANS],
            counts=stats[COUNTS],
            within=stats[WITHIN],
            weight=self.options.routing_weight,
            learning=learning,
            num_folded=folded,
            scope=self.options.routing_scope,
        ).to(embedding.weight.device)
        router.folded_rows = rows  # saved with the new adapter's statistics
        base.add_module(ROUTER_MODULE, router)
        router.install(base.get_decoder())
        return True

    def extra_loss(self, model: nn.Module) -> Tensor | None:
        """`sparsity_weight` x mean Gini impurity of the selector over the last forward pass,
        plus O-LoRA's terms on the new adapter: `lambda1` x its A's overlap with every earlier
        adapter's A and the folded tasks' subspace, `lambda2` x the norms of its A and B."""
        terms: list[Tensor] = []
        layers = am_lora_layers(model)
        if self.options.sparsity_weight > 0:
            values = []
            for layer in layers.values():
                if layer.last_impurity is not None:
                    values.append(layer.last_impurity)
                    layer.last_impurity = None  # do not keep the graph alive past this step
            if not values:
                raise RuntimeError("am-lora extra_loss needs a forward pass of the AM-LoRA model")
            terms.append(self.options.sparsity_weight * torch.stack(values).mean())
        if self.options.lambda1 > 0:
            if self._overlap is None or self._overlap[0]() is not model:
                raise ValueError("am-lora extra_loss needs the model this strategy prepared last")
            if self._overlap[1]:
                terms.append(
                    self.options.lambda1
                    * overlap_penalty(self._overlap[1], norm=self.options.lambda1_norm)
                )
        if self.options.lambda2 > 0:
            params = [p for layer in layers.values() for p in (layer.lora_A, layer.lora_B)]
            norms = [torch.linalg.vector_norm(p) for p in params if p is not None]
            terms.append(self.options.lambda2 * torch.stack(norms).sum())
        if not terms:
            return None
        return torch.stack(terms).sum()

    def save_adapter(self, model: nn.Module, out_dir: Path) -> None:
        layers = am_lora_layers(model)
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        config = _new_adapter_config(layers)
        tensors: dict[str, Tensor] = {}
        selector: dict[str, Tensor] = {}
        for path, layer in layers.items():
            assert layer.lora_A is not None and layer.lora_B is not None  # _new_adapter_config
            tensors[PEFT_PREFIX + path + LORA_A_SUFFIX] = layer.lora_A.detach().contiguous()
            tensors[PEFT_PREFIX + path + LORA_B_SUFFIX] = layer.lora_B.detach().contiguous()
            weight, bias = layer.selector()
            selector[path + ".weight"] = weight.detach().contiguous()
            selector[path + ".bias"] = bias.detach().contiguous()
        router = getattr(model, ROUTER_MODULE, None)
        if isinstance(router, TaskRouter):
            selector.update(router.statistics())
        config.save_pretrained(str(out_dir))
        save_file(tensors, str(out_dir / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        num_adapters = next(iter(layers.values())).num_adapters
        metadata = {"format": "pt", "method": self.name, "num_adapters": str(num_adapters)}
        if isinstance(router, TaskRouter) and router.folded_rows is not None:
            metadata[FOLDED_ROWS_KEY] = json.dumps(list(router.folded_rows))
        save_file(selector, str(out_dir / SELECTOR_FILE), metadata=metadata)
        logger.info("saved am-lora adapter %d to %s", num_adapters, out_dir)

    def inference_model(self, base: PreTrainedModel, *, history: Sequence[Path]) -> nn.Module:
        """The stream's model; the tasks of a leading memory are served by `base` itself (the
        snapshot they were folded into), so without later adapters it is `base`."""
        for adapter_dir in history:
            check_adapter_fits(base, adapter_dir)
        memory, adapters = split_history(history)
        if not adapters:
            return base.eval()
        base.requires_grad_(False)
        modules = sorted(adapter_modules(adapters[-1]))
        frozen = load_adapters(adapters, modules=modules)
        selector = load_selector(adapters[-1], num_adapters=len(adapters), modules=modules)
        for path in modules:
            linear = base.get_submodule(path)
            if not isinstance(linear, nn.Linear):
                raise ValueError(f"{adapters[-1]}: {path} is not a linear layer of this model")
            weight, bias = selector[path]
            layer = AmLoraLinear(
                linear,
                frozen=frozen[path],
                rank=None,
                alpha=1.0,  # only used by a new adapter
                selector_weight=weight,
                selector_bias=bias,
                train_selector=False,
            )
            base.set_submodule(path, layer)
        self._route(base, memory=memory, adapters=adapters, learning=False)
        return base.eval()


def _newest_statistics(
    newest: Path,
    *,
    folded_rows: tuple[str, ...] | None,
    folded: int,
    adapters: int,
    dim: int,
) -> dict[str, Tensor] | None:
    """The router statistics saved with the newest adapter, their folded rows matched by label
    to the memory's (`folded_rows`): a memory the worker stripped of retrained tasks' rows
    drops the same rows here. Unlabelled files must agree by count."""
    saved = saved_folded_rows(newest)
    if saved is None or folded_rows is None or saved == folded_rows:
        return load_statistics(newest, folded + adapters, dim)
    stats = load_statistics(newest, len(saved) + adapters, dim)
    if stats is None:
        return None
    missing = [label for label in folded_rows if label not in saved]
    if missing:
        raise ValueError(f"{newest}: its router statistics lack the folded rows {missing}")
    keep = [saved.index(label) for label in folded_rows]
    keep += list(range(len(saved), len(saved) + adapters))
    return select_rows(stats, keep)


def _overlap_groups(model: nn.Module, *, memory: Memory | None) -> tuple[PenaltyGroup, ...]:
    """Per layer, the new adapter's A against the A rows of every earlier adapter and of the
    folded tasks' subspace (zero padding rows dropped): the pairs of O-LoRA's overlap term."""
    pairs = []
    for path, layer in am_lora_layers(model).items():
        if layer.lora_A is None:
            continue
        old = [layer.frozen_A.flatten(0, 1)]  # (n_frozen * R, d_in)
        if memory is not None and path in memory.down:
            old.append(memory.down[path].to(layer.frozen_A))
        rows = torch.cat(old)
        rows = rows[rows.norm(dim=1) > 0]  # (r_old, d_in)
        if len(rows):
            pairs.append((rows, layer.lora_A))
    return penalty_groups(pairs)


def am_lora_layers(model: nn.Module) -> dict[str, AmLoraLinear]:
    """The model's AM-LoRA layers by module path; raises if it has none."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, AmLoraLinear)}
    if not layers:
        raise ValueError("the model has no AM-LoRA layers (was it built by am-lora prepare?)")
    return layers


def _target_linears(model: nn.Module, targets: Sequence[str]) -> dict[str, nn.Linear]:
    """Modules named like PEFT's list-form `target_modules` (the name or a dotted suffix)."""
    found: dict[str, nn.Linear] = {}
    for path, module in model.named_modules():
        if not any(path == t or path.endswith("." + t) for t in targets):
            continue
        if not isinstance(module, nn.Linear):
            raise InvalidHyperparameter(
                field="target_modules", reason=f"{path} is a {type(module).__name__}, not Linear"
            )
        found[path] = module
    if not found:
        raise InvalidHyperparameter(
            field="target_modules", reason=f"{list(targets)} match no layer of the model"
        )
    return found


def _new_adapter_config(layers: dict[str, AmLoraLinear]) -> peft.LoraConfig:
    """The PEFT config of the new adapter, which every layer must share."""
    shapes = {(layer.rank, layer.alpha, layer.dropout_p) for layer in layers.values()}
    if len(shapes) != 1 or any(layer.lora_A is None for layer in layers.values()):
        raise ValueError("the model has no new am-lora adapter of one shape to save")
    rank, alpha, dropout = shapes.pop()
    return peft.LoraConfig(
        r=int(rank or 0),
        lora_alpha=alpha,  # type: ignore[arg-type]  # hinted int; scaling = alpha / r
        lora_dropout=dropout,
        target_modules=sorted({path.rsplit(".", 1)[-1] for path in layers}),
        task_type="CAUSAL_LM",
        inference_mode=True,
    )

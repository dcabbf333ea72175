"""O-LoRA (Wang et al., 2023, "Orthogonal Subspace Learning for Language Model Continual
Learning"): a new adapter per task, trained so that its down projection reads a subspace
orthogonal to the ones the earlier tasks' adapters read.

Training task t: the earlier adapters are frozen and active (their sum is part of the model) and
the loss gains

    lambda1 * sum_layers sum_{i<t} || A_i A_t^T ||_1  +  lambda2 * sum_{p in new adapter} ||p||_2

where A_i (r_i, d_in) is task i's LoRA down projection, || . ||_1 the sum of absolute entries and
||p||_2 the Frobenius norm of each new LoRA matrix (A_t and B_t), as in the authors' reference
implementation (defaults lambda1=0.5, lambda2=0 are theirs as well). That sum is
`lambda1_norm="sum"`. The default, `"mean"`, divides each ||A_i A_t^T||_1 by r_i and averages over
the layers: summed over SmolLM2's 210 adapted layers the term held new tasks back (agnews learned
to 70 where inc-lora reached 82.5) and forgot more (BWT -7.3), while the mean learned every task
of both CL_Benchmark orders as inc-lora did, ending at BWT -6.0 and -3.0 on seed 0
(BENCHMARKS.md; why no pooling can forget much less: docs/notes/2026-12-05-olora-premise.md).

Why absolute entries rather than squared: the goal is exact orthogonality. A squared penalty's
gradient, 2 P A_i, vanishes as the overlap P = A_i A_t^T shrinks, so it leaves a small residual
overlap that the task loss can hold in place; the L1 gradient sign(P) A_i keeps a constant
magnitude and drives entries to (near) zero, which also matches the paper and the defaults above.
The A matrices enter unscaled (without alpha / r), so lambda1 does not depend on alpha. The
price: under Adam the L1 subgradient keeps flipping sign around zero, which slows the new
adapter's learning on short budgets (on the synthetic demo, 80 steps per task leave later tasks
near chance; the default 160 learn them), and a larger lambda1 trades plasticity for retention.

`lambda2_norm="update"` replaces the second term by lambda2 * sum_layers || s B_t A_t ||_F, the
norm of the new adapter's weight change (s = alpha / r). What protects earlier tasks is a bound on
how far the new adapter moves the outputs they read; orthogonal A matrices alone do not bound that
(docs/notes/2026-11-22-strategy-comparison-cl-benchmark.md). The paper's norm of the parameters
bounds it too, but its gradient on A (the
Kaiming-initialised down projection) is there from the first step, while B = 0 leaves A no task
gradient, so under Adam the term can shrink A before the task loss reaches it. The update's norm
is 0 with zero gradient on A while B = 0, and grows only with the change the adapter makes. It is
computed from r x r Gram matrices, ||B A||_F^2 = sum((B^T B) * (A A^T)), never forming B A. On the
SmolLM2 pilot (docs/notes/2026-11-22-strategy-comparison-cl-benchmark.md, "What limits o-lora's
learning") both forms learned and retained alike, so the paper's stays the default.

With `orthogonal_init` the new A starts orthogonal to the earlier ones (`project_out_history`),
so the penalty starts at zero and only has to keep it there; off by default, as in the paper.

The earlier adapters are folded into one frozen adapter with PEFT's
`add_weighted_adapter(..., combination_type="cat")`: A = [s_1 A_1; ...; s_n A_n],
B = [B_1 ... B_n], scaling 1, whose update sum_i s_i B_i A_i is exactly the sum of the separate
updates (up to float rounding). One rank-sum(r_i) branch per layer replaces n branches, in training
and in inference; inference needs no task id.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from torch import Tensor, nn
from transformers import PreTrainedModel

from continual.config import LoraHyperparams
from continual.options import OLoraOptions
from continual.strategies.base import register_strategy
from continual.strategies.common import save_peft_adapter
from continual.strategies.inc_lora import (
    activate,
    add_new_adapter,
    load_frozen_adapters,
    lora_tuner,
    newest_adapter,
    task_adapter_name,
    task_seed,
)

logger = logging.getLogger(__name__)

HISTORY_ADAPTER = "history"  # the folded earlier adapters


@dataclass
class PenaltyGroup:
    """Layers whose (old, new) A matrices have the same shapes, so one bmm covers them all."""

    old: Tensor  # (L, r_old, d_in): the frozen history's A matrices, unscaled, detached
    new: tuple[Tensor, ...]  # L new A matrices (parameters), each (r, d_in)

    def l1_overlap(self, *, per_earlier_rank: bool = False) -> Tensor:
        """Sum over the group's layers of ||A_old A_new^T||_1, each divided by its r_old rows
        when `per_earlier_rank`."""
        new = torch.stack(self.new)  # (L, r, d_in)
        if self.old.device != new.device or self.old.dtype != new.dtype:  # model moved
            self.old = self.old.to(device=new.device, dtype=new.dtype)
        products = torch.bmm(self.old, new.transpose(1, 2))  # (L, r_old, r)
        total = products.abs().sum()
        return total / self.old.shape[1] if per_earlier_rank else total

    @property
    def num_layers(self) -> int:
        return len(self.new)


@dataclass
class _UpdateGroup:
    """Layers whose new adapter has the same shapes: their update norms in one batched pass."""

    down: tuple[Tensor, ...]  # L new A matrices (parameters), each (r, d_in)
    up: tuple[Tensor, ...]  # L new B matrices (parameters), each (d_out, r)
    scaling: Tensor  # (L,): each layer's alpha / r

    def update_norms(self) -> Tensor:
        """(L,) Frobenius norms of scaling * B A."""
        a, b = torch.stack(self.down), torch.stack(self.up)  # (L, r, d_in), (L, d_out, r)
        gram = (torch.bmm(b.transpose(1, 2), b) * torch.bmm(a, a.transpose(1, 2))).sum((1, 2))
        # the epsilon keeps the gradient finite at B = 0, where it is 0 anyway (gram's is)
        return self.scaling.to(gram) * torch.sqrt(gram.clamp_min(0) + 1e-12)


@dataclass
class _Prepared:
    """What `extra_loss` needs, collected once in `prepare`."""

    model: weakref.ref[PeftModel]
    groups: tuple[PenaltyGroup, ...]
    new_params: tuple[nn.Parameter, ...]  # every matrix of the new adapter, for the L2 term
    updates: tuple[_UpdateGroup, ...]  # the new adapter's layers, for lambda2_norm="update"


def overlap_penalty(groups: Sequence[PenaltyGroup], *, norm: str) -> Tensor:
    """The overlap term before lambda1: `sum` adds ||A_old A_new^T||_1 over every layer (the
    paper's), `mean` averages over layers the overlap per earlier rank, ||A_old A_new^T||_1 /
    r_old (see the module docstring)."""
    if norm == "sum":
        return torch.stack([g.l1_overlap() for g in groups]).sum()
    per_layer = torch.stack([g.l1_overlap(per_earlier_rank=True) for g in groups]).sum()
    return per_layer / sum(g.num_layers for g in groups)


def fold_adapters(model: PeftModel, names: Sequence[str], *, into: str = HISTORY_ADAPTER) -> str:
    """Replace adapters `names` by one frozen active adapter `into` that computes their sum;
    returns its name (`names[0]` itself when there is only one: nothing to fold)."""
    if not names:
        raise ValueError("fold_adapters needs at least one adapter")
    if len(names) == 1:
        return names[0]
    for name in names:
        config = model.peft_config[name]
        if getattr(config, "use_rslora", False) or getattr(config, "use_dora", False):
            raise ValueError(f"adapter {name!r} uses rsLoRA or DoRA, which cannot be folded")
    lora_tuner(model).add_weighted_adapter(
        list(names), [1.0] * len(names), adapter_name=into, combination_type="cat"
    )
    activate(model, frozen=[into], trainable=None)
    for name in names:
        model.delete_adapter(name)
    return into


def subspace_overlap(model: PeftModel) -> float:
    """How much the newest adapter's input subspace overlaps the earlier adapters', in [0, 1].

    Per LoRA layer with both: with Q_old (d_in, r_old) and Q_new (d_in, r) orthonormal bases of
    the row spaces of the stacked earlier A matrices and of the new A, the overlap is
    ||Q_old^T Q_new||_F^2 / min(r_old, r), the mean squared cosine of the principal angles: 0 for
    orthogonal subspaces, 1 when one contains the other; about r_old / d_in for random ones. The
    result is the mean over layers. The newest adapter is the last active one, the earlier ones
    the other active adapters (separate or folded: row spaces do not depend on the scaling)."""
    active = list(lora_tuner(model).active_adapters)
    if len(active) < 2:
        raise ValueError(f"needs an earlier and a new active adapter, got {active}")
    old_names, new_name = active[:-1], active[-1]
    overlaps: list[float] = []
    with torch.no_grad():
        for module in model.modules():
            down = _down_projections(module)
            olds = [down[n] for n in old_names if n in down]
            if new_name not in down or not olds:
                continue
            q_old = _row_basis(torch.cat(olds))  # (d_in, r_old)
            q_new = _row_basis(down[new_name])  # (d_in, r)
            cosines = q_old.T @ q_new  # (r_old, r)
            overlaps.append(float(cosines.square().sum()) / min(q_old.shape[1], q_new.shape[1]))
    if not overlaps:
        raise ValueError("no LoRA layer holds both the new and an earlier adapter")
    return sum(overlaps) / len(overlaps)


def project_out_history(model: PeftModel, *, old_names: Sequence[str], new_name: str) -> None:
    """Start the new adapter orthogonal to the earlier ones: in every layer, remove from each
    row of the new A its component in the earlier A's row space, keeping the row's norm.

    The penalty then starts at zero instead of at the overlap of random subspaces (about
    r_old / d_in of the rows' energy), which otherwise dominates the first steps: B starts at
    zero, so the task loss gives A no gradient until B has grown."""
    with torch.no_grad():
        for module in model.modules():
            down = _down_projections(module)
            olds = [down[n] for n in old_names if n in down]
            if new_name not in down or not olds:
                continue
            new = down[new_name]  # (r, d_in)
            basis = _row_basis(torch.cat(olds)).to(new.dtype)  # (d_in, r_old)
            projected = new - (new @ basis) @ basis.T  # (r, d_in)
            norms = new.norm(dim=1, keepdim=True)  # (r, 1)
            # a row (almost) inside the old span keeps too little to rescale: draw it afresh
            lost = projected.norm(dim=1) < 1e-3 * norms.squeeze(1)
            if bool(lost.any()):
                fresh = torch.randn_like(new[lost])
                projected[lost] = fresh - (fresh @ basis) @ basis.T
            new.copy_(projected * norms / projected.norm(dim=1, keepdim=True).clamp_min(1e-12))


def _down_projections(module: nn.Module) -> dict[str, Tensor]:
    """Adapter name -> LoRA down projection A (r, d_in), for a LoRA layer; else empty."""
    return _lora_weights(module, "lora_A")


def _up_projections(module: nn.Module) -> dict[str, Tensor]:
    """Adapter name -> LoRA up projection B (d_out, r), for a LoRA layer; else empty."""
    return _lora_weights(module, "lora_B")


def _lora_weights(module: nn.Module, side: str) -> dict[str, Tensor]:
    matrices = getattr(module, side) if isinstance(module, LoraLayer) else None
    if not isinstance(matrices, nn.ModuleDict):
        return {}
    return {name: m.weight for name, m in matrices.items() if isinstance(m, nn.Linear)}


def _row_basis(matrix: Tensor) -> Tensor:
    """Orthonormal basis (d_in, k) of the row space of `matrix` (k, d_in), in float64."""
    q, _ = torch.linalg.qr(matrix.detach().double().T)  # reduced: (d_in, k)
    return q


def _update_groups(model: PeftModel, *, new_name: str) -> tuple[_UpdateGroup, ...]:
    """The new adapter's (A, B, scaling) in every layer, grouped by shapes."""
    groups: dict[tuple[int, ...], tuple[list[Tensor], list[Tensor], list[float]]] = {}
    for module in model.modules():
        if not isinstance(module, LoraLayer):
            continue
        down = _down_projections(module).get(new_name)
        up = _up_projections(module).get(new_name)
        if down is None or up is None:
            continue
        downs, ups, scales = groups.setdefault((*down.shape, up.shape[0]), ([], [], []))
        downs.append(down)
        ups.append(up)
        scales.append(float(module.scaling[new_name]))
    return tuple(
        _UpdateGroup(down=tuple(d), up=tuple(u), scaling=torch.tensor(c, dtype=torch.float64))
        for d, u, c in groups.values()
    )


def _penalty_groups(
    model: PeftModel, *, old_names: Sequence[str], new_name: str
) -> tuple[PenaltyGroup, ...]:
    """Pair every layer's stacked earlier A matrices with its new A, grouped by shapes."""
    pairs = []
    for module in model.modules():
        down = _down_projections(module)
        history = [down[n] for n in old_names if n in down]
        if new_name in down and history:
            pairs.append((torch.cat(history), down[new_name]))
    return penalty_groups(pairs)


def penalty_groups(pairs: Iterable[tuple[Tensor, Tensor]]) -> tuple[PenaltyGroup, ...]:
    """The overlap penalty's layers from (earlier A rows (r_old, d_in), new A (r, d_in)) pairs,
    one per layer, batched by shapes. The earlier rows are copied and detached: they are held
    as they are now (a strategy other than o-lora may keep its earlier adapters elsewhere)."""
    olds: dict[tuple[int, ...], list[Tensor]] = {}
    news: dict[tuple[int, ...], list[Tensor]] = {}
    for old, new in pairs:
        key = (*old.shape, new.shape[0])
        olds.setdefault(key, []).append(old.detach().clone())
        news.setdefault(key, []).append(new)
    return tuple(PenaltyGroup(old=torch.stack(olds[key]), new=tuple(news[key])) for key in olds)


@register_strategy
class OLora:
    """New adapter per task, kept orthogonal to the frozen earlier ones by a loss term."""

    name = "o-lora"

    def __init__(self, options: OLoraOptions | None = None) -> None:
        self.options = OLoraOptions() if options is None else options
        self._prepared: _Prepared | None = None

    def prepare(
        self, base: PreTrainedModel, *, history: Sequence[Path], hyper: LoraHyperparams
    ) -> PeftModel:
        new = task_adapter_name(len(history))
        seed = task_seed(hyper, task_index=len(history))
        if not history:
            model = add_new_adapter(base, name=new, hyper=hyper, seed=seed)
            self._remember(model, groups=())
            return model
        model = add_new_adapter(
            load_frozen_adapters(base, history), name=new, hyper=hyper, seed=seed
        )
        old = [task_adapter_name(i) for i in range(len(history))]
        if self.options.orthogonal_init:
            project_out_history(model, old_names=old, new_name=new)
        groups = _penalty_groups(model, old_names=old, new_name=new)  # before folding: raw A_i
        folded = fold_adapters(model, old)
        activate(model, frozen=[folded], trainable=new)
        self._remember(model, groups=groups)
        logger.info("o-lora: %d earlier adapters folded, training %r", len(old), new)
        return model

    def _remember(self, model: PeftModel, *, groups: tuple[PenaltyGroup, ...]) -> None:
        params = tuple(p for p in model.parameters() if p.requires_grad)
        updates = _update_groups(model, new_name=newest_adapter(model))
        self._prepared = _Prepared(
            model=weakref.ref(model), groups=groups, new_params=params, updates=updates
        )

    def extra_loss(self, model: PeftModel) -> Tensor | None:
        prepared = self._prepared
        if prepared is None or prepared.model() is not model:
            raise ValueError("o-lora extra_loss needs the model this strategy prepared last")
        terms: list[Tensor] = []
        if self.options.lambda1 > 0 and prepared.groups:
            terms.append(
                self.options.lambda1
                * overlap_penalty(prepared.groups, norm=self.options.lambda1_norm)
            )
        if self.options.lambda2 > 0 and self.options.lambda2_norm == "update":
            norms = torch.cat([g.update_norms() for g in prepared.updates])
            terms.append(self.options.lambda2 * norms.sum())
        elif self.options.lambda2 > 0:
            norms = torch.stack([torch.linalg.vector_norm(p) for p in prepared.new_params])
            terms.append(self.options.lambda2 * norms.sum())
        if not terms:
            return None
        return terms[0] if len(terms) == 1 else terms[0] + terms[1]

    def save_adapter(self, model: PeftModel, out_dir: Path) -> None:
        save_peft_adapter(model, out_dir, adapter_name=newest_adapter(model))

    def inference_model(self, base: PreTrainedModel, *, history: Sequence[Path]) -> nn.Module:
        if not history:
            return base.eval()
        model = load_frozen_adapters(base, history)
        folded = fold_adapters(model, [task_adapter_name(i) for i in range(len(history))])
        activate(model, frozen=[folded], trainable=None)
        return model.eval()

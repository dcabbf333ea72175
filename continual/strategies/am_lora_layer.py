"""The AM-LoRA layer: a frozen linear layer plus a stack of LoRA adapters mixed by a selector.

For an input x the layer returns

    W0 x + sum_i g_i(x) * DeltaW_i x,   DeltaW_i = scale_i * B_i @ A_i,
    g(x) = softmax([z, s_1(x), ..., s_n(x)]),   s_i(x) = w_i . (DeltaW_i x) + b_i

where index 0 is the **zero adapter** (its output is 0, so it has nothing to score: its score is
the learned logit z, the same for every token) and each task adapter's output passes its own
dense layer (w_i, b_i) to a score. Weights are per token. With task routing, each s_i also
gets the task router's log-prior for task i at that token (`route_logits`, set before every
forward pass; see `am_lora_router`), and while a task trains the earlier rows of (w, b) and z
can be held as saved (`hold_history_rows`).

Because a dense layer out -> 1 is linear, w_i . (scale_i B_i A_i x) = (scale_i B_i^T w_i) .
(A_i x): the scores come from the rank-r intermediate h_i = A_i x and the (N, n, out) stack of
adapter outputs is never materialised. All branches run in two matmuls: x against the n*r rows
of the stacked A's, then the gated h's against the n*r columns of the stacked B's. LoRA dropout
draws one mask on x for all branches (PEFT draws one per adapter).

The sparsity statistic of the last forward (mean over tokens of the Gini impurity 1 - sum g_i^2)
is kept on the layer for the strategy's extra loss; see `am_lora.AmLora` for why that penalty.

Storage: A stacks as (n, R, in) = the (n*R, in) matrix of the first matmul; B stacks are kept
out-major, (out, n, R) = the (out, n*R) matrix of the second, with each frozen adapter's scale
already folded in, so a forward pass copies no weights but the new adapter's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class FrozenAdapters:
    """Earlier tasks' adapters for one layer, zero-padded to a common rank R."""

    lora_A: Tensor  # (n, R, in)
    lora_B: Tensor  # (n, out, R)
    scaling: Tensor  # (n,)

    def __post_init__(self) -> None:
        n, rank, _ = self.lora_A.shape
        if self.lora_B.shape[0] != n or self.lora_B.shape[2] != rank:
            shapes = f"A {tuple(self.lora_A.shape)} and B {tuple(self.lora_B.shape)}"
            raise ValueError(f"{shapes} are not n adapters of one rank")
        if self.scaling.shape != (n,):
            raise ValueError(f"scaling must have shape ({n},), got {tuple(self.scaling.shape)}")


def stack_adapters(adapters: list[tuple[Tensor, Tensor, float]]) -> FrozenAdapters:
    """Stack (A (r_i, in), B (out, r_i), scale_i) triples, zero-padding every rank to the largest
    (zero rows of A and columns of B add nothing to B @ A)."""
    if not adapters:
        raise ValueError("no adapters to stack")
    rank = max(a.shape[0] for a, _, _ in adapters)
    lora_A = torch.stack([F.pad(a, (0, 0, 0, rank - a.shape[0])) for a, _, _ in adapters])
    lora_B = torch.stack([F.pad(b, (0, rank - b.shape[1])) for _, b, _ in adapters])
    scaling = torch.tensor([s for _, _, s in adapters], dtype=torch.float32)
    return FrozenAdapters(lora_A=lora_A, lora_B=lora_B, scaling=scaling)


class AmLoraLinear(nn.Module):
    """`base_layer` (frozen) + the selector-weighted sum of `frozen` adapters and, when `rank` is
    given, one new trainable adapter (initialised like PEFT: A Kaiming-uniform, B zero).

    Selector rows follow the adapters: `selector_weight` (n, out) and `selector_bias` (n + 1,)
    whose entry 0 is the zero adapter's logit. Rows missing from the given ones start at zero,
    but for the new adapter's bias (see `_head_start`). Both are trainable unless
    `train_selector=False`.
    """

    lora_A: nn.Parameter | None  # (r, in), the new adapter
    lora_B: nn.Parameter | None  # (out, r)

    def __init__(
        self,
        base_layer: nn.Linear,
        *,
        frozen: FrozenAdapters | None,
        rank: int | None,
        alpha: float,
        dropout: float = 0.0,
        selector_weight: Tensor | None = None,
        selector_bias: Tensor | None = None,
        train_selector: bool = True,
        initial_share: float = 0.5,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        weight = base_layer.weight  # (out, in)
        self.rank, self.alpha, self.dropout_p = rank, alpha, dropout
        self.dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        frozen = frozen if frozen is not None else _empty_stack(weight, rank=rank or 0)
        self.stack_rank = max(rank or 0, frozen.lora_A.shape[1])  # R
        n = frozen.lora_A.shape[0] + (rank is not None)
        if n == 0:
            raise ValueError("an AM-LoRA layer needs at least one adapter")
        frozen_A, frozen_B = _pad_frozen(frozen, rank=self.stack_rank, like=weight)
        self.frozen_A = nn.Parameter(frozen_A, requires_grad=False)  # (n_frozen, R, in)
        self.frozen_B = nn.Parameter(frozen_B, requires_grad=False)  # (out, n_frozen, R), scaled
        self.register_parameter("lora_A", None)
        self.register_parameter("lora_B", None)
        self.scaling = 0.0 if rank is None else alpha / rank  # the new adapter's
        if rank is not None:
            self.lora_A = nn.Parameter(weight.new_empty(rank, weight.shape[1]))
            self.lora_B = nn.Parameter(weight.new_zeros(weight.shape[0], rank))
            self.reset_lora_parameters()
        self.selector_weight = nn.Parameter(
            _selector_init(selector_weight, (n, weight.shape[0]), weight), train_selector
        )
        bias = _selector_init(selector_bias, (n + 1,), weight)
        if rank is not None and (selector_bias is None or selector_bias.shape[0] <= n):
            bias[n] = _head_start(bias[:n], share=initial_share)
        self.selector_bias = nn.Parameter(bias, train_selector)
        self.last_impurity: Tensor | None = None
        self.route_logits: Tensor | None = None  # (B or 1, T or 1, n), set by the task router
        self.skip_adapters = False  # set by the router: the snapshot alone serves this pass
        # The earlier rows while they are held (see `hold_history_rows`); buffers, so that they
        # follow the layer to a device, but not saved with it.
        self.held_weight: Tensor | None
        self.held_bias: Tensor | None
        self.register_buffer("held_weight", None, persistent=False)
        self.register_buffer("held_bias", None, persistent=False)

    def reset_lora_parameters(self) -> None:
        """The new adapter as PEFT's `LoraLayer.reset_lora_parameters(name, True)` starts one:
        A kaiming-uniform (a = sqrt(5), `nn.Linear`'s default), B zero, so B A = 0."""
        if self.lora_A is None or self.lora_B is None:
            raise ValueError("this AM-LoRA layer has no new adapter to reset")
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)

    def start_from_last(self) -> None:
        """Make the new adapter a copy of the newest frozen one: its A rows, and its B columns
        rescaled to the new adapter's scale (ranks that differ copy the common leading part;
        the rest keeps its fresh start)."""
        if self.lora_A is None or self.lora_B is None:
            raise ValueError("this AM-LoRA layer has no new adapter to start")
        if self.frozen_A.shape[0] == 0:
            return
        rank = min(self.lora_A.shape[0], self.frozen_A.shape[1])
        with torch.no_grad():
            self.lora_A[:rank] = self.frozen_A[-1, :rank]
            self.lora_B[:, :rank] = self.frozen_B[:, -1, :rank] / self.scaling

    def hold_history_rows(self) -> None:
        """Keep the earlier adapters' selector rows and the zero logit as they are now: the
        forward pass and `selector()` use these copies, whatever the optimiser does to the
        parameters' first rows (they get no gradient, but weight decay would move them)."""
        n_frozen = self.frozen_A.shape[0]
        self.held_weight = self.selector_weight[:n_frozen].detach().clone()
        self.held_bias = self.selector_bias[: n_frozen + 1].detach().clone()

    def selector(self) -> tuple[Tensor, Tensor]:
        """The selector in use: weight (n, out) and bias (n + 1,) (differentiable)."""
        weight, bias = self.selector_weight, self.selector_bias
        held_weight, held_bias = self.held_weight, self.held_bias
        if held_weight is None or held_bias is None:
            return weight, bias
        return (
            torch.cat([held_weight, weight[held_weight.shape[0] :]]),
            torch.cat([held_bias, bias[held_bias.shape[0] :]]),
        )

    @property
    def num_adapters(self) -> int:
        """Task adapters (frozen + new), not counting the zero adapter."""
        return int(self.selector_weight.shape[0])

    def stacked(self) -> tuple[Tensor, Tensor]:
        """All adapters, the new one last: A (n*R, in) and scaled B (out, n*R) (differentiable)."""
        n_frozen, rank, in_features = self.frozen_A.shape
        lora_A = self.frozen_A.reshape(n_frozen * rank, in_features)
        lora_B = self.frozen_B.reshape(self.frozen_B.shape[0], n_frozen * rank)
        if self.lora_A is None or self.lora_B is None:
            return lora_A, lora_B
        new_A: Tensor = self.lora_A  # (r, in)
        new_B = self.lora_B * self.scaling  # (out, r)
        if new_A.shape[0] < rank:
            new_A = F.pad(new_A, (0, 0, 0, rank - new_A.shape[0]))  # (R, in)
            new_B = F.pad(new_B, (0, rank - new_B.shape[1]))  # (out, R)
        return torch.cat([lora_A, new_A]), torch.cat([lora_B, new_B], dim=1)

    def gates(self, h: Tensor, lora_B: Tensor) -> Tensor:
        """Selector weights (..., n + 1) over [zero, adapter_1..n] from h = A x (..., n, R)."""
        n, rank = h.shape[-2:]
        weight, bias = self.selector()
        # w_i . (B_i h_i) = (B_i^T w_i) . h_i: the dense layer folded through B.
        probe = torch.einsum("onr,no->nr", lora_B.unflatten(1, (n, rank)), weight)
        scores = (h * probe).sum(dim=-1) + bias[1:]  # (..., n)
        if self.route_logits is not None:
            scores = _routed(scores, self.route_logits)
        zero = bias[:1].expand(*scores.shape[:-1], 1)  # (..., 1)
        return torch.softmax(torch.cat([zero, scores], dim=-1).float(), dim=-1)  # (..., n + 1)

    def forward(self, x: Tensor) -> Tensor:
        result = self.base_layer(x)  # (..., out)
        if self.skip_adapters:  # every gate of this pass is the zero adapter's: nothing to add
            return result
        lora_A, lora_B = self.stacked()  # (n*R, in), (out, n*R)
        h = self.dropout(x).to(lora_A.dtype) @ lora_A.T  # (..., n*R): every branch at once
        h = h.unflatten(-1, (-1, self.stack_rank))  # (..., n, R)
        g = self.gates(h, lora_B)  # (..., n + 1)
        if torch.is_grad_enabled():  # only training needs the sparsity statistic
            self.last_impurity = (1.0 - g.square().sum(dim=-1)).mean()
        mixed = (h * g[..., 1:, None].to(h.dtype)).flatten(-2)  # (..., n*R)
        return result + (mixed @ lora_B.T).to(result.dtype)  # (..., out)


def _routed(scores: Tensor, prior: Tensor) -> Tensor:
    """Scores (B, T, n) plus the router's log-prior, (B, T, n) or broadcastable to it."""
    if prior.dim() != scores.dim() or prior.shape[0] not in (1, scores.shape[0]):
        raise ValueError(
            f"the task router's prior of shape {tuple(prior.shape)} does not fit this layer's "
            f"scores {tuple(scores.shape)} (was the layer called outside the model's forward?)"
        )
    return scores + prior.to(scores.dtype)


def _empty_stack(like: Tensor, *, rank: int) -> FrozenAdapters:
    out_features, in_features = like.shape
    return FrozenAdapters(
        lora_A=like.new_zeros(0, rank, in_features),
        lora_B=like.new_zeros(0, out_features, rank),
        scaling=torch.zeros(0),
    )


def _pad_frozen(frozen: FrozenAdapters, *, rank: int, like: Tensor) -> tuple[Tensor, Tensor]:
    """A (n, R, in) and scale * B out-major (out, n, R), padded to rank R, on `like`'s device."""
    lora_A = frozen.lora_A.to(device=like.device, dtype=torch.float32)
    lora_B = frozen.lora_B.to(device=like.device, dtype=torch.float32)
    lora_B = lora_B * frozen.scaling.to(like.device)[:, None, None]  # (n, out, r)
    lora_A = F.pad(lora_A, (0, 0, 0, rank - lora_A.shape[1]))
    lora_B = F.pad(lora_B, (0, rank - lora_B.shape[2])).permute(1, 0, 2)
    return lora_A.to(like.dtype).contiguous(), lora_B.to(like.dtype).contiguous()


def _head_start(logits: Tensor, *, share: float = 0.5) -> Tensor:
    """The new adapter's initial logit: the logsumexp of the earlier ones (zero adapter first)
    plus logit(share).

    With its dense layer at zero too, it starts with `share` of every token's weight (with task
    routing, which masks the earlier adapters while it trains, at least that): it learns at a
    useful rate, and the sparsity term, which favours each token's dominant weight, does not
    starve it (from a 0 logit it starts as a minor option, and on the synthetic stream a task
    then stayed unlearned in one of three seeds). The adapter's output is scaled by its share,
    so a share of 0.5 learns the task about as fast as a plain LoRA at half the learning rate."""
    return torch.logsumexp(logits, dim=0) + math.log(share / (1.0 - share))


def _selector_init(value: Tensor | None, shape: tuple[int, ...], like: Tensor) -> Tensor:
    """The given selector rows, extended with zero rows up to `shape`."""
    out = like.new_zeros(shape)
    if value is None:
        return out
    if value.shape[0] > shape[0] or tuple(value.shape[1:]) != shape[1:]:
        raise ValueError(f"selector of shape {tuple(value.shape)} does not fit {shape}")
    out[: value.shape[0]] = value.to(device=like.device, dtype=like.dtype)
    return out

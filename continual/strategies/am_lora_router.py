"""Task routing for AM-LoRA: which task's adapter an input sequence belongs to, from statistics.

The selector alone cannot route by input: it is trained on the new task's data only, so nothing
teaches it to keep the new adapter away from earlier tasks' inputs
(docs/notes/2026-11-23-am-lora-task-routing.md, "Why am-lora forgot"). The router adds what it
lacks without keeping any earlier data:

- **Statistics, not examples.** While a task trains, the router sums each training sequence's
  representation: the mean of its token embeddings (the frozen base's input embedding, over the
  attention mask). A task keeps its mean representation and count; the stream keeps one pooled
  within-task scatter matrix (d x d). Nothing else of a task's data is kept.
- **A linear discriminant.** The probability that a sequence x belongs to task t is Gaussian
  discriminant analysis with the pooled covariance, shrunk towards its average variance
  (`SHRINKAGE`) so that a few hundred sequences in a 576-wide space give a stable inverse:
  log p(t | x) = log_softmax_t(w_t . e(x) + b_t), w_t = Sigma^-1 mu_t, b_t = -mu_t . w_t / 2,
  with equal priors. On CL_Benchmark's dbpedia, amazon, agnews and yelp, SmolLM2's mean token
  embedding identifies the task of 99% of test prompts from 128 training prompts each.
- **A causal prior on the selector's scores.** At every token, the router takes the mean
  embedding of the sequence so far (that token and the ones before it), and every AM-LoRA layer
  adds `weight * log p(t | x_1..i)` to task adapter t's score before the softmax over [zero,
  adapters]. Causal like the model: no token's routing depends on later tokens, so scoring a
  label after a prompt routes the prompt alike whichever label follows, and a prompt scored in
  one pass or through a KV cache gets the same prior. The selector still weighs the zero
  adapter against the adapters, and mixes the adapters of tasks the router cannot tell apart.
  With one task, or any task without statistics (a stream started without routing), there is no
  prior: the selector mixes alone.
- **Or a prior of the whole prompt** (`routing_scope=prompt`): a prompt's first tokens (an
  instruction alike in every task) say little about its task, and the causal prior routes them by
  that little. With the `prompt` scope each sequence's first pass is routed as a whole: every
  token gets the posterior of the whole pass, and the passes that continue its KV cache keep it.
  A prompt scored through a cache is then routed by the prompt alone; scored in one pass with a
  label, by both (a few tokens more).
- **Training knows the task.** While task t trains, its inputs are task t's by definition: the
  earlier adapters' scores get -inf, so the new adapter learns alone (beside the zero adapter),
  as it will be used once the router sends its task's inputs to it. The earlier rows of the
  selector and the zero logit are held as they were saved (`AmLoraLinear.hold_history_rows`):
  no task changes how an earlier task's inputs are mixed.
- **KV caches.** A pass that continues a cache (generation, or prefix scoring's label pass)
  continues the sums of the sequences that filled it: after each pass the router binds the
  sequences' embedding sums and token counts to the cache the decoder returned (weakly, so they
  go with the cache), and repeats them when a cache is repeated per sequence.

The router is a submodule of the model (`am_lora_router`) and runs as forward hooks on the
decoder, which both `model(...)` and the prefix scorer's direct decoder call go through. Its
running sums for the new task are training state: `continual.checkpoint` saves and restores them
(`mark_train_state`), so a resumed task ends with the statistics of every step.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from continual.checkpoint import mark_train_state
from continual.options import ROUTING_SCOPES
from continual.strategies.am_lora_layer import AmLoraLinear

SHRINKAGE = 0.5
"""Weight of the scaled identity in the shrunk covariance (1 - s) Sigma + s (tr Sigma / d) I."""
ROUTER_MODULE = "am_lora_router"
SERVED_BY_SNAPSHOT = 0.999
"""Posterior mass on the folded tasks from which a sequence is served by the snapshot alone."""
MEANS, COUNTS, WITHIN = "router.means", "router.counts", "router.within"
"""Keys of a task stream's statistics in an AM-LoRA selector file."""
_Continued = tuple[Tensor, Tensor, Tensor | None]
"""What a KV cache's sequences carry to the pass that continues them: their embedding sums,
token counts, and the log posterior decided on their first pass."""


class TaskRouter(nn.Module):
    """Statistics of the stream's tasks and the prior they give the model's AM-LoRA layers.

    `means` (n, d), `counts` (n,) and `within` (d, d) describe the tasks in `history` (n may be
    0). With `learning`, the model trains a new task: its sequences are summed into `new_sum`,
    `new_count` and `new_outer` and the earlier adapters are kept out of its forward passes.

    The first `num_folded` tasks were folded into the base snapshot by a consolidation: they keep
    their statistics but have no adapter, so the layers get the prior of the other tasks only.
    A sequence the router gives to a folded task is served by the snapshot itself: no adapter
    takes part, and a pass of such sequences skips the adapters (`_route_pass`).
    """

    means: Tensor  # buffers, float64
    counts: Tensor
    within: Tensor
    new_sum: Tensor
    new_count: Tensor
    new_outer: Tensor

    def __init__(
        self,
        embedding: nn.Embedding,
        layers: Sequence[AmLoraLinear],
        *,
        means: Tensor,
        counts: Tensor,
        within: Tensor,
        weight: float,
        learning: bool,
        num_folded: int = 0,
        scope: str = "causal",
    ) -> None:
        super().__init__()
        if scope not in ROUTING_SCOPES:
            raise ValueError(f"routing scope {scope!r} is not one of {', '.join(ROUTING_SCOPES)}")
        self.scope = scope
        dim = embedding.weight.shape[1]
        fits = means.shape[1:] == (dim,) and counts.shape == means.shape[:1]
        if not fits or within.shape != (dim, dim):
            raise ValueError(
                f"router statistics of shapes {tuple(means.shape)}, {tuple(counts.shape)} and "
                f"{tuple(within.shape)} do not fit an embedding of width {dim}"
            )
        # Plain attributes, not submodules: both already belong to the model.
        self._embedding = (embedding,)
        self._layers = tuple(layers)
        self.weight = weight
        self.learning = learning
        if not 0 <= num_folded <= means.shape[0]:
            raise ValueError(f"{num_folded} folded tasks of {means.shape[0]} with statistics")
        self.num_folded = num_folded
        self.folded_rows: tuple[str, ...] | None = None  # the folded tasks' labels, if known
        self._hooks: list[Any] = []
        self.register_buffer("means", means.to(torch.float64))
        self.register_buffer("counts", counts.to(torch.float64))
        self.register_buffer("within", within.to(torch.float64))
        for name, shape in (("new_sum", (dim,)), ("new_count", ()), ("new_outer", (dim, dim))):
            self.register_buffer(name, torch.zeros(shape, dtype=torch.float64))
            mark_train_state(getattr(self, name))
        self._cached: tuple[float, Tensor, Tensor] | None = None  # (sum of counts, w, b)
        # Per KV cache: the embedding sums and token counts of the sequences it holds.
        self._continuations: weakref.WeakKeyDictionary[Any, _Continued] = (
            weakref.WeakKeyDictionary()
        )
        self._pending: _Continued | None = None

    # -- statistics -------------------------------------------------------------------------

    def statistics(self) -> dict[str, Tensor]:
        """Every task's statistics as the tensors of a selector file (float32), the new task's
        last when learning (a mean of zeros and a count of 0 if it has seen no sequence)."""
        means, counts, within = self._current()
        return {
            MEANS: means.float().contiguous(),
            COUNTS: counts.float().contiguous(),
            WITHIN: within.float().contiguous(),
        }

    def _counts(self) -> Tensor:
        if not self.learning:
            return self.counts
        return torch.cat([self.counts, self.new_count[None]])

    def _current(self) -> tuple[Tensor, Tensor, Tensor]:
        if not self.learning:
            return self.means, self.counts, self.within
        count = self.new_count
        mean = self.new_sum / count.clamp(min=1.0)
        scatter = self.new_outer - count * torch.outer(mean, mean)
        means = torch.cat([self.means, mean[None]])
        return means, self._counts(), self.within + scatter

    def log_posterior(self, features: Tensor) -> Tensor | None:
        """log p(task | x) (..., n) for sequence representations (..., d); None unless there
        are two or more tasks and every one has statistics (a stream started without routing)."""
        counts = self._counts()
        if len(counts) < 2 or bool((counts <= 0).any()):
            return None
        key = float(counts.sum())  # grows with every sequence a learning router sees
        if self._cached is None or self._cached[0] != key:
            # As saved (float32), so that the model that trained a task and the one rebuilt
            # from its files route alike.
            means, counts, within = (t.float().double() for t in self._current())
            self._cached = (key, *_discriminant(means, counts, within))
        _, w, b = self._cached
        return torch.log_softmax(features.to(torch.float64) @ w.T + b, dim=-1)

    # -- the hooks --------------------------------------------------------------------------

    def install(self, decoder: nn.Module) -> None:
        self._hooks = [
            decoder.register_forward_pre_hook(self._before_decoder, with_kwargs=True),
            decoder.register_forward_hook(self._after_decoder, with_kwargs=True),
        ]

    def remove(self) -> None:
        """Take the router's hooks off the decoder (the model no longer routes)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def _before_decoder(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        embeds, mask = self._inputs(args, kwargs)  # (B, T, d), (B, T)
        weighted = embeds * mask[..., None]
        skip = False
        if self.learning and module.training:
            prior = self._learn(weighted.sum(dim=1) / mask.sum(dim=1, keepdim=True).clamp(min=1.0))
            if prior is not None:
                prior = prior[..., self.num_folded :]  # (1, 1, adapters): folded tasks have none
            self._pending = None
        else:
            prior, skip = self._route_pass(_cache_of(kwargs), weighted, mask)
        for layer in self._layers:
            layer.route_logits = prior
            layer.skip_adapters = skip

    def _route_pass(self, past: Any, weighted: Tensor, mask: Tensor) -> tuple[Tensor | None, bool]:
        """The layers' prior (B, T, adapters) for an inference pass over masked embeddings
        `weighted` (B, T, d), and whether no sequence of it needs an adapter.

        Each sequence's first pass (the prompt, when a cache is continued) decides its task
        posterior on the whole of that pass; the passes that continue its cache keep it. With
        the `prompt` scope every token is routed by that decision; with `causal`, each token by
        the sequence up to it (the first tokens of a prompt by those few tokens alone).

        A sequence the router gives to the folded tasks (their decided posterior mass at least
        `SERVED_BY_SNAPSHOT`) is served by the snapshot alone: every adapter's prior is -inf at
        each of its tokens, so its gates are exactly the zero adapter's, in any batch. When every
        sequence of a pass is, the layers skip the adapters' branches: a folded task costs
        what the snapshot costs."""
        sums, counts, decided = self._continued(past, batch=len(weighted))
        sums = sums[:, None] + weighted.cumsum(dim=1)  # (B, T, d): this token and before
        counts = counts[:, None] + mask.cumsum(dim=1)[..., None]  # (B, T, 1)
        log_p = self.log_posterior(sums / counts.clamp(min=1.0))
        if log_p is None:
            self._pending = (sums[:, -1], counts[:, -1], decided)
            return None, False
        if decided is None:  # a new pass: decide on the whole of it
            decided = log_p[:, -1]  # (B, tasks)
        if self.scope == "prompt":
            log_p = decided[:, None].expand_as(log_p)
        prior = (self.weight * log_p).float()[..., self.num_folded :]  # folded tasks: none
        served = None
        if self.num_folded:
            served = decided[:, : self.num_folded].exp().sum(dim=-1) >= SERVED_BY_SNAPSHOT
            prior = prior.masked_fill(served[:, None, None], float("-inf"))
        self._pending = (sums[:, -1], counts[:, -1], decided)
        return prior, served is not None and bool(served.all())

    def _after_decoder(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> None:
        """Bind the sums of the sequences that just ran to the KV cache they filled, for the
        pass that continues them."""
        cache = getattr(output, "cache", None)
        if self._pending is not None and cache is not None:
            # A cache that cannot be weakly referenced gets no continuation.
            with contextlib.suppress(TypeError):
                self._continuations[cache] = self._pending
        self._pending = None

    def _inputs(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """The pass's token embeddings (B, T, d) and which of them are real tokens (B, T)."""
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            input_ids = kwargs.get("input_ids", args[0] if args else None)
            if input_ids is None:
                raise ValueError("the AM-LoRA router needs input_ids or inputs_embeds")
            embeds = self._embedding[0](input_ids)
        embeds = embeds.detach().to(torch.float64)
        mask = kwargs.get("attention_mask")
        if isinstance(mask, Tensor) and mask.dim() == 2 and mask.shape[0] == embeds.shape[0]:
            mask = mask[:, -embeds.shape[1] :]  # with a cache, the mask covers it too
            if mask.shape[1] == embeds.shape[1]:
                return embeds, mask.to(torch.float64)
        return embeds, embeds.new_ones(embeds.shape[:2])

    def _continued(self, past: Any, *, batch: int) -> tuple[Tensor, Tensor, Tensor | None]:
        """Embedding sums (B, d), token counts (B, 1) and the log posterior decided on their
        first pass (B, tasks) of the sequences `past` caches (zeros and None for a new pass). A
        cache repeated k times per sequence (prefix scoring) repeats them."""
        dim = self.means.shape[1]
        zeros = (self.means.new_zeros(batch, dim), self.means.new_zeros(batch, 1), None)
        if past is None or _cached_length(past) == 0:
            return zeros
        try:
            found = self._continuations.get(past)
        except TypeError:
            found = None
        if found is None:
            return zeros  # a cache filled without the router: route on the new tokens alone
        sums, counts, decided = found
        if batch != len(sums):
            if batch % len(sums):
                raise ValueError(f"a cache of {len(sums)} sequences continued by {batch}")
            sums = sums.repeat_interleave(batch // len(sums), dim=0)
            counts = counts.repeat_interleave(batch // len(counts), dim=0)
            if decided is not None:
                decided = decided.repeat_interleave(batch // len(decided), dim=0)
        return sums, counts, decided

    def _learn(self, features: Tensor) -> Tensor | None:
        """Add the new task's sequences (B, d) to its statistics; the prior of its training
        pass: the earlier adapters' scores -inf."""
        with torch.no_grad():
            self.new_sum += features.sum(dim=0)
            self.new_count += features.shape[0]
            self.new_outer += features.T @ features
        n_history = int(self.means.shape[0])
        if n_history == 0:
            return None
        prior = torch.zeros(1, 1, n_history + 1, device=features.device)
        prior[..., :n_history] = float("-inf")
        return prior


def _cached_length(past: Any) -> int:
    get_length = getattr(past, "get_seq_length", None)
    if callable(get_length):
        return int(get_length())
    return 1  # a legacy tuple cache is never empty


def _discriminant(means: Tensor, counts: Tensor, within: Tensor) -> tuple[Tensor, Tensor]:
    """Weights (n, d) and biases (n,) of the linear discriminant with shrunk pooled covariance."""
    n, dim = means.shape
    dof = max(float(counts.sum()) - n, 1.0)
    covariance = within / dof
    scale = float(covariance.diagonal().mean())
    if not scale > 0:
        scale = 1.0  # a single sequence per task: no spread to measure
    shrunk = (1 - SHRINKAGE) * covariance + SHRINKAGE * scale * torch.eye(
        dim, dtype=within.dtype, device=within.device
    )
    w = torch.linalg.solve(shrunk, means.T).T  # (n, d)
    b = -0.5 * (w * means).sum(dim=-1)
    return w, b


def empty_statistics(dim: int) -> dict[str, Tensor]:
    """The statistics of a stream before its first task."""
    return {MEANS: torch.zeros(0, dim), COUNTS: torch.zeros(0), WITHIN: torch.zeros(dim, dim)}


def _cache_of(kwargs: dict[str, Any]) -> Any:
    """The KV cache a decoder pass continues: transformers 5 passes it as `cache` (the
    deprecated `past_key_values` when a caller still names it so and the model does not
    rename it)."""
    cache = kwargs.get("cache")
    return cache if cache is not None else kwargs.get("past_key_values")

"""Evaluation: rank classification over candidate labels, exact match, and completion loss."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase, StoppingCriteria, StoppingCriteriaList

from continual.batching import Encoded, encode_pair, pad_batch, pad_id_of, sequence_log_probs
from continual.data import Example, PromptFormat, label_of
from continual.errors import EvaluationCancelled
from continual.prefix_scoring import prefix_label_scores, supports_prefix_cache


@dataclass(frozen=True)
class EvalResult:
    accuracy: float
    n: int
    predictions: list[str]


@dataclass(frozen=True)
class LossResult:
    loss: float  # mean negative log-likelihood per completion token (eos included)
    perplexity: float  # exp(loss)
    n: int  # examples
    tokens: int  # completion tokens scored


@contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """eval() and no_grad() for the block, then the model's previous mode again."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def label_scores(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    labels: Sequence[str],
    *,
    batch_size: int = 64,
    max_length: int | None = None,
    shared_prefix: bool = True,
    on_scored: Callable[[int], None] | None = None,
    fmt: PromptFormat | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> Tensor:
    """Mean per-token log-likelihood of each label's completion, as `fmt` renders it (by
    default `" label"`), given each prompt: (E, L) on the CPU.

    With `shared_prefix` (and a model with a KV cache) each prompt runs once and only the label
    tokens run per label (`continual.prefix_scoring`). Otherwise all labels of an example share
    one padded forward pass with other examples' labels, `batch_size` sequences at a time.
    `on_scored(n)` reports progress: n more examples scored. `should_stop()` is asked before
    each example (or pass); when it returns True, EvaluationCancelled is raised.
    """
    if not labels:
        raise ValueError("label_scores needs at least one label")
    completions = [(fmt or PromptFormat()).render_completion(label) for label in labels]
    if shared_prefix and supports_prefix_cache(model):
        scores = []
        with evaluating(model):
            for ex in examples:
                _check(should_stop)
                scores.append(
                    prefix_label_scores(
                        model, tokenizer, ex.prompt, completions, max_length=max_length
                    )
                )
                if on_scored is not None:
                    on_scored(1)
        return torch.stack(scores) if scores else torch.empty(0, len(labels))  # (E, L)
    per_pass = max(1, batch_size // len(labels))  # examples per forward pass
    budgets = _label_budgets(tokenizer, completions, max_length=max_length)
    rows: list[Tensor] = []
    for begin in range(0, len(examples), per_pass):
        _check(should_stop)
        chunk = examples[begin : begin + per_pass]
        encoded = [
            encode_pair(tokenizer, prompt=ex.prompt, completion=c, add_eos=False, max_length=b)
            for ex in chunk
            for c, b in zip(completions, budgets, strict=True)
        ]
        sums, counts = _score_encoded(model, tokenizer, encoded)
        rows.append((sums / counts.clamp(min=1)).view(len(chunk), len(labels)))  # (E, L)
        if on_scored is not None:
            on_scored(len(chunk))
    return torch.cat(rows) if rows else torch.empty(0, len(labels))


def rank_classification(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    labels: Sequence[str],
    *,
    batch_size: int = 64,
    max_length: int | None = None,
    shared_prefix: bool = True,
    on_scored: Callable[[int], None] | None = None,
    fmt: PromptFormat | None = None,
) -> EvalResult:
    """Predict the label with the highest `label_scores`; accuracy against each example's own
    label (its completion without the template's whitespace)."""
    scores = label_scores(
        model, tokenizer, examples, labels, batch_size=batch_size, max_length=max_length,
        shared_prefix=shared_prefix, on_scored=on_scored, fmt=fmt,
    )  # (E, L)  # fmt: skip
    predictions = [labels[i] for i in scores.argmax(dim=1).tolist()]
    correct = sum(pred == label_of(ex) for pred, ex in zip(predictions, examples, strict=True))
    accuracy = correct / len(examples) if examples else 0.0
    return EvalResult(accuracy=accuracy, n=len(examples), predictions=predictions)


def exact_match(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    *,
    max_new_tokens: int = 8,
    batch_size: int = 32,
    on_scored: Callable[[int], None] | None = None,
) -> EvalResult:
    """Greedy generation; an answer matches when it equals the completion (both stripped)."""
    if not examples:
        return EvalResult(accuracy=0.0, n=0, predictions=[])
    predictions = generate(
        model, tokenizer, [ex.prompt for ex in examples], max_new_tokens=max_new_tokens,
        batch_size=batch_size, on_generated=on_scored,
    )  # fmt: skip
    gold = [ex.completion.strip() for ex in examples]
    correct = sum(pred == ref for pred, ref in zip(predictions, gold, strict=True))
    return EvalResult(accuracy=correct / len(examples), n=len(examples), predictions=predictions)


def generate(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 16,
    batch_size: int = 32,
    on_generated: Callable[[int], None] | None = None,
    max_length: int | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> list[str]:
    """Greedy completions of `prompts` (tokenised as in training, and with `max_length` cut as
    training cut them: to at most `max_length` tokens, bos included), stripped;
    `on_generated(n)` reports progress (n more prompts done). `should_stop()` is asked before
    each batch and after each generated token; when it returns True, EvaluationCancelled is
    raised."""
    outputs: list[str] = []
    with evaluating(model):
        for begin in range(0, len(prompts), batch_size):
            _check(should_stop)
            chunk = prompts[begin : begin + batch_size]
            outputs.extend(_generate(model, tokenizer, chunk, max_new_tokens=max_new_tokens,
                                     max_length=max_length, should_stop=should_stop))  # fmt: skip
            _check(should_stop)  # generation ended early: its outputs are cut short
            if on_generated is not None:
                on_generated(len(chunk))
    return outputs


def _check(should_stop: Callable[[], bool] | None) -> None:
    if should_stop is not None and should_stop():
        raise EvaluationCancelled("stopped: should_stop() returned True")


class _StopWhen(StoppingCriteria):
    """Ends generation (every sequence of the batch) once `should_stop()` returns True; asked
    after each generated token."""

    def __init__(self, should_stop: Callable[[], bool]) -> None:
        self.should_stop = should_stop

    def __call__(self, input_ids: Tensor, scores: object, **kwargs: object) -> Tensor:
        stop = self.should_stop()
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


def language_model_loss(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    *,
    batch_size: int = 32,
    max_length: int | None = None,
) -> LossResult:
    """Token-level NLL of the completions (+ eos, as trained) given their prompts."""
    total, tokens = 0.0, 0
    for begin in range(0, len(examples), batch_size):
        pairs = [(ex.prompt, ex.completion) for ex in examples[begin : begin + batch_size]]
        sums, counts = _score(model, tokenizer, pairs, add_eos=True, max_length=max_length)
        total -= float(sums.sum().item())
        tokens += int(counts.sum().item())
    loss = total / tokens if tokens else float("nan")
    perplexity = math.exp(loss) if tokens else float("nan")
    return LossResult(loss=loss, perplexity=perplexity, n=len(examples), tokens=tokens)


def _label_budgets(
    tokenizer: PreTrainedTokenizerBase, completions: Sequence[str], *, max_length: int | None
) -> list[int | None]:
    """Per-label length budgets that cut every label's prompt at the same place (room for the
    longest label), so no label is ranked with more context than another."""
    if max_length is None:
        return [None] * len(completions)
    sizes = [len(tokenizer.encode(c, add_special_tokens=False)) for c in completions]
    return [max_length - (max(sizes) - size) for size in sizes]


def _score(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[tuple[str, str]],
    *,
    add_eos: bool,
    max_length: int | None,
) -> tuple[Tensor, Tensor]:
    """Sum of completion log-probs and completion token counts, one per pair: (N,), (N,)."""
    encoded = [
        encode_pair(tokenizer, prompt=p, completion=c, add_eos=add_eos, max_length=max_length)
        for p, c in pairs
    ]
    return _score_encoded(model, tokenizer, encoded)


def _score_encoded(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, encoded: Sequence[Encoded]
) -> tuple[Tensor, Tensor]:
    device = next(model.parameters()).device
    batch = pad_batch(encoded, pad_id=pad_id_of(tokenizer)).to(device)
    with evaluating(model):
        sums, counts = sequence_log_probs(model, batch)  # (N,), (N,)
    return sums.cpu(), counts.cpu()


def _generate(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    chunk: Sequence[str],
    *,
    max_new_tokens: int,
    max_length: int | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> list[str]:
    """Greedy continuation of left-padded prompts (generation needs prompts to end together)."""
    prompts = [encode_pair(tokenizer, prompt=p, completion="", add_eos=False,
                           max_length=max_length).ids for p in chunk]  # fmt: skip
    pad_id = pad_id_of(tokenizer)
    width = max(len(ids) for ids in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros_like(input_ids)  # (B, T)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, width - len(ids) :] = 1
    device = next(model.parameters()).device
    output = model.generate(  # type: ignore[operator]
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=pad_id,
        eos_token_id=tokenizer.eos_token_id,
        stopping_criteria=StoppingCriteriaList([_StopWhen(should_stop)] if should_stop else []),
    )  # (B, T + new)
    texts = tokenizer.batch_decode(output[:, width:].tolist(), skip_special_tokens=True)
    return [text.strip() for text in texts]

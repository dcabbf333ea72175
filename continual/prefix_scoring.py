"""Rank classification with the prompt computed once per example (shared-prefix KV cache).

Scoring L labels the naive way runs L full sequences of prompt + label. Here the prompt runs
once, its key/value cache is repeated for the L labels, and only the label tokens run again:
for a 150-token prompt and 14 two-token labels that is ~180 token positions instead of ~2100.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from transformers import DynamicCache, PreTrainedTokenizerBase

from continual.batching import decoder_and_head, encode_pair, pad_id_of


def supports_prefix_cache(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    return config is not None and getattr(config, "use_cache", False) is not False


def prefix_label_scores(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    labels: Sequence[str],
    *,
    max_length: int | None = None,
) -> Tensor:
    """Mean per-token log-likelihood of each completion in `labels` given `prompt`: (L,).

    Tokenisation matches `encode_pair` (bos + prompt + completion); the model must be in eval
    mode under no_grad (the caller's `evaluating` block).
    """
    longest = max(labels, key=lambda c: len(tokenizer.encode(c, add_special_tokens=False)))
    prompt_ids = encode_pair(
        tokenizer, prompt=prompt, completion=longest, add_eos=False, max_length=max_length
    )
    prefix = list(prompt_ids.ids[: prompt_ids.prompt_len])  # bos + (possibly cut) prompt
    label_ids = [tokenizer.encode(c, add_special_tokens=False) or [pad_id_of(tokenizer)]
                 for c in labels]  # fmt: skip
    device = next(model.parameters()).device
    p = len(prefix)
    last, past = _prefix_pass(model, torch.tensor([prefix], device=device))
    first = last.float().log_softmax(-1)  # (V,) predicts each label's 1st token
    sums = torch.stack([first[ids[0]] for ids in label_ids])  # (L,)
    rest = max(len(ids) for ids in label_ids) - 1
    if rest > 0:
        sums = sums + _continuation_log_probs(model, past, label_ids, p, rest)
    counts = torch.tensor([len(ids) for ids in label_ids], dtype=sums.dtype, device=sums.device)
    return (sums / counts).cpu()


def _prefix_pass(model: nn.Module, input_ids: Tensor) -> tuple[Tensor, DynamicCache]:
    """Run the prompt (1, P) once: the vocabulary logits of its last position only (V,), and
    its KV cache. The head runs on one position, not P (it is a fifth of a 135M model)."""
    parts = decoder_and_head(model)
    if parts is None:
        out = model(input_ids=input_ids, use_cache=True)
        return out.logits[0, -1], out.cache
    decoder, head = parts
    out = decoder(input_ids=input_ids, use_cache=True)
    return head(out.last_hidden_state[0, -1]), out.cache  # (V,)


def _continuation_log_probs(
    model: nn.Module, past: DynamicCache, label_ids: list[list[int]], p: int, rest: int
) -> Tensor:
    """Sum of log-probs of tokens 2.. of every label, all labels in one batch: (L,)."""
    n = len(label_ids)
    device = next(model.parameters()).device
    inputs = torch.zeros((n, rest), dtype=torch.long, device=device)  # (L, R) label[:-1]
    targets = torch.zeros((n, rest), dtype=torch.long, device=device)  # (L, R) label[1:]
    valid = torch.zeros((n, rest), dtype=torch.bool, device=device)  # (L, R)
    for row, ids in enumerate(label_ids):
        k = len(ids) - 1
        if k:
            inputs[row, :k] = torch.tensor(ids[:-1], device=device)
            targets[row, :k] = torch.tensor(ids[1:], device=device)
            valid[row, :k] = True
    past.batch_repeat_interleave(n)
    # Right padding after the real label tokens is causal-safe: no real token attends to it.
    mask = torch.ones((n, p + rest), dtype=torch.long, device=device)  # (L, P+R)
    positions = torch.arange(p, p + rest, device=device).expand(n, rest)  # (L, R)
    logits = model(input_ids=inputs, attention_mask=mask, cache=past,
                   position_ids=positions, use_cache=True).logits  # (L, R, V)  # fmt: skip
    logp = logits.float().log_softmax(-1).gather(2, targets.unsqueeze(-1)).squeeze(-1)  # (L, R)
    return (logp * valid).sum(dim=1)

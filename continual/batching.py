"""Tokenising prompt + completion pairs and padding them into batches.

Training and evaluation share this code so a completion is scored exactly as it was trained:
`[bos] + prompt + completion [+ eos]`, prompt and completion tokenised separately, the loss
(or score) on completion tokens only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Encoded:
    """Token ids of one pair; `ids[prompt_len:]` is the completion."""

    ids: tuple[int, ...]
    prompt_len: int


@dataclass(frozen=True)
class Batch:
    input_ids: Tensor  # (B, T) right-padded
    attention_mask: Tensor  # (B, T) 1 on real tokens
    labels: Tensor  # (B, T) completion token ids, IGNORE_INDEX elsewhere

    def to(self, device: torch.device) -> Batch:
        return Batch(
            input_ids=self.input_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            labels=self.labels.to(device),
        )

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum().item())


def encode_pair(
    tokenizer: PreTrainedTokenizerBase,
    *,
    prompt: str,
    completion: str,
    add_eos: bool,
    max_length: int | None = None,
) -> Encoded:
    """Tokenise one pair. When too long, the prompt loses tokens from its middle: its first half
    of the budget (the instruction, which lists a classification task's options) and its last
    half (the end of the input and the answer cue) survive, as in LongBench's truncation. A
    completion longer than the whole budget is cut on the right."""
    prefix = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    completion_ids = tokenizer.encode(completion, add_special_tokens=False)
    if add_eos and tokenizer.eos_token_id is not None:
        completion_ids.append(tokenizer.eos_token_id)
    if max_length is not None:
        room = max_length - len(prefix)
        completion_ids = completion_ids[: max(room - 1, 1)]
        keep = room - len(completion_ids)
        if keep < len(prompt_ids):
            head = keep // 2
            prompt_ids = prompt_ids[:head] + prompt_ids[len(prompt_ids) - (keep - head) :]
    ids = tuple(prefix + prompt_ids + completion_ids)
    return Encoded(ids=ids, prompt_len=len(prefix) + len(prompt_ids))


def pad_batch(items: Sequence[Encoded], *, pad_id: int) -> Batch:
    """Right-pad to the longest item; labels hold completion ids and IGNORE_INDEX elsewhere."""
    width = max(len(item.ids) for item in items)
    input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(items), width), dtype=torch.long)  # (B, T)
    labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    for row, item in enumerate(items):
        ids = torch.tensor(item.ids, dtype=torch.long)
        input_ids[row, : len(ids)] = ids
        attention_mask[row, : len(ids)] = 1
        labels[row, item.prompt_len : len(ids)] = ids[item.prompt_len :]
    return Batch(input_ids=input_ids, attention_mask=attention_mask, labels=labels)


def pad_id_of(tokenizer: PreTrainedTokenizerBase) -> int:
    """Any valid id works (padding is masked); prefer pad, then eos, then 0."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def completion_log_probs(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sequence sum of completion-token log-probabilities and completion-token counts, from
    full (B, T, V) logits: (B,), (B,). Only completion rows go through log_softmax."""
    targets = labels[:, 1:]  # (B, T-1): position t predicts token t+1
    mask = targets != IGNORE_INDEX  # (B, T-1)
    rows = mask.nonzero(as_tuple=True)[0]  # (K,) sequence index of each scored token
    sums = _per_sequence_log_probs(logits[:, :-1][mask], targets[mask], rows, len(labels))
    return sums, mask.sum(dim=1)


def _per_sequence_log_probs(logits: Tensor, targets: Tensor, rows: Tensor, n: int) -> Tensor:
    """Sum over each sequence's scored tokens of log p(target): (n,) from (K, V), (K,), (K,)."""
    token_logp = logits.float().log_softmax(dim=-1).gather(1, targets.unsqueeze(1)).squeeze(1)
    sums = torch.zeros(n, dtype=token_logp.dtype, device=logits.device)
    return sums.index_add_(0, rows, token_logp)  # (n,)


def decoder_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """The transformer trunk and the output head, when logits are exactly head(trunk(x)).

    Works through PEFT wrappers (adapter layers live inside the trunk). None for models whose
    forward does more to the logits (soft-capping, scaling), which then take the full path.
    """
    config = getattr(model, "config", None)
    if config is None or getattr(config, "final_logit_softcapping", None) is not None:
        return None
    if getattr(config, "logit_scale", None) not in (None, 1, 1.0):
        return None
    get_decoder = getattr(model, "get_decoder", None)
    get_head = getattr(model, "get_output_embeddings", None)
    if get_decoder is None or get_head is None:
        return None
    decoder, head = get_decoder(), get_head()
    return (decoder, head) if decoder is not None and head is not None else None


def completion_logits(model: nn.Module, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
    """Vocabulary logits only at the positions that predict a completion token, with those
    tokens and the sequence each belongs to: (K, V), (K,), (K,).

    A full logits tensor is (B, T, V): with V = 49k it is most of a training step's memory and
    about a fifth of a small model's FLOPs, almost all of it for prompt positions nobody scores.
    Models whose logits are not exactly head(trunk(x)) take the full path and are then indexed.
    """
    targets = batch.labels[:, 1:]  # (B, T-1): position t predicts token t+1
    mask = targets != IGNORE_INDEX  # (B, T-1)
    rows = mask.nonzero(as_tuple=True)[0]  # (K,)
    parts = decoder_and_head(model)
    if parts is None:
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        return logits[:, :-1][mask], targets[mask], rows  # (K, V)
    decoder, head = parts
    hidden = decoder(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask
    ).last_hidden_state  # (B, T, H)
    return head(hidden[:, :-1][mask]), targets[mask], rows  # (K, V)


def completion_loss(model: nn.Module, batch: Batch) -> Tensor:
    """Mean next-token cross-entropy over the completion tokens of `batch` (the training loss);
    vocabulary logits are computed at completion positions only (`completion_logits`)."""
    logits, targets, _ = completion_logits(model, batch)  # (K, V), (K,)
    return F.cross_entropy(logits.float(), targets)


def sequence_log_probs(model: nn.Module, batch: Batch) -> tuple[Tensor, Tensor]:
    """`completion_log_probs` of the model on `batch`, computing vocabulary logits only at the
    completion positions (`completion_logits`): (B,), (B,)."""
    logits, targets, rows = completion_logits(model, batch)  # (K, V), (K,), (K,)
    sums = _per_sequence_log_probs(logits, targets, rows, len(batch.labels))
    return sums, (batch.labels[:, 1:] != IGNORE_INDEX).sum(dim=1)

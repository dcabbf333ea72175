"""Shared fixtures: one tokenizer per session and fresh tiny base models on demand."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from continual.models import build_tiny_llama, build_tokenizer


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return build_tokenizer()


@pytest.fixture
def make_base(tokenizer: PreTrainedTokenizerFast) -> Callable[..., LlamaForCausalLM]:
    """A fresh tiny base per call (PEFT edits a base in place)."""

    def make(seed: int = 0) -> LlamaForCausalLM:
        return build_tiny_llama(seed=seed, tokenizer=tokenizer)[0]

    return make

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from continual.models import build_tiny_llama, build_tokenizer, load_causal_lm


def test_tokenizer_is_deterministic_and_byte_level(tokenizer: PreTrainedTokenizerFast) -> None:
    again = build_tokenizer()
    assert again.get_vocab() == tokenizer.get_vocab()
    assert len(tokenizer) == 512
    text = "Ünïcödé 🙂 — tabs\tand\nnew lines, zzqxj"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    assert tokenizer.unk_token_id is None
    special = (tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token)
    assert special == ("<pad>", "<s>", "</s>")


def test_tokenizer_from_custom_corpus() -> None:
    tok = build_tokenizer(corpus=["aaaa bbbb"] * 50, vocab_size=270)
    assert len(tok) <= 270
    assert tok.convert_ids_to_tokens(tok.encode(" bbbb", add_special_tokens=False)) == ["Ġbbbb"]
    with pytest.raises(ValueError, match="vocab_size"):
        build_tokenizer(vocab_size=100)


def test_tiny_llama_is_deterministic(tokenizer: PreTrainedTokenizerFast) -> None:
    first, _ = build_tiny_llama(seed=3, tokenizer=tokenizer)
    second, _ = build_tiny_llama(seed=3, tokenizer=tokenizer)
    other, _ = build_tiny_llama(seed=4, tokenizer=tokenizer)
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert not torch.equal(first.lm_head.weight, other.lm_head.weight)
    config = first.config
    assert config.vocab_size == len(tokenizer) and not config.tie_word_embeddings
    assert first.lm_head.weight.dtype == torch.float32
    assert first.lm_head.weight.data_ptr() != first.model.embed_tokens.weight.data_ptr()


def test_tiny_llama_does_not_touch_global_rng(tokenizer: PreTrainedTokenizerFast) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_llama(seed=0, tokenizer=tokenizer)
    assert torch.equal(torch.rand(3), expected)


def test_load_causal_lm_from_hf_directory(
    tmp_path: Path, tokenizer: PreTrainedTokenizerFast
) -> None:
    model, _ = build_tiny_llama(seed=1, tokenizer=tokenizer)
    model.save_pretrained(tmp_path, safe_serialization=True)
    tokenizer.save_pretrained(tmp_path)
    loaded, loaded_tok = load_causal_lm(tmp_path)
    ids = torch.tensor([tokenizer.encode("Input: a red car\nAnswer:")])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert loaded_tok.pad_token_id == tokenizer.pad_token_id
    assert not loaded.training


def test_load_causal_lm_falls_back_to_eos_padding(tmp_path: Path) -> None:
    tok = build_tokenizer()
    tok.pad_token = None
    model, _ = build_tiny_llama(tokenizer=build_tokenizer())
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, loaded_tok = load_causal_lm(tmp_path, dtype=torch.float64)
    assert loaded_tok.pad_token == "</s>"
    assert loaded.lm_head.weight.dtype == torch.float64

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from continual.errors import MissingWeights
from continual.models import _tie_gguf_output, build_tiny_llama, build_tokenizer, load_causal_lm


def _save(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, path: Path) -> None:
    """A model directory as users hand one over: safetensors weights and the tokenizer."""
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)


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
    _save(model, tokenizer, tmp_path)
    loaded, loaded_tok = load_causal_lm(tmp_path)
    ids = torch.tensor([tokenizer.encode("Input: a red car\nAnswer:")])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert loaded_tok.pad_token_id == tokenizer.pad_token_id
    assert not loaded.training


def test_a_loaded_model_is_never_kernelized_with_hub_kernels(
    tmp_path: Path, tokenizer: PreTrainedTokenizerFast
) -> None:
    """transformers 5 kernelizes from_pretrained models by default, and on a GPU its first
    train() fetches kernels from the Hub (seen on an H200: offline, every training job failed).
    A worker runs only the code it was installed with."""
    model, _ = build_tiny_llama(seed=1, tokenizer=tokenizer)
    _save(model, tokenizer, tmp_path)
    loaded, _ = load_causal_lm(tmp_path)
    assert loaded.use_kernels is False
    loaded.train()  # switching modes must not kernelize either
    assert loaded.use_kernels is False


def test_load_causal_lm_falls_back_to_eos_padding(tmp_path: Path) -> None:
    tok = build_tokenizer()
    tok.pad_token = None
    model, _ = build_tiny_llama(tokenizer=build_tokenizer())
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, loaded_tok = load_causal_lm(tmp_path, dtype=torch.float64)
    assert loaded_tok.pad_token == "</s>"
    assert loaded.lm_head.weight.dtype == torch.float64


def test_a_checkpoint_missing_a_weight_is_refused_not_filled_at_random(
    tmp_path: Path, tokenizer: PreTrainedTokenizerFast
) -> None:
    model, _ = build_tiny_llama(seed=1, tokenizer=tokenizer)
    _save(model, tokenizer, tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["lm_head.weight"], weights["model.layers.0.mlp.up_proj.weight"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(MissingWeights) as exc:
        load_causal_lm(tmp_path)
    assert exc.value.keys == ["lm_head.weight", "model.layers.0.mlp.up_proj.weight"]
    assert "lm_head.weight" in str(exc.value)


def test_a_gguf_without_an_output_weight_gets_it_tied_to_the_embedding(
    tmp_path: Path, tokenizer: PreTrainedTokenizerFast
) -> None:
    """llama.cpp omits `output.weight` when it is the token embedding; a model that arrives with
    its output layer missing (untied, so random or uninitialised) is tied, and saves as tied."""
    model, _ = build_tiny_llama(seed=1, tokenizer=tokenizer)
    assert not model.config.tie_word_embeddings
    other = {"model.layers.0.mlp.up_proj.weight"}
    assert _tie_gguf_output(model, {"lm_head.weight"} | other) == other
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.config.tie_word_embeddings
    _save(model, tokenizer, tmp_path)
    assert "lm_head.weight" not in load_file(tmp_path / "model.safetensors")
    loaded, _ = load_causal_lm(tmp_path)  # no weight missing: the tie is in the config
    ids = torch.tensor([tokenizer.encode("Input: a red car\nAnswer:")])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    # nothing to tie: the output weight is present, or something else is missing
    untouched, _ = build_tiny_llama(seed=1, tokenizer=tokenizer)
    assert _tie_gguf_output(untouched, other) == other
    assert untouched.lm_head.weight is not untouched.model.embed_tokens.weight


def test_concurrent_loads_keep_transformers_global_state(
    tmp_path: Path, tokenizer: PreTrainedTokenizerFast
) -> None:
    """`from_pretrained` swaps class- and process-wide state while it builds a model (it stubs
    out `PreTrainedModel.tie_weights` and sets torch's default dtype). Two threads loading at
    once (`strata serve` predicts while its worker trains) could leave the stub in place for
    good, and every later load of a tied model untied, with a random output layer."""
    model, _ = build_tiny_llama(seed=1, tokenizer=tokenizer)
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    _save(model, tokenizer, tmp_path)
    tie_weights = PreTrainedModel.__dict__["tie_weights"]
    start = threading.Barrier(6)
    loaded: list[PreTrainedModel] = []
    errors: list[BaseException] = []

    def work(index: int) -> None:
        try:
            start.wait()
            for _ in range(4):
                if index % 3 == 0:
                    build_tiny_llama(seed=index, tokenizer=tokenizer)
                else:
                    loaded.append(load_causal_lm(tmp_path, dtype=torch.bfloat16)[0])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert PreTrainedModel.__dict__["tie_weights"] is tie_weights
    assert torch.get_default_dtype() == torch.float32
    assert len(loaded) == 16
    assert all(m.lm_head.weight is m.model.embed_tokens.weight for m in loaded)

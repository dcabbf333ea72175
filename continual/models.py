"""Base models and tokenizers: a tiny random Llama for tests and demos, and local loaders."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from continual.data import synthetic_corpus
from continual.errors import MissingWeights

logger = logging.getLogger(__name__)

PAD, BOS, EOS = "<pad>", "<s>", "</s>"

MODEL_INIT_LOCK = threading.RLock()
"""Held while a transformers model is built. `from_pretrained` swaps process-wide state for the
duration (it stubs out `PreTrainedModel.tie_weights` on the class and sets torch's default
dtype), and two threads doing it at once can leave the stub or the dtype in place for good:
every later load of a tied model would then come back untied, its output layer random. The
embedded service loads models from several threads (API predictions beside the worker)."""


def build_tokenizer(
    *, corpus: Iterable[str] | None = None, vocab_size: int = 512
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE locally: every string is encodable (no UNK), output deterministic."""
    if vocab_size < 260:
        raise ValueError(f"vocab_size must be >= 260 (256 bytes + specials), got {vocab_size}")
    texts = list(corpus) if corpus is not None else synthetic_corpus()
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, pad_token=PAD
    )


def build_tiny_llama(
    *,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int = 128,
    tokenizer: PreTrainedTokenizerFast | None = None,
    initializer_range: float = 0.1,
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """A randomly initialised fp32 Llama whose vocabulary matches `tokenizer` (built if None).

    `initializer_range` is 5x Llama's 0.02: with frozen random weights that small, the logits
    barely depend on the input and LoRA cannot learn the synthetic tasks in a few hundred steps.
    """
    tokenizer = tokenizer if tokenizer is not None else build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=initializer_range,
    )
    # Seed a forked RNG so building a model does not disturb the caller's random stream.
    with MODEL_INIT_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).float()
    model.eval()
    return model, tokenizer


def load_causal_lm(
    path: Path, *, gguf_file: str | None = None, dtype: torch.dtype | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a local HF model directory, or `path/gguf_file` (dequantised to `dtype`, default fp32).

    A directory loads in its checkpoint's dtype unless `dtype` is given. Nothing is downloaded
    (`local_files_only`). The tokenizer always has a pad token (EOS when the checkpoint has none).
    A checkpoint that lacks a weight the model needs raises `MissingWeights`: transformers would
    otherwise initialise it at random and the model would quietly produce garbage.
    """
    kwargs: dict[str, object] = {"local_files_only": True}
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    tokenizer = AutoTokenizer.from_pretrained(str(path), **kwargs)
    model_kwargs = dict(kwargs)
    if gguf_file is None:
        model_kwargs["use_safetensors"] = True  # never fall back to pickled .bin weights
    if dtype is not None:
        model_kwargs["dtype"] = dtype
    # transformers 5 kernelizes a loaded model with Hub kernels by default: on a GPU that means
    # fetching and running code from the Hub at the first train()/eval() (and failing offline).
    # A worker runs only the code it was installed with.
    model_kwargs["use_kernels"] = False
    # output_loading_info: a (model, info) pair, which the stubs do not describe
    with MODEL_INIT_LOCK:
        loaded: Any = AutoModelForCausalLM.from_pretrained(
            str(path), output_loading_info=True, **model_kwargs
        )
    model: PreTrainedModel = loaded[0]
    missing = set(loaded[1]["missing_keys"])
    missing |= {n for n, p in model.named_parameters() if p.is_meta}  # never materialised
    if gguf_file is not None:
        missing = _tie_gguf_output(model, missing)
        _drop_gguf_quantizer(model)
    if missing:
        raise MissingWeights(
            path=str(path / gguf_file if gguf_file else path), keys=sorted(missing)
        )
    if gguf_file is not None:
        torch.nn.Module.to(model, dtype or torch.float32)  # in place
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer at {path} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    logger.info(
        "loaded %s (%s) with %d parameters", path, gguf_file or "hf", model.num_parameters()
    )
    return model, tokenizer


def _tie_gguf_output(model: PreTrainedModel, missing: set[str]) -> set[str]:
    """llama.cpp writes a GGUF's output projection (`output.weight`) only when it is not the
    token embedding; without it the model's output layer is the embedding matrix. transformers
    derives `tie_word_embeddings` from that, and a model that still arrives with its output
    weight missing (untied) would predict from uninitialised or random memory: tie it here.
    Returns the keys still missing."""
    output, inputs = model.get_output_embeddings(), model.get_input_embeddings()
    if output is None or inputs is None:
        return missing
    name = next(
        (
            f"{n}.weight"
            for n, m in model.named_modules()
            if m is output and f"{n}.weight" in missing
        ),
        None,
    )
    if name is None or output.weight.shape != inputs.weight.shape:
        return missing
    logger.warning("the GGUF has no output weight: tying %s to the token embedding", name)
    model.config.tie_word_embeddings = True
    # setattr: an attribute transformers 5 keeps on the instance, which mypy cannot see.
    setattr(  # noqa: B010
        model, "all_tied_weights_keys", model.get_expanded_tied_weights_keys(all_submodels=True)
    )
    output.weight = inputs.weight
    return missing - {name}


def _drop_gguf_quantizer(model: PreTrainedModel) -> None:
    """GGUF weights arrive dequantised; forget the quantizer so `save_pretrained` writes plain
    safetensors and PEFT treats the model as an ordinary (not k-bit) one."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    # setattr: these are plain attributes that mypy cannot see on PreTrainedModel.
    setattr(model, "hf_quantizer", None)  # noqa: B010
    setattr(model, "is_quantized", False)  # noqa: B010
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config

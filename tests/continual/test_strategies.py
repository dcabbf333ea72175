from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from continual.config import MAX_RANK, LoraHyperparams
from continual.data import Example
from continual.errors import InvalidHyperparameter
from continual.strategies import (
    ADAPTER_FILES,
    STRATEGIES,
    SeqLora,
    Strategy,
    get_strategy,
    save_peft_adapter,
)
from continual.training import causal_lm_loss, train

MakeBase = Callable[..., LlamaForCausalLM]
EXAMPLES = [Example(f"Say {w}.\nAnswer:", f" {w}") for w in ("red", "blue", "green", "good")]
HYPER = LoraHyperparams(rank=4, max_steps=3, batch_size=2, learning_rate=1e-2)
IDS = torch.tensor([[1, 40, 41, 42, 43, 44], [1, 50, 51, 52, 53, 54]])


def _logits(model: torch.nn.Module) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _trained(make_base: MakeBase, tokenizer: PreTrainedTokenizerFast) -> PeftModel:
    model = SeqLora().prepare(make_base(), history=[], hyper=HYPER)
    train(model, tokenizer, EXAMPLES, HYPER)
    return model


def test_registry() -> None:
    assert STRATEGIES["seq-lora"] is SeqLora
    strategy = get_strategy("seq-lora")
    assert isinstance(strategy, Strategy) and strategy.name == "seq-lora"
    with pytest.raises(InvalidHyperparameter) as info:
        get_strategy("ewc")
    assert info.value.field == "method" and "seq-lora" in info.value.reason
    with pytest.raises(InvalidHyperparameter) as info:
        get_strategy("seq-lora", lam=0.5)
    assert info.value.field == "lam"


def test_prepare_trains_only_the_adapter(make_base: MakeBase) -> None:
    model = SeqLora().prepare(make_base(), history=[], hyper=HYPER)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_A" in name or "lora_B" in name for name in trainable)
    assert len(trainable) == 2 * 2 * 7  # (A, B) x layers x target modules
    batch_labels = IDS.clone()
    batch_labels[:, :3] = -100
    causal_lm_loss(model(input_ids=IDS).logits, batch_labels).backward()
    for name, param in model.named_parameters():
        assert (param.grad is not None) == param.requires_grad, name
    assert any(float(p.grad.abs().sum()) > 0 for p in model.parameters() if p.grad is not None)


def test_prepare_is_deterministic(make_base: MakeBase) -> None:
    first = SeqLora().prepare(make_base(), history=[], hyper=HYPER).state_dict()
    second = SeqLora().prepare(make_base(), history=[], hyper=HYPER).state_dict()
    assert all(torch.equal(value, second[key]) for key, value in first.items())


def test_saved_adapter_reloads_with_identical_logits(
    make_base: MakeBase, tokenizer: PreTrainedTokenizerFast, tmp_path: Path
) -> None:
    strategy = SeqLora()
    model = _trained(make_base, tokenizer)
    strategy.save_adapter(model, tmp_path / "a1")
    assert sorted(p.name for p in (tmp_path / "a1").iterdir()) == sorted(ADAPTER_FILES)
    expected = _logits(model)
    assert not torch.allclose(expected, _logits(make_base()))  # the adapter does something
    reloaded = PeftModel.from_pretrained(make_base(), str(tmp_path / "a1"))
    torch.testing.assert_close(_logits(reloaded), expected, rtol=0, atol=0)
    inference = strategy.inference_model(make_base(), history=[tmp_path / "a1"])
    torch.testing.assert_close(_logits(inference), expected, rtol=0, atol=0)


def test_history_continues_the_newest_adapter(
    make_base: MakeBase, tokenizer: PreTrainedTokenizerFast, tmp_path: Path
) -> None:
    strategy = SeqLora()
    strategy.save_adapter(_trained(make_base, tokenizer), tmp_path / "a1")
    newest = _trained(make_base, tokenizer)
    train(newest, tokenizer, EXAMPLES[:2], HYPER)  # different weights
    strategy.save_adapter(newest, tmp_path / "a2")
    history = [tmp_path / "a1", tmp_path / "a2"]
    model = strategy.prepare(make_base(), history=history, hyper=HYPER)
    assert getattr(model.peft_config["default"], "r") == HYPER.rank  # noqa: B009
    torch.testing.assert_close(_logits(model), _logits(newest), rtol=0, atol=0)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train(model, tokenizer, EXAMPLES, HYPER)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all("lora_" in k for k in changed)
    inference = strategy.inference_model(make_base(), history=history)
    torch.testing.assert_close(_logits(inference), _logits(newest), rtol=0, atol=0)


def test_inference_without_history_is_the_base(make_base: MakeBase) -> None:
    base = make_base()
    assert SeqLora().inference_model(base, history=[]) is base


def test_named_adapter_is_saved_at_the_root(
    make_base: MakeBase, tokenizer: PreTrainedTokenizerFast, tmp_path: Path
) -> None:
    model = _trained(make_base, tokenizer)
    expected = _logits(model)
    model.add_adapter("task2", copy.deepcopy(model.peft_config["default"]))
    state = {
        k.replace(".default.", ".task2."): v
        for k, v in model.state_dict().items()
        if ".default." in k
    }
    model.load_state_dict(state, strict=False)
    model.delete_adapter("default")  # only "task2" is left, under a non-default name
    save_peft_adapter(model, tmp_path, adapter_name="task2")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(ADAPTER_FILES)
    reloaded = PeftModel.from_pretrained(make_base(), str(tmp_path))
    torch.testing.assert_close(_logits(reloaded), expected, rtol=0, atol=0)


def test_seq_lora_refuses_to_record_a_rank_it_would_not_train(
    make_base: MakeBase, tokenizer: PreTrainedTokenizerFast, tmp_path: Path
) -> None:
    """seq-lora continues the previous adapter, whose rank is fixed: a job asking another rank
    trained the old one and recorded the new (issue 19: rank=1e9 recorded, r=4 trained)."""
    strategy = SeqLora()
    hyper = LoraHyperparams(rank=4, max_steps=1, batch_size=4)
    first = tmp_path / "a1"
    model = strategy.prepare(make_base(), history=[], hyper=hyper)
    strategy.save_adapter(model, first)
    with pytest.raises(InvalidHyperparameter) as caught:
        strategy.prepare(make_base(), history=[first], hyper=LoraHyperparams(rank=8))
    assert caught.value.field == "rank" and "rank-4" in caught.value.reason
    strategy.prepare(make_base(), history=[first], hyper=hyper)  # the same rank continues
    with pytest.raises(InvalidHyperparameter, match=f"<= {MAX_RANK}"):
        LoraHyperparams(rank=10**9)

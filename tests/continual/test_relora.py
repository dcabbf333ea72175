from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Callable
from pathlib import Path

import peft
import pytest
import torch
from peft import PeftModel
from peft.tuners import lora
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from continual.config import LoraHyperparams
from continual.data import synthetic_tasks
from continual.errors import InvalidHyperparameter
from continual.relora import (
    ReLoraSchedule,
    jagged_cosine,
    lora_linears,
    lora_parameters,
    merge_and_reinit,
    prune_optimizer_state,
)
from continual.strategies import lora_config, save_peft_adapter
from continual.training import StepInfo, TrainingCallbacks, train

MakeBase = Callable[..., LlamaForCausalLM]
HYPER = LoraHyperparams(rank=4)
IDS = torch.tensor([[1, 40, 41, 42, 43, 44], [1, 50, 51, 52, 53, 54]])
LAYERS = 2 * 7  # decoder layers x target modules of the tiny Llama


def _ab(layer: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of the "default" adapter of a LoRA layer."""
    assert isinstance(layer, lora.Linear)
    lora_A, lora_B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert isinstance(lora_A, torch.Tensor) and isinstance(lora_B, torch.Tensor)
    return lora_A, lora_B


def _base_weight(layer: torch.nn.Module) -> torch.Tensor:
    assert isinstance(layer, lora.Linear)
    weight = layer.get_base_layer().weight
    assert isinstance(weight, torch.Tensor)
    return weight


def _logits(model: torch.nn.Module) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _lora_model(base: LlamaForCausalLM, *, hyper: LoraHyperparams = HYPER) -> PeftModel:
    """A PEFT LoRA model whose B matrices are random, so the adapter changes the logits."""
    torch.manual_seed(0)
    model = peft.get_peft_model(base, lora_config(hyper))
    with torch.no_grad():
        for layer in lora_linears(model):
            _ab(layer)[1].normal_(std=0.1)
    return model


@torch.no_grad()
def _deltas(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """scale * B @ A of every LoRA layer (fp32), the reference of what a merge folds in."""
    deltas = {}
    for name, module in model.named_modules():
        if isinstance(module, lora.Linear):
            lora_A, lora_B = _ab(module)
            deltas[name] = module.scaling["default"] * (lora_B.float() @ lora_A.float())
    return deltas


def _base_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        name: _base_weight(module).detach().clone()
        for name, module in model.named_modules()
        if isinstance(module, lora.Linear)
    }


def test_merge_folds_the_update_and_keeps_the_logits(make_base: MakeBase) -> None:
    model = _lora_model(make_base())
    expected = _logits(model)
    assert not torch.allclose(expected, _logits(make_base()))  # the adapter does something
    weights, deltas = _base_weights(model), _deltas(model)
    old_A = {n: _ab(m)[0].clone() for n, m in model.named_modules() if n in deltas}
    params = lora_parameters(model)
    assert merge_and_reinit(model) == LAYERS
    torch.testing.assert_close(_logits(model), expected, rtol=1e-5, atol=1e-5)
    for name, module in model.named_modules():
        if name not in deltas:
            continue
        weight = _base_weight(module)
        torch.testing.assert_close(weight, weights[name] + deltas[name], rtol=0, atol=1e-6)
        lora_A, lora_B = _ab(module)
        assert not lora_B.any()
        bound = 1 / math.sqrt(lora_A.shape[1])  # kaiming_uniform(a=sqrt(5)) as PEFT
        assert lora_A.abs().max() <= bound and lora_A.abs().max() > bound / 2
        assert not torch.equal(lora_A, old_A[name])
    assert all(a is b for a, b in zip(params, lora_parameters(model), strict=True))  # in place


def test_merge_in_fp32_and_cast_back(make_base: MakeBase) -> None:
    base = make_base()
    torch.nn.Module.to(base, torch.bfloat16)
    model = _lora_model(base)
    weights, deltas = _base_weights(model), _deltas(model)
    merge_and_reinit(model)
    for name, module in model.named_modules():
        if name in deltas:
            weight = _base_weight(module)
            assert weight.dtype == torch.bfloat16
            expected = (weights[name].float() + deltas[name]).to(torch.bfloat16)
            torch.testing.assert_close(weight, expected, rtol=0, atol=0)


def test_merge_refuses_what_it_cannot_fold(make_base: MakeBase) -> None:
    model = _lora_model(make_base())
    with pytest.raises(ValueError, match="no LoRA Linear layer holds adapter 'other'"):
        merge_and_reinit(model, adapter_name="other")
    with pytest.raises(ValueError, match="no LoRA Linear layer"):
        merge_and_reinit(make_base())
    model.merge_adapter()
    with pytest.raises(ValueError, match="merged into the base weight"):
        merge_and_reinit(model)
    torch.manual_seed(0)
    dora = peft.get_peft_model(
        make_base(), peft.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True)
    )
    with pytest.raises(ValueError, match="DoRA"):
        merge_and_reinit(dora)


def _optimizer_with_state(shapes: list[tuple[int, ...]]) -> tuple[torch.optim.AdamW, list]:
    generator = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.zeros(shape)) for shape in shapes]
    optimizer = torch.optim.AdamW(params)
    for param in params:
        optimizer.state[param] = {
            "step": torch.tensor(7.0),
            "exp_avg": torch.randn(param.shape, generator=generator),
            "exp_avg_sq": torch.rand(param.shape, generator=generator),
        }
    return optimizer, params


@pytest.mark.parametrize("ratio", [0.99, 0.5, 0.0, 1.0])
def test_prune_removes_the_stated_fraction(ratio: float) -> None:
    optimizer, params = _optimizer_with_state([(8, 64), (128, 8), (3, 5)])
    before = {(id(p), k): v.clone() for p in params for k, v in optimizer.state[p].items()}
    zeroed = prune_optimizer_state(optimizer, params[:2], ratio=ratio)
    assert zeroed == round(ratio * 512) + round(ratio * 1024)
    for param in params[:2]:
        state = optimizer.state[param]
        assert torch.equal(state["step"], torch.tensor(7.0))
        pruned = state["exp_avg"] == 0
        assert int(pruned.sum()) == round(ratio * param.numel())
        # One mask for both moments: no entry keeps a first moment without its second.
        assert torch.equal(state["exp_avg_sq"] == 0, pruned)
        for key in ("exp_avg", "exp_avg_sq"):
            kept, original = state[key][~pruned], before[id(param), key][~pruned]
            torch.testing.assert_close(kept, original, rtol=0, atol=0)
        if 0 < ratio < 1:  # the kept entries are the largest first moments
            original = before[id(param), "exp_avg"].abs()
            assert original[~pruned].min() >= original[pruned].max()
    untouched = optimizer.state[params[2]]
    assert torch.equal(untouched["exp_avg"], before[id(params[2]), "exp_avg"])


def test_prune_validates_and_skips_params_without_state() -> None:
    optimizer, params = _optimizer_with_state([(4, 4)])
    fresh = torch.nn.Parameter(torch.zeros(2, 2))
    assert prune_optimizer_state(optimizer, [fresh], ratio=0.5) == 0
    for bad in (-0.1, 1.5, float("nan"), True):
        with pytest.raises(InvalidHyperparameter) as info:
            prune_optimizer_state(optimizer, params, ratio=bad)
        assert info.value.field == "ratio"


def test_jagged_cosine_shape() -> None:
    total, warmup, every, climb = 100, 10, 30, 5

    def envelope(step: int) -> float:
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))

    values = [
        jagged_cosine(
            s, total=total, warmup=warmup, restart_every=every, restart_warmup=climb, min_ratio=0.1
        )
        for s in range(total + 1)
    ]
    assert values[:warmup] == pytest.approx([s / warmup for s in range(warmup)])
    for restart in (30, 60, 90):
        assert values[restart] == 0  # drops to zero right after each merge ...
        peak = envelope(restart + climb)  # ... and climbs back to the envelope in 5 steps
        climbing = [values[restart + i] for i in range(climb + 1)]
        assert climbing == pytest.approx([i / climb * peak for i in range(climb + 1)])
    rest = [s for s in range(warmup, total + 1) if s < every or s % every >= climb]
    assert [values[s] for s in rest] == pytest.approx([envelope(s) for s in rest])
    assert values[warmup] == pytest.approx(1.0) and values[total] == pytest.approx(0.1)
    assert min(values[warmup:]) == 0 and max(values) == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"total": 0}, "total"),
        ({"warmup": -1}, "warmup"),
        ({"restart_every": 0}, "every"),
        ({"restart_warmup": 31}, "restart_warmup"),
        ({"min_ratio": 2.0}, "min_ratio"),
    ],
)
def test_jagged_cosine_rejects(kwargs: dict[str, float], field: str) -> None:
    args = {"total": 100, "warmup": 10, "restart_every": 30, "restart_warmup": 5} | kwargs
    with pytest.raises(InvalidHyperparameter) as info:
        jagged_cosine(0, **args)  # type: ignore[arg-type]
    assert info.value.field == field


def test_schedule_options() -> None:
    assert ReLoraSchedule(every=25).restart_warmup == 3
    assert ReLoraSchedule(every=5, restart_warmup=0).restart_warmup == 0
    for kwargs, field in [
        ({"every": 0}, "every"),
        ({"every": 10, "restart_warmup": 11}, "restart_warmup"),
        ({"every": 10, "prune_ratio": 1.1}, "prune_ratio"),
    ]:
        with pytest.raises(InvalidHyperparameter) as info:
            ReLoraSchedule(**kwargs)  # type: ignore[arg-type]
        assert info.value.field == field


def test_relora_inside_one_training_run(
    make_base: MakeBase, tokenizer: PreTrainedTokenizerFast, tmp_path: Path
) -> None:
    """Merges every 15 steps of a 60-step run: three merges (not after the last step), the loss
    keeps falling, the base holds W0 + the sum of the merged updates, and the merged base plus
    the live adapter reproduce the model."""
    hyper = LoraHyperparams(rank=4, max_steps=60, batch_size=8, learning_rate=1e-2)
    relora = ReLoraSchedule(every=15, restart_warmup=3, prune_ratio=0.9)
    torch.manual_seed(0)
    model = peft.get_peft_model(make_base(), lora_config(hyper))
    w0 = _base_weights(model)
    merged: dict[str, torch.Tensor] = {name: torch.zeros_like(w) for name, w in w0.items()}
    seen: list[StepInfo] = []

    def record(info: StepInfo, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        if info.step % relora.every == 0 and info.step < info.total_steps:  # about to merge
            for name, delta in _deltas(model).items():
                merged[name] += delta

    callbacks = relora.callbacks(TrainingCallbacks(on_step=seen.append, after_step=record))
    task = synthetic_tasks(seed=0)[1]
    result = train(
        model, tokenizer, task.train, hyper, lr_schedule=relora.lr_multiplier, callbacks=callbacks
    )
    assert relora.merges == 3
    lrs = [info.learning_rate for info in seen]
    expected = [
        hyper.learning_rate * relora.lr_multiplier(s, total=60, warmup=4) for s in range(60)
    ]
    assert lrs == pytest.approx(expected) and lrs[15] == lrs[30] == lrs[45] == 0
    segments = [sum(result.losses[i : i + 15]) / 15 for i in range(0, 60, 15)]
    assert all(b < a for a, b in itertools.pairwise(segments)), segments
    assert segments[-1] < segments[0] / 2, segments
    for name, weight in _base_weights(model).items():
        torch.testing.assert_close(weight, w0[name] + merged[name], rtol=1e-5, atol=1e-5)
    assert any(float(delta.abs().max()) > 1e-3 for delta in merged.values())
    save_peft_adapter(model, tmp_path, adapter_name="default")
    merged_base = copy.deepcopy(model).unload()  # the (merged) base without its LoRA layers
    rebuilt = PeftModel.from_pretrained(merged_base, str(tmp_path))
    torch.testing.assert_close(_logits(rebuilt), _logits(model), rtol=0, atol=0)
    assert not torch.allclose(_logits(make_base()), _logits(model), atol=1e-3)

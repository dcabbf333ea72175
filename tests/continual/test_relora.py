"""ReLoRA cycles: a reset keeps the model's function and the cycle in the new adapter (never in
the base), the finished adapter is a plain LoRA adapter holding every cycle, and a training run
with cycles resumes exactly from a checkpoint."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from pathlib import Path

import peft
import pytest
import torch
from peft import PeftModel
from peft.tuners import lora
from safetensors.torch import load_file
from torch import nn
from torch.nn.utils import parametrize
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from continual.checkpoint import TrainState, load_train_state, save_train_state
from continual.config import LoraHyperparams
from continual.data import synthetic_tasks
from continual.errors import InvalidHyperparameter, TrainingCancelled
from continual.relora import (
    ReLoraCycles,
    prune_optimizer_state,
    resets_before,
    restart_ramp,
)
from continual.strategies import get_strategy, lora_config, save_peft_adapter
from continual.strategies.am_lora_layer import AmLoraLinear
from continual.training import StepInfo, TrainingCallbacks, lr_multiplier, train

MakeBase = Callable[..., LlamaForCausalLM]
HYPER = LoraHyperparams(rank=4, max_steps=20, relora_every=5, relora_prune=0.5)
IDS = torch.tensor([[1, 40, 41, 42, 43, 44], [1, 50, 51, 52, 53, 54]])
LAYERS = 2 * 7  # decoder layers x target modules of the tiny Llama


def _logits(model: nn.Module) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _peft_layers(model: nn.Module) -> dict[str, lora.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, lora.Linear)}


def _ab(layer: lora.Linear) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of the "default" adapter as the layer computes with them (all cycles)."""
    lora_A, lora_B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert isinstance(lora_A, torch.Tensor) and isinstance(lora_B, torch.Tensor)
    return lora_A.detach().clone(), lora_B.detach().clone()


def _random_lora(base: LlamaForCausalLM) -> PeftModel:
    """A PEFT LoRA model whose B matrices are random, so the adapter changes the logits."""
    torch.manual_seed(0)
    model = peft.get_peft_model(base, lora_config(HYPER))
    with torch.no_grad():
        for layer in _peft_layers(model).values():
            layer.lora_B["default"].weight.normal_(std=0.1)
    return model


def _optimizer_after_one_step(model: nn.Module) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, with moments from one step on the logits' mean."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model(input_ids=IDS).logits.square().mean().backward()
    optimizer.step()
    return optimizer


def test_a_reset_stacks_the_cycle_in_the_adapter_and_keeps_the_logits(
    make_base: MakeBase,
) -> None:
    model = _random_lora(make_base())
    base_weights = {n: m.get_base_layer().weight.clone() for n, m in _peft_layers(model).items()}
    cycles = ReLoraCycles.install(model, hyper=HYPER, total=20)
    assert len(cycles.slots) == LAYERS and cycles.config is model.peft_config["default"]
    optimizer = _optimizer_after_one_step(model)
    expected = _logits(model)
    before = {n: _ab(m) for n, m in _peft_layers(model).items()}
    live = [p for p in model.parameters() if p.requires_grad]
    torch.manual_seed(7)
    cycles.reset(optimizer)
    # The reference of the restart: PEFT's init (Kaiming-uniform A, a=sqrt(5)) drawn per layer
    # in module order from the same generator state.
    torch.manual_seed(7)
    fresh_A = [nn.init.kaiming_uniform_(torch.empty(4, a.shape[1]), a=math.sqrt(5))
               for a, _ in before.values()]  # fmt: skip
    torch.testing.assert_close(_logits(model), expected, rtol=0, atol=1e-6)
    for (name, layer), new_A in zip(_peft_layers(model).items(), fresh_A, strict=True):
        old_A, old_B = before[name]
        lora_A, lora_B = _ab(layer)  # (8, in), (out, 8): the old cycle, then the live one
        assert lora_A.shape == (8, old_A.shape[1]) and lora_B.shape == (old_B.shape[0], 8)
        assert torch.equal(lora_A[:4], old_A) and torch.equal(lora_B[:, :4], old_B)
        assert torch.equal(lora_A[4:], new_A) and not lora_B[:, 4:].any()
        assert torch.equal(layer.get_base_layer().weight, base_weights[name])  # never merged
    still = [p for p in model.parameters() if p.requires_grad]
    assert len(still) == len(live) and all(
        a is b for a, b in zip(still, live, strict=True)
    )  # same objects
    for param in live:  # half the moments pruned (HYPER.relora_prune), one mask for both
        state = optimizer.state[param]
        assert int((state["exp_avg"] == 0).sum()) == round(0.5 * param.numel())
        assert torch.equal(state["exp_avg"] == 0, state["exp_avg_sq"] == 0)
    assert cycles.resets == 1


def test_finish_leaves_a_plain_adapter_of_every_cycle(make_base: MakeBase, tmp_path: Path) -> None:
    model = _random_lora(make_base())
    cycles = ReLoraCycles.install(model, hyper=HYPER, total=20)
    optimizer = _optimizer_after_one_step(model)
    deltas = {n: m.scaling["default"] * (m.lora_B["default"].weight @ m.lora_A["default"].weight)
              for n, m in _peft_layers(model).items()}  # fmt: skip
    for _ in range(2):
        cycles.reset(optimizer)
        _optimizer_after_one_step(model)  # the live cycle learns something
    expected = _logits(model)
    assert cycles.finish() == 12
    for name, layer in _peft_layers(model).items():
        assert not parametrize.is_parametrized(layer.lora_A["default"])
        lora_A, lora_B = _ab(layer)
        assert lora_A.shape[0] == lora_B.shape[1] == layer.r["default"] == 12
        assert layer.scaling["default"] == 4.0 and layer.lora_alpha["default"] == 48.0
        first = 4.0 * lora_B[:, :4] @ lora_A[:4]  # the first cycle is what was there before
        torch.testing.assert_close(first, deltas[name].detach(), rtol=0, atol=1e-6)
    config = model.peft_config["default"]
    assert (config.r, config.lora_alpha) == (12, 48.0)
    torch.testing.assert_close(_logits(model), expected, rtol=0, atol=1e-6)
    save_peft_adapter(model, tmp_path, adapter_name="default")
    loaded = PeftModel.from_pretrained(make_base(), str(tmp_path))
    torch.testing.assert_close(_logits(loaded), expected, rtol=0, atol=1e-6)


def test_am_lora_stacks_grow_past_the_frozen_rank(
    make_base: MakeBase, tokenizer: PreTrainedTokenizerFast, tmp_path: Path
) -> None:
    """A new am-lora adapter outgrows the earlier adapters' rank: their stacks are zero-padded
    and the gated sum (and so the logits) is unchanged by a reset."""
    strategy = get_strategy("am-lora")
    task = synthetic_tasks(seed=0, train_size=16, test_size=4)[0]
    plain = LoraHyperparams(rank=4, max_steps=3, batch_size=8)
    first = strategy.prepare(make_base(), history=[], hyper=plain)
    train(first, tokenizer, task.train, plain)
    strategy.save_adapter(first, tmp_path / "a")
    model = strategy.prepare(make_base(), history=[tmp_path / "a"], hyper=HYPER)
    cycles = ReLoraCycles.install(model, hyper=HYPER, total=20)
    layers = [m for m in model.modules() if isinstance(m, AmLoraLinear)]
    assert len(cycles.slots) == len(layers) == LAYERS
    optimizer = _optimizer_after_one_step(model)
    expected = _logits(model)
    frozen = [layer.frozen_A.clone() for layer in layers]
    cycles.reset(optimizer)
    # atol: the wider zero-padded matmuls sum in another order
    torch.testing.assert_close(_logits(model), expected, rtol=0, atol=1e-5)
    for layer, old in zip(layers, frozen, strict=True):
        assert layer.stack_rank == 8 and layer.frozen_A.shape[1] == 8
        assert torch.equal(layer.frozen_A[:, :4], old) and not layer.frozen_A[:, 4:].any()
    cycles.finish()
    assert {(layer.rank, layer.alpha, layer.scaling) for layer in layers} == {(8, 32.0, 4.0)}


def test_install_refuses_what_it_cannot_cycle(make_base: MakeBase) -> None:
    with pytest.raises(InvalidHyperparameter) as info:
        ReLoraCycles.install(make_base(), hyper=LoraHyperparams(), total=10)
    assert info.value.field == "relora_every"
    with pytest.raises(ValueError, match="one trainable LoRA adapter in the model, found none"):
        ReLoraCycles.install(make_base(), hyper=HYPER, total=10)
    frozen = _random_lora(make_base())
    frozen.requires_grad_(False)
    with pytest.raises(ValueError, match="found none"):
        ReLoraCycles.install(frozen, hyper=HYPER, total=10)
    two = _random_lora(make_base())
    two.add_adapter("other", lora_config(HYPER))
    two.base_model.set_adapter(["default", "other"], inference_mode=False)
    with pytest.raises(ValueError, match=r"found \['default', 'other'\]"):
        ReLoraCycles.install(two, hyper=HYPER, total=10)
    merged = _random_lora(make_base())
    merged.merge_adapter()
    with pytest.raises(ValueError, match="merged into the base weight"):
        ReLoraCycles.install(merged, hyper=HYPER, total=10)
    torch.manual_seed(0)
    dora = peft.get_peft_model(make_base(), peft.LoraConfig(r=2, target_modules=["q_proj"],
                                                             use_dora=True))  # fmt: skip
    with pytest.raises(ValueError, match="DoRA"):
        ReLoraCycles.install(dora, hyper=HYPER, total=10)


def test_resets_and_the_restart_ramp() -> None:
    # resets after steps 5, 10, 15 of a 20-step run, never after the last one
    assert [resets_before(s, every=5, total=20) for s in (0, 4, 5, 9, 10, 19, 20)] == [
        0, 0, 1, 1, 2, 3, 3,
    ]  # fmt: skip
    assert resets_before(20, every=5, total=21) == 4
    ramp = [restart_ramp(s, every=10, warmup=4) for s in range(30)]
    assert ramp[:10] == [1.0] * 10  # nothing to restart before the first reset
    for restart in (10, 20):
        assert ramp[restart : restart + 5] == [0.0, 0.25, 0.5, 0.75, 1.0]
        assert ramp[restart + 5 : restart + 10] == [1.0] * 5
    assert [restart_ramp(s, every=10, warmup=0) for s in range(30)] == [1.0] * 30


@pytest.mark.parametrize("ratio", [0.99, 0.5, 0.0, 1.0])
def test_prune_removes_the_stated_fraction(ratio: float) -> None:
    generator = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.zeros(shape)) for shape in [(8, 64), (128, 8), (3, 5)]]
    optimizer = torch.optim.AdamW(params)
    for param in params:
        optimizer.state[param] = {
            "step": torch.tensor(7.0),
            "exp_avg": torch.randn(param.shape, generator=generator),
            "exp_avg_sq": torch.rand(param.shape, generator=generator),
        }
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
    fresh = torch.nn.Parameter(torch.zeros(2, 2))
    assert prune_optimizer_state(optimizer, [fresh], ratio=0.5) == 0  # no state: skipped
    for bad in (-0.1, 1.5, float("nan"), True):
        with pytest.raises(InvalidHyperparameter) as info:
            prune_optimizer_state(optimizer, params, ratio=bad)
        assert info.value.field == "ratio"


def test_a_training_run_with_cycles(
    make_base: MakeBase, tokenizer: PreTrainedTokenizerFast, tmp_path: Path
) -> None:
    """Resets after steps 15, 30 and 45 of 60: the learning rate restarts from 0 at each, the
    loss keeps falling, the base weights never change, and the saved adapter has rank 4 x 4."""
    hyper = LoraHyperparams(rank=4, max_steps=60, batch_size=8, learning_rate=1e-2,
                            relora_every=15, relora_warmup=3, relora_prune=0.9)  # fmt: skip
    model = get_strategy("seq-lora").prepare(make_base(), history=[], hyper=hyper)
    w0 = {n: m.get_base_layer().weight.clone() for n, m in _peft_layers(model).items()}
    seen: list[StepInfo] = []
    task = synthetic_tasks(seed=0)[1]
    result = train(model, tokenizer, task.train, hyper, callbacks=TrainingCallbacks(
        on_step=seen.append))  # fmt: skip
    assert result.relora_resets == 3
    expected = [hyper.learning_rate * lr_multiplier(s, total=60, warmup=4)
                * restart_ramp(s, every=15, warmup=3) for s in range(60)]  # fmt: skip
    lrs = [info.learning_rate for info in seen]
    assert lrs == pytest.approx(expected) and lrs[15] == lrs[30] == lrs[45] == 0 < lrs[16]
    segments = [sum(result.losses[i : i + 15]) / 15 for i in range(0, 60, 15)]
    assert all(b < a for a, b in itertools.pairwise(segments)), segments
    assert segments[-1] < segments[0] / 2, segments
    for name, layer in _peft_layers(model).items():
        assert torch.equal(layer.get_base_layer().weight, w0[name])
        assert _ab(layer)[0].shape[0] == 16
        assert not parametrize.is_parametrized(layer.lora_A["default"])
    save_peft_adapter(model, tmp_path, adapter_name="default")
    loaded = PeftModel.from_pretrained(make_base(), str(tmp_path))
    torch.testing.assert_close(_logits(loaded), _logits(model), rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", ["seq-lora", "inc-lora", "o-lora", "am-lora"])
def test_the_saved_adapter_reproduces_the_trained_model(
    make_base: MakeBase, tokenizer: PreTrainedTokenizerFast, tmp_path: Path, method: str
) -> None:
    """Task 2 of a stream trains with resets on top of task 1's adapter: the stream's inference
    model from the saved adapters gives the trained model's logits, the new adapter's rank
    counts the cycles, and the shared base is untouched."""
    strategy = get_strategy(method)
    tasks = synthetic_tasks(seed=0, train_size=32, test_size=4)
    plain = LoraHyperparams(rank=4, max_steps=6, batch_size=8, learning_rate=1e-2)
    first = strategy.prepare(make_base(), history=[], hyper=plain)
    train(first, tokenizer, tasks[0].train, plain, extra_loss=strategy.extra_loss)
    strategy.save_adapter(first, tmp_path / "t0")
    hyper = LoraHyperparams(rank=4, max_steps=11, batch_size=8, learning_rate=1e-2,
                            dropout=0.1, relora_every=4, relora_warmup=1)  # fmt: skip
    model = strategy.prepare(make_base(), history=[tmp_path / "t0"], hyper=hyper)
    result = train(model, tokenizer, tasks[1].train, hyper, extra_loss=strategy.extra_loss)
    assert result.relora_resets == 2  # after steps 4 and 8
    expected = _logits(model)
    strategy.save_adapter(model, tmp_path / "t1")
    config = peft.LoraConfig.from_pretrained(str(tmp_path / "t1"))
    assert config.r == 4 * 3  # the live cycle and two finished ones
    assert config.lora_alpha == pytest.approx(4.0 * config.r)  # scaling 16 / 4 kept
    rebuilt = strategy.inference_model(make_base(), history=[tmp_path / "t0", tmp_path / "t1"])
    got = _logits(rebuilt)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    only_first = strategy.inference_model(make_base(), history=[tmp_path / "t0"])
    assert (_logits(only_first) - expected).abs().max() > 1e-2  # task 2 changed the model
    fresh = dict(make_base().named_parameters())
    compared = set()
    for name, weight in model.named_parameters():
        key = name.removeprefix("base_model.model.").replace(".base_layer", "")
        if key in fresh:  # a base weight, wherever PEFT or am-lora moved it
            assert torch.equal(weight, fresh[key]), name
            compared.add(key)
    assert compared == set(fresh)


def test_seq_lora_continues_an_adapter_that_cycles_grew(
    make_base: MakeBase, tokenizer: PreTrainedTokenizerFast, tmp_path: Path
) -> None:
    """Task 1's cycles leave rank 4 x 2; task 2 (same settings) continues that adapter whole
    and its reset stacks another 8 rows. Found on an H200 run: task 2 was refused as a rank
    change. A rank the cycles cannot explain is still refused."""
    strategy = get_strategy("seq-lora")
    tasks = synthetic_tasks(seed=0, train_size=32, test_size=4)
    hyper = LoraHyperparams(rank=4, max_steps=8, batch_size=8, learning_rate=1e-2,
                            relora_every=4, relora_warmup=1)  # fmt: skip
    first = strategy.prepare(make_base(), history=[], hyper=hyper)
    assert train(first, tokenizer, tasks[0].train, hyper).relora_resets == 1
    strategy.save_adapter(first, tmp_path / "t0")
    second = strategy.prepare(make_base(), history=[tmp_path / "t0"], hyper=hyper)
    assert train(second, tokenizer, tasks[1].train, hyper).relora_resets == 1
    strategy.save_adapter(second, tmp_path / "t1")
    assert peft.LoraConfig.from_pretrained(str(tmp_path / "t1")).r == 8 * 2
    for other in (LoraHyperparams(rank=3, relora_every=4), LoraHyperparams(rank=4)):
        with pytest.raises(InvalidHyperparameter, match="rank cannot change"):
            strategy.prepare(make_base(), history=[tmp_path / "t0"], hyper=other)


@pytest.mark.parametrize("method", ["seq-lora", "am-lora"])
def test_a_resumed_run_with_cycles_equals_the_uninterrupted_run(
    make_base: MakeBase, tokenizer: PreTrainedTokenizerFast, tmp_path: Path, method: str
) -> None:
    """Checkpoint at step 6, mid-way through the second cycle (reset after step 4): a fresh
    model resumed from it ends with the uninterrupted run's adapter, every cycle included."""
    hyper = LoraHyperparams(rank=4, max_steps=11, batch_size=8, learning_rate=1e-2,
                            dropout=0.1, relora_every=4, relora_warmup=1)  # fmt: skip
    task = synthetic_tasks(seed=0, train_size=40, test_size=4)[0]
    strategy = get_strategy(method)
    whole = strategy.prepare(make_base(), history=[], hyper=hyper)
    expected = train(whole, tokenizer, task.train, hyper)

    steps: list[int] = []

    def save(state: TrainState) -> None:
        save_train_state(state, tmp_path / f"step{state.step}")

    callbacks = TrainingCallbacks(
        checkpoint_every=3, on_checkpoint=save, on_step=lambda info: steps.append(info.step),
        should_stop=lambda: len(steps) == 7,
    )  # fmt: skip
    first = strategy.prepare(make_base(), history=[], hyper=hyper)
    with pytest.raises(TrainingCancelled):
        train(first, tokenizer, task.train, hyper, callbacks=callbacks)
    state = load_train_state(tmp_path / "step6")
    done = {n: t.shape for n, t in state.buffers.items() if n.endswith(".done")}
    assert len(done) == 2 * LAYERS and all(s.numel() > 0 for s in done.values())  # 1 cycle
    second = strategy.prepare(make_base(), history=[], hyper=hyper)
    resumed = train(second, tokenizer, task.train, hyper, resume=state)
    assert resumed.relora_resets == expected.relora_resets == 2
    assert resumed.losses == pytest.approx(expected.losses, abs=1e-6)
    strategy.save_adapter(whole, tmp_path / "whole")
    strategy.save_adapter(second, tmp_path / "resumed")
    a = load_file(str(tmp_path / "whole" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and len(a) == 2 * LAYERS
    for key in a:  # A (12, in) and B (out, 12): three cycles of rank 4
        assert (a[key].shape[0] if key.endswith("lora_A.weight") else a[key].shape[1]) == 12
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6)

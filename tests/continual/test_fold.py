"""`continual.fold`: am-lora's gated fold and its memory, the drop check, and am-lora's O-LoRA
overlap term (against earlier adapters and against the folded tasks' memory)."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from continual.config import LoraHyperparams
from continual.data import synthetic_tasks
from continual.errors import ConsolidationRegressed, InvalidHyperparameter
from continual.fold import (
    DISTILL,
    PROBES_PER_TASK,
    SEQUENCES_PER_TASK,
    TaskCheck,
    check_drops,
    drop_table,
    fold_state,
    mean_gates,
    probe_count,
    probe_sequences,
)
from continual.fold_distill import DistillSettings
from continual.strategies import get_strategy
from continual.strategies.am_lora import am_lora_layers
from continual.strategies.am_lora_files import is_memory
from continual.training import train

MakeBase = Callable[..., LlamaForCausalLM]
HYPER = LoraHyperparams(rank=4)
IDS = torch.tensor([[1, 40, 41, 42, 43, 44, 45]])


def _logits(model: torch.nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


def _adapter(
    make_base: MakeBase, root: Path, history: list[Path], *, seed: int, **options: float
) -> Path:
    """One am-lora adapter on `history` with a random B (so it changes the outputs)."""
    strategy = get_strategy("am-lora", **options)
    model = strategy.prepare(make_base(), history=history, hyper=HYPER)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in am_lora_layers(model).values():
            assert layer.lora_B is not None
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator) * 0.2)
    out = root / f"a{len(history)}"
    strategy.save_adapter(model, out)
    return out


def test_a_constant_gate_makes_the_gated_fold_exact_and_its_weights_follow_the_formula(
    make_base: MakeBase, tmp_path: Path
) -> None:
    # With the selector's dense layer at zero, every token gets the same gate g: the mixture
    # is W0 x + g dW x, and the fold W0 + g dW reproduces it.
    path = _adapter(make_base, tmp_path, [], seed=0)
    strategy = get_strategy("am-lora")
    state = strategy.inference_model(make_base(), history=[path])
    with torch.no_grad():
        for layer in am_lora_layers(state).values():
            layer.selector_weight.zero_()
            layer.selector_bias.copy_(torch.tensor([0.0, 0.4]))  # g = sigmoid(0.4)
    reference = _logits(state)
    layers = am_lora_layers(state)
    expected = {
        p: layer.base_layer.weight.detach().clone()
        + torch.sigmoid(torch.tensor(0.4)) * (layer.frozen_B[:, 0] @ layer.frozen_A[0])
        for p, layer in layers.items()
    }
    fitted = DistillSettings(steps=0)  # the fitted fold alone: the formula
    fold = fold_state(state, method="am-lora", history=[path], probes=[[IDS]], distillation=fitted)
    assert fold.exact is False and fold.mean_gates is not None
    assert fold.mean_gates[0] == pytest.approx(float(torch.sigmoid(torch.tensor(0.4))), abs=1e-6)
    for p, weight in expected.items():
        torch.testing.assert_close(fold.model.get_submodule(p).weight, weight)
    assert not am_lora_layers_left(fold.model)
    torch.testing.assert_close(_logits(fold.model), reference, rtol=0, atol=1e-4)
    assert sorted(fold.changed) == sorted(f"{p}.weight" for p in expected)


def am_lora_layers_left(model: torch.nn.Module) -> bool:
    try:
        am_lora_layers(model)
    except ValueError:
        return False
    return True


def test_mean_gates_average_each_adapters_gate_over_its_own_tasks_tokens(
    make_base: MakeBase, tmp_path: Path
) -> None:
    first = _adapter(make_base, tmp_path, [], seed=0)
    second = _adapter(make_base, tmp_path, [first], seed=1)
    state = get_strategy("am-lora", routing_weight=0).inference_model(
        make_base(), history=[first, second]
    )
    probes = [[IDS, IDS[:, :4]], [torch.tensor([[1, 60, 61, 62]])]]
    gates = mean_gates(state, probes)
    # the reference: every token's gate, from the layer's own `gates` on the same inputs
    seen: dict[str, list[torch.Tensor]] = {}

    def keep(name: str) -> Callable[..., None]:
        def hook(layer: torch.nn.Module, args: tuple[torch.Tensor, ...], _: object) -> None:
            lora_A, lora_B = layer.stacked()
            h = (args[0] @ lora_A.T).unflatten(-1, (-1, layer.stack_rank))
            seen.setdefault(name, []).append(layer.gates(h, lora_B)[0])  # (T, n + 1)

        return hook

    for name, layer in am_lora_layers(state).items():
        layer.register_forward_hook(keep(name))
    for ids in (IDS, IDS[:, :4], probes[1][0]):
        _logits(state, ids)
    for name, per_pass in seen.items():
        first_task = torch.cat(per_pass[:2])[:, 1].mean()  # 7 + 4 tokens, adapter 0
        second_task = per_pass[2][:, 2].mean()  # adapter 1 on its own task's tokens
        torch.testing.assert_close(gates[name], torch.stack([first_task, second_task]))
    with pytest.raises(ValueError, match="probe sequences"):
        fold_state(state, method="am-lora", history=[first, second], probes=[[IDS]])


def test_the_overlap_term_covers_earlier_adapters_and_the_folded_memory(
    make_base: MakeBase, tmp_path: Path
) -> None:
    first = _adapter(make_base, tmp_path, [], seed=0)
    strategy = get_strategy("am-lora", sparsity_weight=0, lambda1=0.7, lambda2=0.05)
    model = strategy.prepare(make_base(), history=[first], hyper=HYPER)
    earlier = load_file(str(first / "adapter_model.safetensors"))
    overlaps, norms = [], []
    for path, layer in am_lora_layers(model).items():
        assert layer.lora_A is not None and layer.lora_B is not None
        old = earlier[f"base_model.model.{path}.lora_A.weight"]  # (r_old, d_in)
        overlaps.append((old @ layer.lora_A.T).abs().sum() / old.shape[0])
        norms += [layer.lora_A.norm(), layer.lora_B.norm()]
    expected = 0.7 * torch.stack(overlaps).mean() + 0.05 * torch.stack(norms).sum()
    loss = strategy.extra_loss(model)
    assert loss is not None
    torch.testing.assert_close(loss, expected)
    loss.backward()  # only the new adapter learns from it
    assert all(p.grad is None for n, p in model.named_parameters() if "frozen" in n)

    # After a fold, the new adapter keeps away from the folded tasks' subspace too.
    state = get_strategy("am-lora").inference_model(make_base(), history=[first])
    fold = fold_state(state, method="am-lora", history=[first], probes=[[IDS]])
    assert fold.write_memory(tmp_path / "snap") and fold.statistics is None  # one task: no router
    memory = tmp_path / "snap" / "olora_memory"
    assert is_memory(memory) and not is_memory(first)
    folded_base = fold.model
    model = strategy.prepare(folded_base, history=[memory], hyper=HYPER)
    rows = load_file(str(memory / "adapter_model.safetensors"))
    overlaps, norms = [], []
    for path, layer in am_lora_layers(model).items():
        assert layer.lora_A is not None and layer.lora_B is not None
        old = rows[f"base_model.model.{path}.lora_A.weight"]
        old = old[old.norm(dim=1) > 0]  # the memory's padding rows
        overlaps.append((old @ layer.lora_A.T).abs().sum() / old.shape[0])
        norms += [layer.lora_A.norm(), layer.lora_B.norm()]
        assert layer.frozen_A.shape[0] == 0  # the memory is no adapter to mix
    expected = 0.7 * torch.stack(overlaps).mean() + 0.05 * torch.stack(norms).sum()
    loss = strategy.extra_loss(model)
    assert loss is not None and float(torch.stack(overlaps).mean()) > 0
    torch.testing.assert_close(loss, expected)
    # and the model it serves the folded task with is the folded base itself
    assert get_strategy("am-lora").inference_model(folded_base, history=[memory]) is folded_base


def test_the_drop_check_names_every_task_past_max_drop_and_bad_options_are_refused() -> None:
    checks = [TaskCheck("a", 0.90, 0.89), TaskCheck("b", 0.80, 0.70), TaskCheck("c", None, 0.5)]
    check_drops(checks, max_drop=10.0)  # b drops exactly 10 points: allowed
    with pytest.raises(ConsolidationRegressed) as exc:
        check_drops(checks, max_drop=2.0)
    assert exc.value.tasks == ["b"] and exc.value.code == "consolidation_regressed"
    assert "b" in exc.value.table and "10.0" in exc.value.table and "-" in exc.value.table
    # a task the folded state has not learned yet (queued after the fold) is shown, not gated
    later = [*checks[:1], TaskCheck("d", 0.75, 0.50, learned=False)]
    check_drops(later, max_drop=2.0)
    assert "(not learned yet)" in drop_table(later)
    for options, field in (({"lambda1": -1}, "lambda1"), ({"lambda2": "x"}, "lambda2"),
                           ({"lambda1_norm": "max"}, "lambda1_norm")):  # fmt: skip
        with pytest.raises(InvalidHyperparameter) as bad:
            get_strategy("am-lora", **options)
        assert bad.value.field == field


def test_a_folded_tasks_sequences_are_served_by_the_snapshot_alone_in_any_batch(
    make_base: MakeBase, tokenizer: PreTrainedTokenizerFast, tmp_path: Path
) -> None:
    strategy, hyper = get_strategy("am-lora"), LoraHyperparams(rank=4, max_steps=6, batch_size=8)
    tasks = synthetic_tasks(seed=0, train_size=32, test_size=4)

    def learn(base: Callable[[], torch.nn.Module], history: list[Path], index: int) -> Path:
        model = strategy.prepare(base(), history=history, hyper=hyper)  # type: ignore[arg-type]
        train(model, tokenizer, tasks[index].train, hyper,
              extra_loss=lambda _m: strategy.extra_loss(model))  # fmt: skip
        strategy.save_adapter(model, tmp_path / f"t{index}")
        return tmp_path / f"t{index}"

    first = learn(make_base, [], 0)
    early = [first, learn(make_base, [first], 1)]
    probes = [probe_sequences(tokenizer, t, max_length=64) for t in tasks[:2]]
    state = strategy.inference_model(make_base(), history=early)
    fold = fold_state(state, method="am-lora", history=early, probes=probes)
    assert fold.statistics is not None and fold.write_memory(tmp_path / "snap")
    snapshot = fold.model
    memory = [tmp_path / "snap" / "olora_memory"]
    later = [*memory, learn(lambda: copy.deepcopy(snapshot), memory, 2)]
    model = strategy.inference_model(copy.deepcopy(snapshot), history=later)
    folded_ids = tokenizer(tasks[0].test[0].prompt, return_tensors="pt")["input_ids"]
    live_ids = tokenizer(tasks[2].test[0].prompt, return_tensors="pt")["input_ids"]
    alone = {"live": _logits(model, live_ids)}
    alone["folded"] = _logits(model, folded_ids)  # the last pass: a folded task alone
    layers = list(am_lora_layers(model).values())
    assert all(layer.skip_adapters for layer in layers)
    assert torch.equal(alone["folded"], _logits(snapshot, folded_ids))
    assert not torch.allclose(alone["live"], _logits(snapshot, live_ids))  # its adapter acts
    # in one padded batch, each sequence gets what it gets alone
    width = max(folded_ids.shape[1], live_ids.shape[1])
    pad = tokenizer.pad_token_id or 0
    ids = torch.full((2, width), pad)
    mask = torch.zeros(2, width, dtype=torch.long)
    for row, seq in enumerate((folded_ids[0], live_ids[0])):
        ids[row, width - len(seq) :], mask[row, width - len(seq) :] = seq, 1  # left padding
    with torch.no_grad():
        both = model(input_ids=ids, attention_mask=mask).logits
    assert not any(layer.skip_adapters for layer in layers)
    torch.testing.assert_close(
        both[0, -folded_ids.shape[1] :], alone["folded"][0], atol=1e-5, rtol=0
    )
    torch.testing.assert_close(both[1, -live_ids.shape[1] :], alone["live"][0], atol=1e-5, rtol=0)


def test_a_fold_encodes_only_the_sequences_it_reads() -> None:
    # am-lora's distillation trains on many sequences; its fit and the exact folds' check on few
    assert PROBES_PER_TASK < SEQUENCES_PER_TASK
    fitted = dataclasses.replace(DISTILL, steps=0)  # am-lora's fit without the distillation
    assert probe_count("am-lora") == probe_count("am-lora", DISTILL) == SEQUENCES_PER_TASK
    assert probe_count("am-lora", fitted) == PROBES_PER_TASK
    for method in ("seq-lora", "inc-lora", "o-lora"):
        assert probe_count(method) == probe_count(method, fitted) == PROBES_PER_TASK

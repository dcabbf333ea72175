from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from continual.config import LoraHyperparams
from continual.data import Example, synthetic_tasks
from continual.errors import InvalidHyperparameter
from continual.options import AmLoraOptions
from continual.strategies import ADAPTER_FILES, STRATEGIES, AmLora, get_strategy
from continual.strategies.am_lora import SELECTOR_FILE, am_lora_layers
from continual.strategies.am_lora_layer import AmLoraLinear, stack_adapters
from continual.stream import learn_stream
from continual.training import causal_lm_loss, train

MakeBase = Callable[..., LlamaForCausalLM]
HYPER = LoraHyperparams(rank=4, max_steps=3, batch_size=4, learning_rate=1e-2)
IDS = torch.tensor([[1, 40, 41, 42, 43, 44], [1, 50, 51, 52, 53, 54]])
LAYERS = 2 * 7  # decoder layers x target modules of the tiny Llama
EXAMPLES = [Example(f"Say {w}.\nAnswer:", f" {w}") for w in ("red", "blue", "green", "good")]


def _logits(model: torch.nn.Module) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _randomise(model: torch.nn.Module, *, seed: int, selector_std: float = 1.0) -> None:
    """Random new B and selector, so the adapter and the gates do something without training."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in am_lora_layers(model).values():
            assert layer.lora_B is not None
            for param, std in (
                (layer.lora_B, 0.2),
                (layer.selector_weight, selector_std),
                (layer.selector_bias, selector_std),
            ):
                param.copy_(torch.randn(param.shape, generator=generator) * std)


def _history(
    make_base: MakeBase, root: Path, count: int, *, rank: int = 4, selector_std: float = 1.0
) -> list[Path]:
    """`count` am-lora adapter directories with random weights, oldest first."""
    strategy, dirs = AmLora(), list[Path]()
    for index in range(count):
        hyper = LoraHyperparams(rank=rank + 2 * index)  # ranks differ: stacks are zero-padded
        model = strategy.prepare(make_base(), history=dirs, hyper=hyper)
        _randomise(model, seed=index, selector_std=selector_std)
        strategy.save_adapter(model, root / f"a{index}")
        dirs.append(root / f"a{index}")
    return dirs


def _reference(layer: AmLoraLinear, x: torch.Tensor, adapters: Sequence[tuple]) -> torch.Tensor:
    """The mixture written out branch by branch: W0 x + sum_i g_i scale_i B_i A_i x with
    g = softmax([z, w_i . (scale_i B_i A_i x) + b_i])."""
    deltas = [scale * (x @ a.T) @ b.T for a, b, scale in adapters]  # n x (..., out)
    scores = [layer.selector_bias[0].expand(x.shape[:-1])]
    for i, delta in enumerate(deltas):
        scores.append(delta @ layer.selector_weight[i] + layer.selector_bias[i + 1])
    g = torch.softmax(torch.stack(scores, dim=-1), dim=-1)  # (..., n + 1)
    mixed = sum(g[..., i + 1, None] * delta for i, delta in enumerate(deltas))
    return layer.base_layer(x) + mixed


def test_registry_and_options() -> None:
    assert STRATEGIES["am-lora"] is AmLora
    assert get_strategy("am-lora", sparsity_weight=0.5).options.sparsity_weight == 0.5  # type: ignore[attr-defined]
    for bad in (-1.0, float("nan"), float("inf"), True, "0.1"):
        with pytest.raises(InvalidHyperparameter) as info:
            get_strategy("am-lora", sparsity_weight=bad)
        assert info.value.field == "sparsity_weight"
    assert get_strategy("am-lora", selector_lr_scale=20).options.selector_lr_scale == 20.0  # type: ignore[attr-defined]
    for bad in (0, -1.0, float("nan"), float("inf"), True, "10"):
        with pytest.raises(InvalidHyperparameter) as info:
            get_strategy("am-lora", selector_lr_scale=bad)
        assert info.value.field == "selector_lr_scale"
    with pytest.raises(InvalidHyperparameter) as info:
        get_strategy("am-lora", rank=4)
    assert info.value.field == "rank"


@pytest.mark.parametrize("share", [0.5, 0.9, 0.2])
def test_a_new_adapter_starts_with_its_initial_share(share: float) -> None:
    """`initial_share` is the new adapter's weight in every token's mixture at its start,
    against the zero adapter and the earlier adapters together (whatever their logits)."""
    generator = torch.Generator().manual_seed(0)
    earlier = stack_adapters(
        [(torch.randn(2, 12, generator=generator), torch.randn(10, 2, generator=generator), 1.0)]
    )
    layer = AmLoraLinear(torch.nn.Linear(12, 10), frozen=earlier, rank=2, alpha=2.0,
                         selector_bias=torch.tensor([0.3, -1.2]), initial_share=share)  # fmt: skip
    x = torch.randn(3, 5, 12, generator=generator)
    h = (x @ layer.stacked()[0].T).unflatten(-1, (-1, layer.stack_rank))
    g = layer.gates(h, layer.stacked()[1])
    torch.testing.assert_close(g[..., -1], torch.full((3, 5), share))
    assert get_strategy("am-lora", initial_share=0.9).options.initial_share == 0.9  # type: ignore[attr-defined]
    for bad in (0, 1, 1.5, -0.1, float("nan"), True):
        with pytest.raises(InvalidHyperparameter) as info:
            get_strategy("am-lora", initial_share=bad)
        assert info.value.field == "initial_share"


@pytest.mark.parametrize("new_rank", [None, 2, 6])
def test_layer_matches_the_branch_by_branch_reference(new_rank: int | None) -> None:
    torch.manual_seed(0)  # the base layer and the new A: the same draw whatever ran before
    generator = torch.Generator().manual_seed(0)
    base = torch.nn.Linear(12, 10)
    ranks = (3, 4, 2)  # padded to the largest in the stack
    frozen = [
        (torch.randn(r, 12, generator=generator), torch.randn(10, r, generator=generator), s)
        for r, s in zip(ranks, (0.5, 2.0, 1.5), strict=True)
    ]
    n = len(frozen) + (new_rank is not None)
    layer = AmLoraLinear(
        base,
        frozen=stack_adapters(frozen),
        rank=new_rank,
        alpha=3.0,
        selector_weight=torch.randn(n, 10, generator=generator),
        selector_bias=torch.randn(n + 1, generator=generator),
    )
    adapters = list(frozen)
    if layer.lora_A is not None and layer.lora_B is not None:
        with torch.no_grad():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator))
        adapters.append((layer.lora_A, layer.lora_B, layer.scaling))
    x = torch.randn(2, 5, 12, generator=generator)
    # float32 sums of up to four branches in two orders: 1e-4 (a wrong mixture is off by O(1))
    torch.testing.assert_close(layer(x), _reference(layer, x, adapters), rtol=1e-4, atol=1e-4)
    assert layer.num_adapters == n


def test_the_new_adapter_resets_as_peft_resets_a_lora_layer() -> None:
    """`AmLoraLinear.reset_lora_parameters` (what merge-and-reinit calls) starts the new
    adapter as PEFT's `reset_lora_parameters(name, True)` does: B zero, A kaiming-uniform."""
    base = torch.nn.Linear(64, 32)
    stack = stack_adapters([(torch.randn(4, 64), torch.randn(32, 4), 1.0)])
    layer = AmLoraLinear(base, frozen=stack, rank=8, alpha=16.0)
    assert layer.lora_A is not None and layer.lora_B is not None
    with torch.no_grad():
        layer.lora_A.fill_(7.0)
        layer.lora_B.fill_(3.0)
    layer.reset_lora_parameters()
    assert torch.count_nonzero(layer.lora_B) == 0
    bound = 1 / math.sqrt(64)  # kaiming_uniform_(a=sqrt(5)) on fan_in 64
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.std() > bound / 4
    frozen_only = AmLoraLinear(base, frozen=stack, rank=None, alpha=16.0)
    with pytest.raises(ValueError, match="no new adapter"):
        frozen_only.reset_lora_parameters()


def test_every_branch_runs_in_the_same_ops() -> None:
    """The branches are batched: the ops a forward+backward runs do not grow with adapters."""

    def ops(count: int) -> Counter[str]:
        base = torch.nn.Linear(16, 16)
        adapters = [(torch.randn(4, 16), torch.randn(16, 4), 1.0)] * count
        layer = AmLoraLinear(base, frozen=stack_adapters(adapters), rank=4, alpha=8.0)
        x = torch.randn(3, 16, requires_grad=True)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            layer(x).sum().backward()
        return Counter({e.key: e.count for e in prof.key_averages() if e.key.startswith("aten::")})

    one, sixteen = ops(1), ops(16)
    assert one["aten::mm"] > 0 and one == sixteen


def test_selecting_only_the_zero_adapter_is_the_base_exactly(
    make_base: MakeBase, tmp_path: Path
) -> None:
    history = _history(make_base, tmp_path, 2)
    model = AmLora().prepare(make_base(), history=history, hyper=HYPER)
    _randomise(model, seed=9)
    assert not torch.allclose(_logits(model), _logits(make_base()))
    with torch.no_grad():
        for layer in am_lora_layers(model).values():
            layer.selector_bias[1:] = -math.inf  # g = (1, 0, 0, 0) for every token
    torch.testing.assert_close(_logits(model), _logits(make_base()), rtol=0, atol=0)


def test_selecting_one_adapter_is_that_peft_adapter(make_base: MakeBase, tmp_path: Path) -> None:
    history = _history(make_base, tmp_path, 3)
    model = AmLora().inference_model(make_base(), history=history)
    with torch.no_grad():
        for layer in am_lora_layers(model).values():
            layer.selector_bias[:] = -math.inf
            layer.selector_bias[2] = 0.0  # all weight on the adapter of history[1]
    peft_model = PeftModel.from_pretrained(make_base(), str(history[1]))
    assert not torch.allclose(_logits(peft_model), _logits(make_base()))
    torch.testing.assert_close(_logits(model), _logits(peft_model), rtol=1e-5, atol=1e-5)


def test_only_the_new_adapter_and_the_selector_train(
    make_base: MakeBase, tokenizer: PreTrainedTokenizerFast, tmp_path: Path
) -> None:
    history = _history(make_base, tmp_path, 2)
    strategy = AmLora(AmLoraOptions(sparsity_weight=0.1))
    model = strategy.prepare(make_base(), history=history, hyper=HYPER)
    trainable = {name.rsplit(".", 1)[-1] for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A", "lora_B", "selector_weight", "selector_bias"}
    labels = IDS.clone()
    labels[:, :3] = -100
    loss = causal_lm_loss(model(input_ids=IDS).logits, labels)
    extra = strategy.extra_loss(model)
    assert extra is not None and extra.requires_grad
    (loss + extra).backward()
    for name, param in model.named_parameters():
        assert (param.grad is not None) == param.requires_grad, name
        if param.requires_grad and "lora_A" not in name:  # A gets no gradient while B = 0
            assert float(param.grad.abs().sum()) > 0, name  # type: ignore[union-attr]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train(model, tokenizer, EXAMPLES, HYPER, extra_loss=strategy.extra_loss)
    changed = {
        k.rsplit(".", 1)[-1] for k, v in model.state_dict().items() if not torch.equal(v, before[k])
    }
    assert changed == {"lora_A", "lora_B", "selector_weight", "selector_bias"}


def test_selector_lr_scale_trains_the_selector_faster(
    make_base: MakeBase, tokenizer: PreTrainedTokenizerFast, tmp_path: Path
) -> None:
    """Adam's first step moves each entry by about its group's rate: the selector's is 30x."""
    history = _history(make_base, tmp_path, 1)
    strategy = AmLora(AmLoraOptions(selector_lr_scale=30.0))
    model = strategy.prepare(make_base(), history=history, hyper=HYPER)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hyper = dataclasses.replace(HYPER, max_steps=1, warmup_ratio=0.0, weight_decay=0.0)
    train(model, tokenizer, EXAMPLES, hyper, extra_loss=strategy.extra_loss)
    moved_B, moved_bias = (
        max(float((v - before[k]).abs().max()) for k, v in model.state_dict().items()
            if k.endswith(suffix))
        for suffix in (".lora_B", ".selector_bias")
    )  # fmt: skip
    assert moved_B == pytest.approx(hyper.learning_rate, rel=1e-3)
    assert moved_bias == pytest.approx(30 * hyper.learning_rate, rel=1e-3)


def _entropy(model: torch.nn.Module, ids: torch.Tensor) -> float:
    """Mean entropy (nats) of the selector weights over layers and tokens."""
    values: list[torch.Tensor] = []

    def hook(layer: torch.nn.Module, inputs: tuple[torch.Tensor], _: torch.Tensor) -> None:
        assert isinstance(layer, AmLoraLinear)
        lora_A, lora_B = layer.stacked()
        h = (inputs[0] @ lora_A.T).unflatten(-1, (-1, layer.stack_rank))
        g = layer.gates(h, lora_B)
        values.append(-(g * g.clamp_min(1e-12).log()).sum(-1).mean())

    handles = [m.register_forward_hook(hook) for m in am_lora_layers(model).values()]
    with torch.no_grad():
        model(input_ids=ids)
    for handle in handles:
        handle.remove()
    return float(torch.stack(values).mean())


def test_sparsity_penalty_lowers_the_selector_entropy(
    make_base: MakeBase, tokenizer: PreTrainedTokenizerFast, tmp_path: Path
) -> None:
    history = _history(make_base, tmp_path, 3, selector_std=0.0)  # neutral saved selectors
    hyper = LoraHyperparams(rank=4, max_steps=20, batch_size=8, learning_rate=1e-2)
    examples = synthetic_tasks(seed=0, train_size=64, test_size=0)[0].train
    # Zero and 3 earlier adapters at logit 0, the new one at logsumexp = log 4: g = (1,1,1,1,4)/8
    g = torch.tensor([1.0, 1.0, 1.0, 1.0, 4.0]) / 8
    start = float(-(g * g.log()).sum())
    entropies = []
    for weight in (0.0, 0.1, 1.0):
        # The selector at the run's rate (1e-2, ten times a real run's): at 30x it settles on
        # one adapter within these 20 steps even without the penalty.
        strategy = AmLora(AmLoraOptions(sparsity_weight=weight, selector_lr_scale=1.0))
        model = strategy.prepare(make_base(), history=history, hyper=hyper)
        assert _entropy(model, IDS) == pytest.approx(start, abs=1e-5)
        train(model, tokenizer, examples, hyper, extra_loss=strategy.extra_loss)
        entropies.append(_entropy(model, IDS))
    assert start > entropies[0] > entropies[1] > entropies[2], entropies
    assert entropies[2] < 0.6 * entropies[0], entropies


def test_sparsity_term_is_the_gini_impurity(make_base: MakeBase, tmp_path: Path) -> None:
    model = AmLora().prepare(make_base(), history=_history(make_base, tmp_path, 1), hyper=HYPER)
    strategy = AmLora(AmLoraOptions(sparsity_weight=0.5))
    with pytest.raises(RuntimeError, match="needs a forward pass"):
        strategy.extra_loss(model)
    assert AmLora(AmLoraOptions(sparsity_weight=0.0)).extra_loss(model) is None
    model.train()
    model(input_ids=IDS)
    layers = am_lora_layers(model).values()
    expected = []
    for layer in layers:
        assert layer.last_impurity is not None
        expected.append(layer.last_impurity.detach())
    penalty = strategy.extra_loss(model)
    assert penalty is not None
    torch.testing.assert_close(penalty, 0.5 * torch.stack(expected).mean())
    assert all(layer.last_impurity is None for layer in layers)  # the graph is released
    with torch.no_grad():  # one adapter takes all the weight: no impurity left
        for layer in layers:
            layer.selector_bias[:] = torch.tensor([-math.inf, 0.0, -math.inf])
    model(input_ids=IDS)
    assert float(strategy.extra_loss(model).detach()) == 0.0  # type: ignore[union-attr]


def test_save_and_reload_give_identical_logits(
    make_base: MakeBase, tokenizer: PreTrainedTokenizerFast, tmp_path: Path
) -> None:
    history = _history(make_base, tmp_path, 2)
    strategy = AmLora()
    model = strategy.prepare(make_base(), history=history, hyper=HYPER)
    train(model, tokenizer, EXAMPLES, HYPER, extra_loss=strategy.extra_loss)
    strategy.save_adapter(model, tmp_path / "new")
    files = sorted(p.name for p in (tmp_path / "new").iterdir())
    assert files == sorted([*ADAPTER_FILES, SELECTOR_FILE])
    expected = _logits(model)
    rebuilt = strategy.inference_model(make_base(), history=[*history, tmp_path / "new"])
    torch.testing.assert_close(_logits(rebuilt), expected, rtol=0, atol=0)
    assert not any(p.requires_grad for p in rebuilt.parameters())
    # The task's own adapter is a plain PEFT LoRA adapter with exactly the trained A and B.
    peft_model = PeftModel.from_pretrained(make_base(), str(tmp_path / "new"))
    ours = am_lora_layers(model)
    for path, layer in ours.items():
        peft_layer = peft_model.get_base_model().get_submodule(path)
        for name in ("lora_A", "lora_B"):
            saved = getattr(peft_layer, name)["default"].weight
            assert torch.equal(saved, getattr(layer, name)), (path, name)
    config = json.loads((tmp_path / "new" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["peft_type"] == "LORA"
    with safe_open(str(tmp_path / "new" / SELECTOR_FILE), framework="pt") as f:
        assert f.metadata()["num_adapters"] == "3"
        assert f.get_tensor(f"{next(iter(ours))}.bias").shape == (4,)
    # The next task continues this selector and adds a neutral row for its own adapter.
    following = strategy.prepare(make_base(), history=[*history, tmp_path / "new"], hyper=HYPER)
    for path, layer in am_lora_layers(following).items():
        torch.testing.assert_close(layer.selector_bias[:4], ours[path].selector_bias)
        head_start = torch.logsumexp(ours[path].selector_bias, dim=0)  # about half the weight
        torch.testing.assert_close(layer.selector_bias[4], head_start)
        torch.testing.assert_close(layer.selector_weight[:3], ours[path].selector_weight)
        assert not layer.selector_weight[3].any()


def test_inference_without_history_is_the_base(make_base: MakeBase) -> None:
    base = make_base()
    assert AmLora().inference_model(base, history=[]) is base


def test_history_errors(make_base: MakeBase, tmp_path: Path) -> None:
    history = _history(make_base, tmp_path, 2)
    strategy = AmLora()
    with pytest.raises(ValueError, match="mixes 2 adapters but the history has 1"):
        strategy.inference_model(make_base(), history=history[1:])
    with pytest.raises(ValueError, match="mixes 1 adapters but the history has 2"):
        strategy.prepare(make_base(), history=[history[1], history[0]], hyper=HYPER)
    with pytest.raises(InvalidHyperparameter) as info:
        strategy.prepare(
            make_base(), history=history, hyper=LoraHyperparams(target_modules=("q_proj",))
        )
    assert info.value.field == "target_modules" and "same layers" in info.value.reason
    with pytest.raises(InvalidHyperparameter) as info:
        strategy.prepare(make_base(), history=[], hyper=LoraHyperparams(target_modules=("nope",)))
    assert info.value.field == "target_modules"
    with pytest.raises(InvalidHyperparameter, match="not Linear"):
        strategy.prepare(make_base(), history=[], hyper=LoraHyperparams(target_modules=("mlp",)))
    with pytest.raises(ValueError, match="no AM-LoRA layers"):
        strategy.save_adapter(make_base(), tmp_path / "x")
    with pytest.raises(ValueError, match="no new am-lora adapter"):
        strategy.save_adapter(
            strategy.inference_model(make_base(), history=[history[0]]), tmp_path / "x"
        )
    (history[1] / SELECTOR_FILE).unlink()
    with pytest.raises(ValueError, match=r"no selector\.safetensors"):
        strategy.inference_model(make_base(), history=history)
    config_path = history[0] / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps(config | {"use_dora": True}))
    with pytest.raises(ValueError, match="plain LoRA adapters only"):
        strategy.prepare(make_base(), history=history[:1], hyper=HYPER)


def test_am_lora_stream_learns_every_task(
    make_base: MakeBase, tokenizer: PreTrainedTokenizerFast, tmp_path: Path
) -> None:
    """The 3-task synthetic stream end to end through the saved files, with task routing (the
    default): learning a task leaves the earlier ones as they were. Measured on seeds 0 and 1:
    ACC 0.995 and BWT 0.000 both times; without routing (the selector alone) ACC 0.61 / 0.64
    and BWT -0.56 / -0.44."""
    tasks = synthetic_tasks(seed=0)
    result = learn_stream(
        strategy=get_strategy("am-lora"),
        make_base=make_base,
        tokenizer=tokenizer,
        tasks=tasks,
        hyper=LoraHyperparams(),
        out_dir=tmp_path,
    )
    matrix = result.matrix
    table = matrix.format_table([task.name for task in tasks])
    logging.getLogger(__name__).info("am-lora stream in %.1fs\n%s", result.seconds, table)
    for i in range(len(tasks)):
        assert matrix.at(i, i) > 0.8, table
    assert matrix.backward_transfer > -0.05, table
    assert matrix.average_accuracy > 0.9, table
    for adapter in result.adapters:
        assert sorted(f.name for f in adapter.iterdir()) == sorted([*ADAPTER_FILES, SELECTOR_FILE])


@pytest.mark.parametrize("rank", [6, 8, 4])
def test_warm_start_begins_the_new_adapter_as_the_previous_one(
    make_base: MakeBase, tmp_path: Path, rank: int
) -> None:
    """`warm_start`: the new adapter starts as a copy of the newest earlier adapter (its update
    B @ A at the new adapter's scale); a smaller rank copies the leading rows, a larger one
    keeps its extra rows fresh (B zero). Without it the new adapter starts at B = 0."""
    history = _history(make_base, tmp_path, 2)  # ranks 4 and 6
    previous = PeftModel.from_pretrained(make_base(), str(history[-1]))
    hyper = dataclasses.replace(HYPER, rank=rank, alpha=2.0 * rank)
    for warm in (True, False):
        model = AmLora(AmLoraOptions(warm_start=warm)).prepare(
            make_base(), history=history, hyper=hyper
        )
        for path, layer in am_lora_layers(model).items():
            assert layer.lora_A is not None and layer.lora_B is not None
            lora = previous.base_model.model.get_submodule(path)
            old_A, old_B = lora.lora_A["default"].weight, lora.lora_B["default"].weight
            old_scale = lora.scaling["default"]
            if not warm:
                assert torch.count_nonzero(layer.lora_B) == 0
                continue
            common = min(rank, 6)
            torch.testing.assert_close(layer.lora_A[:common], old_A[:common])
            torch.testing.assert_close(
                layer.lora_B[:, :common] * layer.scaling, old_B[:, :common] * old_scale
            )
            assert torch.count_nonzero(layer.lora_B[:, common:]) == 0
            if rank >= 6:  # the whole update: the new adapter starts where the last one ended
                torch.testing.assert_close(
                    layer.lora_B @ layer.lora_A * layer.scaling, old_B @ old_A * old_scale
                )
    first = AmLora(AmLoraOptions(warm_start=True)).prepare(make_base(), history=[], hyper=hyper)
    assert all(
        torch.count_nonzero(layer.lora_B) == 0 for layer in am_lora_layers(first).values()
    )  # nothing earlier: a fresh start
    with pytest.raises(InvalidHyperparameter) as info:
        get_strategy("am-lora", warm_start="yes")
    assert info.value.field == "warm_start"

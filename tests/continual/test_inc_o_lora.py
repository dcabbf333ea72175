from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import peft
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from continual.config import LoraHyperparams
from continual.data import Example, synthetic_tasks
from continual.errors import InvalidHyperparameter
from continual.options import OLoraOptions
from continual.strategies import ADAPTER_FILES, STRATEGIES, Strategy, get_strategy
from continual.strategies.inc_lora import IncLora
from continual.strategies.o_lora import OLora, fold_adapters, subspace_overlap
from continual.stream import learn_stream
from continual.training import causal_lm_loss, train

MakeBase = Callable[..., LlamaForCausalLM]
EXAMPLES = [Example(f"Say {w}.\nAnswer:", f" {w}") for w in ("red", "blue", "green", "good")]
HYPER = LoraHyperparams(rank=4, max_steps=3, batch_size=2, learning_rate=1e-2)
IDS = torch.tensor([[1, 40, 41, 42, 43, 44], [1, 50, 51, 52, 53, 54]])
LABELS = torch.tensor([[-100, -100, -100, 42, 43, 44], [-100, -100, -100, 52, 53, 54]])
FOLD_ATOL = 1e-5  # fp32: folding only reorders the sums of a few rank-r products


def _logits(model: torch.nn.Module) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _random_adapter(make_base: MakeBase, out_dir: Path, *, seed: int, rank: int) -> Path:
    """A saved adapter whose B is random (non-zero), so that it changes the logits."""
    hyper = LoraHyperparams(rank=rank, seed=seed)
    model = IncLora().prepare(make_base(), history=[], hyper=hyper)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.05 * torch.randn(param.shape, generator=generator))
    IncLora().save_adapter(model, out_dir)
    return out_dir


@pytest.fixture
def history(make_base: MakeBase, tmp_path: Path) -> list[Path]:
    """Two earlier adapters of different ranks (4 and 2), oldest first."""
    return [
        _random_adapter(make_base, tmp_path / "a0", seed=1, rank=4),
        _random_adapter(make_base, tmp_path / "a1", seed=2, rank=2),
    ]


def _summed_reference(make_base: MakeBase, adapters: list[Path]) -> LlamaForCausalLM:
    """The base with every adapter's update (alpha / r) B @ A added to its weights by hand."""
    base = make_base()
    modules = dict(base.named_modules())
    for adapter in adapters:
        config = json.loads((adapter / "adapter_config.json").read_text())
        scale = config["lora_alpha"] / config["r"]
        state = load_file(adapter / "adapter_model.safetensors")
        with torch.no_grad():
            for key, a in state.items():
                if ".lora_A." not in key:
                    continue
                b = state[key.replace(".lora_A.", ".lora_B.")]
                module = modules[key.removeprefix("base_model.model.").split(".lora_A.")[0]]
                module.weight += scale * b @ a  # (out, r) @ (r, in)
    return base


def _reference_penalty(model: PeftModel, adapters: list[Path], *, new: str) -> torch.Tensor:
    """sum over layers and earlier adapters of |A_i A_new^T| (unscaled A), from the files."""
    states = [load_file(adapter / "adapter_model.safetensors") for adapter in adapters]
    total = torch.zeros((), dtype=torch.float64)
    for name, param in model.named_parameters():
        if f".lora_A.{new}." in name:
            key = name.replace(f".{new}.", ".")
            for state in states:
                total += (state[key].double() @ param.detach().double().T).abs().sum()
    return total


def _grads_only_on(model: PeftModel, adapter: str, extra: torch.Tensor | None) -> None:
    loss = causal_lm_loss(model(input_ids=IDS).logits, LABELS)
    (loss if extra is None else loss + extra).backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert with_grad == trainable
    assert all(bool(p.grad.isfinite().all()) for p in model.parameters() if p.grad is not None)
    assert trainable and all(f".{adapter}." in n for n in trainable)
    assert len(trainable) == 2 * 2 * 7  # (A, B) x layers x target modules


def test_registry_and_options() -> None:
    assert STRATEGIES["inc-lora"] is IncLora and STRATEGIES["o-lora"] is OLora
    for name in ("inc-lora", "o-lora"):
        assert isinstance(get_strategy(name), Strategy)
    strategy = get_strategy("o-lora", lambda1=0.1, lambda2=1)
    assert isinstance(strategy, OLora)
    assert (strategy.options.lambda1, strategy.options.lambda2) == (0.1, 1.0)
    bad: list[tuple[str, object, str]] = [
        ("lambda1", -0.5, ">= 0"),
        ("lambda1", float("nan"), "finite"),
        ("lambda2", float("inf"), "finite"),
        ("lambda2", "0.1", "a number"),
        ("lambda1", True, "a number"),
    ]
    for field, value, reason in bad:
        with pytest.raises(InvalidHyperparameter) as info:
            get_strategy("o-lora", **{field: value})
        assert info.value.field == field and reason in info.value.reason, value
    with pytest.raises(InvalidHyperparameter) as info:
        get_strategy("inc-lora", lambda1=0.5)
    assert info.value.field == "lambda1"


def test_inc_lora_sums_frozen_adapters_and_trains_only_the_new_one(
    make_base: MakeBase, tokenizer: PreTrainedTokenizerFast, history: list[Path], tmp_path: Path
) -> None:
    strategy = IncLora()
    model = strategy.prepare(make_base(), history=history, hyper=HYPER)
    assert model.base_model.active_adapters == ["task0", "task1", "task2"]
    reference = _logits(_summed_reference(make_base, history))
    assert not torch.allclose(reference, _logits(make_base()), atol=1e-3)  # adapters matter
    torch.testing.assert_close(_logits(model), reference, rtol=0, atol=FOLD_ATOL)  # B_new = 0
    model.train()
    _grads_only_on(model, "task2", strategy.extra_loss(model))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train(model, tokenizer, EXAMPLES, HYPER)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(".task2." in k for k in changed)
    strategy.save_adapter(model, tmp_path / "a2")
    assert sorted(p.name for p in (tmp_path / "a2").iterdir()) == sorted(ADAPTER_FILES)
    saved = load_file(tmp_path / "a2" / "adapter_model.safetensors")
    assert len(saved) == 2 * 2 * 7
    state = model.state_dict()
    for key, value in saved.items():  # the new adapter only, under PEFT's adapter-less keys
        assert torch.equal(value, state[key.replace(".weight", ".task2.weight")]), key
    inference = strategy.inference_model(make_base(), history=[*history, tmp_path / "a2"])
    assert isinstance(inference, PeftModel)
    assert inference.base_model.active_adapters == ["task0", "task1", "task2"]
    assert not any(p.requires_grad for p in inference.parameters())
    torch.testing.assert_close(_logits(inference), _logits(model), rtol=0, atol=0)
    base = make_base()
    assert strategy.inference_model(base, history=[]) is base


def test_o_lora_penalty_matches_reference_and_reaches_only_the_new_adapter(
    make_base: MakeBase, history: list[Path]
) -> None:
    first = OLora(OLoraOptions(lambda2=0.0))
    model = first.prepare(make_base(), history=[], hyper=HYPER)
    assert first.extra_loss(model) is None  # no earlier task, no L2
    # the paper's pooling: the overlap summed over layers and earlier tasks
    strategy = OLora(OLoraOptions(lambda1=0.5, lambda2=0.01, lambda1_norm="sum"))
    model = strategy.prepare(make_base(), history=history, hyper=HYPER)
    assert model.base_model.active_adapters == ["history", "task2"]
    extra = strategy.extra_loss(model)
    assert extra is not None
    new_norms = sum(
        float(p.detach().double().norm()) for n, p in model.named_parameters() if ".task2." in n
    )
    expected = 0.5 * _reference_penalty(model, history, new="task2") + 0.01 * new_norms
    assert float(_reference_penalty(model, history, new="task2")) > 1.0
    torch.testing.assert_close(extra.double(), expected, rtol=1e-5, atol=0)
    model.train()
    _grads_only_on(model, "task2", extra)
    l1_only = OLora(OLoraOptions(lambda1=2.0, lambda1_norm="sum"))
    model = l1_only.prepare(make_base(), history=history[:1], hyper=HYPER)
    assert model.base_model.active_adapters == ["task0", "task1"]  # one earlier: nothing folded
    extra = l1_only.extra_loss(model)
    assert extra is not None
    torch.testing.assert_close(
        extra.double(), 2.0 * _reference_penalty(model, history[:1], new="task1"), rtol=1e-5, atol=0
    )


def test_o_lora_mean_norm_averages_the_overlap_over_layers_per_earlier_rank(
    make_base: MakeBase, history: list[Path]
) -> None:
    summed = OLora(OLoraOptions(lambda1=0.5, lambda1_norm="sum"))
    model = summed.prepare(make_base(), history=history, hyper=HYPER)
    raw = summed.extra_loss(model)
    mean = OLora(OLoraOptions(lambda1=0.5))  # the default pooling
    assert mean.options.lambda1_norm == "mean"
    model = mean.prepare(make_base(), history=history, hyper=HYPER)
    states = [load_file(adapter / "adapter_model.safetensors") for adapter in history]
    per_layer = []
    for name, param in model.named_parameters():
        if ".lora_A.task2." in name:
            key = name.replace(".task2.", ".")
            old = torch.cat([state[key].double() for state in states])  # (r_old, d_in)
            per_layer.append((old @ param.detach().double().T).abs().sum() / old.shape[0])
    extra = mean.extra_loss(model)
    assert extra is not None and raw is not None
    expected = 0.5 * torch.stack(per_layer).mean()
    torch.testing.assert_close(extra.double(), expected, rtol=1e-5, atol=0)
    assert float(raw) > 10 * float(extra)  # same adapters (same seeds), far smaller term
    with pytest.raises(InvalidHyperparameter) as info:
        OLora(OLoraOptions(lambda1_norm="max"))
    assert info.value.field == "lambda1_norm" and "sum, mean" in info.value.reason


def _new_matrices(model: PeftModel, name: str) -> list[tuple[torch.nn.Parameter, ...]]:
    """(A, B) of adapter `name` in every LoRA layer, with the layer's scaling."""
    return [
        (m.lora_A[name].weight, m.lora_B[name].weight, m.scaling[name])
        for m in model.modules()
        if isinstance(m, peft.tuners.lora.LoraLayer) and name in m.lora_A
    ]


def test_o_lora_update_norm_is_the_weight_change_and_leaves_a_alone_while_b_is_zero(
    make_base: MakeBase, history: list[Path]
) -> None:
    params_norm = OLora(OLoraOptions(lambda1=0.0, lambda2=0.01))
    update_norm = OLora(OLoraOptions(lambda1=0.0, lambda2=0.01, lambda2_norm="update"))
    grads = {}
    for strategy in (params_norm, update_norm):
        model = strategy.prepare(make_base(), history=history, hyper=HYPER)
        extra = strategy.extra_loss(model)
        assert extra is not None
        extra.backward()
        grads[strategy.options.lambda2_norm] = [float(a.grad.abs().sum()) for a, _, _ in
                                        _new_matrices(model, "task2")]  # fmt: skip
    # B = 0 at the start: the weight change and its gradient on A are 0, the paper's term's not
    assert len(grads["update"]) == 2 * 7 and not any(grads["update"])
    assert all(g > 0 for g in grads["params"])
    assert float(extra.detach()) < 1e-6

    with torch.no_grad():  # a trained B
        for _, b, _ in _new_matrices(model, "task2"):
            b.copy_(torch.randn_like(b))
    expected = sum(
        float(torch.linalg.matrix_norm(scale * b.detach().double() @ a.detach().double()))
        for a, b, scale in _new_matrices(model, "task2")
    )
    extra = update_norm.extra_loss(model)
    assert extra is not None and expected > 1.0
    torch.testing.assert_close(extra.double(), torch.tensor(0.01 * expected).double(), rtol=1e-5,
                               atol=0)  # fmt: skip
    model.train()
    _grads_only_on(model, "task2", extra)
    with pytest.raises(InvalidHyperparameter) as info:
        OLora(OLoraOptions(lambda2_norm="squared"))
    assert info.value.field == "lambda2_norm" and "params, update" in info.value.reason


def test_o_lora_extra_loss_needs_the_prepared_model(
    make_base: MakeBase, history: list[Path]
) -> None:
    strategy = OLora()
    with pytest.raises(ValueError, match="prepared"):
        strategy.extra_loss(IncLora().prepare(make_base(), history=history, hyper=HYPER))
    strategy.prepare(make_base(), history=history, hyper=HYPER)
    other = OLora().prepare(make_base(), history=history, hyper=HYPER)
    with pytest.raises(ValueError, match="prepared"):
        strategy.extra_loss(other)


def test_folding_changes_no_logits(make_base: MakeBase, history: list[Path]) -> None:
    model = IncLora().inference_model(make_base(), history=history)
    assert isinstance(model, PeftModel)
    separate = _logits(model)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    a0, a1 = (layer.lora_A[n].weight.detach().clone() for n in ("task0", "task1"))
    scales = (layer.scaling["task0"], layer.scaling["task1"])
    assert fold_adapters(model, ["task0", "task1"]) == "history"
    assert set(model.peft_config) == {"history"}
    assert model.base_model.active_adapters == ["history"]
    assert layer.lora_A["history"].weight.shape == (4 + 2, 64) and layer.scaling["history"] == 1
    folded_a = torch.cat([scales[0] * a0, scales[1] * a1])  # (r0 + r1, d_in)
    torch.testing.assert_close(layer.lora_A["history"].weight, folded_a, rtol=0, atol=0)
    torch.testing.assert_close(_logits(model), separate, rtol=0, atol=FOLD_ATOL)
    reference = _logits(_summed_reference(make_base, history))
    torch.testing.assert_close(_logits(model), reference, rtol=0, atol=FOLD_ATOL)
    assert not any(p.requires_grad for p in model.parameters())


def test_fold_adapters_errors(make_base: MakeBase, history: list[Path]) -> None:
    model = IncLora().inference_model(make_base(), history=history)
    assert isinstance(model, PeftModel)
    with pytest.raises(ValueError, match="at least one"):
        fold_adapters(model, [])
    assert fold_adapters(model, ["task1"]) == "task1"  # a single adapter is already folded
    config = peft.LoraConfig(r=2, target_modules=["q_proj"], use_rslora=True)
    model.add_adapter("rs", config)
    with pytest.raises(ValueError, match="rsLoRA"):
        fold_adapters(model, ["task0", "rs"])


def test_subspace_overlap_reference_values(make_base: MakeBase, history: list[Path]) -> None:
    model = OLora().prepare(make_base(), history=history[:1], hyper=HYPER)
    layers = [m for m in model.modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
    with torch.no_grad():
        for layer in layers:  # the new A spans the old A's row space: overlap 1
            old = layer.lora_A["task0"].weight
            layer.lora_A["task1"].weight.copy_(torch.flip(old, dims=[0]) * 3.0)
    assert subspace_overlap(model) == pytest.approx(1.0, abs=1e-9)
    with torch.no_grad():
        for layer in layers:  # the new A reads the orthogonal complement: overlap 0
            old = layer.lora_A["task0"].weight.double()  # (r, d_in)
            q, _ = torch.linalg.qr(old.T, mode="complete")  # (d_in, d_in)
            layer.lora_A["task1"].weight.copy_(q[:, 4:8].T)  # (r, d_in), orthogonal to old
    assert subspace_overlap(model) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="earlier"):
        subspace_overlap(IncLora().prepare(make_base(), history=[], hyper=HYPER))


def test_o_lora_overlap_falls_during_training(
    make_base: MakeBase, tokenizer: PreTrainedTokenizerFast, history: list[Path], tmp_path: Path
) -> None:
    hyper = LoraHyperparams(rank=4, max_steps=30, batch_size=2, learning_rate=1e-2)
    overlaps: dict[str, tuple[float, float]] = {}
    models: dict[str, PeftModel] = {}
    for strategy in (IncLora(), OLora(OLoraOptions(lambda1=0.5, lambda1_norm="sum"))):
        model = strategy.prepare(make_base(), history=history, hyper=hyper)
        before = subspace_overlap(model)
        state = {k: v.clone() for k, v in model.state_dict().items() if ".task2." not in k}
        train(model, tokenizer, EXAMPLES, hyper, extra_loss=strategy.extra_loss)
        overlaps[strategy.name] = (before, subspace_overlap(model))
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
        models[strategy.name] = model
    (inc_before, inc_after), (o_before, o_after) = overlaps["inc-lora"], overlaps["o-lora"]
    assert inc_before == pytest.approx(o_before)  # same history, same initial A
    assert 0.02 < o_before < 0.3  # about r_old / d_in for a random subspace
    assert o_after < 0.2 * o_before and o_after < 0.2 * inc_after, overlaps
    strategy = OLora()
    strategy.save_adapter(models["o-lora"], tmp_path / "a2")
    inference = strategy.inference_model(make_base(), history=[*history, tmp_path / "a2"])
    assert isinstance(inference, PeftModel)
    assert inference.base_model.active_adapters == ["history"]
    assert (
        inference.base_model.model.model.layers[0].mlp.down_proj.lora_A["history"].weight.shape[0]
        == 10
    )
    torch.testing.assert_close(
        _logits(inference), _logits(models["o-lora"]), rtol=0, atol=FOLD_ATOL
    )


@pytest.mark.slow
def test_streams_o_lora_forgets_less_than_seq_lora(
    make_base: MakeBase, tokenizer: PreTrainedTokenizerFast, tmp_path: Path
) -> None:
    """The 3-task demo with each strategy, end to end through the saved adapters.

    Measured BWT over seeds 0-2 (tasks, LoRA init and base seeded alike): seq-lora -0.35 / -0.48
    / -0.55, inc-lora -0.44 / -0.42 / -0.17, o-lora -0.13 / -0.14 / -0.16. inc-lora is not
    reliably better than seq-lora (seed 0 is worse), so only o-lora's advantage is asserted.
    o-lora with the paper's pooling (`sum`): on this tiny model the summed term protects; the
    default per-layer mean, a small fraction of it, left seed 0 at -0.36 (inc-lora -0.44). On
    SmolLM2 the sum held new tasks back and protected no more (BENCHMARKS.md)."""
    tasks = synthetic_tasks(seed=0)
    results = {}
    options: dict[str, dict[str, str]] = {"o-lora": {"lambda1_norm": "sum"}}
    for name in ("seq-lora", "inc-lora", "o-lora"):
        results[name] = learn_stream(
            strategy=get_strategy(name, **options.get(name, {})),
            make_base=make_base,
            tokenizer=tokenizer,
            tasks=tasks,
            hyper=LoraHyperparams(),
            out_dir=tmp_path / name,
            measure_baseline=False,
        )
    names = [task.name for task in tasks]
    tables = "\n".join(f"{k}:\n{r.matrix.format_table(names)}" for k, r in results.items())
    logging.getLogger(__name__).info("seq / inc / o-lora on the 3-task demo\n%s", tables)
    bwt = {k: r.matrix.backward_transfer for k, r in results.items()}
    for name, result in results.items():
        assert [p.name for p in result.adapters] == ["00-sentiment", "01-topic", "02-color"]
        for adapter in result.adapters:
            assert sorted(f.name for f in adapter.iterdir()) == sorted(ADAPTER_FILES)
        diagonal = [result.matrix.at(i, i) for i in range(3)]
        assert sum(diagonal) / 3 > 0.75, (name, tables)  # each strategy learns its tasks
    assert bwt["seq-lora"] is not None and bwt["o-lora"] is not None
    assert bwt["o-lora"] > bwt["seq-lora"] + 0.1 and bwt["o-lora"] > -0.25, tables


def test_o_lora_orthogonal_init_starts_the_penalty_at_zero(
    make_base: MakeBase, tokenizer: PreTrainedTokenizerFast, history: list[Path]
) -> None:
    random_init = OLora()
    plain = random_init.prepare(make_base(), history=history, hyper=HYPER)
    strategy = OLora(OLoraOptions(orthogonal_init=True))
    model = strategy.prepare(make_base(), history=history, hyper=HYPER)
    assert subspace_overlap(plain) > 0.02
    assert subspace_overlap(model) < 1e-10
    extra = strategy.extra_loss(model)
    assert extra is not None and float(extra) < 1e-4 * float(random_init.extra_loss(plain) or 0)
    # each row keeps its initial norm: the init scale is PEFT's, only its direction changed
    for name, param in model.named_parameters():
        if ".lora_A.task2." in name:
            reference = dict(plain.named_parameters())[name]
            torch.testing.assert_close(param.norm(dim=1), reference.norm(dim=1), rtol=1e-5, atol=0)
    hyper = LoraHyperparams(rank=4, max_steps=20, batch_size=2, learning_rate=1e-2)
    model = strategy.prepare(make_base(), history=history, hyper=hyper)
    train(model, tokenizer, EXAMPLES, hyper, extra_loss=strategy.extra_loss)
    assert subspace_overlap(model) < 0.02  # the penalty keeps it near orthogonal
    with pytest.raises(InvalidHyperparameter):
        OLora(OLoraOptions(orthogonal_init="yes"))  # type: ignore[arg-type]

"""AM-LoRA's task router: statistics of each task's sequences, a causal (or whole-prompt) prior on
the selector's scores, earlier tasks kept out of a new task's training, and the files that carry
it all."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from continual.config import LoraHyperparams
from continual.data import TaskData, synthetic_tasks
from continual.errors import InvalidHyperparameter
from continual.evaluation import label_scores
from continual.options import AmLoraOptions
from continual.strategies import AmLora, get_strategy
from continual.strategies.am_lora import SELECTOR_FILE, am_lora_layers
from continual.strategies.am_lora_router import COUNTS, MEANS, ROUTER_MODULE, WITHIN, TaskRouter
from continual.training import train

MakeBase = Callable[..., LlamaForCausalLM]
HYPER = LoraHyperparams(rank=4, max_steps=6, batch_size=8, learning_rate=1e-2)
IDS = torch.tensor([[1, 40, 41, 42, 43, 44], [1, 50, 51, 52, 0, 0]])
MASK = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
SMALL = synthetic_tasks(seed=0, train_size=16, test_size=4)  # three quick tasks


def _router(model: torch.nn.Module) -> TaskRouter:
    router = getattr(model, ROUTER_MODULE)
    assert isinstance(router, TaskRouter)
    return router


def _stream(
    make_base: MakeBase,
    tokenizer: PreTrainedTokenizerFast,
    tasks: list[TaskData],
    root: Path,
    *,
    strategy: AmLora,
    hyper: LoraHyperparams = HYPER,
) -> list[Path]:
    """Train `tasks` in order with `strategy`; the adapter directories, oldest first."""
    history: list[Path] = []
    for index, task in enumerate(tasks):
        model = strategy.prepare(make_base(), history=history, hyper=hyper)
        train(model, tokenizer, task.train, hyper, extra_loss=strategy.extra_loss)
        strategy.save_adapter(model, root / f"t{index}")
        history.append(root / f"t{index}")
    return history


def test_routing_weight_option() -> None:
    assert get_strategy("am-lora").options.routing_weight == 1.0  # type: ignore[attr-defined]
    assert get_strategy("am-lora", routing_weight=0).options.routing_weight == 0.0  # type: ignore[attr-defined]
    for bad in (-1.0, float("nan"), float("inf"), True, "1"):
        with pytest.raises(InvalidHyperparameter) as info:
            get_strategy("am-lora", routing_weight=bad)
        assert info.value.field == "routing_weight"


def test_statistics_are_the_mean_and_scatter_of_the_training_sequences(
    make_base: MakeBase,
) -> None:
    model = AmLora().prepare(make_base(), history=[], hyper=HYPER)
    model.train()
    with torch.no_grad():
        model(input_ids=IDS, attention_mask=MASK)
        model(input_ids=IDS[:1])
    embedding = model.get_input_embeddings().weight.detach().double()
    sequences = torch.stack([
        embedding[IDS[0]].mean(0), embedding[IDS[1, :4]].mean(0), embedding[IDS[0]].mean(0)
    ])  # fmt: skip  # padding is left out
    mean = sequences.mean(0)
    stats = _router(model).statistics()
    assert stats[COUNTS].tolist() == [3.0]
    torch.testing.assert_close(stats[MEANS][0], mean.float())
    scatter = (sequences - mean).T @ (sequences - mean)
    torch.testing.assert_close(stats[WITHIN], scatter.float(), atol=1e-6, rtol=1e-5)
    # Evaluating is not training: it adds nothing.
    model.eval()
    with torch.no_grad():
        model(input_ids=IDS)
    assert _router(model).statistics()[COUNTS].tolist() == [3.0]


def test_earlier_adapters_sit_out_a_new_tasks_training_and_keep_their_selector_rows(
    make_base: MakeBase, tokenizer: PreTrainedTokenizerFast, tmp_path: Path
) -> None:
    strategy = AmLora()
    history = _stream(make_base, tokenizer, SMALL[:1], tmp_path, strategy=strategy)
    decaying = dataclasses.replace(HYPER, weight_decay=0.5)  # AdamW would shrink every entry
    model = strategy.prepare(make_base(), history=history, hyper=decaying)
    model.train()
    model(input_ids=IDS, attention_mask=MASK)
    for layer in am_lora_layers(model).values():
        assert layer.route_logits is not None
        assert layer.route_logits.tolist() == [[[float("-inf"), 0.0]]]
    train(model, tokenizer, SMALL[1].train, decaying, extra_loss=strategy.extra_loss)
    strategy.save_adapter(model, tmp_path / "next")
    before = load_file(str(history[0] / SELECTOR_FILE))
    after = load_file(str(tmp_path / "next" / SELECTOR_FILE))
    for path in am_lora_layers(model):
        assert torch.equal(after[path + ".weight"][:1], before[path + ".weight"])
        assert torch.equal(after[path + ".bias"][:2], before[path + ".bias"])  # zero logit too
        assert not torch.equal(after[path + ".bias"][2:], before[path + ".bias"][1:])


def test_each_tasks_inputs_go_to_its_own_adapter(
    make_base: MakeBase, tokenizer: PreTrainedTokenizerFast, tmp_path: Path
) -> None:
    tasks = synthetic_tasks(seed=0, train_size=32, test_size=8)[:2]
    strategy = AmLora()
    history = _stream(make_base, tokenizer, tasks, tmp_path, strategy=strategy)
    stats = load_file(str(history[-1] / SELECTOR_FILE))
    assert stats[COUNTS].tolist() == [HYPER.max_steps * HYPER.batch_size] * 2
    model = strategy.inference_model(make_base(), history=history)
    weights: list[list[float]] = []
    layer = next(iter(am_lora_layers(model).values()))
    for task in tasks:
        gates = []
        for example in task.test:
            ids = tokenizer(example.prompt, return_tensors="pt")
            with torch.no_grad():
                model(**ids)
            prior = layer.route_logits
            assert prior is not None and prior.shape == (1, ids["input_ids"].shape[1], 2)
            gates.append(prior[0, -1].exp())  # p(task | the whole prompt)
        weights.append(torch.stack(gates).mean(0).tolist())
    assert weights[0][0] > 0.9 and weights[1][1] > 0.9, weights


def test_routing_is_causal_and_a_kv_cache_routes_alike(
    make_base: MakeBase, tokenizer: PreTrainedTokenizerFast, tmp_path: Path
) -> None:
    tasks = synthetic_tasks(seed=0, train_size=32, test_size=6)[:2]
    strategy = AmLora()
    history = _stream(make_base, tokenizer, tasks, tmp_path, strategy=strategy)
    model = strategy.inference_model(make_base(), history=history)
    layer = next(iter(am_lora_layers(model).values()))
    with torch.no_grad():
        model(input_ids=IDS[:1])
        whole = layer.route_logits
        model(input_ids=IDS[:1, :3])
        assert whole is not None and layer.route_logits is not None
        torch.testing.assert_close(layer.route_logits, whole[:, :3])  # later tokens change nothing
    for task in tasks:
        assert task.labels is not None
        cached = label_scores(model, tokenizer, task.test, task.labels, shared_prefix=True)
        full = label_scores(model, tokenizer, task.test, task.labels, shared_prefix=False)
        torch.testing.assert_close(cached, full, atol=1e-5, rtol=0)
    prompt = tokenizer(tasks[0].test[0].prompt, return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    step = layer.route_logits  # the last cached step's: one token, continuing the cache
    with torch.no_grad():
        again = model(input_ids=generated[:, :-1]).logits[0, -1].argmax()
    assert int(again) == int(generated[0, -1])  # the cached steps routed as one full pass
    assert step is not None and layer.route_logits is not None and step.shape[1] == 1
    torch.testing.assert_close(step[:, -1], layer.route_logits[:, -1], atol=1e-5, rtol=0)


def test_prompt_scope_routes_every_token_of_a_prompt_by_the_whole_prompt(
    make_base: MakeBase, tokenizer: PreTrainedTokenizerFast, tmp_path: Path
) -> None:
    """`routing_scope=prompt`: a sequence's first pass decides its task on the whole of it, and
    every token of that pass and of the passes that continue its cache gets that decision (the
    causal scope routes a prompt's first tokens by those tokens alone)."""
    tasks = synthetic_tasks(seed=0, train_size=32, test_size=6)[:2]
    history = _stream(make_base, tokenizer, tasks, tmp_path, strategy=AmLora())
    causal = AmLora().inference_model(make_base(), history=history)
    prompt = AmLora(AmLoraOptions(routing_scope="prompt")).inference_model(
        make_base(), history=history
    )
    assert _router(prompt).scope == "prompt" and _router(causal).scope == "causal"
    by_causal = next(iter(am_lora_layers(causal).values()))
    by_prompt = next(iter(am_lora_layers(prompt).values()))
    for index, task in enumerate(tasks):
        # The prompt opens with the other task's first word, then goes on as its own.
        opening = tasks[1 - index].test[0].prompt.split()[0]
        ids = tokenizer(f"{opening} {task.test[0].prompt}", return_tensors="pt")
        with torch.no_grad():
            causal(**ids)
            prompt(**ids)
        assert by_causal.route_logits is not None and by_prompt.route_logits is not None
        decided = by_causal.route_logits[:, -1:]  # the causal prior of the whole prompt
        torch.testing.assert_close(
            by_prompt.route_logits, decided.expand_as(by_prompt.route_logits)
        )
        assert by_prompt.route_logits[0, 0, index].exp() > 0.9  # its first token too
        assert by_causal.route_logits[0, 0, index].exp() < 0.5  # the causal scope: the other
        generated = prompt.generate(**ids, min_new_tokens=3, max_new_tokens=3, do_sample=False)
        assert generated.shape[1] == ids["input_ids"].shape[1] + 3
        step = by_prompt.route_logits  # a cached step keeps the prompt's decision
        assert step is not None and step.shape[1] == 1
        torch.testing.assert_close(step[:, 0], decided[:, 0])
    with pytest.raises(InvalidHyperparameter) as info:
        get_strategy("am-lora", routing_scope="sequence")
    assert info.value.field == "routing_scope"


def test_a_rebuilt_model_routes_like_the_one_that_trained(
    make_base: MakeBase, tokenizer: PreTrainedTokenizerFast, tmp_path: Path
) -> None:
    strategy = AmLora()
    history = _stream(make_base, tokenizer, SMALL[:1], tmp_path, strategy=strategy)
    model = strategy.prepare(make_base(), history=history, hyper=HYPER)
    train(model, tokenizer, SMALL[1].train, HYPER, extra_loss=strategy.extra_loss)
    strategy.save_adapter(model, tmp_path / "new")
    model.eval()
    rebuilt = strategy.inference_model(make_base(), history=[*history, tmp_path / "new"])
    with torch.no_grad():
        expected = model(input_ids=IDS, attention_mask=MASK).logits
        got = rebuilt(input_ids=IDS, attention_mask=MASK).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_a_stream_started_without_routing_is_mixed_by_the_selector_alone(
    make_base: MakeBase,
    tokenizer: PreTrainedTokenizerFast,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    unrouted = AmLora(AmLoraOptions(routing_weight=0))
    history = _stream(make_base, tokenizer, SMALL[:2], tmp_path, strategy=unrouted)
    assert not set(load_file(str(history[-1] / SELECTOR_FILE))) & {MEANS, COUNTS, WITHIN}
    routed = AmLora()
    with caplog.at_level(logging.WARNING):
        model = routed.prepare(make_base(), history=history, hyper=HYPER)
    assert "no task statistics" in caplog.text
    assert not hasattr(model, ROUTER_MODULE)
    a = routed.inference_model(make_base(), history=history)
    b = unrouted.inference_model(make_base(), history=history)
    with torch.no_grad():
        torch.testing.assert_close(a(input_ids=IDS).logits, b(input_ids=IDS).logits)


def test_statistics_that_do_not_fit_are_refused(
    make_base: MakeBase, tokenizer: PreTrainedTokenizerFast, tmp_path: Path
) -> None:
    strategy = AmLora()
    history = _stream(make_base, tokenizer, SMALL[:1], tmp_path, strategy=strategy)
    path = history[0] / SELECTOR_FILE
    tensors = load_file(str(path))
    save_file({**tensors, MEANS: torch.zeros(2, tensors[MEANS].shape[1])}, str(path),
              metadata={"format": "pt", "method": "am-lora", "num_adapters": "1"})  # fmt: skip
    with pytest.raises(ValueError, match="do not describe 1 tasks"):
        strategy.prepare(make_base(), history=history, hyper=HYPER)
    del tensors[WITHIN]
    save_file(tensors, str(path), metadata={"format": "pt", "num_adapters": "1"})
    with pytest.raises(ValueError, match="only some of the router's statistics"):
        strategy.inference_model(make_base(), history=history)

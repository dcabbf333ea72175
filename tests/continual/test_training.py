from __future__ import annotations

import math
from collections.abc import Callable

import peft
import pytest
import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from continual.batching import Encoded, completion_loss, encode_pair, pad_batch
from continual.config import LoraHyperparams
from continual.data import Example, synthetic_tasks
from continual.errors import InvalidDataset, TrainingCancelled
from continual.evaluation import rank_classification
from continual.strategies import lora_config
from continual.training import (
    StepInfo,
    TrainingCallbacks,
    _batches,
    _epoch,
    causal_lm_loss,
    lr_multiplier,
    set_lr_scale,
    total_steps,
    train,
)

MakeBase = Callable[..., LlamaForCausalLM]
EXAMPLES = [Example(f"Say {w}.\nAnswer:", f" {w}") for w in ("red", "blue", "green", "good", "bad")]


def _lora(base: LlamaForCausalLM, hyper: LoraHyperparams) -> peft.PeftModel:
    torch.manual_seed(hyper.seed)
    return peft.get_peft_model(base, lora_config(hyper))


def test_lr_schedule_warmup_then_cosine() -> None:
    values = [lr_multiplier(s, total=10, warmup=2) for s in range(11)]
    expected = [1 / 3, 2 / 3] + [0.5 * (1 + math.cos(math.pi * (s - 2) / 8)) for s in range(2, 11)]
    assert values == pytest.approx(expected)
    assert values[2] == 1.0 and values[6] == pytest.approx(0.5) and values[10] == pytest.approx(0)


def test_total_steps() -> None:
    assert total_steps(num_examples=33, hyper=LoraHyperparams(batch_size=16, epochs=2)) == 6
    assert total_steps(num_examples=33, hyper=LoraHyperparams(max_steps=5, epochs=9)) == 5


def test_causal_lm_loss_matches_transformers(
    make_base: MakeBase, tokenizer: PreTrainedTokenizerFast
) -> None:
    model = make_base()
    items = [
        encode_pair(tokenizer, prompt=e.prompt, completion=e.completion, add_eos=True)
        for e in EXAMPLES[:2]
    ]
    # Same length, no padding, so the reference needs no attention mask.
    batch = pad_batch(items, pad_id=0)
    assert batch.attention_mask.all()
    with torch.no_grad():
        reference = model(input_ids=batch.input_ids, labels=batch.labels).loss
        ours = causal_lm_loss(model(input_ids=batch.input_ids).logits, batch.labels)
    torch.testing.assert_close(ours, reference)


def test_completion_loss_equals_full_logits_loss_and_gradients(
    make_base: MakeBase, tokenizer: PreTrainedTokenizerFast
) -> None:
    """The training loss computes vocabulary logits at completion positions only: on a padded
    batch through a PEFT model it equals the full-logits loss, and so do the LoRA gradients."""
    hyper = LoraHyperparams(rank=4)
    model = _lora(make_base(), hyper)
    for name, param in model.named_parameters():  # non-zero B so gradients reach A too
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.3)
    items = [
        encode_pair(tokenizer, prompt=e.prompt * (i + 1), completion=e.completion, add_eos=True)
        for i, e in enumerate(EXAMPLES[:3])
    ]
    batch = pad_batch(items, pad_id=0)
    assert not batch.attention_mask.all()  # padded: lengths differ

    def loss_and_grads(fn: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        loss = fn()
        loss.backward()
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        return loss.detach(), grads

    def full_logits() -> torch.Tensor:
        return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits

    reference, ref_grads = loss_and_grads(lambda: causal_lm_loss(full_logits(), batch.labels))
    ours, our_grads = loss_and_grads(lambda: completion_loss(model, batch))
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)
    assert len(our_grads) == len(ref_grads) > 0
    for got, expected in zip(our_grads, ref_grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


def test_lora_learns_a_synthetic_task(
    make_base: MakeBase, tokenizer: PreTrainedTokenizerFast
) -> None:
    task = synthetic_tasks(seed=0)[1]  # topic: 3 labels, chance 1/3
    assert task.labels is not None
    hyper = LoraHyperparams()
    model = _lora(make_base(), hyper)
    before = rank_classification(model, tokenizer, task.test, task.labels).accuracy
    result = train(model, tokenizer, task.train, hyper)
    after = rank_classification(model, tokenizer, task.test, task.labels).accuracy
    assert before < 0.5
    assert after > 0.8, after
    assert result.final_loss < result.losses[0] / 2
    assert result.steps == len(result.losses) == 10 * 16
    assert result.tokens > 0 and result.seconds > 0


def test_training_is_deterministic(make_base: MakeBase, tokenizer: PreTrainedTokenizerFast) -> None:
    hyper = LoraHyperparams(max_steps=4, batch_size=2, dropout=0.1)
    runs = []
    for _ in range(2):
        model = _lora(make_base(), hyper)
        runs.append((train(model, tokenizer, EXAMPLES, hyper).losses, model.state_dict()))
    assert runs[0][0] == runs[1][0]
    for key, value in runs[0][1].items():
        assert torch.equal(value, runs[1][1][key]), key


def test_bf16_precision_trains_under_autocast_and_keeps_the_weights_fp32(
    make_base: MakeBase, tokenizer: PreTrainedTokenizerFast
) -> None:
    task = synthetic_tasks(seed=0)[1]
    assert task.labels is not None
    results = {}
    for precision in ("fp32", "bf16"):
        hyper = LoraHyperparams(max_steps=60, precision=precision)
        model = _lora(make_base(), hyper)
        seen: set[torch.dtype] = set()
        q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
        hook = q_proj.register_forward_hook(lambda _m, _i, out, seen=seen: seen.add(out.dtype))
        result = train(model, tokenizer, task.train, hyper)
        hook.remove()
        assert seen == {torch.bfloat16 if precision == "bf16" else torch.float32}
        trainable = [p for p in model.parameters() if p.requires_grad]
        assert trainable and all(p.dtype == torch.float32 for p in trainable)
        assert all(math.isfinite(loss) for loss in result.losses)
        results[precision] = (result, model)
    bf16, model = results["bf16"]
    assert bf16.final_loss < bf16.losses[0] / 2  # it learns
    assert bf16.losses != results["fp32"][0].losses  # in other arithmetic
    assert rank_classification(model, tokenizer, task.test, task.labels).accuracy > 0.8


def test_extra_loss_is_added(make_base: MakeBase, tokenizer: PreTrainedTokenizerFast) -> None:
    hyper = LoraHyperparams(max_steps=3, batch_size=2)
    plain = train(_lora(make_base(), hyper), tokenizer, EXAMPLES, hyper)
    # A constant adds nothing to the gradient, so the run is the same but for the loss.
    shifted = train(
        _lora(make_base(), hyper),
        tokenizer,
        EXAMPLES,
        hyper,
        extra_loss=lambda _: torch.tensor(2.0),
    )
    none = train(_lora(make_base(), hyper), tokenizer, EXAMPLES, hyper, extra_loss=lambda _: None)
    assert shifted.losses == pytest.approx([x + 2.0 for x in plain.losses], abs=1e-6)
    assert none.losses == plain.losses


def test_callbacks_report_progress(make_base: MakeBase, tokenizer: PreTrainedTokenizerFast) -> None:
    hyper = LoraHyperparams(max_steps=7, batch_size=2, warmup_ratio=0.2)  # crosses epochs
    seen: list[StepInfo] = []
    model = _lora(make_base(), hyper).eval()
    result = train(
        model, tokenizer, EXAMPLES, hyper, callbacks=TrainingCallbacks(on_step=seen.append)
    )
    assert [info.step for info in seen] == list(range(1, 8)) and result.steps == 7
    assert all(info.total_steps == 7 for info in seen)
    warmup = math.ceil(0.2 * 7)
    expected_lr = [hyper.learning_rate * lr_multiplier(s, total=7, warmup=warmup) for s in range(7)]
    assert [info.learning_rate for info in seen] == pytest.approx(expected_lr)
    assert [info.loss for info in seen] == list(result.losses)
    assert seen[-1].eta_s == 0 and all(info.tokens_per_s > 0 for info in seen)
    assert not model.training  # the mode it came in with


def test_should_stop_cancels(make_base: MakeBase, tokenizer: PreTrainedTokenizerFast) -> None:
    hyper = LoraHyperparams(max_steps=10, batch_size=2)
    checks: list[int] = []
    steps: list[int] = []

    def should_stop() -> bool:
        checks.append(1)
        return len(checks) > 2

    callbacks = TrainingCallbacks(
        on_step=lambda info: steps.append(info.step), should_stop=should_stop
    )
    model = _lora(make_base(), hyper).eval()
    with pytest.raises(TrainingCancelled, match="step 3 of 10"):
        train(model, tokenizer, EXAMPLES, hyper, callbacks=callbacks)
    assert steps == [1, 2] and len(checks) == 3
    assert not model.training


def test_only_trainable_parameters_change(
    make_base: MakeBase, tokenizer: PreTrainedTokenizerFast
) -> None:
    model = make_base()
    model.requires_grad_(False)
    model.lm_head.requires_grad_(True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train(model, tokenizer, EXAMPLES, LoraHyperparams(max_steps=2, batch_size=5))
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]) == (key != "lm_head.weight"), key


def test_a_parameter_with_an_lr_scale_learns_at_that_multiple_of_the_rate(
    make_base: MakeBase, tokenizer: PreTrainedTokenizerFast
) -> None:
    """Adam's first step moves every entry by about the learning rate (m / sqrt(v) = +-1), so
    the largest change of a parameter is its group's rate; the reported rate is the run's."""
    model = make_base()
    model.requires_grad_(False)
    norm, head = model.model.norm.weight, model.lm_head.weight
    norm.requires_grad_(True)
    head.requires_grad_(True)
    set_lr_scale(head, 10.0)
    before = norm.detach().clone(), head.detach().clone()
    hyper = LoraHyperparams(max_steps=1, batch_size=5, learning_rate=1e-3, warmup_ratio=0.0,
                            weight_decay=0.0)  # fmt: skip
    seen: list[StepInfo] = []
    train(model, tokenizer, EXAMPLES, hyper, callbacks=TrainingCallbacks(on_step=seen.append))
    assert float((norm - before[0]).abs().max()) == pytest.approx(1e-3, rel=1e-3)
    assert float((head - before[1]).abs().max()) == pytest.approx(1e-2, rel=1e-3)
    assert seen[0].learning_rate == pytest.approx(1e-3)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="lr_scale"):
            set_lr_scale(head, bad)


def test_train_rejects_empty_data_and_frozen_models(
    make_base: MakeBase, tokenizer: PreTrainedTokenizerFast
) -> None:
    model = make_base()
    with pytest.raises(InvalidDataset) as info:
        train(model, tokenizer, [], LoraHyperparams())
    assert info.value.field == "examples"
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        train(model, tokenizer, EXAMPLES, LoraHyperparams())


def _mixed_lengths(count: int) -> list[Encoded]:
    """Examples whose lengths repeat 3..40 tokens in a scrambled order, one completion token."""
    lengths = [3 + (i * 7) % 38 for i in range(count)]
    return [Encoded(ids=tuple(range(n)), prompt_len=n - 1) for n in lengths]


@pytest.mark.parametrize("group", [True, False])
def test_an_epoch_sees_every_example_once_in_the_same_number_of_batches(group: bool) -> None:
    encoded = _mixed_lengths(203)  # not a multiple of the batch size: one short batch
    hyper = LoraHyperparams(batch_size=8, group_by_length=group, seed=5)
    epochs = [
        _epoch(encoded, hyper=hyper, generator=torch.Generator().manual_seed(s)) for s in (5, 6)
    ]
    for batches in epochs:
        assert len(batches) == math.ceil(203 / 8)
        assert sorted(i for batch in batches for i in batch) == list(range(203))
        assert sorted(len(b) for b in batches)[1:] == [8] * (len(batches) - 1)
    assert epochs[0] != epochs[1]  # another seed (or epoch): another order


def test_grouping_by_length_cuts_padding_and_keeps_resume_exact() -> None:
    encoded = _mixed_lengths(512)
    useful = sum(len(e.ids) for e in encoded)

    def padded_tokens(group: bool) -> int:
        hyper = LoraHyperparams(batch_size=8, group_by_length=group, seed=1)
        steps = math.ceil(512 / 8)
        batches = list(_batches(encoded, hyper=hyper, steps=steps, pad_id=0))
        assert sum(int(b.attention_mask.sum()) for b in batches) == useful
        return sum(b.input_ids.numel() for b in batches)

    grouped, shuffled = padded_tokens(True), padded_tokens(False)
    assert grouped < 1.15 * useful < shuffled  # lengths 3..40 in one batch pad to ~1.7x
    hyper = LoraHyperparams(batch_size=8, seed=1, group_by_length=True)
    whole = list(_batches(encoded, hyper=hyper, steps=150, pad_id=0))  # past an epoch boundary
    resumed = list(_batches(encoded, hyper=hyper, steps=150, pad_id=0, skip=70))
    for a, b in zip(whole[70:], resumed, strict=True):
        assert torch.equal(a.input_ids, b.input_ids)

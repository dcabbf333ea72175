"""`continual.fold_distill`: the distillation that corrects am-lora's fitted fold."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM

from continual.config import LoraHyperparams
from continual.fold import fold_state
from continual.fold_distill import DistillSettings, position_weights
from continual.strategies import get_strategy
from continual.strategies.am_lora import am_lora_layers

MakeBase = Callable[..., LlamaForCausalLM]


def _two_adapters(make_base: MakeBase, root: Path) -> list[Path]:
    """Two am-lora adapters with random B and a random selector: gates that vary per token, so
    the fitted fold is not exact."""
    strategy, history = get_strategy("am-lora", routing_weight=0), []
    for seed in (0, 1):
        model = strategy.prepare(make_base(), history=history, hyper=LoraHyperparams(rank=4))
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for layer in am_lora_layers(model).values():
                assert layer.lora_B is not None
                layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator) * 0.3)
                layer.selector_weight.copy_(
                    torch.randn(layer.selector_weight.shape, generator=generator)
                )
        strategy.save_adapter(model, root / f"a{seed}")
        history.append(root / f"a{seed}")
    return history


def _kl(teacher: torch.Tensor, student: torch.Tensor) -> float:
    return float(
        F.kl_div(F.log_softmax(student, -1), F.log_softmax(teacher, -1), log_target=True,
                 reduction="sum") / teacher.shape[1]
    )  # fmt: skip


def test_distillation_brings_the_fitted_fold_closer_to_the_routed_model(
    make_base: MakeBase, tmp_path: Path
) -> None:
    history = _two_adapters(make_base, tmp_path)
    generator = torch.Generator().manual_seed(7)
    probes = [[torch.randint(3, 200, (1, 12), generator=generator) for _ in range(4)]
              for _ in history]  # fmt: skip
    held_out = [torch.randint(3, 200, (1, 12), generator=generator) for _ in range(4)]
    strategy = get_strategy("am-lora", routing_weight=0)

    def fold(steps: int) -> tuple[float, float, tuple[float, ...], list[str]]:
        state = strategy.inference_model(make_base(), history=history)
        with torch.no_grad():
            routed = [state(input_ids=ids).logits for ids in (*probes[0], *probes[1])]
            routed_new = [state(input_ids=ids).logits for ids in held_out]
        settings = DistillSettings(steps=steps, rank=4, learning_rate=1e-2, batch=8)
        done = fold_state(state, method="am-lora", history=history, probes=probes,
                          distillation=settings)  # fmt: skip
        with torch.no_grad():
            seen = [done.model(input_ids=ids).logits for ids in (*probes[0], *probes[1])]
            new = [done.model(input_ids=ids).logits for ids in held_out]
        on_probes = sum(_kl(t, s) for t, s in zip(routed, seen, strict=True)) / len(seen)
        elsewhere = sum(_kl(t, s) for t, s in zip(routed_new, new, strict=True)) / len(new)
        return on_probes, elsewhere, done.distill_losses, list(done.model.state_dict())

    fitted, fitted_new, none, keys = fold(0)
    corrected, corrected_new, losses, corrected_keys = fold(40)
    assert none == () and len(losses) == 40
    assert losses[0] == pytest.approx(fitted, rel=1e-3)  # a batch of all 8: the fitted fold
    assert corrected < 0.5 * fitted  # and ends closer on the sequences it was given
    assert corrected_new < fitted_new  # and on others
    assert corrected_keys == keys  # merged: a plain model again, no LoRA branch left
    assert fitted > 1e-4  # the fitted fold alone is not exact here


@pytest.mark.parametrize(
    ("field", "value"),
    [("steps", -1), ("rank", 0), ("batch", 0), ("learning_rate", 0.0), ("steps", 1.5),
     ("answer_share", 1.5), ("answer_share", -0.1)],
)  # fmt: skip
def test_bad_distillation_settings_are_refused(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=field):
        DistillSettings(**{field: value})  # type: ignore[arg-type]


def test_an_answer_share_puts_that_share_of_the_loss_on_the_completion() -> None:
    alike = position_weights(10, 7, answer_share=None)
    assert torch.allclose(alike, torch.full((10,), 0.1))
    # prompt of 7 tokens, completion of 3: positions 6, 7, 8 predict the completion's tokens
    weights = position_weights(10, 7, answer_share=0.6)
    assert float(weights.sum()) == pytest.approx(1.0)
    assert float(weights[6:9].sum()) == pytest.approx(0.6)
    assert torch.allclose(weights[6:9], torch.full((3,), 0.2))
    assert torch.allclose(weights[[0, 1, 2, 3, 4, 5, 9]], torch.full((7,), 0.4 / 7))
    assert float(position_weights(10, 7, answer_share=1.0)[:6].sum()) == 0.0
    # a sequence with no completion (cut away) falls back to every position alike
    assert torch.allclose(position_weights(10, 10, answer_share=0.6), alike)
    with pytest.raises(ValueError, match="prompt length"):
        position_weights(10, None, answer_share=0.5)


def test_a_fold_weighting_the_answers_takes_a_prompt_length_per_sequence(
    make_base: MakeBase, tmp_path: Path
) -> None:
    history = _two_adapters(make_base, tmp_path)
    probes = [[torch.randint(3, 200, (1, 12)) for _ in range(2)] for _ in history]
    state = get_strategy("am-lora", routing_weight=0).inference_model(make_base(), history=history)
    settings = DistillSettings(steps=2, rank=2, answer_share=0.5)
    with pytest.raises(ValueError, match="prompt length"):
        fold_state(state, method="am-lora", history=history, probes=probes,
                   distillation=settings, prompts=[[8, 8], [8]])  # fmt: skip
    done = fold_state(state, method="am-lora", history=history, probes=probes,
                      distillation=settings, prompts=[[8, 8], [9, 9]])  # fmt: skip
    assert len(done.distill_losses) == 2

    def first_loss(share: float | None, prompts: list[list[int]] | None) -> float:
        state = get_strategy("am-lora", routing_weight=0).inference_model(
            make_base(), history=history
        )
        settings = DistillSettings(steps=1, rank=2, batch=4, answer_share=share)
        return fold_state(state, method="am-lora", history=history, probes=probes,
                          distillation=settings, prompts=prompts).distill_losses[0]  # fmt: skip

    # the first step's loss is the fitted fold's KL, weighted as asked: by the completions'
    # positions only at share 1, alike with no share or no prompt lengths
    alike = first_loss(None, None)
    assert first_loss(None, [[8, 8], [9, 9]]) == pytest.approx(alike)
    assert first_loss(1.0, None) == pytest.approx(alike)
    assert first_loss(1.0, [[8, 8], [9, 9]]) != pytest.approx(alike, rel=1e-3)

from __future__ import annotations

from collections.abc import Callable

import peft
import pytest
import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from continual.config import LoraHyperparams
from continual.data import Example
from continual.errors import EvaluationCancelled
from continual.evaluation import (
    exact_match,
    generate,
    label_scores,
    language_model_loss,
    rank_classification,
)
from continual.strategies import lora_config

MakeBase = Callable[..., LlamaForCausalLM]
LABELS = ["red", "blue", "Science or Technology"]
EXAMPLES = [
    Example("Which colour?\nInput: a red car\nAnswer:", " red"),
    Example("Which colour?\nInput: sky\nAnswer:", " blue"),
    Example("Topic?\nInput: a new phone chip was shown today in the city\nAnswer:", " blue"),
    Example("x", " Science or Technology"),
    Example("Which colour?\nInput: grass and trees and more grass\nAnswer:", " red"),
]


@pytest.fixture
def model(make_base: MakeBase) -> peft.PeftModel:
    """A LoRA model whose adapter is not a no-op (B is random, not zero)."""
    torch.manual_seed(0)
    model = peft.get_peft_model(make_base(seed=2), lora_config(LoraHyperparams(rank=4)))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)
    return model


def _ids(tokenizer: PreTrainedTokenizerFast, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def _reference_logp(
    model: torch.nn.Module, prompt: list[int], completion: list[int]
) -> torch.Tensor:
    """Per-token log-probs of `completion`, one unpadded sequence at a time."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logp = model(input_ids=ids).logits[0].log_softmax(-1)  # (T, V)
    positions = range(len(prompt), len(prompt) + len(completion))
    return torch.stack([logp[p - 1, ids[0, p]] for p in positions])


def test_label_scores_match_reference_loop(
    model: peft.PeftModel, tokenizer: PreTrainedTokenizerFast
) -> None:
    expected = torch.tensor(
        [
            [
                _reference_logp(
                    model,
                    [tokenizer.bos_token_id, *_ids(tokenizer, ex.prompt)],
                    _ids(tokenizer, " " + label),
                ).mean()
                for label in LABELS
            ]
            for ex in EXAMPLES
        ]
    )
    for batch_size in (1, 2, 32):
        scores = label_scores(model, tokenizer, EXAMPLES, LABELS, batch_size=batch_size)
        torch.testing.assert_close(scores, expected, rtol=0, atol=1e-5)
    result = rank_classification(model, tokenizer, EXAMPLES, LABELS, batch_size=2)
    predicted = [LABELS[i] for i in expected.argmax(dim=1).tolist()]
    assert result.predictions == predicted and result.n == len(EXAMPLES)
    gold = [ex.completion.strip() for ex in EXAMPLES]
    assert result.accuracy == sum(p == g for p, g in zip(predicted, gold, strict=True)) / 5
    assert len(set(predicted)) > 1  # the reference is not degenerate


def test_evaluation_reports_progress_per_example_scored(
    model: peft.PeftModel, tokenizer: PreTrainedTokenizerFast
) -> None:
    for shared_prefix in (True, False):
        done: list[int] = []
        label_scores(model, tokenizer, EXAMPLES, LABELS, batch_size=4, shared_prefix=shared_prefix,
                     on_scored=done.append)  # fmt: skip
        assert sum(done) == len(EXAMPLES) and len(done) > 1, (shared_prefix, done)
    generated: list[int] = []
    exact_match(model, tokenizer, EXAMPLES, max_new_tokens=2, batch_size=2,
                on_scored=generated.append)  # fmt: skip
    assert generated == [2, 2, 1]


def test_evaluation_restores_train_mode(
    model: peft.PeftModel, tokenizer: PreTrainedTokenizerFast
) -> None:
    model.train()
    rank_classification(model, tokenizer, EXAMPLES[:2], LABELS)
    assert model.training
    model.eval()
    language_model_loss(model, tokenizer, EXAMPLES[:2])
    assert not model.training


def test_rank_classification_edge_cases(
    model: peft.PeftModel, tokenizer: PreTrainedTokenizerFast
) -> None:
    empty = rank_classification(model, tokenizer, [], LABELS)
    assert (empty.accuracy, empty.n, empty.predictions) == (0.0, 0, [])
    with pytest.raises(ValueError, match="at least one label"):
        rank_classification(model, tokenizer, EXAMPLES, [])


def _reference_greedy(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerFast,
    prompt: str,
    steps: int,
    ids: list[int] | None = None,
) -> str:
    """Greedy continuation of bos + `prompt` (or of `ids`), one unpadded step at a time."""
    ids = ids if ids is not None else [tokenizer.bos_token_id, *_ids(tokenizer, prompt)]
    new: list[int] = []
    with torch.no_grad():
        for _ in range(steps):
            token = int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
            if token == tokenizer.eos_token_id:
                break
            new.append(token)
    return str(tokenizer.decode(new, skip_special_tokens=True)).strip()


def test_exact_match_matches_reference_greedy_loop(
    model: peft.PeftModel, tokenizer: PreTrainedTokenizerFast
) -> None:
    expected = [_reference_greedy(model, tokenizer, ex.prompt, 4) for ex in EXAMPLES]
    # The first two examples expect exactly what greedy decoding says: accuracy 2/5.
    examples = [
        Example(ex.prompt, " " + expected[i] if i < 2 else " nope") for i, ex in enumerate(EXAMPLES)
    ]
    result = exact_match(model, tokenizer, examples, max_new_tokens=4, batch_size=3)
    assert result.predictions == expected
    assert result.accuracy == pytest.approx(2 / 5)


def test_language_model_loss_matches_reference(
    model: peft.PeftModel, tokenizer: PreTrainedTokenizerFast
) -> None:
    logps = [
        _reference_logp(
            model,
            [tokenizer.bos_token_id, *_ids(tokenizer, ex.prompt)],
            [*_ids(tokenizer, ex.completion), tokenizer.eos_token_id],
        )
        for ex in EXAMPLES
    ]
    tokens = sum(len(lp) for lp in logps)
    expected = -float(torch.cat(logps).sum()) / tokens
    result = language_model_loss(model, tokenizer, EXAMPLES, batch_size=2)
    assert result.loss == pytest.approx(expected, abs=1e-5)
    assert result.perplexity == pytest.approx(torch.tensor(expected).exp().item(), rel=1e-5)
    assert (result.n, result.tokens) == (5, tokens)


def test_shared_prefix_scores_equal_full_sequence_scores(
    tokenizer: PreTrainedTokenizerFast,
) -> None:
    """Prompt once + cached labels gives the one-sequence-per-label scores (fp32, atol 1e-5),
    for labels of different token lengths and with the prompt cut by max_length."""
    from continual.data import Example
    from continual.models import build_tiny_llama

    model, _ = build_tiny_llama(seed=7, tokenizer=tokenizer)
    labels = ["red", "green blue yellow", "a very long label with many tokens", "b"]
    examples = [
        Example(prompt="Which colour?\nInput: the red ball\nAnswer:", completion=" red"),
        Example(prompt="Q: " + "word " * 40 + "\nAnswer:", completion=" b"),
    ]
    for max_length in (None, 24):
        cached = label_scores(model, tokenizer, examples, labels, max_length=max_length)
        full = label_scores(
            model, tokenizer, examples, labels, max_length=max_length, shared_prefix=False
        )
        assert cached.shape == (2, 4)
        torch.testing.assert_close(cached, full, rtol=0, atol=1e-5)


def test_generate_cuts_long_prompts_as_training_cuts_them(
    model: peft.PeftModel, tokenizer: PreTrainedTokenizerFast
) -> None:
    prompt = "Which colour?\nInput: " + "grass and trees and more grass " * 20 + "\nAnswer:"
    ids = _ids(tokenizer, prompt)
    keep = 16 - 1  # bos takes one of the 16
    assert len(ids) > 4 * keep
    cut = [tokenizer.bos_token_id, *ids[: keep // 2], *ids[len(ids) - (keep - keep // 2) :]]
    expected = _reference_greedy(model, tokenizer, "", 3, ids=cut)  # its start and its end
    assert generate(model, tokenizer, [prompt], max_new_tokens=3, max_length=16) == [expected]
    whole = _reference_greedy(model, tokenizer, prompt, 3)
    assert generate(model, tokenizer, [prompt], max_new_tokens=3) == [whole]  # no max_length
    assert whole != expected  # the model does answer differently on the cut prompt


def test_generation_and_scoring_stop_when_asked(
    model: peft.PeftModel, tokenizer: PreTrainedTokenizerFast
) -> None:
    forwards: list[int] = []

    def no_eos(_module: torch.nn.Module, _args: object, out: object) -> None:
        """Count forward passes; without eos every row would run all max_new_tokens steps."""
        forwards.append(1)
        out.logits[..., tokenizer.eos_token_id] = float("-inf")  # type: ignore[attr-defined]

    prompts = [ex.prompt for ex in EXAMPLES]
    handle = model.get_base_model().register_forward_hook(no_eos)
    try:
        full = generate(model, tokenizer, prompts, max_new_tokens=12, should_stop=lambda: False)
        assert len(forwards) == 12 and full == generate(model, tokenizer, prompts,
                                                         max_new_tokens=12)  # fmt: skip
        forwards.clear()
        with pytest.raises(EvaluationCancelled):
            generate(model, tokenizer, prompts, max_new_tokens=12,
                     should_stop=lambda: len(forwards) >= 3)  # fmt: skip
        assert len(forwards) == 3  # stopped after the third token, not the twelfth
    finally:
        handle.remove()
    for shared_prefix in (True, False):  # batch_size 3 = 3 labels: one example per pass
        done: list[int] = []
        with pytest.raises(EvaluationCancelled):
            label_scores(model, tokenizer, EXAMPLES, LABELS, batch_size=3,
                         shared_prefix=shared_prefix, on_scored=done.append,
                         should_stop=lambda done=done: sum(done) >= 2)  # fmt: skip
        assert sum(done) == 2, shared_prefix

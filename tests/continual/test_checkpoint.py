"""Training checkpoints: a run interrupted and resumed from disk ends exactly where an
uninterrupted run ends (same batches, learning rates, dropout masks and optimizer moments)."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from continual.checkpoint import (
    STATE_JSON,
    TrainState,
    load_train_state,
    save_train_state,
    train_state_buffers,
)
from continual.config import LoraHyperparams
from continual.data import synthetic_tasks
from continual.errors import InvalidCheckpoint, TrainingCancelled
from continual.strategies import get_strategy
from continual.training import TrainingCallbacks, train

MakeBase = Callable[..., LlamaForCausalLM]
HYPER = LoraHyperparams(rank=4, max_steps=7, batch_size=8, dropout=0.1, learning_rate=1e-2)


def _trainables(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(
    ("method", "options"),
    [("seq-lora", {}), ("am-lora", {}), ("am-lora", {"selector_lr_scale": 30.0})],  # 2 groups
)
def test_resumed_run_equals_uninterrupted_run(
    make_base: MakeBase,
    tokenizer: PreTrainedTokenizerFast,
    tmp_path: Path,
    method: str,
    options: dict[str, float],
) -> None:
    task = synthetic_tasks(seed=0, train_size=40, test_size=4)[0]
    strategy = get_strategy(method, **options)
    whole_model = strategy.prepare(make_base(), history=[], hyper=HYPER)
    whole = train(whole_model, tokenizer, task.train, HYPER)

    saved: list[int] = []
    steps_seen: list[int] = []

    def on_checkpoint(state: TrainState) -> None:
        save_train_state(state, tmp_path / f"step{state.step}")
        saved.append(state.step)

    callbacks = TrainingCallbacks(
        checkpoint_every=2,
        on_checkpoint=on_checkpoint,
        on_step=lambda info: steps_seen.append(info.step),
        should_stop=lambda: len(steps_seen) == 5,  # the worker dies during step 6
    )
    first = strategy.prepare(make_base(), history=[], hyper=HYPER)
    with pytest.raises(TrainingCancelled):
        train(first, tokenizer, task.train, HYPER, callbacks=callbacks)
    assert saved == [2, 4]

    state = load_train_state(tmp_path / "step4")
    resumed_steps: list[int] = []
    second = strategy.prepare(make_base(), history=[], hyper=HYPER)
    result = train(
        second, tokenizer, task.train, HYPER, resume=state,
        callbacks=TrainingCallbacks(on_step=lambda info: resumed_steps.append(info.step)),
    )  # fmt: skip
    assert resumed_steps == [5, 6, 7]
    assert result.losses == pytest.approx(whole.losses, abs=1e-6)
    assert result.tokens == whole.tokens
    expected = _trainables(whole_model)
    got = _trainables(second)
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-6)
    # Buffers that training accumulates into (am-lora's task statistics) resume too: the resumed
    # run's statistics cover every step, not only those after the checkpoint.
    assert set(state.buffers) == set(train_state_buffers(second))
    assert (method == "am-lora") == bool(state.buffers)
    for name, buffer in train_state_buffers(whole_model).items():
        torch.testing.assert_close(train_state_buffers(second)[name], buffer, rtol=0, atol=1e-9)


def test_a_checkpoint_of_another_model_or_run_is_refused(
    make_base: MakeBase, tokenizer: PreTrainedTokenizerFast, tmp_path: Path
) -> None:
    task = synthetic_tasks(seed=0, train_size=16, test_size=4)[0]
    states: list[TrainState] = []
    hyper = LoraHyperparams(rank=4, max_steps=3, batch_size=8)
    model = get_strategy("seq-lora").prepare(make_base(), history=[], hyper=hyper)
    callbacks = TrainingCallbacks(checkpoint_every=1, on_checkpoint=states.append)
    train(model, tokenizer, task.train, hyper, callbacks=callbacks)
    assert [s.step for s in states] == [1, 2]  # none after the last step

    other_rank = LoraHyperparams(rank=2, max_steps=3, batch_size=8)
    other = get_strategy("seq-lora").prepare(make_base(), history=[], hyper=other_rank)
    with pytest.raises(InvalidCheckpoint, match="shape"):
        train(other, tokenizer, task.train, other_rank, resume=states[1])
    am = get_strategy("am-lora").prepare(make_base(), history=[], hyper=hyper)
    with pytest.raises(InvalidCheckpoint, match="parameters differ"):
        train(am, tokenizer, task.train, hyper, resume=states[1])
    shorter = LoraHyperparams(rank=4, max_steps=1, batch_size=8)
    fresh = get_strategy("seq-lora").prepare(make_base(), history=[], hyper=shorter)
    with pytest.raises(InvalidCheckpoint, match="step 2"):
        train(fresh, tokenizer, task.train, shorter, resume=states[1])

    save_train_state(states[0], tmp_path / "ok")
    (tmp_path / "ok" / STATE_JSON).write_text('{"format": "something else"}')
    with pytest.raises(InvalidCheckpoint):
        load_train_state(tmp_path / "ok")
    with pytest.raises(InvalidCheckpoint):
        load_train_state(tmp_path / "missing")


def test_a_checkpoint_from_before_a_buffer_existed_resumes_without_it(
    make_base: MakeBase, tokenizer: PreTrainedTokenizerFast, caplog: pytest.LogCaptureFixture
) -> None:
    """A checkpoint written before am-lora kept task statistics still resumes: the statistics
    then hold the steps after it, and a warning says so."""
    task = synthetic_tasks(seed=0, train_size=16, test_size=4)[0]
    hyper = LoraHyperparams(rank=4, max_steps=3, batch_size=8)
    states: list[TrainState] = []
    strategy = get_strategy("am-lora")
    model = strategy.prepare(make_base(), history=[], hyper=hyper)
    train(model, tokenizer, task.train, hyper,
          callbacks=TrainingCallbacks(checkpoint_every=1, on_checkpoint=states.append))  # fmt: skip
    old = dataclasses.replace(states[0], buffers={})
    resumed = strategy.prepare(make_base(), history=[], hyper=hyper)
    with caplog.at_level(logging.WARNING):
        train(resumed, tokenizer, task.train, hyper, resume=old)
    assert "restarts from its initial value" in caplog.text
    counts = [float(b) for n, b in train_state_buffers(resumed).items() if n.endswith("new_count")]
    assert counts == [2 * hyper.batch_size]  # steps 2 and 3

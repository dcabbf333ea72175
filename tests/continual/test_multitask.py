from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pytest
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from continual.batching import encode_pair
from continual.config import LoraHyperparams
from continual.data import synthetic_tasks
from continual.errors import InvalidDataset
from continual.metrics import AccuracyMatrix
from continual.multitask import MultitaskResult, learn_multitask, multitask_hyperparams
from continual.strategies import ADAPTER_FILES
from continual.training import TrainResult

MakeBase = Callable[..., LlamaForCausalLM]


def test_multitask_learns_every_task_from_the_union(
    make_base: MakeBase, tokenizer: PreTrainedTokenizerFast, tmp_path: Path
) -> None:
    tasks = synthetic_tasks(seed=0, train_size=128, test_size=48)
    hyper = LoraHyperparams(epochs=10)
    result = learn_multitask(
        make_base=make_base,
        tokenizer=tokenizer,
        tasks=tasks,
        hyper=hyper,
        out_dir=tmp_path / "multitask",
        measure_baseline=True,
    )
    union = [example for task in tasks for example in task.train]
    # The stream's budget: `epochs` passes over the union, every example seen `epochs` times.
    assert result.train_result.steps == 10 * -(-len(union) // hyper.batch_size) == 240
    tokens = sum(
        len(
            encode_pair(
                tokenizer,
                prompt=e.prompt,
                completion=e.completion,
                add_eos=True,
                max_length=hyper.max_length,
            ).ids
        )
        for e in union
    )
    assert result.train_result.tokens == 10 * tokens
    assert result.task_names == ("sentiment", "topic", "color")
    table = result.format_row()
    logging.getLogger(__name__).info("multitask in %.1fs: %s", result.seconds, table)
    assert result.baseline is not None and len(result.baseline) == 3
    for accuracy, baseline in zip(result.accuracies, result.baseline, strict=True):
        assert accuracy > 0.85 and accuracy > baseline + 0.3, (table, result.baseline)
    assert result.average_accuracy == pytest.approx(sum(result.accuracies) / 3)
    assert sorted(p.name for p in result.adapter.iterdir()) == sorted(ADAPTER_FILES)


def test_budget_and_errors(
    make_base: MakeBase, tokenizer: PreTrainedTokenizerFast, tmp_path: Path
) -> None:
    per_task = LoraHyperparams(max_steps=40)
    assert multitask_hyperparams(per_task, num_tasks=3).max_steps == 120
    assert multitask_hyperparams(per_task, num_tasks=3).learning_rate == per_task.learning_rate
    by_epochs = LoraHyperparams(epochs=3)
    assert multitask_hyperparams(by_epochs, num_tasks=3) == by_epochs
    with pytest.raises(ValueError, match="num_tasks"):
        multitask_hyperparams(per_task, num_tasks=0)
    with pytest.raises(InvalidDataset) as info:
        learn_multitask(
            make_base=make_base, tokenizer=tokenizer, tasks=[], hyper=per_task, out_dir=tmp_path
        )
    assert info.value.field == "tasks"
    assert not any(tmp_path.iterdir())


def test_format_row_lines_up_with_the_stream_table() -> None:
    names = ("sentiment", "topic", "color")
    result = MultitaskResult(
        task_names=names,
        accuracies=(1.0, 0.5, 0.75),
        baseline=None,
        adapter=Path("unused"),
        train_result=TrainResult(steps=1, final_loss=0.0, tokens=1, seconds=0.0, losses=(0.0,)),
        seconds=0.0,
    )
    table = AccuracyMatrix(values=((1.0, 0.2, 0.3), (0.4, 0.9, 0.1), (0.5, 0.6, 0.7))).format_table(
        names
    )
    last_row = table.splitlines()[-2]  # "after color | ..."
    row = result.format_row()
    assert (
        row
        == f"{'multitask'.ljust(len('after sentiment'))} |     1.000     0.500     0.750  ACC 0.750"
    )
    assert len(row.split("  ACC")[0]) == len(last_row) and row.index("|") == last_row.index("|")

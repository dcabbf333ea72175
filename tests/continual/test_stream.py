from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pytest
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from continual.config import LoraHyperparams
from continual.data import synthetic_tasks
from continual.strategies import ADAPTER_FILES, get_strategy
from continual.stream import learn_stream

MakeBase = Callable[..., LlamaForCausalLM]


def test_seq_lora_demo_learns_every_task_and_forgets(
    make_base: MakeBase,
    tokenizer: PreTrainedTokenizerFast,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The 3-task demo: each synthetic task is learned well above chance right after training
    on it (the learnability check), and sequential LoRA forgets earlier tasks."""
    tasks = synthetic_tasks(seed=0)
    with caplog.at_level(logging.INFO, logger="continual"):
        result = learn_stream(
            strategy=get_strategy("seq-lora"),
            make_base=make_base,
            tokenizer=tokenizer,
            tasks=tasks,
            hyper=LoraHyperparams(),
            out_dir=tmp_path,
        )
    matrix = result.matrix
    names = [task.name for task in tasks]
    table = matrix.format_table(names)
    logging.getLogger(__name__).info("seq-lora demo in %.1fs\n%s", result.seconds, table)
    assert matrix.baseline is not None
    for i, task in enumerate(tasks):
        chance = 1 / len(task.labels or ())
        assert matrix.baseline[i] < chance + 0.2, table
        assert matrix.at(i, i) > 0.8, table
    assert matrix.backward_transfer is not None and matrix.backward_transfer < -0.1, table
    assert [p.name for p in result.adapters] == ["00-sentiment", "01-topic", "02-color"]
    for adapter in result.adapters:
        assert sorted(f.name for f in adapter.iterdir()) == sorted(ADAPTER_FILES)
    assert len(result.train_results) == 3
    assert any("after color" in r.getMessage() for r in caplog.records)

"""Reader for the CL_Benchmark layout used by O-LoRA: `<dir>/<task>/{labels,train,test}.json`."""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

from continual.data.examples import Example, PromptFormat, TaskData, instruction_format
from continual.errors import NESTED, InvalidDataset

logger = logging.getLogger(__name__)


def classification_instruction(labels: Sequence[str]) -> str:
    """The instruction of a classification task: it lists the options in order."""
    return "Classify the text. Options: " + ", ".join(labels) + "."


def cl_format(labels: Sequence[str]) -> PromptFormat:
    """The prompt format of a CL_Benchmark task: its instruction lists the options in order."""
    return instruction_format(classification_instruction(labels))


def parse_cl_records(records: list[Any], labels: list[str], *, fmt: PromptFormat) -> list[Example]:
    """Turn `[{"sentence", "label"}, ...]` into examples rendered by `fmt`; errors name the
    1-based record."""
    if not isinstance(records, list):
        raise InvalidDataset(field="records", reason="must be a JSON list of objects")
    known = set(labels)
    return [
        cl_example(record, labels=known, fmt=fmt, number=number)
        for number, record in enumerate(records, start=1)
    ]


def cl_example(record: Any, *, labels: Collection[str], fmt: PromptFormat, number: int) -> Example:
    """One `{"sentence", "label"}` record (the 1-based `number`), rendered by `fmt`."""
    if not isinstance(record, dict):
        raise InvalidDataset(field="record", reason="must be an object", record=number)
    for key in ("sentence", "label"):
        if key not in record:
            raise InvalidDataset(field=key, reason="missing", record=number)
        if not isinstance(record[key], str):
            raise InvalidDataset(field=key, reason="must be a string", record=number)
    if record["label"] not in labels:
        reason = f"{record['label']!r} is not one of labels.json"
        raise InvalidDataset(field="label", reason=reason, record=number)
    return fmt.example(text=record["sentence"], label=record["label"])


def load_cl_benchmark(
    directory: Path,
    task: str,
    *,
    train_limit: int | None = None,
    test_limit: int | None = None,
    seed: int = 0,
) -> TaskData:
    """Load one task; `*_limit` keep a seeded random subset (in a random order)."""
    folder = Path(directory) / task
    labels = _read_labels(folder / "labels.json")
    fmt = cl_format(labels)
    splits: dict[str, tuple[Example, ...]] = {}
    for offset, (split, limit) in enumerate((("train", train_limit), ("test", test_limit))):
        records = _read_json(folder / f"{split}.json", field=split)
        examples = parse_cl_records(records, labels, fmt=fmt)
        splits[split] = tuple(_subsample(examples, limit=limit, seed=seed + offset))
    logger.info(
        "loaded %s: %d train, %d test, %d labels",
        task,
        len(splits["train"]),
        len(splits["test"]),
        len(labels),
    )
    return TaskData(
        name=task, train=splits["train"], test=splits["test"], labels=tuple(labels),
        prompt_format=fmt,
    )  # fmt: skip


def _read_json(path: Path, *, field: str) -> Any:
    if not path.is_file():
        raise InvalidDataset(field=field, reason=f"file not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidDataset(field=field, reason=f"invalid JSON in {path.name}: {exc}") from exc
    except RecursionError:  # json's parser recurses once per nesting level
        raise InvalidDataset(field=field, reason=f"{path.name}: {NESTED}") from None


def _read_labels(path: Path) -> list[str]:
    labels = _read_json(path, field="labels")
    if not isinstance(labels, list) or not labels:
        raise InvalidDataset(field="labels", reason="labels.json must be a non-empty list")
    if not all(isinstance(label, str) and label.strip() for label in labels):
        raise InvalidDataset(field="labels", reason="labels must be non-empty strings")
    if len(set(labels)) != len(labels):
        raise InvalidDataset(field="labels", reason="labels must be unique")
    return labels


def _subsample(examples: list[Example], *, limit: int | None, seed: int) -> list[Example]:
    if limit is None or limit >= len(examples):
        return examples
    if limit < 1:
        raise InvalidDataset(field="limit", reason=f"must be >= 1, got {limit}")
    return random.Random(seed).sample(examples, limit)

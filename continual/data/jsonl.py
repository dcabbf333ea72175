"""JSON Lines: user uploads (`{"prompt", "completion"}`) and the canonical task serialisation.

`to_jsonl` is canonical (sorted keys, ASCII escapes, no spaces, one object per line, `\\n` after
every line) so equal tasks give equal bytes: the registry hashes them as the dataset digest. Its
header records the task's prompt format (`prompt_template`, `completion_template`); a header
written before they were recorded reads as the bare `{text}` prompt and the completion template
its examples are written in.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

from continual.data.examples import Example, PromptFormat, TaskData, completion_template_of
from continual.errors import NESTED, InvalidDataset

FORMAT = "strata-task/1"
_SPLITS = ("train", "test")


def parse_jsonl(text: str) -> list[Example]:
    """Parse `{"prompt": str, "completion": str}` lines; blank lines are skipped."""
    examples = [
        jsonl_example(line, number=number)
        for number, line in enumerate(text.splitlines(), start=1)
        if line.strip()
    ]
    if not examples:
        raise InvalidDataset(field="data", reason="no examples: the input is empty")
    return examples


def jsonl_example(line: str, *, number: int) -> Example:
    """One `{"prompt": str, "completion": str}` line (the 1-based `number`), as an example."""
    record = _load_line(line, number=number)
    _check_keys(record, required=("prompt", "completion"), number=number)
    return Example(prompt=record["prompt"], completion=record["completion"])


def to_jsonl(task: TaskData) -> bytes:
    """Canonical bytes: a header line (format, name, labels), then train then test examples."""
    labels = list(task.labels) if task.labels else None
    header = {"format": FORMAT, "labels": labels, "name": task.name, **task.prompt_format.to_dict()}
    lines = [_dump(header)]
    for split in _SPLITS:
        for example in getattr(task, split):
            record = {"completion": example.completion, "prompt": example.prompt, "split": split}
            lines.append(_dump(record))
    return ("\n".join(lines) + "\n").encode("ascii")


def from_jsonl(data: bytes) -> TaskData:
    """Inverse of `to_jsonl`; errors carry the 1-based line number."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidDataset(field="data", reason=f"not UTF-8: {exc}") from exc
    lines = text.splitlines()
    if not lines:
        raise InvalidDataset(field="data", reason="empty input")
    header = _load_line(lines[0], number=1)
    _check_keys(header, required=("format", "labels", "name"), optional=_TEMPLATES, number=1)
    if header["format"] != FORMAT:
        raise InvalidDataset(field="format", reason=f"expected {FORMAT!r}", line=1)
    labels = _parse_labels(header["labels"])
    splits: dict[str, list[Example]] = {split: [] for split in _SPLITS}
    for number, line in enumerate(lines[1:], start=2):
        record = _load_line(line, number=number)
        _check_keys(record, required=("completion", "prompt", "split"), number=number)
        if record["split"] not in splits:
            raise InvalidDataset(field="split", reason="must be 'train' or 'test'", line=number)
        example = Example(prompt=record["prompt"], completion=record["completion"])
        splits[record["split"]].append(example)
    fmt = _header_format(header, labels=labels, examples=[*splits["train"], *splits["test"]])
    return TaskData(
        name=header["name"],
        train=tuple(splits["train"]),
        test=tuple(splits["test"]),
        labels=labels,
        prompt_format=fmt,
    )


_TEMPLATES = ("prompt_template", "completion_template")


def _header_format(
    header: dict[str, Any], *, labels: tuple[str, ...] | None, examples: list[Example]
) -> PromptFormat:
    if "completion_template" in header:
        completion = header["completion_template"]
    else:  # written before the format was recorded: the one its examples use, if they agree
        completion = PromptFormat().completion  # (else what such tasks were scored with)
        if labels:
            with contextlib.suppress(InvalidDataset):
                completion = completion_template_of(examples, labels)
    try:
        return PromptFormat(prompt=header.get("prompt_template", "{text}"), completion=completion)
    except InvalidDataset as exc:
        raise InvalidDataset(field=exc.field, reason=exc.reason, line=1) from exc


def _dump(record: dict[str, Any]) -> str:
    return json.dumps(record, sort_keys=True, ensure_ascii=True, separators=(",", ":"))


def _load_line(line: str, *, number: int) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise InvalidDataset(field="json", reason=f"invalid JSON: {exc.msg}", line=number) from exc
    except RecursionError:  # json's parser recurses once per nesting level
        raise InvalidDataset(field="json", reason=NESTED, line=number) from None
    if not isinstance(record, dict):
        raise InvalidDataset(field="record", reason="must be a JSON object", line=number)
    return record


def _check_keys(
    record: dict[str, Any],
    *,
    required: tuple[str, ...],
    optional: tuple[str, ...] = (),
    number: int,
) -> None:
    """The required keys and no others but `optional` ones, each a string (except `labels`),
    in any order."""
    for key in required:
        if key not in record:
            raise InvalidDataset(field=key, reason="missing", line=number)
    for key in (*required, *(k for k in optional if k in record)):
        if key != "labels" and not isinstance(record[key], str):
            raise InvalidDataset(field=key, reason="must be a string", line=number)
    for key in record:
        if key not in required and key not in optional:
            raise InvalidDataset(field=str(key), reason="unknown field", line=number)


def _parse_labels(labels: Any) -> tuple[str, ...] | None:
    if labels is None:
        return None
    if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
        raise InvalidDataset(field="labels", reason="must be a list of strings or null", line=1)
    return tuple(labels)

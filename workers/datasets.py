"""Datasets: stored as canonical JSONL blobs whose sha256 is the dataset digest."""

from __future__ import annotations

import json
import random
import zlib
from dataclasses import dataclass
from typing import Any

from continual.data import (
    Example,
    PromptFormat,
    TaskData,
    cl_format,
    completion_template_of,
    from_jsonl,
    parse_cl_records,
    parse_jsonl,
    to_jsonl,
)
from continual.errors import NESTED, InvalidDataset
from registry.entities import Dataset
from registry.instance import Instance


def store_dataset(inst: Instance, data: TaskData, *, format: str) -> Dataset:
    """Blob first, then the row: a dataset row always points at a stored, verified blob."""
    blob = to_jsonl(data)
    digest = inst.artifacts.put_bytes(blob)
    return inst.registry.tasks.add_dataset(
        digest=digest,
        format=format,
        num_train=len(data.train),
        num_test=len(data.test),
        size_bytes=len(blob),
        labels=data.labels,
        prompt_template=data.prompt_format.prompt,
        completion_template=data.prompt_format.completion,
    )


def load_dataset(inst: Instance, dataset: Dataset) -> TaskData:
    return from_jsonl(inst.artifacts.get_bytes(dataset.digest))


UPLOAD_FORMATS = ("jsonl", "cl_benchmark")
DEFAULT_HOLDOUT = 0.1


@dataclass(frozen=True)
class UploadLimits:
    max_examples: int
    max_line_bytes: int
    max_expanded_bytes: int = 2**30  # a gzip upload may expand to at most this


GZIP_MAGIC = b"\x1f\x8b"


def parse_upload(
    *,
    name: str,
    format: str,
    train: bytes,
    test: bytes | None,
    labels: list[str] | None,
    holdout: float | None,
    limits: UploadLimits,
) -> TaskData:
    """A user's dataset as a task: JSONL of `{prompt, completion}` or CL_Benchmark JSON of
    `{sentence, label}` (with `labels`). Errors name the file (field) and the line or record.

    Without a test file, a seeded `holdout` fraction of the training examples (default 10%)
    becomes the test split, so every task can be evaluated after every step.

    The task's prompt format: a CL_Benchmark task's prompts are its instruction template (which
    lists the labels) around each sentence, its completions `" label"`; a JSONL task's prompts
    are its own (`{text}`), and a labelled one's completions keep the whitespace they are
    written with, which must be the same on every line."""
    if format not in UPLOAD_FORMATS:
        raise InvalidDataset(field="format", reason=f"must be one of {list(UPLOAD_FORMATS)}")
    if labels is not None:
        _check_labels(labels)
    if format == "cl_benchmark" and labels is None:
        raise InvalidDataset(field="labels", reason="a cl_benchmark dataset needs labels")
    fmt = cl_format(labels) if format == "cl_benchmark" and labels else PromptFormat()
    train_examples, fmt = _parse_file(
        "train", train, format=format, labels=labels, limits=limits, fmt=fmt, first=True
    )
    if test is not None:
        if holdout is not None:
            raise InvalidDataset(field="holdout", reason="give a test file or a holdout, not both")
        test_examples, _ = _parse_file(
            "test", test, format=format, labels=labels, limits=limits, fmt=fmt, first=False
        )
    else:
        fraction = DEFAULT_HOLDOUT if holdout is None else holdout
        if not 0 < fraction <= 0.5:
            raise InvalidDataset(field="holdout", reason=f"must be in (0, 0.5], got {fraction}")
        if len(train_examples) < 2:
            raise InvalidDataset(field="train", reason="needs 2+ examples to hold some out")
        shuffled = random.Random(0).sample(train_examples, len(train_examples))
        cut = max(1, round(fraction * len(shuffled)))
        test_examples, train_examples = shuffled[:cut], shuffled[cut:]
    if len(train_examples) + len(test_examples) > limits.max_examples:
        raise InvalidDataset(field="train", reason=f"more than {limits.max_examples} examples")
    return TaskData(name=name, train=tuple(train_examples), test=tuple(test_examples),
                    labels=tuple(labels) if labels else None, prompt_format=fmt)  # fmt: skip


def _check_labels(labels: object) -> None:
    if not isinstance(labels, list) or not labels or len(labels) > 1000:
        raise InvalidDataset(field="labels", reason="must be a list of 1 to 1000 strings")
    if not all(isinstance(label, str) and label.strip() for label in labels):
        raise InvalidDataset(field="labels", reason="labels must be non-empty strings")
    if len(set(labels)) != len(labels):
        raise InvalidDataset(field="labels", reason="labels must be unique")


def _parse_file(
    field: str,
    data: bytes,
    *,
    format: str,
    labels: list[str] | None,
    limits: UploadLimits,
    fmt: PromptFormat,
    first: bool,
) -> tuple[list[Example], PromptFormat]:
    """The file's examples, and `fmt` with the completion template a labelled JSONL file is
    written in (`first`: the file that sets it; the others must match it)."""
    if data.startswith(GZIP_MAGIC):
        data = _gunzip(field, data, limit=limits.max_expanded_bytes)
    if not data.strip():
        raise InvalidDataset(field=field, reason="the file is empty")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidDataset(field=field, reason=f"not UTF-8 (byte {exc.start})") from exc
    for number, line in enumerate(text.splitlines(), start=1):
        if len(line.encode("utf-8")) > limits.max_line_bytes:
            reason = f"longer than {limits.max_line_bytes} bytes"
            raise InvalidDataset(field=field, reason=reason, line=number)
        if number > limits.max_examples + 1:  # leave room for a JSON list's brackets
            raise InvalidDataset(field=field, reason=f"more than {limits.max_examples} lines")
    try:
        if format == "jsonl":
            examples = parse_jsonl(text)
        else:
            assert labels is not None
            records = _json_list(text)
            if len(records) > limits.max_examples:
                raise InvalidDataset(field=field, reason=f"more than {limits.max_examples} records")
            examples = parse_cl_records(records, labels, fmt=fmt)
    except InvalidDataset as exc:  # name the file as well as the record's field
        inner = "" if exc.field in ("json", "record", "data", "records") else f".{exc.field}"
        raise InvalidDataset(field=field + inner, reason=exc.reason, line=exc.line) from exc
    if labels is not None and format == "jsonl":
        fmt = _jsonl_completions(field, text, examples, labels, fmt=fmt, first=first)
    return examples, fmt


def _jsonl_completions(
    field: str,
    text: str,
    examples: list[Example],
    labels: list[str],
    *,
    fmt: PromptFormat,
    first: bool,
) -> PromptFormat:
    """`fmt` with the completion template the file's completions are written in (the first
    file's, which every later file must match); errors name the file's line."""
    numbers = [n for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
    try:
        template = completion_template_of(
            examples, labels, expected=None if first else fmt.completion
        )
    except InvalidDataset as exc:
        number = numbers[(exc.line or 1) - 1]
        raise InvalidDataset(field=f"{field}.completion", reason=exc.reason, line=number) from exc
    return PromptFormat(prompt=fmt.prompt, completion=template)


def _gunzip(field: str, data: bytes, *, limit: int) -> bytes:
    """A gzip upload's content, every member of it in turn (as gzip tools read a concatenation
    of gzip files), decompressed in bounded steps: more than `limit` bytes is refused as soon as
    it is reached (a compression bomb never expands in memory). Zero bytes after the last
    member (tape padding) are ignored, as gzip does."""
    out = bytearray()
    pending = data
    try:
        while pending:
            inflater = zlib.decompressobj(wbits=31)  # one gzip member
            while pending:
                out += inflater.decompress(pending, limit + 1 - len(out))
                if len(out) > limit:
                    raise InvalidDataset(field=field, reason=f"expands to more than {limit} bytes")
                pending = inflater.unconsumed_tail
                if inflater.eof:
                    break
            if not inflater.eof:
                raise InvalidDataset(field=field, reason="the gzip file is truncated")
            pending = inflater.unused_data  # the next member, if any
            if not pending.strip(b"\0"):
                break
    except zlib.error as exc:
        raise InvalidDataset(field=field, reason=f"not a valid gzip file: {exc}") from exc
    return bytes(out)


def _json_list(text: str) -> list[Any]:
    """A CL_Benchmark file's records; errors name the JSON (the caller adds the file's field)."""
    try:
        records = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidDataset(
            field="json", reason=f"invalid JSON: {exc.msg}", line=exc.lineno
        ) from exc
    except RecursionError:  # json's parser recurses once per nesting level
        raise InvalidDataset(field="json", reason=NESTED) from None
    if not isinstance(records, list):
        raise InvalidDataset(
            field="records", reason="must be a JSON list of {sentence, label} objects"
        )
    return records

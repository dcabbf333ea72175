"""Datasets: stored as canonical JSONL blobs whose sha256 is the dataset digest."""

from __future__ import annotations

import gzip
import hashlib
import io
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import BinaryIO

from continual.data import (
    Example,
    PromptFormat,
    TaskData,
    cl_example,
    cl_format,
    completion_template_of,
    from_jsonl,
    jsonl_example,
    to_jsonl,
)
from continual.errors import InvalidDataset
from registry.entities import Dataset, NewDataset
from registry.instance import Instance
from services.uploads import decode_utf8, json_records, read_chunks, split_lines


def dataset_blob(data: TaskData, *, format: str) -> tuple[bytes, NewDataset]:
    """The task's canonical JSONL blob, and the dataset row that records it: its digest is the
    blob's sha256, the key the artifact store gives it."""
    blob = to_jsonl(data)
    return blob, NewDataset(
        digest=hashlib.sha256(blob).hexdigest(),
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
AUTO = "auto"  # the format told by the train file's first character: `[` or `{`
SNIFF_BYTES = 4096


def resolve_format(format: str, train: BinaryIO) -> str:
    """`format`, or with "auto" the train file's: a JSON list (`[`) is CL_Benchmark, anything
    else JSONL. The file (gzipped or not) is read back to where it was."""
    if format != AUTO:
        return format
    start = train.tell()
    head = train.read(SNIFF_BYTES)
    train.seek(start)
    if head[:2] == b"\x1f\x8b":  # gzip: look at the start of what it expands to
        try:
            head = gzip.GzipFile(fileobj=io.BytesIO(head)).read(SNIFF_BYTES)
        except (OSError, EOFError):
            head = head[:0]
    # anything else is read as JSONL, whose errors name the line at fault
    return "cl_benchmark" if head.lstrip(b"\xef\xbb\xbf \t\r\n")[:1] == b"[" else "jsonl"


DEFAULT_HOLDOUT = 0.1


@dataclass(frozen=True)
class UploadLimits:
    max_examples: int
    max_line_bytes: int  # a JSONL line, or a record of a JSON list
    max_expanded_bytes: int = 2**30  # a gzip upload may expand to at most this


def parse_upload(
    *,
    name: str,
    format: str,
    train: BinaryIO,
    test: BinaryIO | None,
    labels: list[str] | None,
    holdout: float | None,
    limits: UploadLimits,
) -> TaskData:
    """A user's dataset as a task: JSONL of `{prompt, completion}` or CL_Benchmark JSON of
    `{sentence, label}` (with `labels`), each file gzipped or not. Errors name the file (field)
    and the line (JSONL) or record (a JSON list).

    The files are read as they stream from their (spooled) uploads, twice: first every example
    is checked, one line or record in memory at a time, and every limit is refused as soon as it
    is passed (`services.uploads`); only an upload that passed is read again and held. So a
    refused upload never holds its examples, and a compression bomb is never held expanded.

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
    if test is not None and holdout is not None:
        raise InvalidDataset(field="holdout", reason="give a test file or a holdout, not both")
    fraction = DEFAULT_HOLDOUT if holdout is None else holdout
    if test is None and not 0 < fraction <= 0.5:
        raise InvalidDataset(field="holdout", reason=f"must be in (0, 0.5], got {fraction}")
    fmt = cl_format(labels) if format == "cl_benchmark" and labels else PromptFormat()
    files = {"train": train} if test is None else {"train": train, "test": test}
    read, fmt = _read_files(files, format=format, labels=labels, limits=limits, fmt=fmt)
    train_examples, test_examples = read["train"], read.get("test", [])
    if test is None:
        shuffled = random.Random(0).sample(train_examples, len(train_examples))
        cut = max(1, round(fraction * len(shuffled)))
        test_examples, train_examples = shuffled[:cut], shuffled[cut:]
    return TaskData(name=name, train=tuple(train_examples), test=tuple(test_examples),
                    labels=tuple(labels) if labels else None, prompt_format=fmt)  # fmt: skip


def _check_labels(labels: object) -> None:
    if not isinstance(labels, list) or not labels or len(labels) > 1000:
        raise InvalidDataset(field="labels", reason="must be a list of 1 to 1000 strings")
    if not all(isinstance(label, str) and label.strip() for label in labels):
        raise InvalidDataset(field="labels", reason="labels must be non-empty strings")
    if len(set(labels)) != len(labels):
        raise InvalidDataset(field="labels", reason="labels must be unique")


def _read_files(
    files: dict[str, BinaryIO],
    *,
    format: str,
    labels: list[str] | None,
    limits: UploadLimits,
    fmt: PromptFormat,
) -> tuple[dict[str, list[Example]], PromptFormat]:
    """Each file's examples, and `fmt` with the completion template of a labelled JSONL upload.
    Two passes: the first checks every example of every file and keeps none; the second, of an
    upload that passed, keeps them."""
    counted = 0
    for field, file in files.items():
        examples = _Examples(field, file, format=format, labels=labels, limits=limits, fmt=fmt,
                             counted=counted)  # fmt: skip
        fmt = _check_file(examples, labels=labels, first=field == "train")
        if field == "train" and examples.count < (1 if "test" in files else 2):
            reason = "no examples" if not examples.count else "needs 2+ examples to hold some out"
            raise InvalidDataset(field="train", reason=reason)
        counted += examples.count
    read = {
        field: list(_Examples(field, file, format=format, labels=labels, limits=limits, fmt=fmt))
        for field, file in files.items()
    }
    return read, fmt


def _check_file(examples: _Examples, *, labels: list[str] | None, first: bool) -> PromptFormat:
    """Every example of a file checked, none kept (`examples.count` counts them): the format
    with the completion template a labelled JSONL file is written in (`first`: the file that
    sets it; the others must match it)."""
    fmt = examples.fmt
    if labels is None or examples.format != "jsonl":
        for _ in examples:
            pass
        return fmt
    try:
        template = completion_template_of(
            examples, labels, expected=None if first else fmt.completion
        )
    except InvalidDataset as exc:
        if exc.field != "completion":  # the reader's own, which name the file already
            raise
        field = f"{examples.field}.completion"
        raise InvalidDataset(field=field, reason=exc.reason, line=examples.number) from exc
    return PromptFormat(prompt=fmt.prompt, completion=template)


class _Examples:
    """A file's examples as it streams (gunzipped, split into lines or records, each checked),
    from its start each time it is iterated; a limit is refused as soon as it is passed.
    `number` is the line (JSONL) or record of the last example given, `count` how many were
    given; `counted` examples were given by the files before (they share `max_examples`)."""

    def __init__(
        self,
        field: str,
        file: BinaryIO,
        *,
        format: str,
        labels: list[str] | None,
        limits: UploadLimits,
        fmt: PromptFormat,
        counted: int = 0,
    ) -> None:
        self.field, self.file, self.format, self.fmt = field, file, format, fmt
        self.labels = frozenset(labels or ())
        self.limits, self.counted = limits, counted
        self.number = self.count = 0

    def __iter__(self) -> Iterator[Example]:
        self.number = self.count = 0
        jsonl = self.format == "jsonl"
        content = read_chunks(self.file, max_expanded_bytes=self.limits.max_expanded_bytes)
        numbered = self._jsonl(content) if jsonl else self._records(content)
        with _named(self.field):
            for number, example in numbered:
                self.number, self.count = number, self.count + 1
                if self.counted + self.count > self.limits.max_examples:
                    raise self._too_many()
                yield example
            if jsonl and not self.count:
                raise InvalidDataset(field="data", reason="the file is empty")

    def _too_many(self) -> InvalidDataset:
        reason = f"more than {self.limits.max_examples} examples"
        if self.counted:
            reason += f" ({self.counted} in train)"
        if self.format == "jsonl":
            return InvalidDataset(field="data", reason=reason, line=self.number)
        return InvalidDataset(field="data", reason=reason, record=self.number)

    def _jsonl(self, content: Iterator[bytes]) -> Iterator[tuple[int, Example]]:
        limits = self.limits
        for number, line in split_lines(content, max_line_bytes=limits.max_line_bytes):
            if number > limits.max_examples + 1:  # blank lines cost time too
                raise InvalidDataset(field="data", reason=f"more than {limits.max_examples} lines")
            if line.strip():
                yield number, jsonl_example(line, number=number)

    def _records(self, content: Iterator[bytes]) -> Iterator[tuple[int, Example]]:
        records = json_records(decode_utf8(content), max_record_bytes=self.limits.max_line_bytes)
        for number, record in records:
            yield number, cl_example(record, labels=self.labels, fmt=self.fmt, number=number)


@contextmanager
def _named(field: str) -> Iterator[None]:
    """Name the file as well as the record's field in the errors raised inside."""
    try:
        yield
    except InvalidDataset as exc:
        inner = "" if exc.field in ("json", "record", "data", "records") else f".{exc.field}"
        raise InvalidDataset(
            field=field + inner, reason=exc.reason, line=exc.line, record=exc.record
        ) from exc

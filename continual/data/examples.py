"""The in-memory shape of a task's data, and how a task's text and labels become tokens.

`PromptFormat` is the one place that turns an input text into a prompt and a label into a
completion. Training examples, the candidate completions that rank classification scores, and
the prompts `predict` sends are all rendered by it, so the tokens a model is trained on are the
tokens it is scored and queried on.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from continual.errors import InvalidDataset

PROMPT_TEMPLATE = "{instruction}\nInput: {text}\nAnswer:"
TEXT, LABEL = "{text}", "{label}"


@dataclass(frozen=True)
class Example:
    """One supervised pair; the loss (and the score) covers only `completion`."""

    prompt: str
    completion: str


@dataclass(frozen=True)
class PromptFormat:
    """A task's templates: `prompt` holds `{text}` once, `completion` is `{label}` with only
    whitespace around it (a leading space makes BPE tokenise a label as a whole word).

    A template other than the bare `{text}` takes the text stripped of surrounding whitespace,
    as the CL_Benchmark reader does; the bare `{text}` (a JSONL task's prompts, written whole by
    the user) takes it verbatim."""

    prompt: str = TEXT
    completion: str = " " + LABEL

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str) or self.prompt.count(TEXT) != 1:
            raise InvalidDataset(field="prompt_template", reason="must hold {text} exactly once")
        if not isinstance(self.completion, str) or self.completion.count(LABEL) != 1:
            raise InvalidDataset(
                field="completion_template", reason="must hold {label} exactly once"
            )
        before, _, after = self.completion.partition(LABEL)
        if before.strip() or after.strip():
            raise InvalidDataset(
                field="completion_template",
                reason=f"only whitespace may surround {{label}}, got {self.completion!r}",
            )

    def render_prompt(self, text: str) -> str:
        if self.prompt == TEXT:
            return text
        return self.prompt.replace(TEXT, text.strip())

    def render_completion(self, label: str) -> str:
        return self.completion.replace(LABEL, label.strip())

    def example(self, *, text: str, label: str) -> Example:
        return Example(prompt=self.render_prompt(text), completion=self.render_completion(label))

    def to_dict(self) -> dict[str, str]:
        return {"prompt_template": self.prompt, "completion_template": self.completion}


def instruction_format(instruction: str) -> PromptFormat:
    """The fixed prompt template with its instruction filled in: instruction, the input text,
    then the answer cue."""
    return PromptFormat(prompt=PROMPT_TEMPLATE.replace("{instruction}", instruction.strip()))


def completion_template_of(
    examples: Iterable[Example], labels: Sequence[str], *, expected: str | None = None
) -> str:
    """The completion template a labelled task's examples are written in: each completion must
    be one of `labels` with the same whitespace around it as the first one (or as `expected`,
    another split's template). InvalidDataset names the 1-based example that differs."""
    known = set(labels)
    template = expected
    where = "the first example" if expected is None else "the training examples"
    for number, example in enumerate(examples, start=1):
        label = example.completion.strip()
        if label not in known:
            raise InvalidDataset(
                field="completion",
                reason=f"completion {example.completion!r} is not one of the labels",
                line=number,
            )
        before, _, after = example.completion.partition(label)
        written = before + LABEL + after
        if template is None:
            template = written
        elif written != template:
            raise InvalidDataset(
                field="completion",
                reason=f"{example.completion!r} is written as {written!r}, but {where} as "
                f"{template!r}: write every label the same way, so that what is trained is "
                "what is scored",
                line=number,
            )
    return template if template is not None else " " + LABEL


@dataclass(frozen=True)
class TaskData:
    """A task's splits; `labels` are the classes of a classification task, and `prompt_format`
    renders them (and an input text) as the model sees them."""

    name: str
    train: tuple[Example, ...]
    test: tuple[Example, ...]
    labels: tuple[str, ...] | None = None
    prompt_format: PromptFormat = field(default_factory=PromptFormat)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise InvalidDataset(field="name", reason="task name must be a non-empty string")
        if self.labels is not None:
            if not self.labels:
                raise InvalidDataset(field="labels", reason="must be non-empty or null")
            if len(set(self.labels)) != len(self.labels):
                raise InvalidDataset(field="labels", reason="labels must be unique")


def format_prompt(*, instruction: str, text: str) -> str:
    """The fixed prompt template: instruction, the input text, then the answer cue."""
    return instruction_format(instruction).render_prompt(text)


def label_of(example: Example) -> str:
    """The label a classification completion encodes (whitespace around it is the template's)."""
    return example.completion.strip()

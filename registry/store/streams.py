"""Streams and their base snapshots."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from registry.entities import (
    Job,
    JobKind,
    NodeKind,
    Relation,
    Snapshot,
    Stream,
    StreamState,
)
from registry.errors import AlreadyExists, Conflict, InvalidReference, NotFound
from registry.store import _convert as convert
from registry.store._db import Database, add_edges, lock, ref
from registry.store._deletion import delete_stream, restore_stream
from registry.store.jobs import insert_job
from registry.store.webhooks import emit
from registry.tables import (
    AdapterVersionRow,
    JobRow,
    LineageEdgeRow,
    SnapshotAliasRow,
    SnapshotRow,
    StreamRow,
    utcnow,
)
from registry.validation import check_digest, check_name

CURRENT = "current"
NAME_LENGTH = 64  # streams.name is a VARCHAR(64)


class SqlStreamStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    # -- streams --------------------------------------------------------------------------------
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
    ) -> Stream:
        """Create a stream; with `base_digest` (a stored tree) its snapshot v0 comes in the same
        transaction, so a stream never exists half-imported. A stream whose import failed gives
        its name up (`_take_name`)."""
        check_name(name, field="name")
        if base_digest is not None:
            check_digest(base_digest, field="base_digest")
        with self._db.tx() as s:
            row = _insert_stream(
                s, name=name, base_source=base_source, method=method, hyperparams=hyperparams,
                method_options=method_options, consolidation=consolidation,
                state=StreamState.READY,
            )  # fmt: skip
            if base_digest is not None:
                _add_base(s, row, artifact_digest=base_digest, job_id=None)
            return convert.stream(row)

    def begin_import(
        self,
        *,
        name: str,
        base_source: dict[str, Any],
        method: str,
        hyperparams: dict[str, Any],
        method_options: dict[str, Any] | None = None,
        consolidation: dict[str, Any] | None = None,
    ) -> tuple[Stream, Job]:
        """Create a stream in state `importing` and the import job that will store its base
        model as snapshot v0 (`finish_import`), in one transaction. Jobs submitted to the
        stream meanwhile queue behind the import."""
        check_name(name, field="name")
        with self._db.tx() as s:
            row = _insert_stream(
                s, name=name, base_source=base_source, method=method, hyperparams=hyperparams,
                method_options=method_options, consolidation=consolidation,
                state=StreamState.IMPORTING,
            )  # fmt: skip
            job = insert_job(s, kind=JobKind.IMPORT, stream_id=row.id, task_id=None, params={})
            return convert.stream(row), convert.job(job)

    def finish_import(self, *, stream_id: int, artifact_digest: str, job_id: int) -> Snapshot:
        """Register the imported base (a stored tree) as snapshot v0, produced by the import job,
        and make the stream ready, in one transaction. A re-run of the job finds the stream
        ready and gets its snapshot v0."""
        check_digest(artifact_digest, field="artifact_digest")
        with self._db.tx() as s:
            row = _stream_row(s, stream_id, for_update=True)
            if row.state == StreamState.READY.value:
                v0 = s.scalar(
                    select(SnapshotRow).where(
                        SnapshotRow.stream_id == stream_id, SnapshotRow.version == 0
                    )
                )
                if v0 is not None:
                    return _with_folds(s, v0)
            if row.state != StreamState.IMPORTING.value:
                raise Conflict(f"stream '{row.name}' is {row.state}, not importing", field="stream")
            if s.get(JobRow, job_id) is None:
                raise InvalidReference(f"job {job_id} does not exist", field="job_id")
            snap = _add_base(s, row, artifact_digest=artifact_digest, job_id=job_id)
            row.state = StreamState.READY.value
            _created(s, row, snap)
            return _with_folds(s, snap)

    def get(self, name: str) -> Stream:
        check_name(name, field="stream")  # what cannot be a name is refused before the query
        with self._db.tx() as s:
            row = s.scalar(
                select(StreamRow).where(StreamRow.name == name, StreamRow.deleted_at.is_(None))
            )
            if row is None:
                raise NotFound(f"stream '{name}' not found", field="stream")
            return convert.stream(row)

    def get_by_id(self, stream_id: int) -> Stream:
        with self._db.tx() as s:
            return convert.stream(_stream_row(s, stream_id))

    def list_streams(self, *, limit: int = 100, after_id: int = 0) -> list[Stream]:
        with self._db.tx() as s:
            rows = s.scalars(
                select(StreamRow)
                .where(StreamRow.deleted_at.is_(None), StreamRow.id > after_id)
                .order_by(StreamRow.id)
                .limit(limit)
            )
            return [convert.stream(r) for r in rows]

    def set_consolidation(self, stream_id: int, policy: dict[str, Any]) -> Stream:
        """Replace the stream's consolidation policy (validated by the caller)."""
        with self._db.tx() as s:
            row = _stream_row(s, stream_id, for_update=True)
            row.consolidation = dict(policy)
            return convert.stream(row)

    def delete(self, stream_id: int) -> Stream:
        """Soft-delete the stream (`registry.store._deletion.delete_stream`)."""
        with self._db.tx() as s:
            return delete_stream(s, stream_id)

    def restore(self, name: str, *, retention_days: float) -> Stream:
        """The newest stream deleted under `name` within `retention_days`, live again."""
        with self._db.tx() as s:
            return restore_stream(s, name, retention_days=retention_days)

    def set_promotion(self, stream_id: int, gate: dict[str, Any]) -> Stream:
        """Replace the stream's promotion gate (validated by the caller; {}: the defaults)."""
        with self._db.tx() as s:
            row = _stream_row(s, stream_id, for_update=True)
            row.promotion = dict(gate)
            return convert.stream(row)

    # -- snapshots ------------------------------------------------------------------------------
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
    ) -> Snapshot:
        """Register a new snapshot version (the blob must already be stored)."""
        check_digest(artifact_digest, field="artifact_digest")

        def attempt(s: Session) -> Snapshot:
            _stream_row(s, stream_id, for_update=True)
            _check_refs(s, stream_id, parent_id, folded_adapter_ids, job_id)
            version = s.scalar(
                select(func.coalesce(func.max(SnapshotRow.version) + 1, 0)).where(
                    SnapshotRow.stream_id == stream_id
                )
            )
            row = SnapshotRow(
                stream_id=stream_id,
                version=version,
                parent_id=parent_id,
                artifact_digest=artifact_digest,
                source=source,
                job_id=job_id,
            )
            s.add(row)
            s.flush()
            parents = [(ref(NodeKind.ADAPTER, a), Relation.FOLDS) for a in folded_adapter_ids]
            if parent_id is not None:
                parents.append((ref(NodeKind.SNAPSHOT, parent_id), Relation.DERIVED_FROM))
            if job_id is not None:
                parents.append((ref(NodeKind.JOB, job_id), Relation.PRODUCED_BY))
            add_edges(s, ref(NodeKind.SNAPSHOT, row.id), parents)
            if make_current:
                _move_alias(s, stream_id, CURRENT, row.id)
            _created(s, s.get_one(StreamRow, stream_id), row)
            return convert.snapshot(row, tuple(folded_adapter_ids))

        return self._db.allocate(attempt, what="a snapshot version")

    def get_snapshot(self, *, stream_id: int, version: int) -> Snapshot:
        with self._db.tx() as s:
            row = s.scalar(
                select(SnapshotRow).where(
                    SnapshotRow.stream_id == stream_id, SnapshotRow.version == version
                )
            )
            if row is None:
                raise NotFound(f"snapshot v{version} not found", field="version")
            return _with_folds(s, row)

    def get_snapshot_by_id(self, snapshot_id: int) -> Snapshot:
        with self._db.tx() as s:
            row = s.get(SnapshotRow, snapshot_id)
            if row is None:
                raise NotFound(f"snapshot {snapshot_id} not found", field="snapshot")
            return _with_folds(s, row)

    def list_snapshots(self, stream_id: int) -> list[Snapshot]:
        with self._db.tx() as s:
            rows = s.scalars(
                select(SnapshotRow)
                .where(SnapshotRow.stream_id == stream_id)
                .order_by(SnapshotRow.version)
            )
            return [_with_folds(s, r) for r in rows]

    def current_snapshot(self, stream_id: int) -> Snapshot:
        with self._db.tx() as s:
            alias = s.scalar(
                select(SnapshotAliasRow).where(
                    SnapshotAliasRow.stream_id == stream_id, SnapshotAliasRow.alias == CURRENT
                )
            )
            if alias is None:
                raise NotFound("stream has no base snapshot yet", field="snapshot")
            return _with_folds(s, s.get_one(SnapshotRow, alias.snapshot_id))

    def set_current_snapshot(self, *, stream_id: int, snapshot_id: int) -> Snapshot:
        """Point the stream at one of its snapshots (e.g. a rollback); nothing is deleted."""
        with self._db.tx() as s:
            row = s.get(SnapshotRow, snapshot_id)
            if row is None or row.stream_id != stream_id:
                raise InvalidReference(
                    f"snapshot {snapshot_id} does not belong to this stream", field="snapshot"
                )
            _move_alias(s, stream_id, CURRENT, snapshot_id)
            return _with_folds(s, row)


def _stream_row(s: Session, stream_id: int, *, for_update: bool = False) -> StreamRow:
    row = lock(s, StreamRow, stream_id) if for_update else s.get(StreamRow, stream_id)
    if row is None or row.deleted_at is not None:
        raise NotFound(f"stream {stream_id} not found", field="stream")
    return row


def _insert_stream(
    s: Session,
    *,
    name: str,
    base_source: dict[str, Any],
    method: str,
    hyperparams: dict[str, Any],
    method_options: dict[str, Any] | None,
    consolidation: dict[str, Any] | None,
    state: StreamState,
) -> StreamRow:
    """A new stream's row under `name` (taken from a failed stream, `_take_name`), flushed."""
    _take_name(s, name)
    row = StreamRow(
        name=name, base_source=base_source, method=method, hyperparams=hyperparams,
        method_options=dict(method_options or {}), consolidation=dict(consolidation or {}),
        state=state.value,
    )  # fmt: skip
    s.add(row)
    s.flush()
    return row


def _take_name(s: Session, name: str) -> None:
    """Free `name` for a new stream: AlreadyExists if a stream has it, unless that stream's
    import failed; that one is soft-deleted and renamed `<name>~<id>` (its jobs keep it)."""
    row = s.scalar(select(StreamRow).where(StreamRow.name == name))
    if row is None:
        return
    row = lock(s, StreamRow, row.id)  # its import may be failing right now
    if row.state != StreamState.FAILED.value:
        raise AlreadyExists(f"stream '{name}' already exists", field="name")
    suffix = f"~{row.id}"
    row.name = name[: NAME_LENGTH - len(suffix)] + suffix
    row.deleted_at = utcnow()
    s.flush()  # the name is free before the new row is inserted


def _add_base(
    s: Session, stream: StreamRow, *, artifact_digest: str, job_id: int | None
) -> SnapshotRow:
    """Snapshot v0 of `stream`: its imported base model, made current."""
    snap = SnapshotRow(
        stream_id=stream.id, version=0, artifact_digest=artifact_digest,
        source={"imported": stream.base_source}, job_id=job_id,
    )  # fmt: skip
    s.add(snap)
    s.flush()
    if job_id is not None:
        add_edges(
            s, ref(NodeKind.SNAPSHOT, snap.id), [(ref(NodeKind.JOB, job_id), Relation.PRODUCED_BY)]
        )
    _move_alias(s, stream.id, CURRENT, snap.id)
    return snap


def _check_refs(
    s: Session,
    stream_id: int,
    parent_id: int | None,
    folded: Sequence[int],
    job_id: int | None,
) -> None:
    if parent_id is not None:
        parent = s.get(SnapshotRow, parent_id)
        if parent is None or parent.stream_id != stream_id:
            raise InvalidReference(
                f"parent snapshot {parent_id} does not belong to this stream", field="parent_id"
            )
    for adapter_id in folded:
        row = s.get(AdapterVersionRow, adapter_id)
        if row is None or row.stream_id != stream_id:
            raise InvalidReference(
                f"adapter version {adapter_id} does not belong to this stream",
                field="folded_adapter_ids",
            )
    if job_id is not None and s.get(JobRow, job_id) is None:
        raise InvalidReference(f"job {job_id} does not exist", field="job_id")


def _move_alias(s: Session, stream_id: int, alias: str, snapshot_id: int) -> None:
    row = s.scalar(
        select(SnapshotAliasRow).where(
            SnapshotAliasRow.stream_id == stream_id, SnapshotAliasRow.alias == alias
        )
    )
    if row is None:
        s.add(SnapshotAliasRow(stream_id=stream_id, alias=alias, snapshot_id=snapshot_id))
    else:
        row.snapshot_id = snapshot_id
        row.updated_at = utcnow()


def _with_folds(s: Session, row: SnapshotRow) -> Snapshot:
    folded = s.scalars(
        select(LineageEdgeRow.parent_id)
        .where(
            LineageEdgeRow.child_kind == NodeKind.SNAPSHOT.value,
            LineageEdgeRow.child_id == row.id,
            LineageEdgeRow.relation == Relation.FOLDS.value,
        )
        .order_by(LineageEdgeRow.parent_id)
    )
    return convert.snapshot(row, tuple(folded))


def _created(s: Session, stream: StreamRow, snap: SnapshotRow) -> None:
    """The `snapshot.created` webhook event, in the transaction that adds the snapshot."""
    emit(s, "snapshot.created", {
        "stream": stream.name, "snapshot": {"id": snap.id, "version": snap.version,
                                            "artifact_digest": snap.artifact_digest},
    })  # fmt: skip

"""Adapters: list per stream and task, get by version or alias, download as a PEFT directory
archive, set and delete aliases. Snapshots: list, get, download."""

from __future__ import annotations

from collections.abc import AsyncIterator, Generator
from datetime import datetime
from typing import Annotated, Literal
from urllib.parse import quote

import anyio
import anyio.to_thread
from fastapi import APIRouter, Query
from fastapi.responses import StreamingResponse

from api.deps import Cursor, InstDep, ReadToken, StreamDep, VersionPath, WriteToken
from api.schemas import (
    AdapterVersionPublic,
    AdapterVersionsPublic,
    AliasSet,
    SnapshotPublic,
    SnapshotsPublic,
)
from registry.entities import AdapterVersion, Snapshot, Stream
from registry.errors import Conflict, InvalidValue
from registry.instance import Instance
from services.archives import MEDIA_TYPES, ArchiveFormat, tree_archive

router = APIRouter(tags=["adapters"])

FormatQuery = Annotated[
    ArchiveFormat,
    Query(description="`tar` (the default: streamed with its length) or `tar.gz` (weights "
          "barely compress, and compressing limits the download to about 20 MB/s)"),
]  # fmt: skip
_ARCHIVE_RESPONSES: dict[int | str, dict[str, object]] = {
    200: {"content": {media_type: {} for media_type in MEDIA_TYPES.values()}}
}


def _ref(ref: str) -> int | str:
    return int(ref) if ref.isdigit() else ref


def resolve_version(inst: Instance, stream: Stream, task: str, ref: str) -> AdapterVersion:
    """A task's adapter version by number, alias or `latest` (NotFound otherwise)."""
    task_id = inst.registry.tasks.get(stream_id=stream.id, name=task).id
    return inst.registry.adapters.get(task_id=task_id, ref_=_ref(ref))


@router.get("/streams/{stream}/adapters", response_model=AdapterVersionsPublic)
def list_adapters(
    stream: StreamDep,
    inst: InstDep,
    _: ReadToken,
    task: Annotated[str | None, Query(description="Only this task's versions")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    cursor: Cursor = 0,
    tag: Annotated[
        list[str] | None, Query(description="key:value; repeat it for versions with every one")
    ] = None,
    min_accuracy: Annotated[
        float | None, Query(ge=0, le=1, description="metrics.accuracy at least this (0-1)")
    ] = None,
    order_by: Annotated[
        Literal["id", "accuracy"], Query(description="id (oldest first) or accuracy (best first)")
    ] = "id",
) -> object:
    """The stream's adapter versions, a page at a time; with `tag`, `min_accuracy` or
    `order_by=accuracy`, a search whose first `limit` matches are the one page."""
    task_id = inst.registry.tasks.get(stream_id=stream.id, name=task).id if task else None
    tags: dict[str, str] = {}
    for pair in tag or []:
        key, colon, value = pair.partition(":")
        if not colon or not key:
            raise InvalidValue(f"expects key:value, got {pair!r}", field="tag")
        tags[key] = value
    page = inst.registry.adapters.list_versions(
        stream_id=stream.id, task_id=task_id, limit=limit, after_id=cursor, tags=tags,
        min_accuracy=min_accuracy, order_by=order_by,
    )  # fmt: skip
    search = bool(tags) or min_accuracy is not None or order_by != "id"
    more = len(page) == limit and not search
    return {"data": page, "next_cursor": page[-1].id if more else None}


@router.put(
    "/streams/{stream}/tasks/{task}/adapters/{ref}/tags", response_model=AdapterVersionPublic
)
def set_tags(
    stream: StreamDep, task: str, ref: str, body: dict[str, str], inst: InstDep, _: WriteToken
) -> object:
    """Replace the version's tags with `body`, an object of names to strings (an empty
    object clears them)."""
    version = resolve_version(inst, stream, task, ref)
    return inst.registry.adapters.set_tags(version.id, body)


@router.get("/streams/{stream}/tasks/{task}/adapters/{ref}", response_model=AdapterVersionPublic)
def get_adapter(stream: StreamDep, task: str, ref: str, inst: InstDep, _: ReadToken) -> object:
    """`ref`: a version number, an alias, or `latest`."""
    return resolve_version(inst, stream, task, ref)


@router.get(
    "/streams/{stream}/tasks/{task}/adapters/{ref}/download",
    response_class=StreamingResponse,
    responses=_ARCHIVE_RESPONSES,
)
def download_adapter(
    stream: StreamDep, task: str, ref: str, inst: InstDep, _: ReadToken, format: FormatQuery = "tar"
) -> StreamingResponse:
    """The adapter as a tar archive of a PEFT directory (`PeftModel.from_pretrained` loads it)."""
    version = resolve_version(inst, stream, task, ref)
    if version.artifact_digest is None:
        raise Conflict(f"adapter version {version.version} is {version.status}", field="ref")
    name = f"{stream.name}-{task}-v{version.version}"
    return _archive_response(inst, version.artifact_digest, name, format, version.created_at)


@router.delete(
    "/streams/{stream}/tasks/{task}/adapters/{version}", response_model=AdapterVersionPublic
)
def delete_adapter(
    stream: StreamDep, task: str, version: VersionPath, inst: InstDep, _: WriteToken
) -> object:
    """Soft-delete a version: 404 afterwards (`latest` moves to the newest live one); 409 while
    an alias (`production` included) points at it or a job of the stream runs. `POST
    .../adapters/{version}/restore` brings it back within STRATA_RETENTION_DAYS."""
    return inst.registry.adapters.delete(resolve_version(inst, stream, task, str(version)).id)


@router.post(
    "/streams/{stream}/tasks/{task}/adapters/{version}/restore",
    response_model=AdapterVersionPublic,
)
def restore_adapter(
    stream: StreamDep, task: str, version: VersionPath, inst: InstDep, _: WriteToken
) -> object:
    task_id = inst.registry.tasks.get(stream_id=stream.id, name=task).id
    return inst.registry.adapters.restore(
        task_id=task_id, version=version, retention_days=inst.settings.retention_days
    )


@router.put("/streams/{stream}/tasks/{task}/aliases/{alias}", response_model=AdapterVersionPublic)
def set_alias(
    stream: StreamDep, task: str, alias: str, body: AliasSet, inst: InstDep, _: WriteToken
) -> object:
    """Point `alias` at a version (moving it if it exists)."""
    version = resolve_version(inst, stream, task, str(body.version))
    return inst.registry.adapters.set_alias(
        task_id=version.task_id, alias=alias, version_id=version.id
    )


@router.delete("/streams/{stream}/tasks/{task}/aliases/{alias}", status_code=204)
def delete_alias(stream: StreamDep, task: str, alias: str, inst: InstDep, _: WriteToken) -> None:
    task_id = inst.registry.tasks.get(stream_id=stream.id, name=task).id
    inst.registry.adapters.delete_alias(task_id=task_id, alias=alias)


def _snapshot_public(snapshot: Snapshot, current: Snapshot) -> SnapshotPublic:
    out = SnapshotPublic.model_validate(snapshot)
    out.current = snapshot.id == current.id
    return out


@router.get("/streams/{stream}/snapshots", response_model=SnapshotsPublic, tags=["snapshots"])
def list_snapshots(stream: StreamDep, inst: InstDep, _: ReadToken) -> object:
    snapshots = inst.registry.streams.list_snapshots(stream.id)
    if not snapshots:  # an importing (or failed) stream: snapshot v0 is not there yet
        return {"data": [], "count": 0}
    current = inst.registry.streams.current_snapshot(stream.id)
    data = [_snapshot_public(s, current) for s in snapshots]
    return {"data": data, "count": len(data)}


@router.get(
    "/streams/{stream}/snapshots/{version}", response_model=SnapshotPublic, tags=["snapshots"]
)
def get_snapshot(stream: StreamDep, version: VersionPath, inst: InstDep, _: ReadToken) -> object:
    snapshot = inst.registry.streams.get_snapshot(stream_id=stream.id, version=version)
    return _snapshot_public(snapshot, inst.registry.streams.current_snapshot(stream.id))


@router.post(
    "/streams/{stream}/snapshots/{version}/activate",
    response_model=SnapshotPublic,
    tags=["snapshots"],
)
def activate_snapshot(
    stream: StreamDep, version: VersionPath, inst: InstDep, _: WriteToken
) -> object:
    """Point the stream at this snapshot (e.g. roll back a consolidation): later tasks train on
    it, with the adapters trained on it. Nothing is deleted; the lineage keeps every snapshot."""
    snapshot = inst.registry.streams.get_snapshot(stream_id=stream.id, version=version)
    moved = inst.registry.streams.set_current_snapshot(stream_id=stream.id, snapshot_id=snapshot.id)
    return _snapshot_public(moved, moved)


@router.get(
    "/streams/{stream}/snapshots/{version}/download",
    response_class=StreamingResponse,
    responses=_ARCHIVE_RESPONSES,
    tags=["snapshots"],
)
def download_snapshot(
    stream: StreamDep,
    version: VersionPath,
    inst: InstDep,
    _: ReadToken,
    format: FormatQuery = "tar",
) -> StreamingResponse:
    """The base model snapshot as a tar archive of a Hugging Face model directory."""
    snapshot = inst.registry.streams.get_snapshot(stream_id=stream.id, version=version)
    name = f"{stream.name}-snapshot-v{snapshot.version}"
    return _archive_response(inst, snapshot.artifact_digest, name, format, snapshot.created_at)


def _archive_response(
    inst: Instance, digest: str, name: str, format: ArchiveFormat, created: datetime
) -> StreamingResponse:
    """The archive streamed as it is produced; a plain tar announces its exact length. Its files
    are dated when the version was made, so the same version is always the same bytes."""
    archive = tree_archive(inst, digest, name=name, format=format, mtime=int(created.timestamp()))
    quoted = quote(archive.filename)  # as FileResponse does: the plain form when it is safe
    disposition = (f'attachment; filename="{archive.filename}"' if quoted == archive.filename
                   else f"attachment; filename*=utf-8''{quoted}")  # fmt: skip
    headers = {"Content-Disposition": disposition}
    if archive.size is not None:
        headers["Content-Length"] = str(archive.size)
    return StreamingResponse(
        _on_threads(archive.chunks()), media_type=archive.media_type, headers=headers
    )


async def _on_threads(chunks: Generator[bytes]) -> AsyncIterator[bytes]:
    """Each chunk produced on the threadpool, and the generator closed there, also when the
    client goes away. StreamingResponse does not close a plain iterator then, and a fetch under
    way would wait for its reader forever (`test_a_client_that_goes_away_stops_the_fetch...`)."""
    try:
        while (chunk := await anyio.to_thread.run_sync(next, chunks, None)) is not None:
            yield chunk
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(chunks.close)

"""The stream store: streams created, read and listed with their names checked, and snapshots
versioned with the current one moved back and forth; on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest

from registry.errors import AlreadyExists, InvalidReference, InvalidValue, NotFound
from registry.store import SqlRegistry
from tests.registry.store.helpers import D2, _stream


def test_streams_create_get_list_and_errors(registry: SqlRegistry) -> None:
    created = registry.streams.create(
        name="news", base_source={"kind": "tiny"}, method="seq-lora", hyperparams={"rank": 8}
    )
    assert registry.streams.get("news") == created
    assert registry.streams.get_by_id(created.id).hyperparams == {"rank": 8}
    assert [s.name for s in registry.streams.list_streams()] == ["news"]
    with pytest.raises(AlreadyExists) as exc:
        registry.streams.create(name="news", base_source={}, method="seq-lora", hyperparams={})
    assert exc.value.field == "name"
    for bad in ["", "../x", "a/b", "x" * 65, "bad\nname", "trailing\n", "-lead", 7]:
        with pytest.raises(InvalidValue):
            registry.streams.create(name=bad, base_source={}, method="m", hyperparams={})  # type: ignore[arg-type]
    with pytest.raises(NotFound) as nf:
        registry.streams.get("missing")
    assert nf.value.field == "stream"
    assert len(registry.streams.list_streams()) == 1  # nothing half-written by the failures


def test_snapshots_are_versioned_and_current_moves(registry: SqlRegistry) -> None:
    stream_id, v0 = _stream(registry)
    v1 = registry.streams.add_snapshot(
        stream_id=stream_id, artifact_digest=D2, source={}, parent_id=v0
    )
    assert [s.version for s in registry.streams.list_snapshots(stream_id)] == [0, 1]
    assert registry.streams.current_snapshot(stream_id).id == v1.id
    rolled = registry.streams.set_current_snapshot(stream_id=stream_id, snapshot_id=v0)
    assert rolled.version == 0 and registry.streams.current_snapshot(stream_id).id == v0
    assert len(registry.streams.list_snapshots(stream_id)) == 2  # rollback deletes nothing
    _other, other_snap = _stream(registry, "s2")
    with pytest.raises(InvalidReference):
        registry.streams.add_snapshot(
            stream_id=stream_id, artifact_digest=D2, source={}, parent_id=other_snap
        )
    with pytest.raises(InvalidReference):
        registry.streams.set_current_snapshot(stream_id=stream_id, snapshot_id=other_snap)
    with pytest.raises(InvalidValue):
        registry.streams.add_snapshot(stream_id=stream_id, artifact_digest="nothex", source={})
    with pytest.raises(NotFound):
        registry.streams.add_snapshot(stream_id=999, artifact_digest=D2, source={})
    assert len(registry.streams.list_snapshots(stream_id)) == 2

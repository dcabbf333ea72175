"""Garbage collection against both deployments (SQLite + directory, PostgreSQL + S3): what is
removed, what is kept, and uploads that run while it does."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import update

from registry.artifacts import get_tree, put_tree
from registry.instance import Instance
from registry.store import SqlRegistry
from registry.tables import StreamRow
from services.gc import collect_garbage, maybe_collect


def _tree(inst: Instance, tmp: Path, content: bytes) -> str:
    d = tmp / hashlib.sha256(content).hexdigest()[:12]
    d.mkdir()
    (d / "config.json").write_bytes(b'{"v": "%s"}' % content.hex().encode())
    (d / "notes.txt").write_bytes(content)
    return put_tree(inst.artifacts, d)


def _stream(inst: Instance, name: str, tree: str) -> int:
    stream = inst.registry.streams.create(name=name, base_source={"kind": "tiny"},
                                          method="seq-lora", hyperparams={})  # fmt: skip
    inst.registry.streams.add_snapshot(stream_id=stream.id, artifact_digest=tree, source={})
    return stream.id


def _stored(inst: Instance) -> set[str]:
    return {b.digest for b in inst.artifacts.list_blobs()}


def _files(inst: Instance, tree: str, tmp: Path) -> set[str]:
    """The tree's manifest and file digests (fetching it checks every file)."""
    dest = get_tree(inst.artifacts, tree, tmp / f"fetched-{tree[:8]}")
    return {tree} | {hashlib.sha256(p.read_bytes()).hexdigest() for p in dest.iterdir()}


def test_unreferenced_blobs_go_and_referenced_ones_stay(instance: Instance, tmp_path: Path) -> None:
    live = _tree(instance, tmp_path, b"live snapshot")
    stream_id = _stream(instance, "s", live)
    dataset = instance.artifacts.put_bytes(b'{"prompt": "x", "completion": "y"}\n')
    row = instance.registry.tasks.add_dataset(digest=dataset, format="jsonl", num_train=1,
                                              num_test=0, size_bytes=10)  # fmt: skip
    instance.registry.tasks.submit(stream_id=stream_id, name="t", dataset_id=row.id)
    orphan = _tree(instance, tmp_path, b"a tree no row names")
    stray = instance.artifacts.put_bytes(b"a blob no row names")
    keep = _files(instance, live, tmp_path) | {dataset}
    garbage = _files(instance, orphan, tmp_path) | {stray}
    assert _stored(instance) == keep | garbage

    dry = collect_garbage(instance, grace_s=0, dry_run=True)
    assert (dry.removed, dry.referenced) == (len(garbage), len(keep))
    assert _stored(instance) == keep | garbage  # a dry run changes nothing

    recent = collect_garbage(instance, grace_s=3600)  # everything is younger than an hour
    assert (recent.removed, recent.recent) == (0, len(garbage))

    report = collect_garbage(instance, grace_s=0)
    assert report.removed == len(garbage) and report.removed_bytes > 0
    assert _stored(instance) == keep
    assert _files(instance, live, tmp_path / "again") == keep - {dataset}  # still whole


def test_an_expired_stream_is_purged_then_its_blobs(instance: Instance, tmp_path: Path) -> None:
    kept_tree = _tree(instance, tmp_path, b"kept")
    gone_tree = _tree(instance, tmp_path, b"deleted")
    _stream(instance, "kept", kept_tree)
    gone = _stream(instance, "gone", gone_tree)
    instance.registry.streams.delete(gone)

    collect_garbage(instance, grace_s=0, retention_days=7)  # deleted today: restorable
    assert gone_tree in _stored(instance)

    assert isinstance(instance.registry, SqlRegistry)
    with instance.registry.engine.begin() as c:
        c.execute(update(StreamRow).where(StreamRow.id == gone)
                  .values(deleted_at=datetime.now(UTC) - timedelta(days=8)))  # fmt: skip
    report = collect_garbage(instance, grace_s=0, retention_days=7)

    assert report.purged.streams == ["gone"]
    assert gone_tree not in _stored(instance)
    assert _stored(instance) == _files(instance, kept_tree, tmp_path)


def test_uploads_while_gc_runs_keep_every_blob_they_reference(
    instance: Instance, tmp_path: Path
) -> None:
    """Writers store trees and then register them, as jobs do; half of them store content that
    is garbage already (old, unreferenced: gc's candidates), so their put writes nothing and only
    renews the blob. Meanwhile gc runs again and again with a short grace period. Afterwards
    every registered tree is whole, and the garbage nobody stored again is gone."""
    old = [_tree(instance, tmp_path, b"old %d" % i) for i in range(12)]
    untouched = _files(instance, old[0], tmp_path)  # no writer stores old 0 again
    time.sleep(2.5)  # older than the grace period below
    registered: list[str] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def writer(first: int) -> None:
        try:
            for i in range(first, 12, 2):  # 1, 3, ... 11 and 2, 4, ... 10: not old 0
                tree = _tree(instance, tmp_path / f"w{i}", b"old %d" % i)  # gc's garbage ...
                fresh = _tree(instance, tmp_path / f"n{i}", os.urandom(16))  # ... and new content
                time.sleep(0.05)  # the job between storing and publishing
                for t in (tree, fresh):
                    _stream(instance, f"s{t[:10]}", t)
                    registered.append(t)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    def collector() -> None:
        try:
            while not stop.is_set():
                collect_garbage(instance, grace_s=2)
        except BaseException as exc:
            errors.append(exc)

    for i in range(12):
        (tmp_path / f"w{i}").mkdir()
        (tmp_path / f"n{i}").mkdir()
    gc = threading.Thread(target=collector)
    writers = [threading.Thread(target=writer, args=(k,)) for k in (1, 2)]
    gc.start()
    for w in writers:
        w.start()
    for w in writers:
        w.join()
    stop.set()
    gc.join()

    assert errors == []
    assert len(registered) == 22
    for tree in registered:  # whole: every file fetched and verified
        _files(instance, tree, tmp_path / "check")
    collect_garbage(instance, grace_s=2)
    assert not untouched & _stored(instance)


def test_the_scheduler_collects_once_per_interval(instance: Instance, tmp_path: Path) -> None:
    instance.settings = instance.settings.model_copy(update={"gc_interval_s": 3600.0,
                                                             "gc_grace_s": 0.0})  # fmt: skip
    stray = instance.artifacts.put_bytes(b"stray")

    first = maybe_collect(instance, holder="scheduler-a")
    second = maybe_collect(instance, holder="scheduler-b")  # another leader, same interval

    assert first is not None and first.removed == 1
    assert second is None
    assert stray not in _stored(instance)


def test_a_reuse_between_gcs_last_look_and_the_removal_waits_for_it(
    instance: Instance, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The narrowest race, made to happen: an upload reuses the blob after gc looked at its time
    and before gc removes it. The upload waits for gc's lease, finds the blob gone and writes it
    again (without the lease it would renew the blob, gc would remove it, and the upload's row
    would name a blob that is gone)."""
    data = b"content gc is about to remove"
    digest = instance.artifacts.put_bytes(data)
    time.sleep(1.05)  # S3 states times to the second
    cutoff = datetime.now(UTC)
    store = instance.artifacts
    real_modified = store._modified
    upload: list[threading.Thread] = []

    def look_then_let_an_upload_in(key: str) -> datetime | None:
        seen = real_modified(key)  # gc's last look: old
        upload.append(threading.Thread(target=store.put_bytes, args=(data,)))
        upload[0].start()
        upload[0].join(timeout=1.0)  # the upload runs now, if nothing stops it
        return seen

    monkeypatch.setattr(store, "_modified", look_then_let_an_upload_in)
    assert store.delete_unless_used_since(digest, cutoff) is True
    waited = upload[0].is_alive()
    upload[0].join()

    assert waited  # on gc's lease
    assert store.get_bytes(digest) == data  # written again by the upload

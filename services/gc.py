"""Garbage collection: rows past their retention are purged, then every blob that no live row
names (directly, or as a file of a tree a live row names) is removed.

Uploads run while gc does, and their rows commit after their blobs; gc never removes a blob such
an upload needs, by three rules:

1. It lists the store *before* it reads which blobs rows name, so a row committed before that
   read is seen, and a blob stored after the listing is not a candidate.
2. It keeps every blob written or reused within the grace period, `gc_grace_s` (a day by
   default), far longer than the seconds between an upload's blobs and its row. A put of
   content that is already stored writes nothing but renews the blob's time.
3. It removes a blob only under the blob's lease (`Instance` gives the store the registry's
   leases), after asking the store for the blob's time once more; a put that reuses the blob
   renews it under the same lease. So the renewal comes first and the blob stays, or the
   removal comes first and the put finds no blob and writes it again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from registry.artifacts import ArtifactStore, read_manifest
from registry.entities import Purged, References
from registry.errors import BlobNotFound
from registry.instance import Instance

log = logging.getLogger(__name__)

GC_LEASE = "gc"
NO_PURGE = Purged(streams=[], adapter_versions=0, datasets=0)


@dataclass(frozen=True)
class GcReport:
    purged: Purged
    blobs: int  # listed
    referenced: int  # of those, named by a live row
    recent: int  # not named, but used within the grace period: kept
    removed: int
    removed_bytes: int
    dry_run: bool

    def summary(self) -> str:
        verb = "would remove" if self.dry_run else "removed"
        p = self.purged
        return (
            f"{verb} {self.removed} of {self.blobs} blobs ({self.removed_bytes:,} bytes); "
            f"kept {self.referenced} referenced and {self.recent} recent; purged "
            f"{len(p.streams)} streams, {p.adapter_versions} adapter artifacts, "
            f"{p.datasets} datasets"
        )


def collect_garbage(
    inst: Instance,
    *,
    grace_s: float | None = None,
    retention_days: float | None = None,
    dry_run: bool = False,
    on_progress: Callable[[int, int], None] | None = None,
) -> GcReport:
    """Purge expired rows (not in a dry run), then remove unreferenced blobs older than the
    grace period; `on_progress(done, total)` after each blob looked at."""
    settings = inst.settings
    grace = settings.gc_grace_s if grace_s is None else grace_s
    retention = settings.retention_days if retention_days is None else retention_days
    purged = NO_PURGE if dry_run else inst.registry.gc.purge_expired(retention_days=retention)
    cutoff = datetime.now(UTC) - timedelta(seconds=grace)
    listed = list(inst.artifacts.list_blobs())  # rule 1: the listing first ...
    live = referenced_blobs(inst.artifacts, inst.registry.gc.references())  # ... then the rows
    referenced = recent = removed = removed_bytes = 0
    for done, blob in enumerate(listed, 1):
        if blob.digest in live:
            referenced += 1
        elif blob.modified >= cutoff:  # rule 2
            recent += 1
        elif dry_run or inst.artifacts.delete_unless_used_since(blob.digest, cutoff):  # rule 3
            removed += 1
            removed_bytes += blob.size
        else:
            recent += 1
        if on_progress:
            on_progress(done, len(listed))
    report = GcReport(purged, len(listed), referenced, recent, removed, removed_bytes, dry_run)
    log.info("garbage collection: %s", report.summary())
    return report


def referenced_blobs(store: ArtifactStore, refs: References) -> set[str]:
    """Every blob the rows name: plain blobs, tree manifests and each tree's files. A tree
    whose manifest is gone is logged and skipped (nothing can fetch it any more); any other
    failure to read one stops the collection before anything is removed."""
    live = set(refs.blobs)
    for tree in refs.trees:
        live.add(tree)
        try:
            manifest = read_manifest(store, tree)
        except BlobNotFound:
            log.warning("tree %s is named by the registry but not stored", tree)
            continue
        live.update(entry["digest"] for entry in manifest["files"].values())
    return live


def maybe_collect(inst: Instance, *, holder: str) -> GcReport | None:
    """The scheduler's gc: at most once per `gc_interval_s` across every scheduler process (a
    lease that lasts the interval and is never renewed or released)."""
    interval = inst.settings.gc_interval_s
    if interval <= 0:
        return None
    stamp = f"{holder}@{datetime.now(UTC).isoformat()}"
    if not inst.registry.leases.acquire(GC_LEASE, holder=stamp, ttl_s=interval):
        return None
    return collect_garbage(inst)

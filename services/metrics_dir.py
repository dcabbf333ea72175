"""prometheus_client's multiprocess mode: one directory of memory-mapped files shared by the
processes of one server (`strata api --workers N`) or of one Celery worker (its pool's
processes), read together at scrape time (`services.metrics.exposition`).

prometheus_client picks its storage when it is first imported, from `PROMETHEUS_MULTIPROC_DIR`:
`prepare` must run before anything imports it (this module does not). Each server or worker
needs a directory of its own: `prepare` removes what earlier runs left there.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

ENV = "PROMETHEUS_MULTIPROC_DIR"
_FILE = re.compile(r"^[a-z_]+_(\d+)\.db$")  # counter_123.db, gauge_livesum_123.db, ...


def multiprocess_dir() -> Path | None:
    """The directory of this process's multiprocess mode, or None when it is off."""
    path = os.environ.get(ENV)
    return Path(path) if path else None


def prepare(*, prefix: str) -> Path:
    """Turn multiprocess mode on for this process and the processes it starts: the directory
    `PROMETHEUS_MULTIPROC_DIR` names (created if missing, emptied of an earlier run's files),
    or a fresh temporary one (`prefix`...) when it is unset. Call it before prometheus_client
    is imported, and before the processes that share it start."""
    path = multiprocess_dir()
    if path is None:
        path = Path(tempfile.mkdtemp(prefix=prefix))
        os.environ[ENV] = str(path)
        return path
    path.mkdir(parents=True, exist_ok=True)
    stale = [p for p in path.iterdir() if _FILE.match(p.name)]
    for file in stale:
        file.unlink(missing_ok=True)
    if stale:
        log.info("removed %d metrics files of an earlier run from %s", len(stale), path)
    return path


def sweep_dead(path: Path) -> list[int]:
    """Mark the processes whose files are in `path` but that are gone as dead: their live
    gauges stop counting (their counters and histograms stay: totals never go down). Returns
    their ids."""
    from prometheus_client import multiprocess

    pids = {int(m.group(1)) for p in path.iterdir() if (m := _FILE.match(p.name))}
    dead = sorted(pid for pid in pids if not _alive(pid))
    for pid in dead:
        multiprocess.mark_process_dead(pid, str(path))
    return dead


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's: alive
        return True
    return True

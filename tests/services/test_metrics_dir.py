"""prometheus_client's multiprocess directory (`services.metrics_dir`): a fresh one when none is
given, an earlier run's files removed from a given one, and processes that are gone marked
dead (their live gauges dropped, their counters kept)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from services import metrics_dir


def test_prepare_makes_a_fresh_directory_or_empties_the_given_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(metrics_dir.ENV, raising=False)
    assert metrics_dir.multiprocess_dir() is None
    fresh = metrics_dir.prepare(prefix="strata-test-")
    try:
        assert fresh.is_dir() and fresh.name.startswith("strata-test-")
        assert os.environ[metrics_dir.ENV] == str(fresh) and not list(fresh.iterdir())
    finally:
        fresh.rmdir()
        del os.environ[metrics_dir.ENV]  # prepare's, which monkeypatch would not undo
    given = tmp_path / "metrics"
    given.mkdir()
    for name in ("counter_123.db", "histogram_9.db", "gauge_livesum_77.db", "notes.txt"):
        (given / name).write_bytes(b"x")
    monkeypatch.setenv(metrics_dir.ENV, str(given))
    assert metrics_dir.prepare(prefix="unused-") == given
    assert [p.name for p in given.iterdir()] == ["notes.txt"]  # only prometheus_client's files
    monkeypatch.setenv(metrics_dir.ENV, str(tmp_path / "new" / "dir"))
    assert metrics_dir.prepare(prefix="unused-").is_dir()  # created when missing


def test_sweep_marks_only_the_processes_that_are_gone(tmp_path: Path) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    alive = os.getpid()
    for pid in (gone.pid, alive):
        for name in (f"gauge_livesum_{pid}.db", f"counter_{pid}.db"):
            (tmp_path / name).write_bytes(b"x")
    assert metrics_dir.sweep_dead(tmp_path) == [gone.pid]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"counter_{gone.pid}.db", f"counter_{alive}.db", f"gauge_livesum_{alive}.db"]
    )

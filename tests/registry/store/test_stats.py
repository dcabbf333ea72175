"""The stats store: jobs counted by kind and state in one query, on SQLite and PostgreSQL."""

from __future__ import annotations

from sqlalchemy import event

from registry.entities import JobKind, JobState
from registry.store import SqlRegistry
from tests.registry.store.helpers import _stream_id as _stream
from tests.registry.store.helpers import _submit


def test_job_counts_by_kind_and_state_in_one_query(registry: SqlRegistry) -> None:
    assert registry.stats.job_counts() == {}
    stream = _stream(registry)
    queued = [_submit(registry, stream, name) for name in ("a", "b", "c")]
    registry.jobs.claim(queued[0], worker="w1")  # the stream's first job runs
    registry.jobs.transition(queued[0], JobState.FAILED, error_code="x", error_message="y")
    registry.jobs.create(kind=JobKind.CONSOLIDATE, stream_id=stream)
    statements: list[str] = []
    event.listen(registry.engine, "before_cursor_execute",
                 lambda *args: statements.append(args[2]))  # fmt: skip
    counts = registry.stats.job_counts()
    assert counts == {("train", "queued"): 2, ("train", "failed"): 1, ("consolidate", "queued"): 1}
    assert len(statements) == 1 and "GROUP BY" in statements[0]

"""Counts for monitoring (`/metrics`): one aggregate query each, cheap enough for every scrape."""

from __future__ import annotations

from sqlalchemy import func, select

from registry.store._db import Database
from registry.tables import JobRow


class SqlStatsStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    def job_counts(self) -> dict[tuple[str, str], int]:
        """How many jobs there are of each (kind, state) present, in one GROUP BY."""
        query = select(JobRow.kind, JobRow.state, func.count()).group_by(JobRow.kind, JobRow.state)
        with self._db.tx() as s:
            return {(kind, state): int(n) for kind, state, n in s.execute(query)}

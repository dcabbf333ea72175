"""The registry store: `open_registry(url)` gives a `Registry` on SQLite or PostgreSQL."""

from __future__ import annotations

from sqlalchemy import Engine

from registry.db import make_engine, migrate
from registry.store._db import Database
from registry.store.adapters import SqlAdapterStore
from registry.store.base import (
    AdapterStore,
    EvaluationStore,
    GcStore,
    JobStore,
    LeaseStore,
    LineageStore,
    Registry,
    ScheduleStore,
    StatsStore,
    StreamStore,
    TaskStore,
    TokenStore,
    WebhookStore,
)
from registry.store.evaluations import SqlEvaluationStore
from registry.store.gc import SqlGcStore
from registry.store.jobs import SqlJobStore
from registry.store.leases import SqlLeaseStore
from registry.store.lineage import SqlLineageStore
from registry.store.schedules import SqlScheduleStore
from registry.store.stats import SqlStatsStore
from registry.store.streams import SqlStreamStore
from registry.store.tasks import SqlTaskStore
from registry.store.tokens import SqlTokenStore
from registry.store.webhooks import SqlWebhookStore


class SqlRegistry:
    """The registry on any SQLAlchemy engine (SQLite embedded, PostgreSQL via psycopg 3)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        db = Database(engine)
        self.streams: StreamStore = SqlStreamStore(db)
        self.tasks: TaskStore = SqlTaskStore(db)
        self.adapters: AdapterStore = SqlAdapterStore(db)
        self.jobs: JobStore = SqlJobStore(db)
        self.evaluations: EvaluationStore = SqlEvaluationStore(db)
        self.lineage: LineageStore = SqlLineageStore(db)
        self.leases: LeaseStore = SqlLeaseStore(db)
        self.tokens: TokenStore = SqlTokenStore(db)
        self.schedules: ScheduleStore = SqlScheduleStore(db)
        self.webhooks: WebhookStore = SqlWebhookStore(db)
        self.gc: GcStore = SqlGcStore(db)
        self.stats: StatsStore = SqlStatsStore(db)

    def close(self) -> None:
        self.engine.dispose()


def open_registry(
    url: str, *, upgrade: bool = True, pool_size: int = 5, timeout_s: float | None = None
) -> SqlRegistry:
    """Open (and by default migrate to head) the registry database at `url`, keeping up to
    `pool_size` connections open (and 10 more while busy); `timeout_s` bounds a connect."""
    engine = make_engine(url, pool_size=pool_size, timeout_s=timeout_s)
    if upgrade:
        migrate(engine)
    return SqlRegistry(engine)


__all__ = [
    "AdapterStore",
    "EvaluationStore",
    "GcStore",
    "JobStore",
    "LeaseStore",
    "LineageStore",
    "Registry",
    "ScheduleStore",
    "SqlRegistry",
    "StatsStore",
    "StreamStore",
    "TaskStore",
    "TokenStore",
    "open_registry",
]

"""Transactions shared by the SQL stores."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from sqlalchemy import Engine, select, update
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session, sessionmaker

from registry.entities import NodeKind, NodeRef, Relation
from registry.errors import Conflict, Unavailable
from registry.tables import Base, LineageEdgeRow

T = TypeVar("T")

# Version numbers and positions are allocated as max+1 under a unique constraint, with the parent
# row locked (PostgreSQL) so writers to one parent queue up; should two still race, the insert
# fails on the constraint and we retry a bounded number of times with a little jitter.
ALLOCATION_RETRIES = 8
UNAVAILABLE = "the registry database is unavailable; retry shortly"
NOT_MIGRATED = "the registry database is not migrated: run `strata migrate`"


class Database:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._sessions = sessionmaker(engine, expire_on_commit=False)

    @contextmanager
    def tx(self) -> Iterator[Session]:
        """One transaction; a lost or refused connection surfaces as `Unavailable`."""
        try:
            with self._sessions.begin() as session:
                yield session
        except (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.ProgrammingError) as exc:
            if _is_missing_table(exc):
                raise Unavailable(NOT_MIGRATED) from exc
            if isinstance(exc, sa_exc.ProgrammingError) or not _is_disconnect(exc):
                raise
            raise Unavailable(UNAVAILABLE) from exc

    def allocate(self, attempt: Callable[[Session], T], *, what: str) -> T:
        """Run `attempt` in its own transaction, retrying when a unique constraint races."""
        for n in range(ALLOCATION_RETRIES):
            try:
                with self.tx() as session:
                    return attempt(session)
            except sa_exc.IntegrityError as exc:
                if not _is_unique_violation(exc):
                    raise
                time.sleep(random.uniform(0, 0.01 * 2**n))
        raise Conflict(f"could not allocate {what} after {ALLOCATION_RETRIES} attempts")


def _is_disconnect(exc: sa_exc.DBAPIError) -> bool:
    """Connection-level failures (server down, restarting, network), not bad SQL or locks."""
    if exc.connection_invalidated:
        return True
    text = str(exc.orig).lower()
    hints = ("connection", "server closed", "could not connect", "terminating", "shutting down")
    return any(h in text for h in hints) and "database is locked" not in text


def _is_missing_table(exc: sa_exc.DBAPIError) -> bool:
    """A table the schema should have is missing: the database was never migrated (SQLite's
    "no such table", PostgreSQL's undefined_table)."""
    if getattr(exc.orig, "sqlstate", None) == "42P01":
        return True
    return "no such table" in str(exc.orig).lower()


def _is_unique_violation(exc: sa_exc.IntegrityError) -> bool:
    text = str(exc.orig).lower()
    return "unique" in text or "duplicate key" in text


def add_edges(session: Session, child: NodeRef, parents: list[tuple[NodeRef, Relation]]) -> None:
    """Record `child -> parent` lineage edges, skipping ones already present."""
    for parent, relation in parents:
        exists = session.scalar(
            select(LineageEdgeRow.id).where(
                LineageEdgeRow.child_kind == child.kind.value,
                LineageEdgeRow.child_id == child.id,
                LineageEdgeRow.parent_kind == parent.kind.value,
                LineageEdgeRow.parent_id == parent.id,
                LineageEdgeRow.relation == relation.value,
            )
        )
        if exists is None:
            session.add(
                LineageEdgeRow(
                    child_kind=child.kind.value,
                    child_id=child.id,
                    parent_kind=parent.kind.value,
                    parent_id=parent.id,
                    relation=relation.value,
                )
            )


def lock(session: Session, table: type[Base], row_id: int) -> Any:
    """Fetch a parent row FOR NO KEY UPDATE, so writers to one parent queue up.

    SQLite has no row locks, and Python's driver begins a transaction only at the first write,
    so reads before it see no snapshot and two writers could both act on what they read. There
    a no-op UPDATE of the row takes the database's write lock first (waiting out the busy
    timeout), and the row is read again inside the transaction that now holds it."""
    if session.get_bind().dialect.name == "sqlite":
        pk = table.__mapper__.primary_key[0]
        session.execute(update(table).where(pk == row_id).values({pk.key: pk}))
        return session.get(table, row_id, populate_existing=True)
    return session.get(table, row_id, with_for_update={"key_share": True})


def ref(kind: NodeKind, id_: int) -> NodeRef:
    return NodeRef(kind=kind, id=id_)

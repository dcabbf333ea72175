"""Named leases: one holder at a time until the lease expires (see `tables.LeaseRow`).

The session helpers run inside a caller's transaction (a job claim takes its stream's lease in
the same transaction as the job's state change); `SqlLeaseStore` wraps them for callers that
only need the lease (the scheduler's leader election).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta

from sqlalchemy import delete, update
from sqlalchemy.orm import Session

from registry.errors import Unavailable
from registry.store._convert import aware
from registry.store._db import Database
from registry.tables import LeaseRow, utcnow


def take_lease(s: Session, *, name: str, holder: str, ttl_s: float, now: datetime) -> str | None:
    """Take or renew lease `name` for `holder`; returns None on success, else the current
    holder. Callers serialise on a parent row (or retry on the primary key) when they race."""
    row = s.get(LeaseRow, name, with_for_update=True)
    expires = now + timedelta(seconds=ttl_s)
    if row is None:
        s.add(LeaseRow(name=name, holder=holder, expires_at=expires))
        s.flush()
        return None
    if row.holder != holder and aware(row.expires_at) > now:
        return row.holder
    row.holder, row.expires_at = holder, expires
    return None


def renew_lease(s: Session, *, name: str, holder: str, ttl_s: float, now: datetime) -> bool:
    """Extend a lease `holder` still holds; False when it lost it."""
    done = s.execute(
        update(LeaseRow)
        .where(LeaseRow.name == name, LeaseRow.holder == holder)
        .values(expires_at=now + timedelta(seconds=ttl_s))
    )
    return bool(done.rowcount)  # type: ignore[attr-defined]


def release_lease(s: Session, *, name: str, holder: str) -> None:
    s.execute(delete(LeaseRow).where(LeaseRow.name == name, LeaseRow.holder == holder))


class SqlLeaseStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    def acquire(self, name: str, *, holder: str, ttl_s: float) -> bool:
        """Take or renew the lease; False while another holder's lease is unexpired."""

        def attempt(s: Session) -> bool:
            return take_lease(s, name=name, holder=holder, ttl_s=ttl_s, now=utcnow()) is None

        return self._db.allocate(attempt, what=f"lease {name!r}")

    def release(self, name: str, *, holder: str) -> None:
        with self._db.tx() as s:
            release_lease(s, name=name, holder=holder)

    @contextmanager
    def hold(self, name: str, *, ttl_s: float, wait_s: float) -> Iterator[None]:
        """Hold lease `name` for the block, waiting up to `wait_s` for another holder to let
        go (then `Unavailable`): a lock across processes for short critical sections."""
        holder = f"hold:{uuid.uuid4().hex}"
        deadline = time.monotonic() + wait_s
        delay = 0.005
        while not self.acquire(name, holder=holder, ttl_s=ttl_s):
            if time.monotonic() > deadline:
                raise Unavailable(f"lease {name!r} is held by another process; retry shortly")
            time.sleep(delay)
            delay = min(2 * delay, 0.2)
        try:
            yield
        finally:
            self.release(name, holder=holder)

    def holder(self, name: str) -> str | None:
        """The unexpired holder of `name`, if any."""
        with self._db.tx() as s:
            row = s.get(LeaseRow, name)
            if row is None or aware(row.expires_at) <= utcnow():
                return None
            return row.holder

"""The API's hottest reads, awaited on its event loop: token authentication (every request), job
status (every client polling its jobs) and job events (every progress stream, twice a second).

Through the stores, each read is an ORM session run on the threadpool: a thread hop, a session, a
ping on checkout, BEGIN, SELECT, COMMIT and the ORM's row loading, about 2 ms of CPU for the two
reads of a status request, which the threads take in turns on one GIL
(docs/notes/2026-11-23-api-status-reads.md). On PostgreSQL, `PgReads` runs them over psycopg's async
connection pool instead: one statement each on an autocommit connection, no thread hop. The
statements are compiled once from the tables the stores use, and the rows become entities through
the same functions (`_convert`, `tokens.admit`), so both paths give the same answers.
`ThreadedReads` runs the stores on the threadpool: SQLite (the embedded default) and any other
registry.

    reads = open_reads(registry, size=8)
    await reads.open()
    token = await reads.authenticate(secret)
    job = await reads.job(job_id)
    await reads.close()
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import math
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

import anyio.to_thread
import psycopg
from psycopg.rows import namedtuple_row
from psycopg_pool import AsyncConnectionPool, PoolTimeout
from sqlalchemy import bindparam, select, update
from sqlalchemy.dialects.postgresql.psycopg import dialect as psycopg_dialect
from sqlalchemy.sql import ClauseElement

from registry.entities import ApiToken, Job, JobEvent
from registry.errors import Unavailable
from registry.store import _convert as convert
from registry.store._db import NOT_MIGRATED, UNAVAILABLE
from registry.store.base import Registry
from registry.store.jobs import job_not_found
from registry.store.tokens import admit, hash_token, needs_touch
from registry.tables import ApiTokenRow, JobEventRow, JobRow, utcnow

# How long a read waits for a pooled connection before it is `Unavailable` (503 with a retry
# hint). The pool waits out a database that is down rather than failing at once, so this is how
# soon a client hears of an outage; a burst of requests queues for milliseconds, far less.
CHECKOUT_TIMEOUT_S = 1.0
# How long the pool keeps retrying a connection that failed before it gives up on it. Its
# retries back off (1 s, 2 s, 4 s...), so with psycopg_pool's default of 5 minutes a pool whose
# database had been down for a minute could wait most of another minute after it came back.
# Once the pool gives up, the next read that needs a connection starts a new attempt at once.
RECONNECT_TIMEOUT_S = 2.0

T = TypeVar("T")


class AsyncReads(Protocol):
    async def open(self) -> None: ...
    async def authenticate(self, secret: str) -> ApiToken: ...
    async def job(self, job_id: int) -> Job: ...
    async def events(
        self, job_id: int, *, after_id: int = 0, limit: int = 100
    ) -> list[JobEvent]: ...
    async def close(self) -> None: ...


def open_reads(registry: Registry, *, size: int, timeout_s: float = 5.0) -> AsyncReads:
    """`PgReads` with up to `size` connections when `registry` is on PostgreSQL (each read
    bounded by `timeout_s`), else the stores on the threadpool."""
    engine = getattr(registry, "engine", None)
    if engine is not None and engine.dialect.name == "postgresql":
        conninfo = engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
        return PgReads(conninfo, size=size, timeout_s=timeout_s)
    return ThreadedReads(registry)


class ThreadedReads:
    """The stores' own reads, each on the threadpool."""

    def __init__(self, registry: Registry) -> None:
        self._registry = registry

    async def open(self) -> None:
        pass

    async def authenticate(self, secret: str) -> ApiToken:
        return await anyio.to_thread.run_sync(self._registry.tokens.authenticate, secret)

    async def job(self, job_id: int) -> Job:
        return await anyio.to_thread.run_sync(self._registry.jobs.get, job_id)

    async def events(self, job_id: int, *, after_id: int = 0, limit: int = 100) -> list[JobEvent]:
        page = functools.partial(self._registry.jobs.events, job_id, after_id=after_id, limit=limit)
        return await anyio.to_thread.run_sync(page)

    async def close(self) -> None:
        pass


def _sql(statement: ClauseElement) -> str:
    """`statement` as psycopg's SQL text, with `%(name)s` placeholders."""
    return str(statement.compile(dialect=psycopg_dialect()))


_tokens = ApiTokenRow.__table__
_jobs = JobRow.__table__
_TOKEN_BY_DIGEST = _sql(select(_tokens).where(_tokens.c.token_hash == bindparam("digest")))
_TOUCH_TOKEN = _sql(
    update(ApiTokenRow)
    .where(ApiTokenRow.id == bindparam("token_id"))
    .values(last_used_at=bindparam("now"))
)
_JOB_BY_ID = _sql(select(_jobs).where(_jobs.c.id == bindparam("job_id")))
_JOB_EXISTS = _sql(select(_jobs.c.id).where(_jobs.c.id == bindparam("job_id")))
_events = JobEventRow.__table__
_EVENTS_AFTER = _sql(
    select(_events)
    .where(_events.c.job_id == bindparam("job_id"), _events.c.id > bindparam("after_id"))
    .order_by(_events.c.id)
    .limit(bindparam("limit"))
)


class PgReads:
    """The reads on PostgreSQL over an async pool of autocommit connections (a single
    statement needs no transaction of its own).

    A checkout is not pinged first, as the stores' engine does: the ping is a round trip per read,
    1.2x the reads per second without it (docs/notes/2026-11-23-api-status-reads.md). Instead a read
    that finds its connection broken (a database restart cuts every pooled connection) runs again on
    another, which is safe because each read is one idempotent statement; the pool drops the broken
    one. A database that cannot be reached is `Unavailable`."""

    def __init__(self, conninfo: str, *, size: int, timeout_s: float = 5.0) -> None:
        self._size = size
        self._timeout_s = timeout_s
        self._pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]] = AsyncConnectionPool(
            conninfo,
            min_size=min(2, size),
            max_size=size,
            open=False,
            timeout=CHECKOUT_TIMEOUT_S,
            reconnect_timeout=RECONNECT_TIMEOUT_S,
            kwargs={
                "autocommit": True,
                "row_factory": namedtuple_row,
                "connect_timeout": max(1, math.ceil(timeout_s)),
            },
            name="strata-reads",
        )

    async def open(self) -> None:
        """Start the pool without waiting for its connections: a database that is down when the
        API starts gives 503s until it is back, as through the stores."""
        await self._pool.open(wait=False)

    async def _run(self, read: Callable[[psycopg.AsyncConnection[Any]], Awaitable[T]]) -> T:
        # every pooled connection may be broken, and one more try gets a new one
        for attempt in range(self._size + 1):
            conn = None
            try:
                # a server that stops answering mid-read: the read is cut, its connection
                # dropped by the pool (it was left mid-statement)
                async with asyncio.timeout(self._timeout_s), self._pool.connection() as conn:
                    return await read(conn)
            except TimeoutError as exc:
                raise Unavailable(UNAVAILABLE) from exc
            except PoolTimeout as exc:  # no connection in time: the server is down or swamped
                raise Unavailable(UNAVAILABLE) from exc
            except psycopg.errors.UndefinedTable as exc:  # the database was never migrated
                raise Unavailable(NOT_MIGRATED) from exc
            except psycopg.OperationalError as exc:
                if conn is None or not conn.broken or attempt == self._size:
                    raise Unavailable(UNAVAILABLE) from exc
        raise AssertionError("unreachable")

    async def authenticate(self, secret: str) -> ApiToken:
        digest = hash_token(secret)

        async def read(conn: psycopg.AsyncConnection[Any]) -> ApiToken:
            cursor = await conn.execute(_TOKEN_BY_DIGEST, {"digest": digest})
            token = admit(await cursor.fetchone(), digest)
            now = utcnow()
            if needs_touch(token, now):
                await conn.execute(_TOUCH_TOKEN, {"now": now, "token_id": token.id})
                token = dataclasses.replace(token, last_used_at=now)
            return token

        return await self._run(read)

    async def job(self, job_id: int) -> Job:
        async def read(conn: psycopg.AsyncConnection[Any]) -> Job:
            row = await (await conn.execute(_JOB_BY_ID, {"job_id": job_id})).fetchone()
            if row is None:
                raise job_not_found(job_id)
            return convert.job(row)

        return await self._run(read)

    async def events(self, job_id: int, *, after_id: int = 0, limit: int = 100) -> list[JobEvent]:
        params = {"job_id": job_id, "after_id": after_id, "limit": limit}

        async def read(conn: psycopg.AsyncConnection[Any]) -> list[JobEvent]:
            rows = await (await conn.execute(_EVENTS_AFTER, params)).fetchall()
            # an event names its job (a foreign key), so only an empty page needs the check
            if not rows and await (await conn.execute(_JOB_EXISTS, params)).fetchone() is None:
                raise job_not_found(job_id)
            return [convert.job_event(row) for row in rows]

        return await self._run(read)

    async def close(self) -> None:
        await self._pool.close()

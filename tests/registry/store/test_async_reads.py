"""The API's async reads (token authentication, job status and events) against the stores they
stand in for: the same entities and errors on both backends, `last_used_at` written at most once a
minute, and on PostgreSQL a restart survived without an error and an outage reported."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta

import pytest
from sqlalchemy import update

from registry.db import make_engine, migrate
from registry.entities import JobKind, JobState
from registry.errors import NotFound, Unauthorized, Unavailable
from registry.store import SqlRegistry
from registry.store.async_reads import (
    CHECKOUT_TIMEOUT_S,
    RECONNECT_TIMEOUT_S,
    PgReads,
    ThreadedReads,
    open_reads,
)
from registry.tables import ApiTokenRow, utcnow
from tests.harness import private_postgres


def _stream(registry: SqlRegistry) -> int:
    return registry.streams.create(
        name="s", base_source={"kind": "tiny"}, method="o-lora", hyperparams={"rank": 4}
    ).id


def test_reads_give_what_the_stores_give(registry: SqlRegistry) -> None:
    stream_id = _stream(registry)
    queued = registry.jobs.create(kind=JobKind.TRAIN, stream_id=stream_id, params={"a": [1, 2]})
    failed = registry.jobs.create(kind=JobKind.CONSOLIDATE, stream_id=stream_id)
    registry.jobs.transition(failed.id, JobState.RUNNING)
    registry.jobs.transition(failed.id, JobState.FAILED, error_code="boom", error_message="x")
    for i in range(5):
        registry.jobs.add_event(failed.id, message=f"step {i}", metrics={"loss": 1.0 / (i + 1)})
    token, secret = registry.tokens.create(name="t", scopes=["read", "write"])
    revoked, revoked_secret = registry.tokens.create(name="r", scopes=["read"])
    registry.tokens.revoke(revoked.id)
    reads = open_reads(registry, size=2)
    on_postgres = registry.engine.dialect.name == "postgresql"
    assert isinstance(reads, PgReads if on_postgres else ThreadedReads)

    async def check() -> None:
        await reads.open()
        try:
            for job_id in (queued.id, failed.id):
                assert await reads.job(job_id) == registry.jobs.get(job_id)
            assert await reads.authenticate(secret) == registry.tokens.authenticate(secret)
            events = registry.jobs.events(failed.id)
            assert len(events) == 5 and await reads.events(failed.id) == events
            for after, limit in [(events[1].id, 2), (events[-1].id, 10), (0, 1)]:
                page = registry.jobs.events(failed.id, after_id=after, limit=limit)
                assert await reads.events(failed.id, after_id=after, limit=limit) == page
            assert await reads.events(queued.id) == []  # a job without events: an empty page
            with pytest.raises(NotFound) as missing:
                await reads.job(failed.id + 100)
            assert (missing.value.field, missing.value.reason) == (
                "job",
                f"job {failed.id + 100} not found",
            )
            with pytest.raises(NotFound):  # not an empty page
                await reads.events(failed.id + 100)
            for bad in (revoked_secret, secret + "x", "strata_nonsense"):
                with pytest.raises(Unauthorized) as refused:
                    await reads.authenticate(bad)
                assert refused.value.reason == "invalid or revoked token"
        finally:
            await reads.close()

    asyncio.run(check())
    assert token.last_used_at is None


def test_last_used_at_is_written_once_a_minute(registry: SqlRegistry) -> None:
    token, secret = registry.tokens.create(name="t", scopes=["read"])

    def last_used() -> object:
        return next(t.last_used_at for t in registry.tokens.list_tokens() if t.id == token.id)

    async def authenticate() -> object:  # as one API process's lifetime
        reads = open_reads(registry, size=2)
        await reads.open()
        try:
            return (await reads.authenticate(secret)).last_used_at
        finally:
            await reads.close()

    first = asyncio.run(authenticate())
    assert first is not None and last_used() == first  # the first use is recorded
    assert asyncio.run(authenticate()) == first == last_used()  # within the minute: no write
    with registry.engine.begin() as conn:  # as if the last use were two minutes ago
        stale = utcnow() - timedelta(minutes=2)
        conn.execute(
            update(ApiTokenRow).where(ApiTokenRow.id == token.id).values(last_used_at=stale)
        )
    later = asyncio.run(authenticate())
    assert later is not None and later > first and last_used() == later


@pytest.mark.slow
def test_pg_reads_ride_out_a_restart_and_report_an_outage() -> None:
    with private_postgres() as pg:
        engine = make_engine(pg.url)
        migrate(engine)
        registry = SqlRegistry(engine)
        job = registry.jobs.create(kind=JobKind.TRAIN, stream_id=_stream(registry))
        reads = open_reads(registry, size=3)
        assert isinstance(reads, PgReads)

        async def scenario() -> None:
            await reads.open()
            try:
                # three reads at once leave three connections in the pool
                await asyncio.gather(*(reads.job(job.id) for _ in range(3)))
                pg.stop("immediate")
                pg.start()
                # every pooled connection is now broken; the read retries on a new one
                assert (await reads.job(job.id)).id == job.id
                pg.stop("immediate")
                down = time.monotonic()
                while time.monotonic() - down < 8:  # reads all along an 8 s outage
                    started = time.monotonic()
                    with pytest.raises(Unavailable):
                        await reads.job(job.id)
                    assert time.monotonic() - started < CHECKOUT_TIMEOUT_S + 2
                    await asyncio.sleep(0.2)
                pg.start()
                back = time.monotonic()
                while True:  # not after the pool's backed-off retries (1, 2, 4, 8 s...)
                    try:
                        assert (await reads.job(job.id)).id == job.id
                        break
                    except Unavailable:
                        assert time.monotonic() - back < RECONNECT_TIMEOUT_S + 2
                        await asyncio.sleep(0.1)
            finally:
                await reads.close()

        asyncio.run(scenario())
        registry.close()

"""The lease store: one holder at a time until the lease expires; the holder renews it, another
takes it over once it has expired (or been released), and of several taking a free lease at once
exactly one gets it; a stream's lease held elsewhere blocks a job's claim until it expires. On
SQLite and PostgreSQL."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta

from sqlalchemy import select, update

from registry.store import SqlRegistry
from registry.tables import LeaseRow
from tests.registry.store.helpers import _stream_id as _stream
from tests.registry.store.helpers import _submit


def test_an_unexpired_lease_blocks_and_an_expired_one_is_taken_over(
    registry: SqlRegistry,
) -> None:
    stream = _stream(registry)
    job = _submit(registry, stream, "a")
    assert registry.leases.acquire(f"stream:{stream}", holder="someone", ttl_s=60)
    claim = registry.jobs.claim(job, worker="w1")
    assert not claim.claimed and "someone" in claim.reason
    with registry.engine.begin() as conn:  # the holder stopped renewing long ago
        conn.execute(update(LeaseRow).values(expires_at=datetime.now(UTC) - timedelta(seconds=1)))
    assert registry.jobs.claim(job, worker="w1").claimed


def _expires(registry: SqlRegistry, name: str) -> datetime:
    with registry.engine.connect() as conn:
        expires = conn.scalar(select(LeaseRow.expires_at).where(LeaseRow.name == name))
    assert expires is not None, f"no lease row for {name!r}"
    return expires if expires.tzinfo else expires.replace(tzinfo=UTC)


def _expire(registry: SqlRegistry, name: str) -> None:
    """As if the holder had stopped renewing a second ago."""
    with registry.engine.begin() as conn:
        conn.execute(update(LeaseRow).where(LeaseRow.name == name)
                     .values(expires_at=datetime.now(UTC) - timedelta(seconds=1)))  # fmt: skip


def test_a_lease_has_one_holder_who_renews_it_until_it_expires(registry: SqlRegistry) -> None:
    leases = registry.leases
    assert leases.holder("scheduler") is None
    assert leases.acquire("scheduler", holder="a", ttl_s=60)
    assert leases.holder("scheduler") == "a"
    first = _expires(registry, "scheduler")
    assert timedelta(seconds=55) < first - datetime.now(UTC) <= timedelta(seconds=60)
    assert not leases.acquire("scheduler", holder="b", ttl_s=3600)  # held: b is refused
    assert leases.holder("scheduler") == "a" and _expires(registry, "scheduler") == first
    assert leases.acquire("scheduler", holder="a", ttl_s=3600)  # the holder renews it
    assert _expires(registry, "scheduler") - datetime.now(UTC) > timedelta(minutes=59)
    assert leases.acquire("other", holder="b", ttl_s=60)  # another name: another lease
    assert (leases.holder("scheduler"), leases.holder("other")) == ("a", "b")
    _expire(registry, "scheduler")
    assert leases.holder("scheduler") is None  # expired: nobody holds it, the row is still there
    assert leases.acquire("scheduler", holder="b", ttl_s=60)  # taken over
    assert leases.holder("scheduler") == "b"
    assert not leases.acquire("scheduler", holder="a", ttl_s=60)  # the old holder lost it
    assert leases.holder("other") == "b"


def test_a_lease_expires_by_the_clock(registry: SqlRegistry) -> None:
    assert registry.leases.acquire("short", holder="a", ttl_s=0.5)
    assert not registry.leases.acquire("short", holder="b", ttl_s=60)
    time.sleep(0.6)
    assert registry.leases.holder("short") is None
    assert registry.leases.acquire("short", holder="b", ttl_s=60)
    assert registry.leases.holder("short") == "b"


def test_only_the_holder_releases_a_lease(registry: SqlRegistry) -> None:
    leases = registry.leases
    assert leases.acquire("l", holder="a", ttl_s=60)
    leases.release("l", holder="b")  # not b's: nothing happens
    assert leases.holder("l") == "a"
    assert not leases.acquire("l", holder="b", ttl_s=60)
    leases.release("l", holder="a")
    assert leases.holder("l") is None
    with registry.engine.connect() as conn:
        assert conn.scalar(select(LeaseRow).where(LeaseRow.name == "l")) is None
    leases.release("l", holder="a")  # releasing a lease no one holds is a no-op
    assert leases.acquire("l", holder="b", ttl_s=60)  # free again at once, before any expiry
    assert leases.holder("l") == "b"


def test_of_several_taking_a_free_lease_at_once_exactly_one_gets_it(
    registry: SqlRegistry,
) -> None:
    barrier = threading.Barrier(4)
    won: dict[str, bool] = {}

    def take(holder: str) -> None:
        barrier.wait()
        won[holder] = registry.leases.acquire("contested", holder=holder, ttl_s=60)

    threads = [threading.Thread(target=take, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [holder for holder, got in won.items() if got]
    assert len(won) == 4 and len(winners) == 1, won
    assert registry.leases.holder("contested") == winners[0]

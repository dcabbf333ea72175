"""The webhook store: subscribers, the outbox `emit` fills, due deliveries and their attempts."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from registry.errors import NotFound
from registry.store import SqlRegistry


def test_events_queue_one_delivery_per_subscriber_and_attempts_are_recorded(
    registry: SqlRegistry,
) -> None:
    hooks = registry.webhooks
    jobs = hooks.create(url="http://127.0.0.1:1/a", events=["job.finished"], secret="x" * 16)
    both = hooks.create(url="https://example.org/b", events=["job.finished", "snapshot.created"],
                        secret="y" * 16)  # fmt: skip
    assert [h.id for h in hooks.list_webhooks()] == [jobs.id, both.id]
    assert hooks.secret(both.id) == ("https://example.org/b", "y" * 16)
    assert hooks.emit("job.finished", {"job": {"id": 1}}) == 2
    assert hooks.emit("snapshot.created", {"snapshot": {"id": 2}}) == 1
    assert hooks.emit("adapter.promoted", {}) == 0  # nobody subscribed
    now = datetime.now(UTC) + timedelta(seconds=1)
    due = hooks.due(now=now)
    expected = [(jobs.id, "job.finished"), (both.id, "job.finished"),
                (both.id, "snapshot.created")]  # fmt: skip
    assert [(d.webhook_id, d.event) for d in due] == expected
    later = now + timedelta(minutes=5)
    retried = hooks.record_attempt(due[0].id, delivered=False, status=503, error="answered 503",
                                   next_attempt_at=later)  # fmt: skip
    assert (retried.state, retried.attempts, retried.last_status) == ("pending", 1, 503)
    assert due[0].id not in {d.id for d in hooks.due(now=now)}  # backing off
    done = hooks.record_attempt(due[1].id, delivered=True, status=204, error=None,
                                next_attempt_at=None)  # fmt: skip
    assert done.state == "delivered" and done.delivered_at is not None
    gave_up = hooks.record_attempt(due[2].id, delivered=False, status=None, error="refused",
                                   next_attempt_at=None)  # fmt: skip
    assert gave_up.state == "failed"
    assert [d.id for d in hooks.due(now=later)] == [due[0].id]
    # deleting a webhook gives up its pending deliveries and queues nothing more for it
    hooks.delete(jobs.id)
    assert hooks.due(now=later) == []
    assert [d.state for d in hooks.deliveries(jobs.id)] == ["failed"]
    assert hooks.emit("job.finished", {}) == 1
    with pytest.raises(NotFound):
        hooks.get(jobs.id)
    with pytest.raises(NotFound):
        hooks.deliveries(999)

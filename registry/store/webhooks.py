"""Webhooks and their delivery outbox. `emit` writes an event's deliveries in the caller's
transaction (so they commit, or not, with what happened); the delivery loop
(`services.webhooks`) takes the due ones and records each attempt."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from registry.entities import WEBHOOK_EVENTS, Webhook, WebhookDelivery
from registry.errors import NotFound
from registry.store import _convert as convert
from registry.store._db import Database
from registry.tables import JobRow, WebhookDeliveryRow, WebhookRow, utcnow

PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"


def emit(s: Session, event: str, payload: dict[str, Any]) -> int:
    """Queue `event` for every live webhook subscribed to it, in `s`'s transaction; returns
    how many deliveries were queued."""
    assert event in WEBHOOK_EVENTS, event
    now = utcnow()
    count = 0
    for hook in s.scalars(select(WebhookRow).where(WebhookRow.deleted_at.is_(None))):
        if event in hook.events:
            s.add(WebhookDeliveryRow(webhook_id=hook.id, event=event, payload=payload,
                                     state=PENDING, attempts=0, next_attempt_at=now))  # fmt: skip
            count += 1
    return count


def job_finished(s: Session, row: JobRow) -> None:
    """The `job.finished` event, in the transaction that ends the job."""
    emit(s, "job.finished", {
        "job": {"id": row.id, "kind": row.kind, "state": row.state, "stream_id": row.stream_id,
                "task_id": row.task_id, "error_code": row.error_code},
    })  # fmt: skip


def _hook(row: WebhookRow) -> Webhook:
    return Webhook(id=row.id, url=row.url, events=tuple(row.events),
                   created_at=convert.aware(row.created_at))  # fmt: skip


def _delivery(row: WebhookDeliveryRow) -> WebhookDelivery:
    return WebhookDelivery(
        id=row.id, webhook_id=row.webhook_id, event=row.event, payload=dict(row.payload),
        state=row.state, attempts=row.attempts,
        next_attempt_at=convert.aware(row.next_attempt_at), last_status=row.last_status,
        last_error=row.last_error, created_at=convert.aware(row.created_at),
        delivered_at=convert.aware(row.delivered_at) if row.delivered_at else None,
    )  # fmt: skip


class SqlWebhookStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    def create(self, *, url: str, events: Sequence[str], secret: str) -> Webhook:
        """A subscriber (checked by the caller: `services.webhooks.check_webhook`)."""
        with self._db.tx() as s:
            row = WebhookRow(url=url, events=list(events), secret=secret)
            s.add(row)
            s.flush()
            return _hook(row)

    def list_webhooks(self) -> list[Webhook]:
        with self._db.tx() as s:
            query = select(WebhookRow).where(WebhookRow.deleted_at.is_(None))
            return [_hook(r) for r in s.scalars(query.order_by(WebhookRow.id))]

    def get(self, webhook_id: int) -> Webhook:
        with self._db.tx() as s:
            return _hook(_live(s, webhook_id))

    def secret(self, webhook_id: int) -> tuple[str, str]:
        """The webhook's URL and secret (for the delivery loop only)."""
        with self._db.tx() as s:
            row = _live(s, webhook_id)
            return row.url, row.secret

    def delete(self, webhook_id: int) -> None:
        """No more deliveries are queued for it; pending ones are dropped as failed."""
        with self._db.tx() as s:
            row = _live(s, webhook_id)
            row.deleted_at = utcnow()
            pending = select(WebhookDeliveryRow).where(
                WebhookDeliveryRow.webhook_id == webhook_id, WebhookDeliveryRow.state == PENDING
            )
            for d in s.scalars(pending):
                d.state, d.last_error = FAILED, "the webhook was deleted"

    def emit(self, event: str, payload: dict[str, Any]) -> int:
        with self._db.tx() as s:
            return emit(s, event, payload)

    def deliveries(self, webhook_id: int, *, limit: int = 100) -> list[WebhookDelivery]:
        """The webhook's deliveries, newest first."""
        with self._db.tx() as s:
            _exists(s, webhook_id)
            query = (
                select(WebhookDeliveryRow)
                .where(WebhookDeliveryRow.webhook_id == webhook_id)
                .order_by(WebhookDeliveryRow.id.desc())
                .limit(limit)
            )
            return [_delivery(r) for r in s.scalars(query)]

    def due(self, *, now: datetime, limit: int = 50) -> list[WebhookDelivery]:
        """Pending deliveries whose next attempt is due, oldest first."""
        with self._db.tx() as s:
            query = (
                select(WebhookDeliveryRow)
                .where(
                    WebhookDeliveryRow.state == PENDING, WebhookDeliveryRow.next_attempt_at <= now
                )
                .order_by(WebhookDeliveryRow.id)
                .limit(limit)
            )
            return [_delivery(r) for r in s.scalars(query)]

    def record_attempt(
        self,
        delivery_id: int,
        *,
        delivered: bool,
        status: int | None,
        error: str | None,
        next_attempt_at: datetime | None,
    ) -> WebhookDelivery:
        """One attempt's outcome: delivered, retried at `next_attempt_at`, or (None) given up."""
        with self._db.tx() as s:
            row = s.get_one(WebhookDeliveryRow, delivery_id, with_for_update=True)
            row.attempts += 1
            row.last_status, row.last_error = status, error
            if delivered:
                row.state, row.delivered_at = DELIVERED, utcnow()
            elif next_attempt_at is None:
                row.state = FAILED
            else:
                row.next_attempt_at = next_attempt_at
            return _delivery(row)


def _live(s: Session, webhook_id: int) -> WebhookRow:
    row = s.get(WebhookRow, webhook_id)
    if row is None or row.deleted_at is not None:
        raise NotFound(f"webhook {webhook_id} not found", field="webhook")
    return row


def _exists(s: Session, webhook_id: int) -> None:
    if s.get(WebhookRow, webhook_id) is None:
        raise NotFound(f"webhook {webhook_id} not found", field="webhook")

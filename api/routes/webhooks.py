"""Webhooks (admin scope): subscribe a URL to events, list, delete, and see each delivery's
attempts. Deliveries are signed with the subscription's secret (`services.webhooks`)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from api.deps import AdminToken, IdPath, InstDep
from registry.entities import WEBHOOK_EVENTS
from services.webhooks import check_webhook

router = APIRouter(prefix="/webhooks", tags=["webhooks"])


class WebhookCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: str = Field(description="http:// or https:// URL that receives the POSTs.")
    events: list[str] = Field(description=f"Any of {', '.join(WEBHOOK_EVENTS)}.")
    secret: str = Field(description="16-256 characters; each body is signed with it: "
                        "X-Strata-Signature: sha256=<hex HMAC-SHA256(secret, body)>.")  # fmt: skip


class WebhookPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: int
    url: str
    events: list[str]
    created_at: datetime


class WebhooksPublic(BaseModel):
    data: list[WebhookPublic]
    count: int


class DeliveryPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: int
    event: str
    payload: dict[str, Any]
    state: str = Field(description="pending (to be attempted at next_attempt_at), delivered, "
                       "or failed (given up)")  # fmt: skip
    attempts: int
    next_attempt_at: datetime
    last_status: int | None = Field(description="The receiver's HTTP status at the last attempt.")
    last_error: str | None
    created_at: datetime
    delivered_at: datetime | None


class DeliveriesPublic(BaseModel):
    data: list[DeliveryPublic]
    count: int


@router.post("", status_code=201, response_model=WebhookPublic)
def create(body: WebhookCreate, inst: InstDep, _: AdminToken) -> object:
    """Subscribe `url` to `events`; the secret is never shown again."""
    url, events, secret = check_webhook(body.url, body.events, body.secret)
    return inst.registry.webhooks.create(url=url, events=events, secret=secret)


@router.get("", response_model=WebhooksPublic)
def list_webhooks(inst: InstDep, _: AdminToken) -> object:
    data = inst.registry.webhooks.list_webhooks()
    return {"data": data, "count": len(data)}


@router.delete("/{webhook_id}", status_code=204)
def delete(webhook_id: IdPath, inst: InstDep, _: AdminToken) -> None:
    """No more events are queued for it; its pending deliveries are given up."""
    inst.registry.webhooks.delete(webhook_id)


@router.get("/{webhook_id}/deliveries", response_model=DeliveriesPublic)
def deliveries(webhook_id: IdPath, inst: InstDep, _: AdminToken) -> object:
    """The webhook's deliveries, newest first, with each one's attempts and last answer."""
    data = inst.registry.webhooks.deliveries(webhook_id)
    return {"data": data, "count": len(data)}

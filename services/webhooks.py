"""Webhooks: checking a subscription, and delivering the outbox (`registry.store.webhooks`).

Each delivery is a POST of a JSON body `{"id", "event", "created_at", "data"}` with the header
`X-Strata-Signature: sha256=<hex HMAC-SHA256(secret, body)>` (and `X-Strata-Event`,
`X-Strata-Delivery`). A 2xx answer delivers it; anything else (an error status, a refused
connection, a timeout) is retried with exponential backoff and jitter, from `RETRY_BASE_S`
doubling up to `RETRY_MAX_S`, for `MAX_ATTEMPTS` attempts, then given up (`failed`). Events are
delivered at least once: a receiver that answered but whose answer was lost gets it again, with
the same delivery id. The scheduler's leader delivers what is due at each tick.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import random
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from urllib.parse import urlsplit

import httpx

from registry.entities import WEBHOOK_EVENTS, WebhookDelivery
from registry.errors import InvalidValue
from registry.instance import Instance

log = logging.getLogger(__name__)

MAX_URL = 2048
MIN_SECRET, MAX_SECRET = 16, 256
TIMEOUT_S = 5.0
RETRY_BASE_S = 5.0
RETRY_MAX_S = 600.0
MAX_ATTEMPTS = 12
SIGNATURE = "X-Strata-Signature"

Post = Callable[[str, bytes, dict[str, str]], int]  # url, body, headers -> status


def check_webhook(url: object, events: object, secret: object) -> tuple[str, list[str], str]:
    """An http(s) URL with a host, a non-empty list of known events, a secret of 16-256
    characters. InvalidValue names the field."""
    if not isinstance(url, str) or len(url) > MAX_URL:
        raise InvalidValue(f"must be a URL of at most {MAX_URL} characters", field="url")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidValue("must be an http:// or https:// URL with a host", field="url")
    if not isinstance(events, list) or not events:
        raise InvalidValue(f"must be a non-empty list of {', '.join(WEBHOOK_EVENTS)}",
                           field="events")  # fmt: skip
    for i, event in enumerate(events):
        if event not in WEBHOOK_EVENTS:
            raise InvalidValue(f"must be one of {', '.join(WEBHOOK_EVENTS)}, got {event!r}",
                               field=f"events.{i}")  # fmt: skip
    if not isinstance(secret, str) or not MIN_SECRET <= len(secret) <= MAX_SECRET:
        raise InvalidValue(f"must be a string of {MIN_SECRET}-{MAX_SECRET} characters",
                           field="secret")  # fmt: skip
    return url, sorted(set(events), key=list(WEBHOOK_EVENTS).index), secret


def signature(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def body_of(delivery: WebhookDelivery) -> bytes:
    return json.dumps(
        {"id": delivery.id, "event": delivery.event,
         "created_at": delivery.created_at.isoformat(), "data": delivery.payload},
        sort_keys=True, separators=(",", ":"),
    ).encode()  # fmt: skip


def _post(url: str, body: bytes, headers: dict[str, str]) -> int:
    response = httpx.post(url, content=body, headers=headers, timeout=TIMEOUT_S,
                          follow_redirects=False)  # fmt: skip
    return response.status_code


def backoff(attempts: int, *, rng: random.Random | None = None) -> float:
    """Seconds before attempt `attempts + 1`: RETRY_BASE_S doubling, capped, +-20% jitter."""
    delay = min(RETRY_BASE_S * 2 ** (attempts - 1), RETRY_MAX_S)
    return delay * (0.8 + 0.4 * (rng or random).random())


def deliver_due(
    inst: Instance, *, now: datetime, post: Post = _post, limit: int = 50
) -> Sequence[WebhookDelivery]:
    """Attempt every delivery due at `now` once; returns them as recorded."""
    hooks = inst.registry.webhooks
    done: list[WebhookDelivery] = []
    for delivery in hooks.due(now=now, limit=limit):
        url, secret = hooks.secret(delivery.webhook_id)
        body = body_of(delivery)
        headers = {"Content-Type": "application/json", SIGNATURE: signature(secret, body),
                   "X-Strata-Event": delivery.event,
                   "X-Strata-Delivery": str(delivery.id)}  # fmt: skip
        status: int | None = None
        error: str | None = None
        try:
            status = post(url, body, headers)
        except (httpx.HTTPError, OSError) as exc:
            error = f"{type(exc).__name__}: {exc}"[:500]
        ok = status is not None and 200 <= status < 300
        if not ok and error is None:
            error = f"answered {status}"
        attempts = delivery.attempts + 1
        retry_at = None
        if not ok and attempts < MAX_ATTEMPTS:
            retry_at = now + timedelta(seconds=backoff(attempts))
        done.append(hooks.record_attempt(delivery.id, delivered=ok, status=status, error=error,
                                         next_attempt_at=retry_at))  # fmt: skip
        if not ok:
            log.warning("webhook %s: delivery %s (%s) failed: %s", delivery.webhook_id,
                        delivery.id, delivery.event, error)  # fmt: skip
    return done

"""Webhooks: subscriptions (admin scope, http(s) only) and deliveries from the outbox to a real
receiver on loopback, signed, retried with backoff while it is down, delivered once it is up."""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from services.webhooks import deliver_due
from tests.api.conftest import Api
from tests.api.helpers import FAST, _problem, _stream, _submit
from tests.harness import Receiver, free_port
from workers.runner import run_job

SECRET = "s3cret-for-the-receiver"
ALL = ["job.finished", "adapter.promoted", "adapter.refused", "snapshot.created"]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.server.shutdown()


def test_subscriptions_are_admin_only_and_checked(api: Api) -> None:
    c, h = api.client, api.auth()
    good = {"url": "https://example.org/hook", "events": ["job.finished"], "secret": SECRET}
    for bad, field in [
        ({**good, "url": "ftp://example.org/x"}, "url"),
        ({**good, "url": "javascript:alert(1)"}, "url"),
        ({**good, "url": "http:///nohost"}, "url"),
        ({**good, "events": []}, "events"),
        ({**good, "events": ["job.finished", "job.started"]}, "events.1"),
        ({**good, "secret": "short"}, "secret"),
        ({**good, "extra": 1}, "extra"),
    ]:
        _problem(c.post("/v1/webhooks", json=bad, headers=h), 422, field)
    _problem(c.post("/v1/webhooks", json=good, headers=api.auth("write")), 403)
    assert c.get("/v1/webhooks", headers=h).json()["data"] == []  # nothing stored
    made = c.post("/v1/webhooks", json=good, headers=h)
    assert made.status_code == 201 and "secret" not in made.json()
    assert [w["url"] for w in c.get("/v1/webhooks", headers=h).json()["data"]] == [good["url"]]
    _problem(c.get("/v1/webhooks/999/deliveries", headers=h), 404)
    _problem(c.delete("/v1/webhooks/999", headers=h), 404)


def test_events_are_signed_retried_while_the_receiver_is_down_and_delivered(
    api: Api, receiver: Receiver
) -> None:
    c, h = api.client, api.auth()
    hook = c.post("/v1/webhooks", json={"url": receiver.url, "events": ALL, "secret": SECRET},
                  headers=h).json()  # fmt: skip
    _stream(api, hyperparams=FAST)  # its import job: snapshot.created and job.finished
    made = _submit(api, "s1", "t1")
    assert run_job(api.inst, made.json()["job"]["id"]).state == "succeeded"  # + adapter.promoted
    now = datetime.now(UTC)
    receiver.down = True
    tried = deliver_due(api.inst, now=now)
    assert len(tried) >= 4 and {d.state for d in tried} == {"pending"}
    assert all(d.attempts == 1 and d.last_status == 503 for d in tried)
    assert all(d.next_attempt_at > now for d in tried)
    assert deliver_due(api.inst, now=now + timedelta(seconds=1)) == []  # backing off
    receiver.down = False
    delivered = deliver_due(api.inst, now=now + timedelta(hours=1))
    assert {d.state for d in delivered} == {"delivered"} and len(delivered) == len(tried)
    events = []
    for headers, body in receiver.got:
        expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
        assert headers["X-Strata-Signature"] == expected
        payload = json.loads(body)
        assert headers["X-Strata-Event"] == payload["event"]
        events.append(payload)
    kinds = [e["event"] for e in events]
    assert kinds.count("snapshot.created") == 1 and "adapter.promoted" in kinds
    finished = [e["data"]["job"] for e in events if e["event"] == "job.finished"]
    assert {(j["kind"], j["state"]) for j in finished} == {("import", "succeeded"),
                                                          ("train", "succeeded")}  # fmt: skip
    promoted = next(e for e in events if e["event"] == "adapter.promoted")["data"]
    assert promoted["task"] == "t1" and promoted["adapter"]["version"] == 1
    shown = c.get(f"/v1/webhooks/{hook['id']}/deliveries", headers=h).json()["data"]
    assert len(shown) == len(tried)
    assert all(d["state"] == "delivered" and d["attempts"] == 2 and d["last_status"] == 204
               for d in shown)  # fmt: skip
    assert deliver_due(api.inst, now=now + timedelta(hours=2)) == []  # each once
    # deleted: nothing more is queued for it
    assert c.delete(f"/v1/webhooks/{hook['id']}", headers=h).status_code == 204
    _submit(api, "s1", "t2")
    assert c.get("/v1/webhooks", headers=h).json()["data"] == []
    assert len(c.get(f"/v1/webhooks/{hook['id']}/deliveries", headers=h).json()["data"]) == len(
        shown
    )


def test_an_unreachable_receiver_is_an_attempt_with_its_error(api: Api) -> None:
    closed = f"http://127.0.0.1:{free_port()}/hook"  # nothing listens there
    api.client.post("/v1/webhooks", json={"url": closed, "events": ["job.finished"],
                                          "secret": SECRET}, headers=api.auth())  # fmt: skip
    _stream(api, hyperparams=FAST)
    (tried,) = deliver_due(api.inst, now=datetime.now(UTC))
    assert tried.state == "pending" and tried.last_status is None
    assert "ConnectError" in (tried.last_error or "")

"""`/v1/streams/{s}/schedules` and `/v1/schedules/{id}`: cron schedules created, listed and
deleted, bad input refused by field."""

from __future__ import annotations

from tests.api.conftest import Api
from tests.api.helpers import _problem, _stream, _submit


def test_schedules_create_list_delete_and_refuse_bad_input(api: Api) -> None:
    c, h = api.client, api.auth("write")
    _stream(api)
    _submit(api, "s1", "t1")
    made = c.post("/v1/streams/s1/schedules", json={"kind": "retrain", "cron": "0 3 * * *",
                  "task": "t1"}, headers=h)  # fmt: skip
    assert made.status_code == 201, made.text
    assert made.json()["next_run_at"].endswith("03:00:00Z")
    listed = c.get("/v1/streams/s1/schedules", headers=h).json()
    assert listed["count"] == 1
    for body, field in (
        ({"kind": "retrain", "cron": "every day", "task": "t1"}, "cron"),
        ({"kind": "retrain", "cron": "@daily"}, "task"),
        ({"kind": "retrain", "cron": "@daily", "task": "zz"}, "task"),
        ({"kind": "train", "cron": "@daily", "task": "t1"}, "kind"),
    ):
        _problem(c.post("/v1/streams/s1/schedules", json=body, headers=h), 404 if
                 body.get("task") == "zz" else 422, field)  # fmt: skip
    assert c.delete(f"/v1/schedules/{made.json()['id']}", headers=h).status_code == 204
    _problem(c.delete(f"/v1/schedules/{made.json()['id']}", headers=h), 404, "schedule")
    assert c.get("/v1/streams/s1/schedules", headers=h).json()["count"] == 0

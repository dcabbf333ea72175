"""`/v1/streams/{s}/schedules` and `/v1/schedules/{id}`: cron schedules created, listed and
deleted (also through their stream), bad input refused by field; the CLI's `schedules delete
STREAM ID` and `evaluate STREAM`."""

from __future__ import annotations

import pytest

from api.cli import main
from tests.api.conftest import Api
from tests.api.helpers import _problem, _stream, _submit
from tests.api.routes.test_datasets import _InProcess, _trained


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


def test_a_schedule_is_deleted_through_its_stream(
    api: Api, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _trained(api)
    _stream(api, name="other")
    h = api.auth("write")
    body = {"kind": "retrain", "cron": "@daily", "task": "t1"}
    one = api.client.post("/v1/streams/s1/schedules", json=body, headers=h).json()
    two = api.client.post("/v1/streams/s1/schedules", json=body, headers=h).json()
    _problem(api.client.delete(f"/v1/streams/other/schedules/{one['id']}", headers=h), 404,
             "schedule")  # fmt: skip
    assert api.client.delete(f"/v1/streams/s1/schedules/{one['id']}", headers=h).status_code == 204
    monkeypatch.setattr("api.cli_client._client", lambda _args: _InProcess(api))
    assert main(["schedules", "delete", "s1", str(two["id"])]) == 0
    assert f"schedule {two['id']} deleted" in capsys.readouterr().out
    assert api.client.get("/v1/streams/s1/schedules", headers=h).json()["data"] == []
    assert main(["schedules", "delete", "s1", "x", "y"]) == 2
    assert "expects STREAM ID" in capsys.readouterr().err
    assert main(["evaluate", "s1", "--eval-limit", "6"]) == 0
    out = capsys.readouterr().out
    assert "evaluation of s1: job" in out
    job_id = int(out.split("job ")[1].split()[0])
    job = api.client.get(f"/v1/jobs/{job_id}", headers=h).json()
    assert job["kind"] == "evaluate" and job["params"] == {"eval_limit": 6}
    assert main(["evaluate", "other"]) == 2  # no tasks yet: 409
    assert "error (409)" in capsys.readouterr().err

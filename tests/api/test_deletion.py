"""Soft deletion: `DELETE /v1/streams/{s}` and `DELETE .../adapters/{version}` answer 404
afterwards and can be restored within STRATA_RETENTION_DAYS; refused (409) while a job of the
stream runs or while an alias (`production`) points at the version."""

from __future__ import annotations

import dataclasses

from registry.settings import StrataSettings
from tests.api.conftest import Api
from tests.api.helpers import FAST, _problem, _stream, _submit
from workers.runner import run_job


def test_a_deleted_stream_is_gone_until_restored(api: Api) -> None:
    c, h = api.client, api.auth("write")
    _stream(api, hyperparams=FAST)
    queued = _submit(api, "s1", "t1").json()["job"]
    claim = api.inst.registry.jobs.claim(queued["id"], worker="w")
    assert claim.claimed  # running now
    _problem(c.delete("/v1/streams/s1", headers=h), 409, "stream")
    api.inst.registry.jobs.request_cancel(queued["id"])
    api.inst.registry.jobs.transition(queued["id"], "cancelled")
    waiting = _submit(api, "s1", "t2").json()["job"]
    gone = c.delete("/v1/streams/s1", headers=h)
    assert gone.status_code == 200, gone.text
    assert gone.json()["name"] == "s1"  # the name it had, not the one it is set aside under
    _problem(c.get("/v1/streams/s1", headers=h), 404, "stream")
    assert c.get(f"/v1/jobs/{waiting['id']}", headers=h).json()["state"] == "cancelled"
    jobs = len(c.get("/v1/jobs", headers=h).json()["data"])
    _problem(c.post("/v1/streams/s1/tasks/t1/retrain", json={}, headers=h), 404, "stream")
    assert len(c.get("/v1/jobs", headers=h).json()["data"]) == jobs  # a deleted task: no job
    assert [s["name"] for s in c.get("/v1/streams", headers=h).json()["data"]] == []
    back = c.post("/v1/streams/s1/restore", headers=h)
    assert back.status_code == 200 and back.json()["name"] == "s1", back.text
    assert [t["name"] for t in c.get("/v1/streams/s1/tasks", headers=h).json()["data"]] == [
        "t1", "t2"]  # fmt: skip
    _problem(c.post("/v1/streams/s1/restore", headers=h), 404, "stream")  # nothing deleted now
    # deleted, its name taken by a new stream: restoring it would clash
    assert c.delete("/v1/streams/s1", headers=h).status_code == 200
    _stream(api, hyperparams=FAST)
    _problem(c.post("/v1/streams/s1/restore", headers=h), 409, "name")
    _problem(c.delete("/v1/streams/nope", headers=h), 404, "stream")
    _problem(c.delete("/v1/streams/s1", headers=api.auth("read")), 403)


def test_restoring_ends_with_the_retention_period(api: Api) -> None:
    _stream(api, hyperparams=FAST)
    assert api.client.delete("/v1/streams/s1", headers=api.auth("write")).status_code == 200
    expired = dataclasses.replace(api.inst, settings=StrataSettings(retention_days=0))
    api.client.app.state.inst = expired  # type: ignore[attr-defined]
    _problem(api.client.post("/v1/streams/s1/restore", headers=api.auth("write")), 404, "stream")


def test_a_deleted_adapter_version_is_gone_until_restored(api: Api) -> None:
    c, h = api.client, api.auth("write")
    _stream(api, hyperparams=FAST)
    made = _submit(api, "s1", "t1")
    assert run_job(api.inst, made.json()["job"]["id"]).state == "succeeded"
    url = "/v1/streams/s1/tasks/t1/adapters/1"
    alias = "/v1/streams/s1/tasks/t1/aliases/production"
    assert c.put(alias, json={"version": 1}, headers=h).status_code == 200
    _problem(c.delete(url, headers=h), 409, "alias")  # production must move first
    assert c.delete(alias, headers=h).status_code == 204
    gone = c.delete(url, headers=h)
    assert gone.status_code == 200, gone.text
    _problem(c.get(url, headers=h), 404)
    _problem(c.get("/v1/streams/s1/tasks/t1/adapters/latest", headers=h), 404)
    assert c.get("/v1/streams/s1/adapters", headers=h).json()["data"] == []
    back = c.post(url + "/restore", headers=h)
    assert back.status_code == 200 and back.json()["version"] == 1
    assert c.get("/v1/streams/s1/tasks/t1/adapters/latest", headers=h).json()["version"] == 1
    _problem(c.post(url + "/restore", headers=h), 404, "version")
    _problem(c.delete("/v1/streams/s1/tasks/t1/adapters/7", headers=h), 404)

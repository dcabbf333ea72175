"""Promotion gated on forgetting, through the API and the jobs: a good new dataset version is
retrained and promoted to `production`; a label-shuffled one (correct test split) is retrained
and refused, and `production` stays where it was. Predictions default to `production`."""

from __future__ import annotations

import json
from typing import Any

from continual.data import synthetic_tasks
from tests.api.conftest import Api
from tests.api.helpers import _files, _problem, _shuffled, _stream
from workers.runner import run_job

STEADY: dict[str, Any] = {}  # the defaults: 10 epochs, enough for the tiny model to learn


def _retrain(api: Api, **body: Any) -> dict[str, Any]:
    r = api.client.post("/v1/streams/s1/tasks/t1/retrain", json=body, headers=api.auth("write"))
    assert r.status_code == 202, r.text
    assert run_job(api.inst, r.json()["id"]).state == "succeeded"
    job: dict[str, Any] = api.client.get(f"/v1/jobs/{r.json()['id']}", headers=api.auth()).json()
    return job


def _production(api: Api) -> int:
    r = api.client.get("/v1/streams/s1/tasks/t1/adapters/production", headers=api.auth("read"))
    assert r.status_code == 200, r.text
    return int(r.json()["version"])


def test_a_good_version_is_promoted_and_a_shuffled_one_refused(api: Api) -> None:
    first, second = (synthetic_tasks(seed=s, train_size=96, test_size=24)[0] for s in (0, 1))
    labels = list(first.labels or ())
    _stream(api, hyperparams=STEADY)
    h = api.auth("write")
    data = {"name": "t1", "labels": json.dumps(labels)}
    made = api.client.post("/v1/streams/s1/tasks", data=data, files=_files(first.train, first.test),
                           headers=h)  # fmt: skip
    assert run_job(api.inst, made.json()["job"]["id"]).state == "succeeded"
    job = api.client.get(f"/v1/jobs/{made.json()['job']['id']}", headers=h).json()
    promotion = job["result"]["promotion"]
    assert promotion["promoted"], promotion  # the first version beats the untrained base
    assert promotion["table"][0]["own"] and promotion["table"][0]["after"] > 50
    assert _production(api) == 1

    # a good new version (the examples so far and as many fresh ones) is retrained, promoted
    both, tests = first.train + second.train, first.test + second.test
    form = {"labels": json.dumps(labels)}
    grown = api.client.post("/v1/streams/s1/tasks/t1/datasets", headers=h, data=form,
                            files=_files(both, tests))  # fmt: skip
    assert grown.status_code == 201
    good = _retrain(api, promotion={"task_tolerance": 10})
    assert good["result"]["promotion"]["promoted"], good["result"]
    assert good["result"]["promotion"]["gate"] == {"task_tolerance": 10.0, "max_other_drop": 2.0}
    assert _production(api) == 2
    events = api.client.get(f"/v1/jobs/{good['id']}/events", headers=h).json()["data"]
    assert any(e["message"].startswith("adapter.promoted: t1 v2") for e in events)

    # the same inputs with wrong labels, and the correct test split: retrained and refused
    bad = api.client.post("/v1/streams/s1/tasks/t1/datasets", headers=h,
                          data={"labels": json.dumps(labels)},
                          files=_files(_shuffled(both, labels), tests))  # fmt: skip
    assert bad.status_code == 201 and bad.json()["version"] == 3
    refused = _retrain(api)
    decision = refused["result"]["promotion"]
    assert not decision["promoted"] and "below production's" in decision["reasons"][0], decision
    assert decision["gate"] == {"task_tolerance": 1.0, "max_other_drop": 2.0}
    assert _production(api) == 2  # unchanged; `latest` is the refused version
    latest = api.client.get("/v1/streams/s1/tasks/t1/adapters/latest", headers=h).json()
    assert latest["version"] == 3 and "production" not in latest["aliases"]
    events = api.client.get(f"/v1/jobs/{refused['id']}/events", headers=h).json()["data"]
    assert any(e["message"].startswith("adapter.refused: t1 v3") for e in events)
    # predictions default to production
    said = api.client.post("/v1/streams/s1/predict", json={"inputs": ["x"], "task": "t1"},
                           headers=api.auth("read"))  # fmt: skip
    assert said.status_code == 200 and said.json()["adapters"] == ["t1@v2"], said.text


def test_gate_settings_are_checked_and_stored(api: Api) -> None:
    _stream(api)
    h = api.auth("write")
    r = api.client.put("/v1/streams/s1/promotion", json={"task_tolerance": 0.5}, headers=h)
    assert r.status_code == 200 and r.json()["promotion"] == {"task_tolerance": 0.5}
    for body, field in [({"task_tolerance": -1}, "task_tolerance"),
                        ({"max_other_drop": -0.1}, "max_other_drop"),
                        ({"other": 1}, "other")]:  # fmt: skip
        _problem(api.client.put("/v1/streams/s1/promotion", json=body, headers=h), 422, field)
    assert api.client.get("/v1/streams/s1", headers=h).json()["promotion"] == {
        "task_tolerance": 0.5
    }

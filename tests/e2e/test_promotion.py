"""Promotion gated on forgetting with real parts: Celery worker processes, PostgreSQL, Redis and
the S3 test server. A good new dataset version is retrained and promoted to `production`; a
label-shuffled one (with the correct test split) is retrained and refused, and `production`
stays where it was."""

from __future__ import annotations

import json
from typing import Any

import pytest

from continual.data import synthetic_tasks
from tests.api.helpers import _files, _shuffled
from tests.e2e.helpers import Service, _wait, http

pytestmark = pytest.mark.slow


def _post(svc: Service, path: str, **kwargs: Any) -> dict[str, Any]:
    r = http.post(f"{svc.url}/v1/streams{path}", headers=svc.headers, timeout=60, **kwargs)
    assert r.status_code in (201, 202), r.text
    body: dict[str, Any] = r.json()
    return body


def _decided(svc: Service, job: dict[str, Any]) -> dict[str, Any]:
    done = _wait(svc, [job["id"]])[0]
    assert done["state"] == "succeeded", done
    promotion: dict[str, Any] = done["result"]["promotion"]
    return promotion


def _production(svc: Service) -> int:
    r = http.get(f"{svc.url}/v1/streams/gate/tasks/t1/adapters/production",
                  headers=svc.headers, timeout=30)  # fmt: skip
    assert r.status_code == 200, r.text
    return int(r.json()["version"])


@pytest.mark.parametrize("service", ["server"], indirect=True)
def test_a_good_version_is_promoted_and_a_shuffled_one_refused(service: Service) -> None:
    svc = service
    first, second = (synthetic_tasks(seed=s, train_size=96, test_size=24)[0] for s in (0, 1))
    labels = json.dumps(list(first.labels or ()))
    _post(svc, "", json={"name": "gate", "base": {"kind": "tiny"}})  # default hyperparameters
    made = _post(svc, "/gate/tasks", data={"name": "t1", "labels": labels},
                 files=_files(first.train, first.test))  # fmt: skip
    assert _decided(svc, made["job"])["promoted"]  # the first version beats the base
    assert _production(svc) == 1

    both, tests = first.train + second.train, first.test + second.test
    grown = _post(svc, "/gate/tasks/t1/datasets", data={"labels": labels},
                  files=_files(both, tests))  # fmt: skip
    assert grown["version"] == 2
    good = _post(svc, "/gate/tasks/t1/retrain", json={"promotion": {"task_tolerance": 10}})
    decision = _decided(svc, good)
    assert decision["promoted"] and decision["alias"] == "production", decision
    assert _production(svc) == 2

    shuffled = _post(svc, "/gate/tasks/t1/datasets", data={"labels": labels},
                     files=_files(_shuffled(both, list(first.labels or ())), tests))  # fmt: skip
    assert shuffled["version"] == 3
    bad = _post(svc, "/gate/tasks/t1/retrain", json={})
    decision = _decided(svc, bad)
    assert not decision["promoted"] and "below production's" in decision["reasons"][0], decision
    assert _production(svc) == 2  # unchanged

"""The service end to end with real parts, over HTTP: two Celery worker *processes* on the
Redis at 127.0.0.1:6379, PostgreSQL and the S3 test server (the server deployment), and the
same flow on `strata serve`'s embedded parts (SQLite, a directory, in-process worker threads).

Two streams: three tasks submitted to one and two to the other at once. The first stream's
tasks run in submission order, the streams overlap in time, lineage matches what was trained,
a cancelled job ends `cancelled`, and a schedule fires once per due time.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from continual.data import synthetic_tasks
from services.predict import PredictQuery
from services.scheduler import tick
from services.webhooks import deliver_due
from tests.e2e.helpers import Service, _job, _jsonl, _wait, http
from tests.harness import Receiver
from workers.predict import InProcessPredictor

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
FAST = {"max_steps": 6, "batch_size": 8, "rank": 4}
HOOK_SECRET = "e2e-webhook-secret-1"


def _submit(svc: Service, stream: str, name: str, seed: int, **hyper: Any) -> dict[str, Any]:
    task = synthetic_tasks(seed=seed, train_size=32, test_size=6)[seed % 3]
    data = {"name": name, "labels": json.dumps(list(task.labels or ())),
            "params": json.dumps({"hyperparams": hyper, "eval_limit": 6})}  # fmt: skip
    files = {
        "train": ("train.jsonl", _jsonl(task.train)),
        "test": ("test.jsonl", _jsonl(task.test)),
    }
    r = http.post(f"{svc.url}/v1/streams/{stream}/tasks", data=data, files=files,
                   headers=svc.headers, timeout=60)  # fmt: skip
    assert r.status_code == 202, r.text
    return dict(r.json()["job"])


def _span(job: dict[str, Any]) -> tuple[datetime, datetime]:
    return datetime.fromisoformat(job["started_at"]), datetime.fromisoformat(job["finished_at"])


def test_two_streams_train_in_order_side_by_side_with_lineage_cancel_and_schedules(
    service: Service,
) -> None:
    svc = service
    receiver = Receiver()  # a webhook receiver on loopback, down at first
    receiver.down = True
    hook = {"url": receiver.url, "events": ["job.finished", "adapter.promoted",
            "adapter.refused"], "secret": HOOK_SECRET}  # fmt: skip
    assert http.post(f"{svc.url}/v1/webhooks", json=hook, headers=svc.headers).status_code == 201
    for name in ("news", "reviews"):
        body = {"name": name, "base": {"kind": "tiny"}, "hyperparams": FAST}
        r = http.post(f"{svc.url}/v1/streams", headers=svc.headers, timeout=60, json=body)
        assert r.status_code == 202, r.text  # their imports run first, on the workers

    # five submissions at once over HTTP; each stream's own are issued in order
    def news() -> list[dict[str, Any]]:
        return [_submit(svc, "news", f"n{i}", seed=i) for i in range(3)]

    def reviews() -> list[dict[str, Any]]:
        return [_submit(svc, "reviews", f"r{i}", seed=i + 3) for i in range(2)]

    with ThreadPoolExecutor(2) as pool:
        first, second = pool.submit(news), pool.submit(reviews)
        news_jobs, review_jobs = first.result(), second.result()
    done = _wait(svc, [j["id"] for j in news_jobs + review_jobs])
    assert [j["state"] for j in done] == ["succeeded"] * 5, done
    assert all(j["attempts"] == 1 for j in done)
    n, r = done[:3], done[3:]
    for earlier, later in itertools.pairwise(n):  # submission order, one at a time
        assert _span(earlier)[1] <= _span(later)[0]
    overlap = any(_span(a)[0] < _span(b)[1] and _span(b)[0] < _span(a)[1] for a in n for b in r)
    assert overlap, "the two streams did not train concurrently"
    assert len({j["worker"] for j in done}) == 2  # both workers took jobs

    # lineage: the third news adapter was trained on the first two, its dataset, snapshot v0
    versions = http.get(f"{svc.url}/v1/streams/news/adapters", headers=svc.headers).json()["data"]
    assert [(v["task_name"], v["version"]) for v in versions] == [("n0", 1), ("n1", 1), ("n2", 1)]
    third = versions[2]
    assert third["depends_on"] == [versions[0]["id"], versions[1]["id"]]
    graph = http.get(f"{svc.url}/v1/lineage/adapter/{third['id']}", headers=svc.headers).json()
    nodes = {f"{x['kind']}:{x['id']}" for x in graph["nodes"]}
    assert {f"adapter:{v['id']}" for v in versions} <= nodes
    assert f"dataset:{third['dataset_id']}" in nodes and f"job:{n[2]['id']}" in nodes
    snap = http.get(f"{svc.url}/v1/streams/news/snapshots/0", headers=svc.headers).json()
    assert f"snapshot:{snap['id']}" in nodes
    ev = http.get(f"{svc.url}/v1/streams/news/evaluations", headers=svc.headers).json()
    assert len(ev["values"]) == 3 and ev["backward_transfer"] is not None

    # a prediction through the app's predictor (the server's runs on the predict worker) is
    # the one this process computes from the same stored state
    query = {"inputs": ["some words to classify", "and more"], "task": "n1"}
    said = http.post(f"{svc.url}/v1/streams/news/predict", json=query, headers=svc.headers,
                      timeout=120)  # fmt: skip
    assert said.status_code == 200, said.text
    here = InProcessPredictor(svc.inst).predict(
        PredictQuery(stream="news", inputs=tuple(query["inputs"]), task="n1"),
        cancel=threading.Event(),
    )
    assert said.json() == here and len(here["predictions"]) == 2

    # cancelling a running job ends it `cancelled`, with nothing published
    long = _submit(svc, "reviews", "slow", seed=5, max_steps=100_000, batch_size=8, rank=4)
    _wait(svc, [long["id"]], until=("running",))
    time.sleep(1)
    http.post(f"{svc.url}/v1/jobs/{long['id']}/cancel", headers=svc.headers)
    assert _wait(svc, [long["id"]])[0]["state"] == "cancelled"
    slow = http.get(f"{svc.url}/v1/streams/reviews/adapters", params={"task": "slow"},
                     headers=svc.headers).json()["data"]  # fmt: skip
    assert slow == []

    # n1's data grows (dataset version 2, uploaded over HTTP); then a schedule fires once per
    # due time, only from the leading scheduler, and retrains n1 on its newest version
    task = synthetic_tasks(seed=7, train_size=32, test_size=6)[1]
    grown = http.post(
        f"{svc.url}/v1/streams/news/tasks/n1/datasets", headers=svc.headers, timeout=60,
        data={"labels": json.dumps(list(task.labels or ()))},
        files={"train": ("train.jsonl", _jsonl(task.train)),
               "test": ("test.jsonl", _jsonl(task.test))},
    )  # fmt: skip
    assert grown.status_code == 201 and grown.json()["version"] == 2, grown.text
    made = http.post(f"{svc.url}/v1/streams/news/schedules", headers=svc.headers, json={
        "kind": "retrain", "cron": "*/5 * * * *", "task": "n1"}).json()  # fmt: skip
    due = datetime.fromisoformat(made["next_run_at"])
    for holder, offset in (("a", 1), ("a", 2), ("b", 3)):
        tick(svc.inst, svc.dispatcher, holder=holder, now=due + timedelta(seconds=offset))
    jobs = http.get(f"{svc.url}/v1/jobs", params={"stream": "news"}, headers=svc.headers).json()
    retrains = [j for j in jobs["data"] if j["kind"] == "retrain"]
    assert len(retrains) == 1 and retrains[0]["params"]["schedule_id"] == made["id"]
    assert retrains[0]["params"]["dataset_version"] == 2
    assert _wait(svc, [retrains[0]["id"]])[0]["state"] == "succeeded"
    n1 = http.get(f"{svc.url}/v1/streams/news/adapters", params={"task": "n1"},
                   headers=svc.headers).json()["data"]  # fmt: skip
    assert [v["version"] for v in n1] == [1, 2]
    listed = http.get(f"{svc.url}/v1/streams/news/schedules", headers=svc.headers).json()
    assert listed["data"][0]["last_job_id"] == retrains[0]["id"]

    # every train job decided its promotion; the webhook receiver, down while the ticks above
    # delivered, gets every event signed once it is back
    for job in done:
        assert _job(svc, job["id"])["result"]["promotion"]["alias"] == "production"
    assert receiver.got == []
    receiver.down = False
    deliver_due(svc.inst, now=due + timedelta(days=1))
    events = []
    for headers, raw in receiver.got:
        sign = "sha256=" + hmac.new(HOOK_SECRET.encode(), raw, hashlib.sha256).hexdigest()
        assert headers["X-Strata-Signature"] == sign
        events.append(json.loads(raw))
    finished = {e["data"]["job"]["id"] for e in events if e["event"] == "job.finished"}
    assert {j["id"] for j in done} | {retrains[0]["id"], long["id"]} <= finished
    decided = [e for e in events if e["event"] in ("adapter.promoted", "adapter.refused")]
    assert len(decided) >= 6  # five train jobs and the retrain
    receiver.server.shutdown()

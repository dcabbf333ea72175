"""The REST API on both deployments: auth, validation errors as problem+json, uploads, jobs,
and a trained task's adapters, lineage, evaluations and predictions."""

from __future__ import annotations

import dataclasses
import gc
import gzip
import io
import json
import tarfile
import time
import uuid
from pathlib import Path
from typing import Any

import anyio.to_thread
import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from peft import PeftModel

from api.app import create_app, freeze_startup_objects
from continual.data import synthetic_tasks
from registry.instance import open_instance
from registry.settings import StrataSettings
from services.datasets import load_dataset
from tests.api.conftest import Api, Recorder
from tests.conftest import PG_ADMIN_URL
from workers.models import load_snapshot

FAST = {"max_steps": 4, "batch_size": 8}
PROBLEM = "application/problem+json"


def _jsonl(records: list[dict[str, Any]]) -> str:
    return "\n".join(json.dumps(r) for r in records) + "\n"


def _task_files(seed: int = 0, index: int = 0, n: int = 24) -> tuple[str, str, list[str]]:
    task = synthetic_tasks(seed=seed, train_size=n, test_size=6)[index]
    as_records = lambda xs: [{"prompt": e.prompt, "completion": e.completion} for e in xs]  # noqa: E731
    return _jsonl(as_records(task.train)), _jsonl(as_records(task.test)), list(task.labels or ())


def _problem(response: Any, status: int, field: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM)
    body: dict[str, Any] = response.json()
    assert body["status"] == status and body["detail"] and body["code"]
    if field is not None:
        assert body.get("field") == field, body
    return body


def _stream(api: Api, name: str = "s1", **body: Any) -> dict[str, Any]:
    """A ready stream on the tiny base (its import job run: see `Api.create_stream`)."""
    return api.create_stream({"name": name, "base": {"kind": "tiny"}, "hyperparams": FAST, **body})


DEEP = "[" * 2000 + "]" * 2000  # 4 KB, 2000 levels


def _submit(api: Api, stream: str, name: str, **kwargs: Any) -> Any:
    train, test, labels = _task_files(**kwargs)
    data = {"name": name, "labels": json.dumps(labels), "params": json.dumps({"eval_limit": 6})}
    files = {"train": ("train.jsonl", train), "test": ("test.jsonl", test)}
    return api.client.post(f"/v1/streams/{stream}/tasks", data=data, files=files,
                           headers=api.auth("write"))  # fmt: skip


def _wait(api: Api, job_id: int, timeout: float = 300) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job: dict[str, Any] = api.client.get(f"/v1/jobs/{job_id}", headers=api.auth()).json()
        if job["state"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not finish")


def test_every_route_but_health_needs_a_token_with_the_right_scope(api: Api) -> None:
    c = api.client
    assert c.get("/health").json() == {
        "status": "ok", "checks": {"database": "ok", "store": "ok"}}  # fmt: skip
    r = c.get("/v1/streams")
    _problem(r, 401, "authorization")
    assert r.headers["www-authenticate"].startswith("Bearer")
    _problem(c.get("/v1/streams", headers={"Authorization": "Bearer strata_nope"}), 401)
    _problem(c.get("/v1/streams", headers={"Authorization": "Basic abc"}), 401)
    assert c.get("/v1/streams", headers=api.auth("read")).status_code == 200
    body = {"name": "s", "base": {"kind": "tiny"}}
    _problem(c.post("/v1/streams", json=body, headers=api.auth("read")), 403, "authorization")
    _problem(c.get("/v1/tokens", headers=api.auth("write")), 403)
    # an admin creates and revokes a token; the revoked one stops working at once
    made = c.post("/v1/tokens", json={"name": "ci", "scopes": ["read"]}, headers=api.auth())
    assert made.status_code == 201 and made.json()["token"].startswith("strata_")
    ci = {"Authorization": f"Bearer {made.json()['token']}"}
    assert c.get("/v1/streams", headers=ci).status_code == 200
    assert c.delete(f"/v1/tokens/{made.json()['id']}", headers=api.auth()).json()["revoked_at"]
    _problem(c.get("/v1/streams", headers=ci), 401)
    listed = c.get("/v1/tokens", headers=api.auth()).json()
    assert all("token" not in t for t in listed["data"])  # secrets are never listed
    spec = c.get("/openapi.json").json()
    assert "/v1/streams/{stream}/tasks" in spec["paths"]


def test_streams_create_list_get_and_refuse_bad_input(api: Api) -> None:
    c, h = api.client, api.auth("write")
    created = _stream(api)
    assert created["name"] == "s1" and created["hyperparams"]["max_steps"] == 4
    assert c.get("/v1/streams/s1", headers=h).json()["id"] == created["id"]
    assert [s["name"] for s in c.get("/v1/streams", headers=h).json()["data"]] == ["s1"]
    _problem(c.post("/v1/streams", json={"name": "s1", "base": {"kind": "tiny"}}, headers=h),
             409, "name")  # fmt: skip
    cases = [
        ({"name": "../x", "base": {"kind": "tiny"}}, "name"),
        ({"name": "ok", "base": {"kind": "pickle"}}, "base.kind"),
        ({"name": "ok", "base": {"kind": "hf", "path": "/nonexistent"}}, "base.path"),
        ({"name": "ok", "base": {"kind": "tiny"}, "hyperparams": {"rank": -1}}, "rank"),
        ({"name": "ok", "base": {"kind": "tiny"}, "hyperparams": {"nope": 1}}, "nope"),
        ({"name": "ok", "base": {"kind": "tiny"}, "method": "magic"}, "method"),
        ({"name": "ok", "base": {"kind": "tiny"}, "extra": 1}, "extra"),
        ({"base": {"kind": "tiny"}}, "name"),
    ]
    for body, field in cases:
        _problem(c.post("/v1/streams", json=body, headers=h), 422, field)
    _problem(c.get("/v1/streams/missing", headers=h), 404, "stream")
    _problem(c.post("/v1/streams", content=b"{not json", headers={**h, "content-type":
             "application/json"}), 422)  # fmt: skip
    assert [s["name"] for s in c.get("/v1/streams", headers=h).json()["data"]] == ["s1"]


def test_relora_hyperparameters_are_validated_as_one_setting(api: Api) -> None:
    """ReLoRA's three hyperparameters are checked together: a stream's defaults or a task's
    overrides that do not fit are a 422 naming the field, and nothing is queued."""
    c, h = api.client, api.auth("write")
    tiny = {"name": "r", "base": {"kind": "tiny"}}
    for hyper, field in [
        ({"relora_every": 0}, "relora_every"),
        ({"relora_every": 10, "relora_warmup": 10}, "relora_warmup"),
        ({"relora_every": 10, "relora_prune": 1.0}, "relora_prune"),
        ({"relora_warmup": 5}, "relora_warmup"),  # ReLoRA is off
    ]:
        body = _problem(c.post("/v1/streams", json={**tiny, "hyperparams": hyper}, headers=h),
                        422, field)  # fmt: skip
        assert body["code"] == "invalid_hyperparameter"
    made = _stream(api, "r", hyperparams={**FAST, "relora_every": 2})
    assert made["hyperparams"]["relora_every"] == 2
    imported = list(api.dispatcher.sent)  # the import job
    train, test, labels = _task_files()
    files = {"train": ("train.jsonl", train), "test": ("test.jsonl", test)}
    off_with_prune = {"relora_every": None, "relora_prune": 0.5}
    for params, field in [
        ({"relora_warmup": 2}, "relora_warmup"),
        (off_with_prune, "relora_prune"),
    ]:
        data = {"name": "t", "labels": json.dumps(labels),
                "params": json.dumps({"hyperparams": params})}  # fmt: skip
        _problem(c.post("/v1/streams/r/tasks", data=data, files=files, headers=h), 422, field)
    assert api.dispatcher.sent == imported
    assert c.get("/v1/streams/r/tasks", headers=h).json()["count"] == 0


def test_task_uploads_queue_jobs_and_bad_datasets_are_refused_before_training(api: Api) -> None:
    c, h = api.client, api.auth("write")
    imported = _stream(api)
    r = _submit(api, "s1", "t1")
    assert r.status_code == 202, r.text
    job = r.json()["job"]
    assert job["state"] == "queued" and job["kind"] == "train"
    assert api.dispatcher.sent[1:] == [job["id"]]  # sent after commit, after the import job
    assert api.inst.registry.jobs.get(api.dispatcher.sent[0]).stream_id == imported["id"]
    assert api.inst.registry.jobs.get(job["id"]).enqueued_at is not None
    digest = r.json()["task"]["dataset_digest"]
    # a stored dataset is reused by digest
    reuse = c.post("/v1/streams/s1/tasks", data={"name": "t2", "dataset": digest}, headers=h)
    assert reuse.status_code == 202 and reuse.json()["task"]["dataset_digest"] == digest
    # CL_Benchmark JSON with labels; no test file: 10% held out
    records = [{"sentence": f"text {i}", "label": "a" if i % 2 else "b"} for i in range(20)]
    cl = c.post("/v1/streams/s1/tasks", headers=h, files={"train": ("t.json", json.dumps(records))},
                data={"name": "t3", "format": "cl_benchmark", "labels": '["a", "b"]'})  # fmt: skip
    assert cl.status_code == 202, cl.text
    stored = api.inst.registry.tasks.get_dataset(cl.json()["task"]["dataset_digest"])
    assert (stored.num_train, stored.num_test) == (18, 2)

    train, _, _ = _task_files()
    bad: list[tuple[dict[str, Any], dict[str, Any], str, int | None]] = [
        ({"name": "x"}, {"train": ("t", "")}, "train", None),
        ({"name": "x"}, {"train": ("t", b"\xff\xfe bad")}, "train", None),
        ({"name": "x"}, {"train": ("t", train + "{oops\n")}, "train", 25),
        ({"name": "x"}, {"train": ("t", '{"prompt": "p"}\n')}, "train.completion", 1),
        ({"name": "x", "labels": '["zz"]'}, {"train": ("t", train)}, "train.completion", 1),
        ({"name": "x"}, {"train": ("t", "x" * 5000 + "\n")}, "train", 1),
        ({"name": "x"}, {"train": ("t", _jsonl([{"prompt": "p", "completion": "c"}] * 600))},
         "train", None),
        ({"name": "x", "format": "cl_benchmark"}, {"train": ("t", "[]")}, "labels", None),
        ({"name": "x", "format": "csv"}, {"train": ("t", train)}, "format", None),
        ({"name": "x"}, {}, "train", None),
        ({"name": "x", "dataset": digest}, {"train": ("t", train)}, "dataset", None),
        ({"name": "x", "dataset": "f" * 64}, {}, "dataset", None),
        ({"name": "x", "params": "{bad"}, {"train": ("t", train)}, "params", None),
        ({"name": "x", "params": '{"hyperparams": {"rank": 0}}'}, {"train": ("t", train)},
         "rank", None),
        ({"name": "x", "params": '{"surprise": 1}'}, {"train": ("t", train)}, "surprise", None),
        ({"name": "t1"}, {"train": ("t", train)}, "name", None),
        ({"name": "../evil"}, {"train": ("t", train)}, "name", None),
        # nested deeper than json's parser recurses (it raised RecursionError: a 500)
        ({"name": "x", "labels": DEEP}, {"train": ("t", train)}, "labels", None),
        ({"name": "x", "params": DEEP}, {"train": ("t", train)}, "params", None),
        ({"name": "x"}, {"train": ("t", train + DEEP + "\n")}, "train", 25),
        ({"name": "x", "format": "cl_benchmark", "labels": '["a"]'}, {"train": ("t", DEEP)},
         "train", None),
    ]  # fmt: skip
    for data, files, field, line in bad:
        r = c.post("/v1/streams/s1/tasks", data=data, files=files or None, headers=h)
        assert r.status_code in (404, 409, 422), (data, r.text)
        body = _problem(r, r.status_code, field)
        if line is not None:
            assert body["line"] == line and f"line {line}" in body["detail"]
    listed = json.dumps([{"sentence": "s", "label": "a"}, {"label": "a"}], indent=2)
    r = c.post("/v1/streams/s1/tasks", files={"train": ("t.json", listed)}, headers=h,
               data={"name": "x", "format": "cl_benchmark", "labels": '["a"]'})  # fmt: skip
    body = _problem(r, 422, "train.sentence")  # a JSON list's errors name the record, not a line
    assert (body["record"], body["line"], body["detail"]) == (2, None, "record 2: missing")
    huge = c.post("/v1/streams/s1/tasks", data={"name": "big"}, headers=h,
                  files={"train": ("t", "x" * 100_000)})  # fmt: skip
    _problem(huge, 413, "body")
    assert [t["name"] for t in c.get("/v1/streams/s1/tasks", headers=h).json()["data"]] == [
        "t1",
        "t2",
        "t3",
    ]  # nothing half-stored


def test_jobs_list_pages_cancel_and_events(api: Api) -> None:
    c, h = api.client, api.auth("write")
    _stream(api)
    _stream(api, "s2")
    imports = list(api.dispatcher.sent)
    ids = [_submit(api, "s1", f"t{i}").json()["job"]["id"] for i in range(3)]
    other = _submit(api, "s2", "x").json()["job"]["id"]
    page = c.get("/v1/jobs", params={"limit": 2}, headers=h).json()
    assert [j["id"] for j in page["data"]] == imports and page["next_cursor"] == imports[1]
    assert [j["kind"] for j in page["data"]] == ["import", "import"]
    page = c.get("/v1/jobs", params={"limit": 2, "cursor": imports[1]}, headers=h).json()
    assert [j["id"] for j in page["data"]] == ids[:2] and page["next_cursor"] == ids[1]
    rest = c.get("/v1/jobs", params={"limit": 2, "cursor": page["next_cursor"]}, headers=h).json()
    assert [j["id"] for j in rest["data"]] == [ids[2], other]
    by_stream = c.get("/v1/jobs", params={"stream": "s2"}, headers=h).json()["data"]
    assert [j["id"] for j in by_stream] == [imports[1], other]
    cancelled = c.post(f"/v1/jobs/{ids[0]}/cancel", headers=h)
    assert cancelled.status_code == 202 and cancelled.json()["state"] == "cancelled"
    _problem(c.post(f"/v1/jobs/{ids[0]}/cancel", headers=h), 409, "state")
    states = c.get("/v1/jobs", params={"state": "cancelled"}, headers=h).json()["data"]
    assert [j["id"] for j in states] == [ids[0]]
    _problem(c.get("/v1/jobs", params={"state": "sleeping"}, headers=h), 422, "state")
    _problem(c.get("/v1/jobs/99999", headers=h), 404, "job")
    api.inst.registry.jobs.add_event(ids[1], message="hello", metrics={"step": 1})
    api.inst.registry.jobs.add_event(ids[1], message="again")
    events = c.get(f"/v1/jobs/{ids[1]}/events", params={"limit": 1}, headers=h).json()
    assert [e["message"] for e in events["data"]] == ["hello"]
    more = c.get(f"/v1/jobs/{ids[1]}/events", params={"cursor": events["next_cursor"]},
                 headers=h).json()  # fmt: skip
    assert [e["message"] for e in more["data"]] == ["again"] and more["next_cursor"] is None
    with c.stream("GET", f"/v1/jobs/{ids[0]}/events/stream", headers=h) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        text = "".join(stream.iter_text())
    assert "event: state" in text and text.rstrip().endswith('data: {"state": "cancelled"}')


@pytest.mark.slow
def test_a_trained_task_can_be_downloaded_traced_evaluated_and_queried(
    live_api: Api, tmp_path: Path
) -> None:
    api = live_api
    c, h = api.client, api.auth("write")
    _stream(api)
    job = _submit(api, "s1", "colors", n=48).json()["job"]
    assert _wait(api, job["id"])["state"] == "succeeded"
    with c.stream("GET", f"/v1/jobs/{job['id']}/events/stream", headers=h) as stream:
        text = "".join(stream.iter_text())
    assert "event: job-event" in text and '"loss"' in text and "event: end" in text

    versions = c.get("/v1/streams/s1/adapters", headers=h).json()["data"]
    assert [(v["task_name"], v["version"], v["status"]) for v in versions] == [
        ("colors", 1, "ready")
    ]
    v1 = c.get("/v1/streams/s1/tasks/colors/adapters/latest", headers=h).json()
    assert v1["id"] == versions[0]["id"] and "accuracy" in v1["metrics"]
    # aliases move; reserved and unknown ones are refused
    assert c.put("/v1/streams/s1/tasks/colors/aliases/prod", json={"version": 1},
                 headers=h).json()["aliases"] == ["latest", "prod"]  # fmt: skip
    assert c.get("/v1/streams/s1/tasks/colors/adapters/prod", headers=h).json()["version"] == 1
    _problem(c.put("/v1/streams/s1/tasks/colors/aliases/latest", json={"version": 1}, headers=h),
             422, "alias")  # fmt: skip
    _problem(c.put("/v1/streams/s1/tasks/colors/aliases/x", json={"version": 9}, headers=h), 404)
    assert c.delete("/v1/streams/s1/tasks/colors/aliases/prod", headers=h).status_code == 204
    _problem(c.get("/v1/streams/s1/tasks/colors/adapters/prod", headers=h), 404)

    # the download is a PEFT directory that loads on the stream's base
    r = c.get("/v1/streams/s1/tasks/colors/adapters/1/download", headers=h)
    assert r.status_code == 200 and r.headers["content-type"] == "application/x-tar"
    assert r.headers["content-length"] == str(len(r.content))  # announced before the first byte
    assert r.headers["content-disposition"] == 'attachment; filename="s1-colors-v1.tar"'
    with tarfile.open(fileobj=io.BytesIO(r.content), mode="r:") as archive:
        archive.extractall(tmp_path, filter="data")
    gz = c.get("/v1/streams/s1/tasks/colors/adapters/1/download", params={"format": "tar.gz"},
               headers=h)  # fmt: skip
    assert gz.status_code == 200 and gz.headers["content-type"] == "application/gzip"
    assert "content-length" not in gz.headers and gzip.decompress(gz.content) == r.content
    _problem(c.get("/v1/streams/s1/tasks/colors/adapters/1/download", params={"format": "zip"},
                   headers=h), 422, "format")  # fmt: skip
    folder = tmp_path / "s1-colors-v1"
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json",
                                                        "adapter_model.safetensors"]  # fmt: skip
    snapshot = api.inst.registry.streams.current_snapshot(v1["stream_id"])
    base, _ = load_snapshot(api.inst, snapshot)
    assert isinstance(PeftModel.from_pretrained(base, folder), PeftModel)
    snaps = c.get("/v1/streams/s1/snapshots", headers=h).json()
    assert snaps["count"] == 1 and snaps["data"][0]["current"] is True
    snap = c.get("/v1/streams/s1/snapshots/0/download", headers=h)
    assert snap.status_code == 200 and len(snap.content) > 1000

    graph = c.get(f"/v1/lineage/adapter/{v1['id']}", headers=h).json()
    kinds = {n["kind"] for n in graph["nodes"]}
    assert {"adapter", "snapshot", "dataset", "job"} <= kinds
    assert {"relation": "trained_with", "child": f"adapter:{v1['id']}",
            "parent": f"dataset:{v1['dataset_id']}"} in graph["edges"]  # fmt: skip
    down = c.get(f"/v1/lineage/snapshot/{snapshot.id}", params={"direction": "descendants"},
                 headers=h).json()  # fmt: skip
    assert f"adapter:{v1['id']}" in {f"{n['kind']}:{n['id']}" for n in down["nodes"]}
    _problem(c.get("/v1/lineage/adapter/999", headers=h), 404)
    _problem(c.get("/v1/lineage/planet/1", headers=h), 422, "kind")

    ev = c.get("/v1/streams/s1/evaluations", headers=h).json()
    assert ev["task_names"] == ["colors"] and len(ev["values"]) == 1
    assert ev["average_accuracy"] == pytest.approx(ev["values"][0][0])
    assert v1["metrics"]["accuracy"] == pytest.approx(ev["values"][0][0])
    # re-evaluating the current state (a job on the default queue) measures the same row
    again = c.post("/v1/streams/s1/evaluate", json={"eval_limit": 6}, headers=h)
    assert again.status_code == 202 and again.json()["kind"] == "evaluate"
    assert _wait(api, again.json()["id"])["state"] == "succeeded"
    assert c.get("/v1/streams/s1/evaluations", headers=h).json()["values"] == ev["values"]
    _problem(
        c.post("/v1/streams/s1/evaluate", json={"eval_limit": 0}, headers=h), 422, "eval_limit"
    )

    train, _, labels = _task_files(n=48)
    prompt = json.loads(train.splitlines()[0])["prompt"]
    out = c.post("/v1/streams/s1/predict", json={"inputs": [prompt], "labels": labels},
                 headers=h).json()  # fmt: skip
    assert out["adapters"] == ["colors@v1"] and out["predictions"][0]["output"] in labels
    assert set(out["predictions"][0]["scores"]) == set(labels)
    # raw text on the task's version generates; with its template its labels are ranked
    # (tests/api/test_predict.py checks both against references)
    raw = {"inputs": [prompt], "task": "colors", "version": "1", "template": False}
    gen = c.post("/v1/streams/s1/predict", json={**raw, "max_new_tokens": 3}, headers=h).json()
    assert isinstance(gen["predictions"][0]["output"], str)
    assert gen["predictions"][0]["scores"] is None
    ranked = c.post("/v1/streams/s1/predict", json={**raw, "template": True}, headers=h).json()
    assert set(ranked["predictions"][0]["scores"]) == set(labels)
    _problem(c.post("/v1/streams/s1/predict", json={"inputs": []}, headers=h), 422, "inputs")
    _problem(c.post("/v1/streams/s1/predict", json={"inputs": ["x"], "task": "nope"}, headers=h),
             404, "task")  # fmt: skip


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


def test_consolidation_routes_refuse_what_cannot_be_folded(api: Api) -> None:
    c, h = api.client, api.auth("write")
    made = api.create_stream({"name": "s", "base": {"kind": "tiny"},
                              "consolidation": {"every_tasks": 2}})  # fmt: skip
    assert made["consolidation"] == {"every_tasks": 2}
    imported = list(api.dispatcher.sent)
    # nothing to evaluate yet: refused up front, and no job is queued
    _problem(c.post("/v1/streams/s/evaluate", json={}, headers=h), 409, "stream")
    assert api.dispatcher.sent == imported
    assert [j["kind"] for j in c.get("/v1/jobs", headers=h).json()["data"]] == ["import"]
    policy = c.put("/v1/streams/s/consolidation", json={"max_rank": 64}, headers=h)
    assert policy.json()["consolidation"] == {"max_rank": 64}
    _problem(c.put("/v1/streams/s/consolidation", json={"max_rank": 0}, headers=h), 422, "max_rank")
    _problem(c.put("/v1/streams/s/consolidation", json={"often": 1}, headers=h), 422, "often")
    queued = c.post("/v1/streams/s/consolidate", json={}, headers=h)
    assert queued.status_code == 202 and queued.json()["kind"] == "consolidate"
    assert api.dispatcher.sent == [*imported, queued.json()["id"]]
    api.create_stream({"name": "am", "base": {"kind": "tiny"}, "method": "am-lora"})
    # am-lora streams fold too, gated by max_drop (the request's, else the policy's)
    folding = c.post("/v1/streams/am/consolidate", json={"max_drop": 5}, headers=h)
    assert folding.status_code == 202 and folding.json()["params"]["max_drop"] == 5
    _problem(c.post("/v1/streams/am/consolidate", json={"max_drop": -1}, headers=h), 422,
             "max_drop")  # fmt: skip
    policy = c.put("/v1/streams/am/consolidation", json={"every_tasks": 2, "max_drop": 3.5},
                   headers=h)  # fmt: skip
    assert policy.status_code == 200
    assert policy.json()["consolidation"] == {"every_tasks": 2, "max_drop": 3.5}
    _problem(c.put("/v1/streams/am/consolidation", json={"max_drop": 101}, headers=h), 422,
             "max_drop")  # fmt: skip
    am2 = {"name": "am2", "base": {"kind": "tiny"}, "method": "am-lora",
           "consolidation": {"every_tasks": 1}}  # fmt: skip
    assert c.post("/v1/streams", headers=h, json=am2).status_code == 202
    _problem(c.post("/v1/streams/s/snapshots/7/activate", headers=h), 404)
    activated = c.post("/v1/streams/s/snapshots/0/activate", headers=h)
    assert activated.status_code == 200 and activated.json()["current"] is True
    _problem(c.post("/v1/streams/s/snapshots/0/activate", headers=api.auth("read")), 403)


def test_tokens_never_reach_logs_or_error_documents(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG")
    secret = api.tokens["write"]
    wrong = secret[:-4] + "abcd"
    answers = [
        api.client.get("/v1/streams", headers={"Authorization": f"Bearer {secret}"}),
        api.client.get("/v1/streams", headers={"Authorization": f"Bearer {wrong}"}),
        api.client.post(
            "/v1/streams",
            json={"name": "../x", "base": {"kind": "tiny"}},
            headers={"Authorization": f"Bearer {secret}"},
        ),
        api.client.get("/v1/tokens", headers={"Authorization": f"Bearer {secret}"}),
    ]
    assert [r.status_code for r in answers] == [200, 401, 422, 403]
    for text in (caplog.text, *(r.text for r in answers)):
        assert secret not in text and wrong not in text and secret[7:] not in text


def test_gzip_uploads_are_read_and_compression_bombs_refused_before_anything_is_stored(
    api: Api,
) -> None:
    c, h = api.client, api.auth("write")
    _stream(api)
    train, test, labels = _task_files()
    packed = {"train": ("train.jsonl.gz", gzip.compress(train.encode())),
              "test": ("test.jsonl.gz", gzip.compress(test.encode()))}  # fmt: skip
    ok = c.post("/v1/streams/s1/tasks", data={"name": "zipped", "labels": json.dumps(labels)},
                files=packed, headers=h)  # fmt: skip
    assert ok.status_code == 202, ok.text
    plain = _submit(api, "s1", "plain")
    zipped_data, plain_data = (
        load_dataset(
            api.inst, api.inst.registry.tasks.get_dataset(r.json()["task"]["dataset_digest"])
        )
        for r in (ok, plain)
    )  # the same examples, decompressed
    assert (zipped_data.train, zipped_data.test) == (plain_data.train, plain_data.test)
    # a concatenation of gzip members (`cat a.gz b.gz`) is read whole, as gzip reads it
    half = train.index("\n", len(train) // 2) + 1
    members = gzip.compress(train[:half].encode()) + gzip.compress(train[half:].encode())
    joined = c.post("/v1/streams/s1/tasks", data={"name": "members", "labels": json.dumps(labels)},
                    files={"train": ("t.gz", members + b"\0" * 512), "test": packed["test"]},
                    headers=h)  # fmt: skip
    assert joined.status_code == 202, joined.text
    digest = joined.json()["task"]["dataset_digest"]
    joined_data = load_dataset(api.inst, api.inst.registry.tasks.get_dataset(digest))
    assert joined_data.train == plain_data.train
    bad_member = gzip.compress(train[:half].encode()) + b"not a gzip member"
    r = c.post("/v1/streams/s1/tasks", data={"name": "bad_member"},
               files={"train": ("t.gz", bad_member)}, headers=h)  # fmt: skip
    assert "not a valid gzip file" in _problem(r, 422, "train")["detail"]
    bomb = gzip.compress(b"{" * (2 * 2**20))  # 2 MiB of one byte packs into a few KiB
    assert len(bomb) < 10_000
    limits = api.inst.settings.model_copy(update={"max_expanded_bytes": 2**20})
    api.client.app.state.inst = dataclasses.replace(api.inst, settings=limits)  # type: ignore[attr-defined]
    r = c.post("/v1/streams/s1/tasks", data={"name": "bomb"}, files={"train": ("b.gz", bomb)},
               headers=h)  # fmt: skip
    body = _problem(r, 422, "train")  # the first limit it passes: its first line's
    assert body["detail"] == "line 1: longer than 4096 bytes" and body["line"] == 1
    line = json.dumps({"prompt": "p" * 4000, "completion": " a"}) + "\n"  # a valid line
    bomb = gzip.compress((line * 300).encode())  # 1.2 MB of examples, under every other limit
    r = c.post("/v1/streams/s1/tasks", data={"name": "bomb"}, files={"train": ("b.gz", bomb)},
               headers=h)  # fmt: skip
    assert "expands to more than 1048576 bytes" in _problem(r, 422, "train")["detail"]
    listed = gzip.compress(b"[" + b" " * 2**21 + b"]")  # a JSON list: whitespace is read on
    r = c.post("/v1/streams/s1/tasks", files={"train": ("b.gz", listed)}, headers=h,
               data={"name": "bomb", "format": "cl_benchmark", "labels": '["a"]'})  # fmt: skip
    assert "expands to more than 1048576 bytes" in _problem(r, 422, "train")["detail"]
    spread = gzip.compress((line * 150).encode()) * 2  # two members under the limit, not together
    r = c.post("/v1/streams/s1/tasks", data={"name": "spread"},
               files={"train": ("s.gz", spread)}, headers=h)  # fmt: skip
    assert "expands to more than 1048576 bytes" in _problem(r, 422, "train")["detail"]
    broken = gzip.compress(train.encode())[:-20]
    r = c.post("/v1/streams/s1/tasks", data={"name": "broken"},
               files={"train": ("t.gz", broken)}, headers=h)  # fmt: skip
    _problem(r, 422, "train")
    names = [t["name"] for t in c.get("/v1/streams/s1/tasks", headers=h).json()["data"]]
    assert names == ["zipped", "plain", "members"]


def test_blocking_routes_share_api_threads_threads_and_as_many_pooled_connections(
    tmp_path: Path,
) -> None:
    inst = open_instance(StrataSettings(data_dir=tmp_path, api_threads=12))
    try:
        assert inst.registry.engine.pool.size() == 12  # type: ignore[attr-defined]
        app = create_app(inst, Recorder())

        @app.get("/threads")
        async def threads() -> float:
            return anyio.to_thread.current_default_thread_limiter().total_tokens

        with TestClient(app) as client:  # the lifespan sets the limit of the server's loop
            assert client.get("/threads").json() == 12
    finally:
        inst.registry.close()
    small = open_instance(StrataSettings(data_dir=tmp_path / "small", api_threads=1))
    try:
        assert small.registry.engine.pool.size() == 5  # never fewer than SQLAlchemy's default
    finally:
        small.registry.close()
    with pytest.raises(ValueError, match="api_threads"):
        StrataSettings(data_dir=tmp_path, api_threads=0)


def test_freezing_the_startup_heap_leaves_it_out_of_the_collectors_passes() -> None:
    held = len(gc.get_objects())
    try:
        freeze_startup_objects()
        assert gc.get_freeze_count() >= held // 2  # what the process held is frozen
        assert len(gc.get_objects()) < held // 10  # and no longer scanned by a full pass
    finally:
        gc.unfreeze()  # the rest of the test session collects as before


def test_json_bodies_nested_deeper_than_the_parser_recurses_are_refused(api: Api) -> None:
    # FastAPI answers a body its JSON parser cannot read with 400 (multipart fields: 422 above)
    body = '{"name": "s", "base": {"kind": "tiny"}, "hyperparams": {"x": ' + DEEP + "}}"
    r = api.client.post("/v1/streams", content=body, headers={**api.auth("write"),
                        "content-type": "application/json"})  # fmt: skip
    assert "error parsing the body" in _problem(r, 400)["detail"]
    assert api.client.get("/v1/streams", headers=api.auth()).json()["data"] == []


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_database_never_migrated_answers_503_saying_to_migrate(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    admin, name = None, f"strata_empty_{uuid.uuid4().hex[:10]}"
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path / 'empty.db'}"
    else:
        admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        url = admin.url.set(database=name).render_as_string(hide_password=False)
    inst = open_instance(StrataSettings(data_dir=tmp_path, database_url=url), upgrade=False)
    try:
        with TestClient(create_app(inst, Recorder()), raise_server_exceptions=False) as c:
            for r in (
                c.get("/health"),
                c.get("/v1/streams", headers={"Authorization": "Bearer strata_x"}),
            ):
                body = _problem(r, 503)
                assert "strata migrate" in body["detail"] and r.headers["Retry-After"]
    finally:
        inst.close()
        if admin is not None:
            with admin.connect() as conn:
                conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            admin.dispose()

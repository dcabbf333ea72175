"""A task's dataset versions (`/v1/streams/{s}/tasks/{t}/datasets`) and retraining on one of
them (`.../retrain`), with replay; a cron retrain takes the newest version or skips."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from api.cli import main
from api.client import ApiError, StrataClient
from services.scheduler import fire_due
from tests.api.conftest import Api
from tests.api.helpers import FAST, _problem, _stream, _submit, _task_files
from workers.runner import run_job


def _add(api: Api, task: str, *, seed: int, n: int = 24, stream: str = "s1") -> Any:
    train, test, labels = _task_files(seed=seed, n=n)
    return api.client.post(
        f"/v1/streams/{stream}/tasks/{task}/datasets",
        data={"labels": json.dumps(labels)},
        files={"train": ("train.jsonl", train), "test": ("test.jsonl", test)},
        headers=api.auth("write"),
    )


def _versions(api: Api, task: str = "t1") -> list[dict[str, Any]]:
    r = api.client.get(f"/v1/streams/s1/tasks/{task}/datasets", headers=api.auth("read"))
    assert r.status_code == 200, r.text
    return list(r.json()["data"])


def _trained(api: Api) -> dict[str, Any]:
    """Stream s1 with task t1 submitted and trained (adapter v1)."""
    _stream(api, hyperparams=FAST)
    made = _submit(api, "s1", "t1")
    assert made.status_code == 202, made.text
    assert run_job(api.inst, made.json()["job"]["id"]).state == "succeeded"
    return dict(made.json()["task"])


def test_versions_grow_and_the_same_content_is_the_same_version(api: Api) -> None:
    task = _trained(api)
    (first,) = _versions(api)
    assert first["version"] == 1 and first["digest"] == task["dataset_digest"]
    assert first["examples"] == 24 and first["test_examples"] == 6
    added = _add(api, "t1", seed=1, n=30)
    assert added.status_code == 201, added.text
    second = added.json()
    assert second["version"] == 2 and second["examples"] == 30
    assert second["digest"] != first["digest"]
    again = _add(api, "t1", seed=1, n=30)  # the newest version's content: that version
    assert again.status_code == 200 and again.json() == second
    back = _add(api, "t1", seed=0)  # the first version's content: a new version, the same blob
    assert back.status_code == 201 and back.json()["version"] == 3
    assert back.json()["digest"] == first["digest"]
    assert [v["version"] for v in _versions(api)] == [1, 2, 3]
    # refusals store nothing
    _problem(_add(api, "nope", seed=2), 404, "task")
    bad = api.client.post("/v1/streams/s1/tasks/t1/datasets", headers=api.auth("write"),
                          files={"train": ("train.jsonl", "not json\n")})  # fmt: skip
    _problem(bad, 422, "train")
    labels = api.client.post("/v1/streams/s1/tasks/t1/datasets", headers=api.auth("write"),
                             data={"labels": "[1,"},
                             files={"train": ("t.jsonl", _task_files(seed=3)[0])})  # fmt: skip
    _problem(labels, 422, "labels")
    read = api.auth("read")
    one = {"train": ("t.jsonl", _task_files(seed=3)[0])}
    _problem(api.client.post("/v1/streams/s1/tasks/t1/datasets", headers=read, files=one), 403)
    assert [v["version"] for v in _versions(api)] == [1, 2, 3]


def test_retrain_on_a_version_with_replay_publishes_the_next_adapter(api: Api) -> None:
    _trained(api)
    assert _add(api, "t1", seed=1, n=30).status_code == 201
    h = api.auth("write")
    sent = len(api.dispatcher.sent)
    for body, status, field in [
        ({"dataset": 9}, 404, "dataset"),
        ({"dataset": 0}, 422, "dataset"),
        ({"dataset": "f" * 64}, 404, "dataset"),  # a digest that is no version of the task
        ({"dataset": "not-a-digest"}, 422, "dataset"),
        ({"replay": 1.5}, 422, "replay"),
        ({"replay": -0.1}, 422, "replay"),
        ({"params": {"hyperparams": {"rank": 0}}}, 422, "rank"),
        ({"surprise": 1}, 422, "surprise"),
    ]:
        _problem(api.client.post("/v1/streams/s1/tasks/t1/retrain", json=body, headers=h),
                 status, field)  # fmt: skip
    _problem(api.client.post("/v1/streams/s1/tasks/nope/retrain", json={}, headers=h), 404, "task")
    assert len(api.dispatcher.sent) == sent  # nothing queued for a refusal
    r = api.client.post("/v1/streams/s1/tasks/t1/retrain", json={"dataset": 2, "replay": 0.5},
                        headers=h)  # fmt: skip
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["kind"] == "retrain" and job["params"]["dataset_version"] == 2
    assert job["params"]["replay"] == 0.5 and api.dispatcher.sent[-1] == job["id"]
    assert run_job(api.inst, job["id"]).state == "succeeded"
    events = api.client.get(f"/v1/jobs/{job['id']}/events", headers=h).json()["data"]
    assert any(
        "replaying 12 examples of earlier dataset versions with 30" in e["message"] for e in events
    ), events  # half of version 1's 24
    adapters = api.client.get("/v1/streams/s1/adapters", params={"task": "t1"},
                              headers=h).json()["data"]  # fmt: skip
    assert [a["version"] for a in adapters] == [1, 2]
    version2 = api.inst.registry.tasks.get_version(adapters[0]["task_id"], 2)
    assert adapters[1]["dataset_id"] == version2.dataset.id
    assert adapters[0]["dataset_id"] != version2.dataset.id


def test_a_cron_consolidation_with_nothing_new_to_fold_succeeds_and_stores_nothing(
    api: Api,
) -> None:
    api.create_stream({"name": "s", "base": {"kind": "tiny"}})
    h = api.auth("write")
    body = {"kind": "consolidate", "cron": "@hourly"}
    made = api.client.post("/v1/streams/s/schedules", headers=h, json=body).json()
    due = datetime.fromisoformat(made["next_run_at"]) + timedelta(seconds=1)
    (fired,) = fire_due(api.inst, api.dispatcher, now=due)
    assert run_job(api.inst, fired.id).state == "succeeded"
    events = api.client.get(f"/v1/jobs/{fired.id}/events", headers=h).json()["data"]
    assert any(e["message"].startswith("nothing to fold") for e in events), events
    assert api.client.get("/v1/streams/s/snapshots", headers=h).json()["count"] == 1


def test_a_cron_retrain_takes_the_newest_version_and_skips_trained_data(api: Api) -> None:
    _trained(api)
    h = api.auth("write")
    body = {"kind": "retrain", "cron": "@hourly", "task": "t1"}
    made = api.client.post("/v1/streams/s1/schedules", headers=h, json=body).json()
    due = datetime.fromisoformat(made["next_run_at"]) + timedelta(seconds=1)
    (first,) = fire_due(api.inst, api.dispatcher, now=due)
    assert first.params["dataset_version"] == 1
    assert run_job(api.inst, first.id).state == "succeeded"
    events = api.client.get(f"/v1/jobs/{first.id}/events", headers=h).json()["data"]
    assert any(e["message"].startswith("no new data") for e in events), events
    listed = api.client.get("/v1/streams/s1/adapters", params={"task": "t1"}, headers=h)
    assert [a["version"] for a in listed.json()["data"]] == [1]  # nothing trained
    assert _add(api, "t1", seed=1, n=30).status_code == 201
    (second,) = fire_due(api.inst, api.dispatcher, now=due + timedelta(hours=1))
    assert second.params["dataset_version"] == 2
    assert run_job(api.inst, second.id).state == "succeeded"
    listed = api.client.get("/v1/streams/s1/adapters", params={"task": "t1"}, headers=h)
    assert [a["version"] for a in listed.json()["data"]] == [1, 2]


class _InProcess(StrataClient):
    """The CLI's client, answered by the test's app instead of a server."""

    def __init__(self, api: Api) -> None:
        self.api = api

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        r = self.api.client.request(method, "/v1" + path, headers=self.api.auth("write"), **kwargs)
        if r.status_code >= 400:
            raise ApiError(r.status_code, r.json())
        return r.json() if r.content else None

    def close(self) -> None:
        pass


def test_the_cli_adds_lists_and_retrains(
    api: Api, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _trained(api)
    monkeypatch.setattr("api.cli_client._client", lambda _args: _InProcess(api))
    train, test, labels = _task_files(seed=4, n=20)
    for name, text in (("train.jsonl", train), ("test.jsonl", test), ("labels.json", labels)):
        (tmp_path / name).write_text(text if isinstance(text, str) else json.dumps(text))
    assert main(["datasets", "add", "s1", "t1", "--train", str(tmp_path / "train.jsonl"),
                 "--test", str(tmp_path / "test.jsonl"),
                 "--labels", str(tmp_path / "labels.json")]) == 0  # fmt: skip
    assert "t1 dataset v2: 20 training and 6 test examples" in capsys.readouterr().out
    assert main(["datasets", "list", "s1", "t1"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in listed] == ["v1", "v2"]
    assert main(["retrain", "s1", "t1", "--replay", "0.25"]) == 0
    assert "retrain of t1 on dataset v2: job" in capsys.readouterr().out
    assert main(["retrain", "s1", "t1", "--dataset", "7"]) == 2
    assert "error (404)" in capsys.readouterr().err


def test_the_format_is_told_by_the_train_file_when_not_given(api: Api) -> None:
    import gzip

    _stream(api, hyperparams=FAST)
    h = api.auth("write")
    records = [{"sentence": f"word{i} sport", "label": "sport"} for i in range(8)] + [
        {"sentence": f"word{i} food", "label": "food"} for i in range(8)
    ]  # fmt: skip
    cl_json = json.dumps(records, indent=1)  # a JSON list, as CL_Benchmark ships it
    labels = json.dumps(["sport", "food"])
    made = api.client.post("/v1/streams/s1/tasks", headers=h, data={"name": "cl", "labels": labels},
                           files={"train": ("train.json", "\n  " + cl_json)})  # fmt: skip
    assert made.status_code == 202, made.text
    stored = api.inst.registry.tasks.get_dataset(made.json()["task"]["dataset_digest"])
    assert stored.format == "cl_benchmark"
    train, test, jl_labels = _task_files(seed=5)
    files = {"train": ("t.jsonl", train), "test": ("s.jsonl", test)}
    form = {"name": "jl", "labels": json.dumps(jl_labels)}
    made = api.client.post("/v1/streams/s1/tasks", headers=h, data=form, files=files)
    assert made.status_code == 202, made.text
    stored = api.inst.registry.tasks.get_dataset(made.json()["task"]["dataset_digest"])
    assert stored.format == "jsonl"
    zipped = gzip.compress(cl_json.encode())  # a gzipped list: told from what it expands to
    grown = api.client.post("/v1/streams/s1/tasks/cl/datasets", headers=h, data={"labels": labels},
                            files={"train": ("t.json.gz", zipped)})  # fmt: skip
    assert grown.status_code in (200, 201), grown.text
    plain = {"train": ("t.txt", "plain text\n")}
    _problem(
        api.client.post("/v1/streams/s1/tasks", headers=h, data={"name": "x"}, files=plain),
        422,
        "train",
    )  # read as JSONL: "line 1: ..."
    no_labels = api.client.post("/v1/streams/s1/tasks", headers=h, data={"name": "y"},
                                files={"train": ("t.json", cl_json)})  # fmt: skip
    _problem(no_labels, 422, "labels")  # a CL_Benchmark list needs its labels

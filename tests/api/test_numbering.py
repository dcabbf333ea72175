"""One numbering convention wherever a user reads: text counts tasks from 1 (job events, the
CLI), and the API's `position` fields are indices from 0, as their descriptions say."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from api.cli import main
from tests.api.conftest import Api
from tests.api.helpers import _InProcess, _stream, _task_files
from workers.runner import run_job


def test_the_first_task_is_task_1_in_text_and_position_0_in_json(
    api: Api, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    _stream(api)
    monkeypatch.setattr("api.cli_client._client", lambda _args: _InProcess(api, "write"))
    train, test, _labels = _task_files()
    (tmp_path / "train.jsonl").write_text(train)
    (tmp_path / "test.jsonl").write_text(test)
    code = main(["tasks", "submit", "s1", "first", "--train", str(tmp_path / "train.jsonl"),
                 "--test", str(tmp_path / "test.jsonl")])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0 and "task 1: first: job 2 queued" in out, out
    assert run_job(api.inst, 2).state == "succeeded"

    task = api.client.get("/v1/streams/s1/tasks", headers=api.auth()).json()["data"][0]
    assert task["position"] == 0
    events = api.client.get("/v1/jobs/2/events", headers=api.auth()).json()["data"]
    said = " ".join(e["message"] for e in events)
    assert "evaluated first (after task 1)" in said, said
    assert not re.search(r"task 0\b", said)
    evaluate = api.client.post("/v1/streams/s1/evaluate", json={"eval_limit": 4},
                               headers=api.auth("write")).json()  # fmt: skip
    assert run_job(api.inst, evaluate["id"]).state == "succeeded"
    events = api.client.get(f"/v1/jobs/{evaluate['id']}/events", headers=api.auth()).json()
    assert any("the state after task 1 on 1 tasks" in e["message"] for e in events["data"])
    spec = api.client.get("/openapi.json").json()["components"]["schemas"]
    assert "from 0" in spec["TaskPublic"]["properties"]["position"]["description"]

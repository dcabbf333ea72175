"""Helpers shared by the API tests: problem+json checks, a ready stream, task uploads, waiting
for a job, and the CLI's client answered by a test's app."""

from __future__ import annotations

import json
import random
import time
from typing import Any

from api.client import ApiError, StrataClient
from continual.data import Example, synthetic_tasks
from tests.api.conftest import Api

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


class _InProcess(StrataClient):
    """The CLI's client, answered by the test's app instead of a server."""

    def __init__(self, api: Api, scope: str = "read") -> None:
        self.api, self.scope = api, scope

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        headers = self.api.auth(self.scope)
        r = self.api.client.request(method, "/v1" + path, headers=headers, **kwargs)
        if r.status_code >= 400:
            raise ApiError(r.status_code, r.json())
        return r.json() if r.content else None

    def close(self) -> None:
        pass


def _files(examples: tuple[Example, ...], test: tuple[Example, ...]) -> dict[str, Any]:
    def lines(xs: tuple[Example, ...]) -> str:
        return "".join(json.dumps({"prompt": e.prompt, "completion": e.completion}) + "\n"
                       for e in xs)  # fmt: skip

    return {"train": ("train.jsonl", lines(examples)), "test": ("test.jsonl", lines(test))}


def _shuffled(examples: tuple[Example, ...], labels: list[str]) -> tuple[Example, ...]:
    """The same prompts, each with a label it does not have."""
    rng = random.Random(0)
    wrong = [[x for x in labels if " " + x != e.completion] for e in examples]
    return tuple(Example(prompt=e.prompt, completion=" " + rng.choice(w))
                 for e, w in zip(examples, wrong, strict=True))  # fmt: skip

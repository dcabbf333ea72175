"""An API client on each deployment (embedded and server), with tokens of each scope."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from registry.entities import Job
from registry.instance import Instance
from registry.settings import StrataSettings
from workers.inprocess import InProcessWorker
from workers.predict import InProcessPredictor
from workers.runner import run_job


class Recorder:
    """A dispatcher that only records the jobs sent (no worker runs them)."""

    def __init__(self) -> None:
        self.sent: list[int] = []

    def send(self, job: Job) -> None:
        self.sent.append(job.id)


@dataclass
class Api:
    client: TestClient
    inst: Instance
    dispatcher: Recorder
    tokens: dict[str, str]  # scope -> secret

    def auth(self, scope: str = "admin") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[scope]}"}

    def create_stream(self, body: dict[str, Any], timeout: float = 120) -> dict[str, Any]:
        """`POST /v1/streams` (202), then its import job run here as a worker runs it (the `api`
        fixture's recorder runs nothing; with `live_api` the worker may have taken it first);
        returns the stream once it is ready."""
        r = self.client.post("/v1/streams", json=body, headers=self.auth("write"))
        assert r.status_code == 202, r.text
        assert r.json()["state"] == "importing" and r.json()["job"]["kind"] == "import"
        job = run_job(self.inst, r.json()["job"]["id"])
        deadline = time.monotonic() + timeout
        while not job.state.terminal and time.monotonic() < deadline:
            time.sleep(0.05)
            job = self.inst.registry.jobs.get(job.id)
        assert job.state == "succeeded", job
        stream: dict[str, Any] = self.client.get(
            f"/v1/streams/{body['name']}", headers=self.auth("read")
        ).json()
        assert stream["state"] == "ready", stream
        return stream


SETTINGS = StrataSettings(max_upload_bytes=64 * 1024, max_line_bytes=4096, max_examples=500)


def _tokens(inst: Instance) -> dict[str, str]:
    return {
        scope: inst.registry.tokens.create(name=scope, scopes=[scope])[1]
        for scope in ("read", "write", "admin")
    }


@pytest.fixture
def api(instance: Instance) -> Iterator[Api]:
    """Routes only: jobs are queued and recorded, not run."""
    inst = dataclasses.replace(instance, settings=SETTINGS)
    recorder = Recorder()
    app = create_app(inst, recorder, InProcessPredictor(inst))
    with TestClient(app, raise_server_exceptions=False) as client:
        yield Api(client=client, inst=inst, dispatcher=recorder, tokens=_tokens(inst))


@pytest.fixture
def live_api(instance: Instance) -> Iterator[Api]:
    """With an in-process worker: submitted jobs train."""
    inst = dataclasses.replace(instance, settings=SETTINGS)
    worker = InProcessWorker(inst, threads=1, scheduler=False).start()
    try:
        app = create_app(inst, worker, InProcessPredictor(inst))
        with TestClient(app, raise_server_exceptions=False) as client:
            yield Api(client=client, inst=inst, dispatcher=Recorder(), tokens=_tokens(inst))
    finally:
        worker.stop(timeout=30)

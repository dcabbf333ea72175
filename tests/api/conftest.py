"""An API client on each deployment (embedded and server), with tokens of each scope."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from registry.entities import Job
from registry.instance import Instance
from registry.settings import StrataSettings
from workers.inprocess import InProcessWorker


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
    with TestClient(create_app(inst, recorder), raise_server_exceptions=False) as client:
        yield Api(client=client, inst=inst, dispatcher=recorder, tokens=_tokens(inst))


@pytest.fixture
def live_api(instance: Instance) -> Iterator[Api]:
    """With an in-process worker: submitted jobs train."""
    inst = dataclasses.replace(instance, settings=SETTINGS)
    worker = InProcessWorker(inst, threads=1, scheduler=False).start()
    try:
        with TestClient(create_app(inst, worker), raise_server_exceptions=False) as client:
            yield Api(client=client, inst=inst, dispatcher=Recorder(), tokens=_tokens(inst))
    finally:
        worker.stop(timeout=30)

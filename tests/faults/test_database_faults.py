"""PostgreSQL restarted under the API while tasks are being submitted: 503 with a retry hint
while it is down, recovery without a restart of the API, and no half-written rows."""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text

from api.app import create_app
from continual.data import synthetic_tasks
from registry.artifacts import LocalStore
from registry.db import make_engine, migrate
from registry.entities import Job
from registry.instance import Instance
from registry.settings import StrataSettings
from registry.store import SqlRegistry
from tests.harness import private_postgres

pytestmark = pytest.mark.slow
MAX_SUBMISSIONS = 400


class Recorder:
    def __init__(self) -> None:
        self.sent: list[int] = []

    def send(self, job: Job) -> None:
        self.sent.append(job.id)


def _files() -> dict[str, tuple[str, str]]:
    task = synthetic_tasks(seed=0, train_size=16, test_size=4)[0]
    lines = "".join(json.dumps({"prompt": e.prompt, "completion": e.completion}) + "\n"
                    for e in task.train)  # fmt: skip
    return {"train": ("train.jsonl", lines)}


def test_a_postgres_restart_gives_503s_then_recovers_with_no_half_written_rows(
    tmp_path: Path,
) -> None:
    with private_postgres() as pg:
        engine = make_engine(pg.url)
        migrate(engine)
        inst = Instance(registry=SqlRegistry(engine), artifacts=LocalStore(tmp_path / "blobs"),
                        cache_dir=tmp_path / "cache", settings=StrataSettings())  # fmt: skip
        inst = dataclasses.replace(inst)
        _, secret = inst.registry.tokens.create(name="t", scopes=["write"])
        headers = {"Authorization": f"Bearer {secret}"}
        with TestClient(create_app(inst, Recorder()), raise_server_exceptions=False) as client:
            made = client.post("/v1/streams", headers=headers,
                               json={"name": "s", "base": {"kind": "tiny"}})  # fmt: skip
            assert made.status_code == 202  # the import job is queued: tasks queue behind it
            answers: list[tuple[int, str, str | None]] = []
            health: list[int] = []
            reads: list[int] = []  # a job's status, read through the API's async pool
            job_ids: list[int] = []
            files = _files()

            stop = threading.Event()

            def submit() -> None:
                i = 0
                while not stop.is_set() and i < MAX_SUBMISSIONS:
                    r = client.post("/v1/streams/s/tasks", data={"name": f"t{i}"}, files=files,
                                    headers=headers)  # fmt: skip
                    answers.append((r.status_code, r.headers.get("content-type", ""),
                                    r.headers.get("retry-after")))  # fmt: skip
                    if r.status_code == 202:
                        job_ids.append(r.json()["job"]["id"])
                    if job_ids:
                        reads.append(
                            client.get(f"/v1/jobs/{job_ids[-1]}", headers=headers).status_code
                        )
                    health.append(client.get("/health").status_code)
                    i += 1
                    time.sleep(0.05)

            thread = threading.Thread(target=submit)
            thread.start()
            while len(answers) < 5:
                time.sleep(0.02)
            pg.stop("immediate")  # a crash: connections cut mid-transaction
            time.sleep(2)
            pg.start()
            restarted = len(answers)
            deadline = time.monotonic() + 60
            while (
                time.monotonic() < deadline
                and [s for s, _, _ in answers[restarted:]].count(202) < 5
            ):
                time.sleep(0.1)
            stop.set()
            thread.join(60)

        statuses = [s for s, _, _ in answers]
        assert set(statuses) <= {202, 503}, answers
        down = [(ctype, retry) for s, ctype, retry in answers if s == 503]
        assert down, "no request met the outage"
        assert all(ctype.startswith("application/problem+json") and retry for ctype, retry in down)
        assert 503 in health and health[-1] == 200
        assert set(reads) <= {200, 503} and 503 in reads and reads[-1] == 200, reads
        first_outage = statuses.index(503)
        assert 202 in statuses[first_outage:], "the API did not recover by itself"

        with create_engine(pg.url).connect() as conn:  # what committed is whole
            tasks = conn.execute(text("SELECT id, dataset_id FROM tasks")).all()
            jobs = conn.execute(text("SELECT task_id FROM jobs WHERE kind = 'train'")).all()
            datasets = conn.execute(text("SELECT digest FROM datasets")).all()
        assert sorted(t for (t,) in jobs) == sorted(t for t, _ in tasks)  # one job per task
        assert len(tasks) >= statuses.count(202)
        store = LocalStore(tmp_path / "blobs")
        assert all(store.exists(digest) for (digest,) in datasets)
        engine.dispose()
        logging.getLogger(__name__).warning(
            "RELIABILITY postgres restart: submitted=%d accepted=%d refused_503=%d "
            "tasks_written=%d lost=0 status_reads=%d reads_503=%d", len(statuses),
            statuses.count(202), statuses.count(503), len(tasks), len(reads), reads.count(503),
        )  # fmt: skip

"""The object store fails in the middle of a job's uploads: nothing registered points at a
missing or partial object, and the job is retried (and resumes) or fails with a clear error."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from minio import Minio
from moto.server import ThreadedMotoServer

from continual.data import synthetic_tasks
from registry.artifacts import MinioStore, get_tree
from registry.db import make_engine, migrate
from registry.entities import Job, JobState
from registry.instance import Instance
from registry.settings import StrataSettings
from registry.store import SqlRegistry
from services.dispatch import reconcile
from services.streams import submit_task
from tests.conftest import S3_ACCESS_KEY, S3_REGION, S3_SECRET_KEY
from workers.execution import execute
from workers.streams import create_stream

pytestmark = pytest.mark.slow


class Recorder:
    def __init__(self) -> None:
        self.sent: list[int] = []

    def send(self, job: Job) -> None:
        self.sent.append(job.id)


class S3:
    """A private S3 server the test stops and starts (its objects survive a restart)."""

    def __init__(self) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = int(sock.getsockname()[1])
        self.server: ThreadedMotoServer | None = None

    def start(self) -> None:
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None


@pytest.fixture
def s3(s3_endpoint: str) -> Iterator[S3]:  # s3_endpoint: moto's credentials are set up
    server = S3()
    server.start()
    yield server
    server.stop()


def _instance(tmp_path: Path, s3: S3, *, max_attempts: int) -> Instance:
    engine = make_engine(f"sqlite:///{tmp_path / 'registry.db'}")
    migrate(engine)
    client = Minio(f"127.0.0.1:{s3.port}", access_key=S3_ACCESS_KEY, secret_key=S3_SECRET_KEY,
                   secure=False, region=S3_REGION)  # fmt: skip
    store = MinioStore(endpoint="unused", access_key="x", secret_key="y", bucket="strata-faults",
                       client=client)  # fmt: skip
    settings = StrataSettings(checkpoint_every=10, max_attempts=max_attempts, resend_after_s=0.01)
    return Instance(registry=SqlRegistry(engine), artifacts=store, cache_dir=tmp_path / "cache",
                    settings=settings)  # fmt: skip


def _submit(inst: Instance) -> tuple[Any, Job]:
    stream, _ = create_stream(inst, name="s", base={"kind": "tiny"})
    data = synthetic_tasks(seed=0, train_size=24, test_size=6)[0]
    _, job = submit_task(inst, stream=stream, name="t", data=data, format="synthetic",
                         params={"hyperparams": {"max_steps": 40, "batch_size": 8},
                                 "eval_limit": 6})  # fmt: skip
    return stream, job


def test_an_upload_cut_mid_job_is_retried_and_the_job_resumes(tmp_path: Path, s3: S3) -> None:
    inst = _instance(tmp_path, s3, max_attempts=3)
    stream, job = _submit(inst)

    def cut_at_step_25(kind: str, payload: dict[str, Any]) -> None:
        if kind == "step" and payload["step"] == 25:
            s3.stop()  # the checkpoint upload at step 30 fails

    out = Recorder()
    first = execute(inst, out, job.id, worker="w1", listener=cut_at_step_25)
    assert first is not None and first.state is JobState.QUEUED  # handed back for a retry
    assert first.checkpoint_step == 20
    events = [e.message for e in inst.registry.jobs.events(job.id, limit=1000)]
    assert any("object store is unavailable" in m and "retried" in m for m in events)
    assert inst.registry.adapters.list_versions(stream_id=stream.id) == []

    s3.start()
    later = datetime.now(UTC) + timedelta(seconds=1)
    assert reconcile(inst, out, now=later)["resent"] == 1 and out.sent[-1] == job.id
    done = execute(inst, out, job.id, worker="w2")
    assert done is not None and done.state is JobState.SUCCEEDED and done.attempts == 2
    events = [e.message for e in inst.registry.jobs.events(job.id, limit=1000)]
    assert "resuming from the checkpoint at step 20" in events
    (version,) = inst.registry.adapters.list_versions(stream_id=stream.id)
    assert version.artifact_digest is not None
    get_tree(inst.artifacts, version.artifact_digest, tmp_path / "check")  # whole and verified


def test_a_store_that_stays_down_fails_the_job_with_a_clear_error(tmp_path: Path, s3: S3) -> None:
    inst = _instance(tmp_path, s3, max_attempts=1)
    stream, job = _submit(inst)

    def cut(kind: str, payload: dict[str, Any]) -> None:
        if kind == "step" and payload["step"] == 5:
            s3.stop()

    done = execute(inst, Recorder(), job.id, worker="w1", listener=cut)
    assert done is not None and done.state is JobState.FAILED and done.error is not None
    assert done.error.code == "unavailable"
    assert "object store is unavailable" in done.error.message
    assert inst.registry.adapters.list_versions(stream_id=stream.id) == []
    assert job.id not in [j.id for j in inst.registry.jobs.list_jobs(state=JobState.RUNNING)]

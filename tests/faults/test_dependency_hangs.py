"""A dependency that stops answering (SIGSTOP: connects succeed, nothing replies) never holds
the API: requests end with an answer in the dependency's timeout, `/health` says which part is
away, and the API recovers when it is back. The object store may also be down when the API
starts, and a worker waits out a short store outage with backoff instead of failing its job.

The client timeouts below are guards against a hang (the defect waited as long as the
dependency was stopped), not speed checks: each is many times the timeouts set here."""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest

from api.app import create_app
from continual.data import synthetic_tasks
from registry.artifacts import MinioStore
from registry.db import make_engine
from registry.entities import JobState
from registry.instance import Instance
from registry.settings import StrataSettings
from registry.store import SqlRegistry
from services.broker import CeleryDispatcher, make_celery
from services.dispatch import reconcile
from services.streams import submit_task
from tests.conftest import S3_ACCESS_KEY, S3_REGION, S3_SECRET_KEY, fresh_database
from tests.faults.test_store_faults import S3
from tests.harness import FreezableProxy, freezable_proxy, private_redis, serve
from workers.execution import execute
from workers.streams import create_stream

pytestmark = pytest.mark.slow

TIMEOUT_S = 1.0  # every dependency's connect and read timeout in these tests
GUARD_S = 60.0  # a client's patience: a hang would outlast it


def _settings(**kw: Any) -> StrataSettings:
    return StrataSettings(database_timeout_s=TIMEOUT_S, broker_timeout_s=TIMEOUT_S,
                          store_timeout_s=TIMEOUT_S, **kw)  # fmt: skip


def _store(port: int, *, retry_s: float = 0.0) -> MinioStore:
    return MinioStore(endpoint=f"127.0.0.1:{port}", access_key=S3_ACCESS_KEY,
                      secret_key=S3_SECRET_KEY, region=S3_REGION, timeout_s=TIMEOUT_S,
                      retry_s=retry_s, bucket=f"hang-{uuid.uuid4().hex[:10]}")  # fmt: skip


def _instance(request: pytest.FixtureRequest, tmp_path: Path, store: MinioStore,
              settings: StrataSettings) -> Instance:  # fmt: skip
    engine = make_engine(fresh_database(request, "postgresql"), timeout_s=TIMEOUT_S)
    return Instance(registry=SqlRegistry(engine), artifacts=store, cache_dir=tmp_path / "cache",
                    settings=settings)  # fmt: skip


def _train_file(seed: int) -> dict[str, tuple[str, str]]:
    task = synthetic_tasks(seed=seed, train_size=12, test_size=4)[seed % 3]
    lines = "".join(json.dumps({"prompt": e.prompt, "completion": e.completion}) + "\n"
                    for e in task.train)  # fmt: skip
    return {"train": ("train.jsonl", lines)}


def _submit(url: str, auth: dict[str, str], i: int) -> httpx.Response:
    """Task `t<i>` submitted to stream s1, with a client that waits at most GUARD_S."""
    return httpx.post(f"{url}/v1/streams/s1/tasks", headers=auth, data={"name": f"t{i}"},
                      files=_train_file(i), timeout=GUARD_S)  # fmt: skip


@pytest.fixture
def s3_port(s3_endpoint: str) -> int:  # s3_endpoint: moto's credentials are set up
    return int(s3_endpoint.rsplit(":", 1)[1])


@pytest.fixture
def proxied_store(s3_port: int) -> Iterator[tuple[FreezableProxy, MinioStore]]:
    with freezable_proxy(s3_port) as proxy:
        yield proxy, _store(proxy.port)


def test_a_stopped_broker_holds_no_request_and_health_names_it(
    request: pytest.FixtureRequest, tmp_path: Path, s3_port: int
) -> None:
    with private_redis() as broker:
        settings = _settings(broker_url=broker.url)
        inst = _instance(request, tmp_path, _store(s3_port), settings)
        dispatcher = CeleryDispatcher(make_celery(settings))
        create_stream(inst, name="s1", base={"kind": "tiny"})
        _, secret = inst.registry.tokens.create(name="w", scopes=["read", "write"])
        auth = {"Authorization": f"Bearer {secret}"}
        assert broker.proc is not None
        with serve(create_app(inst, dispatcher)) as url:
            assert httpx.get(f"{url}/health", timeout=GUARD_S).json()["checks"] == {
                "database": "ok", "store": "ok", "broker": "ok"}  # fmt: skip
            os.kill(broker.proc.pid, signal.SIGSTOP)
            try:
                with ThreadPoolExecutor(10) as pool:
                    answers = list(pool.map(partial(_submit, url, auth), range(10)))
                health = httpx.get(f"{url}/health", timeout=GUARD_S)
            finally:
                os.kill(broker.proc.pid, signal.SIGCONT)
            # every task and job is stored; the jobs wait, queued, for the broker
            assert [a.status_code for a in answers] == [202] * 10, answers[0].text
            assert health.status_code == 503 and health.headers["retry-after"]
            checks = health.json()["checks"]
            assert checks["database"] == "ok" and checks["store"] == "ok"
            assert checks["broker"] != "ok"
            queued = inst.registry.jobs.list_jobs(state=JobState.QUEUED)
            assert len(queued) == 10
            # back: the reconciler sends what the API could not (a stream's jobs run in order:
            # its first one; each sends the next when it ends), and health recovers
            later = datetime.now(UTC) + timedelta(seconds=settings.resend_after_s + 1)
            assert reconcile(inst, dispatcher, now=later)["resent"] == 1
            assert httpx.get(f"{url}/health", timeout=GUARD_S).status_code == 200
        inst.close()


def test_a_stopped_store_gives_503_with_retry_after_then_recovers(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    proxied_store: tuple[FreezableProxy, MinioStore],
) -> None:
    proxy, store = proxied_store
    inst = _instance(request, tmp_path, store, _settings())
    create_stream(inst, name="s1", base={"kind": "tiny"})
    _, secret = inst.registry.tokens.create(name="w", scopes=["read", "write"])
    auth = {"Authorization": f"Bearer {secret}"}
    before = len(inst.registry.tasks.list_tasks(inst.registry.streams.get("s1").id))

    class Sent:
        def send(self, job: Any) -> None:
            pass

    with serve(create_app(inst, Sent())) as url:
        proxy.freeze()
        try:
            with ThreadPoolExecutor(9) as pool:
                answers = list(pool.map(partial(_submit, url, auth), range(9)))
            health = httpx.get(f"{url}/health", timeout=GUARD_S)
        finally:
            proxy.thaw()
        assert {a.status_code for a in answers} == {503}, answers[0].text
        assert all(a.headers["retry-after"] for a in answers)
        body = answers[0].json()
        assert body["code"] == "unavailable" and "object store" in body["detail"]
        assert health.status_code == 503 and health.json()["checks"]["store"] != "ok"
        stream = inst.registry.streams.get("s1")
        assert len(inst.registry.tasks.list_tasks(stream.id)) == before  # nothing half-stored
        # the store is back: the same API serves again
        assert httpx.get(f"{url}/health", timeout=GUARD_S).status_code == 200
        again = _submit(url, auth, 0)
        assert again.status_code == 202, again.text
    inst.close()


def test_the_api_starts_with_the_store_down_reports_it_and_recovers(
    request: pytest.FixtureRequest, tmp_path: Path, s3_endpoint: str
) -> None:
    server = S3()  # not started: nothing listens on its port yet
    store = _store(server.port)  # the bucket check fails: a warning, not an exit
    inst = _instance(request, tmp_path, store, _settings())
    with serve(create_app(inst, CeleryDispatcher(make_celery(_settings())))) as url:
        down = httpx.get(f"{url}/health", timeout=GUARD_S)
        assert down.status_code == 503 and down.json()["checks"]["store"] != "ok"
        server.start()
        try:
            up = httpx.get(f"{url}/health", timeout=GUARD_S)
            assert up.status_code == 200, up.text
            digest = store.put_bytes(b"made after the store came up")  # the bucket, made late
            assert store.get_bytes(digest) == b"made after the store came up"
        finally:
            server.stop()
    inst.close()


def test_a_worker_waits_out_a_store_outage_with_backoff_and_its_job_succeeds(
    request: pytest.FixtureRequest, tmp_path: Path, s3_endpoint: str,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    server = S3()
    server.start()
    store = _store(server.port, retry_s=60.0)
    inst = _instance(request, tmp_path, store, _settings(checkpoint_every=10, max_attempts=1))
    stream, _ = create_stream(inst, name="s", base={"kind": "tiny"})
    data = synthetic_tasks(seed=0, train_size=24, test_size=6)[0]
    _, job = submit_task(inst, stream=stream, name="t", data=data, format="synthetic",
                         params={"hyperparams": {"max_steps": 40, "batch_size": 8},
                                 "eval_limit": 6})  # fmt: skip
    restarted = threading.Event()

    def cut_at_step_25(kind: str, payload: dict[str, Any]) -> None:
        if kind == "step" and payload["step"] == 25 and server.server is not None:
            server.stop()  # the checkpoint upload at step 30 meets a store that is away

            def back() -> None:
                server.start()
                restarted.set()

            threading.Timer(3.0, back).start()

    class Sent:
        def send(self, job: Any) -> None:
            pass

    try:
        with caplog.at_level(logging.WARNING, logger="registry.artifacts.minio"):
            done = execute(inst, Sent(), job.id, worker="w1", listener=cut_at_step_25)
        assert restarted.wait(GUARD_S)
        assert done is not None and done.state is JobState.SUCCEEDED, done
        assert done.attempts == 1  # one run, no re-queue: the outage was waited out in place
        delays = [float(r.getMessage().rsplit("retrying in ", 1)[1].split()[0])
                  for r in caplog.records if "retrying in" in r.getMessage()]  # fmt: skip
        assert len(delays) >= 2 and delays[-1] > delays[0]  # the waits grow
        (version,) = inst.registry.adapters.list_versions(stream_id=stream.id)
        assert version.artifact_digest is not None
    finally:
        server.stop()
        inst.close()

"""A Celery worker's metrics (`workers.metrics`): training throughput summed over the jobs that
train now, and a real worker with a prefork pool serving, from its main process on
STRATA_METRICS_PORT, what its pool's process counted while running a job."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from continual.data import synthetic_tasks
from registry.entities import JobState
from registry.instance import open_instance
from registry.settings import StrataSettings
from services.broker import CeleryDispatcher, make_celery
from services.dispatch import enqueue
from services.streams import submit_task
from tests.harness import Workers, free_port, server_env, settings_kwargs
from workers.metrics import Throughput
from workers.streams import create_stream


def _tokens_per_s() -> float | None:
    return REGISTRY.get_sample_value("strata_training_tokens_per_second")


def test_throughput_is_the_sum_of_the_jobs_training_now() -> None:
    throughput = Throughput()
    throughput.report(1, 100.0)
    throughput.report(2, 50.0)
    throughput.report(1, 120.0)  # a job's newer figure replaces its older one
    assert _tokens_per_s() == 170.0
    throughput.ended(1)
    assert _tokens_per_s() == 50.0
    throughput.ended(2)
    throughput.ended(2)  # twice: nothing left to take out
    assert _tokens_per_s() == 0.0


def _scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(url, timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}  # fmt: skip


@pytest.mark.slow
def test_a_prefork_worker_serves_its_pools_job_metrics_on_its_port(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    port = free_port()
    env = server_env(request, tmp_path) | {
        "STRATA_METRICS_PORT": str(port), "STRATA_METRICS_HOST": "127.0.0.1",
        "STRATA_HEARTBEAT_S": "0.5", "STRATA_CHECKPOINT_EVERY": "5",
    }  # fmt: skip
    settings = StrataSettings(**settings_kwargs(env))
    inst = open_instance(settings, upgrade=False)
    stream, _ = create_stream(inst, name="s", base={"kind": "tiny"})  # imported here
    workers = Workers(env=env, root=tmp_path / "workers")
    workers.root.mkdir()
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        workers.start("w0", pool="prefork")  # jobs run in the pool's processes, not the main one
        data = synthetic_tasks(seed=0, train_size=32, test_size=6)[0]
        params = {"hyperparams": {"batch_size": 8, "rank": 4, "max_steps": 100_000},
                  "eval_limit": 6}  # fmt: skip
        _, job = submit_task(inst, stream=stream, name="long", data=data, format="synthetic",
                             params=params)  # fmt: skip
        enqueue(inst, CeleryDispatcher(make_celery(settings)), job)
        deadline = time.monotonic() + 240
        got: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        while time.monotonic() < deadline:  # training, with a checkpoint uploaded
            try:
                got = _scrape(url)
            except httpx.TransportError:
                got = {}
            current = inst.registry.jobs.get(job.id)
            if got.get(("strata_training_tokens_per_second", ())) and current.checkpoint_step:
                break
            time.sleep(0.3)
        else:
            raise AssertionError(f"no training throughput on {url}\n{workers.logs(tail=3000)}")
        assert got[("strata_training_tokens_per_second", ())] > 0
        inst.registry.jobs.request_cancel(job.id)
        while inst.registry.jobs.get(job.id).state is not JobState.CANCELLED:
            assert time.monotonic() < deadline, workers.logs(tail=3000)
            time.sleep(0.2)
        time.sleep(0.5)  # the histogram is observed as the job's end is recorded
        got = _scrape(url)
    finally:
        workers.stop()
        inst.close()
    ended = (("kind", "train"), ("state", "cancelled"))
    assert got[("strata_job_duration_seconds_count", ended)] == 1
    assert got[("strata_job_duration_seconds_sum", ended)] > 0
    assert got[("strata_training_tokens_per_second", ())] == 0  # nothing trains any more
    # the pool's process read the base snapshot and wrote checkpoints to the S3 store
    assert got[("strata_artifact_downloaded_bytes_total", (("store", "minio"),))] > 0
    assert got[("strata_artifact_uploaded_bytes_total", (("store", "minio"),))] > 0


def test_a_busy_metrics_port_is_logged_and_the_worker_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    import socket

    from workers.metrics import serve_metrics

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        serve_metrics(port, "127.0.0.1")  # returns: no exception for the worker's start
    assert f"cannot serve metrics on 127.0.0.1:{port}" in caplog.text

"""`GET /metrics` (`api.metrics`): requests timed by route template, method and status; the
optional STRATA_METRICS_TOKEN; and `strata api --workers 2`, whose processes' counts add up in
whichever answers the scrape."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from api.app import create_app
from api.cli import main
from registry.instance import Instance
from registry.settings import StrataSettings
from services import metrics_dir
from tests.api.conftest import Api, Recorder
from tests.harness import free_port

REPO = Path(__file__).resolve().parents[2]
COUNT = "strata_http_request_duration_seconds_count"


def _count(route: str, status: int, method: str = "GET") -> float:
    labels = {"method": method, "route": route, "status": str(status)}
    return REGISTRY.get_sample_value(COUNT, labels) or 0.0


def test_requests_are_timed_by_route_template_method_and_status(api: Api) -> None:
    routes = [("/v1/streams/{stream}", 404), ("/v1/streams", 200), ("/v1/streams", 401),
              ("<unmatched>", 404), ("/health", 200)]  # fmt: skip
    before = {r: _count(*r) for r in routes}
    c = api.client
    assert c.get("/v1/streams/nope", headers=api.auth("read")).status_code == 404
    assert c.get("/v1/streams/other", headers=api.auth("read")).status_code == 404
    assert c.get("/v1/streams", headers=api.auth("read")).status_code == 200
    assert c.get("/v1/streams").status_code == 401
    assert c.get("/no/such/path").status_code == 404
    assert c.get("/health").status_code == 200
    after = {r: _count(*r) for r in routes}
    assert {r: after[r] - before[r] for r in routes} == {
        ("/v1/streams/{stream}", 404): 2, ("/v1/streams", 200): 1, ("/v1/streams", 401): 1,
        ("<unmatched>", 404): 1, ("/health", 200): 1,
    }  # fmt: skip
    body = c.get("/metrics")
    assert body.status_code == 200 and body.headers["content-type"].startswith("text/plain")
    text = body.text
    assert "nope" not in text and "/no/such/path" not in text  # raw paths are never labels
    names = {f.name for f in text_string_to_metric_families(text)}
    assert {"strata_http_request_duration_seconds", "strata_jobs", "strata_metrics_source_up",
            "strata_artifact_uploaded_bytes", "process_cpu_seconds"} <= names  # fmt: skip
    assert "strata_queue_depth" not in names  # the recorder dispatcher has no broker


def test_the_metrics_token_when_set(instance: Instance) -> None:
    settings = StrataSettings(metrics_token="scrape-secret-1")  # type: ignore[arg-type]
    app = create_app(dataclasses.replace(instance, settings=settings), Recorder())
    with TestClient(app) as c:
        for headers in (
            {},
            {"Authorization": "Bearer wrong"},
            {"Authorization": "scrape-secret-1"},
        ):
            r = c.get("/metrics", headers=headers)
            assert r.status_code == 401 and r.json()["code"] == "unauthorized", headers
            assert r.headers["www-authenticate"].startswith("Bearer")
        r = c.get("/metrics", headers={"Authorization": "Bearer scrape-secret-1"})
        assert r.status_code == 200 and "strata_jobs{" in r.text
        assert c.get("/health").status_code == 200  # /health still needs nothing


def test_strata_api_makes_a_fresh_metrics_directory_for_several_processes_and_removes_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import uvicorn

    monkeypatch.delenv(metrics_dir.ENV, raising=False)
    seen: list[str | None] = []
    monkeypatch.setattr(
        uvicorn, "run", lambda *a, **k: seen.append(os.environ.get(metrics_dir.ENV))
    )
    assert main(["api", "--workers", "1"]) == 0
    assert main(["api", "--workers", "3"]) == 0
    assert seen[0] is None  # one process: its own registry
    assert seen[1] is not None and "strata-api-metrics-" in seen[1]
    assert not Path(seen[1]).exists() and metrics_dir.ENV not in os.environ  # gone with it


def _scrape(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == COUNT and s.labels["route"] == "/health")  # fmt: skip


@pytest.mark.slow
def test_strata_api_with_two_processes_adds_up_their_request_counts(tmp_path: Path) -> None:
    shared = tmp_path / "prom"
    shared.mkdir()
    (shared / "counter_4000001.db").write_bytes(b"left by an earlier run")  # removed at start
    env = {k: v for k, v in os.environ.items() if not k.startswith("STRATA_")}
    env |= {"STRATA_DATA_DIR": str(tmp_path / "data"), "OMP_NUM_THREADS": "1",
            metrics_dir.ENV: str(shared)}  # fmt: skip
    cli = [sys.executable, "-m", "api.cli"]
    subprocess.run([*cli, "migrate"], env=env, cwd=REPO, check=True, capture_output=True)
    port = free_port()
    proc = subprocess.Popen([*cli, "api", "--port", str(port), "--workers", "2"], env=env,
                            cwd=REPO, stderr=subprocess.PIPE, text=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None, "the API did not start"
            time.sleep(0.2)
        sent = 1
        # new connections until both processes have answered some (the kernel picks which)
        while len({p.name for p in shared.glob("histogram_*.db")}) < 2 or sent < 20:
            assert httpx.get(f"{url}/health", headers={"Connection": "close"}).status_code == 200
            sent += 1
            assert sent < 500, "one process answered every request"
        # whichever process answers the scrape counts every process's requests
        assert [_scrape(url) for _ in range(4)] == [sent] * 4
        assert not (shared / "counter_4000001.db").exists()
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert err.count("Started server process") == 2, err


def test_templates_of_mounts_and_nested_routers_and_a_request_that_raised() -> None:
    from fastapi import APIRouter, FastAPI
    from starlette.staticfiles import StaticFiles

    from api.metrics import HttpMetrics

    app = FastAPI()
    inner = APIRouter(prefix="/things")

    @inner.get("/{thing}/parts/{part}")
    async def part(thing: str, part: str) -> str:
        return part

    @inner.get("/{thing}/boom")
    async def boom(thing: str) -> str:
        raise RuntimeError("a bug")

    outer = APIRouter(prefix="/x1")
    outer.include_router(inner)
    app.include_router(outer)
    app.mount("/static", StaticFiles(directory=str(REPO / "deploy")), name="static")
    app.add_middleware(HttpMetrics)
    routes = [("/x1/things/{thing}/parts/{part}", 200), ("/x1/things/{thing}/boom", 500),
              ("/static/{path}", 200), ("/static/{path}", 404)]  # fmt: skip
    before = {r: _count(*r) for r in routes}
    with TestClient(app, raise_server_exceptions=False) as c:
        assert c.get("/x1/things/a/parts/b").status_code == 200
        assert c.get("/x1/things/things/parts/x1").status_code == 200  # values like segments
        assert c.get("/x1/things/a/boom").status_code == 500
        assert c.get("/static/prometheus.yml").status_code == 200
        assert c.get("/static/nothing.txt").status_code == 404
    assert {r: _count(*r) - before[r] for r in routes} == {
        ("/x1/things/{thing}/parts/{part}", 200): 2, ("/x1/things/{thing}/boom", 500): 1,
        ("/static/{path}", 200): 1, ("/static/{path}", 404): 1,
    }  # fmt: skip


def test_strata_serve_shows_the_jobs_waiting_for_its_in_process_worker(instance: Instance) -> None:
    from registry.entities import JobKind
    from workers.inprocess import InProcessWorker
    from workers.predict import InProcessPredictor

    worker = InProcessWorker(instance, threads=1, scheduler=False)  # not started: jobs wait
    stream = instance.registry.streams.create(name="s", base_source={"kind": "tiny"},
                                              method="seq-lora", hyperparams={})  # fmt: skip
    for _ in range(2):
        worker.send(instance.registry.jobs.create(kind=JobKind.EVALUATE, stream_id=stream.id,
                                                  params={}))  # fmt: skip
    with TestClient(create_app(instance, worker, InProcessPredictor(instance))) as client:
        text = client.get("/metrics").text
    depth = {s.labels["queue"]: s.value for f in text_string_to_metric_families(text)
             for s in f.samples if s.name == "strata_queue_depth"}  # fmt: skip
    assert depth == {"inprocess": 2.0}

"""What the e2e tests share: the running service, uploads, reading and waiting for jobs."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import httpx

from registry.instance import Instance
from services.dispatch import Dispatcher

TIMEOUT_S = 420
# Every request of the e2e tests waits this long: on two busy cores (CI beside benchmarks) the
# API's first answer took over httpx's default 5 s.
http = httpx.Client(timeout=60)
WORKER_KNOBS = {"heartbeat_s": "1", "lease_s": "30", "stale_after_s": "60", "checkpoint_every": "3"}


@dataclass
class Service:
    url: str
    inst: Instance
    dispatcher: Dispatcher
    headers: dict[str, str]


def _service(url: str, inst: Instance, dispatcher: Dispatcher) -> Service:
    _, secret = inst.registry.tokens.create(name="e2e", scopes=["admin"])
    return Service(url, inst, dispatcher, {"Authorization": f"Bearer {secret}"})


def _jsonl(examples: Any) -> str:
    return "".join(json.dumps({"prompt": e.prompt, "completion": e.completion}) + "\n"
                   for e in examples)  # fmt: skip


def _job(svc: Service, job_id: int) -> dict[str, Any]:
    return dict(http.get(f"{svc.url}/v1/jobs/{job_id}", headers=svc.headers, timeout=30).json())


def _wait(svc: Service, ids: list[int], until: tuple[str, ...] = ("succeeded", "failed",
          "cancelled")) -> list[dict[str, Any]]:  # fmt: skip
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        jobs = [_job(svc, i) for i in ids]
        if all(j["state"] in until for j in jobs):
            return jobs
        time.sleep(0.5)
    raise AssertionError(f"jobs did not reach {until}: {[(j['id'], j['state']) for j in jobs]}")

"""API latency under load: task submissions and job-status reads from 64 concurrent clients.

    .venv/bin/python benchmarks/api_load.py --clients 64 --submissions 640 --reads 6400

Starts `strata api` (uvicorn, `--server-workers` processes) on loopback against a dedicated
PostgreSQL database (`--url`; its schema is dropped and re-created: never point it at a database
you use), a temporary artifact directory and Redis database `--redis-db` as the broker (purged
before and after; no Celery worker consumes, so submitted jobs stay queued). Then an asyncio
client (httpx) runs `--clients` concurrent connections: first multipart task submissions spread
over `--streams` streams, then reads of random jobs' status. Prints requests/s, p50/p99 latency
and the count of non-2xx answers per phase. Not a test.

`--reader wrk` reads the status with `wrk` (Debian package `wrk`: C, one event-loop thread)
for `--read-seconds` instead of the Python client, whose own CPU time on a 2-core machine is
part of what it measures. `--poll-ms N` makes each wrk connection wait a random 0 to 2N ms (N on
average) after each answer, as clients polling jobs' status at their own times do; without it
the clients ask as fast as answers come. `--floor` then reads the same jobs, the same way, from
`api_floor.py`: one route answering from one prepared statement, the least a status read can
cost on this machine with this framework and database.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import redis

from registry.db import make_engine, migrate
from registry.store import SqlRegistry

TRAIN = "".join(
    json.dumps({"prompt": f"Review {i}: it was {w}.\nSentiment:", "completion": f" {w}"}) + "\n"
    for i, w in enumerate(["good", "bad"] * 8)
).encode()


def start_server(args: argparse.Namespace, data_dir: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "STRATA_DATABASE_URL": args.url, "STRATA_DATA_DIR": str(data_dir),
           "STRATA_BROKER_URL": f"redis://127.0.0.1:6379/{args.redis_db}"}  # fmt: skip
    command = [sys.executable, "-m", "uvicorn", "--factory", "api.asgi:service_app",
               "--host", "127.0.0.1", "--port", str(args.port),
               "--workers", str(args.server_workers),
               "--timeout-worker-healthcheck", "60",
               "--log-level", "warning", "--no-access-log"]  # fmt: skip
    return subprocess.Popen(command, env=env)


def start_floor(args: argparse.Namespace) -> subprocess.Popen[bytes]:
    """`api_floor.py`'s app (not Strata) on the next port, on the same database."""
    env = {**os.environ, "STRATA_DATABASE_URL": args.url}
    command = [sys.executable, "-m", "uvicorn", "--app-dir", str(Path(__file__).parent),
               "api_floor:app", "--host", "127.0.0.1", "--port", str(args.port + 1),
               "--workers", str(args.server_workers),
               "--log-level", "warning", "--no-access-log"]  # fmt: skip
    return subprocess.Popen(command, env=env)


async def wait_healthy(base: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(base_url=base) as client:
        while time.monotonic() < deadline:
            try:
                if (await client.get("/health")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.2)
    raise SystemExit("the API did not come up")


async def phase(
    client: httpx.AsyncClient, clients: int, total: int, request: Any
) -> dict[str, Any]:
    """`total` requests from `clients` concurrent loops; latencies in ms and failures."""
    latencies: list[float] = []
    failures: dict[int, int] = {}
    counter = iter(range(total))

    async def loop() -> None:
        for n in counter:
            start = time.perf_counter()
            response = await request(client, n)
            latencies.append(1000 * (time.perf_counter() - start))
            if response.status_code >= 300:
                failures[response.status_code] = failures.get(response.status_code, 0) + 1

    started = time.perf_counter()
    await asyncio.gather(*(loop() for _ in range(clients)))
    seconds = time.perf_counter() - started
    latencies.sort()
    return {
        "requests": len(latencies),
        "per_s": len(latencies) / seconds,
        "p50": statistics.median(latencies),
        "p99": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
        "failures": failures,
    }


async def run(args: argparse.Namespace, token: str) -> list[tuple[str, dict[str, Any]]]:
    base = f"http://127.0.0.1:{args.port}"
    await wait_healthy(base)
    headers = {"Authorization": f"Bearer {token}"}
    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
    async with httpx.AsyncClient(base_url=base, headers=headers, limits=limits,
                                 timeout=60) as client:  # fmt: skip
        streams = []
        for s in range(args.streams):
            r = await client.post(
                "/v1/streams", json={"name": f"load-{s}", "base": {"kind": "tiny"}}
            )
            r.raise_for_status()
            streams.append(f"load-{s}")
        job_ids: list[int] = []

        async def submit(c: httpx.AsyncClient, n: int) -> httpx.Response:
            files = {"train": ("train.jsonl", TRAIN)}
            r = await c.post(f"/v1/streams/{streams[n % len(streams)]}/tasks",
                             data={"name": f"task-{n}"}, files=files)  # fmt: skip
            if r.status_code == 202:
                job_ids.append(int(r.json()["job"]["id"]))
            return r

        rng = random.Random(0)

        async def status(c: httpx.AsyncClient, _n: int) -> httpx.Response:
            return await c.get(f"/v1/jobs/{rng.choice(job_ids)}")

        submitted = await phase(client, args.clients, args.submissions, submit)
        if not job_ids:
            raise SystemExit("no submission was accepted")
        poll = f", polling every {args.poll_ms} ms" if args.poll_ms else ""
        if args.reader == "wrk":
            read = read_with_wrk(args, base, token, job_ids)
        else:
            read = await phase(client, args.clients, args.reads, status)
    reads = f"job status read ({args.reader}{poll})"
    results = [("task submission (multipart)", submitted), (reads, read)]
    if args.floor:
        floor = start_floor(args)
        try:
            floor_base = f"http://127.0.0.1:{args.port + 1}"
            await wait_healthy(floor_base)
            results.append((f"floor: api_floor.py ({args.reader}{poll})",
                            read_with_wrk(args, floor_base, token, job_ids)))  # fmt: skip
        finally:
            floor.terminate()
            floor.wait(timeout=30)
    return results


WRK_SCRIPT = """
local ids = {%(ids)s}
wrk.headers["Authorization"] = "Bearer %(token)s"
math.randomseed(0)
request = function()
  return wrk.format("GET", "/v1/jobs/" .. ids[math.random(#ids)])
end
delay = function() return math.random(0, 2 * %(poll_ms)d) end
done = function(summary, latency, requests)
  local e = summary.errors
  local errors = e.status + e.connect + e.read + e.write + e.timeout
  io.write(string.format("STRATA %%d %%d %%d %%d %%d\\n", summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99), errors))
end
"""


def read_with_wrk(
    args: argparse.Namespace, base: str, token: str, job_ids: list[int]
) -> dict[str, Any]:
    """Status reads of random submitted jobs by wrk, `args.clients` connections, one thread."""
    if shutil.which("wrk") is None:
        raise SystemExit("--reader wrk needs wrk on PATH (Debian: apt-get install wrk)")
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        ids = ",".join(map(str, job_ids))
        script.write(WRK_SCRIPT % {"ids": ids, "token": token, "poll_ms": args.poll_ms})
    try:
        command = ["wrk", "-t", "1", "-c", str(args.clients), "-d", f"{args.read_seconds}s",
                   "--timeout", "10s", "-s", script.name, base]  # fmt: skip
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    finally:
        os.unlink(script.name)
    match = re.search(r"STRATA (\d+) (\d+) (\d+) (\d+) (\d+)", out)
    if match is None:
        raise SystemExit(f"unexpected wrk output:\n{out}")
    requests, duration_us, p50_us, p99_us, errors = map(int, match.groups())
    failures = {0: errors} if errors else {}  # wrk counts statuses >= 400 and socket errors
    return {"requests": requests, "per_s": requests / (duration_us / 1e6),
            "p50": p50_us / 1000, "p99": p99_us / 1000, "failures": failures}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="postgresql://postgres@127.0.0.1:5432/strata_bench_api")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--submissions", type=int, default=640)
    parser.add_argument("--reads", type=int, default=6400)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--reader", choices=["httpx", "wrk"], default="httpx")
    parser.add_argument("--read-seconds", type=int, default=30, help="with --reader wrk")
    parser.add_argument("--poll-ms", type=int, default=0, help="with --reader wrk: mean think time")
    parser.add_argument("--floor", action="store_true",
                        help="with --reader wrk: then read the same jobs from api_floor.py's "
                        "one-query app, the least a status read can cost here")  # fmt: skip
    parser.add_argument("--server-workers", type=int, default=2)
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--redis-db", type=int, default=15)
    args = parser.parse_args()
    if args.floor and args.reader != "wrk":
        parser.error("--floor needs --reader wrk")
    engine = make_engine(args.url)
    migrate(engine, "base")
    migrate(engine, "head")
    registry = SqlRegistry(engine)
    _, token = registry.tokens.create(name="load", scopes=["admin"])
    registry.close()
    broker = redis.Redis(host="127.0.0.1", port=6379, db=args.redis_db)
    broker.flushdb()
    with tempfile.TemporaryDirectory(prefix="strata-api-load-") as tmp:
        server = start_server(args, Path(tmp))
        try:
            results = asyncio.run(run(args, token))
        finally:
            server.terminate()
            server.wait(timeout=30)
            broker.flushdb()
    print(f"\n{args.clients} clients, {args.server_workers} API processes\n")
    print("| phase | requests | requests/s | p50 (ms) | p99 (ms) | non-2xx |")
    print("|---|---|---|---|---|---|")
    for name, r in results:
        print(f"| {name} | {r['requests']} | {r['per_s']:.0f} | {r['p50']:.1f} | {r['p99']:.1f} "
              f"| {sum(r['failures'].values())} {r['failures'] or ''} |")  # fmt: skip


if __name__ == "__main__":
    main()

"""Downloading a snapshot over the REST API against the raw `minio` client fetching its weights.

    .venv/bin/python benchmarks/download_api.py --sizes-mb 1,100 --repeats 7 --dest-dir /dev/shm

What a user runs to get a model out of Strata: `GET /v1/streams/{s}/snapshots/0/download` from
a real API server (uvicorn, in a child process), written to a file by an HTTP client as the CLI
writes it. The server's artifacts are in an S3 server on loopback (moto's, in another child
process). The raw side is `fget_object` of the same weights file from the same S3 server.

Per size, a stream is created whose snapshot v0 is a tree of `config.json` and one
`model.safetensors` of that size (random fp32 values). Per round, in alternating order:
- raw: `fget_object` of the weights;
- cold: the server's local copy of the tree is deleted first (untimed), so the request fetches
  it from S3 into a new copy while it sends the archive;
- warm: the server already holds its verified copy and only sends the archive;
- each of these for every `--formats` entry (a server older than 2026-11-23 ignores the format
  and sends a `.tar.gz` it first writes to a temporary file: run it from an older checkout for
  the "before" figures).

`--floor` also downloads the raw weights through `download_floor.py`, a server in its own
process that only passes the S3 object's bytes on (no token, database, digest check, local copy
or archive): the least a download served through one more hop can cost here. Its CPU seconds
are shown in the API server's column.

The client side is `StrataClient.download`, what `strata adapters download` runs (without its
progress bar). Prints MB/s of the weights' size, the ratio to raw (medians), the CPU seconds each
process used per download (medians, from /proc: on a shared 2-core machine they vary less than
the times), and the API server's resident memory (its peak) before and after the run. Not a test.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from artifact_throughput import MB, free_port, start_moto
from minio import Minio
from safetensors.numpy import save_file

from api.client import StrataClient
from registry.artifacts import put_tree
from registry.instance import open_instance
from registry.settings import StrataSettings

RAW_BUCKET = "raw-download"


def write_tree(folder: Path, size_mb: int) -> Path:
    """A model folder whose weights file is `size_mb` MiB of fp32; returns the weights' path."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"model_type": "llama"}')
    rng = np.random.default_rng(size_mb)
    weights = (rng.standard_normal(size_mb * MB // 4) * 0.02).astype(np.float32)
    save_file({"w": weights}, str(folder / "model.safetensors"))
    return folder / "model.safetensors"


def server_env(data_dir: Path, endpoint: str, args: argparse.Namespace) -> dict[str, str]:
    return {**os.environ, "STRATA_DATA_DIR": str(data_dir), "STRATA_ARTIFACT_BACKEND": "minio",
            "STRATA_MINIO_ENDPOINT": endpoint, "STRATA_MINIO_ACCESS_KEY": "testing",
            "STRATA_MINIO_SECRET_KEY": "testing", "STRATA_MINIO_BUCKET": "strata-download",
            "STRATA_MINIO_REGION": "us-east-1",
            "STRATA_BROKER_URL": f"redis://127.0.0.1:6379/{args.redis_db}"}  # fmt: skip


def start_server(env: dict[str, str], port: int, *, app: str = "api.asgi:service_app",
                 extra: tuple[str, ...] = ("--factory",)) -> subprocess.Popen[bytes]:  # fmt: skip
    command = [sys.executable, "-m", "uvicorn", *extra, app, "--host", "127.0.0.1",
               "--port", str(port), "--log-level", "warning", "--no-access-log"]  # fmt: skip
    proc = subprocess.Popen(command, env=env)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("the API server did not start")


def memory_mib(pid: int) -> tuple[float, float]:
    """(resident, peak resident) MiB of process `pid`."""
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def cpu_seconds(pid: int) -> float:
    """User and system CPU time process `pid` has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed(fn: Callable[[], Any], pids: dict[str, int]) -> tuple[float, dict[str, float]]:
    """Wall seconds of `fn()`, and the CPU seconds each process used meanwhile."""
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    start = time.perf_counter()
    fn()
    wall = time.perf_counter() - start
    return wall, {name: cpu_seconds(pid) - before[name] for name, pid in pids.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes-mb", default="1,100")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--formats", default="tar,tar.gz")
    parser.add_argument("--redis-db", type=int, default=15)
    parser.add_argument(
        "--floor",
        action="store_true",
        help="also download through download_floor.py, a bare S3 pass-through",
    )
    parser.add_argument("--dest-dir", type=Path,
                        help="where the downloads go (default: the temporary folder; /dev/shm "
                        "keeps the disk's write-back out of the client's time)")  # fmt: skip
    args = parser.parse_args()
    formats = args.formats.split(",")
    moto_port, api_port = free_port(), free_port()
    moto = start_moto(moto_port)
    endpoint = f"127.0.0.1:{moto_port}"
    client = Minio(endpoint, access_key="testing", secret_key="testing", secure=False,
                   region="us-east-1")  # fmt: skip
    client.make_bucket(RAW_BUCKET, location="us-east-1")
    rows = []
    with tempfile.TemporaryDirectory(prefix="strata-download-") as tmp:
        data_dir = Path(tmp) / "data"
        env = server_env(data_dir, endpoint, args)
        os.environ.update({k: v for k, v in env.items() if k.startswith("STRATA_")})
        inst = open_instance(StrataSettings())  # creates the schema the server then uses
        _, token = inst.registry.tokens.create(name="download", scopes=["read"])
        streams = {}
        for size_mb in (int(s) for s in args.sizes_mb.split(",")):
            weights = write_tree(Path(tmp) / f"tree-{size_mb}", size_mb)
            digest = put_tree(inst.artifacts, weights.parent)
            inst.registry.streams.create(
                name=f"s{size_mb}", base_source={"kind": "bench"}, method="inc-lora",
                hyperparams={}, base_digest=digest,
            )  # fmt: skip
            client.fput_object(RAW_BUCKET, f"{size_mb}.safetensors", str(weights))
            streams[size_mb] = (digest, weights.stat().st_size)
        inst.close()
        server = start_server(env, api_port)
        strata = StrataClient(f"http://127.0.0.1:{api_port}", token=token)
        before = memory_mib(server.pid)
        pids = {"s3": moto.pid, "api": server.pid, "client": os.getpid()}
        floor, floor_client = None, None
        if args.floor:
            floor_port = free_port()
            floor = start_server({**os.environ, "FLOOR_S3_ENDPOINT": endpoint,
                                  "FLOOR_S3_BUCKET": RAW_BUCKET}, floor_port,
                                 app="download_floor:app",
                                 extra=("--app-dir", str(Path(__file__).parent)))  # fmt: skip
            floor_client = StrataClient(f"http://127.0.0.1:{floor_port}", token=token)
            pids["floor"] = floor.pid
        dest = (args.dest_dir or Path(tmp)) / f"strata-download-{os.getpid()}"
        try:
            for size_mb, (digest, size) in streams.items():
                path = f"/streams/s{size_mb}/snapshots/0/download"
                cached = data_dir / "cache" / "trees" / digest

                def forget(cached: Path = cached) -> None:  # untimed, before a cold download
                    shutil.rmtree(cached, ignore_errors=True)

                # (name, untimed preparation, the timed download)
                ops: list[tuple[str, Callable[[], Any], Callable[[], Any]]] = [
                    ("raw", lambda: None,
                     lambda s=size_mb: client.fget_object(RAW_BUCKET, f"{s}.safetensors",
                                                          str(dest))),
                ]  # fmt: skip
                if floor_client is not None:
                    ops.append(("floor (bare pass-through)", lambda: None,
                                partial(floor_client.download, f"/raw/{size_mb}.safetensors",
                                        dest)))  # fmt: skip
                for fmt in formats:
                    download = partial(strata.download, f"{path}?format={fmt}", dest)
                    ops.append((f"{fmt} cold", forget, download))
                    ops.append((f"{fmt} warm", lambda: None, download))
                strata.download(f"{path}?format={formats[0]}", dest)  # a first, untimed request
                times: dict[str, list[float]] = {}
                cpu: dict[str, dict[str, list[float]]] = {}
                for round_ in range(args.repeats):
                    order = ops if round_ % 2 == 0 else ops[::-1]
                    for name, prepare, fn in order:
                        prepare()
                        wall, used = timed(fn, pids)
                        times.setdefault(name, []).append(wall)
                        for proc, seconds in used.items():
                            cpu.setdefault(name, {}).setdefault(proc, []).append(seconds)
                raw = statistics.median(times["raw"])
                for name, runs in times.items():
                    median = statistics.median(runs)
                    per_proc = {p: statistics.median(v) for p, v in cpu[name].items()}
                    rows.append((size_mb, name, size / MB / median, raw / median, per_proc))
            after = memory_mib(server.pid)
        finally:
            strata.close()
            server.terminate()
            server.wait(timeout=30)
            if floor is not None and floor_client is not None:
                floor_client.close()
                floor.terminate()
                floor.wait(timeout=30)
            moto.terminate()
            moto.wait(timeout=10)
            dest.unlink(missing_ok=True)
    print("\n| size | path | MB/s | / raw | CPU s: S3 server | API server | client |")
    print("|---|---|---|---|---|---|---|")
    for size_mb, name, mbs, ratio, used in rows:
        server_cpu = used["floor" if name.startswith("floor") else "api"]
        print(f"| {size_mb} MB | {name} | {mbs:.0f} | {ratio:.2f}x | {used['s3']:.2f} | "
              f"{server_cpu:.2f} | {used['client']:.2f} |")  # fmt: skip
    print(f"\nserver memory: {before[0]:.0f} MiB resident at the start (peak {before[1]:.0f}), "
          f"{after[0]:.0f} MiB at the end (peak {after[1]:.0f})")  # fmt: skip


if __name__ == "__main__":
    main()

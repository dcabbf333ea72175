"""Artifact upload and download through Strata's MinIO store against the raw `minio` client.

    .venv/bin/python benchmarks/artifact_throughput.py --sizes-mb 1,100 --repeats 3

Both talk to the same S3 server on loopback (moto's, in a child process; pass `--endpoint` with
`--access-key`/`--secret-key` for a real MinIO) with the same files. Per size and round,
in alternating order: the raw client's `fput_object` / `fget_object`, then Strata's
`MinioStore.put_file` (a hashing pass, then an upload that hashes again) and `get_file` (streamed
to a temporary file, hashed, fsynced, renamed). Each round changes the file's first bytes, so
every upload is new (Strata skips content it already holds). Prints MB/s, the ratio Strata / raw
and the peak Python memory of each operation (tracemalloc), which stays flat when nothing is
buffered whole. Times come from rounds without tracemalloc (it slows every allocation, and
Strata runs more Python per byte than the raw client); the peaks from one more, traced round.
Not a test.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

from minio import Minio

from registry.artifacts.base import blob_key
from registry.artifacts.minio import MinioStore

MB = 2**20
RAW_BUCKET = "raw-bench"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def measure(fn: Callable[[], Any], *, traced: bool) -> tuple[float, int]:
    """(seconds, peak traced bytes or 0 when not `traced`) of one call."""
    if traced:
        tracemalloc.start()
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1] if traced else 0
    if traced:
        tracemalloc.stop()
    return seconds, peak


def one_round(
    client: Minio, store: MinioStore, src: Path, dest: Path, *, key: str, strata_first: bool,
    traced: bool,
) -> dict[str, tuple[float, int]]:  # fmt: skip
    """Each of the four operations once; the new objects are removed afterwards."""
    digest: list[str] = []
    raw = [
        ("raw upload", lambda: client.fput_object(RAW_BUCKET, key, str(src))),
        ("raw download", lambda: client.fget_object(RAW_BUCKET, key, str(dest))),
    ]
    strata = [
        ("strata upload", lambda: digest.append(store.put_file(src))),
        ("strata download", lambda: store.get_file(digest[-1], dest)),
    ]
    # alternate which side goes first, so neither always meets a warm cache
    order = strata + raw if strata_first else raw + strata
    out = {name: measure(fn, traced=traced) for name, fn in order}
    client.remove_object(RAW_BUCKET, key)
    client.remove_object(store.bucket, blob_key(digest[-1]))
    return out


def start_moto(port: int) -> subprocess.Popen[bytes]:
    """moto's S3 server in its own process, so our process's memory is only the client's."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return proc
        time.sleep(0.1)
    proc.kill()
    raise SystemExit("moto's server did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes-mb", default="1,100")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--endpoint", help="host:port of an S3 server (default: start moto)")
    parser.add_argument("--access-key", default="testing")
    parser.add_argument("--secret-key", default="testing")
    args = parser.parse_args()
    server = None
    endpoint = args.endpoint
    if endpoint is None:
        port = free_port()
        server = start_moto(port)
        endpoint = f"127.0.0.1:{port}"
    client = Minio(endpoint, access_key=args.access_key, secret_key=args.secret_key,
                   secure=False, region="us-east-1")  # fmt: skip
    store = MinioStore(endpoint=endpoint, access_key=args.access_key, secret_key=args.secret_key,
                       bucket="strata-bench", client=client, region="us-east-1")  # fmt: skip
    if not client.bucket_exists(RAW_BUCKET):
        client.make_bucket(RAW_BUCKET, location="us-east-1")
    rows = []
    try:
        with tempfile.TemporaryDirectory(prefix="strata-artifacts-") as tmp:
            for size_mb in (int(s) for s in args.sizes_mb.split(",")):
                src = Path(tmp) / f"{size_mb}.bin"
                src.write_bytes(os.urandom(size_mb * MB))
                out: dict[str, list[tuple[float, int]]] = {}
                for round_ in range(args.repeats + 1):  # the last one for memory
                    with src.open("r+b") as f:  # new content each round
                        f.write(round_.to_bytes(8, "little") + os.urandom(8))
                    measured = one_round(
                        client, store, src, Path(tmp) / "down.bin", key=f"{size_mb}-{round_}",
                        strata_first=round_ % 2 == 1, traced=round_ == args.repeats,
                    )  # fmt: skip
                    for name, value in measured.items():
                        out.setdefault(name, []).append(value)
                for direction in ("upload", "download"):
                    raw_runs, our_runs = out[f"raw {direction}"], out[f"strata {direction}"]
                    raw = statistics.median(s for s, _ in raw_runs[:-1])
                    ours = statistics.median(s for s, _ in our_runs[:-1])
                    rows.append((size_mb, direction, size_mb / raw, size_mb / ours, raw / ours,
                                 raw_runs[-1][1], our_runs[-1][1]))  # fmt: skip
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=10)
    print("| size | direction | raw MB/s | Strata MB/s | Strata / raw | raw peak MiB | "
          "Strata peak MiB |\n|---|---|---|---|---|---|---|")  # fmt: skip
    for size_mb, direction, raw_mbs, ours_mbs, ratio, raw_peak, ours_peak in rows:
        print(f"| {size_mb} MB | {direction} | {raw_mbs:.0f} | {ours_mbs:.0f} | {ratio:.2f}x | "
              f"{raw_peak / MB:.1f} | {ours_peak / MB:.1f} |")  # fmt: skip


if __name__ == "__main__":
    main()

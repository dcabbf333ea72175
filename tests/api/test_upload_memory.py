"""The API server's memory while it refuses hostile uploads (issue 19: a 1.1 MB gzip bomb peaked
at 2.0 GB before its refusal, a 200 MB line at 794 MB). The server is a process of its own
(`uvicorn --factory api.asgi:service_app`, the service's API, with the default limits); its peak
resident memory (VmHWM, reset before each upload) stays within 100 MiB of its idle memory while
it refuses each upload with a 422 naming the file, and it returns to idle after."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from registry.instance import open_instance
from registry.settings import StrataSettings
from tests.harness import REPO, free_port

log = logging.getLogger(__name__)

MiB = 2**20
HEADROOM = 100 * MiB  # what a refused upload may add to the idle server's resident memory
DEFAULTS = StrataSettings()
LINE, EXPANDED = DEFAULTS.max_line_bytes, DEFAULTS.max_expanded_bytes


@dataclass
class Server:
    url: str
    pid: int
    headers: dict[str, str]

    def memory(self, key: str) -> int:
        """`VmRSS` (now) or `VmHWM` (the peak since the last reset), in bytes."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        raise AssertionError(f"no {key} for {self.pid}")

    def reset_peak(self) -> None:
        Path(f"/proc/{self.pid}/clear_refs").write_text("5")  # VmHWM := VmRSS


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    data_dir = tmp_path_factory.mktemp("memory")
    inst = open_instance(StrataSettings(data_dir=data_dir))  # migrated SQLite, local artifacts
    try:
        inst.registry.streams.create(name="s", base_source={"kind": "tiny"}, method="seq-lora",
                                     hyperparams={})  # fmt: skip
        _, secret = inst.registry.tokens.create(name="w", scopes=["write"])
    finally:
        inst.close()
    port = free_port()
    env = {**os.environ, "STRATA_DATA_DIR": str(data_dir), "PYTHONPATH": str(REPO),
           "STRATA_BROKER_URL": "redis://127.0.0.1:6379/15"}  # fmt: skip
    cmd = [sys.executable, "-m", "uvicorn", "--factory", "api.asgi:service_app", "--host",
           "127.0.0.1", "--port", str(port), "--log-level", "warning"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "the API did not start"
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        yield Server(url=url, pid=proc.pid, headers={"Authorization": f"Bearer {secret}"})
    finally:
        proc.terminate()
        proc.wait(30)


def _members(block: bytes, *, times: int = 1) -> bytes:
    """A gzip file that expands to `block` repeated: packed once, the member repeated (gzip
    reads a concatenation of members as one file)."""
    packer = zlib.compressobj(9, wbits=31)
    return (packer.compress(block) + packer.flush()) * times


def _multipart(parts: Iterator[bytes], *, fields: dict[str, str]) -> tuple[dict[str, str], Any]:
    """A multipart body whose `train` file streams from `parts` (never held whole)."""
    boundary = uuid.uuid4().hex
    head = "".join(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'
                   for k, v in fields.items())  # fmt: skip
    head += (f'--{boundary}\r\nContent-Disposition: form-data; name="train"; filename="t"\r\n'
             "Content-Type: application/octet-stream\r\n\r\n")  # fmt: skip

    def body() -> Iterator[bytes]:
        yield head.encode()
        yield from parts
        yield f"\r\n--{boundary}--\r\n".encode()

    return {"Content-Type": f"multipart/form-data; boundary={boundary}"}, body()


def _post(server: Server, parts: Callable[[], Iterator[bytes]], **fields: str) -> httpx.Response:
    headers, body = _multipart(parts(), fields={"name": "t", **fields})
    return httpx.post(f"{server.url}/v1/streams/s/tasks", content=body,
                      headers={**server.headers, **headers}, timeout=300)  # fmt: skip


def _refused(response: httpx.Response, detail: str) -> None:
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["field"] == "train" and detail in body["detail"], body


CL = {"format": "cl_benchmark", "labels": '["a"]'}
RECORD = b'{"sentence": "s", "label": "a"},'


def _cases() -> list[tuple[str, Callable[[], Iterator[bytes]], dict[str, str], str, int]]:
    """(what, the file's parts, form fields, the refusal's detail, uploads sent at once)"""
    one_line = _members(b"{" * (16 * MiB), times=72)  # 1.1 GiB from 1.1 MB
    long_line = json.dumps({"prompt": "p" * (LINE - 64), "completion": " a"}).encode() + b"\n"
    valid_lines = _members(long_line * 16, times=72)  # 1152 lines, each under the limit
    one_record = _members(b'[{"sentence": "') + _members(b"a" * MiB, times=1100)
    records = _members(b"[") + _members(RECORD * 2**15, times=31)  # 1,015,808 of them
    return [
        ("gzip bomb of one line (1.1 GiB), two at once", lambda: iter([one_line]), {},
         f"line 1: longer than {LINE} bytes", 2),
        ("gzip bomb of valid lines (1.1 GiB)", lambda: iter([valid_lines]), {},
         f"expands to more than {EXPANDED} bytes", 1),
        ("200 MB single line", lambda: (b"x" * MiB for _ in range(200)), {},
         f"line 1: longer than {LINE} bytes", 1),
        ("JSON list bomb: one record (1.1 GiB)", lambda: iter([one_record]), CL,
         f"record 1: longer than {LINE} bytes", 1),
        ("JSON list bomb: 1,015,808 valid records", lambda: iter([records]), CL,
         "record 1000001: more than 1000000 examples", 1),
    ]  # fmt: skip


def test_refusing_hostile_uploads_keeps_the_server_within_100_mib_of_idle(server: Server) -> None:
    for fields in ({}, CL):  # warm up each path: the idle server has served uploads before
        r = _post(server, lambda: iter([_members(b"[{\n")]), **fields)
        assert r.status_code == 422, r.text
    idle = server.memory("VmRSS")
    figures = []
    for what, parts, fields, detail, at_once in _cases():
        server.reset_peak()
        with ThreadPoolExecutor(at_once) as pool:
            sent = [pool.submit(_post, server, parts, **fields) for _ in range(at_once)]
            answers = [future.result() for future in sent]
        peak = server.memory("VmHWM")
        for answer in answers:
            _refused(answer, detail)
        figures.append((what, (peak - idle) // MiB))
        log.warning("RELIABILITY upload memory: %s: idle %d MiB, peak +%d MiB, after +%d MiB",
                    what, idle // MiB, (peak - idle) // MiB,
                    (server.memory("VmRSS") - idle) // MiB)  # fmt: skip
    assert all(peak * MiB < HEADROOM for _, peak in figures), figures
    assert server.memory("VmRSS") - idle < HEADROOM  # nothing kept

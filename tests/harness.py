"""Real parts for service tests: Celery worker processes, a private Redis, an HTTP server.

Every helper is a context manager that leaves nothing running behind it."""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import uvicorn

from tests.conftest import S3_ACCESS_KEY, S3_REGION, S3_SECRET_KEY, fresh_database

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def serve(app: Any) -> Iterator[str]:
    """The app on a real HTTP server (uvicorn) on a loopback port; yields its URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@contextmanager
def strata_serve(folder: Path, *, workers: int = 1) -> Iterator[tuple[str, str]]:
    """`strata serve` as a user starts it (its own process, SQLite and a local artifact
    directory in `folder`/data, in-process worker threads) on a free port; yields its URL and
    the first admin token it prints. Its log is `folder`/serve.log."""
    port = free_port()
    log = (folder / "serve.log").open("w+")
    env = {k: v for k, v in os.environ.items() if not k.startswith("STRATA_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "api.cli", "serve", "--data-dir", str(folder / "data"),
         "--port", str(port), "--workers", str(workers)],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.3)
        else:
            raise AssertionError(Path(log.name).read_text())
        found = re.search(r"STRATA_TOKEN=(strata_\S+)", Path(log.name).read_text())
        assert found, "serve did not print the first admin token"
        yield url, found.group(1)
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def server_env(
    request: pytest.FixtureRequest, tmp_path: Path, *, broker: str | None = None
) -> dict[str, str]:
    """STRATA_* variables of a server deployment: a fresh PostgreSQL database, a fresh bucket on
    the S3 test server, and a Redis database (a throwaway number on 127.0.0.1:6379 by default)."""
    db_url = fresh_database(request, "postgresql")
    endpoint: str = request.getfixturevalue("s3_endpoint")
    if broker is None:
        broker = f"redis://127.0.0.1:6379/{random.randint(1, 15)}"
        redis.Redis.from_url(broker).flushdb()
    return {
        "STRATA_DATABASE_URL": db_url, "STRATA_ARTIFACT_BACKEND": "minio",
        "STRATA_MINIO_ENDPOINT": endpoint, "STRATA_MINIO_ACCESS_KEY": S3_ACCESS_KEY,
        "STRATA_MINIO_SECRET_KEY": S3_SECRET_KEY, "STRATA_MINIO_REGION": S3_REGION,
        "STRATA_MINIO_BUCKET": f"strata-test-{random.randrange(16**8):08x}",
        "STRATA_BROKER_URL": broker, "STRATA_DATA_DIR": str(tmp_path / "api"),
    }  # fmt: skip


def settings_kwargs(env: dict[str, str]) -> dict[str, str]:
    """`StrataSettings(**...)` arguments from STRATA_* variables."""
    return {k.removeprefix("STRATA_").lower(): v for k, v in env.items() if k.startswith("STRATA_")}


@dataclass
class Workers:
    """Celery worker processes, each with its data dir: by default a solo pool on the queues
    train and default (a training worker); `queues="predict", pool="threads"` makes one that
    answers the API's predictions."""

    env: dict[str, str]
    root: Path
    app: str = "workers.celery_app"  # the module `celery -A` loads
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start(
        self, name: str, *, queues: str = "train,default", pool: str = "solo"
    ) -> subprocess.Popen[bytes]:
        log = (self.root / f"{name}.log").open("ab")
        env = {**os.environ, **self.env, "STRATA_DATA_DIR": str(self.root / name)}
        cmd = [sys.executable, "-m", "celery", "-A", self.app, "worker", "-Q", queues,
               "-P", pool, "-c", "1" if pool == "solo" else "2", "-n", f"{name}@%h",
               "--without-gossip", "--without-mingle", "--loglevel=INFO"]  # fmt: skip
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self.procs[name] = proc
        return proc

    def kill(self, pid: int) -> None:
        """SIGKILL: the worker dies mid-whatever, with no chance to clean up."""
        os.kill(pid, signal.SIGKILL)
        for proc in self.procs.values():
            if proc.pid == pid:
                proc.wait(10)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)

    def logs(self, *, tail: int | None = None) -> str:
        texts = (p.read_text(errors="replace") for p in sorted(self.root.glob("*.log")))
        return "\n".join(t if tail is None else t[-tail:] for t in texts)


@contextmanager
def celery_workers(
    env: dict[str, str], root: Path, count: int, *, app: str = "workers.celery_app"
) -> Iterator[Workers]:
    root.mkdir(parents=True, exist_ok=True)
    workers = Workers(env=env, root=root, app=app)
    try:
        for i in range(count):
            workers.start(f"w{i}")
        yield workers
    finally:
        workers.stop()


@dataclass
class PrivateRedis:
    """A redis-server of the test's own on a loopback port, which the test may kill and restart
    (the shared 127.0.0.1:6379 serves the other tests)."""

    port: int
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [shutil.which("redis-server") or "redis-server", "--bind", "127.0.0.1", "--port",
             str(self.port), "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if redis.Redis.from_url(self.url).ping():
                    return
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def kill(self) -> None:
        """SIGKILL: everything in it (queued messages included) is gone."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None


@contextmanager
def private_redis() -> Iterator[PrivateRedis]:
    server = PrivateRedis(port=free_port())
    server.start()
    try:
        yield server
    finally:
        server.kill()


_PG_BINS = sorted(Path("/usr/lib/postgresql").glob("*/bin"))
PG_BIN = _PG_BINS[-1] if _PG_BINS else None  # Debian's server binaries


@dataclass
class PrivatePostgres:
    """A PostgreSQL cluster of the test's own (initdb in a temporary directory, run as the
    `postgres` user), which the test may stop and start again."""

    root: Path
    port: int

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        assert PG_BIN is not None, "PostgreSQL's server binaries are not installed"
        cmd = ["runuser", "-u", "postgres", "--", str(PG_BIN / args[0]), *args[1:]]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def init(self) -> None:
        shutil.chown(self.root, user="postgres")
        self._run("initdb", "-D", str(self.root / "data"), "-A", "trust", "-U", "postgres")

    def start(self) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1"
        self._run("pg_ctl", "-D", str(self.root / "data"), "-o", options,
                  "-l", str(self.root / "log"), "-w", "start")  # fmt: skip

    def stop(self, mode: str = "immediate") -> None:
        """`immediate`: connections are cut as in a crash."""
        self._run("pg_ctl", "-D", str(self.root / "data"), "-m", mode, "-w", "stop")


@contextmanager
def private_postgres() -> Iterator[PrivatePostgres]:
    """In a directory of its own under the system's temp dir (pytest's is root's alone)."""
    root = Path(tempfile.mkdtemp(prefix="strata-pg-"))
    server = PrivatePostgres(root=root, port=free_port())
    try:
        server.init()
        server.start()
        yield server
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):
            server.stop()
        shutil.rmtree(root, ignore_errors=True)


class FreezableProxy:
    """A TCP forwarder on a loopback port to `target_port`, which the test may freeze: while
    frozen it accepts no connection and moves no byte, so clients meet what a SIGSTOPped
    server shows them (the kernel completes their connects, then nothing answers)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.port = int(self._listener.getsockname()[1])
        self._live = threading.Event()
        self._live.set()
        self._closed = threading.Event()
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def freeze(self) -> None:
        self._live.clear()

    def thaw(self) -> None:
        self._live.set()

    def close(self) -> None:
        self._closed.set()
        self._live.set()
        for sock in [self._listener, *self._sockets]:
            with contextlib.suppress(OSError):
                sock.close()

    def _accept(self) -> None:
        while not self._closed.is_set():
            self._live.wait()
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            self._sockets += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        import select

        try:
            while not self._closed.is_set():
                self._live.wait()
                if not select.select([src], [], [], 0.1)[0]:
                    continue
                self._live.wait()  # frozen between the two: the bytes stay unread
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


@contextmanager
def freezable_proxy(target_port: int) -> Iterator[FreezableProxy]:
    proxy = FreezableProxy(target_port)
    try:
        yield proxy
    finally:
        proxy.close()


class Receiver:
    """An HTTP server on loopback that records what it is sent; while `down` it answers 503."""

    def __init__(self) -> None:
        self.got: list[tuple[dict[str, str], bytes]] = []
        self.down = False
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if receiver.down:
                    self.send_response(503)
                else:
                    receiver.got.append((dict(self.headers), body))
                    self.send_response(204)
                self.end_headers()

            def log_message(self, *_a: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

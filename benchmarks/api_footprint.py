"""What an API process costs before its first request: the time `import api.asgi` takes and the
resident memory of `strata api` once `/health` answers, for this checkout and an older one side
by side (alternating, so that both see the same machine load).

    git worktree add --detach /tmp/strata-before 8b208f3
    .venv/bin/python benchmarks/api_footprint.py --before /tmp/strata-before --rounds 5

Each round runs, per tree, a fresh interpreter that imports `api.asgi` (wall time of the import
alone), then a fresh `strata api` (one process, SQLite in a temporary directory, the broker at
STRATA_BROKER_URL or the local Redis) whose RSS is read from /proc once `/health` answers. The
tree's own code is imported (it is the working directory), with this checkout's virtualenv.
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
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
IMPORT = "import time; t = time.perf_counter(); import api.asgi; print(time.perf_counter() - t)"


def _env(data_dir: Path) -> dict[str, str]:
    return {
        **os.environ, "STRATA_DATA_DIR": str(data_dir), "STRATA_ARTIFACT_BACKEND": "local",
        "STRATA_DATABASE_URL": f"sqlite:///{data_dir / 'strata.db'}",
        "STRATA_BROKER_URL": os.environ.get("STRATA_BROKER_URL", "redis://127.0.0.1:6379/14"),
        "PYTHONPATH": "",
    }  # fmt: skip


def import_seconds(tree: Path) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run([sys.executable, "-c", IMPORT], cwd=tree, env=_env(Path(tmp)),
                             capture_output=True, text=True, check=True, timeout=300)  # fmt: skip
    return float(out.stdout.strip().splitlines()[-1])


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def api_rss_mb(tree: Path) -> float:
    """RSS of a one-process `strata api` of `tree` once /health answers."""
    with tempfile.TemporaryDirectory() as tmp:
        env = _env(Path(tmp))
        migrate = [
            sys.executable,
            "-c",
            "from api.cli import main; raise SystemExit(main(['migrate']))",
        ]
        subprocess.run(migrate, cwd=tree, env=env, check=True, capture_output=True, timeout=300)
        port = _port()
        cmd = [sys.executable, "-c", "from api.cli import main; raise SystemExit(main())", "api",
               "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
        proc = subprocess.Popen(cmd, cwd=tree, env={**env, "PYTHONUNBUFFERED": "1"},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        try:
            deadline = time.monotonic() + 300
            while True:
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
                    break
                except OSError:
                    if time.monotonic() > deadline or proc.poll() is not None:
                        raise RuntimeError(f"strata api of {tree} did not start") from None
                    time.sleep(0.2)
            return _rss_mb(proc.pid)
        finally:
            proc.terminate()
            proc.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, required=True, help="a checkout of the older code")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    trees = {"before": args.before.resolve(), "after": HERE}
    seconds: dict[str, list[float]] = {k: [] for k in trees}
    rss: dict[str, list[float]] = {k: [] for k in trees}
    for r in range(args.rounds):
        for name, tree in trees.items():
            seconds[name].append(import_seconds(tree))
            rss[name].append(api_rss_mb(tree))
            print(f"round {r + 1} {name}: import {seconds[name][-1]:.2f} s, "
                  f"RSS {rss[name][-1]:.0f} MB", file=sys.stderr)  # fmt: skip
    print("| tree | `import api.asgi` (median, min-max) | `strata api` RSS after start (median) |")
    print("|---|---|---|")
    for name in trees:
        s, m = seconds[name], rss[name]
        print(f"| {name} | {statistics.median(s):.2f} s ({min(s):.2f}-{max(s):.2f}) | "
              f"{statistics.median(m):.0f} MB ({min(m):.0f}-{max(m):.0f}) |")  # fmt: skip
    ratio_s = statistics.median(seconds["after"]) / statistics.median(seconds["before"])
    ratio_m = statistics.median(rss["after"]) / statistics.median(rss["before"])
    print(f"\nafter / before: import {ratio_s:.2f}x, RSS {ratio_m:.2f}x")


if __name__ == "__main__":
    main()

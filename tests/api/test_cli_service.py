"""`strata serve` as a user starts it, driven by the `strata` CLI over HTTP."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from api.cli import main
from continual.data import synthetic_tasks
from continual.models import build_tiny_llama
from tests.harness import free_port, strata_serve

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """(url, admin token) of a `strata serve` process on a fresh data directory."""
    with strata_serve(tmp_path) as (url, token):
        yield url, token


def _write_task(folder: Path) -> Path:
    task = synthetic_tasks(seed=0, train_size=32, test_size=6)[1]
    folder.mkdir(parents=True)
    for split in ("train", "test"):
        lines = [json.dumps({"prompt": e.prompt, "completion": e.completion})
                 for e in getattr(task, split)]  # fmt: skip
        (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    (folder / "labels.json").write_text(json.dumps(list(task.labels or ())))
    return folder


def test_serve_and_the_cli_from_stream_to_download(
    served: tuple[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url, token = served
    auth = ["--url", url, "--token", token]
    data = _write_task(tmp_path / "topic")

    def run(*args: str) -> str:
        code = main([*args, *auth])
        out = capsys.readouterr()
        assert code == 0, out.err
        return out.out

    made = run("streams", "create", "news", "--base", "tiny", "--set", "max_steps=6", "--set",
               "batch_size=8")  # fmt: skip
    assert '"name": "news"' in made and "job 1 succeeded" in made  # it waits for the import
    assert "news" in run("streams", "list")
    # a model directory is imported from the data dir's imports/ (the embedded default root)
    model, tok = build_tiny_llama(seed=5)
    model.save_pretrained(tmp_path / "data" / "imports" / "mine", safe_serialization=True)
    tok.save_pretrained(tmp_path / "data" / "imports" / "mine")
    assert "job 2 succeeded" in run("streams", "create", "mine", "--base", "hf:mine")
    assert main(["streams", "create", "etc", "--base", "hf:/etc", *auth]) == 2
    assert "error (422)" in capsys.readouterr().err
    files = ["--train", str(data / "train.jsonl"), "--test", str(data / "test.jsonl")]
    out = run("tasks", "submit", "news", "topic", *files, "--labels", str(data / "labels.json"),
              "--watch")  # fmt: skip
    assert "job 3 queued" in out and "job 3 succeeded" in out
    assert "succeeded" in run("jobs", "list", "--stream", "news")
    assert "after topic" in run("evaluations", "news") and "ACC" in run("evaluations", "news")
    tree = run("lineage", "adapter", "news", "topic", "latest")  # by the names a user knows
    assert "trained_on: news snapshot v0" in tree and "trained_with: dataset" in tree
    assert run("lineage", "adapter", "1") == tree  # or by the id a graph shows
    down = run("lineage", "snapshot", "news", "0", "--descendants")
    assert "topic v1 (seq-lora, ready) ─trained_on→ ↑" in down, down  # child relation parent
    assert main(["lineage", "snapshot", "news", *auth]) == 2
    assert "expects STREAM VERSION or an id" in capsys.readouterr().err
    assert "topic" in run("adapters", "list", "news")
    archive = tmp_path / "topic.tar"
    run("adapters", "download", "news", "topic", "latest", "-o", str(archive))
    with tarfile.open(archive, "r:") as tar:  # a plain tar by default
        assert set(tar.getnames()) == {"news-topic-v1", "news-topic-v1/adapter_config.json",
                                       "news-topic-v1/adapter_model.safetensors"}  # fmt: skip
    gz = tmp_path / "topic.tar.gz"
    run("adapters", "download", "news", "topic", "1", "-o", str(gz), "--format", "tar.gz")
    with tarfile.open(gz, "r:gz") as tar, tarfile.open(archive, "r:") as plain:
        assert tar.getnames() == plain.getnames()
        weights = "news-topic-v1/adapter_model.safetensors"
        assert _read(tar, weights) == _read(plain, weights)
    assert not list(tmp_path.glob(".*.part"))  # written next to the archive, then renamed
    assert "prod -> topic v1" in run("adapters", "alias", "news", "topic", "prod", "1")
    prompt = json.loads((data / "test.jsonl").read_text().splitlines()[0])["prompt"]
    labels = json.loads((data / "labels.json").read_text())
    assert "topic@v1" in run("predict", "news", prompt, "--labels", ",".join(labels))
    assert "schedule 1" in run("schedules", "create", "news", "--cron", "0 4 * * *", "--task",
                               "topic")  # fmt: skip
    assert "retrain" in run("schedules", "list", "news")
    run("schedules", "delete", "1")

    # consolidation folds the adapter into snapshot v1; rolling back moves the pointer only
    out = run("streams", "consolidate", "news", "--max-drop", "5", "--watch")
    assert "job 4 succeeded" in out
    assert "v1" in run("snapshots", "list", "news").splitlines()[-1]
    assert "(current)" in run("snapshots", "list", "news").splitlines()[-1]
    assert "now on snapshot v0" in run("snapshots", "activate", "news", "0")
    assert "(current)" in run("snapshots", "list", "news").splitlines()[0]
    snapshot = tmp_path / "base.tar"
    assert "wrote" in run("snapshots", "download", "news", "1", "-o", str(snapshot))
    with tarfile.open(snapshot, "r:") as tar:
        assert "news-snapshot-v1/config.json" in tar.getnames()
    policy = run("streams", "policy", "news", "--every-tasks", "3", "--max-drop", "4.5")
    assert "'every_tasks': 3" in policy and "'max_drop': 4.5" in policy

    # errors are one clear line and exit code 2
    assert main(["streams", "show", "nope", *auth]) == 2
    assert "error (404)" in capsys.readouterr().err
    assert main(["streams", "list", "--url", url, "--token", "strata_wrong"]) == 2
    assert "error (401)" in capsys.readouterr().err


def test_strata_api_serves_from_several_processes(tmp_path: Path) -> None:
    """`strata api --workers 2`: uvicorn builds the app in each process from the environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STRATA_")}
    env |= {"STRATA_DATA_DIR": str(tmp_path / "data"), "OMP_NUM_THREADS": "1"}
    cli = [sys.executable, "-m", "api.cli"]
    made = subprocess.run([*cli, "tokens", "create", "--scope", "read"], env=env, cwd=REPO,
                          capture_output=True, text=True, check=True)  # fmt: skip
    secret = made.stdout.strip().splitlines()[-1]
    port = free_port()
    proc = subprocess.Popen([*cli, "api", "--port", str(port), "--workers", "2"], env=env,
                            cwd=REPO, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None, "the API did not start"
            time.sleep(0.2)
        auth = {"Authorization": f"Bearer {secret}"}
        assert httpx.get(f"{url}/v1/streams", headers=auth).json()["data"] == []
        assert httpx.get(f"{url}/v1/streams").status_code == 401
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert err.count("Started server process") == 2, err
    assert "died" not in err, err  # none replaced for being slow to start (--healthcheck-timeout)


def test_strata_api_hands_the_healthcheck_timeout_to_uvicorn(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import uvicorn

    calls: list[dict[str, object]] = []
    monkeypatch.setattr(uvicorn, "run", lambda *args, **kwargs: calls.append(kwargs))
    assert main(["api", "--workers", "2"]) == 0
    assert main(["api", "--workers", "2", "--healthcheck-timeout", "90"]) == 0
    assert [c["timeout_worker_healthcheck"] for c in calls] == [60, 90]
    for bad in ("0", "-5", "soon"):
        with pytest.raises(SystemExit) as exit_:
            main(["api", "--healthcheck-timeout", bad])
        assert exit_.value.code == 2
        assert f"--healthcheck-timeout: must be a whole number of seconds >= 1, not {bad}" in (
            capsys.readouterr().err
        )
    assert len(calls) == 2


def _read(tar: tarfile.TarFile, name: str) -> bytes:
    member = tar.extractfile(name)
    assert member is not None, name
    return member.read()


def test_serve_on_a_busy_port_says_so_and_creates_no_token(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The port is taken before anything is created: the first admin token, printed once, is
    printed by the run that serves."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        code = main(["serve", "--port", str(port), "--data-dir", str(tmp_path / "data")])
    assert code == 2
    err = capsys.readouterr()
    assert f"cannot listen on 127.0.0.1:{port}" in err.err and "--port" in err.err
    assert "STRATA_TOKEN" not in err.out
    assert not (tmp_path / "data").exists()  # no database, no token
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    assert "(default: 8000" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["streams", "list", "--help"])
    assert "STRATA_URL" in capsys.readouterr().out


def test_gc_reports_then_removes_what_nothing_references(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from registry.instance import open_instance
    from registry.settings import StrataSettings

    monkeypatch.setenv("STRATA_DATA_DIR", str(tmp_path / "data"))
    inst = open_instance(StrataSettings())
    stray = inst.artifacts.put_bytes(b"nothing references this")
    inst.close()
    time.sleep(1.1)

    assert main(["gc", "--dry-run", "--grace", "1"]) == 0
    assert "would remove 1 of 1 blobs (23 bytes)" in capsys.readouterr().out
    assert main(["gc"]) == 0  # the default grace period (a day) keeps it
    kept = "removed 0 of 1 blobs (0 bytes); kept 0 referenced and 1 recent"
    assert kept in capsys.readouterr().out
    assert main(["gc", "--grace", "1"]) == 0
    assert "removed 1 of 1 blobs" in capsys.readouterr().out
    inst = open_instance(StrataSettings())
    assert not inst.artifacts.exists(stray)
    inst.close()
    monkeypatch.delenv("STRATA_DATA_DIR")
    assert main(["gc", "--data-dir", str(tmp_path / "data"), "--dry-run"]) == 0
    assert "would remove 0 of 0 blobs" in capsys.readouterr().out
    assert main(["gc", "--data-dir", str(tmp_path / "elsewhere")]) == 2
    assert "no Strata instance in" in capsys.readouterr().err

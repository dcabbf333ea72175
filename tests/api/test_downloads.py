"""Snapshot downloads (adapters share their code) over real HTTP (uvicorn on loopback), through
the client the CLI uses: whole and announced, or cut short and left behind."""

from __future__ import annotations

import dataclasses
import io
import itertools
import json
import os
import tarfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import urllib3

from api.app import create_app
from api.client import ApiError, StrataClient
from registry.artifacts import ArtifactStore, put_tree, read_manifest
from registry.entities import Snapshot
from registry.instance import Instance
from services.trees import fetch_tree, tree_cache_path
from tests.api.conftest import SETTINGS, Api, Recorder
from tests.api.test_api import FAST, _stream, _submit
from tests.harness import serve
from workers.runner import run_job
from workers.streams import create_stream


def _snapshot(instance: Instance) -> tuple[Snapshot, str]:
    _, snapshot = create_stream(instance, name="s1", base={"kind": "tiny"})
    _, token = instance.registry.tokens.create(name="reader", scopes=["read"])
    return snapshot, token


def test_a_snapshot_downloads_whole_with_its_length_and_progress(
    instance: Instance, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("api.client.DOWNLOAD_CHUNK", 64 * 1024)  # progress in several steps
    inst = dataclasses.replace(instance, settings=SETTINGS)
    snapshot, token = _snapshot(inst)
    files = read_manifest(inst.artifacts, snapshot.artifact_digest)["files"]
    out = tmp_path / "out"
    out.mkdir()
    seen: list[tuple[int, int | None]] = []
    with serve(create_app(inst, Recorder())) as url:
        client = StrataClient(url, token=token)
        try:
            dest = client.download(
                "/streams/s1/snapshots/0/download", out / "s1.tar",
                progress=lambda done, total: seen.append((done, total)),
            )  # fmt: skip
            again = client.download("/streams/s1/snapshots/0/download", out / "again.tar")
            with pytest.raises(ApiError) as missing:
                client.download("/streams/nope/snapshots/0/download", out / "x.tar")
            with pytest.raises(ApiError) as bad_format:
                client.download("/streams/s1/snapshots/0/download", out / "x.tar",
                                params={"format": "zip"})  # fmt: skip
        finally:
            client.close()
    body = dest.read_bytes()
    assert again.read_bytes() == body  # the second came from the local copy: the same bytes
    assert seen[-1] == (len(body), len(body)) and len(seen) >= len(body) // (64 * 1024)
    assert all(b[0] > a[0] for a, b in itertools.pairwise(seen))
    with tarfile.open(fileobj=io.BytesIO(body), mode="r:") as tar:
        sizes = {m.name: m.size for m in tar.getmembers() if m.isfile()}
    assert sizes == {f"s1-snapshot-v0/{rel}": e["size"] for rel, e in files.items()}
    assert missing.value.status == 404 and not (out / "x.tar").exists()
    assert bad_format.value.status == 422 and bad_format.value.field == "format"
    assert sorted(p.name for p in out.iterdir()) == ["again.tar", "s1.tar"]


def test_a_corrupt_blob_cuts_the_download_short_and_the_destination_is_kept(
    instance: Instance, tmp_path: Path, corrupt_blob: Callable[[ArtifactStore, str, bytes], None]
) -> None:
    inst = dataclasses.replace(instance, settings=SETTINGS)
    snapshot, token = _snapshot(inst)
    files = read_manifest(inst.artifacts, snapshot.artifact_digest)["files"]
    rel, entry = max(files.items(), key=lambda item: item[1]["size"])
    assert rel.endswith(".safetensors")
    data = bytearray(inst.artifacts.get_bytes(entry["digest"]))
    data[-1] ^= 0xFF  # the same size and a valid header: only the digest tells
    corrupt_blob(inst.artifacts, entry["digest"], bytes(data))
    (tmp_path / "out").mkdir()
    dest = tmp_path / "out" / "s1.tar"
    dest.write_bytes(b"an earlier download")
    with serve(create_app(inst, Recorder())) as url:
        client = StrataClient(url, token=token)
        try:
            with pytest.raises(urllib3.exceptions.ProtocolError):
                client.download("/streams/s1/snapshots/0/download", dest)
        finally:
            client.close()
    assert dest.read_bytes() == b"an earlier download"
    assert sorted(p.name for p in dest.parent.iterdir()) == ["s1.tar"]  # no partial file
    assert not tree_cache_path(inst, snapshot.artifact_digest).exists()


def test_a_client_that_goes_away_stops_the_fetch_and_leaves_no_copy(
    instance: Instance, tmp_path: Path
) -> None:
    inst = dataclasses.replace(instance, settings=SETTINGS)
    src = tmp_path / "src"
    src.mkdir()
    (src / "big.txt").write_bytes(os.urandom(64 * 2**20))  # far more than the queue and sockets
    digest = put_tree(inst.artifacts, src)
    inst.registry.streams.create(name="big", base_source={"kind": "test"}, method="inc-lora",
                                 hyperparams={}, base_digest=digest)  # fmt: skip
    _, token = inst.registry.tokens.create(name="reader", scopes=["read"])
    cache = inst.cache_dir / "trees"
    with serve(create_app(inst, Recorder())) as url:
        pool = urllib3.PoolManager(headers={"Authorization": f"Bearer {token}"})
        response = pool.request("GET", f"{url}/v1/streams/big/snapshots/0/download",
                                preload_content=False)  # fmt: skip
        assert response.status == 200
        assert len(response.read(2**20)) == 2**20  # the fetch is under way
        assert _fetching()
        response.close()  # the client goes away
        pool.clear()
        deadline = time.monotonic() + 20
        while _fetching() and time.monotonic() < deadline:
            time.sleep(0.05)
    assert not _fetching()
    assert not (cache / digest).exists()
    assert [p.name for p in cache.iterdir()] == []  # no staging folder left either


def _fetching() -> bool:
    return any(t.name.startswith("fetch-") for t in threading.enumerate())


def test_an_adapter_names_its_base_not_a_server_path(api: Api) -> None:
    """PEFT writes the local path the base was loaded from; an exported adapter names the
    snapshot instead (`strata snapshots download s1 0` gives it)."""
    from workers.jobs import base_name

    _stream(api, hyperparams=FAST)
    made = _submit(api, "s1", "t1")
    assert run_job(api.inst, made.json()["job"]["id"]).state == "succeeded"
    inst = api.inst
    task = inst.registry.tasks.get(stream_id=inst.registry.streams.get("s1").id, name="t1")
    version = inst.registry.adapters.get(task_id=task.id, ref_="latest")
    tree = fetch_tree(inst, version.artifact_digest or "")
    config = json.loads((tree / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "strata:s1/snapshots/0"
    assert base_name(inst, inst.registry.streams.current_snapshot(task.stream_id)) == (
        "strata:s1/snapshots/0"
    )

"""Adapter versions and snapshots: a trained task's versions, aliases and downloads (and its
lineage, evaluations and predictions, end to end); snapshot downloads (adapters share their code)
over real HTTP (uvicorn on loopback), through the client the CLI uses: whole and announced, or
cut short and left behind."""

from __future__ import annotations

import dataclasses
import gzip
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
import torch
import urllib3
from peft import PeftModel
from safetensors.torch import save_file

from api.app import create_app
from api.client import ApiError, StrataClient
from registry.artifacts import ArtifactStore, put_tree, read_manifest
from registry.entities import Snapshot
from registry.instance import Instance
from services.trees import fetch_tree, tree_cache_path
from tests.api.conftest import SETTINGS, Api, Recorder
from tests.api.helpers import FAST, _problem, _stream, _submit, _task_files, _wait
from tests.harness import serve
from workers.models import load_snapshot
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


@pytest.mark.slow
def test_a_trained_task_can_be_downloaded_traced_evaluated_and_queried(
    live_api: Api, tmp_path: Path
) -> None:
    api = live_api
    c, h = api.client, api.auth("write")
    _stream(api)
    job = _submit(api, "s1", "colors", n=48).json()["job"]
    assert _wait(api, job["id"])["state"] == "succeeded"
    with c.stream("GET", f"/v1/jobs/{job['id']}/events/stream", headers=h) as stream:
        text = "".join(stream.iter_text())
    assert "event: job-event" in text and '"loss"' in text and "event: end" in text

    versions = c.get("/v1/streams/s1/adapters", headers=h).json()["data"]
    assert [(v["task_name"], v["version"], v["status"]) for v in versions] == [
        ("colors", 1, "ready")
    ]
    v1 = c.get("/v1/streams/s1/tasks/colors/adapters/latest", headers=h).json()
    assert v1["id"] == versions[0]["id"] and "accuracy" in v1["metrics"]
    # aliases move; reserved and unknown ones are refused
    assert c.put("/v1/streams/s1/tasks/colors/aliases/prod", json={"version": 1},
                 headers=h).json()["aliases"] == ["latest", "prod"]  # fmt: skip
    assert c.get("/v1/streams/s1/tasks/colors/adapters/prod", headers=h).json()["version"] == 1
    _problem(c.put("/v1/streams/s1/tasks/colors/aliases/latest", json={"version": 1}, headers=h),
             422, "alias")  # fmt: skip
    _problem(c.put("/v1/streams/s1/tasks/colors/aliases/x", json={"version": 9}, headers=h), 404)
    assert c.delete("/v1/streams/s1/tasks/colors/aliases/prod", headers=h).status_code == 204
    _problem(c.get("/v1/streams/s1/tasks/colors/adapters/prod", headers=h), 404)

    # the download is a PEFT directory that loads on the stream's base
    r = c.get("/v1/streams/s1/tasks/colors/adapters/1/download", headers=h)
    assert r.status_code == 200 and r.headers["content-type"] == "application/x-tar"
    assert r.headers["content-length"] == str(len(r.content))  # announced before the first byte
    assert r.headers["content-disposition"] == 'attachment; filename="s1-colors-v1.tar"'
    with tarfile.open(fileobj=io.BytesIO(r.content), mode="r:") as archive:
        archive.extractall(tmp_path, filter="data")
    gz = c.get("/v1/streams/s1/tasks/colors/adapters/1/download", params={"format": "tar.gz"},
               headers=h)  # fmt: skip
    assert gz.status_code == 200 and gz.headers["content-type"] == "application/gzip"
    assert "content-length" not in gz.headers and gzip.decompress(gz.content) == r.content
    _problem(c.get("/v1/streams/s1/tasks/colors/adapters/1/download", params={"format": "zip"},
                   headers=h), 422, "format")  # fmt: skip
    folder = tmp_path / "s1-colors-v1"
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json",
                                                        "adapter_model.safetensors"]  # fmt: skip
    snapshot = api.inst.registry.streams.current_snapshot(v1["stream_id"])
    base, _ = load_snapshot(api.inst, snapshot)
    assert isinstance(PeftModel.from_pretrained(base, folder), PeftModel)
    snaps = c.get("/v1/streams/s1/snapshots", headers=h).json()
    assert snaps["count"] == 1 and snaps["data"][0]["current"] is True
    snap = c.get("/v1/streams/s1/snapshots/0/download", headers=h)
    assert snap.status_code == 200 and len(snap.content) > 1000

    graph = c.get(f"/v1/lineage/adapter/{v1['id']}", headers=h).json()
    kinds = {n["kind"] for n in graph["nodes"]}
    assert {"adapter", "snapshot", "dataset", "job"} <= kinds
    assert {"relation": "trained_with", "child": f"adapter:{v1['id']}",
            "parent": f"dataset:{v1['dataset_id']}"} in graph["edges"]  # fmt: skip
    down = c.get(f"/v1/lineage/snapshot/{snapshot.id}", params={"direction": "descendants"},
                 headers=h).json()  # fmt: skip
    assert f"adapter:{v1['id']}" in {f"{n['kind']}:{n['id']}" for n in down["nodes"]}
    _problem(c.get("/v1/lineage/adapter/999", headers=h), 404)
    _problem(c.get("/v1/lineage/planet/1", headers=h), 422, "kind")

    ev = c.get("/v1/streams/s1/evaluations", headers=h).json()
    assert ev["task_names"] == ["colors"] and len(ev["values"]) == 1
    assert ev["average_accuracy"] == pytest.approx(ev["values"][0][0])
    assert v1["metrics"]["accuracy"] == pytest.approx(ev["values"][0][0])
    # re-evaluating the current state (a job on the default queue) measures the same row
    again = c.post("/v1/streams/s1/evaluate", json={"eval_limit": 6}, headers=h)
    assert again.status_code == 202 and again.json()["kind"] == "evaluate"
    assert _wait(api, again.json()["id"])["state"] == "succeeded"
    assert c.get("/v1/streams/s1/evaluations", headers=h).json()["values"] == ev["values"]
    _problem(
        c.post("/v1/streams/s1/evaluate", json={"eval_limit": 0}, headers=h), 422, "eval_limit"
    )

    train, _, labels = _task_files(n=48)
    prompt = json.loads(train.splitlines()[0])["prompt"]
    out = c.post("/v1/streams/s1/predict", json={"inputs": [prompt], "labels": labels},
                 headers=h).json()  # fmt: skip
    assert out["adapters"] == ["colors@v1"] and out["predictions"][0]["output"] in labels
    assert set(out["predictions"][0]["scores"]) == set(labels)
    # raw text on the task's version generates; with its template its labels are ranked
    # (tests/api/routes/test_predict.py checks both against references)
    raw = {"inputs": [prompt], "task": "colors", "version": "1", "template": False}
    gen = c.post("/v1/streams/s1/predict", json={**raw, "max_new_tokens": 3}, headers=h).json()
    assert isinstance(gen["predictions"][0]["output"], str)
    assert gen["predictions"][0]["scores"] is None
    ranked = c.post("/v1/streams/s1/predict", json={**raw, "template": True}, headers=h).json()
    assert set(ranked["predictions"][0]["scores"]) == set(labels)
    _problem(c.post("/v1/streams/s1/predict", json={"inputs": []}, headers=h), 422, "inputs")
    _problem(c.post("/v1/streams/s1/predict", json={"inputs": ["x"], "task": "nope"}, headers=h),
             404, "task")  # fmt: skip


def _versions(api: Api, tmp_path: Path) -> dict[str, int]:
    """Stream s1 with task a (v1 and v2 ready, one stored tree) and task b (v1 pending), made in
    the registry without training; returns the versions' ids by `task@version`."""
    reg, digest = api.inst.registry, "d" * 64
    stream = reg.streams.create(name="s1", base_source={"kind": "tiny"}, method="seq-lora",
                                hyperparams={})  # fmt: skip
    snap = reg.streams.add_snapshot(stream_id=stream.id, artifact_digest=digest, source={})
    ds = reg.tasks.add_dataset(digest=digest, format="jsonl", num_train=4, num_test=1,
                               size_bytes=10).id  # fmt: skip
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text('{"r": 4}')
    save_file({"lora_A.weight": torch.ones(4, 64)}, str(folder / "adapter_model.safetensors"))
    tree = put_tree(api.inst.artifacts, folder)
    ids = {}
    for name, ready in (("a", 2), ("b", 0)):
        task, _ = reg.tasks.submit(stream_id=stream.id, name=name, dataset_id=ds)
        for v in range(1, max(ready, 1) + 1):
            made = reg.adapters.create_version(task_id=task.id, method="seq-lora", hyperparams={},
                                               base_snapshot_id=snap.id, dataset_id=ds)  # fmt: skip
            if ready:
                reg.adapters.mark_ready(made.id, artifact_digest=tree, metrics={"accuracy": v / 4})
            ids[f"{name}@{v}"] = made.id
    return ids


def test_adapter_versions_page_resolve_take_aliases_and_refuse_what_is_not_there(
    api: Api, tmp_path: Path
) -> None:
    c, h, read = api.client, api.auth("write"), api.auth("read")
    ids = _versions(api, tmp_path)
    page = c.get("/v1/streams/s1/adapters", params={"limit": 2}, headers=read).json()
    assert [v["id"] for v in page["data"]] == [ids["a@1"], ids["a@2"]]
    assert page["next_cursor"] == ids["a@2"]
    rest = c.get("/v1/streams/s1/adapters", params={"limit": 2, "cursor": page["next_cursor"]},
                 headers=read).json()  # fmt: skip
    assert [(v["task_name"], v["version"], v["status"]) for v in rest["data"]] == [
        ("b", 1, "pending")]  # fmt: skip
    assert rest["next_cursor"] is None
    only_b = c.get("/v1/streams/s1/adapters", params={"task": "b"}, headers=read).json()["data"]
    assert [v["id"] for v in only_b] == [ids["b@1"]]
    _problem(c.get("/v1/streams/s1/adapters", params={"task": "zz"}, headers=read), 404, "task")
    _problem(c.get("/v1/streams/nope/adapters", headers=read), 404, "stream")
    latest = c.get("/v1/streams/s1/tasks/a/adapters/latest", headers=read).json()
    assert (latest["id"], latest["version"], latest["aliases"]) == (ids["a@2"], 2, ["latest"])
    assert latest["metrics"] == {"accuracy": 0.5}
    assert c.get("/v1/streams/s1/tasks/a/adapters/1", headers=read).json()["aliases"] == []
    _problem(c.get("/v1/streams/s1/tasks/b/adapters/latest", headers=read), 404)  # none ready
    _problem(c.get("/v1/streams/s1/tasks/a/adapters/3", headers=read), 404)
    _problem(c.get("/v1/streams/s1/tasks/zz/adapters/1", headers=read), 404, "task")

    moved = c.put("/v1/streams/s1/tasks/a/aliases/prod", json={"version": 1}, headers=h)
    assert moved.status_code == 200 and moved.json()["aliases"] == ["prod"]
    assert c.get("/v1/streams/s1/tasks/a/adapters/prod", headers=read).json()["version"] == 1
    moved = c.put("/v1/streams/s1/tasks/a/aliases/prod", json={"version": 2}, headers=h)
    assert moved.json()["aliases"] == ["latest", "prod"]
    assert c.get("/v1/streams/s1/tasks/a/adapters/1", headers=read).json()["aliases"] == []
    _problem(c.put("/v1/streams/s1/tasks/a/aliases/prod", json={"version": 1}, headers=read), 403)
    _problem(c.put("/v1/streams/s1/tasks/a/aliases/latest", json={"version": 1}, headers=h),
             422, "alias")  # fmt: skip
    _problem(c.put("/v1/streams/s1/tasks/a/aliases/x", json={"version": 0}, headers=h),
             422, "version")  # fmt: skip
    _problem(c.put("/v1/streams/s1/tasks/b/aliases/x", json={"version": 1}, headers=h), 409)
    assert c.delete("/v1/streams/s1/tasks/a/aliases/prod", headers=h).status_code == 204
    _problem(c.delete("/v1/streams/s1/tasks/a/aliases/prod", headers=h), 404, "alias")
    _problem(c.get("/v1/streams/s1/tasks/a/adapters/prod", headers=read), 404)

    r = c.get("/v1/streams/s1/tasks/a/adapters/latest/download", headers=read)
    assert r.status_code == 200 and r.headers["content-length"] == str(len(r.content))
    assert r.headers["content-disposition"] == 'attachment; filename="s1-a-v2.tar"'
    with tarfile.open(fileobj=io.BytesIO(r.content), mode="r:") as tar:
        sizes = {m.name: m.size for m in tar.getmembers() if m.isfile()}
    weights = (tmp_path / "adapter" / "adapter_model.safetensors").stat().st_size
    assert sizes == {"s1-a-v2/adapter_config.json": 8, "s1-a-v2/adapter_model.safetensors": weights}
    _problem(c.get("/v1/streams/s1/tasks/b/adapters/1/download", headers=read), 409, "ref")


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

"""`/v1/streams`: created, listed and read, bad input refused by field; the base source checked
without loading it (import roots, config size, tensor shapes; every refusal a 422 that names no
server path), then imported by a job that the stream's other jobs queue behind; a failed import
fails the stream and frees its name; consolidation policies and folds."""

from __future__ import annotations

import dataclasses
import json
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from api.cli import main
from registry.settings import StrataSettings
from services.imports import NOT_IMPORTABLE
from services.scheduler import fire_due
from tests.api.conftest import SETTINGS, Api
from tests.api.helpers import DEEP, FAST, _problem, _stream, _submit, _task_files
from tests.workers.helpers import _hf_dir
from workers.runner import run_job


def _with_roots(api: Api, *roots: Path, **settings: Any) -> Api:
    """The API and the worker side (`Api.inst`) with these import roots and settings."""
    changed = SETTINGS.model_copy(update={"import_roots": tuple(roots), **settings})
    api.inst = dataclasses.replace(api.inst, settings=changed)
    api.client.app.state.inst = api.inst  # type: ignore[attr-defined]
    return api


def _post(api: Api, name: str, base: dict[str, Any]) -> Any:
    return api.client.post("/v1/streams", json={"name": name, "base": base, "hyperparams": FAST},
                           headers=api.auth("write"))  # fmt: skip


def test_paths_outside_the_import_roots_are_refused_as_absent_ones_are(
    api: Api, tmp_path: Path
) -> None:
    model = _hf_dir(tmp_path / "private" / "m")
    assert SETTINGS.import_roots is None  # the service's default: no file imports at all
    default = _problem(_post(api, "x", {"kind": "hf", "path": str(model)}), 422, "base.path")
    assert default["detail"] == NOT_IMPORTABLE
    root = tmp_path / "imports"
    _hf_dir(root / "m")
    (root / "escape").symlink_to(tmp_path / "private")
    _with_roots(api, root)
    answers = [
        _post(api, "x", base)
        for base in (
            {"kind": "gguf", "path": "/etc/passwd"},  # exists, outside the roots
            {"kind": "gguf", "path": "/etc/no-such-file"},  # absent
            {"kind": "hf", "path": str(model)},  # a model, outside
            {"kind": "hf", "path": "escape/m"},  # a symlink out of the root
            {"kind": "hf", "path": "../private/m"},
            {"kind": "hf", "path": "absent"},
            {"kind": "hf", "path": "m\x00"},
        )
    ]
    bodies = [_problem(r, 422, "base.path") for r in answers]
    assert all(b == bodies[0] for b in bodies), bodies  # nothing tells them apart
    assert bodies[0]["detail"] == NOT_IMPORTABLE and bodies[0]["code"] == "invalid_value"
    assert api.dispatcher.sent == []
    made = _post(api, "ok", {"kind": "hf", "path": "m"})
    assert made.status_code == 202 and made.json()["base_source"]["path"] == str(root / "m")


def test_configs_and_weights_that_cannot_load_are_422s_before_anything_is_queued(
    api: Api, tmp_path: Path
) -> None:
    root = tmp_path / "imports"
    _hf_dir(root / "huge", vocab_size=10**9)  # the API once tried to allocate 256 GB
    _hf_dir(root / "many", vocab_size=2**21, hidden_size=2**13)
    _hf_dir(root / "empty").joinpath("model.safetensors").unlink()
    pickled = _hf_dir(root / "pickled")
    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    corrupt = _hf_dir(root / "corrupt")
    (corrupt / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    (root / "passwd.gguf").write_bytes(Path("/etc/passwd").read_bytes())
    (root / "empty.gguf").write_bytes(b"")
    _with_roots(api, root)
    for path, kind, field, code in [
        ("huge", "hf", "base.config.vocab_size", "invalid_value"),
        ("many", "hf", "base.config", "invalid_value"),
        ("empty", "hf", "base.path", "invalid_weights"),
        ("pickled", "hf", "base.path", "invalid_weights"),
        ("corrupt", "hf", "base.path/model.safetensors", "invalid_weights"),
        ("passwd.gguf", "gguf", "base.path", "invalid_weights"),
        ("empty.gguf", "gguf", "base.path", "invalid_weights"),
    ]:
        body = _problem(_post(api, "x", {"kind": kind, "path": path}), 422, field)
        assert body["code"] == code and str(tmp_path) not in json.dumps(body), body
    _problem(_post(api, "x", {"kind": "tiny", "seed": 2**64}), 422, "base.seed")
    assert api.dispatcher.sent == []
    assert api.client.get("/v1/streams", headers=api.auth()).json()["data"] == []


def test_tensors_that_are_not_their_configs_shape_fail_the_import_job(
    api: Api, tmp_path: Path
) -> None:
    """Comparing shapes needs the model library, which the API does not load: the import job
    refuses it before anything is allocated, and the stream fails."""
    root = tmp_path / "imports"
    _hf_dir(root / "shapes", hidden_size=32)  # the tensors are 64 wide
    _with_roots(api, root)
    made = _post(api, "s", {"kind": "hf", "path": "shapes"})
    assert made.status_code == 202, made.text
    failed = run_job(api.inst, made.json()["job"]["id"])
    assert failed.state == "failed" and failed.error is not None
    assert failed.error.code == "invalid_weights" and "but the config gives" in failed.error.message
    assert str(tmp_path) not in failed.error.message
    assert api.client.get("/v1/streams/s", headers=api.auth()).json()["state"] == "failed"


def test_the_import_is_a_job_the_streams_other_jobs_queue_behind(api: Api) -> None:
    c, h = api.client, api.auth("write")
    made = _post(api, "s", {"kind": "tiny", "seed": 1})
    assert made.status_code == 202, made.text
    stream, job = made.json(), made.json()["job"]
    assert stream["state"] == "importing" and stream["name"] == "s"
    assert (job["kind"], job["state"], job["stream_id"]) == ("import", "queued", stream["id"])
    assert api.dispatcher.sent == [job["id"]]  # sent after commit
    assert c.get("/v1/streams/s", headers=h).json()["state"] == "importing"
    assert c.get("/v1/streams/s/snapshots", headers=h).json()["count"] == 0
    task = _submit(api, "s", "t1")  # accepted while importing: it queues behind the import
    assert task.status_code == 202, task.text
    train = task.json()["job"]["id"]
    _problem(c.post("/v1/streams/s/evaluate", json={}, headers=h), 409, "stream")  # not sequenced
    read = api.auth("read")
    _problem(c.post("/v1/streams/s/predict", json={"inputs": ["x"]}, headers=read), 409, "stream")
    claim = api.inst.registry.jobs.claim(train, worker="w")
    assert not claim.claimed and claim.waiting_for == job["id"]
    done = run_job(api.inst, job["id"])
    assert done.state == "succeeded", done.error
    assert c.get("/v1/streams/s", headers=h).json()["state"] == "ready"
    snaps = c.get("/v1/streams/s/snapshots", headers=h).json()["data"]
    assert [(s["version"], s["job_id"], s["current"]) for s in snaps] == [(0, job["id"], True)]
    graph = c.get(f"/v1/lineage/snapshot/{snaps[0]['id']}", headers=h).json()
    assert {"child": f"snapshot:{snaps[0]['id']}", "parent": f"job:{job['id']}",
            "relation": "produced_by"} in graph["edges"]  # fmt: skip
    assert api.inst.registry.jobs.next_in_stream(stream["id"]).id == train  # type: ignore[union-attr]
    assert run_job(api.inst, job["id"]).state == "succeeded"  # a duplicate message: nothing


def test_a_failed_import_fails_the_stream_and_its_queued_jobs_and_frees_the_name(
    api: Api, tmp_path: Path
) -> None:
    c, h = api.client, api.auth("write")
    root = tmp_path / "imports"
    lacking = _hf_dir(root / "lacking")  # well formed, but without a weight the model needs
    weights = load_file(lacking / "model.safetensors")
    del weights["model.norm.weight"]
    save_file(weights, str(lacking / "model.safetensors"), metadata={"format": "pt"})
    _with_roots(api, root)
    made = _post(api, "s", {"kind": "hf", "path": "lacking"})
    assert made.status_code == 202, made.text  # nothing cheap tells: the loader finds it
    first = made.json()
    behind = _submit(api, "s", "t1").json()["job"]["id"]
    schedule = c.post("/v1/streams/s/schedules", json={"kind": "consolidate", "cron": "@hourly"},
                      headers=h).json()  # fmt: skip
    failed = run_job(api.inst, first["job"]["id"])
    assert failed.state == "failed" and failed.error is not None
    assert failed.error.code == "invalid_weights" and "model.norm.weight" in failed.error.message
    assert str(tmp_path) not in failed.error.message
    assert c.get("/v1/streams/s", headers=h).json()["state"] == "failed"
    queued = c.get(f"/v1/jobs/{behind}", headers=h).json()
    assert queued["state"] == "failed" and queued["error"]["code"] == "import_failed"
    _problem(_submit(api, "s", "t2"), 409, "stream")  # a failed stream takes no jobs
    _problem(c.post("/v1/streams/s/consolidate", json={}, headers=h), 409, "stream")
    due = datetime.fromisoformat(schedule["next_run_at"]) + timedelta(seconds=1)
    assert fire_due(api.inst, api.dispatcher, now=due) == []  # nor do its schedules fire
    assert c.get("/v1/streams/s/schedules", headers=h).json()["count"] == 0
    # the name is free again: the failed stream is set aside, its jobs kept
    again = api.create_stream({"name": "s", "base": {"kind": "tiny"}, "hyperparams": FAST})
    assert again["id"] != first["id"] and again["state"] == "ready"
    listed = c.get("/v1/streams", headers=h).json()["data"]
    assert [(s["name"], s["id"]) for s in listed] == [("s", again["id"])]
    assert api.inst.registry.jobs.get(first["job"]["id"]).stream_id == first["id"]
    _problem(_post(api, "s", {"kind": "tiny"}), 409, "name")  # a ready stream keeps its name


def test_a_cancelled_import_fails_the_stream(api: Api) -> None:
    c, h = api.client, api.auth("write")
    made = _post(api, "s", {"kind": "tiny"}).json()
    cancelled = c.post(f"/v1/jobs/{made['job']['id']}/cancel", headers=h)
    assert cancelled.status_code == 202 and cancelled.json()["state"] == "cancelled"
    assert c.get("/v1/streams/s", headers=h).json()["state"] == "failed"
    assert _post(api, "s", {"kind": "tiny"}).status_code == 202  # and may be created again


def test_the_worker_checks_the_source_again_with_its_own_settings(api: Api, tmp_path: Path) -> None:
    root = tmp_path / "imports"
    _hf_dir(root / "m")
    _with_roots(api, root)
    made = _post(api, "s", {"kind": "hf", "path": "m"}).json()
    limited = StrataSettings(import_roots=(root,), import_max_params=1000)
    worker = dataclasses.replace(api.inst, settings=limited)
    job = run_job(worker, made["job"]["id"])
    assert job.state == "failed" and job.error is not None
    assert job.error.code == "invalid_value" and "STRATA_IMPORT_MAX_PARAMS" in job.error.message
    assert api.client.get("/v1/streams/s", headers=api.auth()).json()["state"] == "failed"


def test_method_options_are_documented_per_method_and_checked_by_field(
    api: Api, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = api.client.get("/openapi.json").json()
    options = spec["components"]["schemas"]["StreamCreate"]["properties"]["method_options"]
    by_method = {s["title"]: s for s in options["anyOf"]}
    assert set(by_method) == {"seq-lora options", "inc-lora options", "o-lora options",
                              "am-lora options"}  # fmt: skip
    lambda1 = by_method["o-lora options"]["properties"]["lambda1"]
    assert lambda1["type"] == "number" and lambda1["default"] == 0.5 and lambda1["minimum"] == 0
    assert by_method["am-lora options"]["properties"]["lambda1_norm"]["enum"] == ["sum", "mean"]
    share = by_method["am-lora options"]["properties"]["initial_share"]
    assert share["exclusiveMinimum"] == 0 and share["exclusiveMaximum"] == 1
    assert by_method["seq-lora options"]["properties"] == {}
    h = api.auth("write")
    for method, bad, field in [
        ("o-lora", {"lambda1": -1}, "lambda1"),
        ("am-lora", {"lambda1_norm": "max"}, "lambda1_norm"),
        ("am-lora", {"initial_share": 1.0}, "initial_share"),
        ("inc-lora", {"lambda1": 0.5}, "lambda1"),
    ]:
        body = {"name": "s", "base": {"kind": "tiny"}, "method": method, "method_options": bad}
        _problem(api.client.post("/v1/streams", json=body, headers=h), 422, field)
    assert api.dispatcher.sent == []
    with pytest.raises(SystemExit):
        main(["streams", "create", "--help"])
    shown = capsys.readouterr().out
    assert "o-lora:" in shown and "lambda1_norm (default 'mean')" in shown
    assert "sparsity_weight (default 0.01)" in shown


def test_streams_create_list_get_and_refuse_bad_input(api: Api) -> None:
    c, h = api.client, api.auth("write")
    created = _stream(api)
    assert created["name"] == "s1" and created["hyperparams"]["max_steps"] == 4
    assert c.get("/v1/streams/s1", headers=h).json()["id"] == created["id"]
    assert [s["name"] for s in c.get("/v1/streams", headers=h).json()["data"]] == ["s1"]
    _problem(c.post("/v1/streams", json={"name": "s1", "base": {"kind": "tiny"}}, headers=h),
             409, "name")  # fmt: skip
    cases = [
        ({"name": "../x", "base": {"kind": "tiny"}}, "name"),
        ({"name": "ok", "base": {"kind": "pickle"}}, "base.kind"),
        ({"name": "ok", "base": {"kind": "hf", "path": "/nonexistent"}}, "base.path"),
        ({"name": "ok", "base": {"kind": "tiny"}, "hyperparams": {"rank": -1}}, "rank"),
        ({"name": "ok", "base": {"kind": "tiny"}, "hyperparams": {"nope": 1}}, "nope"),
        ({"name": "ok", "base": {"kind": "tiny"}, "method": "magic"}, "method"),
        ({"name": "ok", "base": {"kind": "tiny"}, "extra": 1}, "extra"),
        ({"base": {"kind": "tiny"}}, "name"),
    ]
    for body, field in cases:
        _problem(c.post("/v1/streams", json=body, headers=h), 422, field)
    _problem(c.get("/v1/streams/missing", headers=h), 404, "stream")
    _problem(c.post("/v1/streams", content=b"{not json", headers={**h, "content-type":
             "application/json"}), 422)  # fmt: skip
    assert [s["name"] for s in c.get("/v1/streams", headers=h).json()["data"]] == ["s1"]


def test_relora_hyperparameters_are_validated_as_one_setting(api: Api) -> None:
    """ReLoRA's three hyperparameters are checked together: a stream's defaults or a task's
    overrides that do not fit are a 422 naming the field, and nothing is queued."""
    c, h = api.client, api.auth("write")
    tiny = {"name": "r", "base": {"kind": "tiny"}}
    for hyper, field in [
        ({"relora_every": 0}, "relora_every"),
        ({"relora_every": 10, "relora_warmup": 10}, "relora_warmup"),
        ({"relora_every": 10, "relora_prune": 1.0}, "relora_prune"),
        ({"relora_warmup": 5}, "relora_warmup"),  # ReLoRA is off
    ]:
        body = _problem(c.post("/v1/streams", json={**tiny, "hyperparams": hyper}, headers=h),
                        422, field)  # fmt: skip
        assert body["code"] == "invalid_hyperparameter"
    made = _stream(api, "r", hyperparams={**FAST, "relora_every": 2})
    assert made["hyperparams"]["relora_every"] == 2
    imported = list(api.dispatcher.sent)  # the import job
    train, test, labels = _task_files()
    files = {"train": ("train.jsonl", train), "test": ("test.jsonl", test)}
    off_with_prune = {"relora_every": None, "relora_prune": 0.5}
    for params, field in [
        ({"relora_warmup": 2}, "relora_warmup"),
        (off_with_prune, "relora_prune"),
    ]:
        data = {"name": "t", "labels": json.dumps(labels),
                "params": json.dumps({"hyperparams": params})}  # fmt: skip
        _problem(c.post("/v1/streams/r/tasks", data=data, files=files, headers=h), 422, field)
    assert api.dispatcher.sent == imported
    assert c.get("/v1/streams/r/tasks", headers=h).json()["count"] == 0


def test_consolidation_routes_refuse_what_cannot_be_folded(api: Api) -> None:
    c, h = api.client, api.auth("write")
    made = api.create_stream({"name": "s", "base": {"kind": "tiny"},
                              "consolidation": {"every_tasks": 2}})  # fmt: skip
    assert made["consolidation"] == {"every_tasks": 2}
    imported = list(api.dispatcher.sent)
    # nothing to evaluate yet: refused up front, and no job is queued
    _problem(c.post("/v1/streams/s/evaluate", json={}, headers=h), 409, "stream")
    assert api.dispatcher.sent == imported
    assert [j["kind"] for j in c.get("/v1/jobs", headers=h).json()["data"]] == ["import"]
    policy = c.put("/v1/streams/s/consolidation", json={"max_rank": 64}, headers=h)
    assert policy.json()["consolidation"] == {"max_rank": 64}
    _problem(c.put("/v1/streams/s/consolidation", json={"max_rank": 0}, headers=h), 422, "max_rank")
    _problem(c.put("/v1/streams/s/consolidation", json={"often": 1}, headers=h), 422, "often")
    # nothing to fold, and no training queued that would make something: refused up front
    _problem(c.post("/v1/streams/s/consolidate", json={}, headers=h), 409, "stream")
    assert api.dispatcher.sent == imported
    train = _submit(api, "s", "t1").json()["job"]["id"]  # queued: it will make an adapter
    queued = c.post("/v1/streams/s/consolidate", json={}, headers=h)
    assert queued.status_code == 202 and queued.json()["kind"] == "consolidate"
    assert api.dispatcher.sent == [*imported, train, queued.json()["id"]]
    api.create_stream({"name": "am", "base": {"kind": "tiny"}, "method": "am-lora"})
    _submit(api, "am", "t1")
    # am-lora streams fold too, gated by max_drop (the request's, else the policy's)
    folding = c.post("/v1/streams/am/consolidate", json={"max_drop": 5}, headers=h)
    assert folding.status_code == 202 and folding.json()["params"]["max_drop"] == 5
    _problem(c.post("/v1/streams/am/consolidate", json={"max_drop": -1}, headers=h), 422,
             "max_drop")  # fmt: skip
    policy = c.put("/v1/streams/am/consolidation", json={"every_tasks": 2, "max_drop": 3.5},
                   headers=h)  # fmt: skip
    assert policy.status_code == 200
    assert policy.json()["consolidation"] == {"every_tasks": 2, "max_drop": 3.5}
    _problem(c.put("/v1/streams/am/consolidation", json={"max_drop": 101}, headers=h), 422,
             "max_drop")  # fmt: skip
    # and corrected by distillation: the request's steps, else the policy's
    distilled = c.post("/v1/streams/am/consolidate", json={"distill_steps": 0}, headers=h)
    assert distilled.status_code == 202 and distilled.json()["params"]["distill_steps"] == 0
    for bad in (-1, 10_001, 2.5, "many"):
        _problem(c.post("/v1/streams/am/consolidate", json={"distill_steps": bad}, headers=h),
                 422, "distill_steps")  # fmt: skip
        _problem(c.put("/v1/streams/am/consolidation", json={"distill_steps": bad}, headers=h),
                 422, "distill_steps")  # fmt: skip
    policy = c.put("/v1/streams/am/consolidation", json={"distill_steps": 128}, headers=h)
    assert policy.json()["consolidation"] == {"distill_steps": 128}
    am2 = {"name": "am2", "base": {"kind": "tiny"}, "method": "am-lora",
           "consolidation": {"every_tasks": 1}}  # fmt: skip
    assert c.post("/v1/streams", headers=h, json=am2).status_code == 202
    _problem(c.post("/v1/streams/s/snapshots/7/activate", headers=h), 404)
    activated = c.post("/v1/streams/s/snapshots/0/activate", headers=h)
    assert activated.status_code == 200 and activated.json()["current"] is True
    _problem(c.post("/v1/streams/s/snapshots/0/activate", headers=api.auth("read")), 403)
    # once trained, its adapter is there to fold: accepted with no training queued
    assert run_job(api.inst, train).state == "succeeded"
    again = c.post("/v1/streams/s/consolidate", json={}, headers=h)
    assert again.status_code == 202, again.text


def test_json_bodies_nested_deeper_than_the_parser_recurses_are_refused(api: Api) -> None:
    # FastAPI answers a body its JSON parser cannot read with 400 (multipart fields: 422 above)
    body = '{"name": "s", "base": {"kind": "tiny"}, "hyperparams": {"x": ' + DEEP + "}}"
    r = api.client.post("/v1/streams", content=body, headers={**api.auth("write"),
                        "content-type": "application/json"})  # fmt: skip
    assert "error parsing the body" in _problem(r, 400)["detail"]
    assert api.client.get("/v1/streams", headers=api.auth()).json()["data"] == []

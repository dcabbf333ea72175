"""`/v1/streams/{s}/evaluations`: the accuracy matrix of the stream's current lineage with its
baseline, every measured state, and the continual-learning metrics worked out by hand below;
the loss matrix without them. `/v1/streams/{s}/evaluate` queues an evaluation job, and refuses a
stream with nothing to evaluate."""

from __future__ import annotations

import pytest

from tests.api.conftest import Api
from tests.api.helpers import _problem

D1, D2, D3 = "a" * 64, "b" * 64, "c" * 64


def _learned(api: Api, names: str = "ab") -> tuple[int, int, list[int], list[int]]:
    """Stream s1 on snapshot v0 with one ready adapter per task, each on top of the ones before
    (made in the registry, without training); returns the stream's and v0's ids, the tasks' ids
    and the adapters' ids."""
    reg = api.inst.registry
    stream = reg.streams.create(name="s1", base_source={"kind": "tiny"}, method="seq-lora",
                                hyperparams={})  # fmt: skip
    v0 = reg.streams.add_snapshot(stream_id=stream.id, artifact_digest=D1, source={})
    ds = reg.tasks.add_dataset(digest=D2, format="jsonl", num_train=4, num_test=1,
                               size_bytes=10).id  # fmt: skip
    tasks: list[int] = []
    adapters: list[int] = []
    for name in names:
        task, job = reg.tasks.submit(stream_id=stream.id, name=name, dataset_id=ds)
        made = reg.adapters.create_version(
            task_id=task.id, method="seq-lora", hyperparams={}, base_snapshot_id=v0.id,
            dataset_id=ds, depends_on=list(adapters), job_id=job.id,
        )  # fmt: skip
        adapters.append(reg.adapters.mark_ready(made.id, artifact_digest=D3, metrics={}).id)
        tasks.append(task.id)
    return stream.id, v0.id, tasks, adapters


def test_the_matrix_its_states_and_metrics(api: Api) -> None:
    stream_id, v0, tasks, adapters = _learned(api)
    c, h = api.client, api.auth("read")
    empty = c.get("/v1/streams/s1/evaluations", headers=h)
    assert empty.status_code == 200, empty.text
    assert empty.json() == {
        "metric": "accuracy", "task_names": ["a", "b"], "values": [], "states": [],
        "baseline": [None, None], "average_accuracy": None, "backward_transfer": None,
        "forward_transfer": None, "forgetting": None,
    }  # fmt: skip

    def record(after: int, applied: list[int], values: list[float | None], metric: str) -> None:
        for task_id, value in zip(tasks, values, strict=True):
            if value is not None:
                api.inst.registry.evaluations.record(
                    stream_id=stream_id, after_position=after, task_id=task_id, snapshot_id=v0,
                    adapter_version_id=applied[-1] if applied else None, adapter_ids=applied,
                    metric=metric, value=value, num_examples=10,
                )  # fmt: skip

    record(-1, [], [0.1, 0.2], "accuracy")  # the base
    record(0, adapters[:1], [0.9, 0.3], "accuracy")  # after a
    record(1, adapters, [0.8, 0.7], "accuracy")  # after a and b
    record(0, adapters[:1], [2.5, None], "loss")
    ev = c.get("/v1/streams/s1/evaluations", headers=h).json()
    assert (ev["metric"], ev["task_names"]) == ("accuracy", ["a", "b"])
    assert ev["values"] == [[0.9, 0.3], [0.8, 0.7]] and ev["baseline"] == [0.1, 0.2]
    assert ev["average_accuracy"] == pytest.approx((0.8 + 0.7) / 2)
    assert ev["backward_transfer"] == pytest.approx(0.8 - 0.9)  # a, after b, against after a
    assert ev["forward_transfer"] == pytest.approx(0.3 - 0.2)  # b after a, against the base
    assert ev["forgetting"] == pytest.approx(0.9 - 0.8)
    assert [(s["after_position"], s["state"], s["kind"], s["adapters"], s["values"],
             s["in_lineage"]) for s in ev["states"]] == [
        (-1, "v0", "base", [], [0.1, 0.2], True),
        (0, "v0 + a@v1", "evaluate", ["a@v1"], [0.9, 0.3], True),
        (1, "v0 + a@v1, b@v1", "evaluate", ["a@v1", "b@v1"], [0.8, 0.7], True),
    ]  # fmt: skip
    loss = c.get("/v1/streams/s1/evaluations", params={"metric": "loss"}, headers=h).json()
    assert loss["values"] == [[2.5, None]] and loss["baseline"] == [None, None]
    assert [s["state"] for s in loss["states"]] == ["v0 + a@v1"]
    assert loss["average_accuracy"] is None and loss["forgetting"] is None  # accuracy only
    _problem(c.get("/v1/streams/s1/evaluations", params={"metric": "f1"}, headers=h), 422,
             "metric")  # fmt: skip
    _problem(c.get("/v1/streams/nope/evaluations", headers=h), 404, "stream")
    _problem(c.get("/v1/streams/s1/evaluations"), 401, "authorization")


def test_one_task_learned_has_no_transfer_to_measure(api: Api) -> None:
    stream_id, v0, tasks, adapters = _learned(api, "a")
    api.inst.registry.evaluations.record(
        stream_id=stream_id, after_position=0, task_id=tasks[0], snapshot_id=v0,
        adapter_version_id=adapters[0], metric="accuracy", value=0.6, num_examples=10,
    )  # fmt: skip
    ev = api.client.get("/v1/streams/s1/evaluations", headers=api.auth("read")).json()
    assert ev["values"] == [[0.6]] and ev["baseline"] == [None]
    assert ev["average_accuracy"] == pytest.approx(0.6)
    assert (ev["backward_transfer"], ev["forward_transfer"], ev["forgetting"]) == (None,) * 3


def test_evaluate_queues_a_job_for_a_stream_with_tasks_and_refuses_others(api: Api) -> None:
    c, h = api.client, api.auth("write")
    stream_id, _, _, _ = _learned(api)
    queued = c.post("/v1/streams/s1/evaluate", json={"eval_limit": 5}, headers=h)
    assert queued.status_code == 202, queued.text
    job = queued.json()
    assert (job["kind"], job["state"], job["stream_id"]) == ("evaluate", "queued", stream_id)
    assert job["params"] == {"eval_limit": 5} and job["task_id"] is None
    assert api.dispatcher.sent == [job["id"]]  # sent, and marked so
    assert api.inst.registry.jobs.get(job["id"]).enqueued_at is not None
    default = c.post("/v1/streams/s1/evaluate", json={}, headers=h).json()
    assert default["params"] == {"eval_limit": 200}
    sent = list(api.dispatcher.sent)
    for body, field in [({"eval_limit": 0}, "eval_limit"), ({"eval_limit": 100_001}, "eval_limit"),
                        ({"limit": 5}, "limit")]:  # fmt: skip
        _problem(c.post("/v1/streams/s1/evaluate", json=body, headers=h), 422, field)
    _problem(c.post("/v1/streams/s1/evaluate", json={}, headers=api.auth("read")), 403)
    _problem(c.post("/v1/streams/nope/evaluate", json={}, headers=h), 404, "stream")
    api.inst.registry.streams.create(name="bare", base_source={"kind": "tiny"},
                                     method="seq-lora", hyperparams={})  # fmt: skip
    _problem(c.post("/v1/streams/bare/evaluate", json={}, headers=h), 409, "stream")  # no tasks
    api.inst.registry.streams.begin_import(name="importing", base_source={"kind": "tiny"},
                                           method="seq-lora", hyperparams={})  # fmt: skip
    _problem(c.post("/v1/streams/importing/evaluate", json={}, headers=h), 409, "stream")
    assert api.dispatcher.sent == sent  # nothing refused was queued
    kinds = [j.kind.value for j in api.inst.registry.jobs.list_jobs(stream_id=stream_id)]
    assert kinds == ["train", "train", "evaluate", "evaluate"]

"""`/v1/lineage/{kind}/{id}`: a node's ancestors or descendants as a graph of labelled nodes at
their distance and `child relation parent` edges, cut at `depth`; unknown nodes are 404s and bad
kinds, directions and depths 422s naming the parameter."""

from __future__ import annotations

from typing import Any

from tests.api.conftest import Api
from tests.api.helpers import _problem

D1, D2, D3 = "a" * 64, "b" * 64, "c" * 64


def _graph(api: Api) -> dict[str, int]:
    """Stream s1: snapshot v0; task a's adapter trained on it with a dataset by a job; snapshot
    v1 folding that adapter (made in the registry, without training). Returns the ids."""
    reg = api.inst.registry
    stream = reg.streams.create(name="s1", base_source={"kind": "tiny"}, method="seq-lora",
                                hyperparams={})  # fmt: skip
    v0 = reg.streams.add_snapshot(stream_id=stream.id, artifact_digest=D1, source={})
    ds = reg.tasks.add_dataset(digest=D2, format="jsonl", num_train=4, num_test=1,
                               size_bytes=10).id  # fmt: skip
    task, job = reg.tasks.submit(stream_id=stream.id, name="a", dataset_id=ds)
    made = reg.adapters.create_version(
        task_id=task.id, method="seq-lora", hyperparams={}, base_snapshot_id=v0.id,
        dataset_id=ds, job_id=job.id,
    )  # fmt: skip
    adapter = reg.adapters.mark_ready(made.id, artifact_digest=D3, metrics={})
    v1 = reg.streams.add_snapshot(stream_id=stream.id, artifact_digest=D2, source={},
                                  parent_id=v0.id, folded_adapter_ids=[adapter.id])  # fmt: skip
    return {"v0": v0.id, "v1": v1.id, "dataset": ds, "job": job.id, "adapter": adapter.id}


def _depths(graph: dict[str, Any]) -> dict[str, int]:
    return {f"{n['kind']}:{n['id']}": n["depth"] for n in graph["nodes"]}


def _edges(graph: dict[str, Any]) -> set[tuple[str, str, str]]:
    return {(e["child"], e["relation"], e["parent"]) for e in graph["edges"]}


def test_ancestors_are_what_a_node_was_made_from_with_labels(api: Api) -> None:
    ids = _graph(api)
    adapter, v0, ds, job = (f"adapter:{ids['adapter']}", f"snapshot:{ids['v0']}",
                            f"dataset:{ids['dataset']}", f"job:{ids['job']}")  # fmt: skip
    r = api.client.get(f"/v1/lineage/adapter/{ids['adapter']}", headers=api.auth("read"))
    assert r.status_code == 200, r.text
    up = r.json()
    assert (up["root"], up["direction"]) == (adapter, "ancestors")  # the default direction
    assert _depths(up) == {adapter: 0, v0: 1, ds: 1, job: 1}  # not v1, built on it later
    assert _edges(up) == {(adapter, "trained_on", v0), (adapter, "trained_with", ds),
                          (adapter, "produced_by", job), (job, "uses", ds)}  # fmt: skip
    nodes = {f"{n['kind']}:{n['id']}": n for n in up["nodes"]}
    assert (nodes[v0]["label"], nodes[v0]["attributes"]) == (
        "s1 snapshot v0", {"stream": "s1", "version": 0, "current": False})  # fmt: skip
    assert nodes[adapter]["label"] == "adapter a v1 (seq-lora, ready)"
    assert nodes[job]["attributes"] == {"kind": "train", "state": "queued"}
    v1 = api.client.get(f"/v1/lineage/snapshot/{ids['v1']}", headers=api.auth("read")).json()
    assert _depths(v1) == {f"snapshot:{ids['v1']}": 0, v0: 1, adapter: 1, ds: 2, job: 2}
    assert (f"snapshot:{ids['v1']}", "folds", adapter) in _edges(v1)
    assert (f"snapshot:{ids['v1']}", "derived_from", v0) in _edges(v1)


def test_descendants_are_what_was_built_on_a_node_as_deep_as_asked(api: Api) -> None:
    ids = _graph(api)
    adapter, v1, ds, job = (f"adapter:{ids['adapter']}", f"snapshot:{ids['v1']}",
                            f"dataset:{ids['dataset']}", f"job:{ids['job']}")  # fmt: skip
    url, h = f"/v1/lineage/dataset/{ids['dataset']}", api.auth("read")
    down = api.client.get(url, params={"direction": "descendants"}, headers=h).json()
    assert (down["root"], down["direction"]) == (ds, "descendants")
    assert _depths(down) == {ds: 0, adapter: 1, job: 1, v1: 2}
    assert (v1, "folds", adapter) in _edges(down)
    near = api.client.get(url, params={"direction": "descendants", "depth": 1}, headers=h).json()
    assert _depths(near) == {ds: 0, adapter: 1, job: 1}  # v1 is two edges away
    assert _edges(near) == {(adapter, "trained_with", ds), (job, "uses", ds)}
    v0 = api.client.get(f"/v1/lineage/snapshot/{ids['v0']}", params={"direction": "descendants"},
                        headers=h).json()  # fmt: skip
    assert _depths(v0) == {f"snapshot:{ids['v0']}": 0, adapter: 1, v1: 1}


def test_lineage_refuses_unknown_nodes_and_bad_parameters(api: Api) -> None:
    ids = _graph(api)
    c, h = api.client, api.auth("read")
    _problem(c.get(f"/v1/lineage/adapter/{ids['adapter'] + 100}", headers=h), 404, "node")
    _problem(c.get(f"/v1/lineage/snapshot/{ids['adapter'] + 100}", headers=h), 404, "node")
    _problem(c.get(f"/v1/lineage/planet/{ids['v0']}", headers=h), 422, "kind")
    _problem(c.get("/v1/lineage/snapshot/0", headers=h), 422, "node_id")
    bad: list[tuple[dict[str, str | int], str]] = [
        ({"direction": "up"}, "direction"), ({"depth": 0}, "depth"),
        ({"depth": 10_001}, "depth"), ({"depth": "all"}, "depth"),
    ]  # fmt: skip
    for params, field in bad:
        _problem(c.get(f"/v1/lineage/snapshot/{ids['v0']}", params=params, headers=h), 422, field)
    _problem(c.get(f"/v1/lineage/snapshot/{ids['v0']}"), 401, "authorization")


def test_an_adapter_and_a_snapshot_are_named_as_a_user_knows_them(api: Api) -> None:
    ids = _graph(api)
    c, h = api.client, api.auth("read")
    by_id = c.get(f"/v1/lineage/adapter/{ids['adapter']}", headers=h).json()
    for ref in ("1", "latest"):
        named = c.get(f"/v1/streams/s1/tasks/a/adapters/{ref}/lineage", headers=h)
        assert named.status_code == 200, named.text
        assert named.json() == by_id
    v0_down = c.get("/v1/streams/s1/snapshots/0/lineage", params={"direction": "descendants",
                    "depth": 1}, headers=h).json()  # fmt: skip
    assert v0_down == c.get(f"/v1/lineage/snapshot/{ids['v0']}", headers=h,
                            params={"direction": "descendants", "depth": 1}).json()  # fmt: skip
    assert v0_down["root"] == f"snapshot:{ids['v0']}"
    v1_up = c.get("/v1/streams/s1/snapshots/1/lineage", headers=h).json()
    assert (f"snapshot:{ids['v1']}", "folds", f"adapter:{ids['adapter']}") in _edges(v1_up)

    _problem(c.get("/v1/streams/nope/snapshots/0/lineage", headers=h), 404, "stream")
    _problem(c.get("/v1/streams/s1/snapshots/7/lineage", headers=h), 404, "version")
    _problem(c.get("/v1/streams/s1/tasks/zz/adapters/1/lineage", headers=h), 404, "task")
    _problem(c.get("/v1/streams/s1/tasks/a/adapters/9/lineage", headers=h), 404)
    _problem(c.get("/v1/streams/s1/tasks/a/adapters/1/lineage", params={"depth": 0},
                   headers=h), 422, "depth")  # fmt: skip
    _problem(c.get("/v1/streams/s1/snapshots/0/lineage"), 401, "authorization")

"""Tags on adapter versions (`PUT .../adapters/{ref}/tags`) and searching a stream's versions
by tag and accuracy (`GET /v1/streams/{s}/adapters?tag=k:v&min_accuracy=&order_by=`)."""

from __future__ import annotations

from typing import Any

from tests.api.conftest import Api
from tests.api.helpers import FAST, _problem, _stream, _submit
from workers.runner import run_job


def _search(api: Api, **params: Any) -> list[tuple[str, int]]:
    r = api.client.get("/v1/streams/s1/adapters", params=params, headers=api.auth("read"))
    assert r.status_code == 200, r.text
    assert r.json()["next_cursor"] is None or not set(params) & {"tag", "min_accuracy"}
    return [(a["task_name"], a["version"]) for a in r.json()["data"]]


def test_tags_are_replaced_and_versions_are_found_by_tag_and_accuracy(api: Api) -> None:
    _stream(api, hyperparams=FAST)
    for i, name in enumerate(("t1", "t2", "t3")):
        made = _submit(api, "s1", name, index=i)
        assert run_job(api.inst, made.json()["job"]["id"]).state == "succeeded"
    h = api.auth("write")
    put = api.client.put("/v1/streams/s1/tasks/t1/adapters/latest/tags",
                         json={"team": "search", "stage": "candidate"}, headers=h)  # fmt: skip
    assert put.status_code == 200 and put.json()["tags"] == {"team": "search", "stage": "candidate"}
    api.client.put("/v1/streams/s1/tasks/t2/adapters/1/tags", json={"team": "search"}, headers=h)
    assert _search(api, tag="team:search") == [("t1", 1), ("t2", 1)]
    assert _search(api, tag=["team:search", "stage:candidate"]) == [("t1", 1)]
    assert _search(api, tag="team:other") == []
    # PUT replaces: the stage is gone
    api.client.put("/v1/streams/s1/tasks/t1/adapters/1/tags", json={"team": "search"}, headers=h)
    assert _search(api, tag="stage:candidate") == []
    # accuracy: each version's own task's score, recorded when it was evaluated
    versions = api.client.get("/v1/streams/s1/adapters", headers=h).json()["data"]
    scores = {(a["task_name"], a["version"]): a["metrics"]["accuracy"] for a in versions}
    best_first = sorted(scores, key=lambda k: -scores[k])
    assert _search(api, order_by="accuracy") == best_first
    cut = sorted(scores.values())[1]
    assert _search(api, min_accuracy=cut) == [k for k in scores if scores[k] >= cut]
    assert _search(api, min_accuracy=cut, order_by="accuracy", tag="team:search") == [
        k for k in best_first if scores[k] >= cut and k[0] in ("t1", "t2")
    ]
    # refusals name the field
    for bad, field in [({"tag": "nocolon"}, "tag"), ({"order_by": "size"}, "order_by"),
                       ({"min_accuracy": 2}, "min_accuracy")]:  # fmt: skip
        _problem(api.client.get("/v1/streams/s1/adapters", params=bad, headers=h), 422, field)
    for body, field in [
        ({"../x": "v"}, "tags.../x"),
        ({"k": 1}, "k"),
        ({"k": "v" * 300}, "tags.k"),
    ]:
        r = api.client.put("/v1/streams/s1/tasks/t1/adapters/1/tags", json=body, headers=h)
        assert r.status_code == 422 and field in r.json().get("field", ""), r.text
    _problem(api.client.put("/v1/streams/s1/tasks/t1/adapters/9/tags", json={}, headers=h), 404)
    assert api.client.get("/v1/streams/s1/tasks/t1/adapters/1", headers=h).json()["tags"] == {
        "team": "search"}  # fmt: skip

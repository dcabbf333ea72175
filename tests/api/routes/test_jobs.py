"""`/v1/jobs`: listed by page, stream and state, cancelled, and their events read by page and
as a server-sent event stream."""

from __future__ import annotations

from tests.api.conftest import Api
from tests.api.helpers import _problem, _stream, _submit


def test_jobs_list_pages_cancel_and_events(api: Api) -> None:
    c, h = api.client, api.auth("write")
    _stream(api)
    _stream(api, "s2")
    imports = list(api.dispatcher.sent)
    ids = [_submit(api, "s1", f"t{i}").json()["job"]["id"] for i in range(3)]
    other = _submit(api, "s2", "x").json()["job"]["id"]
    page = c.get("/v1/jobs", params={"limit": 2}, headers=h).json()
    assert [j["id"] for j in page["data"]] == imports and page["next_cursor"] == imports[1]
    assert [j["kind"] for j in page["data"]] == ["import", "import"]
    page = c.get("/v1/jobs", params={"limit": 2, "cursor": imports[1]}, headers=h).json()
    assert [j["id"] for j in page["data"]] == ids[:2] and page["next_cursor"] == ids[1]
    rest = c.get("/v1/jobs", params={"limit": 2, "cursor": page["next_cursor"]}, headers=h).json()
    assert [j["id"] for j in rest["data"]] == [ids[2], other]
    by_stream = c.get("/v1/jobs", params={"stream": "s2"}, headers=h).json()["data"]
    assert [j["id"] for j in by_stream] == [imports[1], other]
    cancelled = c.post(f"/v1/jobs/{ids[0]}/cancel", headers=h)
    assert cancelled.status_code == 202 and cancelled.json()["state"] == "cancelled"
    _problem(c.post(f"/v1/jobs/{ids[0]}/cancel", headers=h), 409, "state")
    states = c.get("/v1/jobs", params={"state": "cancelled"}, headers=h).json()["data"]
    assert [j["id"] for j in states] == [ids[0]]
    _problem(c.get("/v1/jobs", params={"state": "sleeping"}, headers=h), 422, "state")
    _problem(c.get("/v1/jobs/99999", headers=h), 404, "job")
    api.inst.registry.jobs.add_event(ids[1], message="hello", metrics={"step": 1})
    api.inst.registry.jobs.add_event(ids[1], message="again")
    events = c.get(f"/v1/jobs/{ids[1]}/events", params={"limit": 1}, headers=h).json()
    assert [e["message"] for e in events["data"]] == ["hello"]
    more = c.get(f"/v1/jobs/{ids[1]}/events", params={"cursor": events["next_cursor"]},
                 headers=h).json()  # fmt: skip
    assert [e["message"] for e in more["data"]] == ["again"] and more["next_cursor"] is None
    with c.stream("GET", f"/v1/jobs/{ids[0]}/events/stream", headers=h) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        text = "".join(stream.iter_text())
    assert "event: state" in text and text.rstrip().endswith('data: {"state": "cancelled"}')

"""A job's event stream (SSE) on the server: every job event carries its id, and a client that
reconnects with Last-Event-ID gets the events after it, once (the CLI's side is in
test_cli.py)."""

from __future__ import annotations

import re

from tests.api.conftest import Api


def _sse(api: Api, job_id: int, **headers: str) -> str:
    with api.client.stream(
        "GET",
        f"/v1/jobs/{job_id}/events/stream",
        params={"cursor": 0},
        headers={**api.auth("read"), **headers},
    ) as stream:
        assert stream.status_code == 200, stream.read()
        return "".join(stream.iter_text())


def test_the_sse_stream_resumes_after_last_event_id(api: Api) -> None:
    api.create_stream({"name": "s1", "base": {"kind": "tiny"}})
    job_id = api.dispatcher.sent[-1]  # the import job, finished: its stream ends
    added = [api.inst.registry.jobs.add_event(job_id, message=f"m{i}").id for i in range(3)]

    def ids(text: str) -> list[int]:
        blocks = [b for b in text.split("\n\n") if "event: job-event" in b]
        found = [re.search(r"^id: (\d+)$", b, re.M) for b in blocks]
        assert all(found), text  # every job event carries its id
        return [int(m.group(1)) for m in found if m]

    everything = ids(_sse(api, job_id))
    assert everything[-3:] == added and everything == sorted(set(everything))
    resumed = _sse(api, job_id, **{"Last-Event-ID": str(added[0])})  # beats cursor=0
    assert ids(resumed) == added[1:]
    assert resumed.rstrip().endswith('data: {"state": "succeeded"}')
    assert ids(_sse(api, job_id, **{"Last-Event-ID": str(added[-1])})) == []
    bad = api.client.get(
        f"/v1/jobs/{job_id}/events/stream",
        headers={**api.auth("read"), "Last-Event-ID": "not-an-id"},
    )
    assert bad.status_code == 422, bad.text

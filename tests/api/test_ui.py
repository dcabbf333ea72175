"""The web dashboard at /ui (api/dashboard.py, api/ui/): served without a token and without a
model library; and, in Debian's chromium driven by Playwright against a `strata serve`, a user
logs in by pasting a token, sees a stream's heat map, watches a job's progress bar reach done
over server-sent events, follows a lineage edge, and reads the problem `detail` of a wrong token
and of a missing stream. Each browser test saves a screenshot in test-artifacts/ui/."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.api.helpers import FAST, _task_files
from tests.api.test_asgi import MODEL_LIBRARIES
from tests.harness import strata_serve

REPO = Path(__file__).resolve().parents[2]
UI = REPO / "api" / "ui"
ARTIFACTS = REPO / "test-artifacts" / "ui"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
TERMINAL = ("succeeded", "failed", "cancelled")

PROBE = """
import json, sys
from fastapi.testclient import TestClient
from registry.instance import open_instance
from registry.settings import StrataSettings
open_instance(StrataSettings(), upgrade=True).close()
import api.asgi
app = api.asgi.service_app()
out = {}
with TestClient(app) as client:
    for path in ("/ui", "/ui/", "/ui/app.js", "/ui/style.css", "/ui/missing.js"):
        r = client.get(path, follow_redirects=False)
        out[path] = [r.status_code, r.headers.get("content-type"), r.headers.get("location"),
                     r.headers.get("content-security-policy"), r.text[:2000]]
    spec = client.get("/openapi.json").json()
print(json.dumps({"responses": out, "paths": sorted(spec["paths"]), "loaded": sorted(
    m for m in sys.modules if m.split(".")[0] in %r)}))
"""


def test_the_dashboard_is_served_without_a_token_and_without_a_model_library(
    tmp_path: Path,
) -> None:
    env = {
        **os.environ,
        "STRATA_DATA_DIR": str(tmp_path),
        "STRATA_ARTIFACT_BACKEND": "local",
        "STRATA_DATABASE_URL": f"sqlite:///{tmp_path / 'strata.db'}",
        "STRATA_BROKER_URL": "redis://127.0.0.1:6379/15",
        "STRATA_BROKER_TIMEOUT_S": "2",
    }
    out = subprocess.run([sys.executable, "-c", PROBE % (MODEL_LIBRARIES,)], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["loaded"] == [], result["loaded"]
    responses = result["responses"]
    assert responses["/ui"][0] == 307 and responses["/ui"][2] == "/ui/"
    status, ctype, _, csp, page = responses["/ui/"]
    assert status == 200 and ctype.startswith("text/html")
    assert '<script type="module" src="/ui/app.js">' in page and 'id="problem"' in page
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert responses["/ui/app.js"][:2] == [200, "text/javascript; charset=utf-8"]
    assert responses["/ui/style.css"][:2] == [200, "text/css; charset=utf-8"]
    missing = responses["/ui/missing.js"]
    assert missing[0] == 404 and missing[1].startswith("application/problem+json")
    assert json.loads(missing[4])["detail"]
    assert not [p for p in result["paths"] if p.startswith("/ui")]  # not part of the REST API


def test_the_scripts_send_the_token_only_in_the_authorization_header() -> None:
    """The token is read from sessionStorage in one module and goes only into an Authorization
    header; no script writes it to localStorage, a cookie, a URL or the page."""
    scripts = {p.name: p.read_text() for p in UI.glob("*.js")}
    assert {"app.js", "api.js", "views.js", "heatmap.js", "lineage.js", "dom.js"} <= set(scripts)
    for name, text in scripts.items():
        assert "localStorage" not in text and "document.cookie" not in text, name
        assert not re.search(r"[?&](token|access_token|auth)=", text), name
        assert "innerHTML" not in text and "outerHTML" not in text, name  # text nodes only
        assert "EventSource" not in text or name == "api.js", name
        uses = [line for line in text.splitlines() if "token.get()" in line]
        assert name in ("api.js", "app.js") or not uses, (name, uses)
    api_uses = [ln.strip() for ln in scripts["api.js"].splitlines() if "token.get()" in ln]
    assert api_uses == ['return { Authorization: `Bearer ${token.get() ?? ""}`, ...extra };']
    assert "sessionStorage" in scripts["api.js"]


# -- in a browser, against `strata serve` -------------------------------------------------------
@dataclass
class Site:
    url: str
    token: str
    http: httpx.Client

    def wait(self, job_id: int, timeout: float = 120) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job: dict[str, Any] = self.http.get(f"/jobs/{job_id}").json()
            if job["state"] in TERMINAL:
                assert job["state"] == "succeeded", job
                return job
            time.sleep(0.2)
        raise AssertionError(f"job {job_id} did not finish")

    def submit(self, name: str, index: int, **params: Any) -> dict[str, Any]:
        train, test, labels = _task_files(index=index)
        form = {"name": name, "labels": json.dumps(labels), "params": json.dumps(params)}
        files = {"train": ("train.jsonl", train), "test": ("test.jsonl", test)}
        r = self.http.post("/streams/news/tasks", data=form, files=files)
        assert r.status_code == 202, r.text
        job: dict[str, Any] = r.json()["job"]
        return job


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """`strata serve` holding a stream `news` with two trained tasks and a schedule."""
    if not Path(CHROMIUM).is_file():
        pytest.fail("chromium is not installed: `make browser` (Debian's package) installs it")
    folder = tmp_path_factory.mktemp("ui")
    with strata_serve(folder) as (url, token):
        assert f"dashboard: {url}/ui" in (folder / "serve.log").read_text()
        http = httpx.Client(base_url=f"{url}/v1", timeout=30,
                            headers={"Authorization": f"Bearer {token}"})  # fmt: skip
        s = Site(url=url, token=token, http=http)
        body = {"name": "news", "base": {"kind": "tiny"}, "hyperparams": FAST}
        made = http.post("/streams", json=body)
        assert made.status_code == 202, made.text
        s.wait(made.json()["job"]["id"])
        for index, name in enumerate(("sentiment", "topic")):
            s.wait(s.submit(name, index)["id"])
        r = http.post("/streams/news/schedules",
                      json={"kind": "retrain", "cron": "0 4 * * *", "task": "topic"})  # fmt: skip
        assert r.status_code == 201, r.text
        yield s
        http.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM)
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Any, site: Site, request: pytest.FixtureRequest) -> Iterator[Any]:
    """A fresh tab (its own sessionStorage); afterwards its screenshot is saved, and no request
    it made had the token in its URL."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    tab = context.new_page()
    tab.set_default_timeout(30_000)
    urls: list[str] = []
    tab.on("request", lambda r: urls.append(r.url))
    errors: list[str] = []
    tab.on("pageerror", lambda e: errors.append(str(e)))
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    try:
        yield tab
    finally:
        tab.screenshot(path=str(ARTIFACTS / f"{request.node.name}.png"), full_page=True)
        context.close()
    assert urls and not [u for u in urls if site.token in u]
    assert errors == []


def _log_in(page: Any, site: Site) -> None:
    page.goto(f"{site.url}/ui/")
    page.fill("#token", site.token)
    page.click("#login button[type=submit]")
    page.wait_for_selector("#streams table")
    assert page.evaluate("sessionStorage.getItem('strata.token')") == site.token
    assert page.evaluate("localStorage.length") == 0 and site.token not in page.url


@pytest.mark.slow
def test_log_in_and_see_a_streams_heat_map(page: Any, site: Site) -> None:
    _log_in(page, site)
    page.click("#streams a:text-is('news')")
    page.wait_for_selector("#matrix")
    evals = site.http.get("/streams/news/evaluations").json()
    assert evals["task_names"][:2] == ["sentiment", "topic"]
    rows = page.locator("#matrix tbody tr")
    assert rows.count() == 1 + len(evals["values"])  # the baseline, then a row per task learned
    # each row is labelled with the state it measured, and shows that state's values
    baseline = rows.nth(0)
    assert baseline.locator("th").inner_text().split() == ["baseline", "v0"]
    cells = baseline.locator("td").all_inner_texts()
    assert cells == [f"{v:.3f}" for v in evals["baseline"]]
    by_label = {st["state"]: st for st in evals["states"] if st["in_lineage"]}
    for t, values in enumerate(evals["values"]):
        head = rows.nth(1 + t).locator("th")
        assert head.locator(".label").inner_text() in by_label
        assert head.inner_text().startswith(f"after {evals['task_names'][t]}")
        shown = rows.nth(1 + t).locator("td").all_inner_texts()
        assert shown == ["\N{EN DASH}" if v is None else f"{v:.3f}" for v in values]
    last = rows.nth(len(evals["values"])).locator(".label").inner_text()
    assert last == "v0 + sentiment@v1, topic@v1"
    coloured = rows.nth(1).locator("td").first.evaluate("td => td.style.backgroundColor")
    assert coloured.startswith("rgb")
    assert page.inner_text("dd[data-metric=ACC]") == f"{evals['average_accuracy']:.3f}"
    # the rest of the stream: current snapshot, adapters with aliases, jobs, schedules
    assert "Current snapshot: v0" in page.inner_text("#current-snapshot")
    adapters = page.inner_text("#adapter-table")
    assert "sentiment" in adapters and "production" in adapters and "latest" in adapters
    assert page.locator("#jobs progress[data-state=succeeded]").count() >= 3
    assert "0 4 * * *" in page.inner_text("#schedules")
    page.screenshot(path=str(ARTIFACTS / "heat-map.png"), full_page=True)
    # free-form tasks' matrix is of completion loss; these tasks are classification ones
    assert site.http.get("/streams/news/evaluations?metric=loss").json()["values"] == []
    page.click("#metric-loss")
    page.wait_for_selector("#no-evaluations")
    assert page.url.endswith("#/streams/news/loss") and "Loss matrix" in page.inner_text("main")


@pytest.mark.slow
def test_watch_a_jobs_progress_bar_reach_done(page: Any, site: Site) -> None:
    """On the job's page, and in the stream's jobs table (which then shows what the job made)."""
    _log_in(page, site)
    slow = {"hyperparams": {"max_steps": 300}}  # a few seconds of training
    job = site.submit("color", 2, **slow)
    with page.expect_request(f"**/v1/jobs/{job['id']}/events/stream"):  # followed live
        page.goto(f"{site.url}/ui/#/jobs/{job['id']}")
    bar = page.locator("#progress progress")
    page.wait_for_selector("#progress progress[data-state=running]")
    assert bar.evaluate("b => b.value") < 1
    page.wait_for_selector("#progress progress[data-state=succeeded]", timeout=120_000)
    assert bar.evaluate("b => b.value") == 1
    assert page.inner_text("#progress .job-state").strip() == "succeeded 100%"
    page.wait_for_selector("#outcome details")  # the finished job read once its stream ended
    events = page.inner_text("#events")  # the job's events, as they came
    assert "train job started" in events and "step 1/300" in events
    page.screenshot(path=str(ARTIFACTS / "job-done.png"), full_page=True)

    r = site.http.post("/streams/news/tasks/color/retrain", json={"params": slow})
    assert r.status_code == 202, r.text
    again = r.json()["id"]
    with page.expect_request(f"**/v1/jobs/{again}/events/stream"):
        page.goto(f"{site.url}/ui/#/streams/news")
    row = page.locator(f"#jobs progress[data-job='{again}']")
    assert row.get_attribute("data-state") in ("queued", "running")
    # when it ends, the page is read again: the retrain's adapter version is listed
    page.wait_for_selector("#adapter-table td:text-is('v2')", timeout=120_000)
    assert row.get_attribute("data-state") == "succeeded" and row.evaluate("b => b.value") == 1
    assert "color" in page.locator("#matrix thead").inner_text()


@pytest.mark.slow
def test_follow_a_lineage_edge(page: Any, site: Site) -> None:
    _log_in(page, site)
    page.goto(f"{site.url}/ui/#/streams/news")
    page.wait_for_selector("#adapter-table")
    topic = next(v for v in site.http.get("/streams/news/adapters").json()["data"]
                 if v["task_name"] == "topic")  # fmt: skip
    page.click(f"#adapter-table a[href='#/lineage/adapter/{topic['id']}']")
    svg = page.locator("svg.lineage")
    page.wait_for_selector(f"svg.lineage[data-root='adapter:{topic['id']}']")
    graph = site.http.get(f"/lineage/adapter/{topic['id']}").json()
    assert svg.locator("g.node").count() == len(graph["nodes"])
    assert svg.locator("g.edge").count() == len(graph["edges"])
    root = f"adapter:{topic['id']}"
    edge = next(e for e in graph["edges"] if e["child"] == root and e["relation"] == "trained_on")
    assert edge["parent"].startswith("snapshot:")
    drawn = svg.locator(f"g.edge[data-child='{root}'][data-parent='{edge['parent']}'] text")
    assert drawn.text_content() == "trained_on"
    page.click(f"svg.lineage g.node[data-node='{edge['parent']}']")
    page.wait_for_selector(f"svg.lineage[data-root='{edge['parent']}']")
    assert page.inner_text("#lineage-title") == "Ancestors of news snapshot v0 (current)"
    assert page.url.endswith(f"#/lineage/snapshot/{edge['parent'].split(':')[1]}/ancestors")
    page.click("text=show descendants")  # and what was built on it: the adapters
    page.wait_for_selector(f"svg.lineage[data-direction=descendants][data-root='{edge['parent']}']")
    assert svg.locator(f"g.node[data-node='adapter:{topic['id']}']").count() == 1


@pytest.mark.slow
def test_a_wrong_token_and_a_missing_stream_show_the_problem_detail(page: Any, site: Site) -> None:
    wrong = httpx.get(f"{site.url}/v1/streams", headers={"Authorization": "Bearer strata_no"})
    missing = site.http.get("/streams/nope")
    assert wrong.status_code == 401 and missing.status_code == 404
    page.goto(f"{site.url}/ui/")
    page.fill("#token", "strata_no")
    page.click("#login button[type=submit]")
    page.wait_for_selector("#problem-detail")
    assert page.inner_text("#problem-detail") == wrong.json()["detail"]
    assert page.is_visible("#login")  # still asking for a token; nothing kept
    assert page.evaluate("sessionStorage.getItem('strata.token')") is None
    page.screenshot(path=str(ARTIFACTS / "wrong-token.png"))
    page.fill("#token", site.token)
    page.click("#login button[type=submit]")
    page.wait_for_selector("#streams table")
    assert page.is_hidden("#problem")
    page.goto(f"{site.url}/ui/#/streams/nope")
    page.wait_for_selector("#problem-detail")
    assert page.inner_text("#problem-detail") == missing.json()["detail"]
    assert "404" in page.inner_text("#problem") and "Back to the streams" in page.inner_text("main")
    # an action the token may not take: the page stays, with the detail above it
    made = site.http.post("/tokens", json={"name": "viewer", "scopes": ["read"]})
    assert made.status_code == 201, made.text
    page.click("#logout")
    page.goto(f"{site.url}/ui/#/streams/news")
    page.fill("#token", made.json()["token"])
    page.click("#login button[type=submit]")  # and on to the page the address names
    page.wait_for_selector("#matrix")
    page.click("#evaluate")
    page.wait_for_selector("#problem-detail")
    assert page.inner_text("#problem-detail") == "this token lacks the 'write' scope"
    assert page.is_visible("#matrix") and page.url.endswith("#/streams/news")


READ = """async (chunks) => {
  const { parseEvent, readEvents } = await import("/ui/api.js");
  const body = new ReadableStream({ start(c) {
    for (const chunk of chunks) c.enqueue(new TextEncoder().encode(chunk));
    c.close();
  } });
  const seen = [];
  const ended = await readEvents(body, (e) => seen.push(e));
  return { ended, seen, comment: parseEvent(": keep-alive"), bare: parseEvent("data:x") };
}"""


@pytest.mark.slow
def test_the_event_stream_reader_splits_events_across_chunks(page: Any, site: Site) -> None:
    """The page's reader of text/event-stream: events split anywhere between network chunks
    (a CR LF too), comments skipped, data lines joined, JSON parsed, nothing read past `end`."""
    page.goto(f"{site.url}/ui/")
    chunks = [
        "event: job-ev",
        'ent\r\ndata: {"x": 1}\r',  # the CR here, its LF in the next chunk
        "\nid: 1\r\n\r\n: keep-alive\n\n",
        "event: state\ndata: a\ndata: b\n\nevent: end\ndata: {}\n\n",
        "data: late\n\n",
    ]
    got = page.evaluate(READ, chunks)
    assert got["ended"] is True
    assert got["seen"] == [
        {"event": "job-event", "id": "1", "data": {"x": 1}},
        {"event": "state", "id": None, "data": "a\nb"},
        {"event": "end", "id": None, "data": {}},
    ]
    assert got["comment"] is None and got["bare"] == {"event": "message", "id": None, "data": "x"}

"""A small HTTP client of the REST API, used by the `strata` CLI (and handy in notebooks)."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import httpx
import urllib3

DEFAULT_URL = "http://127.0.0.1:8000"
DOWNLOAD_CHUNK = 1024 * 1024
SSE_RECONNECTS = 5  # cuts of a job's event stream in a row before following it gives up


class ApiError(Exception):
    """A problem+json answer: `status`, `detail`, the offending `field`."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        self.status = status
        self.body = body
        self.field = body.get("field")
        detail = body.get("detail") or body.get("title") or f"HTTP {status}"
        super().__init__(f"{self.field}: {detail}" if self.field else str(detail))


class StrataClient:
    def __init__(self, url: str = DEFAULT_URL, *, token: str | None, timeout: float = 600) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.base_url = url.rstrip("/") + "/v1"
        self.http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)
        # Downloads go through urllib3: httpx reads a response 64 KiB at a time (httpcore's
        # fixed read size), which held a loopback download to about a third of the server's
        # rate; urllib3 reads what the caller asks for (docs/notes/
        # 2026-11-23-artifacts-vs-minio.md, "Downloads over the API").
        self._downloads = urllib3.PoolManager(
            headers=headers, timeout=urllib3.Timeout(total=None, connect=timeout, read=timeout),
            retries=False,
        )  # fmt: skip

    def close(self) -> None:
        self.http.close()
        self._downloads.clear()

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self.http.request(method, path, **kwargs)
        if response.status_code >= 400:
            raise ApiError(response.status_code, _problem(response))
        if response.status_code == 204 or not response.content:
            return None
        return response.json()

    def pages(self, path: str, **params: Any) -> Iterator[dict[str, Any]]:
        """Every item of a cursor-paginated list."""
        cursor = 0
        while True:
            page = self.request("GET", path, params={**params, "cursor": cursor})
            yield from page["data"]
            if not page.get("next_cursor"):
                return
            cursor = page["next_cursor"]

    def submit_task(
        self,
        stream: str,
        *,
        name: str,
        train: Path | None,
        test: Path | None = None,
        format: str = "auto",
        labels: list[str] | None = None,
        params: dict[str, Any] | None = None,
        dataset: str | None = None,
    ) -> dict[str, Any]:
        data: dict[str, str] = {"name": name, "format": format}
        if labels is not None:
            data["labels"] = json.dumps(labels)
        if params:
            data["params"] = json.dumps(params)
        if dataset:
            data["dataset"] = dataset
        with contextlib.ExitStack() as stack:
            files = {
                field: (Path(path).name, stack.enter_context(Path(path).open("rb")))
                for field, path in (("train", train), ("test", test))
                if path is not None
            }
            result: dict[str, Any] = self.request(
                "POST", f"/streams/{stream}/tasks", data=data, files=files or None
            )
        return result

    def predict(
        self,
        stream: str,
        inputs: list[str],
        *,
        task: str | None = None,
        version: str = "production",
        labels: list[str] | None = None,
        template: bool = True,
        max_new_tokens: int = 16,
    ) -> dict[str, Any]:
        """`POST /streams/{stream}/predict`: with `task`, the inputs are the task's `{text}` and
        go through its prompt template (`template=False`: sent raw); each prediction's `prompt`
        is what the model was given."""
        body: dict[str, Any] = {"inputs": inputs, "version": version,
                                "max_new_tokens": max_new_tokens}  # fmt: skip
        if task is not None:
            body["task"] = task
            body["template"] = template
        if labels is not None:
            body["labels"] = labels
        result: dict[str, Any] = self.request("POST", f"/streams/{stream}/predict", json=body)
        return result

    def job_events(
        self, job_id: int, *, after: int = 0, reconnects: int = SSE_RECONNECTS
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        """The job's server-sent events, (event, data), until it ends. A stream cut before its
        `end` event is opened again with `Last-Event-ID` (the last `id:` seen), so no event is
        shown twice or lost; after `reconnects` cuts in a row without an event the error is
        raised. The id is sent back as it came (an opaque string; an empty `id:` clears it)."""
        last_id, failures = str(after) if after else "", 0
        while True:
            headers = {"Accept": "text/event-stream"}
            if last_id:
                headers["Last-Event-ID"] = last_id
            try:
                with self.http.stream("GET", f"/jobs/{job_id}/events/stream", headers=headers,
                                      params={"cursor": after}) as response:  # fmt: skip
                    if response.status_code >= 400:
                        response.read()
                        raise ApiError(response.status_code, _problem(response))
                    for event_id, event, data in sse_events(response.iter_lines()):
                        failures = 0
                        if event_id is not None:
                            last_id = event_id
                        yield event, json.loads(data)
                        if event == "end":
                            return
            except (httpx.TransportError, urllib3.exceptions.HTTPError):
                if failures >= reconnects:
                    raise
            failures += 1
            if failures > reconnects:
                raise httpx.RemoteProtocolError("the event stream ended before the job did")
            time.sleep(min(0.2 * 2**failures, 5.0))

    def download(
        self,
        path: str,
        dest: Path,
        *,
        params: dict[str, Any] | None = None,
        progress: Callable[[int, int | None], None] | None = None,
    ) -> Path:
        """Stream a file to `dest` (never held in memory whole), written next to it first and
        renamed into place once whole: a failed or short download leaves `dest` as it was.

        `progress(done, total)` is called after every chunk with the bytes written so far and the
        announced length (None when the server sent none). A response shorter than its announced
        length raises `urllib3.exceptions.ProtocolError`."""
        dest = Path(dest)
        part = dest.with_name(f".{dest.name}.part")
        response = self._downloads.request(
            "GET", f"{self.base_url}/{path.lstrip('/')}", fields=params, preload_content=False
        )
        try:
            if response.status >= 400:
                raise ApiError(response.status, _problem_of(response.data, response.reason))
            length = response.headers.get("Content-Length")
            total = int(length) if length is not None and length.isdigit() else None
            done = 0
            try:
                with part.open("wb") as out:
                    for chunk in response.stream(DOWNLOAD_CHUNK):
                        out.write(chunk)
                        done += len(chunk)
                        if progress is not None:
                            progress(done, total)
                part.replace(dest)
            except BaseException:
                part.unlink(missing_ok=True)
                raise
        finally:
            response.release_conn()
        return dest


def _problem(response: httpx.Response) -> dict[str, Any]:
    return _problem_of(response.content, response.reason_phrase)


def _problem_of(content: bytes, reason: str | None) -> dict[str, Any]:
    try:
        body = json.loads(content)
    except ValueError:
        return {"detail": content.decode(errors="replace")[:500] or reason}
    return body if isinstance(body, dict) else {"detail": str(body)}


def sse_events(lines: Iterable[str]) -> Iterator[tuple[str | None, str, str]]:
    """(id, event, data) of each server-sent event in `lines`, parsed as the SSE spec says:
    `id`, `event` and `data` fields (several `data` lines joined by newlines), comments
    (`:`) ignored, a blank line ending the event; an event without data is not dispatched."""
    event_id: str | None = None
    event, data = "message", list[str]()
    for line in lines:
        if not line:
            if data:
                yield event_id, event or "message", "\n".join(data)
            event, data, event_id = "message", [], None
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "data":
            data.append(value)
        elif field == "event":
            event = value
        elif field == "id" and "\0" not in value:
            event_id = value

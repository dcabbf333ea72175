"""A small HTTP client of the REST API, used by the `strata` CLI (and handy in notebooks)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"


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
        self.http = httpx.Client(base_url=url.rstrip("/") + "/v1", headers=headers, timeout=timeout)

    def close(self) -> None:
        self.http.close()

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
        format: str = "jsonl",
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

    def job_events(self, job_id: int, *, after: int = 0) -> Iterator[tuple[str, dict[str, Any]]]:
        """The job's server-sent events, (event, data), until it ends."""
        headers = {"Accept": "text/event-stream"}
        with self.http.stream(
            "GET", f"/jobs/{job_id}/events/stream", params={"cursor": after}, headers=headers
        ) as response:
            if response.status_code >= 400:
                response.read()
                raise ApiError(response.status_code, _problem(response))
            event, data = "message", ""
            for line in response.iter_lines():
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:"):
                    data += line[5:].strip()
                elif not line and data:
                    yield event, json.loads(data)
                    event, data = "message", ""

    def download(
        self,
        path: str,
        dest: Path,
        *,
        params: dict[str, Any] | None = None,
        progress: Callable[[int, int | None], None] | None = None,
    ) -> Path:
        """Stream a file to `dest` (never held in memory whole), written next to it first and
        renamed into place once whole: a failed download leaves `dest` as it was.

        `progress(done, total)` is called after every chunk with the bytes written so far and the
        announced length (None when the server sent none)."""
        dest = Path(dest)
        part = dest.with_name(f".{dest.name}.part")
        with self.http.stream("GET", path, params=params) as response:
            if response.status_code >= 400:
                response.read()
                raise ApiError(response.status_code, _problem(response))
            length = response.headers.get("Content-Length")
            total = int(length) if length is not None and length.isdigit() else None
            try:
                with part.open("wb") as out:
                    for chunk in response.iter_bytes():
                        out.write(chunk)
                        if progress is not None:
                            progress(response.num_bytes_downloaded, total)
                part.replace(dest)
            except BaseException:
                part.unlink(missing_ok=True)
                raise
        return dest


def _problem(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {"detail": response.text[:500] or response.reason_phrase}
    return body if isinstance(body, dict) else {"detail": str(body)}

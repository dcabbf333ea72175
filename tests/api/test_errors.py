"""An unexpected error: a problem+json 500 that reveals nothing, and its traceback logged once
by the server (the app's handler logged it as well, so each 500 printed two)."""

from __future__ import annotations

import logging
import threading
import time

import httpx
import pytest
import uvicorn

from api.app import create_app
from registry.instance import Instance
from tests.harness import free_port


class _Sent:
    def send(self, job: object) -> None:
        pass


def test_a_500_says_nothing_inside_and_its_traceback_is_logged_once(
    instance: Instance, caplog: pytest.LogCaptureFixture
) -> None:
    app = create_app(instance, _Sent())

    @app.get("/boom")
    def boom() -> None:
        raise RuntimeError("secret server detail")

    port = free_port()  # log_config=None: uvicorn's records reach pytest's handler
    server = uvicorn.Server(uvicorn.Config(app, port=port, log_config=None, log_level="info"))
    thread = threading.Thread(target=server.run, daemon=True)
    with caplog.at_level(logging.INFO):
        thread.start()
        while not server.started:
            time.sleep(0.05)
        try:
            response = httpx.get(f"http://127.0.0.1:{port}/boom", timeout=30)
        finally:
            server.should_exit = True
            thread.join(10)
    assert response.status_code == 500
    assert response.json()["code"] == "internal_error"
    assert "secret" not in response.text
    tracebacks = [r for r in caplog.records if r.exc_info and "secret server detail" in
                  str(r.exc_info[1])]  # fmt: skip
    assert len(tracebacks) == 1, [r.getMessage() for r in tracebacks]

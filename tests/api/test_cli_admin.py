"""`strata webhooks`, `streams delete | restore | promotion` and `adapters delete | restore | tag`
and the search flags of `adapters list`, answered by the test's app."""

from __future__ import annotations

import pytest

from api.cli import main
from tests.api.conftest import Api
from tests.api.helpers import _InProcess, _stream, _submit
from workers.runner import run_job


def test_registry_upkeep_from_the_cli(
    api: Api, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("api.cli_client._client", lambda _args: _InProcess(api, "admin"))

    def run(*args: str) -> str:
        code = main(list(args))
        out, err = capsys.readouterr()
        assert code == 0, err
        return out

    def refused(*args: str) -> str:
        assert main(list(args)) == 2
        return capsys.readouterr().err

    _stream(api)
    made = _submit(api, "s1", "t1")
    assert run_job(api.inst, made.json()["job"]["id"]).state == "succeeded"

    hook = "http://127.0.0.1:9/hook"
    out = run("webhooks", "create", hook, "--event", "job.finished", "--secret", "s" * 16)
    assert f"webhook 1: job.finished -> {hook}" in out
    assert hook in run("webhooks", "list")
    assert run("webhooks", "deliveries", "1") == ""  # nothing has happened since
    assert "webhook 1 deleted" in run("webhooks", "delete", "1")
    assert run("webhooks", "list") == ""
    assert "error (422)" in refused("webhooks", "create", "ftp://x/y", "--event", "job.finished",
                                    "--secret", "s" * 16)  # fmt: skip

    out = run("streams", "promotion", "s1", "--task-tolerance", "0.5")
    assert "stream 's1' promotes with task_tolerance 0.5" in out
    assert "max_other_drop" in refused("streams", "promotion", "s1", "--max-other-drop", "-1")

    assert "t1 v1 tags: team=search" in run("adapters", "tag", "s1", "t1", "1", "team=search")
    assert "t1 " in run("adapters", "list", "s1", "--tag", "team:search", "--order-by",
                        "accuracy")  # fmt: skip
    assert run("adapters", "list", "s1", "--tag", "team:other") == ""

    assert "production" in refused("adapters", "delete", "s1", "t1", "1")  # move it first
    run("adapters", "alias", "s1", "t1", "production", "--delete")
    assert "t1 v1 deleted" in run("adapters", "delete", "s1", "t1", "1")
    assert run("adapters", "list", "s1") == ""
    assert "t1 v1 restored" in run("adapters", "restore", "s1", "t1", "1")

    assert "stream 's1' deleted" in run("streams", "delete", "s1")
    assert "error (404)" in refused("streams", "show", "s1")
    assert "stream 's1' restored" in run("streams", "restore", "s1")
    assert "t1 " in run("adapters", "list", "s1")

"""Predict cannot exhaust the API (issue 19): prompts are cut to the stream's `max_length` (and
say so), inputs over STRATA_PREDICT_MAX_INPUT_BYTES and requests over STRATA_PREDICT_MAX_TOKENS
are refused with 422, more than STRATA_PREDICT_CONCURRENCY at once get 429 with Retry-After, and
a prediction whose client goes away stops (over real HTTP)."""

from __future__ import annotations

import dataclasses
import json
import logging
import socket
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from torch import nn

from api.app import create_app
from api.cli import main
from api.routes.predict import max_body_bytes
from registry.entities import Snapshot
from registry.instance import Instance
from tests.api.conftest import SETTINGS, Api, Recorder, _tokens
from tests.api.helpers import _InProcess, _problem
from tests.harness import serve
from workers import predict as predict_module
from workers.models import load_snapshot
from workers.predict import InProcessPredictor
from workers.streams import create_stream

MAX_LENGTH = 16  # the stream's hyperparameter: prompts are cut to 16 tokens, bos included
LIMITS = {"predict_max_input_bytes": 1024, "predict_max_tokens": 300, "predict_concurrency": 1,
          "max_upload_bytes": 2**20}  # fmt: skip
LONG = "Which colour?\nInput: " + "grass and trees and more grass " * 20 + "\nAnswer:"  # 640 B


def _app(instance: Instance) -> tuple[Instance, Any]:
    inst = dataclasses.replace(instance, settings=SETTINGS.model_copy(update=LIMITS))
    create_stream(inst, name="s1", base={"kind": "tiny"}, hyperparams={"max_length": MAX_LENGTH})
    return inst, create_app(inst, Recorder(), InProcessPredictor(inst))


@pytest.fixture
def api(instance: Instance) -> Iterator[Api]:
    """A stream s1 (a tiny base, no tasks) whose max_length is 16, and the limits above."""
    inst, app = _app(instance)
    with TestClient(app, raise_server_exceptions=False) as client:
        yield Api(client=client, inst=inst, dispatcher=Recorder(), tokens=_tokens(inst))


def _post(api: Api, **body: Any) -> Any:
    return api.client.post("/v1/streams/s1/predict", json=body, headers=api.auth("read"))


def _snapshot(api: Api) -> Snapshot:
    streams = api.inst.registry.streams
    return streams.current_snapshot(streams.get("s1").id)


def _greedy(model: nn.Module, ids: list[int], steps: int, eos: int) -> list[int]:
    new: list[int] = []
    with torch.no_grad():
        for _ in range(steps):
            token = int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
            if token == eos:
                break
            new.append(token)
    return new


def test_long_inputs_are_cut_to_max_length_as_training_cuts_them(
    api: Api, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    r = _post(api, inputs=["Which colour?", LONG], max_new_tokens=3)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["max_length"] == MAX_LENGTH
    assert [p["truncated"] for p in out["predictions"]] == [False, True]
    assert out["predictions"][1]["prompt"] == LONG  # shown whole; the model saw it cut
    # the model saw bos, the first 7 tokens and the last 8 (the start and the answer cue)
    model, tokenizer = load_snapshot(api.inst, _snapshot(api))
    ids = tokenizer.encode(LONG, add_special_tokens=False)
    cut = [tokenizer.bos_token_id, *ids[:7], *ids[len(ids) - 8 :]]
    new = _greedy(model, cut, 3, tokenizer.eos_token_id)
    expected = tokenizer.decode(new, skip_special_tokens=True).strip()
    assert out["predictions"][1]["output"] == expected
    # ranking cuts the prompt further, to leave room for the longest label
    ranked = _post(api, inputs=["sky", LONG], labels=["red", "blue"]).json()
    assert [p["truncated"] for p in ranked["predictions"]] == [False, True]
    # `strata predict` says which inputs were cut
    monkeypatch.setattr("api.cli_client._client", lambda _args: _InProcess(api))
    assert main(["predict", "s1", "sky", LONG, "--max-new-tokens", "2"]) == 0
    shown = [line for line in capsys.readouterr().out.splitlines() if line.startswith("> ")]
    assert [line.endswith("(cut to max_length)") for line in shown] == [False, True]


def test_oversized_inputs_and_requests_over_the_token_budget_are_refused(api: Api) -> None:
    big = "x" * 1025  # one byte over STRATA_PREDICT_MAX_INPUT_BYTES
    body = _problem(_post(api, inputs=["a", big]), 422, "inputs.1")
    assert "1025 bytes" in body["detail"] and "1024" in body["detail"]
    _problem(_post(api, inputs=["a"], labels=["red", "é" * 513]), 422, "labels.1")  # 1026 B
    surrogate = api.client.post(
        "/v1/streams/s1/predict",
        content=b'{"inputs": ["\\ud800"]}',
        headers={**api.auth("read"), "Content-Type": "application/json"},
    )
    _problem(surrogate, 422, "inputs.0")  # JSON lets a lone surrogate through: not text
    assert _post(api, inputs=["a" * 1024], max_new_tokens=1).status_code == 200  # at the limit
    # 16 inputs cut to 16 tokens: 16 x (16 + 2) = 288 tokens fit the budget of 300...
    assert _post(api, inputs=[LONG] * 16, max_new_tokens=2).status_code == 200
    # ...16 x (16 + 3) = 304 do not
    over = _problem(_post(api, inputs=[LONG] * 16, max_new_tokens=3), 422, "inputs")
    assert "16 inputs x (16 prompt tokens + 3 new tokens) = 304 tokens" in over["detail"]
    assert "budget of 300" in over["detail"]
    # ranking: each prompt cut to leave room for the longest label, run once, and every label
    labels = ["red", "blue", "green", "a yellow one"]
    _, tokenizer = load_snapshot(api.inst, _snapshot(api))
    sizes = [len(tokenizer.encode(" " + label, add_special_tokens=False)) for label in labels]
    prompts, labelled = 16 * (MAX_LENGTH - max(sizes)), 16 * sum(sizes)
    assert prompts + labelled > 300
    ranked = _problem(_post(api, inputs=[LONG] * 16, labels=labels), 422, "inputs")
    assert f"= {prompts + labelled} tokens" in ranked["detail"]
    assert _post(api, inputs=[LONG] * 16, labels=labels[:2]).status_code == 200
    for bad, field in (({"inputs": ["a"] * 17}, "inputs"),
                       ({"inputs": ["a"], "max_new_tokens": 129}, "max_new_tokens")):  # fmt: skip
        _problem(api.client.post("/v1/streams/s1/predict", json=bad, headers=api.auth("read")),
                 422, field)  # fmt: skip


def test_a_predict_body_larger_than_any_valid_one_is_refused_as_it_arrives(api: Api) -> None:
    limit = max_body_bytes(api.inst.settings)  # 80 texts x 6 x 1024 bytes + 64 KiB
    assert limit < api.inst.settings.max_upload_bytes  # smaller than other routes' limit
    headers = {**api.auth("read"), "Content-Type": "application/json"}
    for size, status, field in ((limit + 1, 413, "body"), (limit, 422, "inputs.0")):
        body = json.dumps({"inputs": ["x" * (size - len('{"inputs": [""]}'))]}).encode()
        assert len(body) == size
        r = api.client.post("/v1/streams/s1/predict", content=body, headers=headers)
        _problem(r, status, field)


def test_predictions_over_the_concurrency_limit_get_429_with_retry_after(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    started, release = threading.Event(), threading.Event()
    real = predict_module.predict

    def held(*args: Any, **kwargs: Any) -> Any:
        started.set()
        assert release.wait(60)
        return real(*args, **kwargs)

    monkeypatch.setattr("workers.predict.predict", held)
    first: list[Any] = []
    thread = threading.Thread(target=lambda: first.append(_post(api, inputs=["a"])))
    thread.start()
    try:
        assert started.wait(60)  # the one slot (STRATA_PREDICT_CONCURRENCY=1) is held
        refused = _post(api, inputs=["b"])
        body = _problem(refused, 429)
        assert body["code"] == "too_many_requests"
        assert "STRATA_PREDICT_CONCURRENCY" in body["detail"]
        assert int(refused.headers["Retry-After"]) > 0
    finally:
        release.set()
        thread.join(60)
    assert first[0].status_code == 200, first[0].text
    assert _post(api, inputs=["c"]).status_code == 200  # the slot was given back


class _Seen(logging.Handler):
    """Sets an event when a record containing each watched text is logged."""

    def __init__(self, **watched: str) -> None:
        super().__init__(logging.INFO)
        self.watched = watched
        self.events = {name: threading.Event() for name in watched}

    def emit(self, record: logging.LogRecord) -> None:
        for name, text in self.watched.items():
            if text in record.getMessage():
                self.events[name].set()


def _send(url: str, token: str, body: dict[str, Any]) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    payload = json.dumps(body).encode()
    sock = socket.create_connection((host, int(port)))
    head = (f"POST /v1/streams/s1/predict HTTP/1.1\r\nHost: {host}\r\n"
            f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n")  # fmt: skip
    sock.sendall(head.encode() + payload)
    return sock


def test_a_prediction_stops_when_its_client_goes_away(instance: Instance) -> None:
    inst, app = _app(instance)
    token = _tokens(inst)["read"]
    stream = inst.registry.streams.get("s1")
    snapshot = inst.registry.streams.current_snapshot(stream.id)
    model, tokenizer = predict_module._model(inst, snapshot, [], stream.method)  # as cached
    seen = _Seen(gone="the client went away; stopping", stopped="stopped: its client went away")
    forwards: list[int] = []
    started = threading.Event()

    def hook(_module: nn.Module, _args: object, out: Any) -> None:
        """The first forward pass waits until the server saw the client go; eos never wins,
        so without a stop generation would run all 64 steps."""
        forwards.append(1)
        out.logits[..., tokenizer.eos_token_id] = float("-inf")
        if len(forwards) == 1:
            started.set()
            assert seen.events["gone"].wait(60)

    route_log = logging.getLogger("api.routes.predict")
    level = route_log.level
    route_log.setLevel(logging.INFO)
    route_log.addHandler(seen)
    handle = model.register_forward_hook(hook)
    try:
        with serve(app) as url:
            sock = _send(url, token, {"inputs": ["Which colour?"], "max_new_tokens": 64})
            try:
                assert started.wait(60)  # the model is running the request
            finally:
                sock.close()
            assert seen.events["stopped"].wait(60)
            assert len(forwards) == 1  # one token generated, not 64
            again = httpx.post(f"{url}/v1/streams/s1/predict", timeout=60,
                               json={"inputs": ["a"], "max_new_tokens": 2},
                               headers={"Authorization": f"Bearer {token}"})  # fmt: skip
            assert again.status_code == 200, again.text  # the one slot was given back
            assert len(forwards) == 3  # 2 tokens: the hook still counts
    finally:
        handle.remove()
        route_log.removeHandler(seen)
        route_log.setLevel(level)

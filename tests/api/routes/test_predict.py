"""`POST /v1/streams/{s}/predict` and `strata predict` on a task's prompt format: the inputs are
the task's `{text}`, rendered by its recorded prompt template, and a classification task's own
labels are ranked, each rendered by its completion template, with the scores evaluation gives
(the reference below renders both by hand and calls `label_scores` on the same state)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from torch import nn
from transformers import PreTrainedTokenizerBase

from api.cli import main
from continual.data import Example, PromptFormat, synthetic_tasks
from continual.evaluation import label_scores
from continual.strategies import get_strategy
from services.trees import fetch_tree
from tests.api.conftest import Api
from tests.api.helpers import _InProcess, _problem, _stream, _wait
from workers.models import load_snapshot

# topic: a CL_Benchmark upload (an instruction template, completions " {label}");
# color: a labelled JSONL upload whose completions are written without the leading space
TOPIC, COLOR = synthetic_tasks(seed=0, train_size=24, test_size=6)[1:3]
TOPIC_LABELS, COLOR_LABELS = list(TOPIC.labels or ()), list(COLOR.labels or ())


def _text(example: Example) -> str:
    """The input text of a synthetic example (between its instruction and answer cue)."""
    return example.prompt.split("Input: ")[1].split("\nAnswer:")[0]


def _submit(api: Api, name: str, *, format: str, train: str, test: str, labels: list[str]) -> Any:
    data = {"name": name, "format": format, "labels": json.dumps(labels),
            "params": json.dumps({"eval_limit": 6})}  # fmt: skip
    files = {"train": ("train", train), "test": ("test", test)}
    r = api.client.post("/v1/streams/s1/tasks", data=data, files=files, headers=api.auth("write"))
    assert r.status_code == 202, r.text
    assert _wait(api, r.json()["job"]["id"])["state"] == "succeeded"


def _records(examples: tuple[Example, ...]) -> str:
    """CL_Benchmark JSON: the text and the bare label of each example."""
    return json.dumps([{"sentence": _text(e), "label": e.completion.strip()} for e in examples])


def _lines(examples: tuple[Example, ...]) -> str:
    """JSONL whose completions are the labels without a leading space."""
    rows = [{"prompt": e.prompt, "completion": e.completion.strip()} for e in examples]
    return "".join(json.dumps(row) + "\n" for row in rows)


def _trained(api: Api) -> None:
    """Stream s1: topic (CL_Benchmark, " {label}"), then color (JSONL, "{label}")."""
    _stream(api)
    _submit(api, "topic", format="cl_benchmark", train=_records(TOPIC.train),
            test=_records(TOPIC.test), labels=TOPIC_LABELS)  # fmt: skip
    _submit(api, "color", format="jsonl", train=_lines(COLOR.train), test=_lines(COLOR.test),
            labels=COLOR_LABELS)  # fmt: skip


def _state(api: Api, tasks: list[str]) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """The model of `tasks`' latest versions on the current snapshot, built here."""
    reg = api.inst.registry
    stream = reg.streams.get("s1")
    versions = [reg.adapters.get(task_id=reg.tasks.get(stream_id=stream.id, name=t).id,
                                 ref_="latest") for t in tasks]  # fmt: skip
    base, tokenizer = load_snapshot(api.inst, reg.streams.current_snapshot(stream.id))
    dirs = [fetch_tree(api.inst, v.artifact_digest or "") for v in versions]
    return get_strategy("seq-lora").inference_model(base, history=dirs), tokenizer


def _reference(
    state: tuple[nn.Module, PreTrainedTokenizerBase], prompt: str, labels: list[str], template: str
) -> dict[str, float]:
    model, tokenizer = state
    row = label_scores(model, tokenizer, [Example(prompt=prompt, completion="")], labels,
                       fmt=PromptFormat(completion=template))[0]  # fmt: skip
    return dict(zip(labels, row.tolist(), strict=True))


def _predict(api: Api, **body: Any) -> dict[str, Any]:
    r = api.client.post("/v1/streams/s1/predict", json=body, headers=api.auth("read"))
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


def _check_ranked(out: dict[str, Any], reference: list[dict[str, float]]) -> None:
    for prediction, expected in zip(out["predictions"], reference, strict=True):
        assert prediction["scores"] == pytest.approx(expected, abs=1e-5)
        assert prediction["output"] == max(expected, key=expected.__getitem__)


@pytest.mark.slow
def test_predict_with_a_task_renders_its_template_and_ranks_its_labels(live_api: Api) -> None:
    api = live_api
    _trained(api)
    topic_state, color_state = _state(api, ["topic"]), _state(api, ["topic", "color"])
    texts = [_text(e) for e in TOPIC.test[:3]]
    instruction = "Classify the text. Options: sport, food, tech.\nInput: "
    rendered = [f"{instruction}{t}\nAnswer:" for t in texts]  # the CL_Benchmark template

    out = _predict(api, inputs=[f"  {t} " for t in texts], task="topic")
    assert out["adapters"] == ["topic@v1"]
    assert (out["prompt_template"], out["completion_template"]) == (
        instruction + "{text}\nAnswer:", " {label}")  # fmt: skip
    assert [p["prompt"] for p in out["predictions"]] == rendered  # the text stripped, as trained
    _check_ranked(out, [_reference(topic_state, p, TOPIC_LABELS, " {label}") for p in rendered])
    # explicit labels go through the same completion template
    some = _predict(api, inputs=texts, task="topic", labels=["tech", " food"])
    _check_ranked(some, [_reference(topic_state, p, ["tech", " food"], " {label}")
                         for p in rendered])  # fmt: skip

    # a JSONL task's prompts are its own; its labels were written without a leading space
    prompts = [e.prompt for e in COLOR.test[:2]]
    color = _predict(api, inputs=prompts, task="color", version="1")
    assert color["adapters"] == ["topic@v1", "color@v1"]
    assert (color["prompt_template"], color["completion_template"]) == ("{text}", "{label}")
    assert [p["prompt"] for p in color["predictions"]] == prompts
    bare = [_reference(color_state, p, COLOR_LABELS, "{label}") for p in prompts]
    _check_ranked(color, bare)
    spaced = _reference(color_state, prompts[0], COLOR_LABELS, " {label}")
    assert spaced != pytest.approx(bare[0], abs=1e-3)  # the template decides what is scored


@pytest.mark.slow
def test_predict_raw_text_and_bad_requests(live_api: Api) -> None:
    api = live_api
    _trained(api)
    text = _text(TOPIC.test[0])
    raw = _predict(api, inputs=[text], task="topic", template=False, labels=TOPIC_LABELS)
    assert raw["predictions"][0]["prompt"] == text and raw["prompt_template"] is None
    expected = _reference(_state(api, ["topic"]), text, TOPIC_LABELS, " {label}")
    _check_ranked(raw, [expected])
    generated = _predict(api, inputs=[text], task="topic", template=False, max_new_tokens=2)
    assert generated["predictions"][0]["scores"] is None  # raw: no task labels, generation
    assert generated["predictions"][0]["prompt"] == text
    # without a task: the stream's current state on the text as written
    current = _predict(api, inputs=[text], labels=TOPIC_LABELS)
    assert current["adapters"] == ["topic@v1", "color@v1"] and current["prompt_template"] is None
    assert current["predictions"][0]["prompt"] == text

    c, h = api.client, api.auth("read")
    body = _problem(c.post("/v1/streams/s1/predict", json={"inputs": [text], "task": "nope"},
                           headers=h), 404, "task")  # fmt: skip
    assert "nope" in body["detail"]
    _problem(c.post("/v1/streams/s1/predict", json={"inputs": [text], "task": "topic",
             "version": "9"}, headers=h), 404)  # fmt: skip
    for bad, field in (
        ({"inputs": []}, "inputs"),
        ({"inputs": [text], "labels": []}, "labels"),
        ({"inputs": [text], "labels": ["food", " food"]}, "labels"),
        ({"inputs": [text], "labels": ["  "]}, "labels"),
        ({"inputs": [text], "task": "topic", "template": "maybe"}, "template"),
        ({"inputs": [text], "max_new_tokens": 0}, "max_new_tokens"),
        ({"inputs": [text], "prompt_template": "{text}"}, "prompt_template"),
    ):
        _problem(c.post("/v1/streams/s1/predict", json=bad, headers=h), 422, field)


@pytest.mark.slow
def test_strata_predict_task_shows_the_rendered_prompt(
    live_api: Api, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    api = live_api
    _trained(api)
    monkeypatch.setattr("api.cli_client._client", lambda _args: _InProcess(api))
    text = _text(TOPIC.test[0])
    assert main(["predict", "s1", text, "--task", "topic"]) == 0
    out = capsys.readouterr().out
    prompt = f"Classify the text. Options: sport, food, tech.\\nInput: {text}\\nAnswer:"
    assert "snapshot v0 + topic@v1" in out and f"  prompt: '{prompt}'" in out
    assert "completion template: ' {label}'" in out
    assert all(label in out.splitlines()[-1] for label in TOPIC_LABELS)  # ranked, with scores
    assert main(["predict", "s1", text, "--task", "topic", "--raw", "--labels", "food,tech"]) == 0
    raw = capsys.readouterr().out
    assert "prompt" not in raw and "food" in raw.splitlines()[-1]
    assert main(["predict", "s1", text, "--task", "nope"]) == 2
    assert "task" in capsys.readouterr().err

"""Predict: complete (or classify) a handful of inputs with a stream's current state, or with a
named adapter version on its task's prompt format, so users can check what they trained."""

from __future__ import annotations

from fastapi import APIRouter

from api.deps import InstDep, ReadToken, StreamDep
from api.schemas import PredictRequest, PredictResponse
from workers.predict import predict

router = APIRouter(tags=["predict"])


@router.post("/streams/{stream}/predict", response_model=PredictResponse)
def run_predict(stream: StreamDep, body: PredictRequest, inst: InstDep, _: ReadToken) -> object:
    """With `task`, each input is rendered by the task's prompt template (shown as `prompt`)
    and a classification task's labels are ranked as evaluation ranks them."""
    ref: int | str = int(body.version) if body.version.isdigit() else body.version
    result = predict(
        inst, stream, body.inputs, task=body.task, ref=ref, max_new_tokens=body.max_new_tokens,
        labels=body.labels, template=body.template,
    )  # fmt: skip
    predictions = [
        {
            "input": text,
            "prompt": prompt,
            "output": out,
            "scores": None if result.scores is None else result.scores[i],
        }
        for i, (text, prompt, out) in enumerate(
            zip(body.inputs, result.prompts, result.outputs, strict=True)
        )
    ]
    fmt = result.fmt
    return {
        "snapshot_version": result.snapshot.version,
        "adapters": [f"{a.task_name}@v{a.version}" for a in result.adapters],
        "prompt_template": None if fmt is None else fmt.prompt,
        "completion_template": None if fmt is None else fmt.completion,
        "predictions": predictions,
    }

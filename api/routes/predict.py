"""Predict: complete (or classify) a handful of inputs with a stream's current state, or with a
named adapter version, so users can check what they trained."""

from __future__ import annotations

from fastapi import APIRouter

from api.deps import InstDep, ReadToken, StreamDep
from api.schemas import PredictRequest, PredictResponse
from workers.predict import predict

router = APIRouter(tags=["predict"])


@router.post("/streams/{stream}/predict", response_model=PredictResponse)
def run_predict(stream: StreamDep, body: PredictRequest, inst: InstDep, _: ReadToken) -> object:
    ref: int | str = int(body.version) if body.version.isdigit() else body.version
    result = predict(
        inst, stream, body.inputs, task=body.task, ref=ref, max_new_tokens=body.max_new_tokens,
        labels=body.labels,
    )  # fmt: skip
    predictions = [
        {
            "input": text,
            "output": out,
            "scores": None if result.scores is None else result.scores[i],
        }
        for i, (text, out) in enumerate(zip(body.inputs, result.outputs, strict=True))
    ]
    return {
        "snapshot_version": result.snapshot.version,
        "adapters": [f"{a.task_name}@v{a.version}" for a in result.adapters],
        "predictions": predictions,
    }

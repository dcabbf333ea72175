"""A task's dataset versions (its data may grow) and retraining it on one of them."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Response, UploadFile
from pydantic import BaseModel, ConfigDict, Field

from api.deps import DispatcherDep, InstDep, ReadToken, StreamDep, WriteToken
from api.routes.tasks import read_upload
from api.schemas import JobPublic
from registry.entities import DatasetVersion
from services.datasets import AUTO
from services.dispatch import enqueue
from services.promotion import check_gate
from services.retraining import DEFAULT_REPLAY, add_dataset_version, retrain_task

router = APIRouter(prefix="/streams/{stream}/tasks/{task}", tags=["datasets"])


class DatasetVersionPublic(BaseModel):
    version: int = Field(description="1: the data the task was submitted with; then 2, 3...")
    digest: str = Field(description="sha256 of the dataset's canonical JSONL (its blob's key)")
    examples: int = Field(description="Training examples.")
    test_examples: int
    labels: list[str] | None
    created_at: datetime


class DatasetVersionsPublic(BaseModel):
    data: list[DatasetVersionPublic]
    count: int


class RetrainRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    dataset: str | int = Field(
        default="latest", description='"latest", a version number or a dataset digest.'
    )
    replay: float = Field(
        default=DEFAULT_REPLAY, description="Share (0-1) of the earlier versions' training "
        "examples mixed into the new ones.",
    )  # fmt: skip
    params: dict[str, Any] = Field(
        default_factory=dict, description="Job parameters: hyperparams, options, eval_limit..."
    )
    promotion: dict[str, Any] | None = Field(
        default=None, description="This retrain's promotion gate: task_tolerance and "
        "max_other_drop (points), overriding the stream's.",
    )  # fmt: skip


def _public(v: DatasetVersion) -> dict[str, Any]:
    d = v.dataset
    return {"version": v.version, "digest": d.digest, "examples": d.num_train,
            "test_examples": d.num_test, "labels": list(d.labels) if d.labels else None,
            "created_at": v.created_at}  # fmt: skip


@router.post("/datasets", status_code=201, response_model=DatasetVersionPublic)
def add_dataset(
    stream: StreamDep,
    task: str,
    inst: InstDep,
    _: WriteToken,
    response: Response,
    train: Annotated[UploadFile, File(description="The training examples.")],
    format: Annotated[str, Form(description="jsonl, cl_benchmark or auto (the default)")] = AUTO,
    test: Annotated[UploadFile | None, File(description="Test examples (optional).")] = None,
    labels: Annotated[str | None, Form(description="JSON list of the labels")] = None,
    holdout: Annotated[
        float | None,
        Form(
            description="Test fraction held out of train when no test file is given (default 0.1)"
        ),
    ] = None,
) -> object:
    """Add a version of the task's data, checked as a task submission is (201). The same
    content as the newest version is that version (200): nothing new is stored."""
    format, data = read_upload(inst, task, format, train, test, labels, holdout)
    version, created = add_dataset_version(
        inst, stream=stream, task_name=task, data=data, format=format
    )
    if not created:
        response.status_code = 200
    return _public(version)


@router.get("/datasets", response_model=DatasetVersionsPublic)
def list_datasets(stream: StreamDep, task: str, inst: InstDep, _: ReadToken) -> object:
    found = inst.registry.tasks.get(stream_id=stream.id, name=task)
    versions = [_public(v) for v in inst.registry.tasks.list_versions(found.id)]
    return {"data": versions, "count": len(versions)}


@router.post("/retrain", status_code=202, response_model=JobPublic)
def retrain(
    stream: StreamDep,
    task: str,
    body: RetrainRequest,
    inst: InstDep,
    dispatcher: DispatcherDep,
    _token: WriteToken,
) -> object:
    """Queue a retrain of the task on one of its dataset versions (default the newest), after
    the stream's earlier jobs: it publishes the task's next adapter version."""
    params = dict(body.params)
    if body.promotion is not None:
        params["promotion"] = check_gate(body.promotion, field_prefix="promotion.")
    *_, job = retrain_task(
        inst, stream=stream, task_name=task, dataset=body.dataset, replay=body.replay,
        params=params,
    )  # fmt: skip
    enqueue(inst, dispatcher, job)
    return inst.registry.jobs.get(job.id)

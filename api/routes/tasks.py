"""Tasks: submit a dataset to a stream (202 with the queued training job), list them."""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, UploadFile

from api.deps import DispatcherDep, InstDep, ReadToken, StreamDep, WriteToken
from api.errors import ProblemError
from api.schemas import TasksPublic, TaskSubmitted
from registry.instance import Instance
from services.datasets import AUTO, UploadLimits, load_dataset, parse_upload, resolve_format
from services.dispatch import enqueue
from services.streams import submit_existing, submit_task
from services.uploads import NESTED

router = APIRouter(prefix="/streams/{stream}/tasks", tags=["tasks"])


@router.post("", status_code=202, response_model=TaskSubmitted)
def submit(
    stream: StreamDep,
    inst: InstDep,
    dispatcher: DispatcherDep,
    _: WriteToken,
    name: Annotated[str, Form(description="The task's name in the stream.")],
    format: Annotated[
        str,
        Form(
            description="jsonl ({prompt, completion} lines), cl_benchmark (a JSON list of "
            "{sentence, label}), or auto (the default: told by the train file's first "
            "character)"
        ),
    ] = AUTO,
    train: Annotated[UploadFile | None, File(description="The training examples.")] = None,
    test: Annotated[UploadFile | None, File(description="Test examples (optional).")] = None,
    labels: Annotated[str | None, Form(description="JSON list of the labels")] = None,
    holdout: Annotated[
        float | None,
        Form(
            description="Test fraction held out of train when no test file is given (default 0.1)"
        ),
    ] = None,
    params: Annotated[str | None, Form(description="JSON object: method, hyperparams...")] = None,
    dataset: Annotated[
        str | None, Form(description="Digest of a stored dataset to reuse instead of uploading one")
    ] = None,
) -> object:
    """Queue a task: its training job runs after the stream's earlier jobs, in order."""
    job_params = json_form("params", params, dict) or {}
    if dataset is not None:
        if train is not None or test is not None:
            raise ProblemError(
                422,
                "give a dataset digest or files, not both",
                field="dataset",
                code="invalid_dataset",
            )
        stored = inst.registry.tasks.get_dataset(dataset)
        load_dataset(inst, stored)  # verified against its digest before it is used
        task, job = submit_existing(
            inst, stream=stream, name=name, dataset=stored, params=job_params
        )
    else:
        if train is None:
            raise ProblemError(
                422, "upload a train file or name a dataset", field="train", code="invalid_dataset"
            )
        format, data = read_upload(inst, name, format, train, test, labels, holdout)
        task, job = submit_task(
            inst, stream=stream, name=name, data=data, format=format, params=job_params
        )
    enqueue(inst, dispatcher, job)  # after commit; the reconciler covers a lost send
    return {"task": task, "job": inst.registry.jobs.get(job.id)}


@router.get("", response_model=TasksPublic)
def list_tasks(stream: StreamDep, inst: InstDep, _: ReadToken) -> object:
    tasks = inst.registry.tasks.list_tasks(stream.id)
    return {"data": tasks, "count": len(tasks)}


def read_upload(
    inst: Instance,
    name: str,
    format: str,
    train: UploadFile,
    test: UploadFile | None,
    labels: str | None,
    holdout: float | None,
) -> tuple[str, Any]:  # (str, continual.data.TaskData)
    """A multipart task upload (its format told from the train file unless given), read as it
    streams from the spooled files under the instance's limits; (the format, the task)."""
    settings = inst.settings
    format = resolve_format(format, train.file)
    data = parse_upload(
        name=name,
        format=format,
        train=train.file,  # read as it streams from the spooled file, never whole
        test=test.file if test is not None else None,
        labels=json_form("labels", labels, list),
        holdout=holdout,
        limits=UploadLimits(
            max_examples=settings.max_examples,
            max_line_bytes=settings.max_line_bytes,
            max_expanded_bytes=settings.max_expanded_bytes,
        ),
    )
    return format, data


def json_form(field: str, raw: str | None, kind: type) -> Any:
    if raw is None or raw == "":
        return None
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ProblemError(
            422, f"invalid JSON: {exc.msg}", field=field, code="invalid_request"
        ) from exc
    except RecursionError:  # json's parser recurses once per nesting level
        raise ProblemError(422, NESTED, field=field, code="invalid_request") from None
    if not isinstance(value, kind):
        what = "an object" if kind is dict else "a list"
        raise ProblemError(422, f"must be {what}", field=field, code="invalid_request")
    return value

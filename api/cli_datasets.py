"""`strata datasets add | list`, `strata retrain` and `strata evaluate`: a task's dataset
versions, retraining it on one of them, and evaluating a stream's current state, from a terminal
(STRATA_URL, STRATA_TOKEN)."""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path
from typing import Any

from api.cli_client import _run, connection_options, upload_format_argument, watch
from api.client import StrataClient


def datasets_add(c: StrataClient, a: argparse.Namespace) -> int:
    data: dict[str, str] = {"format": a.format}
    if a.labels:
        data["labels"] = json.dumps(json.loads(Path(a.labels).read_text()))
    with contextlib.ExitStack() as stack:
        files = {
            field: (Path(path).name, stack.enter_context(Path(path).open("rb")))
            for field, path in (("train", a.train), ("test", a.test))
            if path is not None
        }
        v: dict[str, Any] = c.request(
            "POST", f"/streams/{a.stream}/tasks/{a.task}/datasets", data=data, files=files
        )
    print(f"{a.task} dataset v{v['version']}: {v['examples']} training and {v['test_examples']} "
          f"test examples ({v['digest'][:12]})")  # fmt: skip
    return 0


def datasets_list(c: StrataClient, a: argparse.Namespace) -> int:
    for v in c.request("GET", f"/streams/{a.stream}/tasks/{a.task}/datasets")["data"]:
        print(f"v{v['version']:<4} {v['digest'][:12]}  {v['examples']:>7} train  "
              f"{v['test_examples']:>6} test  {v['created_at']}")  # fmt: skip
    return 0


def retrain(c: StrataClient, a: argparse.Namespace) -> int:
    dataset: str | int = int(a.dataset) if a.dataset.isdigit() else a.dataset
    body = {"dataset": dataset, "replay": a.replay}
    job = c.request("POST", f"/streams/{a.stream}/tasks/{a.task}/retrain", json=body)
    print(f"retrain of {a.task} on dataset v{job['params']['dataset_version']}: "
          f"job {job['id']} queued")  # fmt: skip
    return watch(c, job["id"]) if a.watch else 0


def evaluate(c: StrataClient, a: argparse.Namespace) -> int:
    job = c.request("POST", f"/streams/{a.stream}/evaluate", json={"eval_limit": a.eval_limit})
    print(f"evaluation of {a.stream}: job {job['id']} queued")
    return watch(c, job["id"]) if a.watch else 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    common = connection_options()
    group = sub.add_parser("datasets", help="a task's dataset versions: add new data, list them")
    actions = group.add_subparsers(dest="action", required=True)
    p = actions.add_parser("add", parents=[common], help="upload the task's next dataset version")
    p.set_defaults(func=lambda args: _run(datasets_add, args))
    p.add_argument("stream")
    p.add_argument("task")
    p.add_argument("--train", type=Path, required=True)
    p.add_argument("--test", type=Path)
    upload_format_argument(p)
    p.add_argument("--labels", help="a labels.json file")
    p = actions.add_parser("list", parents=[common], help="the task's dataset versions")
    p.set_defaults(func=lambda args: _run(datasets_list, args))
    p.add_argument("stream")
    p.add_argument("task")
    p = sub.add_parser("retrain", parents=[common],
                       help="retrain a task on one of its dataset versions")  # fmt: skip
    p.set_defaults(func=lambda args: _run(retrain, args))
    p.add_argument("stream")
    p.add_argument("task")
    p.add_argument("--dataset", default="latest",
                   help="latest (default), a version number or a dataset digest")  # fmt: skip
    p.add_argument(
        "--replay",
        type=float,
        default=0.0,
        help="share (0-1) of the earlier versions' examples mixed in (default 0)",
    )
    p.add_argument("--watch", action="store_true", help="follow the job with a progress bar")
    p = sub.add_parser("evaluate", parents=[common],
                       help="evaluate the stream's current state on every task")  # fmt: skip
    p.set_defaults(func=lambda args: _run(evaluate, args))
    p.add_argument("stream")
    p.add_argument("--eval-limit", type=int, default=200,
                   help="test examples per task (default 200)")  # fmt: skip
    p.add_argument("--watch", action="store_true", help="follow the job with a progress bar")

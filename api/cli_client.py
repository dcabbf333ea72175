"""`strata streams | tasks | jobs | adapters | lineage | evaluations | predict | schedules`:
the REST API from a terminal (STRATA_URL, STRATA_TOKEN)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from api import progress
from api.cli_views import (
    _show,
    adapters_alias,
    adapters_download,
    adapters_list,
    evaluations,
    lineage,
    predict,
    snapshots_download,
)
from api.client import DEFAULT_URL, StrataClient
from api.pairs import parse_pairs
from registry.entities import NodeKind
from registry.errors import InvalidValue
from services.options import METHODS, options_help
from services.policy import DEFAULT_DISTILL_STEPS

Command = Callable[[StrataClient, argparse.Namespace], int]


def _client(args: argparse.Namespace) -> StrataClient:
    return StrataClient(args.url, token=args.token)


def _base(spec: str) -> dict[str, Any]:
    """tiny, smollm2, hf:DIR, gguf:FILE."""
    kind, _, path = spec.partition(":")
    return {"kind": kind, "path": path} if path else {"kind": kind}


def _sets(pairs: list[str], flag: str = "--set") -> dict[str, Any]:
    return parse_pairs(pairs, flag=flag)


# -- streams and tasks ---------------------------------------------------------------------------
MAX_DROP_HELP = "accuracy points any task may lose to a fold that is not exact (am-lora); default 2"
DISTILL_HELP = (
    f"steps of distillation that correct a fold that is not exact (am-lora); 0: none; "
    f"default {DEFAULT_DISTILL_STEPS}"
)


def streams_create(c: StrataClient, a: argparse.Namespace) -> int:
    body = {
        "name": a.name,
        "base": _base(a.base),
        "method": a.method,
        "hyperparams": _sets(a.set),
        "method_options": _sets(a.option, "--option"),
        "consolidation": {
            "every_tasks": a.every_tasks,
            "max_drop": a.max_drop,
            "distill_steps": a.distill_steps,
        },
    }
    made = c.request("POST", "/streams", json=body)
    _show(made)  # the stream is importing: its job stores the base model as snapshot v0
    return 0 if a.no_wait else watch(c, made["job"]["id"])


def streams_list(c: StrataClient, _a: argparse.Namespace) -> int:
    for s in c.pages("/streams"):
        state = "" if s.get("state", "ready") == "ready" else f" ({s['state']})"
        print(f"{s['name']:<24} {s['method']:<10} base {s['base_source'].get('kind')}{state}")
    return 0


def streams_show(c: StrataClient, a: argparse.Namespace) -> int:
    _show(c.request("GET", f"/streams/{a.name}"))
    return 0


def streams_policy(c: StrataClient, a: argparse.Namespace) -> int:
    keys = ("every_tasks", "max_adapters", "max_rank", "max_drop", "distill_steps")
    body = {k: getattr(a, k) for k in keys}
    s = c.request("PUT", f"/streams/{a.name}/consolidation", json=body)
    print(f"{s['name']}: consolidation policy {s['consolidation'] or 'off'}")
    return 0


def streams_consolidate(c: StrataClient, a: argparse.Namespace) -> int:
    body = {k: getattr(a, k) for k in ("max_drop", "distill_steps") if getattr(a, k) is not None}
    job = c.request("POST", f"/streams/{a.name}/consolidate", json=body)
    print(f"consolidation job {job['id']} queued")
    return watch(c, job["id"]) if a.watch else 0


def snapshots_list(c: StrataClient, a: argparse.Namespace) -> int:
    for s in c.request("GET", f"/streams/{a.stream}/snapshots")["data"]:
        folded = (
            f" folds {len(s['folded_adapter_ids'])} adapters" if s["folded_adapter_ids"] else ""
        )
        print(
            f"v{s['version']:<3} {s['artifact_digest'][:12]}{folded}"
            + (" (current)" if s["current"] else "")
        )
    return 0


def snapshots_activate(c: StrataClient, a: argparse.Namespace) -> int:
    s = c.request("POST", f"/streams/{a.stream}/snapshots/{a.version}/activate")
    print(f"stream {a.stream} now on snapshot v{s['version']}")
    return 0


def tasks_submit(c: StrataClient, a: argparse.Namespace) -> int:
    params: dict[str, Any] = {}
    if a.method:
        params["method"] = a.method
    if a.set:
        params["hyperparams"] = _sets(a.set)
    labels = json.loads(Path(a.labels).read_text()) if a.labels else None
    out = c.submit_task(
        a.stream,
        name=a.name,
        train=a.train,
        test=a.test,
        format=a.format,
        labels=labels,
        params=params,
        dataset=a.dataset,
    )
    job = out["job"]
    print(f"task {out['task']['position'] + 1}: {out['task']['name']}: job {job['id']} queued")
    return watch(c, job["id"]) if a.watch else 0


def tasks_list(c: StrataClient, a: argparse.Namespace) -> int:
    for t in c.request("GET", f"/streams/{a.stream}/tasks")["data"]:
        print(f"{t['position']:>3}  {t['name']:<24} dataset {t['dataset_digest'][:12]}")
    return 0


# -- jobs ----------------------------------------------------------------------------------------
def jobs_list(c: StrataClient, a: argparse.Namespace) -> int:
    params = {k: v for k, v in (("stream", a.stream), ("state", a.state)) if v}
    for j in c.pages("/jobs", **params):
        print(f"{j['id']:>5}  {j['kind']:<11} {j['state']:<10} {100 * j['progress']:5.1f}%")
    return 0


def jobs_show(c: StrataClient, a: argparse.Namespace) -> int:
    _show(c.request("GET", f"/jobs/{a.id}"))
    return 0


def jobs_cancel(c: StrataClient, a: argparse.Namespace) -> int:
    job = c.request("POST", f"/jobs/{a.id}/cancel")
    print(
        f"job {job['id']}: {job['state']}"
        + (" (stops at its next step)" if job["state"] == "running" else "")
    )
    return 0


def jobs_watch(c: StrataClient, a: argparse.Namespace) -> int:
    return watch(c, a.id)


def watch(c: StrataClient, job_id: int) -> int:
    """A live progress bar from the job's event stream; the exit code says how it ended."""
    bar = progress.bar(
        total=100, desc=f"job {job_id}", unit="%", bar_format="{l_bar}{bar}| {postfix}"
    )
    state = "queued"
    try:
        for event, data in c.job_events(job_id):
            if event == "state":
                state = data["state"]
                bar.update(round(100 * data["progress"]) - bar.n)
                bar.set_description(f"job {job_id} {state}")
            elif event == "job-event":
                metrics = data.get("metrics") or {}
                if "loss" in metrics:
                    bar.set_postfix(
                        step=f"{metrics.get('step')}/{metrics.get('total_steps')}",
                        loss=f"{metrics['loss']:.3f}",
                        eta=f"{metrics.get('eta_s')}s",
                    )
                else:
                    progress.write(f"  {data['message']}")
            elif event == "end":
                state = data["state"]
    finally:
        bar.close()
    print(f"job {job_id} {state}")
    return 0 if state == "succeeded" else 1


# -- schedules -----------------------------------------------------------------------------------
def schedules_create(c: StrataClient, a: argparse.Namespace) -> int:
    body = {
        "kind": a.kind,
        "cron": a.cron,
        "task": a.task,
        "params": _sets(a.set) and {"hyperparams": _sets(a.set)},
    }
    s = c.request("POST", f"/streams/{a.stream}/schedules", json=body)
    print(f"schedule {s['id']}: {s['kind']} '{s['cron']}', next run {s['next_run_at']}")
    return 0


def schedules_list(c: StrataClient, a: argparse.Namespace) -> int:
    for s in c.request("GET", f"/streams/{a.stream}/schedules")["data"]:
        last = s["last_run_at"] or "never"
        when = datetime.fromisoformat(s["next_run_at"]).strftime("%Y-%m-%d %H:%M:%S")
        print(f"{s['id']:>4}  {s['kind']:<11} {s['cron']:<18} next {when}  last {last}")
    return 0


def schedules_delete(c: StrataClient, a: argparse.Namespace) -> int:
    """`schedules delete STREAM ID` (or the older `schedules delete ID`)."""
    *stream, raw = a.target
    if len(stream) > 1 or not raw.isdigit():
        raise InvalidValue("expects STREAM ID (or a schedule id)", field="schedule")
    path = f"/streams/{stream[0]}/schedules/{raw}" if stream else f"/schedules/{raw}"
    c.request("DELETE", path)
    print(f"schedule {raw} deleted")
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> dict[str, Any]:
    """The commands; returns the `streams` and `adapters` groups for `api.cli_admin`'s."""
    common = connection_options()

    def group(name: str, help_: str) -> argparse._SubParsersAction[argparse.ArgumentParser]:
        return sub.add_parser(name, help=help_).add_subparsers(dest="action", required=True)

    def command(parent: Any, name: str, fn: Command, help_: str = "") -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = parent.add_parser(name, parents=[common], help=help_)
        p.set_defaults(func=lambda a: _run(fn, a))
        return p

    streams = group("streams", "create, list and show streams")
    p = command(streams, "create", streams_create)
    p.epilog, p.formatter_class = options_help(), argparse.RawDescriptionHelpFormatter
    p.add_argument("name")
    p.add_argument("--base", default="tiny", help="tiny, smollm2, hf:DIR or gguf:FILE (a path "
                   "under the server's import roots)")  # fmt: skip
    p.add_argument("--method", default="seq-lora", choices=METHODS)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a LoRA or optimiser hyperparameter, e.g. rank=16")  # fmt: skip
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="an option of the method (listed below), e.g. lambda1=0.1")  # fmt: skip
    p.add_argument("--every-tasks", type=int, help="consolidate every N tasks")
    p.add_argument("--max-drop", type=float, help=MAX_DROP_HELP)
    p.add_argument("--distill-steps", type=int, help=DISTILL_HELP)
    p.add_argument("--no-wait", action="store_true", help="do not follow the import job")
    command(streams, "list", streams_list)
    command(streams, "show", streams_show).add_argument("name")
    p = command(streams, "policy", streams_policy, "set the consolidation policy")
    p.add_argument("name")
    p.add_argument("--every-tasks", type=int)
    p.add_argument("--max-adapters", type=int)
    p.add_argument("--max-rank", type=int)
    p.add_argument("--max-drop", type=float, help=MAX_DROP_HELP)
    p.add_argument("--distill-steps", type=int, help=DISTILL_HELP)
    p = command(streams, "consolidate", streams_consolidate, "fold the adapters into a snapshot")
    p.add_argument("name")
    p.add_argument("--max-drop", type=float, help=MAX_DROP_HELP + " (this fold only)")
    p.add_argument("--distill-steps", type=int, help=DISTILL_HELP + " (this fold only)")
    p.add_argument("--watch", action="store_true")

    snapshots = group("snapshots", "list a stream's snapshots; roll back to one")
    command(snapshots, "list", snapshots_list).add_argument("stream")
    p = command(snapshots, "activate", snapshots_activate, "point the stream at a snapshot")
    p.add_argument("stream")
    p.add_argument("version", type=int)
    p = command(snapshots, "download", snapshots_download, "download a snapshot as an archive")
    p.add_argument("stream")
    p.add_argument("version", type=int)
    _archive_arguments(p)

    tasks = group("tasks", "submit a dataset as the stream's next task; list tasks")
    p = command(tasks, "submit", tasks_submit)
    p.add_argument("stream")
    p.add_argument("name")
    p.add_argument("--train", type=Path)
    p.add_argument("--test", type=Path)
    upload_format_argument(p)
    p.add_argument("--labels", help="a labels.json file")
    p.add_argument("--dataset", help="digest of a stored dataset (instead of --train)")
    p.add_argument("--method")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--watch", action="store_true", help="follow the job with a progress bar")
    command(tasks, "list", tasks_list).add_argument("stream")

    jobs = group("jobs", "list, show, watch and cancel jobs")
    p = command(jobs, "list", jobs_list)
    p.add_argument("--stream")
    p.add_argument("--state")
    for name, fn in (("show", jobs_show), ("watch", jobs_watch), ("cancel", jobs_cancel)):
        command(jobs, name, fn).add_argument("id", type=int)

    adapters = group("adapters", "list and download adapters, move aliases")
    p = command(adapters, "list", adapters_list)
    p.add_argument("stream")
    p.add_argument("--task")
    p = command(adapters, "download", adapters_download)
    p.add_argument("stream")
    p.add_argument("task")
    p.add_argument("ref", nargs="?", default="latest", help="version number or alias")
    _archive_arguments(p)
    p = command(adapters, "alias", adapters_alias)
    for arg in ("stream", "task", "alias"):
        p.add_argument(arg)
    p.add_argument("version", type=int, nargs="?")
    p.add_argument("--delete", action="store_true")

    p = command(sub, "lineage", lineage, "ancestors (or descendants) of a node, as a tree: "
                "`adapter STREAM TASK REF`, `snapshot STREAM VERSION`, or KIND ID")  # fmt: skip
    p.add_argument("kind", choices=[k.value for k in NodeKind])
    p.add_argument("node", nargs="+", metavar="NAME",
                   help="adapter: STREAM TASK REF (a version, alias or latest); snapshot: "
                   "STREAM VERSION; any kind: its id (as a lineage graph shows it)")  # fmt: skip
    p.add_argument("--descendants", action="store_true")
    p.add_argument("--depth", type=int, default=100)
    command(sub, "evaluations", evaluations, "the stream's accuracy matrix").add_argument("stream")
    about = "complete or classify inputs with a stream's current state (or a task's version)"
    p = command(sub, "predict", predict, about)
    p.add_argument("stream")
    p.add_argument("inputs", nargs="+")
    p.add_argument("--task", help="use this task's adapter version and prompt template: inputs "
                   "are its {text}, its labels are ranked")  # fmt: skip
    p.add_argument("--version", default="production", help="a version number or alias of --task "
                   "(default production: latest until a version is promoted)")  # fmt: skip
    p.add_argument(
        "--raw",
        action="store_true",
        help="with --task: send the inputs as written, not through its template",
    )
    p.add_argument("--labels", help="comma-separated labels to rank instead of generating "
                   "(with --task: instead of the task's own)")  # fmt: skip
    p.add_argument("--max-new-tokens", type=int, default=16)

    schedules = group("schedules", "cron schedules of retrain / consolidate jobs")
    p = command(schedules, "create", schedules_create)
    p.add_argument("stream")
    p.add_argument("--kind", default="retrain", choices=["retrain", "consolidate"])
    p.add_argument("--cron", required=True)
    p.add_argument("--task")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    command(schedules, "list", schedules_list).add_argument("stream")
    command(schedules, "delete", schedules_delete).add_argument(
        "target", nargs="+", metavar="STREAM ID", help="the stream and the schedule's id"
    )
    return {"streams": streams, "adapters": adapters}


def connection_options() -> argparse.ArgumentParser:
    """--url and --token, the parent of every command that talks to a server."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=os.environ.get("STRATA_URL", DEFAULT_URL),
                        help="the server (STRATA_URL; now %(default)s)")  # fmt: skip
    common.add_argument("--token", default=os.environ.get("STRATA_TOKEN"),
                        help="a bearer token (STRATA_TOKEN; `strata tokens create` or the one "
                        "`strata serve` printed)")  # fmt: skip
    return common


def upload_format_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--format",
        default="auto",
        choices=["auto", "jsonl", "cl_benchmark"],
        help="auto (default): a JSON list is cl_benchmark, JSON Lines is jsonl",
    )


def _archive_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--output", help="the archive's path (default: named after it)")
    p.add_argument("--format", choices=["tar", "tar.gz"], default="tar",
                   help="tar (default, fastest; weights barely compress) or tar.gz")  # fmt: skip


def _run(fn: Command, args: argparse.Namespace) -> int:
    import httpx
    import urllib3

    from api.client import ApiError

    client = _client(args)
    try:
        return fn(client, args)
    except ApiError as exc:
        print(f"error ({exc.status}): {exc}", file=sys.stderr)
        return 2
    except InvalidValue as exc:  # a bad KEY=VALUE pair, before anything was sent
        print(f"error: {exc.field}: {exc}", file=sys.stderr)
        return 2
    except (httpx.HTTPError, urllib3.exceptions.HTTPError) as exc:  # unreachable, or cut short
        print(f"error: {args.url}: {exc}", file=sys.stderr)
        return 2
    finally:
        client.close()

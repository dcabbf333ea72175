"""`strata webhooks`, and the registry's upkeep from a terminal: deleting and restoring streams
and adapter versions, a stream's promotion gate, adapter tags and the search over them
(STRATA_URL, STRATA_TOKEN)."""

from __future__ import annotations

import argparse
from typing import Any

from api.cli_client import Command, _run, _sets, connection_options
from api.cli_views import adapters_list
from api.client import StrataClient


def streams_delete(c: StrataClient, a: argparse.Namespace) -> int:
    gone = c.request("DELETE", f"/streams/{a.name}")
    print(f"stream '{gone['name']}' deleted: its queued jobs are cancelled; "
          f"`strata streams restore {gone['name']}` brings it back within the retention "
          "period (STRATA_RETENTION_DAYS)")  # fmt: skip
    return 0


def streams_restore(c: StrataClient, a: argparse.Namespace) -> int:
    back = c.request("POST", f"/streams/{a.name}/restore")
    print(f"stream '{back['name']}' restored")
    return 0


def streams_promotion(c: StrataClient, a: argparse.Namespace) -> int:
    gate = {k: v for k, v in (("task_tolerance", a.task_tolerance),
                              ("max_other_drop", a.max_other_drop)) if v is not None}  # fmt: skip
    s = c.request("PUT", f"/streams/{a.name}/promotion", json=gate)
    shown = ", ".join(f"{k} {v:g}" for k, v in s["promotion"].items()) or "the defaults"
    print(f"stream '{s['name']}' promotes with {shown} (points of accuracy)")
    return 0


def adapters_delete(c: StrataClient, a: argparse.Namespace) -> int:
    v = c.request("DELETE", f"/streams/{a.stream}/tasks/{a.task}/adapters/{a.version}")
    print(f"{v['task_name']} v{v['version']} deleted (restorable within the retention period)")
    return 0


def adapters_restore(c: StrataClient, a: argparse.Namespace) -> int:
    v = c.request("POST", f"/streams/{a.stream}/tasks/{a.task}/adapters/{a.version}/restore")
    print(f"{v['task_name']} v{v['version']} restored")
    return 0


def adapters_tag(c: StrataClient, a: argparse.Namespace) -> int:
    tags = {k: str(v) for k, v in _sets(a.tags, "TAG").items()}
    v = c.request("PUT", f"/streams/{a.stream}/tasks/{a.task}/adapters/{a.ref}/tags", json=tags)
    shown = ", ".join(f"{k}={t}" for k, t in v["tags"].items()) or "none"
    print(f"{v['task_name']} v{v['version']} tags: {shown}")
    return 0


def webhooks_create(c: StrataClient, a: argparse.Namespace) -> int:
    body = {"url": a.target, "events": a.event, "secret": a.secret}
    hook = c.request("POST", "/webhooks", json=body)
    print(f"webhook {hook['id']}: {', '.join(hook['events'])} -> {hook['url']}")
    return 0


def webhooks_list(c: StrataClient, _a: argparse.Namespace) -> int:
    for hook in c.request("GET", "/webhooks")["data"]:
        print(f"{hook['id']:>4}  {hook['url']:<48} {','.join(hook['events'])}")
    return 0


def webhooks_delete(c: StrataClient, a: argparse.Namespace) -> int:
    c.request("DELETE", f"/webhooks/{a.id}")
    print(f"webhook {a.id} deleted")
    return 0


def webhooks_deliveries(c: StrataClient, a: argparse.Namespace) -> int:
    for d in c.request("GET", f"/webhooks/{a.id}/deliveries")["data"]:
        answer = d["last_status"] or d["last_error"] or ""
        print(f"{d['id']:>5}  {d['event']:<18} {d['state']:<9} {d['attempts']:>2} tries  "
              f"{answer}")  # fmt: skip
    return 0


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    groups: dict[str, argparse._SubParsersAction[argparse.ArgumentParser]],
) -> None:
    common = connection_options()

    def command(parent: Any, name: str, fn: Command, help_: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = parent.add_parser(name, parents=[common], help=help_)
        p.set_defaults(func=lambda a: _run(fn, a))
        return p

    streams, adapters = groups["streams"], groups["adapters"]
    command(streams, "delete", streams_delete, "soft-delete a stream").add_argument("name")
    command(streams, "restore", streams_restore, "bring a deleted stream back").add_argument("name")
    p = command(streams, "promotion", streams_promotion, "set the stream's promotion gate")
    p.add_argument("name")
    p.add_argument("--task-tolerance", type=float, help="points a new version may score below "
                   "production on its own task (default 1)")  # fmt: skip
    p.add_argument("--max-other-drop", type=float,
                   help="points any other task may lose (default 2)")  # fmt: skip
    for name, fn, about in (
        ("delete", adapters_delete, "soft-delete an adapter version"),
        ("restore", adapters_restore, "bring a deleted version back"),
    ):
        p = command(adapters, name, fn, about)
        p.add_argument("stream")
        p.add_argument("task")
        p.add_argument("version", type=int)
    p = command(adapters, "tag", adapters_tag, "replace a version's tags (none: clear them)")
    p.add_argument("stream")
    p.add_argument("task")
    p.add_argument("ref", help="version number or alias")
    p.add_argument("tags", nargs="*", metavar="KEY=VALUE")
    listing = adapters.choices["list"]  # `adapters list` searches too
    listing.add_argument("--tag", action="append", metavar="KEY:VALUE",
                         help="only versions with this tag (repeatable: every one)")  # fmt: skip
    listing.add_argument("--min-accuracy", type=float, metavar="A",
                         help="only versions whose own accuracy (0-1) is at least A")  # fmt: skip
    listing.add_argument("--order-by", choices=["id", "accuracy"], default="id")
    listing.set_defaults(func=lambda a: _run(adapters_list, a))

    hooks = sub.add_parser("webhooks", help="POST events to other systems (admin scope)")
    actions = hooks.add_subparsers(dest="action", required=True)
    p = command(actions, "create", webhooks_create, "subscribe a URL to events")
    p.add_argument("target", metavar="URL", help="http(s) URL that receives the POSTs")
    p.add_argument("--event", action="append", required=True,
                   help="job.finished, adapter.promoted, adapter.refused or snapshot.created "
                   "(repeatable)")  # fmt: skip
    p.add_argument("--secret", required=True, help="16-256 characters; X-Strata-Signature "
                   "is its HMAC-SHA256 of each body")  # fmt: skip
    command(actions, "list", webhooks_list, "the webhooks")
    command(actions, "delete", webhooks_delete, "stop a webhook").add_argument("id", type=int)
    p = command(actions, "deliveries", webhooks_deliveries, "a webhook's deliveries and tries")
    p.add_argument("id", type=int)

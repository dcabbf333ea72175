"""`strata adapters | snapshots download | lineage | evaluations | predict`: reading what a
stream holds, from a terminal (registered by `api.cli_client`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any
from urllib.parse import quote

from api import progress
from api.client import StrataClient
from api.render import lineage_tree, matrix_report
from registry.entities import (
    EvaluationMatrix,
    LineageEdge,
    LineageGraph,
    LineageNode,
    MeasuredState,
    NodeKind,
    NodeRef,
    Relation,
)
from registry.errors import InvalidValue


def _show(value: Any) -> None:
    print(json.dumps(value, indent=2, default=str))


def adapters_list(c: StrataClient, a: argparse.Namespace) -> int:
    params: dict[str, Any] = {"task": a.task} if a.task else {}
    search = {"tag": getattr(a, "tag", None), "min_accuracy": getattr(a, "min_accuracy", None),
              "order_by": getattr(a, "order_by", "id")}  # fmt: skip
    params |= {k: v for k, v in search.items() if v is not None and v != "id"}
    for v in c.pages(f"/streams/{a.stream}/adapters", **params):
        aliases = ",".join(v["aliases"])
        acc = v["metrics"].get("accuracy")
        print(
            f"{v['task_name']:<20} v{v['version']:<3} {v['method']:<9} {v['status']:<8} "
            f"{'' if acc is None else f'acc {acc:.3f}':<10} {aliases}"
        )
    return 0


def adapters_download(c: StrataClient, a: argparse.Namespace) -> int:
    dest = Path(a.output or f"{a.stream}-{a.task}-{a.ref}.{a.format}")
    _download(c, f"/streams/{a.stream}/tasks/{a.task}/adapters/{a.ref}/download", dest, a.format)
    print(f"wrote {dest} (a PEFT adapter directory: PeftModel.from_pretrained loads it)")
    return 0


def snapshots_download(c: StrataClient, a: argparse.Namespace) -> int:
    dest = Path(a.output or f"{a.stream}-snapshot-v{a.version}.{a.format}")
    _download(c, f"/streams/{a.stream}/snapshots/{a.version}/download", dest, a.format)
    print(f"wrote {dest} (a model directory: AutoModelForCausalLM.from_pretrained loads it)")
    return 0


def _download(c: StrataClient, path: str, dest: Path, format: str) -> None:
    """A byte-counting progress bar; its total is the archive's length when the server sent it
    (always for `tar`)."""
    with progress.bar(desc=dest.name, unit="B", unit_scale=True, unit_divisor=1024) as bar:

        def advance(done: int, total: int | None) -> None:
            bar.total = total
            bar.update(done - bar.n)

        c.download(path, dest, params={"format": format}, progress=advance)


def adapters_alias(c: StrataClient, a: argparse.Namespace) -> int:
    path = f"/streams/{a.stream}/tasks/{a.task}/aliases/{a.alias}"
    if a.delete:
        c.request("DELETE", path)
        print(f"alias {a.alias} deleted")
    else:
        v = c.request("PUT", path, json={"version": a.version})
        print(f"{a.alias} -> {v['task_name']} v{v['version']}")
    return 0


def lineage(c: StrataClient, a: argparse.Namespace) -> int:
    direction = "descendants" if a.descendants else "ancestors"
    params = {"direction": direction, "depth": a.depth}
    print(lineage_tree(graph_of(c.request("GET", lineage_path(a.kind, a.node), params=params))))
    return 0


def lineage_path(kind: str, node: list[str]) -> str:
    """The API path of a node named as `strata lineage` takes it."""
    if kind == "adapter" and len(node) == 3:
        stream, task, ref = (quote(part, safe="") for part in node)
        return f"/streams/{stream}/tasks/{task}/adapters/{ref}/lineage"
    if kind == "snapshot" and len(node) == 2 and node[1].isdigit():
        return f"/streams/{quote(node[0], safe='')}/snapshots/{node[1]}/lineage"
    if len(node) == 1 and node[0].isdigit():
        return f"/lineage/{kind}/{node[0]}"
    usage = {"adapter": "STREAM TASK REF or an id", "snapshot": "STREAM VERSION or an id"}
    raise InvalidValue(f"expects {usage.get(kind, 'an id')}, not {' '.join(node)!r}",
                       field=kind)  # fmt: skip


def graph_of(body: dict[str, Any]) -> LineageGraph:
    def ref(text: str) -> NodeRef:
        kind, _, id_ = text.partition(":")
        return NodeRef(NodeKind(kind), int(id_))

    nodes = tuple(
        LineageNode(
            kind=NodeKind(n["kind"]),
            id=n["id"],
            depth=n["depth"],
            label=n["label"],
            attributes=n["attributes"],
        )
        for n in body["nodes"]
    )
    edges = tuple(
        LineageEdge(
            child=ref(e["child"]), parent=ref(e["parent"]), relation=Relation(e["relation"])
        )
        for e in body["edges"]
    )
    return LineageGraph(
        root=ref(body["root"]), direction=body["direction"], nodes=nodes, edges=edges
    )


def evaluations(c: StrataClient, a: argparse.Namespace) -> int:
    body = c.request("GET", f"/streams/{a.stream}/evaluations")
    states = tuple(
        MeasuredState(
            after_position=st["after_position"], snapshot_version=st["snapshot_version"],
            snapshot_id=-1, adapters=tuple(st["adapters"]), adapter_ids=(), kind=st["kind"],
            job_id=st["job_id"], values=tuple(st["values"]), in_lineage=st["in_lineage"],
            measured_at=st["measured_at"],
        )
        for st in body.get("states", [])
    )  # fmt: skip
    matrix = EvaluationMatrix(
        task_names=tuple(body["task_names"]),
        values=tuple(tuple(r) for r in body["values"]),
        baseline=tuple(body["baseline"]),
        metric=body["metric"],
        states=states,
    )
    print(matrix_report(matrix))
    return 0


def predict(c: StrataClient, a: argparse.Namespace) -> int:
    out = c.predict(
        a.stream, a.inputs, task=a.task, version=a.version, template=not a.raw,
        labels=a.labels.split(",") if a.labels else None, max_new_tokens=a.max_new_tokens,
    )  # fmt: skip
    print(f"snapshot v{out['snapshot_version']} + {', '.join(out['adapters']) or 'no adapters'}")
    if out.get("prompt_template") is not None:
        print(f"prompt template:     {out['prompt_template']!r}")
        print(f"completion template: {out['completion_template']!r}")
    for p in out["predictions"]:
        print(f"> {p['input']!r}" + ("  (cut to max_length)" if p.get("truncated") else ""))
        if p["prompt"] != p["input"]:
            print(f"  prompt: {p['prompt']!r}")
        scores = p.get("scores") or {}
        ranked = ", ".join(f"{label} {score:.3f}" for label, score in
                           sorted(scores.items(), key=lambda kv: -kv[1]))  # fmt: skip
        print(f"  {p['output']}" + (f"  ({ranked})" if ranked else ""))
    return 0

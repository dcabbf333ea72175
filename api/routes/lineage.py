"""Lineage: ancestors and descendants of any snapshot, adapter, dataset or job, as a graph; a
node is named by its kind and id, or an adapter version and a snapshot by the names a user
knows (stream, task, version or alias; stream, snapshot version)."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query

from api.deps import IdPath, InstDep, ReadToken, StreamDep, VersionPath
from api.routes.adapters import resolve_version
from api.schemas import LineageGraphPublic
from registry.entities import NodeKind, NodeRef
from registry.instance import Instance

router = APIRouter(tags=["lineage"])

DirectionQuery = Annotated[Literal["ancestors", "descendants"], Query()]
DepthQuery = Annotated[int, Query(ge=1, le=10_000, description="How many edges to follow")]


@router.get("/lineage/{kind}/{node_id}", response_model=LineageGraphPublic)
def lineage(
    kind: NodeKind,
    node_id: IdPath,
    inst: InstDep,
    _: ReadToken,
    direction: DirectionQuery = "ancestors",
    depth: DepthQuery = 100,
) -> object:
    """E.g. `adapter/7?direction=ancestors`: what adapter 7 was trained on (its base snapshot,
    dataset, earlier adapters, job); `snapshot/3?direction=descendants`: what was built on it.
    Every edge reads `child relation parent` whichever the direction."""
    return _graph(inst, NodeRef(kind, node_id), direction, depth)


@router.get(
    "/streams/{stream}/tasks/{task}/adapters/{ref}/lineage", response_model=LineageGraphPublic
)
def adapter_lineage(
    stream: StreamDep,
    task: str,
    ref: str,
    inst: InstDep,
    _: ReadToken,
    direction: DirectionQuery = "ancestors",
    depth: DepthQuery = 100,
) -> object:
    """The lineage of a task's adapter version (`ref`: a number, an alias or `latest`)."""
    version = resolve_version(inst, stream, task, ref)
    return _graph(inst, NodeRef(NodeKind.ADAPTER, version.id), direction, depth)


@router.get("/streams/{stream}/snapshots/{version}/lineage", response_model=LineageGraphPublic)
def snapshot_lineage(
    stream: StreamDep,
    version: VersionPath,
    inst: InstDep,
    _: ReadToken,
    direction: DirectionQuery = "ancestors",
    depth: DepthQuery = 100,
) -> object:
    """The lineage of the stream's snapshot `version` (v0 is the imported base)."""
    snapshot = inst.registry.streams.get_snapshot(stream_id=stream.id, version=version)
    return _graph(inst, NodeRef(NodeKind.SNAPSHOT, snapshot.id), direction, depth)


def _graph(inst: Instance, node: NodeRef, direction: str, depth: int) -> dict[str, object]:
    store = inst.registry.lineage
    graph = store.ancestors(node, max_depth=depth) if direction == "ancestors" else (
        store.descendants(node, max_depth=depth)
    )  # fmt: skip
    return {
        "root": str(graph.root),
        "direction": graph.direction,
        "nodes": graph.nodes,
        "edges": [
            {"child": str(e.child), "parent": str(e.parent), "relation": e.relation.value}
            for e in graph.edges
        ],
    }

"""Lineage: ancestors and descendants of any snapshot, adapter, dataset or job, as a graph."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query

from api.deps import IdPath, InstDep, ReadToken
from api.schemas import LineageGraphPublic
from registry.entities import NodeKind, NodeRef

router = APIRouter(prefix="/lineage", tags=["lineage"])


@router.get("/{kind}/{node_id}", response_model=LineageGraphPublic)
def lineage(
    kind: NodeKind,
    node_id: IdPath,
    inst: InstDep,
    _: ReadToken,
    direction: Annotated[Literal["ancestors", "descendants"], Query()] = "ancestors",
    depth: Annotated[int, Query(ge=1, le=10_000, description="How many edges to follow")] = 100,
) -> object:
    """E.g. `adapter/7?direction=ancestors`: what adapter 7 was trained on (its base snapshot,
    dataset, earlier adapters, job); `snapshot/3?direction=descendants`: what was built on it."""
    node = NodeRef(kind, node_id)
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

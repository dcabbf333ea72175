"""Lineage queries: ancestors and descendants of any node, each one recursive query."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from registry.entities import (
    LineageEdge,
    LineageGraph,
    LineageNode,
    NodeKind,
    NodeRef,
    Relation,
)
from registry.errors import InvalidValue, NotFound
from registry.store._db import Database
from registry.tables import (
    AdapterVersionRow,
    Base,
    DatasetRow,
    JobRow,
    SnapshotAliasRow,
    SnapshotRow,
    StreamRow,
    TaskRow,
)

MAX_DEPTH = 10_000

# Walk edges, not nodes: each row is an edge reached at some depth, so one query yields both the
# nodes and the edges of the subgraph. `near`/`far` are the edge ends towards and away from root.
_WALK = """
WITH RECURSIVE walk(child_kind, child_id, parent_kind, parent_id, relation, depth) AS (
    SELECT e.child_kind, e.child_id, e.parent_kind, e.parent_id, e.relation, 1
    FROM lineage_edges e
    WHERE e.{near}_kind = :kind AND e.{near}_id = :id
  UNION
    SELECT e.child_kind, e.child_id, e.parent_kind, e.parent_id, e.relation, w.depth + 1
    FROM lineage_edges e
    JOIN walk w ON e.{near}_kind = w.{far}_kind AND e.{near}_id = w.{far}_id
    WHERE w.depth < :max_depth
)
SELECT child_kind, child_id, parent_kind, parent_id, relation, MIN(depth) AS depth
FROM walk
GROUP BY child_kind, child_id, parent_kind, parent_id, relation
"""
ANCESTORS = text(_WALK.format(near="child", far="parent"))
DESCENDANTS = text(_WALK.format(near="parent", far="child"))

_TABLES: dict[NodeKind, type[Base]] = {
    NodeKind.SNAPSHOT: SnapshotRow,
    NodeKind.ADAPTER: AdapterVersionRow,
    NodeKind.DATASET: DatasetRow,
    NodeKind.JOB: JobRow,
}


class SqlLineageStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    def ancestors(self, node: NodeRef, *, max_depth: int = MAX_DEPTH) -> LineageGraph:
        """Everything `node` came from (its parents, their parents, ...)."""
        return self._walk(node, max_depth=max_depth, ancestors=True)

    def descendants(self, node: NodeRef, *, max_depth: int = MAX_DEPTH) -> LineageGraph:
        """Everything built on `node`."""
        return self._walk(node, max_depth=max_depth, ancestors=False)

    def _walk(self, node: NodeRef, *, max_depth: int, ancestors: bool) -> LineageGraph:
        if not 1 <= max_depth <= MAX_DEPTH:
            raise InvalidValue(f"must be between 1 and {MAX_DEPTH}", field="max_depth")
        with self._db.tx() as s:
            if s.get(_TABLES[node.kind], node.id) is None:
                raise NotFound(f"{node.kind.value} {node.id} not found", field="node")
            rows = s.execute(
                ANCESTORS if ancestors else DESCENDANTS,
                {"kind": node.kind.value, "id": node.id, "max_depth": max_depth},
            ).all()
            depths: dict[NodeRef, int] = {node: 0}
            edges = []
            for ck, ci, pk, pi, rel, depth in rows:
                child = NodeRef(NodeKind(ck), int(ci))
                parent = NodeRef(NodeKind(pk), int(pi))
                edges.append(LineageEdge(child=child, parent=parent, relation=Relation(rel)))
                far = parent if ancestors else child
                depths[far] = min(depths.get(far, depth), depth)
            nodes = _describe(s, depths)
        edges.sort(key=lambda e: (str(e.child), str(e.parent), e.relation.value))
        return LineageGraph(
            root=node,
            direction="ancestors" if ancestors else "descendants",
            nodes=tuple(sorted(nodes, key=lambda n: (n.depth, n.kind.value, n.id))),
            edges=tuple(edges),
        )


def _describe(s: Session, depths: dict[NodeRef, int]) -> list[LineageNode]:
    """Attach a human label and a few attributes to every node, one query per kind."""
    by_kind: dict[NodeKind, list[int]] = {}
    for ref_ in depths:
        by_kind.setdefault(ref_.kind, []).append(ref_.id)
    nodes = []
    for kind, ids in by_kind.items():
        for id_, label, attrs in _labels(s, kind, ids):
            nodes.append(LineageNode(kind, id_, depths[NodeRef(kind, id_)], label, attrs))
    return nodes


def _labels(s: Session, kind: NodeKind, ids: list[int]) -> list[tuple[int, str, dict[str, Any]]]:
    if kind is NodeKind.SNAPSHOT:
        snaps = s.execute(
            select(SnapshotRow, StreamRow.name)
            .join(StreamRow, StreamRow.id == SnapshotRow.stream_id)
            .where(SnapshotRow.id.in_(ids))
        ).all()
        current = set(
            s.scalars(
                select(SnapshotAliasRow.snapshot_id).where(
                    SnapshotAliasRow.alias == "current", SnapshotAliasRow.snapshot_id.in_(ids)
                )
            )
        )
        return [
            (
                r.id,
                f"{name} snapshot v{r.version}" + (" (current)" if r.id in current else ""),
                {"stream": name, "version": r.version, "current": r.id in current},
            )
            for r, name in snaps
        ]
    if kind is NodeKind.ADAPTER:
        adapters = s.execute(
            select(AdapterVersionRow, TaskRow.name)
            .join(TaskRow, TaskRow.id == AdapterVersionRow.task_id)
            .where(AdapterVersionRow.id.in_(ids))
        ).all()
        return [
            (
                r.id,
                f"adapter {task} v{r.version} ({r.method}, {r.status})",
                {"task": task, "version": r.version, "method": r.method, "status": r.status},
            )
            for r, task in adapters
        ]
    if kind is NodeKind.DATASET:
        return [
            (r.id, f"dataset {r.digest[:12]}", {"digest": r.digest, "num_train": r.num_train})
            for r in s.scalars(select(DatasetRow).where(DatasetRow.id.in_(ids)))
        ]
    return [
        (r.id, f"{r.kind} job #{r.id} ({r.state})", {"kind": r.kind, "state": r.state})
        for r in s.scalars(select(JobRow).where(JobRow.id.in_(ids)))
    ]

"""Lineage queries: ancestors and descendants of any node, each one recursive query."""

from __future__ import annotations

from typing import Any

from sqlalchemy import BigInteger, ColumnElement, any_, bindparam, select, text
from sqlalchemy.dialects.postgresql import ARRAY
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

# Two steps. The recursive query collects the nodes reachable from the root; its UNION drops a
# node already found, so each node is expanded once however many paths reach it. (Carrying the
# depth in the recursion instead keeps one row per distinct path length: on a stream of
# consolidations, where every snapshot is reached both directly and through the adapter it
# folded, that grows with the square of the chain's length: 23 ms at 50 deep, 68 ms at 100.) The
# outer query returns the edges leaving those nodes, and `_depths` finds each node's shortest
# distance with a breadth-first pass in memory. `near`/`far` are the edge ends towards and away
# from the root.
_WALK = """
WITH RECURSIVE reached(kind, id) AS (
    SELECT CAST(:kind AS VARCHAR(16)), CAST(:id AS BIGINT)
  UNION
    SELECT e.{far}_kind, e.{far}_id
    FROM lineage_edges e
    JOIN reached r ON e.{near}_kind = r.kind AND e.{near}_id = r.id
)
SELECT e.child_kind, e.child_id, e.parent_kind, e.parent_id, e.relation
FROM lineage_edges e
JOIN reached r ON e.{near}_kind = r.kind AND e.{near}_id = r.id
"""
ANCESTORS = text(_WALK.format(near="child", far="parent"))
DESCENDANTS = text(_WALK.format(near="parent", far="child"))

_KINDS = {kind.value: kind for kind in NodeKind}
_RELATIONS = {relation.value: relation for relation in Relation}

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
            result = s.execute(
                ANCESTORS if ancestors else DESCENDANTS, {"kind": node.kind.value, "id": node.id}
            )
            rows: list[Row] = [(ck, int(ci), pk, int(pi), rel) for ck, ci, pk, pi, rel in result]
            depths, kept = _depths((node.kind.value, node.id), rows, max_depth=max_depth,
                                   ancestors=ancestors)  # fmt: skip
            refs = {key: NodeRef(_KINDS[key[0]], key[1]) for key in depths}
            kept.sort()
            edges = [
                LineageEdge(child=refs[ck, ci], parent=refs[pk, pi], relation=_RELATIONS[rel])
                for ck, ci, pk, pi, rel in kept
            ]
            nodes = _describe(s, {refs[key]: depth for key, depth in depths.items()})
        return LineageGraph(
            root=node,
            direction="ancestors" if ancestors else "descendants",
            nodes=tuple(sorted(nodes, key=lambda n: (n.depth, n.kind.value, n.id))),
            edges=tuple(edges),
        )


Key = tuple[str, int]  # (kind, id) of a node: hashed far faster than a NodeRef
Row = tuple[str, int, str, int, str]  # child kind, child id, parent kind, parent id, relation


def _depths(
    root: Key, rows: list[Row], *, max_depth: int, ancestors: bool
) -> tuple[dict[Key, int], list[Row]]:
    """Shortest distance from `root` of every node within `max_depth`, and the edges that leave
    a node closer than `max_depth` (an edge's depth is its far end's distance along it)."""
    leaving: dict[Key, list[Row]] = {}
    for row in rows:
        leaving.setdefault((row[0], row[1]) if ancestors else (row[2], row[3]), []).append(row)
    depths = {root: 0}
    kept: list[Row] = []
    frontier = [root]
    for depth in range(1, max_depth + 1):
        following: list[Key] = []
        for near in frontier:
            for row in leaving.get(near, ()):
                kept.append(row)
                far = (row[2], row[3]) if ancestors else (row[0], row[1])
                if far not in depths:
                    depths[far] = depth
                    following.append(far)
        if not following:
            break
        frontier = following
    return depths, kept


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


def _in(s: Session, column: Any, ids: list[int]) -> ColumnElement[bool]:
    """`column IN ids`; on PostgreSQL as `= ANY(array)`, one parameter however many ids (an
    expanded IN of thousands of parameters costs more to build and parse than to run)."""
    if s.get_bind().dialect.name == "postgresql":
        return column == any_(bindparam(None, list(ids), type_=ARRAY(BigInteger)))
    return column.in_(ids)


def _labels(s: Session, kind: NodeKind, ids: list[int]) -> list[tuple[int, str, dict[str, Any]]]:
    """Only the columns a label needs (plain rows, not ORM objects: a deep graph has thousands)."""
    if kind is NodeKind.SNAPSHOT:
        snaps = s.execute(
            select(SnapshotRow.id, SnapshotRow.version, StreamRow.name)
            .join(StreamRow, StreamRow.id == SnapshotRow.stream_id)
            .where(_in(s, SnapshotRow.id, ids))
        ).all()
        current = set(
            s.scalars(
                select(SnapshotAliasRow.snapshot_id).where(
                    SnapshotAliasRow.alias == "current", _in(s, SnapshotAliasRow.snapshot_id, ids)
                )
            )
        )
        return [
            (
                id_,
                f"{name} snapshot v{version}" + (" (current)" if id_ in current else ""),
                {"stream": name, "version": version, "current": id_ in current},
            )
            for id_, version, name in snaps
        ]
    if kind is NodeKind.ADAPTER:
        adapters = s.execute(
            select(
                AdapterVersionRow.id,
                AdapterVersionRow.version,
                AdapterVersionRow.method,
                AdapterVersionRow.status,
                TaskRow.name,
            )
            .join(TaskRow, TaskRow.id == AdapterVersionRow.task_id)
            .where(_in(s, AdapterVersionRow.id, ids))
        ).all()
        return [
            (
                id_,
                f"adapter {task} v{version} ({method}, {status})",
                {"task": task, "version": version, "method": method, "status": status},
            )
            for id_, version, method, status, task in adapters
        ]
    if kind is NodeKind.DATASET:
        datasets = s.execute(
            select(DatasetRow.id, DatasetRow.digest, DatasetRow.num_train).where(
                _in(s, DatasetRow.id, ids)
            )
        ).all()
        return [
            (id_, f"dataset {digest[:12]}", {"digest": digest, "num_train": num_train})
            for id_, digest, num_train in datasets
        ]
    jobs = s.execute(
        select(JobRow.id, JobRow.kind, JobRow.state).where(_in(s, JobRow.id, ids))
    ).all()
    return [
        (id_, f"{job_kind} job #{id_} ({state})", {"kind": job_kind, "state": state})
        for id_, job_kind, state in jobs
    ]

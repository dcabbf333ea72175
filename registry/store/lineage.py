"""Lineage queries: ancestors and descendants of any node, each one recursive query."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Integer,
    Select,
    String,
    any_,
    bindparam,
    cast,
    false,
    literal,
    null,
    select,
    text,
    union_all,
)
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
        root = (node.kind.value, node.id)
        with self._db.tx() as s:
            result = s.execute(
                ANCESTORS if ancestors else DESCENDANTS, {"kind": node.kind.value, "id": node.id}
            )
            rows: list[Row] = [(ck, int(ci), pk, int(pi), rel) for ck, ci, pk, pi, rel in result]
            depths, kept = _depths(root, rows, max_depth=max_depth, ancestors=ancestors)
            refs = {key: NodeRef(_KINDS[key[0]], key[1]) for key in depths}
            nodes = _describe(s, depths)
        if root not in nodes:  # (a node that exists has a label)
            raise NotFound(f"{node.kind.value} {node.id} not found", field="node")
        kept.sort()
        edges = [
            LineageEdge(child=refs[ck, ci], parent=refs[pk, pi], relation=_RELATIONS[rel])
            for ck, ci, pk, pi, rel in kept
        ]
        return LineageGraph(
            root=node,
            direction="ancestors" if ancestors else "descendants",
            nodes=tuple(sorted(nodes.values(), key=lambda n: (n.depth, n.kind.value, n.id))),
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


def _describe(s: Session, depths: dict[Key, int]) -> dict[Key, LineageNode]:
    """Every node of `depths` that exists, with a human label and a few attributes: one query
    for all kinds (a UNION of one SELECT per kind present)."""
    by_kind: dict[str, list[int]] = {}
    for kind, id_ in depths:
        by_kind.setdefault(kind, []).append(id_)
    parts = [_LABEL_ROWS[kind](s, ids) for kind, ids in sorted(by_kind.items())]
    nodes = {}
    for kind, id_, number, text1, text2, text3, flag in s.execute(union_all(*parts)):
        label, attrs = _LABELS[kind](number, text1, text2, text3, bool(flag), id_)
        nodes[kind, id_] = LineageNode(_KINDS[kind], id_, depths[kind, id_], label, attrs)
    return nodes


def _in(s: Session, column: Any, ids: list[int]) -> ColumnElement[bool]:
    """`column IN ids`; on PostgreSQL as `= ANY(array)`, one parameter however many ids (an
    expanded IN of thousands of parameters costs more to build and parse than to run)."""
    if s.get_bind().dialect.name == "postgresql":
        return column == any_(bindparam(None, list(ids), type_=ARRAY(BigInteger)))
    return column.in_(ids)


# Each kind's label columns in one shape, so that the kinds' SELECTs form one UNION:
# (kind, id, a number, three texts, a flag).
_LabelRows = Select[str, int, int, str, str, str, bool]
_NO_NUMBER = cast(null(), Integer)
_NO_TEXT = cast(null(), String)


def _snapshot_rows(s: Session, ids: list[int]) -> _LabelRows:
    current = select(SnapshotAliasRow.snapshot_id).where(SnapshotAliasRow.alias == "current")
    return (
        select(
            literal("snapshot"),
            SnapshotRow.id,
            SnapshotRow.version,
            StreamRow.name,
            _NO_TEXT,
            _NO_TEXT,
            SnapshotRow.id.in_(current),
        )
        .join(StreamRow, StreamRow.id == SnapshotRow.stream_id)
        .where(_in(s, SnapshotRow.id, ids))
    )


def _adapter_rows(s: Session, ids: list[int]) -> _LabelRows:
    return (
        select(
            literal("adapter"),
            AdapterVersionRow.id,
            AdapterVersionRow.version,
            TaskRow.name,
            AdapterVersionRow.method,
            AdapterVersionRow.status,
            false(),
        )
        .join(TaskRow, TaskRow.id == AdapterVersionRow.task_id)
        .where(_in(s, AdapterVersionRow.id, ids))
    )


def _dataset_rows(s: Session, ids: list[int]) -> _LabelRows:
    return select(literal("dataset"), DatasetRow.id, DatasetRow.num_train, DatasetRow.digest,
                  _NO_TEXT, _NO_TEXT, false()).where(_in(s, DatasetRow.id, ids))  # fmt: skip


def _job_rows(s: Session, ids: list[int]) -> _LabelRows:
    return select(literal("job"), JobRow.id, _NO_NUMBER, JobRow.kind, JobRow.state, _NO_TEXT,
                  false()).where(_in(s, JobRow.id, ids))  # fmt: skip


_LABEL_ROWS: dict[str, Callable[[Session, list[int]], _LabelRows]] = {
    "snapshot": _snapshot_rows,
    "adapter": _adapter_rows,
    "dataset": _dataset_rows,
    "job": _job_rows,
}

Label = tuple[str, dict[str, Any]]


def _snapshot_label(
    version: int, stream: str, _t2: Any, _t3: Any, current: bool, _id: int
) -> Label:
    return (f"{stream} snapshot v{version}" + (" (current)" if current else ""),
            {"stream": stream, "version": version, "current": current})  # fmt: skip


def _adapter_label(version: int, task: str, method: str, status: str, _f: bool, _id: int) -> Label:
    return (f"adapter {task} v{version} ({method}, {status})",
            {"task": task, "version": version, "method": method, "status": status})  # fmt: skip


def _dataset_label(num_train: int, digest: str, _t2: Any, _t3: Any, _f: bool, _id: int) -> Label:
    return f"dataset {digest[:12]}", {"digest": digest, "num_train": num_train}


def _job_label(_n: Any, job_kind: str, state: str, _t3: Any, _f: bool, id_: int) -> Label:
    return f"{job_kind} job #{id_} ({state})", {"kind": job_kind, "state": state}


_LABELS: dict[str, Callable[..., Label]] = {
    "snapshot": _snapshot_label,
    "adapter": _adapter_label,
    "dataset": _dataset_label,
    "job": _job_label,
}

"""The lineage store: ancestors and descendants at their distance, in the same statements for any
graph with every kind labelled, and a long consolidation chain against a reference walk; on
SQLite and PostgreSQL."""

from __future__ import annotations

import pytest
from sqlalchemy import event, select
from sqlalchemy.orm import Session

from registry.entities import NodeKind, NodeRef, Relation
from registry.errors import InvalidValue, NotFound
from registry.store import SqlRegistry
from registry.tables import LineageEdgeRow
from tests.registry.store.helpers import (
    D1,
    D2,
    D3,
    _dataset,
    _stream,
    _trained,
    _two_tasks_then_a_fold,
)


def test_lineage_ancestors_and_descendants(registry: SqlRegistry) -> None:
    v0, ja, va, jb, vb, v1 = _two_tasks_then_a_fold(registry)
    assert v1.folded_adapter_ids == (va.id, vb.id)

    up = registry.lineage.ancestors(NodeRef(NodeKind.ADAPTER, vb.id))
    found = {(n.kind, n.id): n.depth for n in up.nodes}
    assert found[(NodeKind.ADAPTER, vb.id)] == 0
    assert found[(NodeKind.ADAPTER, va.id)] == 1
    assert found[(NodeKind.SNAPSHOT, v0)] == 1
    assert found[(NodeKind.JOB, jb.id)] == 1 and found[(NodeKind.JOB, ja.id)] == 2
    assert (NodeKind.DATASET, va.dataset_id) in found
    assert NodeRef(NodeKind.SNAPSHOT, v1.id) not in {NodeRef(k, i) for k, i in found}

    down = registry.lineage.descendants(NodeRef(NodeKind.ADAPTER, va.id))
    assert {(n.kind, n.id) for n in down.nodes} == {
        (NodeKind.ADAPTER, va.id),
        (NodeKind.ADAPTER, vb.id),
        (NodeKind.SNAPSHOT, v1.id),
    }
    rels = {(e.child.id, e.relation) for e in down.edges}
    assert (v1.id, Relation.FOLDS) in rels and (vb.id, Relation.DEPENDS_ON) in rels

    # "which snapshot folded task a": descendants of its adapter that are snapshots
    folded_by = [n for n in down.nodes if n.kind is NodeKind.SNAPSHOT]
    assert [n.label for n in folded_by] == ["s1 snapshot v1 (current)"]
    assert folded_by[0].attributes["current"] is True

    shallow = registry.lineage.ancestors(NodeRef(NodeKind.SNAPSHOT, v1.id), max_depth=1)
    assert max(n.depth for n in shallow.nodes) == 1
    deep = registry.lineage.ancestors(NodeRef(NodeKind.SNAPSHOT, v1.id))
    assert (NodeKind.JOB, ja.id) in {(n.kind, n.id) for n in deep.nodes}
    with pytest.raises(NotFound):
        registry.lineage.ancestors(NodeRef(NodeKind.ADAPTER, 999))
    with pytest.raises(InvalidValue):
        registry.lineage.descendants(NodeRef(NodeKind.ADAPTER, va.id), max_depth=0)


def test_a_lineage_walk_takes_the_same_statements_for_any_graph_and_labels_every_kind(
    registry: SqlRegistry,
) -> None:
    v0, ja, va, jb, vb, v1 = _two_tasks_then_a_fold(registry)
    lone = _dataset(registry, D3)  # no edge leads to or from it
    statements: list[str] = []

    def count(_conn: object, _cursor: object, statement: str, *_rest: object) -> None:
        if not statement.lstrip().upper().startswith(("BEGIN", "COMMIT", "SELECT 1")):
            statements.append(statement)

    event.listen(registry.engine, "before_cursor_execute", count)
    try:
        sizes = {}
        for name, node in [("whole", NodeRef(NodeKind.SNAPSHOT, v1.id)),
                           ("one edge", NodeRef(NodeKind.JOB, ja.id))]:  # fmt: skip
            statements.clear()
            graph = registry.lineage.ancestors(node)
            sizes[name] = (len(statements), len(graph.nodes))
        statements.clear()
        alone = registry.lineage.descendants(NodeRef(NodeKind.DATASET, lone))
        sizes["alone"] = (len(statements), len(alone.nodes))
    finally:
        event.remove(registry.engine, "before_cursor_execute", count)
    # the walk, then every node's label in one statement, whatever the graph
    assert sizes == {"whole": (2, 7), "one edge": (2, 2), "alone": (2, 1)}, sizes  # 1 dataset
    assert [(n.kind, n.id, n.depth) for n in alone.nodes] == [(NodeKind.DATASET, lone, 0)]
    labels = {(n.kind, n.id): (n.label, n.attributes) for n in graph.nodes}  # ja's ancestors
    assert set(labels) == {(NodeKind.JOB, ja.id), (NodeKind.DATASET, va.dataset_id)}
    whole = registry.lineage.ancestors(NodeRef(NodeKind.SNAPSHOT, v1.id))
    labels = {(n.kind, n.id): (n.label, n.attributes) for n in whole.nodes}
    assert labels[NodeKind.SNAPSHOT, v1.id] == (
        "s1 snapshot v1 (current)",
        {"stream": "s1", "version": 1, "current": True},
    )
    assert labels[NodeKind.SNAPSHOT, v0] == (
        "s1 snapshot v0",
        {"stream": "s1", "version": 0, "current": False},
    )
    assert labels[NodeKind.ADAPTER, vb.id] == (
        "adapter b v1 (seq-lora, ready)",
        {"task": "b", "version": 1, "method": "seq-lora", "status": "ready"},
    )
    assert labels[NodeKind.DATASET, va.dataset_id] == (
        f"dataset {D2[:12]}",
        {"digest": D2, "num_train": 10},
    )
    assert labels[NodeKind.JOB, jb.id] == (
        f"train job #{jb.id} (queued)", {"kind": "train", "state": "queued"})  # fmt: skip
    with pytest.raises(NotFound) as missing:
        registry.lineage.ancestors(NodeRef(NodeKind.JOB, jb.id + 100))
    assert missing.value.field == "node"


def _reference_walk(
    edges: list[tuple[NodeRef, NodeRef, str]], root: NodeRef, *, max_depth: int, up: bool
) -> tuple[dict[NodeRef, int], set[tuple[NodeRef, NodeRef, str]]]:
    """Shortest distances by relaxing every edge until nothing changes (not a BFS)."""
    dist = {root: 0}
    changed = True
    while changed:
        changed = False
        for child, parent, _rel in edges:
            near, far = (child, parent) if up else (parent, child)
            if near in dist and dist[near] + 1 < dist.get(far, max_depth + 1):
                dist[far] = dist[near] + 1
                changed = True
    kept = {
        e
        for e in edges
        if (e[0] if up else e[1]) in dist and dist[e[0] if up else e[1]] < max_depth
    }
    return dist, kept


def test_lineage_of_a_long_consolidation_chain_matches_a_reference_walk(
    registry: SqlRegistry,
) -> None:
    """Every snapshot is reached twice (from its child snapshot and through the adapter the child
    folded), and adapters depend on earlier ones: many paths of different lengths to each node."""
    stream_id, snap = _stream(registry)
    root_snapshot, deps = snap, []
    for k in range(12):
        _task, _job, adapter = _trained(registry, stream_id, snap, f"t{k}", deps=deps[-2:])
        deps.append(adapter.id)
        if k % 3 == 2:  # a consolidation every three tasks
            snap = registry.streams.add_snapshot(
                stream_id=stream_id, artifact_digest=D1, source={}, parent_id=snap,
                folded_adapter_ids=deps[-3:],
            ).id  # fmt: skip
    with Session(registry.engine) as s:  # the reference reads the raw edges
        edges = [
            (NodeRef(NodeKind(r.child_kind), r.child_id),
             NodeRef(NodeKind(r.parent_kind), r.parent_id), r.relation)
            for r in s.scalars(select(LineageEdgeRow))
        ]  # fmt: skip
    newest, oldest = NodeRef(NodeKind.SNAPSHOT, snap), NodeRef(NodeKind.SNAPSHOT, root_snapshot)
    cases = [(newest, True), (oldest, False), (NodeRef(NodeKind.ADAPTER, deps[5]), True),
             (NodeRef(NodeKind.ADAPTER, deps[0]), False)]  # fmt: skip
    for root, up in cases:
        for max_depth in (1, 2, 3, 5, 8, 10_000):
            walk = registry.lineage.ancestors if up else registry.lineage.descendants
            graph = walk(root, max_depth=max_depth)
            dist, kept = _reference_walk(edges, root, max_depth=max_depth, up=up)
            assert {NodeRef(n.kind, n.id): n.depth for n in graph.nodes} == dist
            assert {(e.child, e.parent, e.relation.value) for e in graph.edges} == kept
            assert len(graph.edges) == len(kept)  # no edge twice
    # the whole chain is walked: 5 snapshots, 12 adapters, their 12 jobs and the shared dataset
    assert len(registry.lineage.ancestors(newest).nodes) == 5 + 12 + 12 + 1

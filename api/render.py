"""Plain-text views for the terminal: lineage trees and accuracy matrices."""

from __future__ import annotations

from collections import defaultdict

from registry.entities import EvaluationMatrix, LineageEdge, LineageGraph, NodeRef
from services.evaluations import accuracy_matrix


def lineage_tree(graph: LineageGraph) -> str:
    """Draw a lineage graph as a tree from its root; a node reached twice is drawn once. Up the
    tree (ancestors) a line reads `<relation>: <parent>` of the node above it; down the tree
    (descendants) `<child> ─<relation>→ ↑`, the node above being the parent."""
    labels = {NodeRef(n.kind, n.id): n.label for n in graph.nodes}
    branches: dict[NodeRef, list[LineageEdge]] = defaultdict(list)
    for edge in graph.edges:
        near = edge.child if graph.direction == "ancestors" else edge.parent
        branches[near].append(edge)
    lines = [labels.get(graph.root, str(graph.root))]
    seen = {graph.root}

    def walk(node: NodeRef, indent: str) -> None:
        edges = sorted(branches[node], key=lambda e: (e.relation.value, str(e.parent)))
        for i, edge in enumerate(edges):
            far = edge.parent if graph.direction == "ancestors" else edge.child
            last = i == len(edges) - 1
            again = far in seen
            label = labels.get(far, str(far))
            # an edge reads `child relation parent` both ways: up, the parent follows the
            # relation; down, the child comes first and points at the node it hangs from
            text = (f"{edge.relation.value}: {label}" if graph.direction == "ancestors"
                    else f"{label} ─{edge.relation.value}→ ↑")  # fmt: skip
            lines.append(
                f"{indent}{'└── ' if last else '├── '}{text}"
                + (" (shown above)" if again and branches[far] else "")
            )
            if not again:
                seen.add(far)
                walk(far, indent + ("    " if last else "│   "))

    walk(graph.root, "")
    return "\n".join(lines)


def matrix_report(matrix: EvaluationMatrix) -> str:
    """The accuracy matrix of the tasks learned so far and the summary metrics, then every
    measured state with what it measured (`*`: in the current lineage)."""
    if not matrix.values:
        return "no evaluations yet"
    names = list(matrix.task_names[: len(matrix.values)])
    lines = [accuracy_matrix(matrix).format_table(names), "", "measured states:"]
    for st in matrix.states:
        cells = " ".join("-" if v is None else f"{v:.3f}" for v in st.values)
        where = "base" if st.after_position < 0 else f"after {matrix.task_names[st.after_position]}"
        mark = "*" if st.in_lineage else " "
        lines.append(f"{mark} {st.kind:<11} {where:<20} {st.label:<40} {cells}")
    return "\n".join(lines)

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


def side_by_side(matrices: dict[str, EvaluationMatrix]) -> str:
    """ACC and BWT of several streams over the same tasks, one row per stream (3 decimals, as
    in `matrix_report`)."""
    width = max(len("method"), *(len(name) for name in matrices))
    lines = [f"{'method':<{width}}    ACC     BWT"]
    for name, matrix in matrices.items():
        m = accuracy_matrix(matrix)
        bwt = m.backward_transfer
        lines.append(f"{name:<{width}}  {m.average_accuracy:.3f}  "
                     + ("     -" if bwt is None else f"{bwt:+.3f}"))  # fmt: skip
    return "\n".join(lines)


def bwt_comparison(name: str, matrix: EvaluationMatrix, *, against: str,
                   baseline: EvaluationMatrix) -> str:  # fmt: skip
    """One line on what the difference of backward transfer means, from the values as printed
    (3 decimals): how many accuracy points of the earlier tasks `name` kept that `against` lost,
    or that it did not."""
    ours, theirs = accuracy_matrix(matrix), accuracy_matrix(baseline)
    if ours.backward_transfer is None or theirs.backward_transfer is None:
        return "one task only: there is nothing to forget yet, so no comparison"
    a, b = round(ours.backward_transfer, 3), round(theirs.backward_transfer, 3)
    points = round(100 * (a - b), 1)
    both = f"(BWT {a:+.3f} vs {b:+.3f}; ACC {ours.average_accuracy:.3f} vs " \
           f"{theirs.average_accuracy:.3f})"  # fmt: skip
    if points > 0:
        return (f"{name} kept {points:.1f} points more of the earlier tasks than {against}, on "
                f"average over them, after learning the last one {both}")  # fmt: skip
    if points < 0:
        return (f"{name} did not forget less than {against} here: it lost {-points:.1f} points "
                f"more of the earlier tasks {both}")  # fmt: skip
    return f"{name} and {against} kept the earlier tasks equally well {both}"

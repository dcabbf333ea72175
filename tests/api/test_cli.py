"""`strata demo` as a user runs it, and the text views it prints."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from api.cli import main
from api.render import bwt_comparison, lineage_tree, matrix_report, side_by_side
from registry.entities import (
    EvaluationMatrix,
    LineageEdge,
    LineageGraph,
    LineageNode,
    NodeKind,
    NodeRef,
    Relation,
)


@pytest.mark.slow
def test_strata_demo_prints_both_matrices_and_what_they_mean(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["demo", "--data-dir", str(tmp_path), "--train-size", "96", "--test-size", "24"]
    assert main(args) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "== stream 'demo-seq-lora', seq-lora" in out
    assert "== stream 'demo-composed', composed" in out
    for task in ("sentiment", "topic", "color"):  # a row per task in each matrix
        assert len(re.findall(rf"^after {task} +\| ", out, flags=re.M)) == 2, task
    assert "queued consolidation job" in out and "routed vs folded accuracy per task" in out
    assert re.search(r"the fold after task 2 was (published|refused)", out)
    # the side-by-side table repeats each matrix's own ACC and BWT
    summaries = re.findall(r"^ACC (\d\.\d{3})  BWT ([+-]\d\.\d{3})", out, flags=re.M)
    assert len(summaries) == 2  # both matrices' summary lines
    table = dict(re.findall(r"^(seq-lora|composed) +(\d\.\d{3}  [+-]\d\.\d{3})$", out, re.M))
    assert [tuple(table[m].split()) for m in ("seq-lora", "composed")] == summaries
    (line,) = [x for x in out.splitlines() if x.startswith("composed ") and "seq-lora" in x]
    bwt = {m: float(table[m].split()[1]) for m in table}
    points = round(100 * (bwt["composed"] - bwt["seq-lora"]), 1)
    assert f"(BWT {bwt['composed']:+.3f} vs {bwt['seq-lora']:+.3f};" in line
    if points > 0:
        assert line.startswith(f"composed kept {points:.1f} points more of the earlier tasks")
    elif points < 0:
        assert line.startswith(f"composed did not forget less than seq-lora here: it lost "
                               f"{-points:.1f} points more")  # fmt: skip
    else:
        assert "equally" in line
    assert "lineage of the newest adapter (color v1)" in out
    published = "the fold after task 2 was published" in out
    assert f"trained_on: demo-composed snapshot v{1 if published else 0}" in out
    assert (tmp_path / "registry.db").exists() and (tmp_path / "artifacts").is_dir()
    # not on a terminal (captured): plain progress lines, no redrawn bars, a few KB in all
    assert "\r" not in captured.err and len(out) + len(captured.err) < 16_000
    assert re.search(r"^seq-lora task 1: sentiment: (\d+)/\1 step \(100%\)", captured.err, re.M)
    assert main(args) == 0  # a second run in the same directory uses fresh stream names
    assert "stream 'demo-seq-lora-2'" in capsys.readouterr().out


def test_the_comparison_line_follows_the_numbers() -> None:
    def matrix(rows: list[list[float]]) -> EvaluationMatrix:
        return EvaluationMatrix(task_names=("a", "b"), values=tuple(map(tuple, rows)),
                                baseline=(0.5, 0.5), metric="accuracy")  # fmt: skip

    seq = matrix([[0.9, 0.4], [0.6, 0.9]])  # BWT -0.300
    kept = matrix([[0.9, 0.4], [0.85, 0.9]])  # BWT -0.050
    assert bwt_comparison("composed", kept, against="seq-lora", baseline=seq) == (
        "composed kept 25.0 points more of the earlier tasks than seq-lora, on average over "
        "them, after learning the last one (BWT -0.050 vs -0.300; ACC 0.875 vs 0.750)"
    )
    assert bwt_comparison("composed", seq, against="seq-lora", baseline=kept).startswith(
        "composed did not forget less than seq-lora here: it lost 25.0 points more"
    )
    assert "equally" in bwt_comparison("composed", seq, against="seq-lora", baseline=seq)
    assert side_by_side({"seq-lora": seq, "composed": kept}).splitlines() == [
        "method      ACC     BWT",
        "seq-lora  0.750  -0.300",
        "composed  0.875  -0.050",
    ]


def test_lineage_tree_draws_shared_nodes_once() -> None:
    a, b, s, d = (NodeRef(NodeKind.ADAPTER, 1), NodeRef(NodeKind.ADAPTER, 2),
                  NodeRef(NodeKind.SNAPSHOT, 1), NodeRef(NodeKind.DATASET, 1))  # fmt: skip
    graph = LineageGraph(
        root=b,
        direction="ancestors",
        nodes=(
            LineageNode(NodeKind.ADAPTER, 2, 0, "B"),
            LineageNode(NodeKind.ADAPTER, 1, 1, "A"),
            LineageNode(NodeKind.SNAPSHOT, 1, 1, "S"),
            LineageNode(NodeKind.DATASET, 1, 2, "D"),
        ),
        edges=(
            LineageEdge(b, a, Relation.DEPENDS_ON),
            LineageEdge(b, s, Relation.TRAINED_ON),
            LineageEdge(a, s, Relation.TRAINED_ON),
            LineageEdge(a, d, Relation.TRAINED_WITH),
        ),
    )
    assert lineage_tree(graph).splitlines() == [
        "B",
        "├── depends_on: A",
        "│   ├── trained_on: S",
        "│   └── trained_with: D",
        "└── trained_on: S",
    ]


def test_matrix_report_covers_learned_tasks_only() -> None:
    matrix = EvaluationMatrix(
        task_names=("x", "y", "z"),
        values=((0.9, 0.2, 0.1), (0.7, 0.8, 0.3)),
        baseline=(0.5, 0.4, None),
        metric="accuracy",
    )
    report = matrix_report(matrix)
    assert "after y" in report and " z" not in report.splitlines()[0]
    # ACC = (0.7 + 0.8) / 2, BWT = 0.7 - 0.9, FWT = 0.2 - 0.4
    assert "ACC 0.750  BWT -0.200  FWT -0.200  forgetting +0.200" in report
    empty = EvaluationMatrix(task_names=("x",), values=(), baseline=(None,), metric="accuracy")
    assert matrix_report(empty) == "no evaluations yet"


def test_key_value_pairs_have_one_parser() -> None:
    from api.pairs import parse_pairs
    from registry.errors import InvalidValue

    assert parse_pairs(["rank=8", "lr=1e-3", 'mods=["q_proj"]', "name=plain", "empty="]) == {
        "rank": 8, "lr": 0.001, "mods": ["q_proj"], "name": "plain", "empty": ""}  # fmt: skip
    for bad in ("rank", "=8"):
        with pytest.raises(InvalidValue) as info:
            parse_pairs([bad], flag="--option")
        assert info.value.field == "--option" and "KEY=VALUE" in str(info.value)


def test_a_bad_pair_is_an_error_before_anything_is_sent(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["streams", "create", "s", "--set", "rank", "--url", "http://127.0.0.1:9"]) == 2
    assert "--set: expects KEY=VALUE" in capsys.readouterr().err


def test_sse_is_parsed_as_the_spec_says() -> None:
    from api.client import sse_events

    lines = [": a comment", "id: 7", "event: job-event", 'data: {"a":', "data: 1}", "",
             "event: state", "data: {}", "", "id: 8", "", "event:", "id:", "data", ""]  # fmt: skip
    assert list(sse_events(lines)) == [
        ("7", "job-event", '{"a":\n1}'), (None, "state", "{}"), ("", "message", "")]  # fmt: skip


@pytest.mark.parametrize("prefix", ["", "e-"])
def test_a_cut_event_stream_resumes_with_last_event_id(prefix: str) -> None:
    """The server cuts the stream after two events; the client opens it again with
    Last-Event-ID (the last id as it came, an opaque string) and shows every event once."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from api.client import StrataClient

    seen: list[str | None] = []

    def job_event(i: int) -> str:
        return f"id: {prefix}{i}\nevent: job-event\ndata: {json.dumps({'n': i})}\n\n"

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            seen.append(self.headers.get("Last-Event-ID"))
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            if len(seen) == 1:  # cut: a body shorter than announced, then the socket closes
                body = "".join(job_event(i) for i in (1, 2)).encode()
                self.send_header("Content-Length", str(len(body) + 100))
                self.end_headers()
                self.wfile.write(body)
                self.wfile.flush()
                self.close_connection = True
                return
            body = (job_event(3) + 'event: end\ndata: {"state": "succeeded"}\n\n').encode()
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_a: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        client = StrataClient(f"http://127.0.0.1:{server.server_port}", token="t")
        events = list(client.job_events(1))
    finally:
        server.shutdown()
    assert [d.get("n", d.get("state")) for _, d in events] == [1, 2, 3, "succeeded"]
    assert seen == [None, f"{prefix}2"]


def test_descendant_edges_read_child_relation_parent_too() -> None:
    a, s, d = (NodeRef(NodeKind.ADAPTER, 1), NodeRef(NodeKind.SNAPSHOT, 2),
               NodeRef(NodeKind.DATASET, 1))  # fmt: skip
    graph = LineageGraph(
        root=d,
        direction="descendants",
        nodes=(
            LineageNode(NodeKind.DATASET, 1, 0, "D"),
            LineageNode(NodeKind.ADAPTER, 1, 1, "A"),
            LineageNode(NodeKind.SNAPSHOT, 2, 2, "S"),
        ),
        edges=(LineageEdge(a, d, Relation.TRAINED_WITH), LineageEdge(s, a, Relation.FOLDS)),
    )
    assert lineage_tree(graph).splitlines() == [
        "D",
        "└── A ─trained_with→ ↑",  # A trained_with D
        "    └── S ─folds→ ↑",  # S folds A
    ]

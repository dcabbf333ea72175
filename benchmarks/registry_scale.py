"""The registry at scale on PostgreSQL: lineage and listing latency with 100,000 adapter versions.

    .venv/bin/python benchmarks/registry_scale.py \\
        --url postgresql://postgres@127.0.0.1:5432/strata_bench --reset

Fills a dedicated database (`--reset` drops and re-creates its schema through the migrations:
never point it at a database you use) with `--streams` streams of `--tasks` tasks, each retrained
`--versions` times (1,000 x 20 x 5 = 100,000 adapter versions by default). Every version has the
edges the workers write: trained_on its stream's snapshot, trained_with its dataset, produced_by
its job, and depends_on the newest version of each earlier task of its stream (the adapters
active while it trained). One more stream is a chain of `--chain` consolidations: task k's
adapter trains on snapshot v(k-1), which snapshot v(k) derives from and folds it.

Then measures, `--samples` times each, through the registry's own store methods:

- ancestors of the chain's newest snapshot (the whole chain),
- descendants of the chain's first snapshot (the whole chain),
- ancestors of a random adapter version of a random stream,
- a page (50) of a random stream's adapter versions, and the page after it,

and prints p50/p99 in ms and the PostgreSQL plans (EXPLAIN ANALYZE) of the queries behind them.

`--heap server` first imports what an API process imports, and `--heap server-frozen` also
freezes it as `strata api` does: the walks then run on a server process's heap.

`--floor` also times, side by side with the store's walk, what any implementation must at least
do for the two whole-chain walks, on one raw psycopg connection with prepared statements: the
recursive query alone, and reading the answer without any walk (the edges and every node's label
columns by primary key, what even a design that had stored each node's whole ancestry would read).

`--against REV` also times the two whole-chain walks and a random adapter's ancestors with
`registry/store/lineage.py` as it was at git revision REV, alternating the two versions sample
by sample in this one process (and checking that they give the same graph), and prints both and
their ratio: a before/after measured side by side.

Rows are inserted in bulk with explicit ids (the store's one-row-at-a-time writes would take
hours for this many); the queries are the store's. Not a test.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, Table, func, insert, select, text

from registry.db import migrate
from registry.entities import NodeKind, NodeRef
from registry.store import SqlRegistry, open_registry
from registry.store._db import Database
from registry.store.lineage import ANCESTORS, DESCENDANTS
from registry.tables import (
    AdapterVersionRow,
    DatasetRow,
    JobRow,
    LineageEdgeRow,
    SnapshotAliasRow,
    SnapshotRow,
    StreamRow,
    TaskRow,
)

NOW = datetime(2026, 11, 22, tzinfo=UTC)
BATCH = 20_000


def digest(*parts: object) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()


class Ids:
    """Explicit ids per table, so rows and their edges go in without round trips."""

    def __init__(self) -> None:
        self.next: dict[str, int] = {}

    def __call__(self, table: str) -> int:
        self.next[table] = self.next.get(table, 0) + 1
        return self.next[table]


class Loader:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.rows: dict[Table, list[dict[str, Any]]] = {}
        self.ids = Ids()
        self.count = 0

    def add(self, row_type: Any, **values: Any) -> int:
        table: Table = row_type.__table__
        values.setdefault("id", self.ids(table.name))
        self.rows.setdefault(table, []).append(values)
        self.count += 1
        return int(values["id"])

    def edge(self, child: tuple[str, int], parent: tuple[str, int], relation: str) -> None:
        self.add(LineageEdgeRow, child_kind=child[0], child_id=child[1], parent_kind=parent[0],
                 parent_id=parent[1], relation=relation, created_at=NOW)  # fmt: skip

    def flush(self) -> None:
        """Insert in foreign-key order (the dict keeps the order tables were first used)."""
        with self.engine.begin() as conn:
            for table, rows in self.rows.items():
                for start in range(0, len(rows), BATCH):
                    conn.execute(insert(table), rows[start : start + BATCH])
        self.rows = {table: [] for table in self.rows}


def stream_rows(load: Loader, name: str) -> tuple[int, int]:
    stream = load.add(StreamRow, name=name, base_source={"kind": "tiny"}, method="o-lora",
                      hyperparams={"rank": 8}, method_options={}, consolidation={},
                      created_at=NOW)  # fmt: skip
    snap = load.add(SnapshotRow, stream_id=stream, version=0, artifact_digest=digest(name),
                    source={"kind": "tiny"}, created_at=NOW)  # fmt: skip
    load.add(SnapshotAliasRow, stream_id=stream, alias="current", snapshot_id=snap,
             updated_at=NOW)  # fmt: skip
    return stream, snap


def trained(
    load: Loader, *, stream: int, snapshot: int, name: str, position: int, version: int,
    task: int | None, depends_on: list[int],
) -> tuple[int, int]:  # fmt: skip
    """A task (when `task` is None) and one trained version of it, with all its edges."""
    dataset = load.add(DatasetRow, digest=digest(stream, name, version), format="jsonl",
                       num_train=500, num_test=200, size_bytes=100_000, created_at=NOW)  # fmt: skip
    if task is None:
        task = load.add(TaskRow, stream_id=stream, name=name, position=position,
                        dataset_id=dataset, created_at=NOW)  # fmt: skip
    job = load.add(JobRow, kind="train", state="succeeded", stream_id=stream, task_id=task,
                   params={}, progress=1.0, cancel_requested=False, attempts=1,
                   checkpoint_step=0, created_at=NOW, finished_at=NOW)  # fmt: skip
    load.edge(("job", job), ("dataset", dataset), "uses")
    adapter = load.add(AdapterVersionRow, stream_id=stream, task_id=task, version=version,
                       method="o-lora", hyperparams={"rank": 8}, base_snapshot_id=snapshot,
                       dataset_id=dataset, depends_on=depends_on, job_id=job,
                       metrics={"loss": 0.1}, artifact_digest=digest("a", stream, name, version),
                       status="ready", created_at=NOW)  # fmt: skip
    load.edge(("adapter", adapter), ("snapshot", snapshot), "trained_on")
    load.edge(("adapter", adapter), ("dataset", dataset), "trained_with")
    load.edge(("adapter", adapter), ("job", job), "produced_by")
    for earlier in depends_on:
        load.edge(("adapter", adapter), ("adapter", earlier), "depends_on")
    return task, adapter


def populate(engine: Engine, args: argparse.Namespace) -> dict[str, Any]:
    load = Loader(engine)
    started = time.perf_counter()
    streams: list[int] = []
    for s in range(args.streams):
        stream, snapshot = stream_rows(load, f"stream-{s}")
        streams.append(stream)
        newest: list[int] = []  # each earlier task's newest version
        for t in range(args.tasks):
            task = None
            for v in range(1, args.versions + 1):
                task, adapter = trained(load, stream=stream, snapshot=snapshot, name=f"task-{t}",
                                        position=t, version=v, task=task,
                                        depends_on=list(newest))  # fmt: skip
            newest.append(adapter)
        if load.count >= 200_000:
            load.flush()
            load.count = 0
            print(f"  {s + 1}/{args.streams} streams ({time.perf_counter() - started:.0f} s)")
    chain, first = stream_rows(load, "chain")
    snapshot = first
    for k in range(args.chain):
        _task, adapter = trained(load, stream=chain, snapshot=snapshot, name=f"task-{k}",
                                 position=k, version=1, task=None, depends_on=[])  # fmt: skip
        parent, snapshot = snapshot, load.add(
            SnapshotRow, stream_id=chain, version=k + 1, parent_id=snapshot,
            artifact_digest=digest("chain", k), source={}, created_at=NOW,
        )  # fmt: skip
        load.edge(("snapshot", snapshot), ("snapshot", parent), "derived_from")
        load.edge(("snapshot", snapshot), ("adapter", adapter), "folds")
    load.flush()
    with engine.begin() as conn:  # explicit ids: move the sequences past them
        for table, last in load.ids.next.items():
            conn.execute(text(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), {last})"))
        conn.execute(text("UPDATE snapshot_aliases SET snapshot_id = :s WHERE stream_id = :c"),
                     {"s": snapshot, "c": chain})  # fmt: skip
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        # As autovacuum would in time: without the visibility map, an index-only scan reads
        # every row's table page too.
        conn.execute(text("VACUUM ANALYZE"))
    return {"streams": streams, "chain_first": first, "chain_last": snapshot,
            "seconds": time.perf_counter() - started}  # fmt: skip


def timed(fn: Callable[[], Any], samples: int) -> tuple[float, float, Any]:
    fn()  # warm the connection pool and the caches
    times, result = [], None
    for _ in range(samples):
        start = time.perf_counter()
        result = fn()
        times.append(1000 * (time.perf_counter() - start))
    return *p50_p99(times), result


def p50_p99(times: list[float]) -> tuple[float, float]:
    """The median and the 99th percentile (the sample below which 99% fall) of `times`."""
    ordered = sorted(times)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


def lineage_at(revision: str, registry: SqlRegistry) -> Any:
    """A lineage store built from `registry/store/lineage.py` as it was at git `revision`."""
    source = subprocess.run(
        ["git", "show", f"{revision}:registry/store/lineage.py"],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "lineage_before.py"
        path.write_text(source)
        spec = importlib.util.spec_from_file_location("lineage_before", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # (dataclasses look their module up)
        spec.loader.exec_module(module)
    return module.SqlLineageStore(Database(registry.engine))


def side_by_side(before: Any, after: Any, nodes: Callable[[], NodeRef], *, up: bool,
                 samples: int) -> tuple[tuple[float, float], tuple[float, float]]:  # fmt: skip
    """(p50, p99) ms of `before` and of `after` walking from `nodes()` (one node per sample,
    the same for both), alternating sample by sample (and which of the two goes first, so that
    neither always runs right after the other). Both must give the same graph."""
    walks = [getattr(store, "ancestors" if up else "descendants") for store in (before, after)]
    times: list[list[float]] = [[], []]
    for n in range(samples):
        node, graphs = nodes(), {}
        for k in (0, 1) if n % 2 == 0 else (1, 0):
            start = time.perf_counter()
            graphs[k] = walks[k](node)
            times[k].append(1000 * (time.perf_counter() - start))
        assert graphs[0] == graphs[1], f"the two versions disagree on {node}"
    return p50_p99(times[0]), p50_p99(times[1])


_LABELS = {  # the label columns `registry/store/lineage.py` reads (there in one UNION)
    "snapshot": [
        "SELECT s.id, s.version, st.name FROM snapshots s JOIN streams st ON st.id = s.stream_id"
        " WHERE s.id = ANY(%s)",
        "SELECT snapshot_id FROM snapshot_aliases WHERE alias = 'current'"
        " AND snapshot_id = ANY(%s)",
    ],
    "adapter": [
        "SELECT a.id, a.version, a.method, a.status, t.name FROM adapter_versions a"
        " JOIN tasks t ON t.id = a.task_id WHERE a.id = ANY(%s)"
    ],
    "dataset": ["SELECT id, digest, num_train FROM datasets WHERE id = ANY(%s)"],
    "job": ["SELECT id, kind, state FROM jobs WHERE id = ANY(%s)"],
}


def floors(url: str, node: NodeRef, *, up: bool) -> dict[str, Callable[[], Any]]:
    """The least any implementation of a walk from `node` does, on one raw connection.

    - `query`: the store's recursive query alone, its rows fetched as tuples;
    - `answer`: no walk: the walk's edges (by primary key) and every node's label columns, one
      statement per kind: what is left even where each node's ancestry had been stored.
    """
    import psycopg

    conn = psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://"),
                           autocommit=True)  # fmt: skip
    walk = (ANCESTORS if up else DESCENDANTS).text.replace(":kind", "%(kind)s")
    walk = walk.replace(":id", "%(id)s").replace(  # the outer query: also the edges' keys
        "SELECT e.child_kind, e.child_id, e.parent_kind",
        "SELECT e.id, e.child_kind, e.child_id, e.parent_kind",
    )
    params = {"kind": node.kind.value, "id": node.id}
    rows = conn.execute(walk, params).fetchall()
    edges = [row[0] for row in rows]
    ids: dict[str, set[int]] = {node.kind.value: {node.id}}
    for _edge, child_kind, child_id, parent_kind, parent_id, _relation in rows:
        ids.setdefault(child_kind, set()).add(child_id)
        ids.setdefault(parent_kind, set()).add(parent_id)
    by_kind = {kind: sorted(found) for kind, found in ids.items()}

    def query() -> Any:
        return conn.execute(walk, params, prepare=True).fetchall()

    def answer() -> Any:
        read = [conn.execute("SELECT child_kind, child_id, parent_kind, parent_id, relation "
                             "FROM lineage_edges WHERE id = ANY(%s)", (edges,),
                             prepare=True).fetchall()]  # fmt: skip
        for kind, found in by_kind.items():
            for sql in _LABELS[kind]:
                read.append(conn.execute(sql, (found,), prepare=True).fetchall())
        return read

    return {"query": query, "answer": answer}


def against_floors(walk: Callable[[], Any], floor: dict[str, Callable[[], Any]],
                   samples: int) -> dict[str, tuple[float, float]]:  # fmt: skip
    """p50 and p99 in ms of the store's walk and of each floor, taken in turn sample by sample
    (the order rotating, so that none always runs right after the same one)."""
    fns = {"store": walk, **floor}
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for fn in fns.values():
        fn()
    for n in range(samples):
        for name in names[n % len(names) :] + names[: n % len(names)]:
            start = time.perf_counter()
            fns[name]()
            times[name].append(1000 * (time.perf_counter() - start))
    return {name: p50_p99(ts) for name, ts in times.items()}


def explain(engine: Engine, sql: str, params: dict[str, Any]) -> Iterator[str]:
    with engine.connect() as conn:
        for (line,) in conn.execute(text("EXPLAIN (ANALYZE, BUFFERS) " + sql), params):
            yield line


def server_heap(*, frozen: bool) -> None:
    """Hold what an API process holds from its start (the modules `api.asgi` imports: the app,
    torch, transformers), and with `frozen` leave it out of the collector's passes as
    `api.asgi.service_app` does, so that the walks run on a server's heap."""
    import gc

    import api.asgi  # noqa: F401
    from api.app import freeze_startup_objects

    passes = []
    for _ in range(5):
        started = time.perf_counter()
        gc.collect()
        passes.append(1000 * (time.perf_counter() - started))
    print(f"heap: {len(gc.get_objects()):,} objects in the collector's passes; a full pass "
          f"takes {statistics.median(passes):.0f} ms (median of 5)")  # fmt: skip
    if frozen:
        freeze_startup_objects()
        started = time.perf_counter()
        gc.collect()
        print(f"frozen: {len(gc.get_objects()):,} objects left in the passes; a full pass "
              f"takes {1000 * (time.perf_counter() - started):.0f} ms")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="postgresql://postgres@127.0.0.1:5432/strata_bench")
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--tasks", type=int, default=20)
    parser.add_argument("--versions", type=int, default=5)
    parser.add_argument("--chain", type=int, default=1000)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--reset", action="store_true", help="drop and re-create the schema")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--against", metavar="REV", help="time the walks against lineage.py at REV")
    parser.add_argument(
        "--floor",
        action="store_true",
        help="time the whole-chain walks against the least any walk must do",
    )
    parser.add_argument("--heap", choices=["bare", "server", "server-frozen"], default="bare",
                        help="first import what an API process imports (server), and freeze it "
                        "as `strata api` does (server-frozen)")  # fmt: skip
    args = parser.parse_args()
    if args.heap != "bare":
        server_heap(frozen=args.heap == "server-frozen")
    if not args.url.startswith("postgresql"):
        raise SystemExit("this benchmark measures PostgreSQL: pass a postgresql:// --url")
    registry: SqlRegistry = open_registry(args.url, upgrade=False)
    engine = registry.engine
    if args.reset:
        migrate(engine, "base")
        migrate(engine, "head")
        print(f"populating {args.streams} x {args.tasks} x {args.versions} versions "
              f"and a {args.chain}-deep chain")  # fmt: skip
        filled = populate(engine, args)
        print(f"populated in {filled['seconds']:.0f} s")
    with engine.connect() as conn:
        counts = {t: conn.scalar(text(f"SELECT count(*) FROM {t}"))
                  for t in ("adapter_versions", "lineage_edges", "snapshots", "jobs")}  # fmt: skip
        chain = conn.scalar(select(StreamRow.id).where(StreamRow.name == "chain"))
        first, last = conn.execute(
            select(func.min(SnapshotRow.id), func.max(SnapshotRow.id)).where(
                SnapshotRow.stream_id == chain
            )
        ).one()
        streams = list(conn.scalars(select(StreamRow.id).where(StreamRow.name != "chain")))
        max_adapter = conn.scalar(select(func.max(AdapterVersionRow.id)).where(
            AdapterVersionRow.stream_id != chain))  # fmt: skip
    print("rows:", ", ".join(f"{k} {v:,}" for k, v in counts.items()))
    rng = random.Random(args.seed)
    lineage, adapters = registry.lineage, registry.adapters

    def page_after() -> Any:
        stream = rng.choice(streams)
        first_page = adapters.list_versions(stream_id=stream, limit=50)
        return adapters.list_versions(stream_id=stream, limit=50, after_id=first_page[-1].id)

    cases: list[tuple[str, Callable[[], Any]]] = [
        ("ancestors of the chain's newest snapshot",
         lambda: lineage.ancestors(NodeRef(NodeKind.SNAPSHOT, last))),
        ("descendants of the chain's first snapshot",
         lambda: lineage.descendants(NodeRef(NodeKind.SNAPSHOT, first))),
        ("ancestors of a random adapter version",
         lambda: lineage.ancestors(NodeRef(NodeKind.ADAPTER, rng.randint(1, max_adapter)))),
        ("adapter listing, first page (50)",
         lambda: adapters.list_versions(stream_id=rng.choice(streams), limit=50)),
        ("adapter listing, first and second page", page_after),
    ]  # fmt: skip
    print("\n| query | nodes / rows | p50 (ms) | p99 (ms) |\n|---|---|---|---|")
    for name, fn in cases:
        p50, p99, result = timed(fn, args.samples)
        size = len(result.nodes) if hasattr(result, "nodes") else len(result)
        print(f"| {name} | {size} | {p50:.1f} | {p99:.1f} |")
    if args.against:
        before = lineage_at(args.against, registry)
        print(f"\n| walk, side by side | {args.against} p50 / p99 (ms) | this tree | p50 ratio |")
        print("|---|---|---|---|")
        for name, nodes, up in [
            ("ancestors of the chain's newest snapshot",
             lambda: NodeRef(NodeKind.SNAPSHOT, last), True),
            ("descendants of the chain's first snapshot",
             lambda: NodeRef(NodeKind.SNAPSHOT, first), False),
            ("ancestors of a random adapter version",
             lambda: NodeRef(NodeKind.ADAPTER, rng.randint(1, max_adapter)), True),
        ]:  # fmt: skip
            old, new = side_by_side(before, lineage, nodes, up=up, samples=args.samples)
            print(f"| {name} | {old[0]:.1f} / {old[1]:.1f} | {new[0]:.1f} / {new[1]:.1f} "
                  f"| {new[0] / old[0]:.2f}x |")  # fmt: skip
    if args.floor:
        print(
            "\n| walk | store p50 / p99 (ms) | recursive query alone | the answer's rows, no walk |"
        )
        print("|---|---|---|---|")
        for name, node, up in [
            ("ancestors of the chain's newest snapshot", last, True),
            ("descendants of the chain's first snapshot", first, False),
        ]:
            ref_ = NodeRef(NodeKind.SNAPSHOT, node)
            walk = partial(lineage.ancestors if up else lineage.descendants, ref_)
            got = against_floors(walk, floors(args.url, ref_, up=up), args.samples)
            print(f"| {name} | " + " | ".join(f"{p50:.1f} / {p99:.1f}" for p50, p99 in
                                              got.values()) + " |")  # fmt: skip
    print("\nPlan of the ancestors walk (chain's newest snapshot):")
    for line in explain(engine, ANCESTORS.text, {"kind": "snapshot", "id": last}):
        print("   ", line)
    print("\nPlan of an adapter listing page:")
    listing = ("SELECT * FROM adapter_versions WHERE stream_id = :s AND deleted_at IS NULL "
               "ORDER BY id LIMIT 50")  # fmt: skip
    for line in explain(engine, listing, {"s": streams[len(streams) // 2]}):
        print("   ", line)


if __name__ == "__main__":
    main()

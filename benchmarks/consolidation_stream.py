"""A four-task stream with and without a consolidation after task 2, through the service's job
code on an embedded instance (SQLite + a local artifact directory).

    .venv/bin/python benchmarks/consolidation_stream.py --data ../shared/data/cl_benchmark \\
        --order dbpedia,amazon,agnews,yelp --method o-lora --train-per-task 500 \\
        --eval-per-task 100 --set learning_rate=1e-3 --set batch_size=8 --set epochs=1 \\
        --set max_length=128 --option lambda2=0.01 --out bench-results/fold

Both streams learn the same tasks from the same base (SmolLM2-135M-Instruct by default) with the
same hyperparameters; the second folds its adapters into snapshot v1 after task 2 and learns
tasks 3 and 4 on it (O-LoRA then keeps new adapters orthogonal to the folded tasks through
the snapshot's memory). Prints and writes (results.json, results.md) both accuracy matrices
with ACC / BWT / FWT / forgetting, the fold's logit check, and the bytes the consolidation added
against the size of a full snapshot. Not a test.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from api.pairs import parse_pairs
from continual.data import load_cl_benchmark
from registry.entities import JobKind, JobState
from registry.instance import Instance, open_instance
from registry.settings import StrataSettings
from services.evaluations import accuracy_matrix
from services.streams import submit_task
from workers.runner import run_job
from workers.streams import create_stream

log = logging.getLogger("consolidation_stream")


def learn(
    inst: Instance, args: argparse.Namespace, *, name: str, fold_after: int | None
) -> dict[str, Any]:
    hyper = {"seed": args.seed, **_sets(args.set)}
    base = {"kind": "smollm2"} if args.model == "smollm2" else {"kind": "tiny", "seed": args.seed}
    started = time.perf_counter()
    stream, _ = create_stream(inst, name=name, base=base, method=args.method, hyperparams=hyper,
                              method_options=_sets(args.option))  # fmt: skip
    jobs = []
    for task in args.order.split(","):  # all submitted first: every row measures every task
        data = load_cl_benchmark(args.data, task, train_limit=args.train_per_task,
                                 test_limit=args.eval_per_task, seed=args.seed)  # fmt: skip
        jobs.append(submit_task(inst, stream=stream, name=task, data=data, format="cl_benchmark",
                                params={"eval_limit": args.eval_per_task})[1])  # fmt: skip
    fold: dict[str, Any] = {}
    while (job := inst.registry.jobs.next_in_stream(stream.id)) is not None:
        started_job = time.perf_counter()
        done = run_job(inst, job.id)
        log.info("%s: job %s (%s) %s", name, job.id, job.kind, done.state)
        if done.state is not JobState.SUCCEEDED:
            raise SystemExit(f"{name}: job {job.id} {done.state}: {done.error}")
        if job.kind is JobKind.CONSOLIDATE:
            fold = {"seconds": time.perf_counter() - started_job}
            for event in inst.registry.jobs.events(job.id, limit=1000):
                fold.update(event.metrics or {})
        elif fold_after is not None and job.id == jobs[fold_after - 1].id:
            inst.registry.jobs.create(kind=JobKind.CONSOLIDATE, stream_id=stream.id,
                                      after_job=job.id)  # fmt: skip
    matrix = inst.registry.evaluations.matrix(stream.id)
    learned = accuracy_matrix(matrix)
    return {
        "stream": name,
        "matrix": [list(r) for r in matrix.values],
        "baseline": list(matrix.baseline),
        "average_accuracy": learned.average_accuracy,
        "backward_transfer": learned.backward_transfer,
        "forward_transfer": learned.forward_transfer,
        "forgetting": learned.forgetting,
        "seconds": time.perf_counter() - started,
        "consolidation": fold,
        "table": learned.format_table(list(matrix.task_names)),
    }


def _sets(pairs: list[str]) -> dict[str, Any]:
    return parse_pairs(pairs)


def report(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    order = args.order.replace(",", " -> ")
    head = (f"Order {order}; {args.method}; model {args.model}; {args.train_per_task} train / "
            f"{args.eval_per_task} eval per task; seed {args.seed}.")  # fmt: skip
    lines = [head, ""]
    lines += ["| stream | ACC | BWT | FWT | forgetting | time (s) |", "|---|---|---|---|---|---|"]
    for r in results:
        cells = [
            r["average_accuracy"],
            r["backward_transfer"],
            r["forward_transfer"],
            r["forgetting"],
        ]
        text = " | ".join("n/a" if v is None else f"{100 * v:.1f}" for v in cells)
        lines.append(f"| {r['stream']} | {text} | {r['seconds']:.0f} |")
    for r in results:
        lines += ["", f"{r['stream']}:", "```", r["table"], "```"]
        fold = r["consolidation"]
        if fold:
            full = fold["snapshot_bytes"]
            lines.append(
                f"Consolidation after task 2: max |logit difference| "
                f"{fold['fold_max_abs_logit_diff']:.2e} (tolerance {fold['tolerance']:g}); "
                f"{fold['bytes_added'] / 2**20:.1f} MiB added against a full snapshot of "
                f"{full / 2**20:.1f} MiB ({100 * fold['bytes_added'] / full:.1f}%); "
                f"{fold['seconds']:.0f} s."
            )
            phases = ("load", "fold", "verify", "store")
            if all(f"seconds_{p}" in fold for p in phases):
                lines.append("Of which " + ", ".join(
                    f"{p} {fold[f'seconds_{p}']:.1f} s" for p in phases
                ) + " (the rest re-evaluates every task on the new snapshot).")  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--order", default="dbpedia,amazon,agnews,yelp")
    parser.add_argument("--method", default="o-lora")
    parser.add_argument("--model", default="smollm2", choices=["smollm2", "tiny"])
    parser.add_argument("--train-per-task", type=int, default=250)
    parser.add_argument("--eval-per-task", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fold-after", type=int, default=2)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="an option of the method, e.g. lambda2=0.01")  # fmt: skip
    parser.add_argument("--streams", default="plain,consolidated",
                        help="which streams to learn (plain: no consolidation)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("bench-results/consolidation"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    with tempfile.TemporaryDirectory(prefix="strata-fold-bench-") as tmp:
        inst = open_instance(StrataSettings(data_dir=Path(tmp)))
        folds = {"plain": None, "consolidated": args.fold_after}
        results = [learn(inst, args, name=n, fold_after=folds[n]) for n in args.streams.split(",")]
        inst.close()
    args.out.mkdir(parents=True, exist_ok=True)
    text = report(results, args)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "results.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()

"""`strata demo`: three generated tasks learned on two streams, plain seq-lora and the composed
pipeline, with both accuracy matrices and what their difference means."""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from api import progress
from api.render import bwt_comparison, lineage_tree, matrix_report, side_by_side
from registry.entities import JobKind, JobState, NodeKind, NodeRef
from registry.instance import Instance, open_instance
from registry.settings import StrataSettings

SHOWN_EVENTS = ("evaluated", "published", "failed", "queued consolidation", "folding",
                "routed vs folded", "stream on snapshot")  # fmt: skip
TITLES = {
    "seq-lora": "seq-lora: one adapter trained on every task in turn",
    "composed": "composed: am-lora with task routing and O-LoRA's overlap term, a "
    "consolidation every 2 tasks gated by max_drop",
}


class _DemoProgress:
    """One progress bar per training job, fed by the job's listener; the job's main events as
    lines."""

    def __init__(self) -> None:
        self.bar: progress.Bar | None = None
        self.label = ""

    def job_started(self, _kind: str, payload: dict[str, Any]) -> None:
        self.close()
        who = f"{payload['method']} job #{payload['job_id']}"
        if payload["kind"] == JobKind.TRAIN.value:
            self.label = f"{payload['method']} task {payload['position'] + 1}: {payload['task']}"
            progress.write(f"\n== {who}: learning task {payload['position'] + 1}: "
                           f"{payload['task']}")  # fmt: skip
        else:
            after = f" after task {payload['after_task'] + 1}" if "after_task" in payload else ""
            progress.write(f"\n== {who}: {payload['kind']}{after}")

    def __call__(self, kind: str, payload: dict[str, Any]) -> None:
        if kind == "step":
            if self.bar is None:
                self.bar = progress.bar(total=payload["total_steps"], desc=self.label, unit="step")
            self.bar.set_postfix(
                loss=f"{payload['loss']:.3f}", tok_s=f"{payload['tokens_per_s']:.0f}"
            )
            self.bar.update(payload["step"] - self.bar.n)
        elif kind == "event" and payload["message"].startswith(SHOWN_EVENTS):
            self.close()
            message = payload["message"]
            if message.startswith("failed: folding would drop"):  # its table came just before
                message = "refused" + message.split("\n")[0].removeprefix("failed").rstrip(":")
            progress.write("   " + message.replace("\n", "\n   "))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def cmd_demo(args: argparse.Namespace) -> int:
    from workers.demo import run_demo

    progress.quiet_libraries()
    settings = StrataSettings(data_dir=args.data_dir)
    inst = open_instance(settings)
    started = time.monotonic()
    bars = _DemoProgress()
    where = settings.data_dir.resolve()
    print(f"Strata demo: embedded instance in {where} (SQLite + local artifacts)")
    print("the same three tasks on two streams, each from the tiny base model as snapshot v0",
          flush=True)  # fmt: skip
    runner_log = logging.getLogger("workers.runner")
    level = runner_log.level
    if not args.verbose:  # a fold the gate refuses is part of the demo, said below: no warning
        runner_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
            result = run_demo(
                inst, seed=args.seed, train_size=args.train_size, test_size=args.test_size,
                max_drop=args.max_drop, on_job_start=bars.job_started, listener=bars,
            )  # fmt: skip
    finally:
        runner_log.setLevel(level)
    bars.close()
    reg = inst.registry
    matrices = {}
    for run in result.runs:
        matrices[run.method] = matrix = reg.evaluations.matrix(run.stream.id)
        print(f"\n== stream '{run.stream.name}', {TITLES.get(run.method, run.method)}")
        print("accuracy matrix (row t: after learning task t)")
        print(matrix_report(matrix))
        for after, fold in run.folds:
            code = fold.error.code if fold.error else None
            print(_fold_line(after, fold.state, code, args.max_drop))
    print("\n== side by side (ACC: mean accuracy after the last task; BWT: mean change of the "
          "earlier tasks since each was learned, negative = forgotten)")  # fmt: skip
    print(side_by_side(matrices))
    if {"seq-lora", "composed"} <= set(matrices):
        print(bwt_comparison("composed", matrices["composed"], against="seq-lora",
                             baseline=matrices["seq-lora"]))  # fmt: skip
    _print_lineage(inst, result.runs[-1].stream.id)
    print(f"\ndone in {time.monotonic() - started:.0f} s")
    failed = [j for run in result.runs for j in run.failed]
    for job in failed:
        print(
            f"job #{job.id} {job.state}: {job.error.message if job.error else ''}", file=sys.stderr
        )
    inst.close()
    return 1 if failed else 0


def _fold_line(after: int, state: JobState, code: str | None, max_drop: float) -> str:
    """What became of a consolidation the stream's policy queued after task `after` (0-based)."""
    what = f"the fold after task {after + 1}"
    if state is JobState.SUCCEEDED:
        return f"{what} was published: the stream's later tasks train on the new snapshot"
    if code == "consolidation_regressed":
        return (f"{what} was refused: a folded task would have lost more than {max_drop:g} "
                f"points (max_drop), so the stream went on unfolded, each task routed to its "
                f"adapter (--max-drop 100 shows a fold published)")  # fmt: skip
    return f"{what} ended {state.value}"


def _print_lineage(inst: Instance, stream_id: int) -> None:
    last = inst.registry.adapters.list_versions(stream_id=stream_id)[-1:]
    if last:
        print(f"\n== lineage of the newest adapter ({last[0].task_name} v{last[0].version})")
        print(lineage_tree(inst.registry.lineage.ancestors(NodeRef(NodeKind.ADAPTER, last[0].id))))


def register(sub: Any) -> None:
    demo = sub.add_parser(
        "demo", help="learn three generated tasks with seq-lora and with the composed pipeline, "
        "no servers needed",
    )  # fmt: skip
    demo.add_argument("--data-dir", type=Path, default=Path(".strata/demo"))
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--train-size", type=int, default=256, help="training examples per task")
    demo.add_argument("--test-size", type=int, default=64, help="test examples per task")
    demo.add_argument(
        "--max-drop", type=float, default=2.0,
        help="accuracy points the composed stream's fold may cost a task before it is refused "
        "(default 2, the recommended gate)",
    )  # fmt: skip
    demo.set_defaults(func=cmd_demo)

"""`strata`: the command line."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from api.render import lineage_tree, matrix_report
from registry.entities import JobState, NodeKind, NodeRef
from registry.errors import RegistryError
from registry.instance import open_instance
from registry.settings import StrataSettings


class _DemoProgress:
    """One progress bar per training job, fed by the job's listener."""

    def __init__(self) -> None:
        self.bar: tqdm | None = None
        self.label = ""

    def job_started(self, _kind: str, payload: dict[str, Any]) -> None:
        self.close()
        self.label = f"task {payload['position'] + 1}: {payload['task']}"
        tqdm.write(f"\n== job #{payload['job_id']}: learning {self.label}")

    def __call__(self, kind: str, payload: dict[str, Any]) -> None:
        if kind == "step":
            if self.bar is None:
                self.bar = tqdm(total=payload["total_steps"], desc=self.label, unit="step")
            self.bar.set_postfix(
                loss=f"{payload['loss']:.3f}", tok_s=f"{payload['tokens_per_s']:.0f}"
            )
            self.bar.update(payload["step"] - self.bar.n)
        elif kind == "event" and payload["message"].startswith(
            ("evaluated", "published", "failed")
        ):
            self.close()
            tqdm.write(f"   {payload['message']}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def cmd_demo(args: argparse.Namespace) -> int:
    from transformers.utils import logging as hf_logging

    from workers.demo import run_demo

    hf_logging.disable_progress_bar()  # our own bar is the one that matters
    settings = StrataSettings(data_dir=args.data_dir)
    inst = open_instance(settings)
    started = time.monotonic()
    progress = _DemoProgress()
    where = settings.data_dir.resolve()
    print(f"Strata demo: embedded instance in {where} (SQLite + local artifacts)")
    print("importing the tiny base model as snapshot v0 ...")
    result = run_demo(
        inst, seed=args.seed, train_size=args.train_size, test_size=args.test_size,
        on_job_start=progress.job_started, listener=progress,
    )  # fmt: skip
    progress.close()
    reg = inst.registry
    failed = [j for j in result.jobs if j.state is not JobState.SUCCEEDED]
    print(f"\n== stream '{result.stream.name}': accuracy matrix (row t: after learning task t)")
    print(matrix_report(reg.evaluations.matrix(result.stream.id)))
    last = reg.adapters.list_versions(stream_id=result.stream.id)[-1:]
    if last:
        print(f"\n== lineage of the newest adapter ({last[0].task_name} v{last[0].version})")
        print(lineage_tree(reg.lineage.ancestors(NodeRef(NodeKind.ADAPTER, last[0].id))))
    print(f"\ndone in {time.monotonic() - started:.0f} s")
    for job in failed:
        print(
            f"job #{job.id} {job.state}: {job.error.message if job.error else ''}", file=sys.stderr
        )
    inst.close()
    return 1 if failed else 0


def cmd_migrate(_args: argparse.Namespace) -> int:
    inst = open_instance(StrataSettings(), upgrade=True)
    inst.close()
    print("database schema is at head")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="strata", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="learn three generated tasks in sequence, no servers needed")
    demo.add_argument("--data-dir", type=Path, default=Path(".strata/demo"))
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--train-size", type=int, default=256, help="training examples per task")
    demo.add_argument("--test-size", type=int, default=64, help="test examples per task")
    demo.set_defaults(func=cmd_demo)

    migrate = sub.add_parser("migrate", help="upgrade the database (STRATA_DATABASE_URL) to head")
    migrate.set_defaults(func=cmd_migrate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args))
    except RegistryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())

"""`strata`: the command line."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

from api import cli_admin, cli_client, cli_datasets, cli_demo, cli_service, progress
from api.pairs import parse_pairs
from registry.errors import InvalidValue, RegistryError
from registry.instance import open_instance
from registry.settings import StrataSettings
from services.errors import code_of
from services.policy import DEFAULT_DISTILL_STEPS


class _BenchProgress:
    """A progress bar per (method, task) of a bench run."""

    def __init__(self, consolidate_after: int | None = None) -> None:
        self.bar: progress.Bar | None = None
        self.tasks: dict[str, int] = {}  # tasks begun, per method
        self.consolidate_after = consolidate_after

    def step(self, method: str, step: int, total_steps: int, loss: float) -> None:
        if step == 1:
            if self.bar is not None:
                self.bar.close()
            self.tasks[method] = self.tasks.get(method, 0) + 1
            desc = f"{method} #{self.tasks[method]}"
            self.bar = progress.bar(total=total_steps, desc=desc, unit="step")
        assert self.bar is not None
        self.bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
        self.bar.update(step - self.bar.n)

    def scored(self, method: str, n: int, row_total: int) -> None:
        """An evaluation's progress: one bar per measured row of the accuracy matrix."""
        bar = self.bar
        if bar is None or bar.unit != "example" or bar.total != row_total or bar.n >= row_total:
            if self.bar is not None:
                self.bar.close()
            bar = self.bar = progress.bar(
                total=row_total, desc=f"{method} evaluating", unit="example"
            )
        bar.update(n)

    def distill(self, method: str, step: int, steps: int, kl: float) -> None:
        """A fold's distillation (am-lora): one bar of its steps."""
        if step == 1 or self.bar is None:
            if self.bar is not None:
                self.bar.close()
            self.bar = progress.bar(total=steps, desc=f"{method} fold: distilling", unit="step")
        self.bar.set_postfix(kl=f"{kl:.4f}", refresh=False)
        self.bar.update(step - self.bar.n)

    def row(self, method: str, t: int, row: tuple[float, ...]) -> None:
        """Print each measured row of an accuracy matrix (evaluation takes minutes too)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        where = "untrained base" if t < 0 else f"{method} after task {t + 1}"
        progress.write(f"{where}: " + " ".join(f"{100 * v:.1f}" for v in row))
        if t >= 0 and t + 1 == self.consolidate_after:  # a fold comes next: minutes for am-lora
            progress.write(f"{method}: folding tasks 1-{t + 1} into the base")

    def fold(self, method: str, report: Any) -> None:
        """Print a consolidation's routed and folded accuracy per task as soon as measured."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        state = "published" if report.published else "refused: the stream goes on unfolded"
        after = report.after_task + 1
        progress.write(f"{method} fold after task {after} ({state}):\n{report.table}")


def _parse_options(pairs: list[str]) -> dict[str, dict[str, Any]]:
    """`--option METHOD.KEY=VALUE` pairs grouped by method."""
    out: dict[str, dict[str, Any]] = {}
    for key, value in parse_pairs(pairs, flag="--option").items():
        method, dot, option = key.rpartition(".")
        if not dot or not method or not option:
            raise InvalidValue(f"expects METHOD.KEY=VALUE, got {key!r}", field="--option")
        out.setdefault(method, {})[option] = value
    return out


def cmd_bench(args: argparse.Namespace) -> int:
    from workers.bench import BenchConfig, run_bench, write_reports

    progress.quiet_libraries()
    out = args.out or Path("bench-results") / time.strftime("%Y%m%d-%H%M%S")
    bars = _BenchProgress(consolidate_after=args.consolidate_after)
    try:
        cfg = BenchConfig(
            data=args.data, order=tuple(args.order.split(",")),
            methods=tuple(args.methods.split(",")), model=args.model,
            train_per_task=args.train_per_task, eval_per_task=args.eval_per_task, seed=args.seed,
            device=args.device, hyperparams=parse_pairs(args.set), metric=args.metric,
            options=_parse_options(args.option), consolidate_after=args.consolidate_after,
            max_drop=args.max_drop, distill_steps=args.distill_steps,
        )  # fmt: skip
        results = run_bench(
            cfg, out_dir=out, on_step=bars.step, on_row=bars.row,
            on_fold=bars.fold, on_distill_step=bars.distill,
            on_scored=bars.scored,
            on_result=lambda done: write_reports(cfg, done, out),  # kept if the run is stopped
        )  # fmt: skip
    except Exception as exc:  # the task data's or the settings' fault: said, not traced
        if code_of(exc) is None:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if bars.bar is not None:
        bars.bar.close()
    write_reports(cfg, results, out)
    print((out / "results.md").read_text())
    print(f"results in {out}/ (results.json, results.md, matrix-<method>.png)")
    return 0


def cmd_migrate(_args: argparse.Namespace) -> int:
    inst = open_instance(StrataSettings(), upgrade=True)
    inst.close()
    print("database schema is at head")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="strata", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    cli_demo.register(sub)

    bench = sub.add_parser("bench", help="compare strategies on a CL_Benchmark task sequence")
    bench.add_argument("--data", type=Path, required=True, help="a CL_Benchmark-format folder")
    bench.add_argument("--order", required=True, help="comma-separated task names, in order")
    bench.add_argument(
        "--methods", default="seq-lora",
        help="comma-separated: seq-lora, inc-lora, o-lora, am-lora, composed (am-lora with "
        "prompt routing, initial share 0.9 and O-LoRA's overlap term), multitask",
    )  # fmt: skip
    bench.add_argument("--model", default="tiny", help="tiny, smollm2, a model dir or a .gguf")
    bench.add_argument("--train-per-task", type=int, default=500)
    bench.add_argument("--eval-per-task", type=int, default=200)
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    bench.add_argument("--out", type=Path, help="output folder (default bench-results/<time>)")
    bench.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="a training hyperparameter, e.g. --set learning_rate=1e-3 (repeatable)",
    )  # fmt: skip
    bench.add_argument(
        "--option", action="append", default=[], metavar="METHOD.KEY=VALUE",
        help="a method's option, e.g. --option o-lora.lambda1=0.1 (repeatable)",
    )  # fmt: skip
    bench.add_argument(
        "--metric", default="rank", choices=["rank", "exact"],
        help="rank: rank classification over the labels; exact: exact match of greedy generation",
    )  # fmt: skip
    bench.add_argument(
        "--consolidate-after", type=int, metavar="K",
        help="fold each method's adapters into its base after task K (as a consolidation job "
        "does) and learn the later tasks on the folded base",
    )  # fmt: skip
    bench.add_argument(
        "--max-drop", type=float, default=2.0,
        help="accuracy points a fold that is not exact (am-lora) may cost any task; past it the "
        "fold is refused and the stream goes on unfolded (default 2)",
    )  # fmt: skip
    bench.add_argument(
        "--distill-steps", type=int, default=DEFAULT_DISTILL_STEPS, metavar="N",
        help="steps of distillation that correct a fold that is not exact (am-lora) before it is "
        f"checked; 0: the fitted fold alone (default {DEFAULT_DISTILL_STEPS})",
    )  # fmt: skip
    bench.set_defaults(func=cmd_bench)

    migrate = sub.add_parser("migrate", help="upgrade the database (STRATA_DATABASE_URL) to head")
    migrate.set_defaults(func=cmd_migrate)
    cli_service.register(sub)
    cli_admin.register(sub, cli_client.register(sub))
    cli_datasets.register(sub)
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

"""Consolidation time against its I/O floor: folding adapters into a stored snapshot.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/consolidation_io.py --model smollm2 --repeats 2

An embedded instance (SQLite and a local artifact directory under a temporary folder) imports
the base as snapshot v0, stored per tensor. Each round then builds a LoRA adapter (rank --rank on
--modules, B random so the fold changes every adapted weight), and times, in alternating order:

- **store whole**: what consolidation did before: `store_model` saves the folded model, splits
  it per tensor and stores the tree (every tensor written, read and hashed again; unchanged ones
  are deduplicated only after hashing);
- **store changed**: `store_derived`, what it does now: only the changed tensors are written,
  every other entry is the parent's;
- **fold**: `continual.consolidation.fold_into_base` (fp32 sums of scale * B @ A, in place);
- **load**: `load_snapshot` of v0 (reading every tensor, changed or not).

Before each store the changed tensors are scaled by 1 + 1e-6, so both ways write new bytes
(neither finds the other's blobs). The I/O floor is reading the changed tensors' bytes from
v0's files and writing them once to new files, fsynced as the store does: nothing a
consolidation can avoid. Reported: seconds per phase (best round), and (fold + store changed)
and (load + fold + store changed) against the floor. Not a test.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import peft
import torch
from common import start

from continual.config import LoraHyperparams
from continual.consolidation import fold_into_base, folded_weight_names
from continual.strategies import lora_config
from registry.artifacts import read_manifest
from registry.artifacts.weights import tensor_file
from registry.instance import Instance, open_instance
from registry.settings import StrataSettings
from services.trees import fetch_tree
from workers.models import load_snapshot, store_derived, store_model
from workers.streams import create_stream

logger = logging.getLogger("consolidation_io")

ALL_MODULES = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def embedded(root: Path) -> Instance:
    """The embedded default (SQLite and a local artifact directory) under `root`."""
    return open_instance(StrataSettings(data_dir=root))


def floor_seconds(parent_dir: Path, names: Sequence[str], scratch: Path) -> tuple[float, int]:
    """Read the changed tensors' files of the parent and write their bytes once (fsynced, as
    the store does): no hashing, no staging, no framework."""
    start = time.perf_counter()
    total = 0
    for index, name in enumerate(names):
        data = (parent_dir / tensor_file(name)).read_bytes()
        with (scratch / f"{index}.safetensors").open("wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        total += len(data)
    return time.perf_counter() - start, total


def perturb(model: torch.nn.Module, names: Sequence[str]) -> None:
    """New bytes in every changed tensor, so that no store finds them already stored."""
    with torch.no_grad():
        for name in names:
            model.get_parameter(name).mul_(1.0 + 1e-6)


def one_round(
    inst: Instance, snapshot: Any, args: argparse.Namespace, seed: int
) -> dict[str, float]:
    got: dict[str, float] = {}
    got["load"], (base, _) = timed(lambda: load_snapshot(inst, snapshot))
    hyper = LoraHyperparams(
        rank=args.rank, target_modules=tuple(args.modules.split(",")), seed=seed
    )
    torch.manual_seed(seed)
    model = peft.get_peft_model(base, lora_config(hyper))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.02)
    names = folded_weight_names(model)
    got["fold"], folded = timed(lambda: fold_into_base(model))
    parent_dir = fetch_tree(inst, snapshot.artifact_digest)
    order = ["changed", "whole"] if seed % 2 else ["whole", "changed"]
    for way in order:
        perturb(folded, names)
        if way == "whole":
            got["store whole"], _ = timed(lambda: store_model(inst, folded, parent_dir))
        else:
            got["store changed"], _ = timed(
                lambda: store_derived(inst, folded, parent=snapshot.artifact_digest, changed=names)
            )
    with tempfile.TemporaryDirectory(prefix="floor-") as scratch:
        got["floor"], got["changed bytes"] = floor_seconds(parent_dir, names, Path(scratch))
    files = read_manifest(inst.artifacts, snapshot.artifact_digest)["files"]
    got["snapshot bytes"] = sum(f["size"] for f in files.values())
    return got


def run(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="consolidation-io-") as tmp:
        inst = embedded(Path(tmp))
        source = {"kind": "smollm2"} if args.model == "smollm2" else {"kind": "tiny"}
        logger.info("importing %s as snapshot v0", args.model)
        _, v0 = create_stream(inst, name="io", base=source)
        best: dict[str, float] = {}
        for seed in range(args.repeats):
            got = one_round(inst, v0, args, seed)
            logger.info("round %d: %s", seed, {k: round(v, 2) for k, v in got.items()})
            for key, value in got.items():
                best[key] = min(value, best.get(key, math.inf))
    mib = 2**20
    print(f"snapshot {best['snapshot bytes'] / mib:.1f} MiB, "
          f"changed tensors {best['changed bytes'] / mib:.1f} MiB ({args.modules})")  # fmt: skip
    print("| phase | seconds | vs I/O floor |")
    print("|---|---|---|")
    floor = best["floor"]
    rows = [
        ("I/O floor (read + write the changed tensors)", floor),
        ("load v0", best["load"]),
        ("fold", best["fold"]),
        ("store whole (before)", best["store whole"]),
        ("store changed (now)", best["store changed"]),
        ("fold + store changed", best["fold"] + best["store changed"]),
        ("load + fold + store changed", best["load"] + best["fold"] + best["store changed"]),
        ("load + fold + store whole (before)", best["load"] + best["fold"] + best["store whole"]),
    ]
    for label, seconds in rows:
        print(f"| {label} | {seconds:.2f} | {seconds / floor:.2f}x |")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny", help="tiny or smollm2")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--modules", default=ALL_MODULES, help="comma-separated target modules")
    parser.add_argument("--repeats", type=int, default=2, help="rounds; the best of each counts")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    started = start(args.threads)
    run(args)
    print(f"{time.perf_counter() - started:.0f}s in all")


if __name__ == "__main__":
    main()

"""What the benchmark scripts share. They run as `python benchmarks/NAME.py`, which puts this
folder on the import path, so they import it as `common`."""

from __future__ import annotations

import logging
import time

import torch


def ints(text: str) -> list[int]:
    """An argparse type: "1,4,16" -> [1, 4, 16]."""
    return [int(part) for part in text.split(",") if part]


def start(threads: int | None, *, quiet: tuple[str, ...] = ()) -> float:
    """Log to the terminal (the loggers in `quiet` at warnings only), use `threads` torch CPU
    threads when given, and return the start time for the "in all" line."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in quiet:
        logging.getLogger(name).setLevel(logging.WARNING)
    if threads is not None:
        torch.set_num_threads(threads)
    return time.perf_counter()

"""Progress for the CLI: tqdm bars on a terminal, a few plain lines anywhere else.

Redirected to a file or a pipe, a redrawn bar is a stream of carriage returns (a `make demo`
log was 100 KB of them). `bar(...)` returns a tqdm bar when stderr is a terminal and otherwise
a `PlainBar`, which has the part of tqdm's interface the CLI uses and prints one line when the
bar ends and at most one line per tenth of its total (and no more often than every
`PlainBar.MIN_INTERVAL_S` seconds) on the way.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO, TypeAlias

from tqdm import tqdm


def on_terminal(stream: TextIO | None = None) -> bool:
    """Whether `stream` (default: stderr, where the bars go) is a terminal."""
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def quiet_libraries() -> None:
    """Off a terminal, silence transformers' own bars ("Loading weights")."""
    if not on_terminal():
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


class PlainBar:
    """A progress bar as plain lines on stderr: tqdm's `update`, `set_postfix`,
    `set_description`, `close`, `n`, `total`, `unit`, `desc`."""

    MIN_INTERVAL_S = 5.0  # between two lines before the end

    def __init__(self, *, total: float | None = None, desc: str = "", unit: str = "it") -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.n: float = 0
        self.postfix = ""
        self.closed = False
        self._started = self._last_time = time.monotonic()
        self._last_n: float = 0

    def __enter__(self) -> PlainBar:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def update(self, n: float = 1) -> None:
        self.n += n
        now = time.monotonic()
        if self.total and self.n >= self.total:
            self.close()
        elif self.total and self.n - self._last_n >= self.total / 10:
            if now - self._last_time >= self.MIN_INTERVAL_S:
                self._line(now)
        elif not self.total and now - self._last_time >= 2 * self.MIN_INTERVAL_S:
            self._line(now)

    def set_postfix(self, refresh: bool = True, **values: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def set_description(self, desc: str, refresh: bool = True) -> None:
        self.desc = desc

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._line(time.monotonic())

    def _line(self, now: float) -> None:
        self._last_time, self._last_n = now, self.n
        done = f"{_num(self.n)}/{_num(self.total)}" if self.total else _num(self.n)
        share = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        extra = f", {self.postfix}" if self.postfix else ""
        took = now - self._started
        sys.stdout.flush()  # what was printed before this line stays before it in a shared log
        print(f"{self.desc}: {done} {self.unit}{share}{extra} [{took:.0f} s]", file=sys.stderr)


def _num(value: float) -> str:
    return f"{value:.0f}" if float(value).is_integer() else f"{value:.1f}"


Bar: TypeAlias = "tqdm[Any] | PlainBar"


def bar(*, total: float | None = None, desc: str = "", unit: str = "it", **kwargs: Any) -> Bar:
    """A tqdm bar on a terminal (`kwargs` go to tqdm), a `PlainBar` elsewhere."""
    if on_terminal():
        return tqdm(total=total, desc=desc, unit=unit, **kwargs)
    return PlainBar(total=total, desc=desc, unit=unit)


def write(message: str) -> None:
    """A line to stdout that does not break a live bar."""
    if on_terminal():
        tqdm.write(message)
    else:
        print(message, flush=True)

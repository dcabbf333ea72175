"""Progress bars on a terminal, a few plain lines anywhere else (a redirected log, a pipe)."""

from __future__ import annotations

import io
import re

import pytest
from tqdm import tqdm

from api import progress
from api.cli import _BenchProgress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_off_a_terminal_a_long_bar_is_a_few_plain_lines(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(progress.PlainBar, "MIN_INTERVAL_S", 0.0)  # every tenth may print
    bar = progress.bar(total=1000, desc="task 1: sentiment", unit="step")
    assert isinstance(bar, progress.PlainBar)  # capsys's stderr is not a terminal
    for step in range(1, 1001):
        bar.set_postfix(loss=f"{1 / step:.3f}")
        bar.update(1)
    bar.close()  # already closed at its total: no second last line
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 10, lines  # one per tenth, the last one at the total
    assert lines[-1].startswith("task 1: sentiment: 1000/1000 step (100%), loss=0.001 [")
    assert all(re.fullmatch(r"task 1: sentiment: \d+/1000 step \(\d+%\), loss=\S+ \[\d+ s\]", x)
               for x in lines)  # fmt: skip
    assert "\r" not in err


def test_plain_lines_are_rate_limited_but_the_end_is_always_said(
    capsys: pytest.CaptureFixture[str],
) -> None:
    bar = progress.PlainBar(total=100, desc="evaluating", unit="example")
    for _ in range(100):  # far faster than MIN_INTERVAL_S: only the end is printed
        bar.update(1)
    unknown = progress.PlainBar(desc="archive.tar", unit="B")
    with unknown:
        unknown.update(2048)
    assert capsys.readouterr().err.splitlines() == [
        "evaluating: 100/100 example (100%) [0 s]",
        "archive.tar: 2048 B [0 s]",
    ]


def test_a_terminal_gets_tqdm_bars(monkeypatch: pytest.MonkeyPatch) -> None:
    terminal = _Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    assert progress.on_terminal()
    bar = progress.bar(total=3, desc="x", unit="step", file=terminal)
    assert isinstance(bar, tqdm)
    bar.update(3)
    bar.close()
    assert "\r" in terminal.getvalue()  # redrawn in place
    assert not progress.on_terminal(io.StringIO())


def test_bench_progress_off_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    """What `strata bench` shows when its output goes to a file: each row and fold as lines,
    and each bar's end as one line."""
    bars = _BenchProgress()
    for _task in range(2):
        for step in range(1, 201):
            bars.step("seq-lora", step, 200, 0.5)
    for _ in range(3):
        bars.scored("seq-lora", 8, 24)
    bars.row("seq-lora", 0, (0.5, 0.25))
    captured = capsys.readouterr()
    assert "seq-lora after task 1: 50.0 25.0" in captured.out
    err = captured.err.splitlines()
    assert err[0].startswith("seq-lora #1: 200/200 step (100%), loss=0.500")
    assert err[1].startswith("seq-lora #2: 200/200 step (100%)")
    assert err[2].startswith("seq-lora evaluating: 24/24 example (100%)")
    assert len(captured.out + captured.err) < 500

"""Exponential backoff with jitter, for retrying a dependency that is away for a while.

    for delay in backoff(budget_s=120):
        try:
            return call()
        except Transient:
            time.sleep(delay)   # the generator ends when the budget is spent

Each delay doubles from `base_s` up to `cap_s`, and is drawn from its upper half ("equal
jitter"), so many clients cut off at the same moment do not come back in lockstep.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

BASE_S = 0.5
CAP_S = 15.0


def backoff(
    *,
    budget_s: float,
    base_s: float = BASE_S,
    cap_s: float = CAP_S,
    rng: random.Random | None = None,
) -> Iterator[float]:
    """The delays to sleep before each retry; ends before the delays' sum passes `budget_s`
    (a budget of 0 gives no retry)."""
    draw = rng or random.Random()
    spent = 0.0
    attempt = 0
    while True:
        ceiling = min(cap_s, base_s * 2**attempt)
        delay = draw.uniform(ceiling / 2, ceiling)
        if spent + delay > budget_s:
            return
        spent += delay
        attempt += 1
        yield delay

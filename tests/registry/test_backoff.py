"""Backoff delays: doubling to a cap, jittered within the upper half, bounded by a budget."""

from __future__ import annotations

import random

from registry.backoff import backoff


def test_delays_double_to_the_cap_within_their_upper_half() -> None:
    delays = list(backoff(budget_s=200, base_s=1, cap_s=8, rng=random.Random(0)))
    ceilings = [1, 2, 4, 8, 8, 8]
    for delay, ceiling in zip(delays, ceilings, strict=False):
        assert ceiling / 2 <= delay <= ceiling
    assert max(delays) <= 8 and len(delays) > len(ceilings)


def test_the_budget_bounds_the_sum_and_zero_means_no_retry() -> None:
    for seed in range(20):
        delays = list(backoff(budget_s=30, rng=random.Random(seed)))
        assert 0 < sum(delays) <= 30
        assert sum(delays) > 30 - 15  # it stops only when the next delay would not fit
    assert list(backoff(budget_s=0)) == []


def test_jitter_spreads_clients_cut_off_at_once() -> None:
    firsts = {round(next(backoff(budget_s=10, rng=random.Random(seed))), 6) for seed in range(10)}
    assert len(firsts) == 10

"""The promotion decision (`services.promotion`): a new version becomes `production` only if
its own task holds up and no other task drops past the gate."""

from __future__ import annotations

import pytest

from registry.errors import InvalidValue
from services.promotion import DEFAULT_GATE, TaskRow, check_gate, decide


def _rows(**cells: tuple[float | None, float | None]) -> list[TaskRow]:
    return [TaskRow(task=name, before=b, after=a) for name, (b, a) in cells.items()]


def test_a_first_version_must_beat_the_untrained_base() -> None:
    ok = decide(task="t1", rows=_rows(t1=(None, 60.0)), base=40.0, production=None)
    assert ok.promoted and ok.reasons == [] and ok.alias == "production"
    assert ok.gate == DEFAULT_GATE and ok.table[0].own
    same = decide(task="t1", rows=_rows(t1=(None, 40.0)), base=40.0, production=None)
    assert not same.promoted and "untrained base" in same.reasons[0]


def test_the_own_task_may_lose_at_most_the_tolerance_against_production() -> None:
    rows = _rows(t1=(80.0, 79.0), t2=(70.0, 70.0))
    assert decide(task="t1", rows=rows, base=30.0, production=80.0).promoted  # 1 point: allowed
    low = decide(task="t1", rows=_rows(t1=(80.0, 78.9)), base=30.0, production=80.0)
    assert not low.promoted and "below production's 80.0" in low.reasons[0]
    wider = decide(task="t1", rows=_rows(t1=(80.0, 75.0)), base=30.0, production=80.0,
                   gate={"task_tolerance": 5})  # fmt: skip
    assert wider.promoted and wider.gate["task_tolerance"] == 5


def test_no_other_task_may_drop_past_the_gate() -> None:
    rows = _rows(t1=(60.0, 90.0), t2=(70.0, 68.0), t3=(50.0, 47.5), t4=(None, 10.0))
    refused = decide(task="t1", rows=rows, base=30.0, production=60.0)
    assert not refused.promoted
    assert len(refused.reasons) == 1 and refused.reasons[0].startswith("t3 drops 2.5 points")
    assert decide(task="t1", rows=rows, base=30.0, production=60.0,
                  gate={"max_other_drop": 2.5}).promoted  # fmt: skip
    table = {r.task: (r.before, r.after, r.own) for r in refused.table}
    assert table["t1"] == (60.0, 90.0, True) and table["t4"] == (None, 10.0, False)


@pytest.mark.parametrize(
    ("gate", "field"),
    [
        ({"task_tolerance": -1}, "promotion.task_tolerance"),
        ({"max_other_drop": 101}, "promotion.max_other_drop"),
        ({"max_other_drop": "2"}, "promotion.max_other_drop"),
        ({"max_other_drop": float("nan")}, "promotion.max_other_drop"),
        ({"tolerance": 1}, "promotion.tolerance"),
        ([1], "promotion"),
    ],
)
def test_bad_gates_name_their_field(gate: object, field: str) -> None:
    with pytest.raises(InvalidValue) as info:
        check_gate(gate, field_prefix="promotion.")
    assert info.value.field == field
    assert check_gate({"task_tolerance": 0, "max_other_drop": None}) == {"task_tolerance": 0.0}

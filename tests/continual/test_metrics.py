from __future__ import annotations

import pytest

from continual.metrics import AccuracyMatrix

# R[t][i]: accuracy on task i after learning task t.
R = (
    (0.90, 0.30, 0.20),
    (0.70, 0.95, 0.40),
    (0.60, 0.80, 1.00),
)
BASELINE = (0.50, 0.33, 0.30)


def test_metrics_against_hand_computation() -> None:
    m = AccuracyMatrix(values=R, baseline=BASELINE)
    assert m.num_tasks == 3
    assert m.average_accuracy == pytest.approx((0.60 + 0.80 + 1.00) / 3)
    # BWT = ((0.60 - 0.90) + (0.80 - 0.95)) / 2
    assert m.backward_transfer == pytest.approx(-0.225)
    # FWT = ((R[0][1] - b1) + (R[1][2] - b2)) / 2 = ((0.30 - 0.33) + (0.40 - 0.30)) / 2
    assert m.forward_transfer == pytest.approx(0.035)
    # Forgetting: task 0 best before last 0.90 -> 0.60; task 1 best max(0.30, 0.95) -> 0.80.
    assert m.forgetting == pytest.approx((0.30 + 0.15) / 2)


def test_forgetting_uses_best_earlier_accuracy_not_the_diagonal() -> None:
    m = AccuracyMatrix(values=((0.5, 0.0, 0.0), (0.9, 0.6, 0.0), (0.7, 0.6, 0.8)))
    assert m.backward_transfer == pytest.approx(((0.7 - 0.5) + (0.6 - 0.6)) / 2)
    assert m.forgetting == pytest.approx(((0.9 - 0.7) + 0.0) / 2)
    assert m.forward_transfer is None  # no baseline


def test_unmeasured_cells() -> None:
    m = AccuracyMatrix(values=((0.8, None), (0.6, 0.9)))
    assert m.average_accuracy == pytest.approx(0.75)
    assert m.backward_transfer == pytest.approx(-0.2)
    assert m.forgetting == pytest.approx(0.2)
    assert AccuracyMatrix(values=m.values, baseline=(0.1, 0.2)).forward_transfer is None
    with pytest.raises(ValueError, match="task 1 after task 1 was not measured"):
        _ = AccuracyMatrix(values=((None, 0.1), (0.6, 0.9))).backward_transfer


def test_single_task() -> None:
    m = AccuracyMatrix(values=((0.7,),), baseline=(0.5,))
    assert m.average_accuracy == 0.7
    assert (m.backward_transfer, m.forward_transfer, m.forgetting) == (None, None, None)


@pytest.mark.parametrize(
    ("values", "baseline"),
    [((), None), (((0.1, 0.2),), None), (((0.1,),), (0.1, 0.2))],
)
def test_shape_is_validated(values: tuple, baseline: tuple | None) -> None:
    with pytest.raises(ValueError):
        AccuracyMatrix(values=values, baseline=baseline)


def test_format_table() -> None:
    table = AccuracyMatrix(values=((0.9, None), (0.7, 0.95)), baseline=(0.5, 0.33)).format_table(
        ["sentiment", "topic"], digits=2
    )
    assert table.splitlines() == [
        " " * 15 + " | sentiment     topic",
        "-" * 37,
        "baseline        |      0.50      0.33",
        "after sentiment |      0.90         -",
        "after topic     |      0.70      0.95",
        "ACC 0.82  BWT -0.20  FWT -  forgetting +0.20",
    ]
    with pytest.raises(ValueError, match="one name per task"):
        AccuracyMatrix(values=((1.0,),)).format_table(["a", "b"])

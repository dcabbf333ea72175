"""The accuracy matrix of a stream as continual-learning metrics (ACC, BWT, FWT, forgetting)."""

from __future__ import annotations

from continual.metrics import AccuracyMatrix
from registry.entities import EvaluationMatrix

__all__ = ["AccuracyMatrix", "accuracy_matrix"]


def accuracy_matrix(matrix: EvaluationMatrix) -> AccuracyMatrix:
    """The learned part of the registry's matrix (T rows, the first T tasks) as a
    `continual.metrics.AccuracyMatrix`, which computes ACC, BWT, FWT and forgetting."""
    learned = len(matrix.values)
    base = matrix.baseline[:learned]
    return AccuracyMatrix(
        values=tuple(row[:learned] for row in matrix.values),
        baseline=tuple(b for b in base if b is not None) if None not in base else None,
    )

"""Datasets: stored as canonical JSONL blobs whose sha256 is the dataset digest."""

from __future__ import annotations

from continual.data import TaskData, from_jsonl, to_jsonl
from registry.entities import Dataset
from registry.instance import Instance


def store_dataset(inst: Instance, data: TaskData, *, format: str) -> Dataset:
    """Blob first, then the row: a dataset row always points at a stored, verified blob."""
    blob = to_jsonl(data)
    digest = inst.artifacts.put_bytes(blob)
    return inst.registry.tasks.add_dataset(
        digest=digest,
        format=format,
        num_train=len(data.train),
        num_test=len(data.test),
        size_bytes=len(blob),
        labels=data.labels,
    )


def load_dataset(inst: Instance, dataset: Dataset) -> TaskData:
    return from_jsonl(inst.artifacts.get_bytes(dataset.digest))

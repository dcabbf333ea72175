"""Predictions from a stream's current state (or one adapter version) for a few inputs.

Models are built from the published artifacts exactly as evaluation builds them, and the last
few are kept in memory (building one means loading the snapshot and every adapter)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn
from transformers import PreTrainedTokenizerBase

from continual.data import Example
from continual.evaluation import evaluating, generate, label_scores
from continual.strategies import get_strategy
from registry.entities import AdapterVersion, Snapshot, Stream
from registry.instance import Instance
from workers.models import fetch_tree, load_snapshot

CACHE_SIZE = 2


@dataclass(frozen=True)
class PredictResult:
    snapshot: Snapshot
    adapters: tuple[AdapterVersion, ...]
    outputs: list[str]
    scores: list[dict[str, float]] | None


_cache: OrderedDict[tuple[str, ...], tuple[nn.Module, PreTrainedTokenizerBase]] = OrderedDict()
_lock = threading.Lock()


def state_of(
    inst: Instance, stream: Stream, *, task: str | None, ref: int | str
) -> tuple[Snapshot, list[AdapterVersion]]:
    """The snapshot and adapters (oldest first) of the stream's current state, or of one task's
    adapter version and the earlier adapters it was trained on."""
    reg = inst.registry
    if task is None:
        snapshot = reg.streams.current_snapshot(stream.id)
        return snapshot, reg.adapters.stream_state(stream_id=stream.id, snapshot_id=snapshot.id)
    version = reg.adapters.get(task_id=reg.tasks.get(stream_id=stream.id, name=task).id, ref_=ref)
    history = [reg.adapters.get_by_id(i) for i in version.depends_on]
    return reg.streams.get_snapshot_by_id(version.base_snapshot_id), [*history, version]


def predict(
    inst: Instance,
    stream: Stream,
    inputs: Sequence[str],
    *,
    task: str | None = None,
    ref: int | str = "latest",
    max_new_tokens: int = 16,
    labels: Sequence[str] | None = None,
) -> PredictResult:
    """Greedy completions of `inputs`, or with `labels` the best-scoring label per input."""
    snapshot, adapters = state_of(inst, stream, task=task, ref=ref)
    method = adapters[-1].method if adapters else stream.method
    model, tokenizer = _model(inst, snapshot, adapters, method)
    with _lock:  # one forward pass at a time per process: models are not re-entrant on CPU
        if labels:
            examples = [Example(prompt=text, completion="") for text in inputs]
            with evaluating(model):
                table = label_scores(model, tokenizer, examples, list(labels))  # (E, L)
            scores = [dict(zip(labels, row.tolist(), strict=True)) for row in table]
            outputs = [max(row, key=row.__getitem__) for row in scores]
            return PredictResult(snapshot, tuple(adapters), outputs, scores)
        outputs = generate(model, tokenizer, list(inputs), max_new_tokens=max_new_tokens)
    return PredictResult(snapshot, tuple(adapters), outputs, None)


def _model(
    inst: Instance, snapshot: Snapshot, adapters: list[AdapterVersion], method: str
) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    key = (snapshot.artifact_digest, method, *(a.artifact_digest or "" for a in adapters))
    with _lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
    base, tokenizer = load_snapshot(inst, snapshot)
    dirs = [fetch_tree(inst, a.artifact_digest or "") for a in adapters]
    model = get_strategy(method).inference_model(base, history=dirs)
    with _lock:
        _cache[key] = (model, tokenizer)
        while len(_cache) > CACHE_SIZE:
            _cache.popitem(last=False)
    return model, tokenizer

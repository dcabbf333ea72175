"""Predictions from a stream's current state (or one adapter version) for a few inputs.

With a task, inputs are what the task's dataset calls `{text}`: each is rendered through the
task's recorded prompt template, and labels through its completion template, with the
evaluation's own scoring (`label_scores`, prompts cut as training cut them), so a prediction
is the model queried on the tokens it was trained and measured on.

Models are built from the published artifacts exactly as evaluation builds them, and the last
few are kept in memory (building one means loading the snapshot and every adapter)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn
from transformers import PreTrainedTokenizerBase

from continual.data import Example, PromptFormat
from continual.evaluation import evaluating, generate, label_scores
from continual.strategies import get_strategy
from registry.entities import AdapterVersion, Snapshot, Stream
from registry.instance import Instance
from workers.datasets import load_dataset
from workers.jobs import recorded_setup
from workers.models import fetch_tree, load_snapshot, memory_dirs

CACHE_SIZE = 2


@dataclass(frozen=True)
class PredictResult:
    snapshot: Snapshot
    adapters: tuple[AdapterVersion, ...]
    prompts: list[str]  # what the model was given, one per input
    outputs: list[str]
    scores: list[dict[str, float]] | None
    fmt: PromptFormat | None = None  # the task's format the prompts and labels went through


@dataclass(frozen=True)
class TaskFormat:
    """How a task renders its text and labels, and its labels (None: not a classification)."""

    fmt: PromptFormat
    labels: tuple[str, ...] | None


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


def task_format(inst: Instance, stream: Stream, *, task: str) -> TaskFormat:
    """The prompt format and labels recorded with the task's dataset (the one evaluation scores
    it on); a dataset stored before formats were recorded has them in (or implied by) its blob."""
    reg = inst.registry
    dataset = reg.tasks.get_dataset_by_id(reg.tasks.get(stream_id=stream.id, name=task).dataset_id)
    if dataset.prompt_template is None or dataset.completion_template is None:
        data = load_dataset(inst, dataset)
        return TaskFormat(fmt=data.prompt_format, labels=data.labels)
    fmt = PromptFormat(prompt=dataset.prompt_template, completion=dataset.completion_template)
    return TaskFormat(fmt=fmt, labels=dataset.labels)


def predict(
    inst: Instance,
    stream: Stream,
    inputs: Sequence[str],
    *,
    task: str | None = None,
    ref: int | str = "latest",
    max_new_tokens: int = 16,
    labels: Sequence[str] | None = None,
    template: bool = True,
) -> PredictResult:
    """Greedy completions of `inputs`, or with `labels` the best-scoring label per input.

    With `task` (and `template`), each input is rendered by the task's prompt template, the
    labels (by default the task's own, when it has labels) by its completion template, and
    prompts are cut to the adapter's `max_length` as evaluation cuts them. Without `task`, or
    with `template=False`, inputs go to the model as written (labels as `" label"`)."""
    snapshot, adapters = state_of(inst, stream, task=task, ref=ref)
    spec = task_format(inst, stream, task=task) if task is not None and template else None
    fmt = spec.fmt if spec is not None else None
    prompts = [fmt.render_prompt(text) for text in inputs] if fmt is not None else list(inputs)
    if labels is not None:
        candidates = list(labels)
    else:  # a classification task ranks its own labels; otherwise generate
        candidates = list(spec.labels or ()) if spec is not None else []
    cut = fmt is not None and bool(adapters)  # as evaluation: prompts cut as training cut them
    max_length = recorded_setup(adapters[-1]).hyper.max_length if cut else None
    method = adapters[-1].method if adapters else stream.method
    model, tokenizer = _model(inst, snapshot, adapters, method)
    with _lock:  # one forward pass at a time per process: models are not re-entrant on CPU
        if candidates:
            examples = [Example(prompt=prompt, completion="") for prompt in prompts]
            with evaluating(model):
                table = label_scores(model, tokenizer, examples, candidates, fmt=fmt,
                                     max_length=max_length)  # (E, L)  # fmt: skip
            scores = [dict(zip(candidates, row.tolist(), strict=True)) for row in table]
            outputs = [candidates[i] for i in table.argmax(dim=1).tolist()]
            return PredictResult(snapshot, tuple(adapters), prompts, outputs, scores, fmt)
        outputs = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens)
    return PredictResult(snapshot, tuple(adapters), prompts, outputs, None, fmt)


def _model(
    inst: Instance, snapshot: Snapshot, adapters: list[AdapterVersion], method: str
) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    key = (snapshot.artifact_digest, method, *(a.artifact_digest or "" for a in adapters))
    with _lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
    base, tokenizer = load_snapshot(inst, snapshot)
    # the memory of folded tasks first (am-lora routes them to the snapshot itself)
    dirs = memory_dirs(inst, snapshot, method)
    dirs += [fetch_tree(inst, a.artifact_digest or "") for a in adapters]
    strategy = recorded_setup(adapters[-1]).strategy() if adapters else get_strategy(method)
    model = strategy.inference_model(base, history=dirs)
    with _lock:
        _cache[key] = (model, tokenizer)
        while len(_cache) > CACHE_SIZE:
            _cache.popitem(last=False)
    return model, tokenizer

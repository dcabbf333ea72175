"""Predictions from a stream's current state (or one adapter version) for a few inputs.

With a task, inputs are what the task's dataset calls `{text}`: each is rendered through the
task's recorded prompt template, and labels through its completion template, with the
evaluation's own scoring (`label_scores`, prompts cut as training cut them), so a prediction
is the model queried on the tokens it was trained and measured on.

Every prompt is cut to the `max_length` its adapter was trained with (the stream's own without
adapters), as training cut it; the request's model work (`cost`) is bounded by
`STRATA_PREDICT_MAX_TOKENS`, each input's and label's size by `STRATA_PREDICT_MAX_INPUT_BYTES`
(before anything is tokenised), and `cancel` stops the work between inputs and between generated
tokens (the API sets it when the client goes away).

Models are built from the published artifacts exactly as evaluation builds them, and the last
few are kept in memory (building one means loading the snapshot and every adapter).

`answer` is what a `predict` worker runs for the API (`services.predict`): a query in, the
response's body (or a refusal by its code) out; `InProcessPredictor` runs it in a thread of the
embedded server."""

from __future__ import annotations

import dataclasses
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn
from transformers import PreTrainedTokenizerBase

from continual.batching import Encoded, encode_pair
from continual.config import LoraHyperparams
from continual.data import Example, PromptFormat
from continual.errors import EvaluationCancelled
from continual.evaluation import evaluating, generate, label_scores
from continual.strategies import get_strategy
from registry.entities import AdapterVersion, Snapshot, Stream, StreamState
from registry.errors import Conflict, InvalidValue, NotFound
from registry.instance import Instance
from services.datasets import load_dataset
from services.predict import PredictCancelled, PredictQuery, error_reply, unwrap
from services.promotion import PRODUCTION
from services.setup import recorded_setup
from workers.models import load_snapshot, state_dirs

CACHE_SIZE = 2


@dataclass(frozen=True)
class PredictResult:
    snapshot: Snapshot
    adapters: tuple[AdapterVersion, ...]
    prompts: list[str]  # what the model was given, one per input
    outputs: list[str]
    scores: list[dict[str, float]] | None
    fmt: PromptFormat | None = None  # the task's format the prompts and labels went through
    truncated: tuple[bool, ...] = ()  # per input: its prompt was cut to `max_length` tokens
    max_length: int | None = None  # what prompts were cut to


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
    task_id = reg.tasks.get(stream_id=stream.id, name=task).id
    try:
        version = reg.adapters.get(task_id=task_id, ref_=ref)
    except NotFound:
        if ref != PRODUCTION:
            raise
        version = reg.adapters.get(task_id=task_id, ref_="latest")  # nothing promoted yet
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
    ref: int | str = PRODUCTION,
    max_new_tokens: int = 16,
    labels: Sequence[str] | None = None,
    template: bool = True,
    cancel: threading.Event | None = None,
) -> PredictResult:
    """Greedy completions of `inputs`, or with `labels` the best-scoring label per input.

    With `task` (and `template`), each input is rendered by the task's prompt template, the
    labels (by default the task's own, when it has labels) by its completion template. Without
    `task`, or with `template=False`, inputs go to the model as written (labels as `" label"`).
    Either way prompts are cut to `max_length` tokens as training and evaluation cut them.

    Raises InvalidValue (422) for an input or label over `predict_max_input_bytes` or a request
    over `predict_max_tokens`, and EvaluationCancelled once `cancel` is set."""
    settings = inst.settings
    if stream.state is not StreamState.READY:  # importing: no snapshot yet; failed: none ever
        raise Conflict(f"stream '{stream.name}' is {stream.state}: it has no model to predict "
                       "with", field="stream")  # fmt: skip
    check_sizes(inputs, labels, max_bytes=settings.predict_max_input_bytes)
    snapshot, adapters = state_of(inst, stream, task=task, ref=ref)
    spec = task_format(inst, stream, task=task) if task is not None and template else None
    fmt = spec.fmt if spec is not None else None
    prompts = [fmt.render_prompt(text) for text in inputs] if fmt is not None else list(inputs)
    if labels is not None:
        candidates = list(labels)
    else:  # a classification task ranks its own labels; otherwise generate
        candidates = list(spec.labels or ()) if spec is not None else []
    max_length = max_length_of(stream, adapters)
    method = adapters[-1].method if adapters else stream.method
    model, tokenizer = _model(inst, snapshot, adapters, method)
    completions = [(fmt or PromptFormat()).render_completion(c) for c in candidates]
    work = cost(tokenizer, prompts, completions, max_length=max_length,
                max_new_tokens=max_new_tokens)  # fmt: skip
    if work.tokens > settings.predict_max_tokens:
        raise InvalidValue(
            f"this request would put {work.formula} = {work.tokens} tokens through the model "
            f"(prompts cut to max_length {max_length}), over the budget of "
            f"{settings.predict_max_tokens} per request (STRATA_PREDICT_MAX_TOKENS): send fewer "
            "or shorter inputs" + ("" if candidates else ", or a smaller max_new_tokens"),
            field="inputs",
        )  # fmt: skip
    should_stop = cancel.is_set if cancel is not None else None
    result = PredictResult(snapshot, tuple(adapters), prompts, [], None, fmt, work.truncated,
                           max_length)  # fmt: skip
    with _lock:  # one forward pass at a time per process: models are not re-entrant on CPU
        if should_stop is not None and should_stop():  # gone while it waited for the lock
            raise EvaluationCancelled("stopped before the model ran")
        if candidates:
            examples = [Example(prompt=prompt, completion="") for prompt in prompts]
            with evaluating(model):
                table = label_scores(model, tokenizer, examples, candidates, fmt=fmt,
                                     max_length=max_length,
                                     should_stop=should_stop)  # (E, L)  # fmt: skip
            scores = [dict(zip(candidates, row.tolist(), strict=True)) for row in table]
            outputs = [candidates[i] for i in table.argmax(dim=1).tolist()]
            return dataclasses.replace(result, outputs=outputs, scores=scores)
        outputs = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                           max_length=max_length, should_stop=should_stop)  # fmt: skip
    return dataclasses.replace(result, outputs=outputs)


def check_sizes(inputs: Sequence[str], labels: Sequence[str] | None, *, max_bytes: int) -> None:
    """InvalidValue naming the first input (`inputs.i`) or label (`labels.i`) over `max_bytes`
    in UTF-8, or that is not Unicode text (JSON lets a lone surrogate through: `"\\ud800"`)."""
    for field, texts in (("inputs", inputs), ("labels", labels or ())):
        for i, text in enumerate(texts):
            try:
                size = len(text.encode("utf-8"))
            except UnicodeEncodeError:
                raise InvalidValue(
                    "not Unicode text (a lone surrogate)", field=f"{field}.{i}"
                ) from None
            if size > max_bytes:
                raise InvalidValue(
                    f"{size} bytes, over the limit of {max_bytes} bytes "
                    "(STRATA_PREDICT_MAX_INPUT_BYTES)", field=f"{field}.{i}",
                )  # fmt: skip


def max_length_of(stream: Stream, adapters: Sequence[AdapterVersion]) -> int:
    """The `max_length` prompts are cut to: the newest adapter's (what it was trained with),
    else the stream's hyperparameter."""
    if adapters:
        return recorded_setup(adapters[-1]).hyper.max_length
    return LoraHyperparams.from_dict(stream.hyperparams).max_length


@dataclass(frozen=True)
class Cost:
    truncated: tuple[bool, ...]  # per prompt: `max_length` cut it
    tokens: int  # that the request puts through the model
    formula: str  # how `tokens` adds up, for the error that refuses it


def cost(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    completions: Sequence[str],
    *,
    max_length: int,
    max_new_tokens: int,
) -> Cost:
    """Which prompts `max_length` cuts, and the tokens the request puts through the model.

    Ranking cuts each prompt as `label_scores` does (room for the longest completion) and runs
    the cut prompt once plus every completion's tokens; generation runs the batch left-padded
    to its longest cut prompt, each row `max_new_tokens` more."""
    sizes = [len(tokenizer.encode(c, add_special_tokens=False)) for c in completions]
    longest = completions[sizes.index(max(sizes))] if completions else ""
    cut: list[Encoded] = [
        encode_pair(tokenizer, prompt=p, completion=longest, add_eos=False, max_length=max_length)
        for p in prompts
    ]
    bos = 1 if tokenizer.bos_token_id is not None else 0
    whole = [bos + len(tokenizer.encode(p, add_special_tokens=False)) for p in prompts]
    truncated = tuple(e.prompt_len < w for e, w in zip(cut, whole, strict=True))
    n = len(prompts)
    if completions:
        prompt_tokens, label_tokens = sum(e.prompt_len for e in cut), sum(sizes)
        return Cost(
            truncated,
            prompt_tokens + n * label_tokens,
            f"{prompt_tokens} prompt tokens + {n} inputs x {label_tokens} label tokens",
        )
    longest_prompt = max(e.prompt_len for e in cut)
    return Cost(
        truncated,
        n * (longest_prompt + max_new_tokens),
        f"{n} inputs x ({longest_prompt} prompt tokens + {max_new_tokens} new tokens)",
    )


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
    dirs = state_dirs(inst, snapshot, method, adapters)
    strategy = recorded_setup(adapters[-1]).strategy() if adapters else get_strategy(method)
    model = strategy.inference_model(base, history=dirs)
    with _lock:
        _cache[key] = (model, tokenizer)
        while len(_cache) > CACHE_SIZE:
            _cache.popitem(last=False)
    return model, tokenizer


def answer(
    inst: Instance, query: PredictQuery, *, cancel: threading.Event | None
) -> dict[str, Any]:
    """The predict response's body for `query`, or `{"error": ...}` for what it refused (an
    exception with a `code`) or a prediction stopped by `cancel`."""
    try:
        stream = inst.registry.streams.get(query.stream)
        result = predict(
            inst, stream, query.inputs, task=query.task, ref=query.ref, labels=query.labels,
            max_new_tokens=query.max_new_tokens, template=query.template, cancel=cancel,
        )  # fmt: skip
    except EvaluationCancelled:
        return error_reply(PredictCancelled("the client went away"))
    except Exception as exc:
        if isinstance(getattr(exc, "code", None), str):
            return error_reply(exc)
        raise
    return response_body(query, result)


def response_body(query: PredictQuery, result: PredictResult) -> dict[str, Any]:
    predictions = [
        {
            "input": text,
            "prompt": prompt,
            "output": out,
            "scores": None if result.scores is None else result.scores[i],
            "truncated": result.truncated[i],
        }
        for i, (text, prompt, out) in enumerate(
            zip(query.inputs, result.prompts, result.outputs, strict=True)
        )
    ]
    fmt = result.fmt
    return {
        "snapshot_version": result.snapshot.version,
        "adapters": [f"{a.task_name}@v{a.version}" for a in result.adapters],
        "prompt_template": None if fmt is None else fmt.prompt,
        "completion_template": None if fmt is None else fmt.completion,
        "max_length": result.max_length,
        "predictions": predictions,
    }


class InProcessPredictor:
    """Predictions in the calling thread of this process (the embedded `strata serve`)."""

    def __init__(self, inst: Instance) -> None:
        self.inst = inst

    def predict(self, query: PredictQuery, *, cancel: threading.Event) -> dict[str, Any]:
        return unwrap(answer(self.inst, query, cancel=cancel))

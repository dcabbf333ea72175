"""Uploads as tasks. A task's prompt format: the tokens a labelled task is trained on are the
tokens it is scored and queried on, on SmolLM2's own tokenizer, whichever way a user writes the
labels. A JSON list is read record by record, and examples are counted as they are read."""

from __future__ import annotations

import gzip
import io
import json
from typing import Any

import pytest
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from continual.batching import IGNORE_INDEX, encode_pair, pad_batch, pad_id_of
from continual.data import label_of
from continual.errors import InvalidDataset
from continual.evaluation import label_scores
from continual.models import build_tiny_llama
from services.datasets import UploadLimits, parse_upload
from workers.models import smollm2_gguf

LIMITS = UploadLimits(max_examples=1000, max_line_bytes=10_000)
LABELS = ["positive", "negative"]


@pytest.fixture(scope="module")
def smollm2_tokenizer() -> PreTrainedTokenizerBase:
    gguf = smollm2_gguf()
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def _jsonl(rows: list[tuple[str, str]]) -> io.BytesIO:
    return io.BytesIO(
        "".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in rows).encode()
    )


def _upload(completion: str, **kwargs: Any) -> Any:
    rows = [(f"Review {i}: it was {'great' if i % 2 else 'bad'}. Sentiment:",
             completion.format(label=LABELS[i % 2])) for i in range(8)]  # fmt: skip
    defaults: dict[str, Any] = {"test": None, "holdout": 0.25, "labels": LABELS}
    return parse_upload(name="reviews", format="jsonl", train=_jsonl(rows), limits=LIMITS,
                        **{**defaults, **kwargs})  # fmt: skip


def _scored_ids(model: Any, tokenizer: Any, data: Any) -> list[list[int]]:
    """The token ids `label_scores` runs through the decoder for the first test example, one
    row per label."""
    seen: list[torch.Tensor] = []

    def spy(_module: Any, _args: Any, kwargs: dict[str, Any]) -> None:
        ids, mask = kwargs["input_ids"], kwargs["attention_mask"]
        seen.extend(row[m.bool()] for row, m in zip(ids, mask, strict=True))

    handle = model.get_decoder().register_forward_pre_hook(spy, with_kwargs=True)
    try:
        label_scores(model, tokenizer, data.test[:1], list(data.labels), shared_prefix=False,
                     fmt=data.prompt_format)  # fmt: skip
    finally:
        handle.remove()
    return [row.tolist() for row in seen]


@pytest.mark.parametrize("written", ["{label}", " {label}"])
def test_a_labelled_task_is_scored_on_the_tokens_it_is_trained_on(
    smollm2_tokenizer: PreTrainedTokenizerBase, written: str
) -> None:
    tok = smollm2_tokenizer
    data = _upload(written)
    assert data.prompt_format.completion == written
    # the two ways of writing a label are different SmolLM2 tokens: the test can tell them apart
    assert tok.encode("positive", add_special_tokens=False) != tok.encode(
        " positive", add_special_tokens=False
    )
    model = build_tiny_llama(seed=0, tokenizer=tok)[0]
    example = data.test[0]
    trained = encode_pair(tok, prompt=example.prompt, completion=example.completion, add_eos=True)
    assert trained.ids[-1] == tok.eos_token_id
    rows = _scored_ids(model, tok, data)
    gold = list(data.labels).index(label_of(example))
    assert rows[gold] == list(trained.ids[:-1])  # the trained tokens, but the end of sequence
    for label, row in zip(data.labels, rows, strict=True):
        scored = row[trained.prompt_len :]
        assert scored == tok.encode(written.format(label=label), add_special_tokens=False)
    # the training target (the batch's labels) is those completion tokens, then end of sequence
    target = pad_batch([trained], pad_id=pad_id_of(tok)).labels[0]  # (T,)
    assert target[target != IGNORE_INDEX].tolist() == [*rows[gold][trained.prompt_len :],
                                                       tok.eos_token_id]  # fmt: skip
    # the shared-prefix path (evaluation's and predict's default) scores the same tokens
    full = label_scores(model, tok, data.test, list(data.labels), shared_prefix=False,
                        fmt=data.prompt_format)  # fmt: skip
    cached = label_scores(model, tok, data.test, list(data.labels), fmt=data.prompt_format)
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)


def test_labels_written_two_ways_are_refused_with_the_line() -> None:
    rows = [("a", "positive"), ("b", " negative")]
    with pytest.raises(InvalidDataset) as info:
        parse_upload(name="x", format="jsonl", train=_jsonl(rows), test=None, labels=LABELS,
                     holdout=None, limits=LIMITS)  # fmt: skip
    assert (info.value.field, info.value.line) == ("train.completion", 2)
    test = _jsonl([("c", " positive")])
    with pytest.raises(InvalidDataset) as info:
        _upload("{label}", test=test, holdout=None)
    assert (info.value.field, info.value.line) == ("test.completion", 1)
    assert "the training examples" in info.value.reason


def test_a_cl_benchmark_upload_records_its_template() -> None:
    records = [{"sentence": f" text {i} ", "label": LABELS[i % 2]} for i in range(4)]
    train = io.BytesIO(json.dumps(records).encode())
    data = parse_upload(name="cl", format="cl_benchmark", train=train, test=None, labels=LABELS,
                        holdout=0.25, limits=LIMITS)  # fmt: skip
    fmt = data.prompt_format
    assert fmt.prompt == "Classify the text. Options: positive, negative.\nInput: {text}\nAnswer:"
    assert fmt.completion == " {label}"
    for example in (*data.train, *data.test):
        text = example.prompt.split("Input: ")[1].split("\nAnswer:")[0]
        assert fmt.example(text=text, label=label_of(example)) == example


def _cl(text: str | bytes, **kwargs: Any) -> Any:
    raw = text.encode() if isinstance(text, str) else text
    args: dict[str, Any] = {"name": "cl", "format": "cl_benchmark", "train": io.BytesIO(raw),
                            "test": None, "labels": LABELS, "holdout": 0.25,
                            "limits": LIMITS}  # fmt: skip
    return parse_upload(**{**args, **kwargs})


def test_a_cl_benchmark_list_is_read_in_any_layout_and_errors_name_the_record() -> None:
    records = [{"sentence": f"text {i}", "label": LABELS[i % 2]} for i in range(12)]
    one_line = _cl(json.dumps(records))
    assert len(one_line.train) + len(one_line.test) == 12
    assert _cl(json.dumps(records, indent=4)) == one_line  # pretty-printed over many lines
    assert _cl(gzip.compress(json.dumps(records).encode())) == one_line
    # one line longer than max_line_bytes, of records within it: read record by record
    many = [{"sentence": "x" * 500, "label": "positive"}] * 100
    assert len(_cl(json.dumps(many)).train) == 75
    with pytest.raises(InvalidDataset) as info:
        _cl(json.dumps([*records, {"label": "positive"}], indent=2))
    assert (info.value.field, info.value.record, info.value.line) == ("train.sentence", 13, None)
    assert str(info.value) == "record 13: train.sentence: missing"
    with pytest.raises(InvalidDataset) as info:
        _cl(json.dumps([*records, {"sentence": "x" * 20_000, "label": "positive"}]))
    assert (info.value.field, info.value.record) == ("train", 13)
    assert info.value.reason == "longer than 10000 bytes"


def test_examples_are_counted_as_they_are_read_train_and_test_together() -> None:
    limits = UploadLimits(max_examples=10, max_line_bytes=10_000)
    rows = [("p", "a")] * 6
    with pytest.raises(InvalidDataset) as info:
        parse_upload(name="x", format="jsonl", train=_jsonl(rows * 2), test=None, labels=None,
                     holdout=None, limits=limits)  # fmt: skip
    assert (info.value.field, info.value.line) == ("train", 11)
    assert info.value.reason == "more than 10 examples"
    with pytest.raises(InvalidDataset) as info:
        parse_upload(name="x", format="jsonl", train=_jsonl(rows), test=_jsonl(rows), labels=None,
                     holdout=None, limits=limits)  # fmt: skip
    assert (info.value.field, info.value.line) == ("test", 5)
    assert info.value.reason == "more than 10 examples (6 in train)"
    data = parse_upload(name="x", format="jsonl", train=_jsonl(rows), test=_jsonl(rows[:4]),
                        labels=None, holdout=None, limits=limits)  # fmt: skip
    assert (len(data.train), len(data.test)) == (6, 4)
    with pytest.raises(InvalidDataset) as info:  # a JSON list's records, the same
        _cl(json.dumps([{"sentence": "s", "label": "positive"}] * 11), limits=limits)
    assert (info.value.field, info.value.record) == ("train", 11)
    with pytest.raises(InvalidDataset) as info:  # a train file of no examples, with a test file
        _cl("[]", test=io.BytesIO(b"[]"), holdout=None)
    assert (info.value.field, info.value.reason) == ("train", "no examples")

from __future__ import annotations

import json
from pathlib import Path

import pytest

from continual.data import (
    Example,
    PromptFormat,
    TaskData,
    cl_format,
    completion_template_of,
    format_prompt,
    from_jsonl,
    load_cl_benchmark,
    parse_cl_records,
    parse_jsonl,
    synthetic_corpus,
    synthetic_tasks,
    to_jsonl,
)
from continual.errors import InvalidDataset


def test_prompt_template() -> None:
    prompt = format_prompt(instruction="Classify. ", text=" hello world ")
    assert prompt == "Classify.\nInput: hello world\nAnswer:"


# --- parse_jsonl ------------------------------------------------------------------------------


def test_parse_jsonl_reads_examples_and_skips_blank_lines() -> None:
    text = '{"prompt": "a", "completion": " b"}\n\n{"completion": " d", "prompt": "c"}\n'
    assert parse_jsonl(text) == [Example("a", " b"), Example("c", " d")]


@pytest.mark.parametrize(
    ("text", "field", "line"),
    [
        ('{"prompt": "a", "completion": "b"}\n{"prompt": "a",\n', "json", 2),
        ('{"prompt": "a", "completion": "b"}\n\n[1, 2]\n', "record", 3),
        ('{"completion": "b"}\n', "prompt", 1),
        ('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n', "completion", 2),
        ('{"prompt": 3, "completion": "b"}\n', "prompt", 1),
        ('{"prompt": "a", "completion": null}\n', "completion", 1),
        ('{"prompt": "a", "completion": "b", "label": "x"}\n', "label", 1),
    ],
)
def test_parse_jsonl_errors_name_field_and_line(text: str, field: str, line: int) -> None:
    with pytest.raises(InvalidDataset) as info:
        parse_jsonl(text)
    assert (info.value.field, info.value.line) == (field, line)
    assert str(info.value).startswith(f"line {line}: {field}: ")


@pytest.mark.parametrize("text", ["", "\n  \n"])
def test_parse_jsonl_rejects_empty_input(text: str) -> None:
    with pytest.raises(InvalidDataset) as info:
        parse_jsonl(text)
    assert info.value.field == "data" and info.value.line is None


# --- canonical JSONL -------------------------------------------------------------------------


def _task(labels: tuple[str, ...] | None = ("yes", "no")) -> TaskData:
    return TaskData(
        name="demo",
        train=(Example("Q: é?\nAnswer:", " yes"), Example("Q2", " no")),
        test=(Example('Q3 "quoted"', " no"),),
        labels=labels,
    )


@pytest.mark.parametrize("labels", [("yes", "no"), None])
def test_jsonl_round_trip(labels: tuple[str, ...] | None) -> None:
    task = _task(labels)
    data = to_jsonl(task)
    assert from_jsonl(data) == task
    assert to_jsonl(from_jsonl(data)) == data


def test_jsonl_is_canonical() -> None:
    data = to_jsonl(_task())
    lines = data.decode("ascii").split("\n")
    assert lines[-1] == "" and len(lines) == 5  # header + 3 examples + trailing newline
    assert lines[0] == (
        '{"completion_template":" {label}","format":"strata-task/1","labels":["yes","no"],'
        '"name":"demo","prompt_template":"{text}"}'
    )
    assert lines[1] == '{"completion":" yes","prompt":"Q: \\u00e9?\\nAnswer:","split":"train"}'
    assert json.loads(lines[3])["split"] == "test"
    assert to_jsonl(_task()) == data


def test_a_header_written_before_templates_reads_the_template_its_examples_use() -> None:
    header = b'{"format":"strata-task/1","labels":["yes","no"],"name":"x"}\n'
    example = b'{"completion":"%s","prompt":"Q","split":"train"}\n'
    bare = from_jsonl(header + example % b"yes" + example % b"no")
    assert bare.prompt_format == PromptFormat(prompt="{text}", completion="{label}")
    spaced = from_jsonl(header + example % b" yes")
    assert spaced.prompt_format == PromptFormat()
    # examples that disagree were scored with " label" before: they still load, as then
    mixed = from_jsonl(header + example % b" yes" + example % b"no")
    assert mixed.prompt_format == PromptFormat() and len(mixed.train) == 2


def test_prompt_format_renders_prompts_and_completions() -> None:
    fmt = cl_format(["World", "Sports"])
    assert fmt.render_prompt("  Goal! ") == (
        "Classify the text. Options: World, Sports.\nInput: Goal!\nAnswer:"
    )
    assert fmt.render_completion("Sports") == " Sports"
    assert PromptFormat().render_prompt(" as written ") == " as written "  # bare {text}
    assert PromptFormat(completion="{label}\n").render_completion(" yes ") == "yes\n"
    # braces in the text are text, not placeholders
    assert fmt.render_prompt("{label} {text}").endswith("Input: {label} {text}\nAnswer:")


@pytest.mark.parametrize(
    ("prompt", "completion", "field"),
    [
        ("no placeholder", " {label}", "prompt_template"),
        ("{text} and {text}", " {label}", "prompt_template"),
        ("{text}", "label", "completion_template"),
        ("{text}", "A: {label}", "completion_template"),
    ],
)
def test_prompt_format_refuses_bad_templates(prompt: str, completion: str, field: str) -> None:
    with pytest.raises(InvalidDataset) as info:
        PromptFormat(prompt=prompt, completion=completion)
    assert info.value.field == field


def test_completion_template_is_the_whitespace_the_labels_are_written_with() -> None:
    labels = ["yes", "no"]
    assert completion_template_of([Example("q", "yes"), Example("q", "no")], labels) == "{label}"
    assert completion_template_of([Example("q", " no\n")], labels) == " {label}\n"
    with pytest.raises(InvalidDataset) as info:
        completion_template_of([Example("q", "yes"), Example("q", " no")], labels)
    assert (info.value.field, info.value.line) == ("completion", 2)
    assert "'{label}'" in info.value.reason and "' {label}'" in info.value.reason
    with pytest.raises(InvalidDataset) as info:
        completion_template_of([Example("q", "no")], labels, expected=" {label}")
    assert info.value.line == 1 and "the training examples" in info.value.reason
    with pytest.raises(InvalidDataset) as info:
        completion_template_of([Example("q", "maybe")], labels)
    assert info.value.field == "completion" and "not one of the labels" in info.value.reason


@pytest.mark.parametrize(
    ("data", "field", "line"),
    [
        (b'{"format":"other/1","labels":null,"name":"x"}\n', "format", 1),
        (
            b'{"completion_template":"A {label}","format":"strata-task/1","labels":null,'
            b'"name":"x"}\n',
            "completion_template",
            1,
        ),
        (
            b'{"format":"strata-task/1","labels":null,"name":"x","prompt_template":3}\n',
            "prompt_template",
            1,
        ),
        (b'{"format":"strata-task/1","name":"x"}\n', "labels", 1),
        (b'{"format":"strata-task/1","labels":[1],"name":"x"}\n', "labels", 1),
        (
            b'{"format":"strata-task/1","labels":null,"name":"x"}\n'
            b'{"completion":"a","prompt":"b","split":"dev"}\n',
            "split",
            2,
        ),
        (b'{"format":"strata-task/1","labels":null,"name":"x"}\nnot json\n', "json", 2),
    ],
)
def test_from_jsonl_errors(data: bytes, field: str, line: int) -> None:
    with pytest.raises(InvalidDataset) as info:
        from_jsonl(data)
    assert (info.value.field, info.value.line) == (field, line)


def test_from_jsonl_rejects_empty_and_non_utf8() -> None:
    for data in (b"", b"\xff\xfe"):
        with pytest.raises(InvalidDataset) as info:
            from_jsonl(data)
        assert info.value.field == "data"


# --- CL_Benchmark ----------------------------------------------------------------------------


def _write_task(root: Path, *, train: object, test: object, labels: object) -> None:
    folder = root / "news"
    folder.mkdir(parents=True)
    (folder / "labels.json").write_text(json.dumps(labels))
    (folder / "train.json").write_text(json.dumps(train))
    (folder / "test.json").write_text(json.dumps(test))


def test_load_cl_benchmark(tmp_path: Path) -> None:
    train = [{"sentence": f"text {i}", "label": ["World", "Sports"][i % 2]} for i in range(20)]
    test = [{"sentence": "a match", "label": "Sports"}]
    _write_task(tmp_path, train=train, test=test, labels=["World", "Sports"])
    task = load_cl_benchmark(tmp_path, "news", train_limit=5, seed=3)
    assert task.name == "news" and task.labels == ("World", "Sports")
    assert len(task.train) == 5 and len(task.test) == 1
    assert task.test[0] == Example(
        prompt="Classify the text. Options: World, Sports.\nInput: a match\nAnswer:",
        completion=" Sports",
    )
    assert load_cl_benchmark(tmp_path, "news", train_limit=5, seed=3) == task
    assert load_cl_benchmark(tmp_path, "news", train_limit=5, seed=4).train != task.train
    assert len(load_cl_benchmark(tmp_path, "news").train) == 20


@pytest.mark.parametrize(
    ("train", "labels", "field", "record"),
    [
        ([{"sentence": "s", "label": "Weather"}], ["World"], "label", 1),
        ([{"sentence": "s", "label": "World"}, {"label": "World"}], ["World"], "sentence", 2),
        ([{"sentence": 5, "label": "World"}], ["World"], "sentence", 1),
        (["just text"], ["World"], "record", 1),
        ({"sentence": "s"}, ["World"], "records", None),
        ([], [], "labels", None),
        ([], ["World", "World"], "labels", None),
    ],
)
def test_load_cl_benchmark_errors(
    tmp_path: Path, train: object, labels: object, field: str, record: int | None
) -> None:
    _write_task(tmp_path, train=train, test=[], labels=labels)
    with pytest.raises(InvalidDataset) as info:
        load_cl_benchmark(tmp_path, "news")
    assert (info.value.field, info.value.record) == (field, record)
    assert info.value.line is None
    if record is not None:
        assert str(info.value).startswith(f"record {record}: {field}: ")


def test_load_cl_benchmark_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InvalidDataset) as info:
        load_cl_benchmark(tmp_path, "absent")
    assert info.value.field == "labels" and "not found" in info.value.reason


def test_parse_cl_records_is_reusable() -> None:
    fmt = PromptFormat(prompt="Pick a or b.\nInput: {text}\nAnswer:")
    examples = parse_cl_records([{"sentence": " x ", "label": "b"}], ["a", "b"], fmt=fmt)
    assert examples == [Example("Pick a or b.\nInput: x\nAnswer:", " b")]


# --- synthetic tasks -------------------------------------------------------------------------


def test_synthetic_tasks_are_deterministic_distinct_and_balanced() -> None:
    tasks = synthetic_tasks(seed=1, train_size=60, test_size=30)
    assert synthetic_tasks(seed=1, train_size=60, test_size=30) == tasks
    assert synthetic_tasks(seed=2, train_size=60, test_size=30) != tasks
    assert [t.name for t in tasks] == ["sentiment", "topic", "color"]
    all_labels = [label for t in tasks for label in t.labels or ()]
    assert len(all_labels) == len(set(all_labels))  # disjoint label sets
    instructions = {t.train[0].prompt.split("\n")[0] for t in tasks}
    assert len(instructions) == 3
    for task in tasks:
        assert task.labels is not None
        assert (len(task.train), len(task.test)) == (60, 30)
        counts = [sum(e.completion == " " + lab for e in task.train) for lab in task.labels]
        assert max(counts) - min(counts) <= 1
        assert not {e.prompt for e in task.test} & {e.prompt for e in task.train}


def test_synthetic_corpus_covers_labels() -> None:
    text = " ".join(synthetic_corpus())
    for task in synthetic_tasks(train_size=3, test_size=0):
        for label in task.labels or ():
            assert label in text

"""Task data: examples, the prompt template, readers, the canonical JSONL form, synthetic tasks."""

from continual.data.cl_benchmark import (
    cl_example,
    cl_format,
    classification_instruction,
    load_cl_benchmark,
    parse_cl_records,
)
from continual.data.examples import (
    PROMPT_TEMPLATE,
    Example,
    PromptFormat,
    TaskData,
    completion_template_of,
    format_prompt,
    instruction_format,
    label_of,
)
from continual.data.jsonl import from_jsonl, jsonl_example, parse_jsonl, to_jsonl
from continual.data.synthetic import synthetic_corpus, synthetic_tasks

__all__ = [
    "PROMPT_TEMPLATE",
    "Example",
    "PromptFormat",
    "TaskData",
    "cl_example",
    "cl_format",
    "classification_instruction",
    "completion_template_of",
    "format_prompt",
    "from_jsonl",
    "instruction_format",
    "jsonl_example",
    "label_of",
    "load_cl_benchmark",
    "parse_cl_records",
    "parse_jsonl",
    "synthetic_corpus",
    "synthetic_tasks",
    "to_jsonl",
]

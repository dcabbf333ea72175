"""The project's own three small classification tasks, learnable by a tiny random model in seconds.

Each input is a short run of shared filler words with one or two cue words planted in it; the
cue's class is the label. The tasks have distinct instructions and disjoint label sets so that a
stream of them shows forgetting (and its absence) clearly.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from continual.data.examples import Example, TaskData, instruction_format

FILLER: tuple[str, ...] = (
    "the", "a", "this", "that", "my", "our", "one", "some", "today", "yesterday",
    "was", "is", "felt", "seemed", "and", "but", "with", "very", "quite", "really",
    "day", "time", "place", "thing", "people", "friend", "house", "street", "city", "night",
    "we", "they", "she", "he", "saw", "had", "got", "went", "made", "found",
)  # fmt: skip


@dataclass(frozen=True)
class TaskSpec:
    """A generated task: each input plants one to `max_cues` of its label's cue words among
    filler words."""

    name: str
    instruction: str
    cues: dict[str, tuple[str, ...]]  # label -> cue words
    max_cues: int


SPECS: tuple[TaskSpec, ...] = (
    TaskSpec(
        name="sentiment",
        instruction="Was the review positive or negative?",
        cues={
            "good": ("great", "happy", "excellent", "lovely", "wonderful", "nice", "fun"),
            "bad": ("awful", "terrible", "sad", "poor", "horrible", "nasty", "boring"),
        },
        max_cues=2,
    ),
    TaskSpec(
        name="topic",
        instruction="Name the topic of the text.",
        cues={
            "sport": ("football", "tennis", "goal", "match", "team", "race"),
            "food": ("pizza", "bread", "soup", "cheese", "apple", "dinner"),
            "tech": ("computer", "phone", "software", "robot", "laptop", "chip"),
        },
        max_cues=2,
    ),
    TaskSpec(
        name="color",
        instruction="Which colour does the text name?",
        cues={"red": ("red",), "blue": ("blue",), "green": ("green",)},
        max_cues=1,
    ),
)


def synthetic_tasks(*, seed: int = 0, train_size: int = 256, test_size: int = 64) -> list[TaskData]:
    """Three tasks (sentiment, topic, color): label-balanced, test prompts unseen in training
    (barring a rare collision), identical for identical arguments."""
    if train_size < 0 or test_size < 0:
        raise ValueError(f"sizes must be >= 0, got train={train_size} test={test_size}")
    return [
        make_task(spec, seed=seed, train_size=train_size, test_size=test_size) for spec in SPECS
    ]


def synthetic_corpus() -> list[str]:
    """Sentences covering every word, instruction and label the tasks use (tokenizer training)."""
    sentences: list[str] = []
    for task in synthetic_tasks(seed=0, train_size=96, test_size=0):
        sentences.extend(example.prompt + example.completion for example in task.train)
    for spec in SPECS:
        for label, cues in spec.cues.items():
            sentences.append(" ".join((label, *cues)))
    sentences.append(" ".join(FILLER))
    return sentences


def make_task(spec: TaskSpec, *, seed: int, train_size: int, test_size: int) -> TaskData:
    # A string seed is hashed deterministically (sha512), independent of PYTHONHASHSEED.
    rng = random.Random(f"{seed}:{spec.name}")
    labels = tuple(spec.cues)
    train = _sample(spec, rng=rng, size=train_size, avoid=set())
    test = _sample(spec, rng=rng, size=test_size, avoid={e.prompt for e in train})
    return TaskData(
        name=spec.name, train=tuple(train), test=tuple(test), labels=labels,
        prompt_format=instruction_format(spec.instruction),
    )  # fmt: skip


def _sample(spec: TaskSpec, *, rng: random.Random, size: int, avoid: set[str]) -> list[Example]:
    """`size` examples with labels cycling through the label set, then shuffled."""
    labels = list(spec.cues)
    examples: list[Example] = []
    seen = set(avoid)
    fmt = instruction_format(spec.instruction)
    for index in range(size):
        label = labels[index % len(labels)]
        for _attempt in range(20):  # redraw a few times to keep prompts unique
            example = fmt.example(text=cue_text(spec, label, rng), label=label)
            if example.prompt not in seen:
                break
        seen.add(example.prompt)
        examples.append(example)
    rng.shuffle(examples)
    return examples


def cue_text(spec: TaskSpec, label: str, rng: random.Random) -> str:
    words = [rng.choice(FILLER) for _ in range(rng.randint(3, 6))]
    for _ in range(rng.randint(1, spec.max_cues)):
        words.insert(rng.randint(0, len(words)), rng.choice(spec.cues[label]))
    return " ".join(words)

"""Write the second bench order's data: two CL_Benchmark tasks followed by two generated tasks
unrelated to them, all in one CL_Benchmark-format folder that `strata bench --data` reads.

The order is agnews (news topic), yelp (review stars), then `color` (which colour the text
names) and `animal` (which animal it names): short runs of filler words with one cue word
planted, `continual.data.synthetic`'s generator with its own instructions. They share neither
labels nor vocabulary with the first two, so a method that overwrites the shared weights shows
it on the first two tasks' final scores.

    .venv/bin/python benchmarks/unrelated_order.py --data ../shared/data/cl_benchmark \
        --out bench-data/order2
    OMP_NUM_THREADS=1 .venv/bin/strata bench --data bench-data/order2 \
        --order agnews,yelp,color,animal ...
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
from pathlib import Path

from continual.data.synthetic import TaskSpec, cue_text

REAL = ("agnews", "yelp")
GENERATED = (
    TaskSpec(
        name="color",
        instruction="",
        cues={"red": ("red", "crimson"), "blue": ("blue", "navy"), "green": ("green", "olive")},
        max_cues=1,
    ),
    TaskSpec(
        name="animal",
        instruction="",
        cues={"cat": ("cat", "kitten"), "dog": ("dog", "puppy"), "horse": ("horse", "pony"),
              "bird": ("bird", "sparrow")},
        max_cues=1,
    ),
)  # fmt: skip


def records(spec: TaskSpec, *, rng: random.Random, size: int, avoid: set[str]) -> list[dict]:
    """`size` label-balanced records whose sentences are not in `avoid` (which grows)."""
    labels = list(spec.cues)
    out = []
    for index in range(size):
        label = labels[index % len(labels)]
        for _attempt in range(50):
            sentence = cue_text(spec, label, rng)
            if sentence not in avoid:
                break
        avoid.add(sentence)
        out.append({"sentence": sentence, "label": label})
    rng.shuffle(out)
    return out


def write(data: Path, out: Path, *, train: int, test: int, seed: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name in REAL:
        shutil.copytree(data / name, out / name, dirs_exist_ok=True)
    for spec in GENERATED:
        rng = random.Random(f"{seed}:{spec.name}")
        seen: set[str] = set()
        folder = out / spec.name
        folder.mkdir(exist_ok=True)
        (folder / "labels.json").write_text(json.dumps(list(spec.cues)))
        for split, size in (("train", train), ("test", test)):
            rows = records(spec, rng=rng, size=size, avoid=seen)
            (folder / f"{split}.json").write_text(json.dumps(rows, indent=0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="the CL_Benchmark folder")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--test", type=int, default=500)
    parser.add_argument("--seed", type=int, default=20261204)
    args = parser.parse_args()
    write(args.data, args.out, train=args.train, test=args.test, seed=args.seed)
    print(f"wrote {', '.join((*REAL, *(s.name for s in GENERATED)))} to {args.out}")


if __name__ == "__main__":
    main()

"""AM-LoRA's files: the per-task adapters, the selector saved with the newest one, and the memory
a consolidation leaves of the tasks it folded into the base snapshot.

A stream's history, as the strategy receives it, is an optional **memory** directory first (the
snapshot's `olora_memory/`, written by `continual.consolidation`), then one directory per task
adapter that still sits on the snapshot, oldest first:

- the memory is a PEFT LoRA adapter with B = 0 whose A rows span the input subspace of every
  folded task (O-LoRA's memory: the orthogonality penalty reads it like an earlier adapter, and
  it changes no output), plus `router.safetensors`, the task router's statistics of the folded
  tasks, each row labelled with its task (metadata `rows`, the labels the worker gave the
  fold). It is never mixed as an adapter: the snapshot itself serves the folded tasks.
- each task directory is a plain PEFT LoRA adapter plus `selector.safetensors` (see `am_lora`);
  the newest one's router statistics cover the folded tasks first (their labels in metadata
  `folded_rows`), then every adapter's task. A worker whose stream learned a folded task again
  passes a copy of the memory without that task's row (`memory_without`); the newest adapter's
  folded rows are matched to the memory's by label.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from peft import LoraConfig, PeftConfig
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from continual.errors import IncompatibleAdapter, InvalidHyperparameter
from continual.strategies.am_lora_layer import FrozenAdapters, stack_adapters
from continual.strategies.am_lora_router import COUNTS, MEANS, WITHIN
from continual.strategies.common import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    LORA_A_SUFFIX,
    LORA_B_SUFFIX,
    MEMORY_MARK,
    PEFT_PREFIX,
)

SELECTOR_FILE = "selector.safetensors"
MEMORY_ROUTER_FILE = "router.safetensors"
ROWS_KEY = "rows"  # router.safetensors metadata: the label of each folded task's row (JSON)
FOLDED_ROWS_KEY = "folded_rows"  # selector.safetensors metadata: the memory rows it was built on
STATISTICS = frozenset({MEANS, COUNTS, WITHIN})
Selector = tuple[Tensor, Tensor]  # (weight (n, out), bias (n + 1,)) of one layer


@dataclass(frozen=True)
class Memory:
    """What the stream keeps of the tasks folded into its snapshot."""

    down: dict[str, Tensor]  # module path -> the folded subspace's A rows (k, d_in), as stored
    statistics: dict[str, Tensor] | None  # the router's statistics of the folded tasks
    rows: tuple[str, ...] | None = None  # each statistics row's task label, if recorded

    @property
    def num_tasks(self) -> int:
        return 0 if self.statistics is None else int(self.statistics[COUNTS].shape[0])


def is_memory(path: Path) -> bool:
    """Whether `path` is a consolidation's memory adapter rather than a task's adapter."""
    weights = Path(path) / ADAPTER_WEIGHTS
    if not weights.is_file():
        return False
    with safe_open(str(weights), framework="pt") as f:
        return (f.metadata() or {}).get("strata") == MEMORY_MARK


def split_history(history: Sequence[Path]) -> tuple[Memory | None, list[Path]]:
    """(the memory of folded tasks, if the history starts with one; the task adapters)."""
    paths = [Path(p) for p in history]
    if not paths or not is_memory(paths[0]):
        return None, paths
    if any(is_memory(p) for p in paths[1:]):
        raise ValueError("a memory adapter may only come first in an am-lora history")
    return read_memory(paths[0]), paths[1:]


def read_memory(memory_dir: Path) -> Memory:
    tensors = load_file(str(Path(memory_dir) / ADAPTER_WEIGHTS))
    down = {
        key[len(PEFT_PREFIX) : -len(LORA_A_SUFFIX)]: value
        for key, value in tensors.items()
        if key.endswith(LORA_A_SUFFIX)
    }
    router = Path(memory_dir) / MEMORY_ROUTER_FILE
    if not router.is_file():
        return Memory(down=down, statistics=None)
    statistics = load_file(str(router))
    if set(statistics) != STATISTICS:
        raise ValueError(f"{router} does not hold the router's statistics")
    rows = memory_rows(memory_dir)
    if rows is not None and len(rows) != statistics[COUNTS].shape[0]:
        raise ValueError(f"{router} labels {len(rows)} rows of {statistics[COUNTS].shape[0]}")
    return Memory(down=down, statistics=statistics, rows=rows)


def memory_rows(memory_dir: Path) -> tuple[str, ...] | None:
    """The task label of each row of a memory's router statistics (None: not recorded, or no
    router)."""
    router = Path(memory_dir) / MEMORY_ROUTER_FILE
    if not router.is_file():
        return None
    with safe_open(str(router), framework="pt") as f:
        return _labels((f.metadata() or {}).get(ROWS_KEY), router)


def _labels(raw: str | None, path: Path) -> tuple[str, ...] | None:
    if raw is None:
        return None
    labels = json.loads(raw)
    if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
        raise ValueError(f"{path}: its row labels are not a list of strings")
    return tuple(labels)


def write_memory_statistics(
    statistics: dict[str, Tensor], memory_dir: Path, *, rows: Sequence[str] | None = None
) -> None:
    """Save the router's statistics of the folded tasks beside the memory adapter, with each
    row's task label when `rows` gives them (the worker's task ids)."""
    tensors = {key: statistics[key].float().contiguous() for key in STATISTICS}
    metadata = {"format": "pt", "strata": "am-lora-memory"}
    if rows is not None:
        if len(rows) != tensors[COUNTS].shape[0]:
            raise ValueError(f"{len(rows)} row labels for {tensors[COUNTS].shape[0]} rows")
        metadata[ROWS_KEY] = json.dumps(list(rows))
    save_file(tensors, str(Path(memory_dir) / MEMORY_ROUTER_FILE), metadata=metadata)


def select_rows(statistics: dict[str, Tensor], rows: Sequence[int]) -> dict[str, Tensor]:
    """Router statistics of only the task rows `rows`, in that order (the shared within-task
    scatter kept whole)."""
    return {MEANS: statistics[MEANS][list(rows)], COUNTS: statistics[COUNTS][list(rows)],
            WITHIN: statistics[WITHIN]}  # fmt: skip


def memory_without(memory_dir: Path, out_dir: Path, *, drop: Collection[str]) -> Path:
    """A copy of a memory whose router statistics lack the rows labelled in `drop`: folded tasks
    the stream has learned again since (a retrain), whose inputs then go to their new adapter
    instead of the snapshot. The O-LoRA subspace is the memory's, unchanged."""
    memory = read_memory(memory_dir)
    if memory.statistics is None or memory.rows is None:
        raise ValueError(f"{memory_dir} has no labelled router statistics")
    keep = [i for i, label in enumerate(memory.rows) if label not in drop]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        shutil.copyfile(Path(memory_dir) / name, out_dir / name)
    kept = select_rows(memory.statistics, keep)
    write_memory_statistics(kept, out_dir, rows=[memory.rows[i] for i in keep])
    return out_dir


def adapter_modules(adapter_dir: Path) -> set[str]:
    """Module paths of the LoRA layers in a PEFT adapter file."""
    with safe_open(str(adapter_dir / ADAPTER_WEIGHTS), framework="pt") as f:
        keys = list(f.keys())
    return {k[len(PEFT_PREFIX) : -len(LORA_A_SUFFIX)] for k in keys if k.endswith(LORA_A_SUFFIX)}


def load_adapters(history: Sequence[Path], *, modules: list[str]) -> dict[str, FrozenAdapters]:
    """Every history adapter of each module, stacked oldest first ({} for an empty history)."""
    per_module: dict[str, list[tuple[Tensor, Tensor, float]]] = {m: [] for m in modules}
    for adapter_dir in map(Path, history):
        alpha, rslora = read_lora_config(adapter_dir)
        tensors = load_file(str(adapter_dir / ADAPTER_WEIGHTS))
        found = adapter_modules(adapter_dir)
        if found != set(modules):
            extra, missing = sorted(found - set(modules)), sorted(set(modules) - found)
            raise InvalidHyperparameter(
                field="target_modules",
                reason=f"am-lora needs the same layers for every task; {adapter_dir} has "
                f"{len(extra)} more ({extra[:3]}) and {len(missing)} fewer ({missing[:3]})",
            )
        for module in modules:
            lora_A = tensors[PEFT_PREFIX + module + LORA_A_SUFFIX]  # (r, in)
            lora_B = tensors[PEFT_PREFIX + module + LORA_B_SUFFIX]  # (out, r)
            rank = lora_A.shape[0]
            scale = alpha / math.sqrt(rank) if rslora else alpha / rank
            per_module[module].append((lora_A, lora_B, scale))
    if not history:
        return {}
    return {module: stack_adapters(adapters) for module, adapters in per_module.items()}


def read_lora_config(adapter_dir: Path) -> tuple[float, bool]:
    """(lora_alpha, use_rslora) of a plain PEFT LoRA adapter, read by PEFT
    (`PeftConfig.from_pretrained`, local files only); other variants are refused
    (`IncompatibleAdapter`)."""
    name = Path(adapter_dir).name
    if not (Path(adapter_dir) / ADAPTER_CONFIG).is_file():
        raise IncompatibleAdapter(adapter=name, reason=f"not a PEFT adapter (no {ADAPTER_CONFIG})")
    try:
        config = PeftConfig.from_pretrained(str(adapter_dir), local_files_only=True)
    except Exception as exc:  # PEFT's own errors for a config it cannot read vary
        raise IncompatibleAdapter(adapter=name, reason=f"{ADAPTER_CONFIG}: {exc}") from exc
    if not isinstance(config, LoraConfig):
        raise IncompatibleAdapter(adapter=name, reason=f"a {config.peft_type} adapter, not LoRA")
    unsupported = {
        "use_dora": bool(config.use_dora),
        "alpha_pattern": bool(config.alpha_pattern),
        "lora_bias": bool(getattr(config, "lora_bias", False)),
        "fan_in_fan_out": bool(config.fan_in_fan_out),
    }
    bad = [key for key, flag in unsupported.items() if flag]
    if bad:
        raise IncompatibleAdapter(adapter=name, reason=f"am-lora reads plain LoRA adapters only "
                                  f"({bad})")  # fmt: skip
    return float(config.lora_alpha), bool(config.use_rslora)


def load_selector(
    adapter_dir: Path, *, num_adapters: int, modules: Iterable[str]
) -> dict[str, Selector]:
    """The selector saved with the newest adapter: it must mix exactly `num_adapters` adapters
    in exactly `modules`."""
    path = Path(adapter_dir) / SELECTOR_FILE
    if not path.is_file():
        raise ValueError(f"{adapter_dir} has no {SELECTOR_FILE}: not written by am-lora")
    expected = {m + suffix for m in modules for suffix in (".weight", ".bias")}
    with safe_open(str(path), framework="pt") as f:
        saved = int((f.metadata() or {}).get("num_adapters", -1))
        if saved != num_adapters:
            raise ValueError(
                f"{path} mixes {saved} adapters but the history has {num_adapters} "
                "(history must be the stream's adapters, oldest first, ending with its newest)"
            )
        if set(f.keys()) - STATISTICS != expected:
            raise ValueError(f"{path} does not hold one selector per adapted layer")
        # Only the selector: the router's statistics are read where routing needs them.
        tensors = {key: f.get_tensor(key) for key in expected}
    return {m: (tensors[m + ".weight"], tensors[m + ".bias"]) for m in modules}


def load_statistics(adapter_dir: Path, num_tasks: int, dim: int) -> dict[str, Tensor] | None:
    """The task statistics saved with the newest adapter (None if it has none); they must
    describe `num_tasks` tasks (the folded ones, then one per adapter) in a `dim`-wide
    embedding."""
    path = Path(adapter_dir) / SELECTOR_FILE
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        if not keys & STATISTICS:
            return None
        if not keys >= STATISTICS:
            raise ValueError(f"{path} holds only some of the router's statistics")
        stats = {key: f.get_tensor(key) for key in STATISTICS}
    shapes = {key: tuple(value.shape) for key, value in stats.items()}
    if shapes != {MEANS: (num_tasks, dim), COUNTS: (num_tasks,), WITHIN: (dim, dim)}:
        raise ValueError(
            f"{path}: router statistics of shapes {shapes} do not describe {num_tasks} tasks "
            f"in this model's {dim}-wide embedding"
        )
    return stats


def saved_folded_rows(adapter_dir: Path) -> tuple[str, ...] | None:
    """The labels of the memory rows the newest adapter's router statistics start with (None:
    not recorded)."""
    path = Path(adapter_dir) / SELECTOR_FILE
    with safe_open(str(path), framework="pt") as f:
        return _labels((f.metadata() or {}).get(FOLDED_ROWS_KEY), path)

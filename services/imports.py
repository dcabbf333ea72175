"""Checking a new stream's base-model source before its import is queued, without a model
library: where it is (under the import roots), what it is (a safetensors model directory or a
GGUF file, headers well formed) and how large (its config's dimensions within
`DIMENSION_LIMITS`, the parameters it holds and the embedding its config describes within
`settings.import_max_params`).

The import job (`workers.imports`) runs these checks again with its own settings, then the
exact ones that need transformers: the config as transformers reads it, sized by building the
model on the meta device, and every tensor's shape against it.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from safetensors import safe_open

from registry.artifacts import validate_safetensors
from registry.artifacts.gguf import GgufArray, GgufHeader, read_gguf_header
from registry.errors import InvalidValue, InvalidWeights

SOURCE_KINDS = ("tiny", "hf", "gguf", "smollm2")
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


def check_source(source: dict[str, Any]) -> dict[str, Any]:
    """Validate a base-model source description; returns it normalised."""
    kind = source.get("kind")
    if kind not in SOURCE_KINDS:
        raise InvalidValue(f"must be one of {list(SOURCE_KINDS)}", field="base.kind")
    if kind == "tiny":
        seed = source.get("seed", 0)
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
            raise InvalidValue("must be an integer in 0..2**63-1", field="base.seed")
        return {"kind": "tiny", "seed": seed}
    if kind in ("hf", "gguf"):
        path = source.get("path")
        if not isinstance(path, str) or not path:
            raise InvalidValue("a local path is required", field="base.path")
        expected_file = kind == "gguf"
        try:
            resolved = Path(path).expanduser().resolve()
            found = resolved.is_file() if expected_file else resolved.is_dir()
        except (OSError, ValueError, RuntimeError):  # a NUL byte, a name too long, a loop
            found = False
        if not found:  # the path is not repeated: the caller has it
            raise InvalidValue(f"not {'a .gguf file' if expected_file else 'a model directory'}",
                               field="base.path")  # fmt: skip
        if kind == "hf":
            weights = sorted(resolved.glob("*.safetensors"))
            if not weights:
                raise InvalidWeights(
                    "no .safetensors weights (pickled checkpoints are never loaded)",
                    field="base.path",
                )
            for file in weights:  # malformed headers are refused before transformers sees them
                validate_safetensors(file, name=f"base.path/{file.name}")
        return {"kind": kind, "path": str(resolved)}
    return {"kind": "smollm2"}


def check_import(
    source: dict[str, Any], *, roots: Sequence[Path] | None, max_params: int
) -> dict[str, Any]:
    """Validate a base-model source without a model library; returns it normalised.

    `hf` and `gguf` paths must lie under `roots` (unless None: an in-process caller's own
    files); an `hf` directory's config must be JSON with a `model_type` and dimensions within
    the limits, and neither the parameters its safetensors hold nor its config's embedding may
    exceed `max_params`; a GGUF's header must be well formed and its dimensions and tensors
    within the limits."""
    kind = source.get("kind")
    if kind in ("hf", "gguf") and roots is not None:
        source = {**source, "path": str(import_path(source.get("path"), kind=kind, roots=roots))}
    source = check_source(source)
    if source["kind"] == "hf":
        directory = Path(source["path"])
        check_config(read_config(directory), max_params=max_params)
        held = stored_parameters(directory)
        if held > max_params:
            raise too_many("the checkpoint holds", held, max_params)
    elif source["kind"] == "gguf":
        check_gguf(read_gguf_header(Path(source["path"]), name="base.path"), max_params=max_params)
    return source


def read_config(directory: Path) -> dict[str, Any]:
    """The directory's config.json as a dict with a `model_type`, refused when it is missing,
    over 1 MiB, not JSON or nested too deeply."""
    file = directory / "config.json"
    if not file.is_file() or file.stat().st_size > MAX_CONFIG_BYTES:
        raise InvalidValue("config.json is missing or over 1 MiB", field="base.path")
    try:
        raw = json.loads(file.read_bytes())
    except (ValueError, RecursionError) as exc:
        raise InvalidValue("config.json is not JSON", field="base.config") from exc
    if not isinstance(raw, dict) or not isinstance(raw.get("model_type"), str):
        raise InvalidValue("config.json has no model_type", field="base.config.model_type")
    return raw


def check_config(config: dict[str, Any], *, max_params: int, exact: bool = False) -> None:
    """Every dimension within `DIMENSION_LIMITS` (in the config and its `text_config`), every
    other integer within `ANY_INT_LIMIT`, and the input embedding it describes (vocab_size x
    hidden_size, a lower bound of any causal LM's size) within `max_params`, unless the caller
    counts the model's parameters exactly (`exact`)."""
    scopes = [
        config,
        *([config["text_config"]] if isinstance(config.get("text_config"), dict) else []),
    ]
    for scope in scopes:
        for key, limit in DIMENSION_LIMITS.items():
            value = scope.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and not 0 <= value <= limit:
                raise InvalidValue(f"{value} is outside 0..{limit}", field=f"base.config.{key}")
    for key, value in integers(config):
        if abs(value) > ANY_INT_LIMIT:
            raise InvalidValue(f"{value} is over the limit of {ANY_INT_LIMIT}",
                               field=f"base.config.{key}")  # fmt: skip
    for scope in [] if exact else scopes:
        vocab, hidden = scope.get("vocab_size"), scope.get("hidden_size")
        if isinstance(vocab, int) and isinstance(hidden, int) and vocab * hidden > max_params:
            raise too_many("the config describes at least", vocab * hidden, max_params)


def integers(value: Any, prefix: str = "") -> Iterator[tuple[str, int]]:
    """Every integer of a JSON value, with its dotted path."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from integers(item, f"{prefix}{key}.")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from integers(item, f"{prefix}{index}.")
    elif isinstance(value, int) and not isinstance(value, bool):
        yield prefix.rstrip("."), value


def stored_parameters(directory: Path) -> int:
    """The number of values the directory's safetensors hold (read from their headers)."""
    total = 0
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="numpy") as weights:
            for name in list(weights.keys()):
                total += math.prod(weights.get_slice(name).get_shape())
    return total


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
        raise too_many("the GGUF holds", header.parameters, max_params)


def too_many(what: str, params: int, max_params: int) -> InvalidValue:
    return InvalidValue(f"{what} {params:,} parameters, over the limit of {max_params:,} "
                        "(STRATA_IMPORT_MAX_PARAMS)", field="base.config")  # fmt: skip

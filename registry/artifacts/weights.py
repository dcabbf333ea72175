"""Structural validation of safetensors files, so that a bad weights file is refused at the door.

Layout (https://github.com/huggingface/safetensors#format): an unsigned little-endian 64-bit
header length ``N``, then ``N`` bytes of UTF-8 JSON mapping tensor names to
``{"dtype", "shape", "data_offsets": [begin, end]}`` (plus an optional ``"__metadata__"`` map of
strings), then the byte buffer. Offsets are relative to the buffer; tensors must tile it exactly,
with no gap, overlap or trailing byte. Only the header is read, never the tensor data.
"""

from __future__ import annotations

import json
import logging
import struct
from pathlib import Path
from typing import Any

from safetensors import safe_open

from registry.errors import InvalidWeights

logger = logging.getLogger(__name__)

MAX_HEADER_SIZE = 100_000_000
"""The same cap as the reference implementation: a larger header is refused unread."""


def validate_safetensors(path: Path, *, name: str | None = None) -> None:
    """Raise InvalidWeights (``field`` = ``name`` or the file name) unless ``path`` is well formed.

    The reference parser (``safetensors.safe_open``) checks every tensor's dtype, shape and
    offsets and that the tensors tile the data buffer exactly; before it, the header length is
    checked against the file and the limit, and the header JSON for duplicate keys (the
    reference parser keeps the last of two, silently). Only the header is read.
    """
    path = Path(path)
    label = name or path.name
    file_size = path.stat().st_size
    with path.open("rb") as f:
        header, _ = _read_header(f.read, file_size=file_size, label=label)
    metadata = header.get("__metadata__")
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
    ):
        raise InvalidWeights("__metadata__ must map names to strings", field=label)
    try:
        with safe_open(str(path), framework="numpy") as st:
            count = len(st.keys())
    except Exception as exc:  # the reference parser raises its own SafetensorError
        raise InvalidWeights(f"rejected by safetensors: {exc}", field=label) from exc
    logger.debug("%s: valid safetensors, %d tensors", label, count)


def _read_header(read: Any, *, file_size: int, label: str) -> tuple[dict[str, Any], int]:
    if file_size < 8:
        raise InvalidWeights(f"truncated: {file_size} bytes, no header length", field=label)
    (header_len,) = struct.unpack("<Q", read(8))
    if header_len > MAX_HEADER_SIZE:
        raise InvalidWeights(f"header length {header_len} is over the limit", field=label)
    if header_len > file_size - 8:
        raise InvalidWeights(
            f"header length {header_len} exceeds the file ({file_size} bytes)", field=label
        )
    raw = read(header_len)
    if not raw.startswith(b"{"):
        raise InvalidWeights("header is not a JSON object", field=label)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidWeights(f"header is not valid JSON: {exc}", field=label) from exc
    if not isinstance(header, dict):
        raise InvalidWeights("header is not a JSON object", field=label)
    return header, header_len


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


TENSOR_DIR = "tensors"
SHARD_INDEX = "model.safetensors.index.json"


def split_per_tensor(directory: Path) -> int:
    """Rewrite a model directory's weights as one safetensors file per tensor.

    Every top-level `*.safetensors` file (and its shard index) is replaced by
    `tensors/<name>.safetensors` files plus a `model.safetensors.index.json` that maps each
    tensor to its file, which transformers loads as a sharded checkpoint. A tensor's file is a
    pure function of its name, dtype, shape and bytes, so in content-addressed storage a
    snapshot that changes some tensors stores only those; the others are shared with the
    snapshots before it. Bytes are copied as they are (no framework, any dtype). Returns the
    number of tensors."""
    directory = Path(directory)
    sources = sorted(directory.glob("*.safetensors"))
    out = directory / TENSOR_DIR
    out.mkdir(exist_ok=True)
    weight_map: dict[str, str] = {}
    total = 0
    for source in sources:
        validate_safetensors(source)
        size = source.stat().st_size
        with source.open("rb") as f:
            header, header_len = _read_header(f.read, file_size=size, label=source.name)
            for name, info in sorted(header.items()):
                if name == "__metadata__":
                    continue
                begin, end = info["data_offsets"]
                f.seek(8 + header_len + begin)
                data = f.read(end - begin)
                rel = tensor_file(name)
                (directory / rel).write_bytes(_single(name, info, data))
                weight_map[name] = rel
                total += end - begin
        source.unlink()
    (directory / SHARD_INDEX).write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1) + "\n"
    )
    return len(weight_map)


def tensor_file(name: str) -> str:
    """Where `split_per_tensor` puts tensor `name`, relative to the model directory."""
    return f"{TENSOR_DIR}/{name}.safetensors"


def tensor_file_bytes(name: str, *, dtype: str, shape: list[int], data: bytes) -> bytes:
    """The file `split_per_tensor` writes for one tensor (safetensors `dtype` name, shape, raw
    little-endian bytes), as bytes: the same tensor gives the same bytes, so the same blob."""
    return _single(name, {"dtype": dtype, "shape": shape}, data)


def _single(name: str, info: dict[str, Any], data: bytes) -> bytes:
    """A one-tensor safetensors file with a canonical header (sorted keys, 8-byte aligned)."""
    header = {
        "__metadata__": {"format": "pt"},
        name: {"dtype": info["dtype"], "shape": info["shape"], "data_offsets": [0, len(data)]},
    }
    raw = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data

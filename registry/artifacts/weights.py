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
import math
import struct
from pathlib import Path
from typing import Any

from safetensors import safe_open

from registry.errors import InvalidWeights

logger = logging.getLogger(__name__)

MAX_HEADER_SIZE = 100_000_000
"""The same cap as the reference implementation: a larger header is refused unread."""

_DTYPE_BITS: dict[str, int] = {
    "BOOL": 8,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "C64": 64,
    "F64": 64,
    "I64": 64,
    "U64": 64,
}


def validate_safetensors(path: Path, *, name: str | None = None) -> None:
    """Raise InvalidWeights (``field`` = ``name`` or the file name) unless ``path`` is well formed.

    Checks the header length against the file size, the header JSON, every tensor's dtype, shape
    and offsets, that the tensors tile the data buffer exactly, and finally that the reference
    parser (``safetensors.safe_open``) agrees.
    """
    path = Path(path)
    label = name or path.name
    file_size = path.stat().st_size
    with path.open("rb") as f:
        header, header_len = _read_header(f.read, file_size=file_size, label=label)
    _check_tensors(header, buffer_len=file_size - 8 - header_len, label=label)
    try:
        with safe_open(str(path), framework="numpy") as st:
            st.keys()
    except Exception as exc:  # the reference parser raises its own SafetensorError
        raise InvalidWeights(f"rejected by safetensors: {exc}", field=label) from exc
    logger.debug("%s: valid safetensors, %d tensors", label, len(header))


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


def _check_tensors(header: dict[str, Any], *, buffer_len: int, label: str) -> None:
    spans: list[tuple[int, int, str]] = []
    for tensor, info in header.items():
        if tensor == "__metadata__":
            _check_metadata(info, label=label)
        else:
            begin, end = _check_tensor(tensor, info, buffer_len=buffer_len, label=label)
            spans.append((begin, end, tensor))
    position = 0
    for begin, end, tensor in sorted(spans):
        if begin != position:
            what = "overlaps the previous tensor" if begin < position else "leaves a gap"
            raise InvalidWeights(f"tensor {tensor!r} {what} at byte {begin}", field=label)
        position = end
    if position != buffer_len:
        raise InvalidWeights(
            f"tensors cover {position} bytes of a {buffer_len}-byte data buffer", field=label
        )


def _check_tensor(tensor: str, info: Any, *, buffer_len: int, label: str) -> tuple[int, int]:
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
        raise InvalidWeights(f"tensor {tensor!r}: needs dtype, shape, data_offsets", field=label)
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    bits = _DTYPE_BITS.get(dtype) if isinstance(dtype, str) else None
    if bits is None:
        raise InvalidWeights(f"tensor {tensor!r}: unknown dtype {dtype!r}", field=label)
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise InvalidWeights(f"tensor {tensor!r}: bad shape {shape!r}", field=label)
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_count, offsets))):
        raise InvalidWeights(f"tensor {tensor!r}: bad data_offsets {offsets!r}", field=label)
    begin, end = offsets
    if not begin <= end <= buffer_len:
        raise InvalidWeights(
            f"tensor {tensor!r}: data_offsets {offsets} out of the {buffer_len}-byte buffer",
            field=label,
        )
    n_bits = math.prod(shape) * bits
    if n_bits % 8 or end - begin != n_bits // 8:
        raise InvalidWeights(
            f"tensor {tensor!r}: {dtype}{shape} does not fit {end - begin} bytes", field=label
        )
    return begin, end


def _check_metadata(metadata: Any, *, label: str) -> None:
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise InvalidWeights("__metadata__ must map strings to strings", field=label)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


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

"""Structural reading of a GGUF file's header, so that a file that is not a model is refused
before a loader parses it (and a model is sized before anything is allocated).

Layout (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md, versions 2 and 3, little
endian): ``GGUF``, a uint32 version, uint64 tensor and key-value counts, the key-value pairs
(a string key, a uint32 type, the value), then per tensor its name, uint32 dimension count,
uint64 dimensions, uint32 type and uint64 data offset. Strings are a uint64 length and UTF-8
bytes. Every length is checked against what is left of the file before it is used; arrays are
counted, never materialised (a tokenizer's vocabulary is tens of thousands of strings).
"""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

from registry.errors import InvalidWeights

MAGIC = b"GGUF"
VERSIONS = (2, 3)
MAX_TENSORS = 1_000_000
MAX_KEYS = 1_000_000
MAX_DIMS = 4  # ggml's GGML_MAX_DIMS
MAX_KEY_BYTES = 65_535

# value type -> struct format of a scalar; 8 (string) and 9 (array) are read apart
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
            11: "<q", 12: "<d"}  # fmt: skip
STRING, ARRAY = 8, 9

Scalar = int | float | bool | str


@dataclass(frozen=True)
class GgufArray:
    """An array value: its element type and length (the elements are not kept)."""

    type: int
    count: int


@dataclass(frozen=True)
class GgufHeader:
    version: int
    metadata: dict[str, Scalar | GgufArray]
    tensors: dict[str, tuple[int, ...]]  # name -> dimensions, in ggml's order (fastest first)

    @property
    def parameters(self) -> int:
        return sum(math.prod(dims) for dims in self.tensors.values())


class _Reader:
    def __init__(self, data: mmap.mmap | bytes, label: str) -> None:
        self.data, self.pos, self.label = data, 0, label

    def fail(self, reason: str) -> InvalidWeights:
        return InvalidWeights(reason, field=self.label)

    def take(self, size: int) -> int:
        """Advance past `size` bytes; returns where they start."""
        if size < 0 or size > len(self.data) - self.pos:
            raise self.fail(f"truncated at byte {self.pos}: {size} more bytes announced")
        start, self.pos = self.pos, self.pos + size
        return start

    def scalar(self, fmt: str) -> int | float | bool:
        value: int | float | bool = struct.unpack_from(
            fmt, self.data, self.take(struct.calcsize(fmt))
        )[0]
        return value

    def string(self, *, limit: int | None = None) -> str:
        size = int(self.scalar("<Q"))
        if limit is not None and size > limit:
            raise self.fail(f"a {size}-byte string at byte {self.pos} is over the limit")
        start = self.take(size)
        try:
            return bytes(self.data[start : start + size]).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise self.fail(f"a string at byte {start} is not UTF-8") from exc

    def skip_string(self) -> None:
        self.take(int(self.scalar("<Q")))

    def value(self, kind: int, *, depth: int = 0) -> Scalar | GgufArray:
        if kind in _SCALARS:
            return self.scalar(_SCALARS[kind])
        if kind == STRING:
            return self.string()
        if kind != ARRAY or depth > 1:
            raise self.fail(f"unknown value type {kind} at byte {self.pos}")
        element, count = int(self.scalar("<I")), int(self.scalar("<Q"))
        if element in _SCALARS:
            self.take(struct.calcsize(_SCALARS[element]) * count)
        elif element == STRING:
            if count > len(self.data) - self.pos:  # every string takes at least its length
                raise self.fail(f"an array of {count} strings is longer than the file")
            for _ in range(count):
                self.skip_string()
        else:
            for _ in range(count):
                self.value(element, depth=depth + 1)
        return GgufArray(type=element, count=count)


def read_gguf_header(path: Path, *, name: str | None = None) -> GgufHeader:
    """The header of the GGUF file at `path`; InvalidWeights (field `name`, default the file's
    name) for anything that is not a well-formed GGUF header."""
    label = name or Path(path).name
    with Path(path).open("rb") as f:
        size = f.seek(0, 2)
        if size < 24:
            raise InvalidWeights("not a GGUF file", field=label)
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return _parse(_Reader(data, label))


def _parse(r: _Reader) -> GgufHeader:
    if bytes(r.data[:4]) != MAGIC:
        raise r.fail("not a GGUF file")
    r.take(4)
    version = int(r.scalar("<I"))
    if version not in VERSIONS:
        raise r.fail(f"GGUF version {version} is not supported (only {list(VERSIONS)})")
    n_tensors, n_keys = int(r.scalar("<Q")), int(r.scalar("<Q"))
    if n_tensors > MAX_TENSORS or n_keys > MAX_KEYS:
        raise r.fail(f"{n_tensors} tensors and {n_keys} keys: over the limit")
    metadata: dict[str, Scalar | GgufArray] = {}
    for _ in range(n_keys):
        key = r.string(limit=MAX_KEY_BYTES)
        if key in metadata:
            raise r.fail(f"duplicate key {key!r}")
        metadata[key] = r.value(int(r.scalar("<I")))
    tensors: dict[str, tuple[int, ...]] = {}
    for _ in range(n_tensors):
        tensor = r.string(limit=MAX_KEY_BYTES)
        n_dims = int(r.scalar("<I"))
        if not 1 <= n_dims <= MAX_DIMS or tensor in tensors:
            raise r.fail(f"tensor {tensor!r}: duplicate, or {n_dims} dimensions")
        dims = tuple(int(r.scalar("<Q")) for _ in range(n_dims))
        if min(dims) < 1:
            raise r.fail(f"tensor {tensor!r} has an empty dimension: {list(dims)}")
        r.take(12)  # its type (uint32) and data offset (uint64): the loader checks the data
        tensors[tensor] = dims
    return GgufHeader(version=version, metadata=metadata, tensors=tensors)

"""read_gguf_header: a GGUF's header as the reference reader (the `gguf` package) reads it, and
each kind of malformed file refused with a reason, every length checked before it is used."""

from __future__ import annotations

import math
import struct
from pathlib import Path

import numpy as np
import pytest

from registry.artifacts.gguf import GgufArray, read_gguf_header
from registry.errors import InvalidWeights

gguf = pytest.importorskip("gguf")  # the `gguf` extra


def written_gguf(path: Path, *, vocab: int = 40, hidden: int = 8) -> Path:
    """A small llama GGUF written by the reference writer."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_vocab_size(vocab)
    writer.add_float32("llama.rope.freq_base", 10000.0)
    writer.add_token_list([f"tok{i}" for i in range(vocab)])
    writer.add_array("some.numbers", [1, 2, 3])
    writer.add_tensor("token_embd.weight", np.zeros((vocab, hidden), dtype=np.float32))
    for layer in range(2):
        writer.add_tensor(f"blk.{layer}.ffn_up.weight", np.zeros((16, hidden), dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_a_header_reads_as_the_reference_reader_reads_it(tmp_path: Path) -> None:
    path = written_gguf(tmp_path / "m.gguf")
    header = read_gguf_header(path)
    reference = gguf.GGUFReader(str(path))
    assert header.tensors == {
        t.name: tuple(int(d) for d in t.shape) for t in reference.tensors
    }  # ggml's order, fastest dimension first: token_embd is (hidden, vocab)
    assert header.tensors["token_embd.weight"] == (8, 40)
    assert (
        header.parameters
        == sum(int(t.n_elements) for t in reference.tensors)
        == 40 * 8 + 2 * 16 * 8
    )
    for key, field in reference.fields.items():
        if key.startswith("GGUF."):  # the reader's own entries: version and counts
            continue
        ours = header.metadata[key]
        if isinstance(ours, GgufArray):
            assert ours.count == len(field.data)
        elif isinstance(ours, str):
            assert ours == field.contents()
        else:
            assert ours == pytest.approx(field.contents())
    assert header.metadata["tokenizer.ggml.tokens"] == GgufArray(type=8, count=40)
    assert header.metadata["llama.block_count"] == 2


def _raw(*parts: bytes) -> bytes:
    return b"".join(parts)


def _string(text: str | bytes, length: int | None = None) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw) if length is None else length) + raw


def _header(n_tensors: int, n_keys: int, version: int = 3) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_keys)


def _kv_u32(key: str, value: int) -> bytes:
    return _string(key) + struct.pack("<II", 4, value)


def _tensor(name: str, dims: list[int]) -> bytes:
    return _string(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims) + \
        struct.pack("<IQ", 0, 0)  # fmt: skip


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "not a GGUF file"),
        (b"root:x:0:0:root:/root:/bin/bash\n" * 3, "not a GGUF file"),
        (_header(0, 0, version=1), "version 1 is not supported"),
        (_header(0, 1) + struct.pack("<Q", 2**40), "over the limit"),  # a 1 TiB key
        (_header(0, 1) + _string("k") + struct.pack("<IQ", 8, 2**40), "truncated"),  # value
        (_header(0, 1) + _string("k" * 70_000), "over the limit"),
        (_header(0, 2) + _kv_u32("a", 1) + _kv_u32("a", 2), "duplicate key"),
        (_header(0, 1) + _string("k") + struct.pack("<I", 99), "unknown value type 99"),
        # an array announcing more strings than the file has bytes
        (_header(0, 1) + _string("k") + struct.pack("<IIQ", 9, 8, 2**50), "longer than the file"),
        # an array of 2**60 uint32: its byte length is checked, never allocated
        (_header(0, 1) + _string("k") + struct.pack("<IIQ", 9, 4, 2**60), "truncated"),
        (_header(1, 0) + _tensor("t", [4, 0]), "empty dimension"),
        (_header(1, 0) + _tensor("t", [1, 1, 1, 1, 1]), "5 dimensions"),
        (_header(2, 0) + _tensor("t", [4]) + _tensor("t", [4]), "duplicate"),
        (_header(2, 0) + _tensor("t", [4]), "truncated"),  # a tensor announced, not there
        (_header(2**40, 0), "over the limit"),
    ],
)
def test_malformed_headers_are_refused_with_a_reason(
    tmp_path: Path, content: bytes, reason: str
) -> None:
    path = tmp_path / "bad.gguf"
    path.write_bytes(content + b"\0" * (24 - len(content) if len(content) < 24 and content else 0))
    with pytest.raises(InvalidWeights, match=reason) as exc:
        read_gguf_header(path, name="base.path")
    assert exc.value.field == "base.path"


def test_a_real_file_cut_anywhere_is_refused(tmp_path: Path) -> None:
    whole = written_gguf(tmp_path / "m.gguf").read_bytes()
    header_end = len(whole) - 4 * (40 * 8) - 2 * 2 * (16 * 8)  # at most: the tensor data
    for cut in sorted({24, 30, 100, header_end // 2, math.floor(header_end * 0.9)}):
        path = tmp_path / f"cut{cut}.gguf"
        path.write_bytes(whole[:cut])
        with pytest.raises(InvalidWeights, match="truncated"):
            read_gguf_header(path)

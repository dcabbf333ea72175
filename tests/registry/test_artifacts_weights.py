"""validate_safetensors: real files pass, and each kind of malformed file gets a clear reason."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from registry.artifacts import validate_safetensors
from registry.errors import InvalidWeights


def st_bytes(header: Any, data: bytes = b"", *, header_len: int | None = None) -> bytes:
    """A safetensors file: u64 little-endian header length, header JSON, data buffer."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data


def f32(offsets: list[int], shape: list[int] | None = None) -> dict[str, Any]:
    return {
        "dtype": "F32",
        "shape": shape or [(offsets[1] - offsets[0]) // 4],
        "data_offsets": offsets,
    }


def valid_file(tmp_path: Path) -> Path:
    path = tmp_path / "valid.safetensors"
    save_file(
        {
            "lora_A": torch.randn(4, 8),
            "lora_B": torch.randn(8, 4, dtype=torch.bfloat16),
            "steps": torch.tensor([3], dtype=torch.int64),
            "mask": torch.tensor([True, False, True]),
            "empty": torch.zeros(0, 5),
        },
        path,
        metadata={"format": "pt"},
    )
    return path


def test_real_files_pass(tmp_path: Path) -> None:
    validate_safetensors(valid_file(tmp_path))
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(st_bytes({}))
    validate_safetensors(empty)
    padded = tmp_path / "padded.safetensors"  # the spec allows trailing spaces in the header
    padded.write_bytes(st_bytes(json.dumps({"w": f32([0, 8])}).encode() + b"    ", bytes(8)))
    validate_safetensors(padded)


HUGE = 2**62
# What the reference parser (safe_open) refuses is named in its own words; the length, JSON
# and duplicate-key checks before it are ours.
CASES: dict[str, tuple[bytes, str]] = {
    "shorter than the length prefix": (b"\x10\x00\x00", "truncated"),
    "header length huge": (st_bytes({}, header_len=HUGE), "over the limit"),
    "header length beyond the file": (st_bytes({}, header_len=1000), "exceeds the file"),
    "header not JSON": (st_bytes(b"{not json"), "not valid JSON"),
    "header not UTF-8": (st_bytes(b'{"\xff": 1}'), "not valid JSON"),
    "header an array": (st_bytes(b"[1, 2]"), "not a JSON object"),
    "duplicate tensor": (st_bytes(b'{"w": {}, "w": {}}'), "duplicate key"),
    "missing field": (
        st_bytes({"w": {"dtype": "F32", "shape": [1]}}),
        "missing field `data_offsets`",
    ),
    "unknown dtype": (
        st_bytes({"w": {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}}, bytes(16)),
        "unknown variant `F128`",
    ),
    "negative dimension": (
        st_bytes({"w": f32([0, 4], shape=[-1])}, bytes(4)),
        "invalid value: integer `-1`",
    ),
    "offsets out of bounds": (st_bytes({"w": f32([0, 400])}, bytes(16)), "file not fully covered"),
    "offsets reversed": (
        st_bytes({"w": f32([8, 0], shape=[2])}, bytes(8)),
        "invalid offset for tensor `w`",
    ),
    "offsets not a pair": (
        st_bytes({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0]}}, bytes(4)),
        "expected a tuple of size 2",
    ),
    "shape does not fit offsets": (
        st_bytes({"w": f32([0, 8], shape=[3])}, bytes(8)),
        "invalid shape, data type, or offset",
    ),
    "overlapping tensors": (
        st_bytes({"a": f32([0, 8]), "b": f32([4, 12])}, bytes(12)),
        "invalid offset for tensor `b`",
    ),
    "gap between tensors": (
        st_bytes({"a": f32([0, 4]), "b": f32([8, 12])}, bytes(12)),
        "invalid offset for tensor `b`",
    ),
    "trailing bytes": (st_bytes({"w": f32([0, 8])}, bytes(12)), "file not fully covered"),
    "metadata not strings": (
        st_bytes({"__metadata__": {"step": 3}, "w": f32([0, 4])}, bytes(4)),
        "__metadata__",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_malformed_files_are_refused(tmp_path: Path, case: str) -> None:
    data, reason = CASES[case]
    path = tmp_path / "bad.safetensors"
    path.write_bytes(data)

    with pytest.raises(InvalidWeights, match=reason) as err:
        validate_safetensors(path, name="adapters/bad.safetensors")

    assert err.value.field == "adapters/bad.safetensors"


@pytest.mark.parametrize("cut", [1, 3, 100])
def test_truncated_real_file_is_refused(tmp_path: Path, cut: int) -> None:
    data = valid_file(tmp_path).read_bytes()
    path = tmp_path / "truncated.safetensors"
    path.write_bytes(data[:-cut])

    with pytest.raises(InvalidWeights) as err:
        validate_safetensors(path)

    assert err.value.field == "truncated.safetensors"
    with pytest.raises(SafetensorError):  # the reference parser agrees it is broken
        safe_open(str(path), framework="numpy")


def test_split_per_tensor_loads_the_same_model_and_shares_unchanged_tensors(
    tmp_path: Path,
) -> None:
    """One file per tensor: transformers loads the index, and two snapshots that differ in one
    tensor share every other tensor's blob."""
    import torch

    from continual.models import build_tiny_llama, load_causal_lm
    from registry.artifacts import LocalStore, put_tree, read_manifest, split_per_tensor

    model, tokenizer = build_tiny_llama(seed=0)
    dirs = []
    for version in range(2):
        folder = tmp_path / f"v{version}"
        if version == 1:
            with torch.no_grad():
                model.model.layers[0].self_attn.q_proj.weight.add_(1.0)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        with safe_open(str(folder / "model.safetensors"), framework="pt") as saved:
            names = set(saved.keys())
        count = split_per_tensor(folder)
        assert count == len(names) > 10
        assert not list(folder.glob("*.safetensors"))
        assert len(list((folder / "tensors").glob("*.safetensors"))) == count
        dirs.append(folder)
    loaded, _ = load_causal_lm(dirs[1])
    ids = torch.tensor([[1, 5, 9, 13]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    store = LocalStore(tmp_path / "blobs")
    trees = [read_manifest(store, put_tree(store, d))["files"] for d in dirs]
    changed = {rel for rel, f in trees[1].items() if trees[0].get(rel) != f}
    assert changed == {
        "tensors/model.layers.0.self_attn.q_proj.weight.safetensors"
    }  # only the edited tensor (and the manifest) is new

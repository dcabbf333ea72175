"""Directory trees in the artifact store: a real PEFT adapter round trip, and every refusal."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from registry.artifacts import (
    TREE_KIND,
    ArtifactStore,
    LocalStore,
    TreeManifest,
    get_tree,
    put_tree,
    read_manifest,
    trees,
)
from registry.errors import IntegrityError, InvalidValue, InvalidWeights, UnsafeArtifact

TINY_LLAMA = LlamaConfig(
    vocab_size=64,
    hidden_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=2,
    intermediate_size=64,
    max_position_embeddings=32,
)


@dataclass(frozen=True)
class SavedAdapter:
    directory: Path
    base_state: dict[str, torch.Tensor]
    input_ids: torch.Tensor  # (B, T)
    logits: torch.Tensor  # (B, T, vocab) of base + adapter
    base_logits: torch.Tensor  # (B, T, vocab) of the base alone


@pytest.fixture(scope="module")
def saved_adapter(tmp_path_factory: pytest.TempPathFactory) -> SavedAdapter:
    torch.manual_seed(0)
    base = LlamaForCausalLM(TINY_LLAMA).eval()
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    input_ids = torch.randint(0, TINY_LLAMA.vocab_size, (2, 8))
    with torch.no_grad():
        base_logits = base(input_ids).logits
    # init_lora_weights=False makes B non-zero, so the adapter really changes the logits.
    lora = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    model = get_peft_model(base, lora).eval()
    with torch.no_grad():
        logits = model(input_ids).logits
    directory = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(str(directory))
    return SavedAdapter(directory, base_state, input_ids, logits, base_logits)


def fresh_base(state: dict[str, torch.Tensor]) -> LlamaForCausalLM:
    model = LlamaForCausalLM(TINY_LLAMA)
    model.load_state_dict(state)
    return model.eval()


def _digest_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _store_dirs(store: ArtifactStore) -> list[str]:
    """What ``tmp_path`` holds besides the test's own files: the local store's root."""
    return ["blobs"] if isinstance(store, LocalStore) else []


def put_manifest(store: ArtifactStore, files: dict[str, object]) -> str:
    return store.put_bytes(json.dumps({"kind": TREE_KIND, "files": files}).encode())


def test_peft_adapter_round_trip(
    artifact_store: ArtifactStore, saved_adapter: SavedAdapter, tmp_path: Path
) -> None:
    digest = put_tree(artifact_store, saved_adapter.directory)
    manifest = read_manifest(artifact_store, digest)
    restored = get_tree(artifact_store, digest, tmp_path / "restored")

    on_disk = {p.name: p.stat().st_size for p in saved_adapter.directory.iterdir()}
    assert manifest["kind"] == TREE_KIND
    assert {rel: f["size"] for rel, f in manifest["files"].items()} == on_disk
    assert {"adapter_config.json", "adapter_model.safetensors"} <= on_disk.keys()
    for rel in on_disk:
        assert (restored / rel).read_bytes() == (saved_adapter.directory / rel).read_bytes()
    model = PeftModel.from_pretrained(fresh_base(saved_adapter.base_state), restored).eval()
    with torch.no_grad():
        logits = model(saved_adapter.input_ids).logits
    assert torch.equal(logits, saved_adapter.logits)
    assert not torch.allclose(logits, saved_adapter.base_logits)  # the adapter did something
    assert put_tree(artifact_store, saved_adapter.directory) == digest  # deterministic


def test_get_tree_hands_each_file_on_in_path_order_then_says_verified_before_it_is_durable(
    artifact_store: ArtifactStore, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    (src / "b").mkdir(parents=True)
    files = {"z.json": b'{"z": 1}', "b/a.txt": os.urandom(3 * 2**20 + 5), "a.md": b""}
    for rel, data in files.items():
        (src / rel).write_bytes(data)
    digest = put_tree(artifact_store, src)
    dest = tmp_path / "dest"
    events: list[tuple[str, bytes]] = []

    def verified() -> None:
        assert not dest.exists()  # told before the copy is durable and in place
        events.append(("verified", b""))

    get_tree(artifact_store, digest, dest, manifest=read_manifest(artifact_store, digest),
             tee=lambda rel, chunk: events.append((rel, chunk)), on_verified=verified)  # fmt: skip
    assert events[-1] == ("verified", b"")
    order = [rel for rel, _ in events[:-1]]
    assert order == sorted(order) and set(order) == {"b/a.txt", "z.json"}  # "a.md" has no bytes
    received: dict[str, bytes] = {}
    for rel, chunk in events[:-1]:
        received[rel] = received.get(rel, b"") + chunk
    assert received == {rel: data for rel, data in files.items() if data}
    assert all((dest / rel).read_bytes() == data for rel, data in files.items())


def test_get_tree_fetches_several_files_at_once_and_still_hands_them_on_in_order(
    artifact_store: ArtifactStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(12):
        (src / f"f{i:02}.txt").write_bytes(os.urandom(1000 + i))
    digest = put_tree(artifact_store, src)
    running, most = [0], [0]
    lock = threading.Lock()
    get_file = artifact_store.get_file

    def counted(*args: Any, **kwargs: Any) -> Path:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        try:
            time.sleep(0.02)
            return get_file(*args, **kwargs)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(artifact_store, "get_file", counted)
    get_tree(artifact_store, digest, tmp_path / "at-once")
    assert most[0] == trees.FETCH_THREADS > 1
    most[0] = 0
    seen: list[tuple[str, bytes]] = []
    get_tree(artifact_store, digest, tmp_path / "in-order",
             tee=lambda rel, chunk: seen.append((rel, chunk)))  # fmt: skip
    assert most[0] > 1  # the files after the one passed on are fetched meanwhile
    assert [rel for rel, _ in seen] == sorted(p.name for p in src.iterdir())  # one chunk each
    assert all(chunk == (src / rel).read_bytes() for rel, chunk in seen)
    monkeypatch.setattr(trees, "FETCH_THREADS", 1)
    most[0] = 0
    get_tree(artifact_store, digest, tmp_path / "one-by-one")
    assert most[0] == 1
    for name in ("at-once", "in-order", "one-by-one"):
        assert {p.name: p.read_bytes() for p in (tmp_path / name).iterdir()} == {
            p.name: p.read_bytes() for p in src.iterdir()
        }


def test_nested_tree_round_trip_and_canonical_manifest(
    artifact_store: ArtifactStore, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    (src / "tokenizer").mkdir(parents=True)
    (src / "tokenizer" / "vocab.json").write_text('{"a": 0}')
    (src / "tokenizer" / "merges.txt").write_text("#version: 0.2\n")
    (src / "chat_template.jinja").write_text("{{ messages }}")
    (src / "LICENSE").write_text("MIT")
    (src / "empty_dir").mkdir()

    digest = put_tree(artifact_store, src)
    dest = get_tree(artifact_store, digest, tmp_path / "dest")

    raw = artifact_store.get_bytes(digest)
    assert raw == json.dumps(json.loads(raw), sort_keys=True, separators=(",", ":")).encode()
    assert list(json.loads(raw)["files"]) == [
        "LICENSE",
        "chat_template.jinja",
        "tokenizer/merges.txt",
        "tokenizer/vocab.json",
    ]
    assert (dest / "tokenizer" / "merges.txt").read_text() == "#version: 0.2\n"
    assert (dest / "LICENSE").read_text() == "MIT"
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".part")] == []


def test_a_derived_tree_reuses_stored_entries_and_replaces_what_it_writes(
    artifact_store: ArtifactStore, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "config.json").write_text('{"a": 1}')
    (src / "sub" / "x.json").write_text('{"x": 1}')
    parent = read_manifest(artifact_store, put_tree(artifact_store, src))["files"]
    change = tmp_path / "change"
    (change / "sub").mkdir(parents=True)
    (change / "sub" / "x.json").write_text('{"x": 2}')
    derived = put_tree(artifact_store, change, reuse=parent)
    dest = get_tree(artifact_store, derived, tmp_path / "dest")
    assert (dest / "config.json").read_text() == '{"a": 1}'  # reused, never re-read
    assert (dest / "sub" / "x.json").read_text() == '{"x": 2}'  # replaced
    files = read_manifest(artifact_store, derived)["files"]
    assert files["config.json"] == parent["config.json"]
    # the same files stored whole give the same tree
    (change / "config.json").write_text('{"a": 1}')
    assert put_tree(artifact_store, change) == derived

    # a reused blob that is not stored, or a reused path a new file nests under, is refused
    # before anything is uploaded
    (tmp_path / "more").mkdir()
    (tmp_path / "more" / "new.json").write_text('{"new": true}')
    ghost = {"gone.json": {"digest": "0" * 64, "size": 3}}
    with pytest.raises(InvalidValue) as missing:
        put_tree(artifact_store, tmp_path / "more", reuse={**parent, **ghost})
    assert missing.value.field == "gone.json"
    nested = tmp_path / "nested"
    (nested / "config.json").mkdir(parents=True)
    (nested / "config.json" / "y.json").write_text("{}")
    with pytest.raises(UnsafeArtifact):
        put_tree(artifact_store, nested, reuse=parent)
    new_digest = hashlib.sha256(b'{"new": true}').hexdigest()
    assert not artifact_store.exists(new_digest)


def test_get_tree_into_an_existing_empty_directory(
    artifact_store: ArtifactStore, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text("{}")
    (tmp_path / "dest").mkdir()

    get_tree(artifact_store, put_tree(artifact_store, src), tmp_path / "dest")

    assert (tmp_path / "dest" / "config.json").read_text() == "{}"


@pytest.mark.parametrize(
    "name",
    ["pytorch_model.bin", "optimizer.pt", "rng_state.pth", "state.pkl", "a.pickle",
     "model.ckpt", "x.npy", "train.py", "Makefile", ".DS_Store", "MODEL.BIN"],
)  # fmt: skip
def test_put_tree_refuses_unsafe_files(
    artifact_store: ArtifactStore, tmp_path: Path, name: str
) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "adapter_config.json").write_text("{}")
    (src / "sub" / name).write_bytes(b"\x80\x04K\x01.")  # pickle of 1

    with pytest.raises(UnsafeArtifact) as err:
        put_tree(artifact_store, src)

    assert err.value.field == f"sub/{name}"
    assert not artifact_store.exists(_digest_of(b"{}"))  # checks come before any upload


def test_put_tree_refuses_symlinks(artifact_store: ArtifactStore, tmp_path: Path) -> None:
    outside = tmp_path / "secret.txt"
    outside.write_text("not for the store")
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text("{}")
    (src / "link.txt").symlink_to(outside)
    with pytest.raises(UnsafeArtifact) as err:
        put_tree(artifact_store, src)
    assert err.value.field == "link.txt"

    (src / "link.txt").unlink()
    (src / "linked_dir").symlink_to(tmp_path, target_is_directory=True)
    with pytest.raises(UnsafeArtifact) as err:
        put_tree(artifact_store, src)
    assert err.value.field == "linked_dir"
    assert not artifact_store.exists(_digest_of(b"not for the store"))


def test_put_tree_refuses_invalid_safetensors(
    artifact_store: ArtifactStore, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    save_file({"w": torch.ones(4, 4)}, src / "adapter_model.safetensors")
    data = (src / "adapter_model.safetensors").read_bytes()
    (src / "adapter_model.safetensors").write_bytes(data[:-5])

    with pytest.raises(InvalidWeights) as err:
        put_tree(artifact_store, src)

    assert err.value.field == "adapter_model.safetensors"
    assert not artifact_store.exists(_digest_of(data[:-5]))


def test_put_tree_refuses_non_directories(artifact_store: ArtifactStore, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.json").write_text("{}")
    for path in (tmp_path / "empty", tmp_path / "file.json", tmp_path / "missing"):
        with pytest.raises(InvalidValue) as err:
            put_tree(artifact_store, path)
        assert err.value.field == "directory"


@pytest.mark.parametrize(
    "rel",
    ["../x.json", "a/../../x.json", "/etc/passwd.json", "a\\..\\x.json", "a\x00.json",
     "a\n.json", "", "./a.json", "a//b.json", "a/", "pytorch_model.bin"],
)  # fmt: skip
def test_manifest_with_unsafe_path_is_refused(
    artifact_store: ArtifactStore, tmp_path: Path, rel: str
) -> None:
    blob = artifact_store.put_bytes(b"{}")
    digest = put_manifest(artifact_store, {rel: {"digest": blob, "size": 2}})
    dest = tmp_path / "work" / "dest"

    with pytest.raises(UnsafeArtifact):
        read_manifest(artifact_store, digest)
    with pytest.raises(UnsafeArtifact):
        get_tree(artifact_store, digest, dest)

    assert not dest.exists()
    assert not (tmp_path / "x.json").exists()
    assert not (tmp_path / "work" / "x.json").exists()


def test_manifest_with_file_used_as_directory_is_refused(
    artifact_store: ArtifactStore, tmp_path: Path
) -> None:
    blob = artifact_store.put_bytes(b"{}")
    entry = {"digest": blob, "size": 2}
    digest = put_manifest(artifact_store, {"a.json": entry, "a.json/b.json": entry})

    with pytest.raises(UnsafeArtifact) as err:
        get_tree(artifact_store, digest, tmp_path / "dest")
    assert err.value.field == "a.json"


def _manifest_body(files: object, kind: str = TREE_KIND) -> bytes:
    return json.dumps({"kind": kind, "files": files}).encode()


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"\xff\xfe",
        b"[]",
        _manifest_body({}, kind="other/v1"),
        _manifest_body([]),
        _manifest_body({"a.json": "0" * 64}),
        _manifest_body({"a.json": {"digest": "../x", "size": 1}}),
        _manifest_body({"a.json": {"digest": "0" * 64, "size": -1}}),
        _manifest_body({"a.json": {"digest": "0" * 64, "size": True}}),
        _manifest_body({"a.json": {"size": 1}}),
    ],
)
def test_malformed_manifest_is_refused(artifact_store: ArtifactStore, body: bytes) -> None:
    digest = artifact_store.put_bytes(body)

    with pytest.raises(InvalidValue) as err:
        read_manifest(artifact_store, digest)

    assert err.value.field in {"manifest", "digest"}


def test_get_tree_refuses_a_non_empty_destination(
    artifact_store: ArtifactStore, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text("{}")
    digest = put_tree(artifact_store, src)

    with pytest.raises(InvalidValue) as err:
        get_tree(artifact_store, digest, src)

    assert err.value.field == "dest"
    assert (src / "config.json").read_text() == "{}"


def test_get_tree_with_a_corrupt_blob_leaves_nothing(
    artifact_store: ArtifactStore,
    corrupt_blob: Callable[[ArtifactStore, str, bytes], None],
    tmp_path: Path,
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.json").write_text('{"a": 1}')
    (src / "b.json").write_text('{"b": 2}')
    digest = put_tree(artifact_store, src)
    corrupt_blob(artifact_store, _digest_of(b'{"b": 2}'), b'{"b": 3}')

    with pytest.raises(IntegrityError):
        get_tree(artifact_store, digest, tmp_path / "dest")

    assert not (tmp_path / "dest").exists()
    assert sorted(os.listdir(tmp_path)) == sorted(["src", *_store_dirs(artifact_store)])


def test_get_tree_validates_safetensors(artifact_store: ArtifactStore, tmp_path: Path) -> None:
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 400]}}).encode()
    bad = len(header).to_bytes(8, "little") + header + bytes(16)
    blob = artifact_store.put_bytes(bad)  # the store itself takes any bytes
    digest = put_manifest(
        artifact_store, {"adapter_model.safetensors": {"digest": blob, "size": len(bad)}}
    )

    with pytest.raises(InvalidWeights) as err:
        get_tree(artifact_store, digest, tmp_path / "dest")

    assert err.value.field == "adapter_model.safetensors"
    assert not (tmp_path / "dest").exists()


def test_get_tree_checks_sizes(artifact_store: ArtifactStore, tmp_path: Path) -> None:
    blob = artifact_store.put_bytes(b"{}")
    digest = put_manifest(artifact_store, {"a.json": {"digest": blob, "size": 3}})

    with pytest.raises(IntegrityError):
        get_tree(artifact_store, digest, tmp_path / "dest")

    assert not (tmp_path / "dest").exists()
    assert sorted(os.listdir(tmp_path)) == _store_dirs(artifact_store)


def test_get_tree_loses_a_race_cleanly(
    artifact_store: ArtifactStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text('{"mine": true}')
    digest = put_tree(artifact_store, src)
    dest = tmp_path / "dest"
    real_read_manifest = trees.read_manifest

    def other_process_wins(store: ArtifactStore, digest: str) -> TreeManifest:
        manifest = real_read_manifest(store, digest)
        dest.mkdir()
        (dest / "config.json").write_text('{"theirs": true}')
        return manifest

    monkeypatch.setattr(trees, "read_manifest", other_process_wins)
    with pytest.raises(InvalidValue) as err:
        get_tree(artifact_store, digest, dest)

    assert err.value.field == "dest"
    assert (dest / "config.json").read_text() == '{"theirs": true}'
    assert sorted(os.listdir(tmp_path)) == sorted(["dest", "src", *_store_dirs(artifact_store)])

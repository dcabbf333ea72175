"""Importing base models as snapshot v0: a model directory, a GGUF file, and refusals."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from continual.models import build_tiny_llama, load_causal_lm
from registry.artifacts import read_manifest
from registry.errors import InvalidValue, InvalidWeights
from registry.instance import Instance
from registry.settings import StrataSettings
from services.imports import NOT_IMPORTABLE, check_source
from services.imports import check_import as cheap_check
from services.trees import fetch_tree
from tests.workers.helpers import _hf_dir
from workers.imports import check_import
from workers.models import (
    load_snapshot,
    load_source,
    store_derived,
    store_model,
)
from workers.streams import create_stream


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def test_import_hf_directory_reproduces_the_model(instance: Instance, tmp_path: Path) -> None:
    model, tok = build_tiny_llama(seed=3)
    model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    tok.save_pretrained(tmp_path / "hf")
    stream, snap = create_stream(
        instance, name="from-dir", base={"kind": "hf", "path": str(tmp_path / "hf")}
    )
    assert snap.version == 0 and stream.base_source["kind"] == "hf"
    loaded, loaded_tok = load_snapshot(instance, snap)
    ids = tok("good red sport", return_tensors="pt").input_ids
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids), rtol=0, atol=0)
    assert loaded_tok("good red sport").input_ids == tok("good red sport").input_ids


def test_pickled_or_missing_weights_are_refused(instance: Instance, tmp_path: Path) -> None:
    model, tok = build_tiny_llama(seed=3)
    pickled = tmp_path / "pickled"
    model.config.save_pretrained(pickled)
    tok.save_pretrained(pickled)
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(InvalidWeights) as exc:
        create_stream(instance, name="pickled", base={"kind": "hf", "path": str(pickled)})
    assert exc.value.field == "base.path"
    bogus = tmp_path / "bogus"
    bogus.mkdir()
    (bogus / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    save_file({"x": torch.zeros(1)}, str(bogus / "other.safetensors"))
    with pytest.raises(InvalidWeights) as corrupt:
        create_stream(instance, name="bogus", base={"kind": "hf", "path": str(bogus)})
    assert corrupt.value.field == "base.path/model.safetensors"
    lacking = tmp_path / "lacking"  # well-formed, but without a weight the model needs
    model.save_pretrained(lacking, safe_serialization=True)
    tok.save_pretrained(lacking)
    weights = load_file(lacking / "model.safetensors")
    del weights["model.norm.weight"]
    save_file(weights, str(lacking / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(InvalidWeights, match=r"model\.norm\.weight") as missing:
        create_stream(instance, name="lacking", base={"kind": "hf", "path": str(lacking)})
    assert missing.value.field == "base.path"
    for source, field in [
        ({"kind": "gguf", "path": str(pickled)}, "base.path"),  # a directory, not a file
        ({"kind": "tiny", "seed": "x"}, "base.seed"),
        ({"kind": "s3"}, "base.kind"),
    ]:
        with pytest.raises(InvalidValue) as bad:
            check_source(source)
        assert bad.value.field == field
    assert instance.registry.streams.list_streams() == []


@pytest.mark.slow
def test_import_smollm2_gguf(instance: Instance, tmp_path: Path) -> None:
    """The real pretrained LM: dequantized from GGUF, stored as safetensors, reloaded exactly."""
    model, tok = load_source({"kind": "smollm2"})
    assert model.hf_quantizer is None and not hasattr(model.config, "quantization_config")
    assert next(model.parameters()).dtype == torch.float32
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        greedy = model.generate(ids, max_new_tokens=2, do_sample=False)
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    assert tied and model.config.tie_word_embeddings  # the GGUF has no separate output weight
    assert "Paris" in tok.decode(greedy[0, ids.shape[1] :])
    digest = store_model(instance, model, tok)
    stream = instance.registry.streams.create(
        name="smol", base_source={"kind": "smollm2"}, method="seq-lora", hyperparams={},
        base_digest=digest,
    )  # fmt: skip
    snap = instance.registry.streams.current_snapshot(stream.id)
    reloaded, _ = load_snapshot(instance, snap)
    torch.testing.assert_close(_logits(reloaded, ids), _logits(model, ids), rtol=0, atol=0)


def test_a_derived_snapshot_writes_only_the_tensors_that_changed(instance: Instance) -> None:
    model, tok = build_tiny_llama(seed=3)
    parent = store_model(instance, model, tok)
    names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"]
    with torch.no_grad():
        for name in names:
            model.get_parameter(name).add_(0.5)
    derived = store_derived(instance, model, parent=parent, changed=names)
    whole = store_model(instance, model, tok)  # the same model saved and split in full
    old, new, full = (
        read_manifest(instance.artifacts, d)["files"] for d in (parent, derived, whole)
    )
    tensors = sorted(rel for rel in full if rel.startswith("tensors/"))
    assert tensors == sorted(rel for rel in new if rel.startswith("tensors/"))
    assert all(new[rel] == full[rel] for rel in tensors)  # byte for byte what a split writes
    assert sorted(rel for rel in new if new[rel] != old[rel]) == [
        f"tensors/{name}.safetensors" for name in names
    ]
    loaded, _ = load_causal_lm(fetch_tree(instance, derived))
    ids = tok("good red sport", return_tensors="pt").input_ids
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids), rtol=0, atol=0)
    with pytest.raises(InvalidValue) as bad:
        store_derived(instance, model, parent=parent, changed=["model.no_such.weight"])
    assert bad.value.field == "changed"


# -- what may be imported, checked before anything is loaded --------------------------------------
def test_paths_outside_the_import_roots_get_the_same_answer_as_absent_ones(tmp_path: Path) -> None:
    root, elsewhere = tmp_path / "imports", tmp_path / "private"
    model = _hf_dir(root / "models" / "m")
    _hf_dir(elsewhere / "secret")
    (root / "escape").symlink_to(elsewhere / "secret")
    (root / "passwd.gguf").symlink_to("/etc/passwd")
    roots = [root]
    for path, kind in [
        (str(model), "hf"),
        ("models/m", "hf"),  # relative: under a root
        ("models/../models/m", "hf"),
    ]:
        assert check_import({"kind": kind, "path": path}, roots=roots, max_params=10**9) == {
            "kind": "hf", "path": str(model.resolve())
        }  # fmt: skip
    refused = [
        ("/etc/passwd", "gguf"),  # exists, outside
        ("/nonexistent/model", "hf"),  # absent
        (str(elsewhere / "secret"), "hf"),  # a model, outside
        ("../private/secret", "hf"),  # `..` out of the root
        ("escape", "hf"),  # a symlink out of the root
        ("passwd.gguf", "gguf"),
        ("models/m", "gguf"),  # a directory for a file
        ("models/m/config.json", "hf"),  # a file for a directory
        ("models/absent", "hf"),
        ("a\x00b", "hf"),
        ("x" * 5000, "hf"),
    ]
    for path, kind in refused:
        with pytest.raises(InvalidValue) as exc:
            check_import({"kind": kind, "path": path}, roots=roots, max_params=10**9)
        assert (exc.value.field, exc.value.reason) == ("base.path", NOT_IMPORTABLE), path
    with pytest.raises(InvalidValue) as none:  # no roots: no file imports at all
        check_import({"kind": "hf", "path": str(model)}, roots=(), max_params=10**9)
    assert none.value.reason == NOT_IMPORTABLE
    assert check_import({"kind": "tiny"}, roots=(), max_params=10**9) == {"kind": "tiny", "seed": 0}


def test_config_sizes_are_refused_before_anything_is_allocated(
    instance: Instance, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def never(*_a: object, **_k: object) -> None:
        raise AssertionError("a refused model was loaded")

    monkeypatch.setattr("workers.models.load_causal_lm", never)
    cases: list[tuple[dict[str, object], str]] = [
        ({"vocab_size": 10**9}, "base.config.vocab_size"),  # 256 GB at fp32
        ({"num_hidden_layers": 10**6}, "base.config.num_hidden_layers"),
        ({"hidden_size": -64}, "base.config.hidden_size"),
        ({"bos_token_id": 10**12}, "base.config.bos_token_id"),  # any integer is bounded
        (
            {"vocab_size": 2**21, "hidden_size": 2**13},
            "base.config",
        ),  # each in bounds, together not
        ({"model_type": "no-such-model"}, "base.config"),
        ({"hidden_size": 66}, "base.config"),  # not divisible by the heads: cannot be built
    ]
    for i, (config, field) in enumerate(cases):
        path = _hf_dir(tmp_path / f"m{i}", **config)
        with pytest.raises(InvalidValue) as exc:
            create_stream(instance, name=f"s{i}", base={"kind": "hf", "path": str(path)})
        assert exc.value.field == field, (config, exc.value)
        assert str(tmp_path) not in str(exc.value)
    small = _hf_dir(tmp_path / "small")
    limited = dataclasses.replace(instance, settings=StrataSettings(import_max_params=30_000))
    # the cheap bounds (the embedding its config describes, the values its files hold) refuse it
    with pytest.raises(InvalidValue, match="parameters, over the limit of 30,000") as over:
        create_stream(limited, name="small", base={"kind": "hf", "path": str(small)})
    assert over.value.field == "base.config"
    (small / "config.json").write_text("{" * 100_000)
    with pytest.raises(InvalidValue) as nested:
        create_stream(instance, name="nested", base={"kind": "hf", "path": str(small)})
    assert nested.value.field == "base.config"
    (small / "config.json").unlink()
    with pytest.raises(InvalidValue, match=r"config\.json is missing"):
        create_stream(instance, name="none", base={"kind": "hf", "path": str(small)})
    assert instance.registry.streams.list_streams() == []


def test_checkpoints_whose_shapes_are_not_their_configs_are_refused(
    instance: Instance, tmp_path: Path
) -> None:
    path = _hf_dir(tmp_path / "m", intermediate_size=96)  # saved with 128
    with pytest.raises(
        InvalidWeights,
        match=r"down_proj.weight has shape \[64, 128\] but the config gives \[64, 96\]",
    ):
        check_import({"kind": "hf", "path": str(path)}, roots=None, max_params=10**9)
    # the loader's own refusal (what the header check would have caught) is InvalidWeights too,
    # its message without the server's path
    with pytest.raises(InvalidWeights) as exc:
        load_source({"kind": "hf", "path": str(path)})
    assert exc.value.field == "base.path" and "size mismatch" in exc.value.reason.lower()
    assert str(tmp_path) not in str(exc.value)


def _gguf(path: Path, *, vocab: int) -> None:
    gguf = pytest.importorskip("gguf")  # the `gguf` extra
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_vocab_size(vocab)
    writer.add_token_list(["a", "b"])
    writer.add_tensor("token_embd.weight", np.zeros((2, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_files_that_are_not_models_are_refused_as_gguf(tmp_path: Path) -> None:
    root = tmp_path / "imports"
    root.mkdir()
    # the checks the API runs before it queues the import (the GGUF's header only)
    (root / "passwd.gguf").write_bytes(Path("/etc/passwd").read_bytes())
    (root / "empty.gguf").write_bytes(b"")
    _gguf(root / "huge.gguf", vocab=10**9)
    _gguf(root / "small.gguf", vocab=2)
    for name, error, field in [
        ("passwd.gguf", InvalidWeights, "base.path"),
        ("empty.gguf", InvalidWeights, "base.path"),
        ("huge.gguf", InvalidValue, "base.config.vocab_size"),
    ]:
        with pytest.raises(error) as exc:
            cheap_check({"kind": "gguf", "path": name}, roots=[root], max_params=10**9)
        assert exc.value.field == field and str(tmp_path) not in str(exc.value)
    source = {"kind": "gguf", "path": "small.gguf"}
    assert cheap_check(source, roots=[root], max_params=16)["path"] == str(root / "small.gguf")
    with pytest.raises(InvalidValue, match="the GGUF holds 16 parameters, over the limit of 15"):
        cheap_check(source, roots=[root], max_params=15)

"""Importing base models as snapshot v0: a model directory, a GGUF file, and refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from continual.models import build_tiny_llama, load_causal_lm
from registry.artifacts import read_manifest
from registry.errors import InvalidValue, InvalidWeights
from registry.instance import Instance
from workers.models import (
    check_source,
    fetch_tree,
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

"""Adapters a base model cannot take are refused before anything is loaded or executed."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from peft.tuners.lora import LoraLayer
from safetensors.torch import save_file
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from continual.config import LoraHyperparams
from continual.errors import IncompatibleAdapter
from continual.models import build_tiny_llama
from continual.strategies import STRATEGIES, get_strategy
from continual.strategies.common import ADAPTER_CONFIG, ADAPTER_WEIGHTS, check_adapter_fits

MakeBase = Callable[..., LlamaForCausalLM]
HYPER = LoraHyperparams(rank=4, max_steps=1, batch_size=2)


def _saved_adapter(method: str, base: LlamaForCausalLM, out: Path) -> Path:
    """An untrained adapter of `method` for `base`, saved as the stream's first task."""
    strategy = get_strategy(method)
    model = strategy.prepare(base, history=[], hyper=HYPER)
    strategy.save_adapter(model, out)  # type: ignore[arg-type]  # am-lora returns the base
    return out


def _has_lora(model: torch.nn.Module) -> bool:
    return any(isinstance(m, LoraLayer) for m in model.modules()) or any(
        "lora" in name.lower() for name, _ in model.named_parameters()
    )


@pytest.mark.parametrize("method", sorted(STRATEGIES))
def test_an_adapter_for_another_base_shape_is_refused_by_every_strategy(
    method: str, make_base: MakeBase, tokenizer: PreTrainedTokenizerFast, tmp_path: Path
) -> None:
    adapter = _saved_adapter(method, make_base(), tmp_path / "a")
    wider, _ = build_tiny_llama(hidden_size=96, intermediate_size=192, tokenizer=tokenizer)
    strategy = get_strategy(method)
    with pytest.raises(
        IncompatibleAdapter,
        match=r"is 96x192 in the base model but the adapter.s A is 4x128 and B is 64x4",
    ):
        strategy.inference_model(wider, history=[adapter])
    with pytest.raises(IncompatibleAdapter):
        strategy.prepare(wider, history=[adapter], hyper=HYPER)
    assert not _has_lora(wider)  # refused before PEFT touched the model
    # the same adapter on a base of its own shape loads (the check is not too strict)
    strategy.inference_model(make_base(), history=[adapter])


def test_missing_layers_pickles_and_odd_keys_are_refused(
    make_base: MakeBase, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    good = _saved_adapter("seq-lora", make_base(), tmp_path / "good")
    config = (good / ADAPTER_CONFIG).read_text()

    def adapter(name: str, tensors: dict[str, torch.Tensor] | None) -> Path:
        d = tmp_path / name
        d.mkdir()
        (d / ADAPTER_CONFIG).write_text(config)
        if tensors is not None:
            save_file(tensors, str(d / ADAPTER_WEIGHTS))
        return d

    def loads_nothing(*_a: object, **_k: object) -> None:
        raise AssertionError("torch.load must never run on an adapter")

    monkeypatch.setattr(torch, "load", loads_nothing)
    pickled = adapter("pickled", None)
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(IncompatibleAdapter, match=r"needs .*adapter_model.safetensors"):
        check_adapter_fits(make_base(), pickled)

    a, b = torch.zeros(4, 64), torch.zeros(64, 4)
    prefix = "base_model.model.model.layers."
    nowhere = adapter("nowhere", {prefix + "7.self_attn.q_proj.lora_A.weight": a,
                                  prefix + "7.self_attn.q_proj.lora_B.weight": b})  # fmt: skip
    with pytest.raises(
        IncompatibleAdapter, match=r"has no layer 'model\.layers\.7\.self_attn\.q_proj'"
    ):
        check_adapter_fits(make_base(), nowhere)
    half = adapter("half", {prefix + "0.self_attn.q_proj.lora_A.weight": a})
    with pytest.raises(IncompatibleAdapter, match="lacks lora_A or lora_B"):
        check_adapter_fits(make_base(), half)
    q = prefix + "0.self_attn.q_proj"
    ranks = adapter("ranks", {q + ".lora_A.weight": a, q + ".lora_B.weight": torch.zeros(64, 2)})
    with pytest.raises(IncompatibleAdapter, match="B is 64x2"):
        check_adapter_fits(make_base(), ranks)
    odd = adapter("odd", {"model.embed_tokens.weight": torch.zeros(3, 64)})
    with pytest.raises(IncompatibleAdapter, match="is not a LoRA matrix"):
        check_adapter_fits(make_base(), odd)
    garbage = adapter("garbage", None)
    (garbage / ADAPTER_WEIGHTS).write_bytes(b"\xff" * 64)
    with pytest.raises(IncompatibleAdapter, match="unreadable weights"):
        check_adapter_fits(make_base(), garbage)
    assert json.loads(config)["peft_type"] == "LORA"


def test_am_lora_reads_adapter_configs_through_peft(tmp_path: Path) -> None:
    import json

    from peft import LoraConfig

    from continual.errors import IncompatibleAdapter
    from continual.strategies.am_lora_files import read_lora_config

    LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj"]).save_pretrained(
        tmp_path
    )
    assert read_lora_config(tmp_path) == (8.0, True)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    for change, reason in [({"use_dora": True}, "use_dora"), ({"peft_type": "IA3"}, "not LoRA")]:
        (tmp_path / "adapter_config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(IncompatibleAdapter, match=reason) as info:
            read_lora_config(tmp_path)
        assert info.value.field == "adapter"
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(IncompatibleAdapter, match=r"adapter_config\.json"):
        read_lora_config(tmp_path)
    (tmp_path / "adapter_config.json").unlink()
    with pytest.raises(IncompatibleAdapter, match="not a PEFT adapter"):
        read_lora_config(tmp_path)

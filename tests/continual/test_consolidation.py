"""Folding adapters into the base (fp32, cast back) and O-LoRA's memory of folded tasks."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import save_file
from transformers import LlamaForCausalLM

from continual.config import LoraHyperparams
from continual.consolidation import (
    fold_into_base,
    folded_subspace,
    load_memory_adapter,
    save_memory_adapter,
)
from continual.options import OLoraOptions
from continual.strategies.am_lora_files import (
    memory_rows,
    memory_without,
    read_memory,
    write_memory_statistics,
)
from continual.strategies.common import ADAPTER_CONFIG, ADAPTER_WEIGHTS, MEMORY_MARK
from continual.strategies.inc_lora import IncLora
from continual.strategies.o_lora import OLora
from tests.continual.test_inc_o_lora import IDS, _random_adapter, _summed_reference

MakeBase = Callable[..., LlamaForCausalLM]
FOLD_ATOL = 1e-5  # fp32 on the tiny model: the fold only reorders float sums


def _logits(model: torch.nn.Module) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.fixture
def adapters(make_base: MakeBase, tmp_path: Path) -> list[Path]:
    return [
        _random_adapter(make_base, tmp_path / f"a{i}", seed=i + 1, rank=4 - i) for i in range(3)
    ]


def test_folding_reproduces_the_adapted_model_and_equals_base_plus_scaled_updates(
    make_base: MakeBase, adapters: list[Path]
) -> None:
    state = IncLora().inference_model(make_base(), history=adapters)
    assert isinstance(state, PeftModel)
    adapted = _logits(state)
    folded = fold_into_base(state)
    assert not any("lora" in name for name, _ in folded.named_parameters())
    torch.testing.assert_close(_logits(folded), adapted, rtol=0, atol=FOLD_ATOL)
    reference = _summed_reference(make_base, adapters)  # W + sum_i (alpha_i / r_i) B_i A_i
    for (name, got), (_, expected) in zip(
        folded.state_dict().items(), reference.state_dict().items(), strict=True
    ):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6, msg=name)


def test_folding_a_half_precision_base_sums_in_fp32(
    make_base: MakeBase, adapters: list[Path]
) -> None:
    """bf16 weights: W + scale B A is summed in fp32 and rounded once (not in bf16 steps)."""
    base = make_base().to(torch.bfloat16)
    q = "model.layers.0.self_attn.q_proj.weight"
    before = base.state_dict()[q].clone()
    state = IncLora().inference_model(base, history=adapters)
    assert isinstance(state, PeftModel)
    layer = state.base_model.model.model.layers[0].self_attn.q_proj
    delta = sum(
        (layer.lora_B[n].weight.float() @ layer.lora_A[n].weight.float()) * layer.scaling[n]
        for n in layer.active_adapters
    )
    expected = (before.float() + delta).to(torch.bfloat16)
    got = fold_into_base(state).state_dict()[q]
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_the_folded_subspace_is_orthonormal_rank_bounded_and_spans_the_adapters(
    make_base: MakeBase, adapters: list[Path], tmp_path: Path
) -> None:
    state = IncLora().inference_model(make_base(), history=adapters)
    assert isinstance(state, PeftModel)
    subspace = folded_subspace(state)
    path = "model.layers.0.self_attn.q_proj"
    basis = subspace.basis[path]
    assert basis.shape == (4 + 3 + 2, 64)  # every A row is independent
    torch.testing.assert_close(basis @ basis.T, torch.eye(9), rtol=0, atol=1e-5)
    layer = state.base_model.model.model.layers[0].self_attn.q_proj
    rows = torch.cat([layer.lora_A[n].weight.detach() for n in layer.active_adapters])
    residual = rows - (rows @ basis.T) @ basis  # A rows lie in the basis' span
    assert float(residual.abs().max()) < 1e-5
    assert folded_subspace(state, max_rank=5).basis[path].shape == (5, 64)
    # the memory adapter round-trips and changes no logits (B = 0)
    save_memory_adapter(subspace, tmp_path / "memory")
    loaded = load_memory_adapter(tmp_path / "memory")
    torch.testing.assert_close(loaded.basis[path], basis, rtol=0, atol=1e-6)
    assert loaded.scale == pytest.approx(subspace.scale)
    plain = make_base()
    with_memory = PeftModel.from_pretrained(make_base(), str(tmp_path / "memory"))
    torch.testing.assert_close(_logits(with_memory), _logits(plain), rtol=0, atol=0)
    # a later consolidation keeps the earlier subspace
    again = folded_subspace(
        IncLora().inference_model(make_base(), history=adapters[:1]), previous=loaded
    )
    assert again.basis[path].shape[0] == 9


def test_o_lora_keeps_new_adapters_orthogonal_to_folded_tasks(
    make_base: MakeBase, adapters: list[Path], tmp_path: Path
) -> None:
    """After a fold, the memory adapter stands for the folded tasks in O-LoRA's penalty."""
    state = IncLora().inference_model(make_base(), history=adapters)
    assert isinstance(state, PeftModel)
    subspace = folded_subspace(state)
    save_memory_adapter(subspace, tmp_path / "memory")
    hyper = LoraHyperparams(rank=4)
    strategy = OLora()
    model = strategy.prepare(make_base(), history=[tmp_path / "memory"], hyper=hyper)
    penalty = strategy.extra_loss(model)
    assert penalty is not None and float(penalty.detach()) > 0.1
    orthogonal = OLora(OLoraOptions(orthogonal_init=True))
    model = orthogonal.prepare(make_base(), history=[tmp_path / "memory"], hyper=hyper)
    assert float(orthogonal.extra_loss(model) or 0) < 1e-4


def test_a_memory_without_retrained_tasks_keeps_the_other_rows_and_the_subspace(
    tmp_path: Path,
) -> None:
    """A memory's router rows carry their tasks' labels; `memory_without` leaves out the rows of
    tasks learned again (their inputs go to their new adapters), keeping the rest, their labels
    and the O-LoRA subspace. Labels that do not match the rows are refused."""
    memory = tmp_path / "memory"
    memory.mkdir()
    (memory / ADAPTER_CONFIG).write_text("{}")
    save_file({"x": torch.ones(2)}, str(memory / ADAPTER_WEIGHTS), metadata={"strata": MEMORY_MARK})
    stats = {"router.means": torch.arange(6.0).reshape(3, 2), "router.counts":
             torch.tensor([4.0, 5.0, 6.0]), "router.within": torch.eye(2)}  # fmt: skip
    with pytest.raises(ValueError, match="2 row labels for 3 rows"):
        write_memory_statistics(stats, memory, rows=["7", "8"])
    write_memory_statistics(stats, memory, rows=["7", "8", "9"])
    assert memory_rows(memory) == ("7", "8", "9")
    kept = read_memory(memory_without(memory, tmp_path / "kept", drop={"8", "42"}))
    assert kept.rows == ("7", "9") and kept.statistics is not None
    assert kept.statistics["router.counts"].tolist() == [4.0, 6.0]
    assert kept.statistics["router.means"].tolist() == [[0.0, 1.0], [4.0, 5.0]]
    assert torch.equal(kept.statistics["router.within"], torch.eye(2))
    assert (tmp_path / "kept" / ADAPTER_WEIGHTS).read_bytes() == (
        memory / ADAPTER_WEIGHTS
    ).read_bytes()

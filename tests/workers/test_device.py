"""Where a worker runs models: the `device` setting, checked against the GPUs torch sees.

This machine has no GPU; the cases where one is there are played by patching what torch reports
(`torch.cuda.is_available`, `device_count`): only the choice is tested here, not CUDA itself."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from registry.errors import InvalidValue
from registry.settings import StrataSettings
from workers.models import model_device


def _gpus(monkeypatch: pytest.MonkeyPatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def test_auto_is_the_gpu_when_there_is_one_else_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    assert StrataSettings().device == "auto"
    _gpus(monkeypatch, 0)
    assert model_device("auto") == torch.device("cpu")
    _gpus(monkeypatch, 2)
    assert model_device("auto") == torch.device("cuda")
    assert model_device("cpu") == torch.device("cpu")  # asked for, even beside a GPU
    assert model_device("cuda:1") == torch.device("cuda", 1)


@pytest.mark.parametrize(("name", "gpus", "says"), [
    ("cuda", 0, "sees no CUDA GPU"),
    ("cuda:0", 0, "sees no CUDA GPU"),
    ("cuda:2", 2, "sees 2 CUDA GPU(s)"),
])  # fmt: skip
def test_a_gpu_that_is_not_there_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, name: str, gpus: int, says: str
) -> None:
    _gpus(monkeypatch, gpus)
    with pytest.raises(InvalidValue) as info:
        model_device(name)
    assert info.value.field == "device"
    assert name in info.value.reason and says in info.value.reason


@pytest.mark.parametrize("value", ["gpu", "cuda:", "cuda:x", "mps", "CPU", ""])
def test_the_setting_refuses_what_is_not_a_device(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("STRATA_DEVICE", value)
    with pytest.raises(ValidationError) as info:
        StrataSettings()
    assert info.value.errors()[0]["loc"] == ("device",)

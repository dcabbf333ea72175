"""Method options as frozen dataclasses: defaults, bounds that name the field, no torch."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from continual.errors import InvalidHyperparameter
from continual.options import (
    METHOD_OPTIONS,
    AmLoraOptions,
    OLoraOptions,
    method_options,
    option_fields,
)
from continual.strategies import STRATEGIES, get_strategy


def test_every_strategy_has_its_options_and_takes_them() -> None:
    assert set(METHOD_OPTIONS) == set(STRATEGIES)
    for method, cls in METHOD_OPTIONS.items():
        assert dataclasses.is_dataclass(cls)
        assert get_strategy(method).options == cls()  # the defaults
        for f in option_fields(method):
            assert f.metadata["help"], (method, f.name)  # documented
    chosen = get_strategy("o-lora", lambda1=1, lambda1_norm="mean").options
    assert chosen == OLoraOptions(lambda1=1.0, lambda1_norm="mean")
    assert isinstance(chosen.lambda1, float)  # type: ignore[attr-defined]  # ints become floats
    with pytest.raises(dataclasses.FrozenInstanceError):
        chosen.lambda1 = 2.0  # type: ignore[attr-defined,misc]


@pytest.mark.parametrize(
    ("method", "values", "field", "reason"),
    [
        ("o-lora", {"lambda1": -1}, "lambda1", ">= 0"),
        ("o-lora", {"lambda2": "0.1"}, "lambda2", "a number"),
        ("o-lora", {"lambda1_norm": "max"}, "lambda1_norm", "one of sum, mean"),
        ("o-lora", {"orthogonal_init": 1}, "orthogonal_init", "true or false"),
        ("am-lora", {"selector_lr_scale": 0}, "selector_lr_scale", "> 0"),
        ("am-lora", {"routing_weight": float("inf")}, "routing_weight", "finite"),
        ("am-lora", {"initial_share": 1}, "initial_share", "< 1.0"),
        ("am-lora", {"initial_share": 0}, "initial_share", "> 0"),
        ("am-lora", {"orthogonal_init": True}, "orthogonal_init", "not an option of method"),
        ("seq-lora", {"lambda1": 0.5}, "lambda1", "its options: none"),
        ("magic", {}, "method", "unknown method"),
    ],
)
def test_bad_options_name_their_field(
    method: str, values: dict[str, object], field: str, reason: str
) -> None:
    with pytest.raises(InvalidHyperparameter) as info:
        method_options(method, values)
    assert info.value.field == field and reason in info.value.reason
    assert info.value.code == "invalid_hyperparameter"


def test_options_that_are_not_an_object_are_refused() -> None:
    with pytest.raises(InvalidHyperparameter) as info:
        method_options("am-lora", [1, 2])  # type: ignore[arg-type]
    assert info.value.field == "options"
    assert method_options("am-lora", None) == AmLoraOptions()


def test_checking_options_loads_no_model_library() -> None:
    probe = (
        "import sys, continual.options as o; o.method_options('o-lora', {'lambda1': 1}); "
        "print([m for m in ('torch', 'transformers', 'peft') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         timeout=120, check=True)  # fmt: skip
    assert out.stdout.strip() == "[]"

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from continual.config import LoraHyperparams
from continual.errors import InvalidHyperparameter


def test_defaults_are_valid_and_round_trip_through_json() -> None:
    hyper = LoraHyperparams()
    data = json.loads(json.dumps(hyper.to_dict()))
    assert data["target_modules"] == list(hyper.target_modules)
    assert LoraHyperparams.from_dict(data) == hyper


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("rank", 0),
        ("rank", 2.5),
        ("rank", True),
        ("alpha", 0),
        ("alpha", "16"),
        ("alpha", math.inf),
        ("dropout", -0.1),
        ("dropout", 1.0),
        ("target_modules", ()),
        ("target_modules", ("q_proj", "")),
        ("target_modules", ("q_proj", "q_proj")),
        ("target_modules", "q_proj"),
        ("learning_rate", 0.0),
        ("learning_rate", 1.5),
        ("learning_rate", math.nan),
        ("epochs", 0),
        ("max_steps", 0),
        ("max_steps", 1.0),
        ("batch_size", 0),
        ("max_length", 4),
        ("warmup_ratio", 1.0),
        ("warmup_ratio", -0.5),
        ("weight_decay", -1e-3),
        ("seed", -1),
        ("seed", 2**32),
        ("grad_clip", 0.0),
        ("group_by_length", 1),
        ("group_by_length", "yes"),
        ("precision", "fp16"),
        ("precision", ["bf16"]),
    ],
)
def test_invalid_field_is_named(field: str, value: Any) -> None:
    with pytest.raises(InvalidHyperparameter) as info:
        LoraHyperparams(**{field: value})
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: ")
    assert info.value.reason


def test_boundary_values_are_accepted() -> None:
    hyper = LoraHyperparams(
        rank=1,
        alpha=1,
        dropout=0.0,
        learning_rate=1.0,
        max_steps=1,
        warmup_ratio=0.0,
        grad_clip=None,
        seed=0,
        max_length=8,
    )
    assert hyper.alpha == 1 and hyper.grad_clip is None


def test_from_dict_rejects_unknown_keys_and_converts_lists() -> None:
    with pytest.raises(InvalidHyperparameter) as info:
        LoraHyperparams.from_dict({"rank": 4, "lr": 1e-3})
    assert info.value.field == "lr"
    hyper = LoraHyperparams.from_dict({"target_modules": ["q_proj", "v_proj"], "rank": 4})
    assert hyper.target_modules == ("q_proj", "v_proj")
    assert hyper.rank == 4 and hyper.epochs == LoraHyperparams().epochs


def test_from_dict_rejects_non_objects() -> None:
    with pytest.raises(InvalidHyperparameter) as info:
        LoraHyperparams.from_dict([("rank", 4)])  # type: ignore[arg-type]
    assert info.value.field == "hyperparameters"


def test_every_field_documents_itself() -> None:
    import dataclasses

    for f in dataclasses.fields(LoraHyperparams):
        assert f.metadata.get("help"), f.name


@pytest.mark.parametrize(
    ("values", "field", "reason"),
    [
        ({"relora_every": 0}, "relora_every", "must be >= 1, got 0"),
        ({"relora_every": -5}, "relora_every", "must be >= 1, got -5"),
        ({"relora_every": 2.5}, "relora_every", "must be an integer, got 2.5"),
        ({"relora_every": True}, "relora_every", "must be an integer, got True"),
        ({"relora_every": 10, "relora_warmup": 10}, "relora_warmup", "must be < relora_every"),
        ({"relora_every": 10, "relora_warmup": -1}, "relora_warmup", "must be >= 0, got -1"),
        ({"relora_every": 10, "relora_prune": 1.0}, "relora_prune", "must be < 1.0, got 1.0"),
        ({"relora_every": 10, "relora_prune": -0.1}, "relora_prune", "must be >= 0.0"),
        ({"relora_every": 10, "relora_prune": "0.9"}, "relora_prune", "must be a number"),
        ({"relora_warmup": 3}, "relora_warmup", "only applies with relora_every"),
        ({"relora_prune": 0.5}, "relora_prune", "only applies with relora_every"),
    ],
)
def test_relora_combinations_are_refused_naming_the_field(
    values: dict[str, Any], field: str, reason: str
) -> None:
    with pytest.raises(InvalidHyperparameter) as info:
        LoraHyperparams.from_dict(values)
    assert info.value.field == field
    assert info.value.reason.startswith(reason), info.value.reason


def test_relora_settings_and_their_default_warmup() -> None:
    off = LoraHyperparams()
    assert (off.relora_every, off.relora_prune, off.relora_warmup) == (None, 0.99, None)
    assert off.relora_warmup_steps == 0
    # the default re-warmup is a tenth of a cycle, rounded up, and always shorter than it
    for every, warmup in [(1, 0), (2, 1), (10, 1), (11, 2), (50, 5), (100, 10)]:
        assert LoraHyperparams(relora_every=every).relora_warmup_steps == warmup
    on = LoraHyperparams(relora_every=50, relora_warmup=0, relora_prune=0.0, max_steps=20)
    assert on.relora_warmup_steps == 0
    data = json.loads(json.dumps(on.to_dict()))
    assert (data["relora_every"], data["relora_warmup"], data["relora_prune"]) == (50, 0, 0.0)
    assert LoraHyperparams.from_dict(data) == on
    # records written before the fields existed still read
    old = {k: v for k, v in off.to_dict().items() if not k.startswith("relora_")}
    assert LoraHyperparams.from_dict(old) == off

"""Jobs that train with ReLoRA cycles: the hyperparameters come from the stream's defaults and a
job's overrides, the adapter version records them, and the published adapter holds every cycle
(its rank counts them); on the embedded and the server instance."""

from __future__ import annotations

import json
from typing import Any

import pytest
from safetensors import safe_open

from continual.data import synthetic_tasks
from continual.errors import InvalidHyperparameter
from registry.entities import Job, JobState
from registry.instance import Instance
from services.streams import submit_task
from services.trees import fetch_tree
from workers.execution import execute
from workers.streams import create_stream


class Recorder:
    def __init__(self) -> None:
        self.sent: list[int] = []

    def send(self, job: Job) -> None:
        self.sent.append(job.id)


def _submit(inst: Instance, stream: Any, name: str, seed: int, hyper: dict[str, Any]) -> Job:
    data = synthetic_tasks(seed=seed, train_size=24, test_size=6)[seed]
    params = {"hyperparams": {"max_steps": 9, "batch_size": 8, **hyper}, "eval_limit": 6}
    return submit_task(inst, stream=stream, name=name, data=data, format="synthetic",
                       params=params)[1]  # fmt: skip


def _adapter_ranks(inst: Instance, digest: str) -> tuple[dict[str, Any], set[int]]:
    """The published adapter's config and the ranks of its LoRA A matrices."""
    tree = fetch_tree(inst, digest)
    config = json.loads((tree / "adapter_config.json").read_text())
    with safe_open(str(tree / "adapter_model.safetensors"), framework="pt") as f:
        ranks = {f.get_slice(k).get_shape()[0] for k in f.keys() if k.endswith("lora_A.weight")}  # noqa: SIM118
    return config, ranks


def test_a_job_with_relora_publishes_an_adapter_of_every_cycle(instance: Instance) -> None:
    inst, defaults = instance, {"rank": 4, "relora_every": 4}
    stream, _ = create_stream(inst, name="s", base={"kind": "tiny"}, method="inc-lora",
                              hyperparams=defaults)  # fmt: skip
    first = _submit(inst, stream, "a", 0, {"relora_warmup": 1})
    # a job switches ReLoRA off over the stream's default
    second = _submit(inst, stream, "b", 1, {"relora_every": None})
    out = Recorder()
    for job in (first, second):
        done = execute(inst, out, job.id, worker="w")
        assert done is not None and done.state is JobState.SUCCEEDED, done
    cycled, plain = inst.registry.adapters.list_versions(stream_id=stream.id)
    recorded = {k: v for k, v in cycled.hyperparams.items() if k.startswith("relora_")}
    assert recorded == {"relora_every": 4, "relora_warmup": 1, "relora_prune": 0.99}
    assert cycled.metrics["relora_resets"] == 2  # after steps 4 and 8 of 9
    config, ranks = _adapter_ranks(inst, cycled.artifact_digest or "")
    assert ranks == {12} and config["r"] == 12  # rank 4, three cycles
    assert config["lora_alpha"] == pytest.approx(16 / 4 * 12)  # the scaling alpha / r is kept
    assert plain.hyperparams["relora_every"] is None and "relora_resets" not in plain.metrics
    config, ranks = _adapter_ranks(inst, plain.artifact_digest or "")
    assert ranks == {4} and (config["r"], config["lora_alpha"]) == (4, 16)
    # the second task trained and was evaluated on top of the rank-12 history
    matrix = inst.registry.evaluations.matrix(stream.id)
    assert len(matrix.values) == 2 and all(v is not None for v in matrix.values[-1]), matrix


def test_bad_relora_settings_are_refused_naming_the_field(instance: Instance) -> None:
    for hyper, field in [
        ({"relora_every": 0}, "relora_every"),
        ({"relora_warmup": 2}, "relora_warmup"),  # without relora_every
        ({"relora_every": 4, "relora_warmup": 4}, "relora_warmup"),
        ({"relora_every": 4, "relora_prune": 1}, "relora_prune"),
    ]:
        with pytest.raises(InvalidHyperparameter) as info:
            create_stream(instance, name="s", base={"kind": "tiny"}, hyperparams=hyper)
        assert info.value.field == field
    stream, _ = create_stream(instance, name="s", base={"kind": "tiny"},
                              hyperparams={"relora_every": 4})  # fmt: skip
    with pytest.raises(InvalidHyperparameter) as info:
        _submit(instance, stream, "a", 0, {"relora_warmup": 5})
    assert info.value.field == "relora_warmup" and "relora_every (4)" in info.value.reason
    assert not instance.registry.tasks.list_tasks(stream.id)  # nothing stored

"""The import job of a new stream, and the checks of its base model that need transformers.

`services.imports` checks a source without a model library (the API runs it before it queues
an import); the job runs those checks again with its worker's settings, then these: the config
as transformers reads it, sized by building the model on the meta device (nothing is
allocated), and every tensor's shape against it, before anything is loaded.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

import services.imports
from continual.errors import TrainingCancelled
from continual.models import MODEL_INIT_LOCK
from registry.entities import Job, StreamState
from registry.errors import InvalidValue, InvalidWeights
from registry.instance import Instance
from services.imports import check_config, read_config, too_many
from workers.models import load_source, public_message, store_model
from workers.reporting import JobReporter

log = logging.getLogger(__name__)


def check_import(
    source: dict[str, Any], *, roots: Sequence[Path] | None, max_params: int
) -> dict[str, Any]:
    """`services.imports.check_import`, then what needs transformers: an `hf` directory's
    config as transformers reads it, sized on the meta device, and its tensors' shapes
    against it; a GGUF's config as transformers reads it, sized."""
    source = services.imports.check_import(source, roots=roots, max_params=max_params)
    if source["kind"] == "hf":
        directory = Path(source["path"])
        expected = model_shapes(hf_config(directory), max_params=max_params)
        check_shapes(directory, expected)
    elif source["kind"] == "gguf":
        model_shapes(_gguf_config(Path(source["path"])), max_params=max_params)
    return source


def hf_config(directory: Path) -> PretrainedConfig:
    """The directory's config.json as transformers reads it (no remote code), refused when it
    is missing, over 1 MiB, or not a configuration transformers knows."""
    read_config(directory)
    try:
        config: PretrainedConfig = AutoConfig.from_pretrained(str(directory), local_files_only=True)
    except Exception as exc:  # transformers' own errors for what it cannot read vary
        reason = f"not a configuration transformers reads: {public_message(exc, directory)}"
        raise InvalidValue(reason, field="base.config") from exc
    return config


def _gguf_config(file: Path) -> PretrainedConfig:
    try:
        config: PretrainedConfig = AutoConfig.from_pretrained(
            str(file.parent), gguf_file=file.name, local_files_only=True
        )
    except Exception as exc:
        raise InvalidWeights(f"GGUF metadata transformers cannot read: {public_message(exc, file)}",
                             field="base.path") from exc  # fmt: skip
    return config


def model_shapes(config: PretrainedConfig, *, max_params: int) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor of the causal LM `config` describes, found by building the
    model on the meta device (no memory) once its dimensions are known to be in bounds; the
    model's parameter count must not exceed `max_params`."""
    for c in {id(c): c for c in (config, config.get_text_config())}.values():
        check_config(c.to_dict(), max_params=max_params, exact=True)  # counted below
    try:
        with MODEL_INIT_LOCK, torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception as exc:
        raise InvalidValue(f"not a causal LM transformers can build: {public_message(exc)}",
                           field="base.config") from exc  # fmt: skip
    params = sum(p.numel() for p in model.parameters())
    if params > max_params:
        raise too_many("the config describes", params, max_params)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def check_shapes(directory: Path, expected: dict[str, tuple[int, ...]]) -> None:
    """Every tensor of the directory's safetensors that the model has must have the model's
    shape (read from the headers only). Tensors the model lacks are left to the loader."""
    prefixes = {name.split(".", 1)[0] + "." for name in expected if "." in name}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as weights:
            for name in list(weights.keys()):  # keys(): safe_open is not iterable
                want = expected.get(name)
                if want is None:  # saved from the bare model: "layers.0..." for "model.layers.0..."
                    want = next(
                        (expected[p + name] for p in prefixes if p + name in expected), None
                    )
                got = tuple(weights.get_slice(name).get_shape())
                if want is not None and got != want:
                    raise InvalidWeights(f"tensor {name} has shape {list(got)} but the config "
                                         f"gives {list(want)}", field="base.path")  # fmt: skip


def import_job(inst: Instance, job: Job, reporter: JobReporter) -> None:
    """The import job of a new stream: check its base source again (this worker's roots and
    limits, a GGUF's config exactly), load it, store it as snapshot v0 and make the stream
    ready. A cancel request is honoured between the load and the store."""
    assert job.stream_id is not None
    stream = inst.registry.streams.get_by_id(job.stream_id)
    if stream.state is StreamState.READY:
        reporter.event("the base model was imported by an earlier run of this job")
        return
    settings = inst.settings
    source = check_import(
        stream.base_source, roots=settings.import_roots or (), max_params=settings.import_max_params
    )
    reporter.event(f"importing the base model ({source['kind']})")
    model, tokenizer = load_source(source)
    reporter.event(f"loaded {model.num_parameters():,} parameters")
    reporter.progress(0.5)
    if reporter.cancel_requested():
        raise TrainingCancelled("the import was cancelled")
    digest = store_model(inst, model, tokenizer)
    snapshot = inst.registry.streams.finish_import(
        stream_id=stream.id, artifact_digest=digest, job_id=job.id
    )
    reporter.event(f"stored the base model as snapshot v{snapshot.version} ({digest[:12]})")

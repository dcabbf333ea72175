"""Creating a stream in this process (`strata demo`, benchmarks, tests): its base model is
imported here, not by a job. The API's way is `services.streams.queue_stream`."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from registry.entities import Snapshot, Stream
from registry.instance import Instance
from services.streams import DEFAULT_METHOD, check_request
from workers.imports import check_import
from workers.models import load_source, store_model

log = logging.getLogger(__name__)


def create_stream(
    inst: Instance,
    *,
    name: str,
    base: dict[str, Any],
    method: str = DEFAULT_METHOD,
    hyperparams: dict[str, Any] | None = None,
    method_options: dict[str, Any] | None = None,
    consolidation: dict[str, Any] | None = None,
    roots: Sequence[Path] | None = None,
) -> tuple[Stream, Snapshot]:
    """Import the base model as snapshot v0 of a new stream, in this process (`strata demo`,
    benchmarks, tests): the stream is ready when this returns.

    Everything is checked before the (slow) import (`services.streams.check_request`, then
    the checks that need transformers, `workers.imports.check_import`); a `hf` or `gguf` path
    must lie under `roots`, unless None (the caller's own files). The weights are stored
    before the rows, and the stream and its snapshot are written in one transaction.
    """
    req = check_request(
        inst, name=name, base=base, method=method, hyperparams=hyperparams,
        method_options=method_options, consolidation=consolidation, roots=roots,
    )  # fmt: skip
    max_params = inst.settings.import_max_params
    source = check_import(req.source, roots=None, max_params=max_params)
    model, tokenizer = load_source(source)
    digest = store_model(inst, model, tokenizer)
    stream = inst.registry.streams.create(
        name=name, base_source=source, method=method, hyperparams=req.setup.hyper.to_dict(),
        base_digest=digest, method_options=req.setup.options, consolidation=req.policy,
    )  # fmt: skip
    snapshot = inst.registry.streams.current_snapshot(stream.id)
    log.info("stream %s created with base snapshot %s", name, digest[:12])
    return stream, snapshot

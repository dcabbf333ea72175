"""Deployment settings, read from the environment (prefix ``STRATA_``) or secret files.

Secrets never live in code: `STRATA_DATABASE_URL`, `STRATA_BROKER_URL`, `STRATA_MINIO_ACCESS_KEY`,
`STRATA_MINIO_SECRET_KEY` and `STRATA_METRICS_TOKEN` come from the environment, or from the file
that `STRATA_<NAME>_FILE` names (Docker and Kubernetes secrets), never both.
"""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

SECRET_FILES = (
    "database_url", "broker_url", "minio_access_key", "minio_secret_key", "metrics_token",
)  # fmt: skip


class StrataSettings(BaseSettings):
    """Where the registry keeps its metadata and artifacts.

    The embedded default needs no servers: SQLite and a local artifact directory, both under
    `data_dir`. Point `database_url` at PostgreSQL and `artifact_backend` at MinIO for the service.
    """

    model_config = SettingsConfigDict(
        env_prefix="STRATA_",
        secrets_dir=None,
        extra="ignore",
        frozen=True,
        hide_input_in_errors=True,  # a validation error must not print the secrets it read
    )

    data_dir: Path = Path(".strata")
    database_url: str | None = None
    artifact_backend: Literal["local", "minio"] = "local"
    artifact_dir: Path | None = None
    minio_endpoint: str = "127.0.0.1:9000"
    minio_access_key: SecretStr | None = None
    minio_secret_key: SecretStr | None = None
    minio_bucket: str = "strata"
    minio_secure: bool = False
    minio_region: str | None = None
    broker_url: str = "redis://127.0.0.1:6379/0"
    # Redis re-delivers a message not acknowledged within this time. A GPU worker acknowledges
    # a job's message when the job ends, so a longer job's message is delivered once more; the
    # copy starts nothing (see workers.execution). Set it above the usual job's length to spare
    # that message; the reliability tests shorten it.
    broker_visibility_timeout_s: float = Field(default=3600.0, gt=0)
    # Workers: a running job heartbeats every `heartbeat_s`; its stream lease lasts `lease_s`
    # past the last heartbeat; the reconciler re-queues a job silent for `stale_after_s` (at
    # most `max_attempts` runs) and re-sends queued jobs not started `resend_after_s` after
    # their last message. Training checkpoints every `checkpoint_every` steps.
    heartbeat_s: float = Field(default=10.0, gt=0)
    lease_s: float = Field(default=120.0, gt=0)
    stale_after_s: float = Field(default=180.0, gt=0)
    resend_after_s: float = Field(default=60.0, gt=0)
    max_attempts: int = Field(default=3, ge=1)
    # A deleted stream or adapter version can be restored for this many days.
    retention_days: float = Field(default=7.0, ge=0)
    # Garbage collection (`strata gc`, and the scheduler every `gc_interval_s`; 0: never) keeps
    # every blob written or reused within `gc_grace_s`, referenced or not: an upload's rows
    # commit after its blobs, and must find them there.
    gc_interval_s: float = Field(default=3600.0, ge=0)
    gc_grace_s: float = Field(default=86400.0, ge=0)
    checkpoint_every: int = Field(default=50, ge=1)
    scheduler_tick_s: float = Field(default=5.0, gt=0)
    # Where a worker runs models (training, evaluation, consolidation, predictions): "cpu",
    # "cuda" or "cuda:N", or "auto" for the first CUDA GPU when torch sees one, else the CPU.
    device: str = Field(default="auto", pattern=r"^(auto|cpu|cuda(:[0-9]+)?)$")
    # API: uploads larger than `max_upload_bytes` are refused while they stream in; a dataset
    # may hold at most `max_examples` examples, and JSONL lines (or a JSON list's records) of at
    # most `max_line_bytes`; a gzip upload may expand to at most `max_expanded_bytes`.
    max_upload_bytes: int = Field(default=256 * 2**20, ge=1024)
    max_examples: int = Field(default=1_000_000, ge=1)
    max_line_bytes: int = Field(default=2**20, ge=64)
    max_expanded_bytes: int = Field(default=2**30, ge=1024)  # a gzip upload, decompressed
    # Dependencies: how long a connect or a read may wait on the database, the broker or the
    # object store before the request fails with 503 (and Retry-After) instead of waiting on.
    # A worker retries a store operation that failed for up to `store_retry_s`, with
    # exponential backoff and jitter, so an outage shorter than that fails no job; the API
    # retries for at most `api_store_retry_s` (its clients are waiting).
    database_timeout_s: float = Field(default=5.0, gt=0, le=600)
    broker_timeout_s: float = Field(default=5.0, gt=0, le=600)
    store_timeout_s: float = Field(default=5.0, gt=0, le=600)
    store_retry_s: float = Field(default=120.0, ge=0)
    api_store_retry_s: float = Field(default=0.0, ge=0)
    # Threads per API process for the routes that block (database, object store). Few threads
    # serve more requests per second than many: they take turns on one GIL. The database pool
    # keeps at least this many connections open so that no request opens its own.
    api_threads: int = Field(default=8, ge=1, le=256)
    # Predict (a `predict` queue's worker runs the model; the embedded server, a thread of its
    # own): at most `predict_concurrency` requests at once per API process (more get 429), each
    # waits at most `predict_timeout_s` for its answer (then 504). An input or label over
    # `predict_max_input_bytes` is refused before it is tokenised; a request may put at most
    # `predict_max_tokens` tokens through the model (inputs, after they are cut to the stream's
    # `max_length`, times what each costs).
    predict_concurrency: int = Field(default=2, ge=1, le=64)
    predict_timeout_s: float = Field(default=120.0, gt=0, le=3600)
    predict_max_input_bytes: int = Field(default=64 * 1024, ge=64)
    predict_max_tokens: int = Field(default=16_384, ge=64)
    # Base models from files (`hf` directories, `gguf` files) are imported only from under these
    # directories (symlinks resolved), separated by ':' in STRATA_IMPORT_ROOTS. Unset: none in
    # the service (only the built-in tiny and smollm2 kinds), the data dir's imports/ in
    # `strata serve` (`embedded`). The API and the workers both check: set it on both. A model
    # whose config describes more than `import_max_params` parameters is refused unloaded.
    import_roots: Annotated[tuple[Path, ...] | None, NoDecode] = None
    import_max_params: int = Field(default=8_000_000_000, ge=1)
    # Metrics (README, "Metrics"): the API's /metrics needs `Authorization: Bearer
    # <metrics_token>` when one is set (unset: open, like /health). A Celery worker with a
    # `metrics_port` serves its own metrics there, on `metrics_host`.
    metrics_token: SecretStr | None = None
    metrics_port: int | None = Field(default=None, ge=1, le=65535)
    metrics_host: str = "0.0.0.0"

    @field_validator("import_roots", mode="before")
    @classmethod
    def _split_roots(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(Path(p) for p in value.split(os.pathsep) if p.strip())
        return value

    def embedded(self) -> StrataSettings:
        """These settings for the embedded `strata serve`: imports from `data_dir/imports`
        unless STRATA_IMPORT_ROOTS says otherwise."""
        if self.import_roots is not None:
            return self
        return self.model_copy(update={"import_roots": (self.data_dir / "imports",)})

    @model_validator(mode="before")
    @classmethod
    def _read_secret_files(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        for name in SECRET_FILES:
            path = os.environ.get(f"STRATA_{name.upper()}_FILE")
            if not path:
                continue
            if data.get(name) is not None:
                raise ValueError(
                    f"STRATA_{name.upper()} and STRATA_{name.upper()}_FILE are both set"
                )
            try:
                data[name] = Path(path).read_text(encoding="utf-8").strip()
            except OSError as exc:  # the message names the variable, never the content
                raise ValueError(
                    f"STRATA_{name.upper()}_FILE: cannot read {path}: {exc.strerror}"
                ) from None
        return data

    @model_validator(mode="after")
    def _minio_needs_credentials(self) -> StrataSettings:
        if self.artifact_backend == "minio" and not (
            self.minio_access_key and self.minio_secret_key
        ):
            raise ValueError(
                "STRATA_MINIO_ACCESS_KEY and STRATA_MINIO_SECRET_KEY are required "
                "when STRATA_ARTIFACT_BACKEND=minio"
            )
        return self

    @cached_property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'registry.db').resolve()}"

    @cached_property
    def resolved_artifact_dir(self) -> Path:
        return self.artifact_dir or self.data_dir / "artifacts"

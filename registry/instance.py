"""One Strata instance: the registry database plus the artifact store, opened from settings."""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path

from registry.artifacts import ArtifactStore, LocalStore
from registry.settings import StrataSettings
from registry.store import Registry, SqlRegistry, open_registry


@dataclass
class Instance:
    registry: Registry
    artifacts: ArtifactStore
    cache_dir: Path  # verified copies of trees, keyed by digest; safe to delete
    settings: StrataSettings = field(default_factory=StrataSettings)

    def __post_init__(self) -> None:
        # a put reusing a blob and gc removing it exclude each other (see services.gc)
        self.artifacts.set_guard(self._blob_lease)

    def _blob_lease(self, digest: str) -> AbstractContextManager[None]:
        return self.registry.leases.hold(f"blob:{digest[:56]}", ttl_s=60, wait_s=120)

    def close(self) -> None:
        if isinstance(self.registry, SqlRegistry):
            self.registry.close()


def open_artifact_store(settings: StrataSettings, *, retry_s: float | None = None) -> ArtifactStore:
    """The configured store; an S3 operation that fails for a transient reason is retried with
    backoff for up to `retry_s` (default `settings.store_retry_s`, what a worker waits)."""
    if settings.artifact_backend == "local":
        return LocalStore(settings.resolved_artifact_dir)
    assert settings.minio_access_key and settings.minio_secret_key  # checked by the settings
    from registry.artifacts.minio import MinioStore  # only on the server deployment

    return MinioStore(
        endpoint=settings.minio_endpoint,
        access_key=settings.minio_access_key.get_secret_value(),
        secret_key=settings.minio_secret_key.get_secret_value(),
        bucket=settings.minio_bucket,
        secure=settings.minio_secure,
        region=settings.minio_region,
        timeout_s=settings.store_timeout_s,
        retry_s=settings.store_retry_s if retry_s is None else retry_s,
    )


def open_instance(
    settings: StrataSettings | None = None, *, upgrade: bool = True, api: bool = False
) -> Instance:
    """Open the instance described by `settings` (the environment by default).

    `upgrade` migrates the database to head first; the service's one-shot migration does that
    once, so API processes and workers open with `upgrade=False`. `api`: for an API process,
    whose clients wait: the object store is retried for `api_store_retry_s`, not a worker's
    `store_retry_s`.
    """
    settings = settings or StrataSettings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    return Instance(
        registry=open_registry(
            settings.resolved_database_url,
            upgrade=upgrade,
            pool_size=max(5, settings.api_threads),
            timeout_s=settings.database_timeout_s,
        ),
        artifacts=open_artifact_store(
            settings, retry_s=settings.api_store_retry_s if api else None
        ),
        cache_dir=settings.data_dir / "cache",
        settings=settings,
    )

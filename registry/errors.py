"""Typed errors raised by the registry and the artifact store.

Every error names what was wrong (``field``) and why (``reason``) so that the API can map it to a
4xx problem document without parsing messages.
"""

from __future__ import annotations


class RegistryError(Exception):
    """Base class of every error the registry raises on purpose."""

    code = "registry_error"

    def __init__(self, reason: str, *, field: str | None = None) -> None:
        super().__init__(f"{field}: {reason}" if field else reason)
        self.reason = reason
        self.field = field


class NotFound(RegistryError):
    """A referenced entity (stream, task, version, job, blob...) does not exist."""

    code = "not_found"


class AlreadyExists(RegistryError):
    """A unique name or key is already taken."""

    code = "already_exists"


class InvalidReference(RegistryError):
    """A row refers to another entity that does not exist or belongs elsewhere."""

    code = "invalid_reference"


class InvalidValue(RegistryError):
    """A value is malformed (bad name, reserved alias, wrong state transition...)."""

    code = "invalid_value"


class Unauthorized(RegistryError):
    """Missing, unknown or revoked credentials."""

    code = "unauthorized"


class Forbidden(RegistryError):
    """Valid credentials without the scope the operation needs."""

    code = "forbidden"


class Conflict(RegistryError):
    """The operation is not allowed in the entity's current state."""

    code = "conflict"


class Unavailable(RegistryError):
    """The database (or object store) cannot be reached right now; retrying later may work."""

    code = "unavailable"


class ArtifactError(RegistryError):
    """Base class of artifact-store errors."""

    code = "artifact_error"


class BlobNotFound(ArtifactError, NotFound):
    code = "blob_not_found"


class IntegrityError(ArtifactError):
    """A stored object's content does not match its digest (corruption or tampering)."""

    code = "integrity_error"


class UnsafeArtifact(ArtifactError):
    """An artifact would require executing code to load (pickle) or has a forbidden path."""

    code = "unsafe_artifact"


class InvalidWeights(ArtifactError):
    """A weights file is not a well-formed safetensors file."""

    code = "invalid_weights"

"""Content-addressed artifact storage: blobs, directory trees and weights validation.

``ArtifactStore`` is the interface; ``LocalStore`` (a directory) is the embedded default and
``MinioStore`` (an S3 bucket) the server implementation, imported when first used (the
`minio` client takes a noticeable part of a process's start).
"""

from typing import Any

from registry.artifacts.base import ArtifactStore, blob_key, check_digest
from registry.artifacts.local import LocalStore
from registry.artifacts.trees import (
    TREE_KIND,
    TreeFile,
    TreeManifest,
    check_tree_path,
    get_tree,
    put_tree,
    read_manifest,
)
from registry.artifacts.weights import split_per_tensor, validate_safetensors

__all__ = [
    "TREE_KIND",
    "ArtifactStore",
    "LocalStore",
    "MinioStore",
    "TreeFile",
    "TreeManifest",
    "blob_key",
    "check_digest",
    "check_tree_path",
    "get_tree",
    "put_tree",
    "read_manifest",
    "split_per_tensor",
    "validate_safetensors",
]


def __getattr__(name: str) -> Any:
    if name == "MinioStore":
        from registry.artifacts.minio import MinioStore

        return MinioStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

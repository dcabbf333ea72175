"""Stored trees on this machine: a verified local copy per digest, fetched once."""

from __future__ import annotations

from pathlib import Path

from registry.artifacts import get_tree
from registry.errors import InvalidValue
from registry.instance import Instance


def tree_cache_path(inst: Instance, digest: str) -> Path:
    """Where this instance keeps its verified local copy of tree `digest` (present only whole)."""
    return inst.cache_dir / "trees" / digest


def fetch_tree(inst: Instance, digest: str) -> Path:
    """A verified local copy of a stored tree, cached by digest (trees never change)."""
    dest = tree_cache_path(inst, digest)
    if not dest.exists():
        try:
            get_tree(inst.artifacts, digest, dest)  # staged, then renamed into place
        except InvalidValue:
            if not dest.exists():  # not a lost race with another process
                raise
    return dest

"""Stored trees as .tar.gz archives for download, written to a temporary file (never held in
memory whole): the tree is fetched and verified against its digests first."""

from __future__ import annotations

import os
import tarfile
import tempfile
from pathlib import Path

from registry.instance import Instance
from workers.models import fetch_tree


def tree_archive(inst: Instance, digest: str, *, name: str) -> Path:
    """A temporary `.tar.gz` whose top folder `name/` holds the tree's files; the caller
    deletes it."""
    source = fetch_tree(inst, digest)
    fd, name_ = tempfile.mkstemp(prefix="strata-", suffix=".tar.gz")
    os.close(fd)
    path = Path(name_)
    try:
        with tarfile.open(path, "w:gz") as archive:
            for file in sorted(p for p in source.rglob("*") if p.is_file()):
                archive.add(file, arcname=f"{name}/{file.relative_to(source).as_posix()}")
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path

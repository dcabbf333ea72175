"""Model files for import tests (tests/workers/test_import.py, tests/api/routes/test_streams.py)."""

from __future__ import annotations

import json
from pathlib import Path

from continual.models import build_tiny_llama


def _hf_dir(path: Path, **config: object) -> Path:
    """A tiny Llama saved as a model directory, its config.json then changed by `config`."""
    model, tok = build_tiny_llama(seed=3)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    raw = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**raw, **config}))
    return path

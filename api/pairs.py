"""`KEY=VALUE` command-line pairs (`--set`, `--option`): the one parser the CLI and the
benchmark scripts share."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from registry.errors import InvalidValue


def parse_pairs(pairs: Iterable[str], *, flag: str = "--set") -> dict[str, Any]:
    """`key=value` pairs as a dict; each value is read as JSON when it parses (`rank=8` is an
    int, `target_modules=["q_proj"]` a list), else kept as a string. InvalidValue, naming
    `flag`, for a pair without `=` or a key."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise InvalidValue(f"expects KEY=VALUE, got {pair!r}", field=flag)
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out

"""Each training method's options (`continual.options`) described for people and programs:
a JSON schema per method for the OpenAPI document, and a help text for `strata streams create
--help`. Nothing here loads a model library."""

from __future__ import annotations

import dataclasses
from typing import Any

from continual.options import METHOD_OPTIONS, option_fields

__all__ = ["METHODS", "options_help", "options_schema"]

METHODS = tuple(METHOD_OPTIONS)


def _field_schema(f: dataclasses.Field[Any]) -> dict[str, Any]:
    meta = f.metadata
    schema: dict[str, Any] = {"description": meta.get("help", ""), "default": f.default}
    if "choices" in meta:
        schema.update(type="string", enum=list(meta["choices"]))
    elif "low" in meta:
        bound = "exclusiveMinimum" if meta["exclusive"] else "minimum"
        schema.update(type="number", **{bound: meta["low"]})
        if meta.get("high") is not None:
            schema["exclusiveMaximum"] = meta["high"]
    elif isinstance(f.default, bool):
        schema["type"] = "boolean"
    return schema


def options_schema(method: str) -> dict[str, Any]:
    """The JSON schema of `method`'s options object."""
    cls = METHOD_OPTIONS[method]
    return {
        "title": f"{method} options", "type": "object", "additionalProperties": False,
        "description": (cls.__doc__ or "").strip(),
        "properties": {f.name: _field_schema(f) for f in option_fields(method)},
    }  # fmt: skip


def options_help() -> str:
    """Every method's options with their defaults, one line each."""
    lines = ["method options (--option KEY=VALUE):"]
    for method in METHODS:
        fields = option_fields(method)
        if not fields:
            lines.append(f"  {method}: none")
            continue
        lines.append(f"  {method}:")
        for f in fields:
            lines.append(f"    {f.name} (default {f.default!r}): {f.metadata.get('help', '')}")
    return "\n".join(lines)

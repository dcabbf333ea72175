"""Checks on user-supplied names, shared by every store method that accepts one."""

from __future__ import annotations

import re

from registry.errors import InvalidValue

# Names end up in URLs, object keys and file names: keep them boring.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_DIGEST = re.compile(r"^[0-9a-f]{64}$")
RESERVED_ALIASES = frozenset({"latest"})


def check_name(value: object, *, field: str) -> str:
    if not isinstance(value, str):
        raise InvalidValue("must be a string", field=field)
    if not _NAME.fullmatch(value) or ".." in value:
        raise InvalidValue(
            "must be 1-64 characters of letters, digits, '.', '_' or '-', starting with a letter "
            "or digit, without '..'",
            field=field,
        )
    return value


def check_alias(value: object, *, field: str = "alias") -> str:
    alias = check_name(value, field=field)
    if alias.lower() in RESERVED_ALIASES:
        raise InvalidValue(f"'{alias}' is reserved and maintained automatically", field=field)
    if alias.isdigit():
        raise InvalidValue(
            "must not be a bare number (numbers are version references)", field=field
        )
    return alias


def check_digest(value: object, *, field: str = "digest") -> str:
    if not isinstance(value, str) or not _DIGEST.fullmatch(value):
        raise InvalidValue("must be a sha256 hex digest (64 lowercase hex characters)", field=field)
    return value

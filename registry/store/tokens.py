"""API tokens: random bearer secrets of which only the sha256 is stored.

A token is `strata_<43 url-safe characters>` (256 random bits). Its sha256 is stored with a
unique index, so a presented token is looked up by its hash; `hmac.compare_digest` then compares
the hashes in constant time. A salted slow hash (bcrypt, argon2) protects low-entropy passwords
against guessing; a 256-bit random secret cannot be guessed, so a fast hash loses nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import secrets
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select

from registry.entities import ApiToken
from registry.errors import InvalidValue, NotFound, Unauthorized
from registry.store import _convert as convert
from registry.store._db import Database
from registry.tables import ApiTokenRow, utcnow
from registry.validation import check_name

TOKEN_PREFIX = "strata_"
LAST_USED_RESOLUTION = timedelta(minutes=1)  # how stale `last_used_at` may be
SCOPES = ("read", "write", "admin")  # write implies read; admin manages tokens


def hash_token(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def check_scopes(scopes: Sequence[str]) -> tuple[str, ...]:
    if isinstance(scopes, str) or not scopes:
        raise InvalidValue(f"must be a non-empty list of {list(SCOPES)}", field="scopes")
    unknown = [s for s in scopes if s not in SCOPES]
    if unknown:
        raise InvalidValue(f"unknown scopes {unknown}; known: {list(SCOPES)}", field="scopes")
    return tuple(sorted(set(scopes), key=SCOPES.index))


def admit(row: Any, digest: str) -> ApiToken:
    """The token of `row` (an `api_tokens` row fetched by `digest`, or None) if it may be used;
    Unauthorized with one message whatever the reason, so that no detail leaks."""
    if row is None or not hmac.compare_digest(row.token_hash, digest):
        raise Unauthorized("invalid or revoked token", field="authorization")
    if row.revoked_at is not None:
        raise Unauthorized("invalid or revoked token", field="authorization")
    return convert.api_token(row)


def needs_touch(token: ApiToken, now: datetime) -> bool:
    """Whether a use at `now` should update `last_used_at`: at most one write per token and
    `LAST_USED_RESOLUTION`, not one per request."""
    last = token.last_used_at
    return last is None or now - last >= LAST_USED_RESOLUTION


class SqlTokenStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    def create(self, *, name: str, scopes: Sequence[str]) -> tuple[ApiToken, str]:
        """A new token and its secret; the secret is returned once and never stored."""
        check_name(name, field="name")
        scopes = check_scopes(scopes)
        secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
        with self._db.tx() as s:
            row = ApiTokenRow(
                name=name,
                token_hash=hash_token(secret),
                prefix=secret[: len(TOKEN_PREFIX) + 4],
                scopes=list(scopes),
            )
            s.add(row)
            s.flush()
            return convert.api_token(row), secret

    def authenticate(self, secret: str) -> ApiToken:
        """The active token whose secret this is; Unauthorized otherwise (no detail leaks)."""
        digest = hash_token(secret)
        with self._db.tx() as s:
            row = s.scalar(select(ApiTokenRow).where(ApiTokenRow.token_hash == digest))
            token = admit(row, digest)
            now = utcnow()
            if needs_touch(token, now):
                assert row is not None  # admitted
                row.last_used_at = now
                token = dataclasses.replace(token, last_used_at=now)
            return token

    def list_tokens(self) -> list[ApiToken]:
        with self._db.tx() as s:
            return [
                convert.api_token(r)
                for r in s.scalars(select(ApiTokenRow).order_by(ApiTokenRow.id))
            ]

    def revoke(self, token_id: int) -> ApiToken:
        """Revoked at once: the next request with it is refused. Revoking twice is a no-op."""
        with self._db.tx() as s:
            row = s.get(ApiTokenRow, token_id)
            if row is None:
                raise NotFound(f"token {token_id} not found", field="token")
            if row.revoked_at is None:
                row.revoked_at = utcnow()
            return convert.api_token(row)

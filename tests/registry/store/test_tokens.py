"""The token store: secrets stored as hashes, scopes checked, `last_used_at` written at most once
a minute, and a revoked token refused at once; on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import update

from registry.errors import InvalidValue, NotFound, Unauthorized
from registry.store import SqlRegistry
from registry.tables import ApiTokenRow


def test_tokens_are_stored_hashed_scoped_and_revoked_at_once(registry: SqlRegistry) -> None:
    token, secret = registry.tokens.create(name="ci", scopes=["write", "read"])
    assert secret.startswith("strata_") and len(secret) > 40
    assert token.scopes == ("read", "write") and token.prefix == secret[:11]
    with registry.engine.connect() as conn:
        stored = " ".join(str(v) for row in conn.exec_driver_sql("SELECT * FROM api_tokens")
                          for v in row)  # fmt: skip
    assert secret not in stored and secret[11:] not in stored
    assert registry.tokens.authenticate(secret).id == token.id
    first_use = registry.tokens.authenticate(secret).last_used_at
    assert first_use is not None
    # reads do not each write: last_used_at moves at most once a minute
    assert registry.tokens.authenticate(secret).last_used_at == first_use
    with registry.engine.begin() as conn:
        conn.execute(update(ApiTokenRow).values(last_used_at=first_use - timedelta(minutes=2)))
    assert registry.tokens.authenticate(secret).last_used_at > first_use
    for bad in ("", "strata_wrong", secret + "x", secret[:-1]):
        with pytest.raises(Unauthorized):
            registry.tokens.authenticate(bad)
    registry.tokens.revoke(token.id)
    with pytest.raises(Unauthorized):
        registry.tokens.authenticate(secret)
    assert registry.tokens.list_tokens()[0].revoked_at is not None
    for scopes in ([], ["root"], "read"):
        with pytest.raises(InvalidValue) as exc:
            registry.tokens.create(name="x", scopes=scopes)  # type: ignore[arg-type]
        assert exc.value.field == "scopes"
    with pytest.raises(NotFound):
        registry.tokens.revoke(999)

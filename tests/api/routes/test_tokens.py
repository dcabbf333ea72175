"""`/v1/tokens` (admin scope): a token is created with its secret shown once, listed without
it, and revoked at once; every route but /health needs a token of the right scope, and no
secret reaches a log or an error document."""

from __future__ import annotations

import pytest

from tests.api.conftest import Api
from tests.api.helpers import _problem


def test_every_route_but_health_needs_a_token_with_the_right_scope(api: Api) -> None:
    c = api.client
    assert c.get("/health").json() == {
        "status": "ok", "checks": {"database": "ok", "store": "ok"}}  # fmt: skip
    r = c.get("/v1/streams")
    _problem(r, 401, "authorization")
    assert r.headers["www-authenticate"].startswith("Bearer")
    _problem(c.get("/v1/streams", headers={"Authorization": "Bearer strata_nope"}), 401)
    _problem(c.get("/v1/streams", headers={"Authorization": "Basic abc"}), 401)
    assert c.get("/v1/streams", headers=api.auth("read")).status_code == 200
    body = {"name": "s", "base": {"kind": "tiny"}}
    _problem(c.post("/v1/streams", json=body, headers=api.auth("read")), 403, "authorization")
    _problem(c.get("/v1/tokens", headers=api.auth("write")), 403)
    # an admin creates and revokes a token; the revoked one stops working at once
    made = c.post("/v1/tokens", json={"name": "ci", "scopes": ["read"]}, headers=api.auth())
    assert made.status_code == 201 and made.json()["token"].startswith("strata_")
    ci = {"Authorization": f"Bearer {made.json()['token']}"}
    assert c.get("/v1/streams", headers=ci).status_code == 200
    assert c.delete(f"/v1/tokens/{made.json()['id']}", headers=api.auth()).json()["revoked_at"]
    _problem(c.get("/v1/streams", headers=ci), 401)
    listed = c.get("/v1/tokens", headers=api.auth()).json()
    assert all("token" not in t for t in listed["data"])  # secrets are never listed
    spec = c.get("/openapi.json").json()
    assert "/v1/streams/{stream}/tasks" in spec["paths"]


def test_tokens_never_reach_logs_or_error_documents(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG")
    secret = api.tokens["write"]
    wrong = secret[:-4] + "abcd"
    answers = [
        api.client.get("/v1/streams", headers={"Authorization": f"Bearer {secret}"}),
        api.client.get("/v1/streams", headers={"Authorization": f"Bearer {wrong}"}),
        api.client.post(
            "/v1/streams",
            json={"name": "../x", "base": {"kind": "tiny"}},
            headers={"Authorization": f"Bearer {secret}"},
        ),
        api.client.get("/v1/tokens", headers={"Authorization": f"Bearer {secret}"}),
    ]
    assert [r.status_code for r in answers] == [200, 401, 422, 403]
    for text in (caplog.text, *(r.text for r in answers)):
        assert secret not in text and wrong not in text and secret[7:] not in text


def test_a_token_is_created_once_listed_without_its_secret_and_revoked_once(api: Api) -> None:
    c, admin = api.client, api.auth()
    made = c.post("/v1/tokens", json={"name": "deploy", "scopes": ["write", "read", "write"]},
                  headers=admin)  # fmt: skip
    assert made.status_code == 201, made.text
    token = made.json()
    secret = token["token"]
    assert secret.startswith("strata_") and secret.startswith(token["prefix"])
    assert (token["name"], token["scopes"]) == ("deploy", ["read", "write"])  # sorted, once each
    assert token["revoked_at"] is None and token["last_used_at"] is None
    listed = c.get("/v1/tokens", headers=admin)
    assert listed.status_code == 200
    body = listed.json()
    assert body["count"] == 4 and [t["name"] for t in body["data"]] == [
        "read", "write", "admin", "deploy"]  # fmt: skip
    assert all("token" not in t for t in body["data"])
    for secret_of in (secret, *api.tokens.values()):  # no secret, nor what follows its prefix
        assert secret_of not in listed.text and secret_of[11:] not in listed.text
    new = {"Authorization": f"Bearer {secret}"}
    assert c.post("/v1/streams", json={"name": "../x", "base": {"kind": "tiny"}},
                  headers=new).status_code == 422  # write scope: past authorization  # fmt: skip
    _problem(c.get("/v1/tokens", headers=new), 403, "authorization")  # not an admin
    used = next(
        t for t in c.get("/v1/tokens", headers=admin).json()["data"] if t["id"] == token["id"]
    )
    assert used["last_used_at"] is not None
    revoked = c.delete(f"/v1/tokens/{token['id']}", headers=admin)
    assert revoked.status_code == 200 and revoked.json()["revoked_at"] is not None
    assert "token" not in revoked.json()
    _problem(c.get("/v1/streams", headers=new), 401, "authorization")
    again = c.delete(f"/v1/tokens/{token['id']}", headers=admin)  # revoking twice changes nothing
    assert again.status_code == 200 and again.json()["revoked_at"] == revoked.json()["revoked_at"]
    _problem(c.delete("/v1/tokens/99999", headers=admin), 404, "token")
    _problem(c.delete("/v1/tokens/0", headers=admin), 422, "token_id")
    listed_after = c.get("/v1/tokens", headers=admin).json()["data"]
    assert [t["revoked_at"] is not None for t in listed_after] == [False, False, False, True]


def test_token_requests_are_checked_and_only_admins_manage_tokens(api: Api) -> None:
    c, admin = api.client, api.auth()
    for body, field in [
        ({"name": "x", "scopes": []}, "scopes"),
        ({"name": "x", "scopes": ["root"]}, "scopes.0"),
        ({"name": "x", "scopes": "read"}, "scopes"),
        ({"scopes": ["read"]}, "name"),
        ({"name": "x", "scopes": ["read"], "extra": 1}, "extra"),
    ]:
        _problem(c.post("/v1/tokens", json=body, headers=admin), 422, field)
    for scope in ("read", "write"):
        h = api.auth(scope)
        _problem(c.post("/v1/tokens", json={"name": "x", "scopes": ["admin"]}, headers=h), 403)
        _problem(c.get("/v1/tokens", headers=h), 403)
        _problem(c.delete("/v1/tokens/1", headers=h), 403)
    _problem(c.get("/v1/tokens"), 401, "authorization")
    names = [t["name"] for t in c.get("/v1/tokens", headers=admin).json()["data"]]
    assert names == ["read", "write", "admin"]  # nothing was created by the refused requests
    assert api.inst.registry.tokens.list_tokens()[0].revoked_at is None  # nor revoked

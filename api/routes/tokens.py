"""API tokens (admin scope): create (the secret is shown once), list, revoke."""

from __future__ import annotations

from fastapi import APIRouter

from api.deps import AdminToken, IdPath, InstDep
from api.schemas import TokenCreate, TokenCreated, TokenPublic, TokensPublic

router = APIRouter(prefix="/tokens", tags=["tokens"])


@router.post("", status_code=201, response_model=TokenCreated)
def create(body: TokenCreate, inst: InstDep, _: AdminToken) -> object:
    token, secret = inst.registry.tokens.create(name=body.name, scopes=body.scopes)
    return {**TokenPublic.model_validate(token).model_dump(), "token": secret}


@router.get("", response_model=TokensPublic)
def list_tokens(inst: InstDep, _: AdminToken) -> object:
    data = inst.registry.tokens.list_tokens()
    return {"data": data, "count": len(data)}


@router.delete("/{token_id}", response_model=TokenPublic)
def revoke(token_id: IdPath, inst: InstDep, _: AdminToken) -> object:
    """Revoked at once: the next request with it gets 401."""
    return inst.registry.tokens.revoke(token_id)

"""Dependencies of the routes: the instance, the dispatcher, and bearer-token scopes."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Path, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from registry.entities import ApiToken, Stream
from registry.errors import Forbidden, Unauthorized
from registry.instance import Instance
from registry.store.adapters import MAX_VERSION  # version numbers are INTEGER columns
from registry.store.async_reads import AsyncReads
from services.dispatch import Dispatcher

MAX_ID = 2**63 - 1  # BIGINT ids: a larger number is refused before it reaches the database
IdPath = Annotated[int, Path(ge=1, le=MAX_ID)]
VersionPath = Annotated[int, Path(ge=0, le=MAX_VERSION)]
Cursor = Annotated[
    int, Query(ge=0, le=MAX_ID, description="next_cursor of the previous page (0: the first)")
]

_bearer = HTTPBearer(auto_error=False, description="An API token: `Authorization: Bearer ...`")

# write implies read; admin implies both
_IMPLIED = {"read": {"read", "write", "admin"}, "write": {"write", "admin"}, "admin": {"admin"}}


# Dependencies that do no I/O are `async`: FastAPI runs a plain `def` one on the threadpool, a
# thread hop per request each (docs/notes/2026-11-22-api-under-load.md).
async def get_instance(request: Request) -> Instance:
    inst: Instance = request.app.state.inst
    return inst


async def get_dispatcher(request: Request) -> Dispatcher:
    dispatcher: Dispatcher = request.app.state.dispatcher
    return dispatcher


async def get_reads(request: Request) -> AsyncReads:
    reads: AsyncReads | None = getattr(request.app.state, "reads", None)
    if reads is None:
        raise RuntimeError("the app's lifespan has not run: serve it with an ASGI server, or "
                           "use `with TestClient(app)`")  # fmt: skip
    return reads


InstDep = Annotated[Instance, Depends(get_instance)]
ReadsDep = Annotated[AsyncReads, Depends(get_reads)]
DispatcherDep = Annotated[Dispatcher, Depends(get_dispatcher)]


BearerDep = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


async def _authenticate(reads: ReadsDep, credentials: BearerDep) -> ApiToken:
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise Unauthorized("a bearer token is required", field="authorization")
    return await reads.authenticate(credentials.credentials)


def require(scope: str) -> object:
    """A dependency that admits tokens holding `scope` (or a scope that implies it)."""

    async def check(token: Annotated[ApiToken, Depends(_authenticate)]) -> ApiToken:
        if not _IMPLIED[scope] & set(token.scopes):
            raise Forbidden(f"this token lacks the '{scope}' scope", field="authorization")
        return token

    return Depends(check)


ReadToken = Annotated[ApiToken, require("read")]
WriteToken = Annotated[ApiToken, require("write")]
AdminToken = Annotated[ApiToken, require("admin")]


def stream_by_name(
    inst: InstDep, stream: str, _token: Annotated[ApiToken, Depends(_authenticate)]
) -> Stream:
    """The `{stream}` path parameter, by name; only after authentication, so that a caller
    without a token cannot tell which streams exist (401, never 404)."""
    return inst.registry.streams.get(stream)


StreamDep = Annotated[Stream, Depends(stream_by_name)]

"""Streams: create (importing the base model as snapshot v0), list, get."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from api.deps import InstDep, ReadToken, StreamDep, WriteToken
from api.schemas import StreamCreate, StreamPublic, StreamsPublic
from workers.streams import create_stream

router = APIRouter(prefix="/streams", tags=["streams"])


@router.post("", status_code=201, response_model=StreamPublic)
def create(body: StreamCreate, inst: InstDep, _: WriteToken) -> object:
    """Create a stream; its base model is imported and stored as snapshot v0 first."""
    base = body.base.model_dump(exclude_none=True)
    stream, _snapshot = create_stream(
        inst, name=body.name, base=base, method=body.method, hyperparams=body.hyperparams,
        method_options=body.method_options,
    )  # fmt: skip
    return stream


@router.get("", response_model=StreamsPublic)
def list_streams(
    inst: InstDep,
    _: ReadToken,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    cursor: Annotated[int, Query(ge=0, description="next_cursor of the previous page")] = 0,
) -> object:
    streams = inst.registry.streams.list_streams(limit=limit, after_id=cursor)
    nxt = streams[-1].id if len(streams) == limit else None
    return {"data": streams, "next_cursor": nxt}


@router.get("/{stream}", response_model=StreamPublic)
def get(stream: StreamDep, _: ReadToken) -> object:
    return stream

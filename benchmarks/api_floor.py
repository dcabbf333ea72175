"""The least a job-status read can cost here, for `api_load.py --floor`: not Strata.

An ASGI app with one route, `GET /v1/jobs/{id}`, that answers from one prepared statement
fetching the token's row and the job's row together over psycopg's async pool, with no scope
check, no problem documents, no response model and no middleware of ours. It shows what the
machine, the framework (FastAPI on uvicorn with httptools and uvloop) and PostgreSQL allow, so
that Strata's figures can be read against it. Started by `api_load.py` on the same database:

    STRATA_DATABASE_URL=postgresql://... python -m uvicorn --app-dir benchmarks api_floor:app
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import FastAPI, Header, HTTPException
from psycopg_pool import AsyncConnectionPool

URL = os.environ["STRATA_DATABASE_URL"].replace("postgresql+psycopg://", "postgresql://")
QUERY = (
    "SELECT j.id, j.kind, j.state, j.progress, j.created_at FROM api_tokens t, jobs j "
    "WHERE t.token_hash = %s AND t.revoked_at IS NULL AND j.id = %s"
)
pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
    URL, min_size=8, max_size=8, open=False, kwargs={"autocommit": True}
)


@asynccontextmanager
async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
    await pool.open()
    yield
    await pool.close()


app = FastAPI(lifespan=lifespan)


@app.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@app.get("/v1/jobs/{job_id}")
async def job(job_id: int, authorization: Annotated[str, Header()]) -> dict[str, Any]:
    digest = hashlib.sha256(authorization.removeprefix("Bearer ").encode()).hexdigest()
    async with pool.connection() as conn:
        row = await (await conn.execute(QUERY, (digest, job_id), prepare=True)).fetchone()
    if row is None:
        raise HTTPException(404)
    return {"id": row[0], "kind": row[1], "state": row[2], "progress": row[3],
            "created_at": row[4]}  # fmt: skip

"""The least a download through an API server can cost here, for `download_api.py --floor`: not
Strata.

An ASGI app with one route, `GET /v1/raw/{key}`, that passes an S3 object's bytes on to its client
as they arrive from the S3 server (the `minio` client's stream, 1 MiB reads), with the object's
length. No token, no database, no digest check, no local copy, no archive. It shows what the
machine, the framework (FastAPI on uvicorn with httptools and uvloop) and one more hop allow a
download served from the object store, so that Strata's cold download can be read against it.
Started by `download_api.py` beside Strata's server, on the same S3 server:

    FLOOR_S3_ENDPOINT=127.0.0.1:PORT FLOOR_S3_BUCKET=... python -m uvicorn \\
        --app-dir benchmarks download_floor:app
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from minio import Minio

CHUNK = 1024 * 1024
BUCKET = os.environ["FLOOR_S3_BUCKET"]
client = Minio(os.environ["FLOOR_S3_ENDPOINT"], access_key="testing", secret_key="testing",
               secure=False, region="us-east-1")  # fmt: skip
app = FastAPI()


@app.get("/health")
def health() -> dict[str, str]:
    return {"status": "ok"}


@app.get("/v1/raw/{key}")  # under /v1, where StrataClient sends its paths
def raw(key: str) -> StreamingResponse:
    response = client.get_object(BUCKET, key)

    def body() -> Iterator[bytes]:
        try:
            yield from response.stream(CHUNK)
        finally:
            response.close()
            response.release_conn()

    length = response.headers["Content-Length"]
    return StreamingResponse(body(), media_type="application/octet-stream",
                             headers={"Content-Length": length})  # fmt: skip

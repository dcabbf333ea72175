"""The web dashboard at `/ui`: static files (`api/ui/`: one HTML page, ES modules, a style
sheet; no build step) served without a token. Every datum on the page comes from the `/v1` JSON
API, which the page calls with the token the user pasted (kept in the tab's sessionStorage and
sent only as `Authorization: Bearer`, never in a URL).

    mount(app)
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import RedirectResponse
from starlette.responses import Response
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

UI_DIR = Path(__file__).with_name("ui")
PREFIX = "/ui"

# The page holds a bearer token: it runs only its own scripts and styles, talks only to its own
# origin, cannot be framed, and sends no Referer (its URLs name streams, never the token).
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",  # revalidated (ETag) on each load: a new release shows at once
}
MEDIA_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
               ".html": "text/html; charset=utf-8"}  # fmt: skip


class _Files(StaticFiles):
    """The dashboard's files with the headers above, and a JavaScript media type that does not
    depend on the host's mime.types (browsers refuse a module script served as text/plain)."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        served = getattr(response, "path", None)  # a FileResponse's file (index.html for /ui/)
        media_type = MEDIA_TYPES.get(Path(served).suffix) if served else None
        if media_type is not None:
            response.headers["Content-Type"] = media_type
        response.headers.update(HEADERS)
        return response


def mount(app: FastAPI) -> None:
    """Serve the dashboard at /ui/ (and /ui, redirected there); not in the OpenAPI document."""

    @app.get(PREFIX, include_in_schema=False)
    async def dashboard() -> RedirectResponse:
        return RedirectResponse(f"{PREFIX}/")

    app.mount(PREFIX, _Files(directory=UI_DIR, html=True), name="ui")

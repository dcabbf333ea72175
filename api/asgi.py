"""The service's ASGI app, built from the environment's settings in each server process:
`uvicorn --factory api.asgi:service_app` (what `strata api --workers N` runs)."""

from __future__ import annotations

from fastapi import FastAPI

from api.app import create_app, freeze_startup_objects
from registry.instance import open_instance
from registry.settings import StrataSettings


def service_app() -> FastAPI:
    """The API with jobs sent to Celery workers through the broker (no migration: `strata
    migrate` runs once, before the API processes start)."""
    from workers.celery_app import CeleryDispatcher

    app = create_app(open_instance(StrataSettings(), upgrade=False, api=True), CeleryDispatcher())
    freeze_startup_objects()
    return app

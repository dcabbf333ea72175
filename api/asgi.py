"""The service's ASGI app, built from the environment's settings in each server process:
`uvicorn --factory api.asgi:service_app` (what `strata api --workers N` runs)."""

from __future__ import annotations

from fastapi import FastAPI

from api.app import create_app, freeze_startup_objects
from registry.instance import open_instance
from registry.settings import StrataSettings
from services.broker import CeleryDispatcher, CeleryPredictor, default_app


def service_app() -> FastAPI:
    """The API with jobs sent to Celery workers through the broker, and predictions to the
    `predict` queue's workers (no migration: `strata migrate` runs once, before the API
    processes start)."""
    settings = StrataSettings()
    celery = default_app()
    predictor = CeleryPredictor(celery, timeout_s=settings.predict_timeout_s)
    inst = open_instance(settings, upgrade=False, api=True)
    app = create_app(inst, CeleryDispatcher(celery), predictor)
    freeze_startup_objects()
    return app

"""The e2e service fixture: the API over real HTTP with its jobs run by Celery worker processes
(PostgreSQL, Redis, the S3 test server) or by the in-process worker of `strata serve`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from api.app import create_app
from registry.instance import open_instance
from registry.settings import StrataSettings
from services.broker import CeleryDispatcher, CeleryPredictor, make_celery
from services.dispatch import Dispatcher
from tests.e2e.helpers import WORKER_KNOBS, Service, _service
from tests.harness import celery_workers, serve, server_env, settings_kwargs
from workers.inprocess import InProcessWorker
from workers.predict import InProcessPredictor


@pytest.fixture(params=["server", "embedded"])
def service(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Service]:
    if request.param == "server":
        env = server_env(request, tmp_path)
        env.update({f"STRATA_{k.upper()}": v for k, v in WORKER_KNOBS.items()})
        settings = StrataSettings(**settings_kwargs(env))
        inst = open_instance(settings, upgrade=False)
        celery = make_celery(settings)
        dispatcher: Dispatcher = CeleryDispatcher(celery)
        # the API process asks a predict worker (a third process) and never loads a model
        predictor = CeleryPredictor(celery, timeout_s=120)
        with celery_workers(env, tmp_path / "workers", count=2) as workers:
            workers.start("predict", queues="predict", pool="threads")
            with serve(create_app(inst, dispatcher, predictor)) as url:
                yield _service(url, inst, dispatcher)
        redis.Redis.from_url(settings.broker_url).flushdb()
    else:
        knobs = {k: float(v) if "." in v or k.endswith("_s") else int(v)
                 for k, v in WORKER_KNOBS.items()}  # fmt: skip
        settings = StrataSettings(data_dir=tmp_path / "embedded", **knobs)
        inst = open_instance(settings)
        worker = InProcessWorker(inst, threads=2, scheduler=False).start()
        try:
            with serve(create_app(inst, worker, InProcessPredictor(inst))) as url:
                yield _service(url, inst, worker)
        finally:
            worker.stop(timeout=60)
    inst.close()

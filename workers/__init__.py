"""The worker side: Celery tasks, job handlers, model loading (see `workers.celery_app`).

A Celery worker given `STRATA_METRICS_PORT` keeps its metrics in prometheus_client's
multiprocess mode, so that the processes of a prefork pool count into files its main process
serves (`workers.metrics`). prometheus_client chooses how it stores values when it is first
imported, so the choice is made here, before any module of the package (or of the registry)
imports it, and only in a `celery ... worker` process (not in `celery inspect`, which a
healthcheck runs beside it).
"""

import os as _os
import sys as _sys

if (
    _os.environ.get("STRATA_METRICS_PORT")
    and "worker" in _sys.argv[1:]
    and not _os.environ.get("_STRATA_METRICS_PREPARED")  # a pool's process started anew
):
    from services.metrics_dir import prepare as _prepare

    _prepare(prefix="strata-worker-metrics-")
    _os.environ["_STRATA_METRICS_PREPARED"] = "1"

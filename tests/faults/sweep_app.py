"""The service's Celery app with kombu's sweep for unacknowledged messages run every second
(kombu's default: a scan every 10th tick of 10 s). The sweep is what re-delivers a message held
longer than the visibility timeout; at a 1 s timeout, the default's 100 s between scans would
leave a test-length job alone by chance rather than by design."""

from __future__ import annotations

from workers.celery_app import app

__all__ = ["app"]

app.conf.broker_transport_options = {
    **app.conf.broker_transport_options,
    "unacked_restore_interval": 1,  # seconds between sweeps
    "unacked_restore_throttle": 1,  # every sweep scans
}

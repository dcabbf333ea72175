"""The Celery client side (`services.broker`) on the real Redis: a prediction no worker
answers ends in 504 within the timeout, its message can no longer run, and its cancel key is
set for a worker that took it late."""

from __future__ import annotations

import dataclasses
import random
import time

import redis
from fastapi.testclient import TestClient

from api.app import create_app
from registry.instance import Instance
from registry.settings import StrataSettings
from services.broker import CANCEL_KEY, CeleryPredictor, make_celery
from tests.api.conftest import Recorder, _tokens
from workers.streams import create_stream


def test_a_prediction_no_worker_answers_is_a_504_within_the_timeout(instance: Instance) -> None:
    broker = f"redis://127.0.0.1:6379/{random.randint(1, 15)}"
    client = redis.Redis.from_url(broker)
    client.flushdb()
    inst = dataclasses.replace(instance, settings=StrataSettings(broker_url=broker))
    create_stream(inst, name="s", base={"kind": "tiny"})  # ready: imported in this process
    celery = make_celery(inst.settings)
    predictor = CeleryPredictor(celery, timeout_s=1.5)  # and no worker consumes `predict`
    app = create_app(inst, Recorder(), predictor)
    h = {"Authorization": f"Bearer {_tokens(inst)['read']}"}
    with TestClient(app, raise_server_exceptions=False) as c:
        start = time.monotonic()
        r = c.post("/v1/streams/s/predict", json={"inputs": ["hello"]}, headers=h)
        waited = time.monotonic() - start
    assert r.status_code == 504, r.text
    body = r.json()
    assert body["code"] == "predict_timeout" and "STRATA_PREDICT_TIMEOUT_S" in body["detail"]
    assert 1.5 <= waited < 30
    # the query is still on the queue, but a worker that takes it now skips it: it is revoked
    # and its cancel key is set (and the message expired with the wait)
    keys = [k.decode() for k in client.keys(CANCEL_KEY + "*")]
    assert len(keys) == 1 and client.ttl(keys[0]) > 0
    assert client.llen("predict") == 1
    client.flushdb()
    celery.close()

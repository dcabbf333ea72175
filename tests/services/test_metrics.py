"""What /metrics reads at scrape time (`services.metrics`): jobs by kind and state from a real
registry (SQLite and PostgreSQL), queue depths from the real Redis, and a source that does not
answer reported as down without failing the scrape."""

from __future__ import annotations

import random

import redis
from prometheus_client.parser import text_string_to_metric_families

from registry.entities import JobKind, JobState
from registry.settings import StrataSettings
from registry.store import SqlRegistry, open_registry
from services.broker import RUN_JOB, CeleryDispatcher, make_celery
from services.metrics import StateCollector, exposition, metrics_registry
from tests.harness import free_port
from tests.registry.store.helpers import _stream_id, _submit


def scrape(collector: StateCollector) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """(sample name, sorted labels) -> value, from the text format a scrape answers."""
    text = exposition(metrics_registry([collector])).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}  # fmt: skip


def test_jobs_by_kind_and_state_and_queue_depths(registry: SqlRegistry) -> None:
    stream = _stream_id(registry)
    first, _second = (_submit(registry, stream, name) for name in ("a", "b"))
    registry.jobs.claim(first, worker="w1")
    registry.jobs.create(kind=JobKind.EVALUATE, stream_id=stream)
    broker = f"redis://127.0.0.1:6379/{random.randint(1, 15)}"
    client = redis.Redis.from_url(broker)
    client.flushdb()
    celery = make_celery(StrataSettings(broker_url=broker))
    try:
        for queue, priority in [("train", None), ("train", 5), ("default", None)]:
            celery.send_task(RUN_JOB, args=[1], queue=queue, priority=priority)
        got = scrape(StateCollector(registry.stats, CeleryDispatcher(celery).queue_depths))
    finally:
        client.flushdb()
        celery.close()

    def jobs(kind: str, state: str) -> float:
        return got[("strata_jobs", (("kind", kind), ("state", state)))]

    assert (jobs("train", "running"), jobs("train", "queued"), jobs("evaluate", "queued")) == (
        1, 1, 1)  # fmt: skip
    # every kind and state is a series, 0 when there is none
    assert len([k for k in got if k[0] == "strata_jobs"]) == len(JobKind) * len(JobState)
    assert jobs("import", "succeeded") == 0
    # a message of priority 5 waits in kombu's list for its priority step, counted too
    depth = {dict(k[1])["queue"]: v for k, v in got.items() if k[0] == "strata_queue_depth"}
    assert depth == {"train": 2, "default": 1, "predict": 0}
    up = {dict(k[1])["source"]: v for k, v in got.items() if k[0] == "strata_metrics_source_up"}
    assert up == {"database": 1, "broker": 1}


def test_a_source_that_does_not_answer_is_down_and_the_rest_still_answers(
    registry: SqlRegistry,
) -> None:
    _submit(registry, _stream_id(registry), "a")
    dead = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    celery = make_celery(StrataSettings(broker_url=dead, broker_timeout_s=1))
    got = scrape(StateCollector(registry.stats, CeleryDispatcher(celery).queue_depths))
    up = {dict(k[1])["source"]: v for k, v in got.items() if k[0] == "strata_metrics_source_up"}
    assert up == {"database": 1, "broker": 0}
    assert not [k for k in got if k[0] == "strata_queue_depth"]  # left out, not reported as 0
    assert got[("strata_jobs", (("kind", "train"), ("state", "queued")))] == 1
    # and a database that does not answer: no job series, the broker's still there
    away = open_registry(f"postgresql+psycopg://root@127.0.0.1:{free_port()}/x", upgrade=False,
                         timeout_s=1)  # fmt: skip
    got = scrape(StateCollector(away.stats, lambda: {"train": 3}))
    up = {dict(k[1])["source"]: v for k, v in got.items() if k[0] == "strata_metrics_source_up"}
    assert up == {"database": 0, "broker": 1}
    assert not [k for k in got if k[0] == "strata_jobs"]
    assert got[("strata_queue_depth", (("queue", "train"),))] == 3
    away.close()


def test_without_a_broker_there_is_no_queue_depth(registry: SqlRegistry) -> None:
    got = scrape(StateCollector(registry.stats))
    assert not [k for k in got if k[0] == "strata_queue_depth"]
    assert got[("strata_metrics_source_up", (("source", "database"),))] == 1

"""What `/metrics` reads at scrape time, and the text it answers.

Jobs by kind and state are the database's (one GROUP BY) and queue depths are the broker's
(the length of each Celery queue's Redis lists), so `StateCollector` reads them when Prometheus
scrapes: they are right whatever the number of API processes, and each process answers the
same. What processes count themselves (requests, jobs run, bytes moved) is kept per process,
and `exposition` adds up every process of a server in multiprocess mode
(`services.metrics_dir`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from registry.entities import JobKind, JobState
from registry.store.base import StatsStore
from services.metrics_dir import multiprocess_dir, sweep_dead

log = logging.getLogger(__name__)

QueueDepths = Callable[[], dict[str, int]]


class StateCollector(Collector):
    """`strata_jobs{kind, state}` from the registry, `strata_queue_depth{queue}` from the
    broker (when there is one), and `strata_metrics_source_up{source}`: 0 when a source did
    not answer this scrape (its other series are then left out, not reported as 0)."""

    def __init__(self, stats: StatsStore, queue_depths: QueueDepths | None = None) -> None:
        self.stats = stats
        self.queue_depths = queue_depths

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "strata_metrics_source_up", "Whether a source of /metrics answered this scrape",
            labels=["source"],
        )  # fmt: skip
        jobs = GaugeMetricFamily("strata_jobs", "Jobs in the registry by kind and state",
                                 labels=["kind", "state"])  # fmt: skip
        try:
            counts = self.stats.job_counts()
        except Exception as exc:  # the database is away: the rest of the scrape still answers
            log.warning("/metrics: job counts unavailable: %r", exc)
            up.add_metric(["database"], 0)
        else:
            up.add_metric(["database"], 1)
            # every known kind and state, so a series drops to 0 instead of vanishing
            known = [(k.value, s.value) for k in JobKind for s in JobState]
            for key in known:
                jobs.add_metric(list(key), counts.pop(key, 0))
            for key, n in sorted(counts.items()):  # anything newer than this code
                jobs.add_metric(list(key), n)
            yield jobs
        if self.queue_depths is not None:
            depth = GaugeMetricFamily("strata_queue_depth", "Messages waiting in a broker queue",
                                      labels=["queue"])  # fmt: skip
            try:
                depths = self.queue_depths()
            except Exception as exc:
                log.warning("/metrics: queue depths unavailable: %r", exc)
                up.add_metric(["broker"], 0)
            else:
                up.add_metric(["broker"], 1)
                for queue, n in sorted(depths.items()):
                    depth.add_metric([queue], n)
                yield depth
        yield up


class ProcessCollector(Collector):
    """This process's own metrics (with prometheus_client's process and GC collectors), or,
    in multiprocess mode, those of every process sharing its directory, read from their files
    at each scrape (the live gauges of processes that are gone left out)."""

    def collect(self) -> Iterable[Metric]:
        path = multiprocess_dir()
        if path is None:
            return REGISTRY.collect()
        sweep_dead(path)
        return MultiProcessCollector(None, path=str(path)).collect()


def metrics_registry(extra: Iterable[Collector] = ()) -> CollectorRegistry:
    """What a scrape reads: `ProcessCollector` plus `extra` (`StateCollector` in the API)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ProcessCollector())
    for collector in extra:
        registry.register(collector)
    return registry


def exposition(registry: CollectorRegistry) -> bytes:
    """The registry's text format (what prometheus_client's HTTP server answers too)."""
    return generate_latest(registry)

"""Job progress: throttled events, heartbeats and cooperative cancellation checks."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from continual.training import StepInfo, TrainingCallbacks
from registry.entities import JobState
from registry.instance import Instance
from workers.metrics import THROUGHPUT

log = logging.getLogger(__name__)

Listener = Callable[[str, dict[str, Any]], None]


@dataclass
class JobReporter:
    """Writes a job's progress to the registry without writing on every training step.

    `listener(kind, payload)` sees everything as it happens (the CLI draws its progress bar from
    it); the database gets an event every `event_every_s` and a heartbeat with the progress.
    """

    inst: Instance
    job_id: int
    listener: Listener | None = None
    worker: str | None = None  # the claim's worker; None: do not check ownership
    event_every_s: float = 2.0
    cancel_check_every_s: float = 1.0
    _last_event: float = field(default=0.0, init=False)
    _last_cancel_check: float = field(default=0.0, init=False)
    _cancelled: bool = field(default=False, init=False)

    def event(
        self, message: str, *, level: str = "info", metrics: dict[str, Any] | None = None
    ) -> None:
        self.inst.registry.jobs.add_event(
            self.job_id, message=message, level=level, metrics=metrics or None
        )
        if self.listener:
            self.listener("event", {"message": message, "level": level, **(metrics or {})})

    def progress(self, fraction: float) -> None:
        self.inst.registry.jobs.heartbeat(self.job_id, progress=fraction)

    def training_callbacks(self, *, span: tuple[float, float]) -> TrainingCallbacks:
        """Callbacks for `continual.training.train`; training covers `span` of the job."""
        lo, hi = span

        def on_step(info: StepInfo) -> None:
            THROUGHPUT.report(self.job_id, info.tokens_per_s)
            if self.listener:
                self.listener("step", info.__dict__)
            now = time.monotonic()
            if now - self._last_event >= self.event_every_s or info.step == info.total_steps:
                self._last_event = now
                self.progress(lo + (hi - lo) * info.step / info.total_steps)
                metrics = {
                    "step": info.step,
                    "total_steps": info.total_steps,
                    "loss": round(info.loss, 5),
                    "tokens_per_s": round(info.tokens_per_s, 1),
                    "eta_s": round(info.eta_s, 1),
                }
                self.event(f"step {info.step}/{info.total_steps}", metrics=metrics)

        return TrainingCallbacks(on_step=on_step, should_stop=self.cancel_requested)

    def cancel_requested(self) -> bool:
        """Cooperative cancellation: re-read the job at most once a second. Training also stops
        when the job is no longer this worker's (the reconciler re-queued it while this worker
        was unreachable): two workers never train one job to the end."""
        now = time.monotonic()
        if not self._cancelled and now - self._last_cancel_check >= self.cancel_check_every_s:
            self._last_cancel_check = now
            job = self.inst.registry.jobs.get(self.job_id)
            lost = job.state is not JobState.RUNNING or (
                self.worker is not None and job.worker != self.worker
            )
            self._cancelled = job.cancel_requested or lost
        return self._cancelled

"""Where outcomes go: one call per file or job feeds every count that the daemon keeps.

A file's outcome reaches the progress buffer (Redis), the job's own counts (`/jobs`, the
finish line), the Prometheus counters and the process summary (the `stopped` line) through
`Tally.file`, so no count can be fed and another forgotten.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import structlog

from uploader.metrics import Metrics
from uploader.pipeline.jobrun import JobRun
from uploader.state.finish import State
from uploader.state.progress import Counts, Outcome, Progress

log = structlog.get_logger("uploader.pipeline.tally")


@dataclass(frozen=True, slots=True)
class Result:
    """How one file ended: `label` names it in the failed hash, `reason` says why it failed."""

    outcome: Outcome
    label: str
    nbytes: int = 0
    reason: str = ""


@dataclass(slots=True)
class Summary:
    """What this process did, for the one line it logs when it stops."""

    files: Counts = field(default_factory=Counts)
    retried: int = 0
    jobs_finished: int = 0
    jobs_released: int = 0
    jobs_buried: int = 0
    uploads_cancelled: int = 0  # cut by the drain deadline or a second signal

    def log_fields(self) -> dict[str, int]:
        files = self.files
        return {
            "files_uploaded": files.uploaded,
            "files_skipped": files.skipped,
            "files_failed": files.failed,
            "bytes": files.bytes,
            "retries": self.retried,
            "uploads_cancelled": self.uploads_cancelled,
            "jobs_finished": self.jobs_finished,
            "jobs_buried": self.jobs_buried,
            "jobs_released": self.jobs_released,
        }


class Tally:
    def __init__(self, progress: Progress, metrics: Metrics) -> None:
        self.progress = progress
        self.metrics = metrics
        self.summary = Summary()

    def file(self, run: JobRun, index: int, result: Result) -> None:
        outcome, nbytes = result.outcome, result.nbytes
        self.progress.record(run.id, index, outcome, nbytes, result.label, result.reason)
        run.counts.add(outcome, nbytes)
        self.summary.files.add(outcome, nbytes)
        # The labelled children are looked up once, in Metrics, not per file.
        if outcome == "uploaded":
            self.metrics.files_uploaded.inc()
            self.metrics.bytes.inc(nbytes)
        elif outcome == "skipped":
            self.metrics.files_skipped.inc()
        else:
            self.metrics.files_failed.inc()
            log.warning("file_failed", path=result.label, reason=result.reason)

    def retried(self, reason: str) -> None:
        self.summary.retried += 1
        self.metrics.retries.labels(reason).inc()

    def finished(self, state: State) -> None:
        """Deleted from beanstalkd, or buried when some file failed."""
        self.summary.jobs_finished += 1
        if state == "failed":
            self.summary.jobs_buried += 1
        self.metrics.jobs.labels(state).inc()

    def buried(self) -> None:
        """Refused before it started, or stopped by a state no check foresaw."""
        self.summary.jobs_buried += 1

    def released(self) -> None:
        self.summary.jobs_released += 1
        self.metrics.jobs_released.inc()

"""One outcome, every count: the tally on its own (nothing is sent to Redis here)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import redis.asyncio as aioredis

from uploader.config.settings import RedisConfig
from uploader.metrics import Metrics
from uploader.pipeline.tally import Result, Tally
from uploader.redisio import Keys
from uploader.state.progress import Counts, Progress


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def test_one_outcome_feeds_the_buffer_the_job_the_metrics_and_the_summary() -> None:
    progress = Progress(aioredis.Redis(), Keys("t:"), RedisConfig(), "w")
    metrics = Metrics()
    tally = Tally(progress, metrics)
    run: Any = SimpleNamespace(id="job", counts=Counts())
    tally.file(run, 0, Result("uploaded", "/a", 10))
    tally.file(run, 1, Result("skipped", "/b"))
    tally.file(run, 2, Result("failed", "/c", reason="gone"))
    tally.retried("TransientFileError")

    assert run.counts == Counts(uploaded=1, skipped=1, failed=1, bytes=10)
    assert tally.summary.files == run.counts
    assert tally.summary.retried == 1
    assert progress.unsaved == 3
    assert sample(metrics, "uploader_files_total", outcome="uploaded") == 1
    assert sample(metrics, "uploader_files_total", outcome="skipped") == 1
    assert sample(metrics, "uploader_files_total", outcome="failed") == 1
    assert sample(metrics, "uploader_bytes_total") == 10
    assert sample(metrics, "uploader_retries_total", reason="TransientFileError") == 1


def test_job_settlements_are_counted_once_each() -> None:
    metrics = Metrics()
    tally = Tally(Progress(aioredis.Redis(), Keys("t:"), RedisConfig(), "w"), metrics)
    tally.finished("done")
    tally.finished("failed")
    tally.buried()
    tally.released()
    s = tally.summary
    assert (s.jobs_finished, s.jobs_buried, s.jobs_released) == (2, 2, 1)
    assert sample(metrics, "uploader_jobs_finished_total", state="failed") == 1
    assert sample(metrics, "uploader_jobs_released_total") == 1
    assert s.log_fields()["jobs_buried"] == 2

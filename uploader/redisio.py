"""Redis key names of the producer contract, and waiting out Redis outages."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

import redis.asyncio as aioredis
import redis.exceptions
import structlog

from uploader.retry import backoff_delays

T = TypeVar("T")
log = structlog.get_logger("uploader.redis")

# Errors that mean "Redis is not reachable right now", never "this job is bad".
OUTAGE_ERRORS: tuple[type[BaseException], ...] = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.BusyLoadingError,
    redis.exceptions.TryAgainError,
    OSError,
)


@dataclass(frozen=True, slots=True)
class Keys:
    prefix: str = "uploader:"

    def job(self, job_id: str) -> str:
        return f"{self.prefix}job:{job_id}"

    def files(self, job_id: str) -> str:
        return f"{self.prefix}job:{job_id}:files"

    def failed(self, job_id: str) -> str:
        return f"{self.prefix}job:{job_id}:failed"

    def marks(self, job_id: str) -> str:
        return f"{self.prefix}job:{job_id}:done"

    def walk(self, job_id: str) -> str:
        """Digests of a directory entry's walked chunks: marks apply only to an unchanged walk."""
        return f"{self.prefix}job:{job_id}:walk"

    def applied(self, job_id: str) -> str:
        """Which progress batches each writer had applied: written by earlier versions only,
        still deleted and expired with the rest."""
        return f"{self.prefix}job:{job_id}:applied"

    def failing(self, job_id: str) -> str:
        """The entries counted as failed, index -> label: a failure counts once per entry, and
        is taken back when another run uploads the entry."""
        return f"{self.prefix}job:{job_id}:failing"

    def cancel(self, job_id: str) -> str:
        return f"{self.prefix}job:{job_id}:cancel"

    @property
    def events(self) -> str:
        return f"{self.prefix}events"

    @property
    def failed_jobs(self) -> str:
        """Jobs whose last run finished `failed` (buried): score finished_at, member the ID."""
        return f"{self.prefix}jobs:failed"

    @property
    def finished_jobs(self) -> str:
        """The most recently finished jobs, whatever their state: score finished_at."""
        return f"{self.prefix}jobs:finished"


def connect(url: str, decode: bool = False) -> aioredis.Redis:
    return aioredis.Redis.from_url(
        url,
        socket_connect_timeout=5,
        socket_timeout=30,
        health_check_interval=30,
        decode_responses=decode,
    )


async def until_done(call: Callable[[], Awaitable[T]], what: str) -> T:
    """Run a Redis operation, waiting with backoff through outages instead of failing."""
    delays = backoff_delays(0.05, 2.0)
    failures = 0
    while True:
        try:
            result = await call()
            # redis-py (8.1) can swallow a cancellation that lands mid-command and return the
            # reply anyway; honour it here, or a cancelled helper task runs on forever.
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise asyncio.CancelledError
            return result
        except OUTAGE_ERRORS as exc:
            failures += 1
            delay = next(delays)
            if failures == 1 or failures % 20 == 0:
                log.warning("redis_unavailable", operation=what, error=str(exc), failures=failures)
            await asyncio.sleep(delay)


def text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def text_map(
    mapping: Mapping[bytes, bytes] | Mapping[str, str] | Mapping[bytes | str, bytes | str],
) -> dict[str, str]:
    """A Redis hash reply as str -> str, whether the client decodes responses or not."""
    return {text(k): text(v) for k, v in mapping.items()}

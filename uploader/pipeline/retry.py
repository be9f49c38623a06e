"""Retries with full-jitter backoff (clock.backoff_delays), and the one place that decides whether
a failure is worth a retry."""

from __future__ import annotations

import asyncio
import errno
import random
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from uploader.clock import Sleep, backoff_delays
from uploader.config.settings import RetryConfig
from uploader.errors import FileError, PermanentFileError, ThrottledError, TransientFileError

T = TypeVar("T")
# Throttled attempts allowed per counted attempt: max_attempts=5 rides out 100 throttled
# answers, with the default cap of 30 s roughly 25 minutes of a store saying "slow down".
THROTTLED_PER_ATTEMPT = 20


def classify(exc: BaseException) -> FileError:
    """Turn any failure of one upload into a FileError with a one-line reason.

    Stores translate their own library errors; this catches what slips past them.
    """
    if isinstance(exc, FileError):
        return exc
    if isinstance(exc, TimeoutError):
        return TransientFileError("timed out")
    if isinstance(exc, ConnectionError):
        return TransientFileError(f"connection error: {exc}")
    if isinstance(exc, OSError):
        if exc.errno in (errno.ENOENT, errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOTDIR, errno.EROFS):
            return PermanentFileError(f"{exc.strerror or exc}")
        return TransientFileError(f"{exc.strerror or exc}")
    return PermanentFileError(f"unexpected error: {type(exc).__name__}: {exc}")


@dataclass(frozen=True, slots=True)
class Attempts:
    """How an upload ended after retries: the error (None on success) and the attempt count."""

    error: FileError | None
    attempts: int


class RetryPolicy:
    def __init__(
        self, config: RetryConfig, sleep: Sleep = asyncio.sleep, rand: Callable[[], float] = random.random
    ) -> None:
        self.config = config
        self._sleep = sleep
        self._rand = rand

    async def run(
        self,
        operation: Callable[[], Awaitable[T]],
        on_retry: Callable[[FileError, int, float], None] | None = None,
    ) -> tuple[T | None, Attempts]:
        """Run `operation` until it succeeds, fails permanently, or attempts run out.

        Throttling (S3 SlowDown, HTTP 429/503) says "later", not "broken": those attempts do
        not count against `max_attempts`, up to THROTTLED_PER_ATTEMPT times as many, each
        still waiting out the capped backoff. So a burst of throttling never fails a file.
        """
        delays: Iterator[float] | None = None  # made at the first failure, not per file
        counted = throttled = 0
        while True:
            try:
                return await operation(), Attempts(None, counted + throttled + 1)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - every failure is classified, none escapes
                error = classify(exc)
            throttle_allowance = self.config.max_attempts * THROTTLED_PER_ATTEMPT
            if isinstance(error, ThrottledError) and throttled < throttle_allowance:
                throttled += 1
            else:
                counted += 1
            attempt = counted + throttled
            if not error.transient or counted >= self.config.max_attempts:
                if error.transient:
                    error = TransientFileError(f"{error.reason} (gave up after {attempt} attempts)")
                return None, Attempts(error, attempt)
            if delays is None:
                delays = backoff_delays(self.config.base, self.config.cap, self._rand)
            delay = next(delays)
            if on_retry is not None:
                on_retry(error, attempt, delay)
            await self._sleep(delay)

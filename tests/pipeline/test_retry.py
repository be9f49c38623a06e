"""Backoff with full jitter and the retry policy, with the clock and randomness injected."""

from __future__ import annotations

import asyncio
import errno
import itertools
import random
from collections.abc import Awaitable, Callable

import pytest

from uploader.clock import backoff_delays
from uploader.config.settings import RetryConfig
from uploader.errors import FileError, PermanentFileError, ThrottledError, TransientFileError
from uploader.pipeline.retry import RetryPolicy, classify


def take(n: int, base: float, cap: float, rand: float) -> list[float]:
    return list(itertools.islice(backoff_delays(base, cap, lambda: rand), n))


def test_backoff_ceilings_double_up_to_the_cap() -> None:
    assert take(10, 0.2, 30.0, 1.0) == pytest.approx([0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 12.8, 25.6, 30.0, 30.0])


def test_backoff_is_a_uniform_fraction_of_the_ceiling() -> None:
    assert take(4, 1.0, 100.0, 0.5) == pytest.approx([0.5, 1.0, 2.0, 4.0])
    assert take(4, 1.0, 100.0, 0.0) == [0.0, 0.0, 0.0, 0.0]


def test_backoff_with_real_jitter_stays_within_the_bounds() -> None:
    rng = random.Random(1234)
    delays = list(itertools.islice(backoff_delays(0.1, 2.0, rng.random), 500))
    ceilings = [min(2.0, 0.1 * 2**n) for n in range(500)]
    assert all(0 <= d <= c for d, c in zip(delays, ceilings, strict=True))
    assert max(delays[20:]) > 1.5  # jitter spans the range, not a constant fraction


def test_backoff_with_a_base_above_the_cap_never_exceeds_the_cap() -> None:
    assert take(3, 10.0, 1.0, 1.0) == [1.0, 1.0, 1.0]


def test_backoff_goes_on_forever_without_overflowing() -> None:
    assert take(2000, 0.2, 30.0, 1.0)[-1] == 30.0


class Recorder:
    """An injected sleep: records the delays, takes no time."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)


def policy(max_attempts: int = 5, base: float = 0.2, cap: float = 30.0) -> tuple[RetryPolicy, Recorder]:
    sleep = Recorder()
    return RetryPolicy(RetryConfig(max_attempts, base, cap), sleep=sleep, rand=lambda: 1.0), sleep


Operation = Callable[[], Awaitable[str]]


def failing(errors: list[BaseException], result: str = "ok") -> tuple[list[int], Operation]:
    calls: list[int] = []

    async def operation() -> str:
        calls.append(1)
        if len(calls) <= len(errors):
            raise errors[len(calls) - 1]
        return result

    return calls, operation


async def test_success_at_once_does_not_sleep() -> None:
    p, sleep = policy()
    calls, op = failing([])

    result, attempts = await p.run(op)

    assert (result, attempts.error, attempts.attempts) == ("ok", None, 1)
    assert sleep.delays == []
    assert len(calls) == 1


async def test_transient_errors_are_retried_then_succeed() -> None:
    p, sleep = policy()
    _calls, op = failing([TimeoutError(), ConnectionResetError(), TransientFileError("503")])
    retries: list[tuple[str, int, float]] = []

    result, attempts = await p.run(op, on_retry=lambda e, n, d: retries.append((e.reason, n, d)))

    assert (result, attempts.error, attempts.attempts) == ("ok", None, 4)
    assert sleep.delays == pytest.approx([0.2, 0.4, 0.8])
    assert [(n, d) for _, n, d in retries] == [(1, 0.2), (2, 0.4), (3, pytest.approx(0.8))]
    assert retries[0][0] == "timed out"


async def test_transient_errors_give_up_after_max_attempts() -> None:
    p, sleep = policy(max_attempts=3)
    calls, op = failing([TransientFileError("503")] * 10)

    result, attempts = await p.run(op)

    assert result is None
    assert attempts.attempts == 3
    assert len(calls) == 3
    assert isinstance(attempts.error, TransientFileError)
    assert attempts.error.reason == "503 (gave up after 3 attempts)"
    assert sleep.delays == pytest.approx([0.2, 0.4])  # no sleep after the last attempt


async def test_throttling_does_not_use_up_attempts_until_a_much_larger_bound() -> None:
    p, sleep = policy(max_attempts=3)
    _calls, op = failing([ThrottledError("SlowDown")] * 10 + [TimeoutError()] * 2)

    result, attempts = await p.run(op)

    assert (result, attempts.error, attempts.attempts) == ("ok", None, 13)
    assert max(sleep.delays) <= 30.0
    calls, op = failing([ThrottledError("SlowDown")] * 1000)
    _, attempts = await p.run(op)
    assert len(calls) == 3 * 20 + 3  # the throttling allowance, then the counted attempts
    assert attempts.error is not None and "gave up after 63 attempts" in attempts.error.reason


async def test_one_attempt_means_no_retry() -> None:
    p, sleep = policy(max_attempts=1)
    calls, op = failing([TimeoutError()])

    _, attempts = await p.run(op)

    assert (attempts.attempts, len(calls), sleep.delays) == (1, 1, [])


@pytest.mark.parametrize(
    "error",
    [
        PermanentFileError("refused path"),
        FileNotFoundError(errno.ENOENT, "No such file or directory"),
        PermissionError(errno.EACCES, "Permission denied"),
        ValueError("a bug"),
    ],
)
async def test_permanent_errors_are_not_retried(error: BaseException) -> None:
    p, sleep = policy()
    calls, op = failing([error])

    result, attempts = await p.run(op)

    assert result is None
    assert isinstance(attempts.error, PermanentFileError)
    assert (attempts.attempts, len(calls), sleep.delays) == (1, 1, [])


async def test_cancellation_is_never_swallowed() -> None:
    p, _ = policy()

    async def operation() -> None:
        raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        await p.run(operation)


async def test_cancellation_during_the_backoff_sleep_propagates() -> None:
    gate = asyncio.Event()

    async def sleep(_delay: float) -> None:
        gate.set()
        await asyncio.Event().wait()

    p = RetryPolicy(RetryConfig(5, 0.2, 30.0), sleep=sleep)
    _, op = failing([TimeoutError()] * 5)
    task = asyncio.create_task(p.run(op))
    await asyncio.wait_for(gate.wait(), 5)

    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


# --- classify ---


@pytest.mark.parametrize(
    ("code", "transient"),
    [
        (errno.ENOENT, False),
        (errno.EACCES, False),
        (errno.EPERM, False),
        (errno.EISDIR, False),
        (errno.ENOTDIR, False),
        (errno.EROFS, False),
        (errno.EIO, True),
        (errno.ENOSPC, True),
        (errno.EMFILE, True),
        (errno.EAGAIN, True),
    ],
)
def test_classify_os_errors_by_errno(code: int, transient: bool) -> None:
    error = classify(OSError(code, "strerror text"))
    assert error.transient is transient
    assert error.reason == "strerror text"


def test_classify_an_os_error_without_errno() -> None:
    assert classify(OSError("odd")).transient


def test_classify_timeouts_and_connection_errors_as_transient() -> None:
    assert classify(TimeoutError()).transient
    assert classify(TimeoutError()).reason == "timed out"
    for exc in (ConnectionResetError("reset"), ConnectionRefusedError("refused"), BrokenPipeError("pipe")):
        error = classify(exc)
        assert error.transient, exc
        assert error.reason.startswith("connection error"), exc


def test_classify_keeps_file_errors_as_they_are() -> None:
    for exc in (PermanentFileError("p"), TransientFileError("t"), ThrottledError("slow")):
        assert classify(exc) is exc


def test_classify_anything_else_as_permanent_naming_the_type() -> None:
    error = classify(KeyError("k"))
    assert isinstance(error, FileError)
    assert not error.transient
    assert "KeyError" in error.reason

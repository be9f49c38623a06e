"""Token buckets on a fake clock, the [limits] table, and the achieved rate through the daemon."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from pathlib import Path

import pytest

from tests.helpers import Env, wait_until
from uploader.config import settings as config_mod
from uploader.config.settings import LimitsConfig, RateLimit
from uploader.config.stores import LocalStoreConfig
from uploader.entries.files import SourceFile
from uploader.errors import ConfigError
from uploader.pipeline.ratelimit import RateLimiter, TokenBucket
from uploader.stores.base import PutRequest, PutResult
from uploader.stores.local import LocalStore


class FakeTime:
    """A clock that moves only when the test says so; sleepers wake when it passes them."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.naps: list[float] = []
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.naps.append(seconds)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self.now + seconds, next(self._order), future))
        await future

    async def advance(self, seconds: float) -> None:
        self.now += seconds
        while self._sleepers and self._sleepers[0][0] <= self.now + 1e-9:
            _, _, future = heapq.heappop(self._sleepers)
            if not future.done():
                future.set_result(None)
        for _ in range(10):  # let woken tasks run to their next wait
            await asyncio.sleep(0)


@pytest.fixture
def fake() -> FakeTime:
    return FakeTime()


def bucket(fake: FakeTime, rate: float, burst: float) -> TokenBucket:
    return TokenBucket(rate, burst, fake.clock, fake.sleep)


async def settle() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


async def test_a_full_bucket_lets_a_burst_through_then_each_caller_waits_its_exact_deficit(
    fake: FakeTime,
) -> None:
    b = bucket(fake, rate=10, burst=2)
    await b.acquire()
    await b.acquire()
    assert fake.naps == []
    third = asyncio.create_task(b.acquire())
    await settle()
    assert fake.naps == [pytest.approx(0.1)]
    await fake.advance(0.099)
    assert not third.done()
    await fake.advance(0.001)
    assert third.done()


async def test_waiting_callers_are_served_in_arrival_order_one_period_apart(fake: FakeTime) -> None:
    b = bucket(fake, rate=4, burst=1)
    await b.acquire()
    finished: list[int] = []

    async def caller(i: int) -> None:
        await b.acquire()
        finished.append(i)

    tasks = [asyncio.create_task(caller(i)) for i in range(4)]
    await settle()
    assert fake.naps == pytest.approx([0.25, 0.5, 0.75, 1.0])
    for step in range(1, 5):
        await fake.advance(0.25)
        assert finished == list(range(step))
    await asyncio.gather(*tasks)


async def test_a_request_bigger_than_the_bucket_waits_in_proportion_to_its_size(fake: FakeTime) -> None:
    b = bucket(fake, rate=1000, burst=1000)
    big = asyncio.create_task(b.acquire(5000))
    await settle()
    assert fake.naps == [pytest.approx(4.0)]
    await fake.advance(4.0)
    assert big.done()
    assert b.available() == pytest.approx(0)


async def test_the_bucket_refills_over_time_up_to_its_burst(fake: FakeTime) -> None:
    b = bucket(fake, rate=10, burst=5)
    await b.acquire(5)
    assert b.available() == pytest.approx(0)
    fake.now += 0.3
    assert b.available() == pytest.approx(3)
    fake.now += 100
    assert b.available() == pytest.approx(5)


async def test_rate_zero_is_unlimited_and_never_waits(fake: FakeTime) -> None:
    b = bucket(fake, rate=0, burst=0)
    for _ in range(1000):
        await b.acquire(1e9)
    assert fake.naps == []


async def test_a_new_rate_retimes_callers_already_waiting(fake: FakeTime) -> None:
    b = bucket(fake, rate=1, burst=1)
    await b.acquire()
    waiter = asyncio.create_task(b.acquire())
    await settle()
    assert fake.naps == [pytest.approx(1.0)]
    await fake.advance(0.5)  # half a token produced at the old rate
    b.set_rate(10, 10)
    await settle()
    assert fake.naps[-1] == pytest.approx(0.05)  # the other half at the new rate
    await fake.advance(0.04)
    assert not waiter.done()
    await fake.advance(0.01)
    assert waiter.done()


async def test_lifting_the_limit_releases_every_waiter(fake: FakeTime) -> None:
    b = bucket(fake, rate=1, burst=1)
    await b.acquire()
    waiters = [asyncio.create_task(b.acquire()) for _ in range(3)]
    await settle()
    b.set_rate(0, 0)
    await settle()
    assert all(w.done() for w in waiters)


async def test_a_cancelled_caller_gives_its_tokens_back(fake: FakeTime) -> None:
    b = bucket(fake, rate=1, burst=10)
    await b.acquire(10)
    waiter = asyncio.create_task(b.acquire(5))
    await settle()
    assert b.available() == pytest.approx(-5)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert b.available() == pytest.approx(0)


async def test_limiter_charges_the_tube_then_the_global_buckets(fake: FakeTime) -> None:
    config = LimitsConfig(
        files_per_second=100, bytes_per_second=1000, burst_seconds=1.0,
        tubes=(("bulk", RateLimit(files_per_second=2, bytes_per_second=100)),),
    )
    limiter = RateLimiter(config, fake.clock, fake.sleep)
    assert limiter.tube_wait("bulk") == 0 and limiter.tube_wait("other") == 0
    for _ in range(3):
        limiter.tube_take("bulk")  # the dispatcher hands out 3 files against a burst of 2
    assert limiter.tube_wait("bulk") == pytest.approx(1.0)  # one token, after paying the debt
    limiter.tube_take("other")  # unlimited tubes cost nothing
    assert limiter.tube_wait("other") == 0
    await limiter.acquire("other", 500)
    assert limiter.bytes.available() == pytest.approx(500)
    assert limiter.files.available() == pytest.approx(99)
    slow = asyncio.create_task(limiter.acquire("bulk", 300))
    await settle()
    assert fake.naps == [pytest.approx(2.0)]  # the tube's bytes: 200 over its 100 B/s
    limiter.apply(LimitsConfig())  # SIGHUP lifts every limit
    await settle()
    assert slow.done()
    assert limiter.tubes == {} and limiter.tube_wait("bulk") == 0


def test_limits_table_parses_and_refuses_what_it_cannot_use() -> None:
    config = config_mod.parse({"limits": {
        "files_per_second": 50, "bytes_per_second": 10_000_000, "burst_seconds": 0.5,
        "tubes": {"bulk": {"files_per_second": 5}, "video": {"bytes_per_second": 1e6}},
    }})
    limits = config.limits
    assert (limits.files_per_second, limits.bytes_per_second, limits.burst_seconds) == (50, 1e7, 0.5)
    assert dict(limits.tubes) == {"bulk": RateLimit(5, 0), "video": RateLimit(0, 1e6)}
    assert config_mod.parse({}).limits == LimitsConfig()
    bad = [
        ({"files_per_second": -1}, "[limits].files_per_second must be >= 0"),
        ({"burst_seconds": 0}, "[limits].burst_seconds must be >= 0.001"),
        ({"tubes": {"bulk": {"file_per_second": 1}}}, "[limits.tubes.bulk].file_per_second is not a known"),
        ({"tubes": {"bad name": {}}}, '[limits.tubes]."bad name" is not a valid tube name'),
        ({"tubes": {"bulk": 5}}, "[limits.tubes.bulk] must be a table"),
        ({"rate": 1}, "[limits].rate is not a known key"),
    ]
    for table, message in bad:
        with pytest.raises(ConfigError) as caught:
            config_mod.parse({"limits": table}, "u.toml")
        assert message in str(caught.value)


# --- through the daemon -------------------------------------------------------------------


class TimedStore(LocalStore):
    """A local store that notes when each upload started."""

    def __init__(self, config: LocalStoreConfig) -> None:
        super().__init__(config)
        self.starts: list[float] = []

    async def put(self, source: SourceFile, request: PutRequest) -> PutResult:
        self.starts.append(time.monotonic())
        return await super().put(source, request)


@pytest.mark.timeout(60)
async def test_daemon_holds_files_per_second_to_the_limit(env: Env, tmp_path: Path) -> None:
    rate, burst_seconds, count = 50.0, 0.1, 160
    config = env.config(limits={"files_per_second": rate, "burst_seconds": burst_seconds})
    store = TimedStore(config.store.local)
    paths = env.write_files(count, size=64)
    async with env.daemon(config, store=store):
        await env.push_job("rate", [str(p) for p in paths])
        state = await env.wait_final("rate", timeout=30)
    assert state["state"] == "done" and state["uploaded"] == str(count)
    burst = int(rate * burst_seconds)
    steady = store.starts[burst:]
    achieved = (len(steady) - 1) / (steady[-1] - steady[0])
    print(f"files/s achieved {achieved:.2f} over {steady[-1] - steady[0]:.2f}s (limit {rate})")
    assert achieved == pytest.approx(rate, rel=0.10)
    # The burst went at once, not at the rate: the bucket saved it up while idle.
    assert store.starts[burst - 1] - store.starts[0] < 0.5 * burst / rate


async def test_a_throttled_tube_does_not_hold_slots_that_other_tubes_need(env: Env) -> None:
    slow_tube = f"{env.tube}-slow"
    config = env.config(
        source={"tubes": [env.tube, slow_tube]},
        upload={"concurrency": 2},
        limits={"burst_seconds": 0.5, "tubes": {slow_tube: {"files_per_second": 2}}},
    )
    slow_paths, fast_paths = env.write_files(4, sub="slow"), env.write_files(40, sub="fast")
    async with env.daemon(config):
        started = time.monotonic()
        await env.push_job("slow", [str(p) for p in slow_paths], tube=slow_tube)
        await env.push_job("fast", [str(p) for p in fast_paths])
        fast = await env.wait_final("fast")
        fast_seconds = time.monotonic() - started
        slow = await env.wait_final("slow")
        slow_seconds = time.monotonic() - started
    assert fast["state"] == slow["state"] == "done"
    # 4 files at 2/s with a burst of 1: the last one goes 1.5 s after the first.
    assert slow_seconds >= 1.4
    assert fast_seconds < 1.0, f"fast job took {fast_seconds:.2f}s behind a throttled tube"


async def test_apply_limits_lifts_a_limit_for_uploads_already_waiting(env: Env) -> None:
    slow = env.config(limits={"files_per_second": 0.1, "burst_seconds": 10})  # 1 now, then 1 per 10 s
    paths = env.write_files(5)
    async with env.daemon(slow) as daemon:
        await env.push_job("lift", [str(p) for p in paths])
        await _uploaded(env, "lift", 1)
        daemon.scheduler.apply_limits(env.config())
        state = await env.wait_final("lift", timeout=5)
    assert state["state"] == "done" and state["uploaded"] == "5"


async def _uploaded(env: Env, job_id: str, count: int) -> None:
    async def enough() -> dict[str, str] | None:
        state = await env.state(job_id)
        return state if int(state.get("uploaded", "0")) >= count else None

    await wait_until(enough, 10, f"{count} files of {job_id} uploaded")

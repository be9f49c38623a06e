"""Token buckets for files/s and bytes/s: global ones, and optional ones per tube.

A bucket may go into debt: `acquire(n)` takes its `n` tokens at once and then sleeps exactly
until the clock has produced what is missing. So a caller never polls, callers are served in
the order they asked (each one's debt includes everyone's before it), and a request larger
than the bucket (a big file against bytes/s) simply waits in proportion to its size.
"""

from __future__ import annotations

import asyncio
import time

from uploader.clock import Clock, Sleep
from uploader.config.settings import LimitsConfig, RateLimit

# Rounding in the refill arithmetic must not turn into one more (near-zero) sleep.
EPSILON = 1e-9


class TokenBucket:
    """`rate` tokens a second, at most `burst` saved up; rate 0 means unlimited."""

    def __init__(
        self, rate: float, burst: float, clock: Clock = time.monotonic, sleep: Sleep = asyncio.sleep
    ) -> None:
        self._clock = clock
        self._sleep = sleep
        self.rate = 0.0
        self.burst = 0.0
        self._level = 0.0
        # Tokens the clock has produced since creation, never capped: a waiter sleeps until it
        # reaches the waiter's target, so the cap cannot strand one and rate changes are exact.
        self._produced = 0.0
        self._stamp = clock()
        self._wake: asyncio.Future[None] | None = None
        self.set_rate(rate, burst)

    @property
    def unlimited(self) -> bool:
        return self.rate <= 0

    def _refill(self) -> None:
        now = self._clock()
        gained = max(0.0, now - self._stamp) * self.rate
        self._stamp = now
        self._produced += gained
        self._level = min(self.burst, self._level + gained)

    def set_rate(self, rate: float, burst: float) -> None:
        """Change the rate now; callers already waiting recompute their wait at the new rate."""
        self._refill()
        was_unlimited = self.unlimited
        self.rate = max(0.0, rate)
        self.burst = max(1.0, burst)
        if was_unlimited:
            self._level = self.burst
        self._level = min(self._level, self.burst)
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)
        self._wake = None

    def available(self) -> float:
        """Tokens that can be taken now without waiting (negative: the debt)."""
        if self.unlimited:
            return float("inf")
        self._refill()
        return self._level

    def wait_time(self, n: float = 0.0) -> float:
        """Seconds until `n` tokens are available (n=0: until the bucket is out of debt)."""
        level = self.available()
        n = min(n, self.burst)
        return 0.0 if level >= n else (n - level) / self.rate

    def take(self, n: float) -> None:
        """Charge `n` tokens without waiting, possibly into debt that later callers wait off."""
        if not self.unlimited and n > 0:
            self._refill()
            self._level -= n

    async def acquire(self, n: float = 1.0) -> None:
        """Take `n` tokens, waiting exactly as long as the rate needs to cover them."""
        if self.unlimited or n <= 0:
            return
        self._refill()
        self._level -= n
        if self._level >= 0:
            return
        target = self._produced - self._level
        try:
            while not self.unlimited and (missing := target - self._produced) > EPSILON:
                await self._nap(missing / self.rate)
                self._refill()
        except asyncio.CancelledError:
            # Give back what was not used; callers already waiting keep their turn.
            self._refill()
            self._level = min(self.burst, self._level + n)
            raise

    async def _nap(self, seconds: float) -> None:
        """Sleep `seconds`, or less when `set_rate` changes what the wait should be."""
        if self._wake is None:
            self._wake = asyncio.get_running_loop().create_future()
        nap = asyncio.ensure_future(self._sleep(seconds))
        try:
            await asyncio.wait((nap, self._wake), return_when=asyncio.FIRST_COMPLETED)
        finally:
            nap.cancel()


class RateLimiter:
    """The global files/s and bytes/s buckets, and each configured tube's pair.

    Global buckets are charged per attempt, just before the store is asked (`acquire`):
    they protect the store and the link, and every attempt is a request carrying all the
    file's bytes. A tube's files/s is charged when the dispatcher hands out one of its files
    (`tube_wait` + `tube_take`), so a throttled tube's files never sit on upload slots that
    other tubes could use; its bytes/s is charged per attempt, once the size is known.
    """

    def __init__(
        self, config: LimitsConfig, clock: Clock = time.monotonic, sleep: Sleep = asyncio.sleep
    ) -> None:
        self._clock = clock
        self._sleep = sleep
        self.files = TokenBucket(0, 1, clock, sleep)
        self.bytes = TokenBucket(0, 1, clock, sleep)
        self.tubes: dict[str, tuple[TokenBucket, TokenBucket]] = {}
        self.apply(config)

    def apply(self, config: LimitsConfig) -> None:
        """Take new limits (SIGHUP); waiting callers re-time themselves at the new rates."""
        burst = config.burst_seconds
        _set(self.files, config.files_per_second, burst)
        _set(self.bytes, config.bytes_per_second, burst)
        wanted = dict(config.tubes)
        for name in list(self.tubes):
            if name not in wanted:
                # Unlimited from now on; waiters are released by set_rate.
                for bucket in self.tubes.pop(name):
                    bucket.set_rate(0, 1)
        for name, limit in wanted.items():
            if name not in self.tubes:
                self.tubes[name] = (
                    TokenBucket(0, 1, self._clock, self._sleep),
                    TokenBucket(0, 1, self._clock, self._sleep),
                )
            files, nbytes = self.tubes[name]
            _set(files, limit.files_per_second, burst)
            _set(nbytes, limit.bytes_per_second, burst)

    def tube_wait(self, tube: str) -> float:
        """Seconds before the dispatcher should hand out another file of `tube` (0: now)."""
        pair = self.tubes.get(tube)
        if pair is None:
            return 0.0
        return max(pair[0].wait_time(1), pair[1].wait_time())

    def tube_take(self, tube: str) -> None:
        pair = self.tubes.get(tube)
        if pair is not None:
            pair[0].take(1)

    async def acquire(self, tube: str, nbytes: int) -> None:
        """Wait for the right to send one file of `nbytes` from `tube` (the tube's share first)."""
        pair = self.tubes.get(tube)
        if pair is not None and not pair[1].unlimited:
            await pair[1].acquire(nbytes)
        if not self.files.unlimited:  # the common case costs no coroutine at all
            await self.files.acquire(1)
        if not self.bytes.unlimited:
            await self.bytes.acquire(nbytes)


def _set(bucket: TokenBucket, rate: float, burst_seconds: float) -> None:
    bucket.set_rate(rate, rate * burst_seconds)


__all__ = ["LimitsConfig", "RateLimit", "RateLimiter", "TokenBucket"]

"""Time as the daemon sees it, injectable: logic that waits is tested without waiting; and the
full-jitter backoff every retry loop waits out."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Time:
    monotonic: Clock = time.monotonic  # for durations and deadlines
    wall: Clock = time.time  # for what is written down: Unix seconds
    sleep: Sleep = asyncio.sleep


SYSTEM = Time()


def backoff_delays(base: float, cap: float, rand: Callable[[], float] = random.random) -> Iterator[float]:
    """Full jitter: attempt n waits uniform(0, min(cap, base * 2**n)).

    base=0.2, cap=30: ceilings 0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 12.8, 25.6, 30, 30, ...
    """
    ceiling = base
    while True:
        yield rand() * min(cap, ceiling)
        ceiling = min(cap, ceiling * 2)

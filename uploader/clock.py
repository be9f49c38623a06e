"""Time as the daemon sees it, injectable: logic that waits is tested without waiting."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Time:
    monotonic: Clock = time.monotonic  # for durations and deadlines
    wall: Clock = time.time  # for what is written down: Unix seconds
    sleep: Sleep = asyncio.sleep


SYSTEM = Time()

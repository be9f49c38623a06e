"""The global upload slots and the in-flight byte budget."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class Slots:
    """One global asyncio.Semaphore of upload slots, resizable at run time (SIGHUP, AIMD).

    Shrinking never interrupts an upload: the surplus permits are withheld as they come back,
    so `in_use` never exceeds `limit` once the uploads already running have finished.
    """

    def __init__(self, limit: int) -> None:
        self._sem = asyncio.Semaphore(limit)
        self.limit = limit
        self.in_use = 0
        self._owed = 0

    async def acquire(self) -> None:
        while True:
            await self._sem.acquire()
            if not self._owed:
                self.in_use += 1
                return
            self._owed -= 1

    def release(self) -> None:
        self.in_use -= 1
        if self._owed:
            self._owed -= 1
        else:
            self._sem.release()

    def resize(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"slots must be >= 1, got {limit}")
        delta, self.limit = limit - self.limit, limit
        if delta < 0:
            self._owed -= delta
            return
        repaid = min(delta, self._owed)
        self._owed -= repaid
        for _ in range(delta - repaid):
            self._sem.release()


class ByteBudget:
    """Caps the bytes that uploads hold in memory at once.

    A request larger than the whole budget waits until it is alone, so one huge part can
    never deadlock the daemon.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._waiting = 0  # requests inside the slow way (waiting, or about to take the lock)
        self._changed = asyncio.Condition()

    @asynccontextmanager
    async def hold(self, nbytes: int) -> AsyncIterator[None]:
        if nbytes <= 0:
            yield
            return
        nbytes = min(nbytes, self.limit)
        if not self._waiting and self.used + nbytes <= self.limit:
            # Fast way, no lock: room now and nobody queued ahead (who would be overtaken).
            self.used += nbytes
        else:
            self._waiting += 1
            try:
                async with self._changed:
                    await self._changed.wait_for(lambda: self.used + nbytes <= self.limit)
                    self.used += nbytes
            finally:
                self._waiting -= 1
        try:
            yield
        finally:
            self.used -= nbytes
            if self._waiting:
                async with self._changed:
                    self._changed.notify_all()

"""Producers cancel a job by SET-ting its cancel key, so running jobs' keys are polled: for all
of them at once, on a shared tick, rather than one EXISTS per job a second."""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis

from uploader.clock import SYSTEM, Time
from uploader.redisio import Keys, is_cluster, until_done

CANCEL_POLL = 1.0  # seconds between checks of the running jobs' cancel keys


class CancelFlags:
    """One multi-key EXISTS per tick for every running job (one pipeline, per node, on a
    cluster, where the keys live in different slots); the keys of each job only when some
    flag is set."""

    def __init__(self, redis: aioredis.Redis, keys: Keys, time: Time = SYSTEM, interval: float = CANCEL_POLL):
        self._redis = redis
        self._keys = keys
        self._time = time
        self._interval = interval
        self._flags: dict[str, asyncio.Event] = {}
        self._lock = asyncio.Lock()
        self._checked = float("-inf")

    async def wait(self, job_id: str) -> None:
        """Return once the job's cancel key is set."""
        flag = self._flags[job_id] = asyncio.Event()
        try:
            while not flag.is_set():
                # On the shared tick, so one read serves every job that waits.
                await self._time.sleep(self._interval - self._time.monotonic() % self._interval)
                await self._check()
        finally:
            del self._flags[job_id]

    async def _check(self) -> None:
        async with self._lock:
            if self._time.monotonic() - self._checked < self._interval / 2:
                return  # another job's wait read them all this tick
            ids = list(self._flags)
            cancelled = await until_done(lambda: self._read(ids), "read cancel flags")
            self._checked = self._time.monotonic()
        for job_id in cancelled:
            if flag := self._flags.get(job_id):
                flag.set()

    async def _read(self, ids: list[str]) -> list[str]:
        keys = [self._keys.cancel(job_id) for job_id in ids]
        if not keys or (not is_cluster(self._redis) and not await self._redis.exists(*keys)):
            return []
        async with self._redis.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.exists(key)
            found: list[int] = await pipe.execute()
        return [job_id for job_id, n in zip(ids, found, strict=True) if n]

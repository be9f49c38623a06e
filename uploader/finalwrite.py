"""A job's final progress write: complete, idempotent, and run again whole after an outage.

It reads what Redis shows, sends again from the run's ledger whatever a failover took, decides
the verdict, settles the hash and starts every key's expiry clock, makes the failed reasons
hash exactly the failing entries', and in Sentinel mode waits for a replica to have it.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal, cast

import redis.asyncio as aioredis
import structlog
from redis.asyncio.client import Pipeline
from redis.typing import EncodableT

from uploader.config import RedisConfig
from uploader.progresslua import FINISH_SCRIPT, REASONS_SCRIPT, Batch, Ledger
from uploader.redisio import Keys

log = structlog.get_logger("uploader.progress")

State = Literal["queued", "running", "done", "failed", "cancelled"]
RECENT_JOBS = 500  # finished jobs listed for operators, newest first
FAILED_JOBS = 10_000  # failed jobs kept for `uploader failed` and `retry`
LIST_LABEL = "<files list>"  # where a job-level failure's reason is kept in the failed hash
REPLICA_WAIT_MS = 2000  # how long the final write waits for a replica (Sentinel mode)

Write = Callable[[dict[str, Batch]], Awaitable[list[int]]]
Scripted = Callable[[Callable[[Pipeline], object]], Awaitable[list[Any]]]


class FinalWrite:
    def __init__(self, redis: aioredis.Redis, keys: Keys, config: RedisConfig, write: Write,
                 scripted: Scripted) -> None:
        self._redis = redis
        self._keys = keys
        self._config = config
        self._write = write
        self._scripted = scripted

    async def __call__(
        self, job_id: str, ledger: Ledger, cancelled: bool, total: int | None
    ) -> dict[bytes, bytes]:
        k = self._keys
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.get(k.marks(job_id))
            pipe.hget(k.job(job_id), "failed")
            pipe.hget(k.failed(job_id), LIST_LABEL)
            pipe.exists(k.failed(job_id))
            bitmap, failed, list_reason, had_reasons = await pipe.execute()
        if missing := ledger.missing(bitmap or b""):
            (failed,) = await self._write({job_id: missing})
        state: State = "cancelled" if cancelled else (
            "failed" if int(failed or 0) > 0 or list_reason is not None else "done"
        )
        ttl, now = self._config.progress_ttl, int(time.time())
        args: list[EncodableT] = [state, now, ttl, "" if total is None else total]
        stored, failing = (await self._scripted(lambda pipe: self._settle(pipe, job_id, state, args)))[0]
        if failing or had_reasons:
            await self._rebuild_reasons(job_id, failing, list_reason)
        if self._config.mode == "sentinel":
            await self._replicated(job_id)
        return dict(zip(stored[0::2], stored[1::2], strict=True))

    def _settle(self, pipe: Pipeline, job_id: str, state: State, args: list[EncodableT]) -> None:
        k = self._keys
        FINISH_SCRIPT(pipe, [k.job(job_id), *k.internal(job_id)], args)
        pipe.expire(k.failed(job_id), self._config.progress_ttl)
        # The flag was for this run, whether it saw it or not: never for a later one.
        pipe.delete(k.cancel(job_id))
        if self._config.files_ttl:
            pipe.expire(k.files(job_id), self._config.files_ttl)
        self._index(pipe, job_id, state, cast(int, args[1]))

    async def _rebuild_reasons(self, job_id: str, failing: list[bytes], list_reason: bytes | None) -> None:
        """The failed hash made exactly the failing entries' reasons (and the list's own):
        written beside the script, it can miss a change when runs overlap or a write is lost."""
        reasons = dict(value.split(b"\0", 1) for value in failing)
        if list_reason is not None:
            reasons[LIST_LABEL.encode()] = list_reason
        args: list[EncodableT] = [self._config.progress_ttl]
        for label, reason in reasons.items():
            args += (label, reason)
        await self._scripted(lambda pipe: REASONS_SCRIPT(pipe, [self._keys.failed(job_id)], args))

    async def _replicated(self, job_id: str) -> None:
        """Wait until a replica has the final write, so a failover now cannot take it back.
        A replica that does not answer in time is logged, not waited for forever."""
        copies = await self._redis.execute_command("WAIT", 1, REPLICA_WAIT_MS)  # type: ignore[no-untyped-call]
        if not copies:
            log.warning("finish_not_replicated", job_id=job_id, waited_ms=REPLICA_WAIT_MS,
                        reason="no replica acknowledged the final write; a failover now may lose it")

    def _index(self, pipe: Pipeline, job_id: str, state: State, now: int) -> None:
        """Keep the bounded lists of finished and failed jobs that operators read (`/jobs`,
        `uploader failed`): newest first, trimmed by count and by age, expiring when idle."""
        ttl = self._config.progress_ttl
        lists = [(self._keys.finished_jobs, RECENT_JOBS)]
        if state == "failed":
            lists.append((self._keys.failed_jobs, FAILED_JOBS))
        else:
            pipe.zrem(self._keys.failed_jobs, job_id)
        for name, keep in lists:
            pipe.zadd(name, {job_id: now})
            pipe.zremrangebyrank(name, 0, -keep - 1)
            pipe.zremrangebyscore(name, "-inf", now - ttl)
            pipe.expire(name, ttl)

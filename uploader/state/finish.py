"""A job's final progress write: complete, idempotent, and run again whole after an outage.

It reads what Redis shows, sends again from the run's ledger whatever a failover took, decides
the verdict, settles the hash and starts every key's expiry clock, makes the failed reasons
hash exactly the failing entries', and in Sentinel mode waits for a replica to have it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal, cast

import redis.asyncio as aioredis
import structlog
from redis.asyncio.client import Pipeline
from redis.typing import EncodableT

from uploader.config.settings import RedisConfig
from uploader.redisio import Keys, is_cluster
from uploader.state.ledger import Batch, Ledger
from uploader.state.scripts import CLOSE_SCRIPT, FINISH_SCRIPT, REASONS_SCRIPT, call_script, scripted

log = structlog.get_logger("uploader.state.progress")

State = Literal["queued", "running", "done", "failed", "cancelled"]
RECENT_JOBS = 500  # finished jobs listed for operators, newest first
FAILED_JOBS = 10_000  # failed jobs kept for `uploader failed` and `retry`
LIST_LABEL = "<files list>"  # where a job-level failure's reason is kept in the failed hash
REPLICA_WAIT_MS = 2000  # how long the final write waits for a replica (Sentinel mode)
CLOSE_LIMIT = 1000  # settled entries of a run up to which its ledger goes whole into CLOSE
TRIM_EVERY = 1.0  # seconds between trims of a list of jobs by one daemon (a ZADD per job)

Write = Callable[[dict[str, Batch]], Awaitable[dict[str, int]]]


@dataclass(frozen=True, slots=True)
class Closing:
    """What a run's last write needs: its ledger, its lazy start (if any), its verdict's inputs."""

    job_id: str
    ledger: Ledger
    start: list[EncodableT]
    cancelled: bool
    total: int | None
    seconds: float
    walked: bool


class FinalWrite:
    def __init__(self, redis: aioredis.Redis, keys: Keys, config: RedisConfig, write: Write) -> None:
        self._redis = redis
        self._keys = keys
        self._config = config
        self._write = write
        self._cluster = is_cluster(redis)
        self._trimmed: dict[str, float] = {}

    @staticmethod
    def closable(ledger: Ledger) -> bool:
        """CLOSE takes a run with no failure, few outcomes not yet acknowledged, and the
        acknowledged ones in a bitmap that is not sparse."""
        if ledger.failures or len(ledger.settled) - ledger.acked > 2 * CLOSE_LIMIT:
            return False
        return ledger.acked == 0 or ledger.acknowledged()[0] >= 0

    async def close(self, c: Closing) -> dict[str, object] | None:
        """The whole last write in one script call (CLOSE; off a cluster the cancel flag and
        the lists of jobs too), then what the verdict needs; None when the long way must
        finish it: a lazy start met another run's hash, or Redis lost acknowledged outcomes
        (a failover), which the long way writes again from the ledger."""
        k, job_id = self._keys, c.job_id
        keys = [k.job(job_id), *k.internal(job_id)]
        aside = [k.cancel(job_id), k.finished_jobs, k.failed_jobs]
        if self._config.files_ttl:
            aside.append(k.files(job_id))
        if not self._cluster:
            keys, aside = keys + aside, []
        trims = [self._trim_due(name) for name in (k.finished_jobs, k.failed_jobs)]  # a peek
        channel = "" if self._config.mode == "sentinel" else k.events
        total = "" if c.total is None else c.total
        args: list[EncodableT] = [
            *c.start, "1" if c.cancelled else "", self._config.progress_ttl, total, f"{c.seconds:.3f}",
            channel, "1" if c.walked else "", job_id, *("1" if t else "" for t in trims),
            RECENT_JOBS, FAILED_JOBS, self._config.files_ttl or "", *c.ledger.acknowledged(),
            *c.ledger.unacknowledged().args(int(time.time())),
        ]
        reply = await call_script(self._redis, CLOSE_SCRIPT, keys, args)
        if reply in ([-1], [-2]):
            return None
        payload, published, failing, failed = reply
        message: dict[str, object] = json.loads(payload)
        self._trimmed_now(trims, message["state"] == "failed")
        if aside:
            await self._aside(job_id, cast(State, message["state"]), trims)
        if int(failed):
            await self._rebuild_reasons(job_id, failing, None)
        if self._config.mode == "sentinel":
            await self._replicated(job_id)
        if not int(published):
            await self._redis.publish(k.events, payload)
        return message

    async def _aside(self, job_id: str, state: State, trims: list[bool]) -> None:
        """On a cluster, what CLOSE cannot reach from the job's slot."""
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.delete(self._keys.cancel(job_id))
            if self._config.files_ttl:
                pipe.expire(self._keys.files(job_id), self._config.files_ttl)
            self._index(pipe, job_id, state, int(time.time()), trims)
            await pipe.execute()

    def _trim_due(self, name: str) -> bool:
        """Whether this daemon trims a list of jobs now: once a TRIM_EVERY, not per job (a list
        holds at most its size and the jobs of one interval more)."""
        return time.monotonic() - self._trimmed.get(name, float("-inf")) >= TRIM_EVERY

    def _trimmed_now(self, trims: list[bool], failed: bool) -> None:
        now = time.monotonic()
        if trims[0]:
            self._trimmed[self._keys.finished_jobs] = now
        if trims[1] and failed:
            self._trimmed[self._keys.failed_jobs] = now

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
            failed = (await self._write({job_id: missing}))[job_id]
        state: State = "cancelled" if cancelled else (
            "failed" if int(failed or 0) > 0 or list_reason is not None else "done"
        )
        ttl, now = self._config.progress_ttl, int(time.time())
        args: list[EncodableT] = [state, now, ttl, "" if total is None else total]
        replies = await scripted(self._redis, lambda pipe: self._settle(pipe, job_id, state, args))
        stored, failing = replies[0]
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
        self._index(pipe, job_id, state, cast(int, args[1]), [True, True])

    async def _rebuild_reasons(self, job_id: str, failing: list[bytes], list_reason: bytes | None) -> None:
        """The failed hash made exactly the failing entries' reasons (and the list's own):
        written beside the script, it can miss a change when runs overlap or a write is lost."""
        reasons = dict(value.split(b"\0", 1) for value in failing)
        if list_reason is not None:
            reasons[LIST_LABEL.encode()] = list_reason
        args: list[EncodableT] = [self._config.progress_ttl]
        for label, reason in reasons.items():
            args += (label, reason)
        await scripted(self._redis, lambda pipe: REASONS_SCRIPT(pipe, [self._keys.failed(job_id)], args))

    async def _replicated(self, job_id: str) -> None:
        """Wait until a replica has the final write, so a failover now cannot take it back.
        A replica that does not answer in time is logged, not waited for forever."""
        copies = await self._redis.execute_command("WAIT", 1, REPLICA_WAIT_MS)  # type: ignore[no-untyped-call]
        if not copies:
            log.warning("finish_not_replicated", job_id=job_id, waited_ms=REPLICA_WAIT_MS,
                        reason="no replica acknowledged the final write; a failover now may lose it")

    def _index(self, pipe: Pipeline, job_id: str, state: State, now: int, trims: list[bool]) -> None:
        """Keep the bounded lists of finished and failed jobs that operators read (`/jobs`,
        `uploader failed`): newest first, trimmed by count and by age, expiring when idle."""
        ttl = self._config.progress_ttl
        lists = [(self._keys.finished_jobs, RECENT_JOBS, trims[0])]
        if state == "failed":
            lists.append((self._keys.failed_jobs, FAILED_JOBS, trims[1]))
        else:
            pipe.zrem(self._keys.failed_jobs, job_id)
        for name, keep, trim in lists:
            pipe.zadd(name, {job_id: now})
            if trim:
                pipe.zremrangebyrank(name, 0, -keep - 1)
                pipe.zremrangebyscore(name, "-inf", now - ttl)
                pipe.expire(name, ttl)

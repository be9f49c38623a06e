"""Which daemons are alive, and a lost run handed back: what `uploader recover` relies on.

Every daemon writes a heartbeat (like arq's health check) into one Redis sorted set,
`{prefix}workers`: member the worker's name as its runs write it in a progress hash's `worker`
field (`host:pid`), score the Unix time it was last seen. It is refreshed every
HEARTBEAT_INTERVAL, members unseen for HEARTBEAT_TTL are trimmed, the key expires when no
daemon refreshes it, and a daemon that stops cleanly removes itself. Single-key commands
only (a Redis Cluster needs no hash tag for it).

A run whose beanstalkd connection is gone (the server died or restarted) is handed back: its
progress hash goes from `running` back to `queued`, with a `note` saying why, unless another
run of the job has taken it over since. Then nothing reads `running` for a job nobody runs.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import cast

import redis.asyncio as aioredis
import structlog

from uploader.clock import SYSTEM, Time
from uploader.redisio import OUTAGE_ERRORS, Keys, text, until_done

log = structlog.get_logger("uploader.heartbeat")

HEARTBEAT_INTERVAL = 5.0  # seconds between refreshes
HEARTBEAT_TTL = 30.0  # seconds unseen after which a worker counts as dead

# KEYS: the job's progress hash. ARGV: worker, beanstalkd address, beanstalkd job, now, note.
# Only this worker's run of this delivery, still running, is handed back.
_HAND_BACK = """
local v = redis.call('HMGET', KEYS[1], 'state', 'worker', 'beanstalkd', 'beanstalk_job', 'finished_at')
if v[1] ~= 'running' or v[2] ~= ARGV[1] or v[3] ~= ARGV[2] or v[4] ~= ARGV[3] or v[5] then
  return 0
end
redis.call('HSET', KEYS[1], 'state', 'queued', 'updated_at', ARGV[4], 'note', ARGV[5])
return 1
"""


_ERRORS: tuple[type[BaseException], ...] = (*OUTAGE_ERRORS, TimeoutError)


def workers_key(keys: Keys) -> str:
    return f"{keys.prefix}workers"


class Heartbeat:
    def __init__(self, redis: aioredis.Redis, keys: Keys, worker: str, time: Time = SYSTEM) -> None:
        self.redis = redis
        self.key = workers_key(keys)
        self.worker = worker
        self.time = time

    async def beat(self) -> None:
        now = self.time.wall()
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zadd(self.key, {self.worker: now})
            pipe.zremrangebyscore(self.key, "-inf", now - HEARTBEAT_TTL)
            pipe.expire(self.key, int(HEARTBEAT_TTL * 2))
            await pipe.execute()

    async def run(self) -> None:
        """Beat until cancelled; a Redis outage skips beats (the daemon says so elsewhere)."""
        while True:
            try:
                async with asyncio.timeout(HEARTBEAT_INTERVAL):
                    await self.beat()
            except _ERRORS as exc:
                log.debug("heartbeat_failed", error=str(exc) or type(exc).__name__)
            await self.time.sleep(HEARTBEAT_INTERVAL)

    async def leave(self) -> None:
        """A clean stop: no longer alive, at once."""
        with contextlib.suppress(*_ERRORS):
            async with asyncio.timeout(2.0):
                await self.redis.zrem(self.key, self.worker)


async def live_workers(redis: aioredis.Redis, keys: Keys, now: float) -> set[str]:
    """Workers seen within HEARTBEAT_TTL."""
    members = await redis.zrangebyscore(workers_key(keys), now - HEARTBEAT_TTL, "+inf")
    return {text(m) for m in cast(list[bytes], members)}


async def hand_back(
    redis: aioredis.Redis, keys: Keys, job_id: str, worker: str, address: str, job: int, now: int, note: str
) -> bool:
    """`running` -> `queued` with `note`, if the hash still shows this worker's run of this
    delivery; True if it did."""
    script = redis.register_script(_HAND_BACK)
    args: list[str | int] = [worker, address, str(job), now, note]
    done = await until_done(lambda: script(keys=[keys.job(job_id)], args=args), "hand back job")
    return bool(done)

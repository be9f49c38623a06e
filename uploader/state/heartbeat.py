"""Which daemons are alive, and a lost run handed back: what `uploader recover` relies on.

Every daemon writes a heartbeat (like arq's health check) into one Redis sorted set,
`{prefix}workers`: member the worker's name as its runs write it in a progress hash's `worker`
field (`host:pid`), score the Unix time it was last seen. It is refreshed every
HEARTBEAT_INTERVAL, members unseen for HEARTBEAT_TTL are trimmed, the key expires when no
daemon refreshes it, and a daemon that stops cleanly removes itself. Single-key commands
only (a Redis Cluster needs no hash tag for it).

With each beat goes what the status page shows of the worker (`{prefix}worker:{name}`, JSON,
expiring with HEARTBEAT_TTL) and what it did since the last beat, added to the fleet's
per-minute throughput (`{prefix}throughput:{minute}`, expiring after THROUGHPUT_TTL).

A run whose beanstalkd connection is gone (the server died or restarted) is handed back: its
progress hash goes from `running` back to `queued`, with a `note` saying why, unless another
run of the job has taken it over since. Then nothing reads `running` for a job nobody runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import cast

import redis.asyncio as aioredis
import structlog

from uploader import __version__
from uploader.clock import SYSTEM, Time
from uploader.redisio import OUTAGE_ERRORS, Keys, text, until_done

log = structlog.get_logger("uploader.state.heartbeat")

HEARTBEAT_INTERVAL = 5.0  # seconds between refreshes
HEARTBEAT_TTL = 30.0  # seconds unseen after which a worker counts as dead
THROUGHPUT_BUCKET = 60  # seconds per throughput bucket
THROUGHPUT_TTL = 3900  # seconds a bucket is kept: the page charts the last hour
JOBS_LISTED = 50  # active jobs a worker lists in its info, oldest first

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


def info_key(keys: Keys, worker: str) -> str:
    return f"{keys.prefix}worker:{worker}"


def throughput_key(keys: Keys, minute: int) -> str:
    """`minute`: Unix time // THROUGHPUT_BUCKET."""
    return f"{keys.prefix}throughput:{minute}"


@dataclass(frozen=True, slots=True)
class Report:
    """What a daemon says of itself at a beat; `files` and `bytes` count since it started."""

    jobs: tuple[tuple[str, str, float], ...] = ()  # id, tube, seconds held; oldest first
    slots_in_use: int = 0
    slots: int = 0
    files: int = 0
    bytes: int = 0
    draining: bool = False
    paused: tuple[str, ...] = field(default=())


class Heartbeat:
    def __init__(
        self,
        redis: aioredis.Redis,
        keys: Keys,
        worker: str,
        time: Time = SYSTEM,
        report: Callable[[], Report] = Report,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.key = workers_key(keys)
        self.worker = worker
        self.time = time
        self.report = report
        self.interval = HEARTBEAT_INTERVAL
        self.started = time.wall()
        self._counted: tuple[float, int, int] | None = None  # at, files, bytes of the last beat

    async def beat(self) -> None:
        now = self.time.wall()
        report = self.report()
        at, files, nbytes = self._counted or (self.started, 0, 0)
        done = (report.files - files, report.bytes - nbytes)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zadd(self.key, {self.worker: now})
            pipe.zremrangebyscore(self.key, "-inf", now - HEARTBEAT_TTL)
            pipe.expire(self.key, int(HEARTBEAT_TTL * 2))
            info = self._info(report, now, done, max(now - at, 1e-3))
            pipe.set(info_key(self.keys, self.worker), info, ex=int(HEARTBEAT_TTL))
            if any(done):
                bucket = throughput_key(self.keys, int(now // THROUGHPUT_BUCKET))
                pipe.hincrby(bucket, "files", done[0])
                pipe.hincrby(bucket, "bytes", done[1])
                pipe.expire(bucket, THROUGHPUT_TTL)
            await pipe.execute()
        self._counted = (now, report.files, report.bytes)  # only once written: none is lost

    def _info(self, report: Report, now: float, done: tuple[int, int], seconds: float) -> str:
        host, _, pid = self.worker.rpartition(":")
        info = asdict(report)
        del info["files"], info["bytes"]
        info["jobs"] = [list(job) for job in report.jobs[:JOBS_LISTED]]
        info.update(
            name=self.worker, host=host, pid=pid, version=__version__, started_at=round(self.started, 3),
            seen_at=round(now, 3), active_jobs=len(report.jobs), files_per_s=round(done[0] / seconds, 2),
            bytes_per_s=round(done[1] / seconds, 1),
        )
        return json.dumps(info, separators=(",", ":"))

    async def run(self) -> None:
        """Beat until cancelled; a Redis outage skips beats (the daemon says so elsewhere)."""
        while True:
            try:
                async with asyncio.timeout(self.interval):
                    await self.beat()
            except _ERRORS as exc:
                log.debug("heartbeat_failed", error=str(exc) or type(exc).__name__)
            await self.time.sleep(self.interval)

    async def leave(self) -> None:
        """A clean stop: no longer alive, at once."""
        with contextlib.suppress(*_ERRORS):
            async with asyncio.timeout(2.0):
                async with self.redis.pipeline(transaction=False) as pipe:
                    pipe.zrem(self.key, self.worker)
                    pipe.delete(info_key(self.keys, self.worker))
                    await pipe.execute()


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

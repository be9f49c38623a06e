"""Redis: the client for the configured mode, the key names, and waiting out outages.

One client type for the rest of the daemon: standalone, Sentinel (the master the sentinels
name, followed through failovers) and Cluster (every node discovered from one, MOVED and ASK
followed by redis-py) all answer the same commands. What the daemon writes together in one
script or transaction lives in one hash slot: a job's internal keys carry the job's hash key
as a hash tag, so `{uploader:job:ID}:done` shares the slot of `uploader:job:ID`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import redis.asyncio as aioredis
import redis.exceptions
import structlog
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import parse_url
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff

from uploader.clock import backoff_delays
from uploader.config.settings import RedisConfig
from uploader.config.table import mask_url

T = TypeVar("T")
log = structlog.get_logger("uploader.redis")

# What one operation (a command, a pipeline, a script and what it needs) may take before it
# counts as an outage. The daemon's client has no timeout per reply: redis-py would arm one
# for every reply of a pipeline and run every send in a task of its own (asyncio.wait_for),
# about a fifth of a small job's Redis cost; `until_done` arms one deadline per operation.
OPERATION_DEADLINE = 30.0

# Errors that mean "Redis cannot serve this right now", never "this job is bad": down, loading,
# a replica or a demoted master (READONLY), a failover or resharding in progress, full (OOM).
OUTAGE_ERRORS: tuple[type[BaseException], ...] = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.BusyLoadingError,
    redis.exceptions.TryAgainError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.OutOfMemoryError,
    redis.exceptions.ClusterError,
    redis.exceptions.AskError,
    redis.exceptions.SlotNotCoveredError,
    OSError,
)
# Error replies redis-py has no class for that are outages too: a failing disk refusing writes,
# too few replicas for min-replicas-to-write, a script running past its time limit.
OUTAGE_REPLIES = ("MISCONF", "NOREPLICAS", "BUSY", "LOADING", "READONLY", "TRYAGAIN", "CLUSTERDOWN",
                  "MASTERDOWN", "OOM")


def is_outage(exc: BaseException) -> bool:
    if isinstance(exc, OUTAGE_ERRORS):
        return True
    return isinstance(exc, redis.exceptions.ResponseError) and str(exc).split(" ", 1)[0] in OUTAGE_REPLIES


@dataclass(frozen=True, slots=True)
class Keys:
    """Key names. The producer's (the job's hash, files, failed reasons, cancel flag, events)
    never change; the daemon's own keys of a job carry the job's hash key as a hash tag."""

    prefix: str = "uploader:"

    def job(self, job_id: str) -> str:
        return f"{self.prefix}job:{job_id}"

    def files(self, job_id: str) -> str:
        return f"{self.prefix}job:{job_id}:files"

    def failed(self, job_id: str) -> str:
        return f"{self.prefix}job:{job_id}:failed"

    def cancel(self, job_id: str) -> str:
        return f"{self.prefix}job:{job_id}:cancel"

    def marks(self, job_id: str) -> str:
        """The resume marks: bit N set once entry N is uploaded or found present."""
        return f"{{{self.prefix}job:{job_id}}}:done"

    def walk(self, job_id: str) -> str:
        """Digests of a directory entry's walked chunks: marks apply only to an unchanged walk."""
        return f"{{{self.prefix}job:{job_id}}}:walk"

    def failing(self, job_id: str) -> str:
        """The entries counted as failed, index -> label NUL reason: a failure counts once per
        entry, is taken back when another run uploads the entry, and the failed hash is
        rebuilt from it when the job finishes."""
        return f"{{{self.prefix}job:{job_id}}}:failing"

    def internal(self, job_id: str) -> tuple[str, ...]:
        """The daemon's own keys of a job, all in the slot of its hash."""
        return self.marks(job_id), self.walk(job_id), self.failing(job_id)

    def legacy(self, job_id: str) -> tuple[str, ...]:
        """Names versions before 0.5 used for `internal` (same order), then the `applied` hash
        they wrote: renamed on a job's next start (see state/start.py), deleted by `enqueue`."""
        p = f"{self.prefix}job:{job_id}"
        return f"{p}:done", f"{p}:walk", f"{p}:failing", f"{p}:applied"

    @property
    def events(self) -> str:
        return f"{self.prefix}events"

    @property
    def failed_jobs(self) -> str:
        """Jobs whose last run finished `failed` (buried): score finished_at, member the ID."""
        return f"{self.prefix}jobs:failed"

    @property
    def finished_jobs(self) -> str:
        """The most recently finished jobs, whatever their state: score finished_at."""
        return f"{self.prefix}jobs:finished"


def connect(
    config: RedisConfig,
    *,
    connect_timeout: float = 5.0,
    reply_timeout: float | None = 30.0,
    retry: bool = True,
    decode: bool = False,
) -> aioredis.Redis:
    """A client for the configured mode. The cluster client is typed as the standalone one:
    it answers the same commands, and what it cannot (a transaction across slots) the daemon
    never sends. `reply_timeout=None` leaves every call to a deadline of its caller's:
    `until_done`, or an `asyncio.timeout` of its own."""
    common: dict[str, Any] = {
        "socket_connect_timeout": connect_timeout,
        "socket_timeout": reply_timeout,
        "decode_responses": decode,
    }
    if not retry:
        common["retry"] = Retry(NoBackoff(), 0)
    if config.mode == "cluster":
        return cast(aioredis.Redis, RedisCluster.from_url(config.url, **common))
    if config.mode == "sentinel":
        return _sentinel_master(config, common)
    return aioredis.Redis.from_url(config.url, health_check_interval=30, **common)


class _SentinelMaster(aioredis.Redis):
    """The master's client, which also closes its connections to the sentinels."""

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        manager = getattr(self.connection_pool, "sentinel_manager", None)
        for client in getattr(manager, "sentinels", ()):
            await client.aclose()


def _sentinel_master(config: RedisConfig, common: dict[str, Any]) -> aioredis.Redis:
    """db, username, password and TLS come from the URL; the address from the sentinels."""
    kwargs: dict[str, Any] = dict(parse_url(config.url))
    for name in ("host", "port", "connection_class"):
        kwargs.pop(name, None)
    if config.url.startswith("rediss:"):
        kwargs["ssl"] = True
    sentinels = [(host, int(port)) for host, port in (a.rsplit(":", 1) for a in config.sentinels)]
    # Asking a sentinel is never left unbounded: a hung one gives way to the next.
    sentinel_kwargs = {"socket_connect_timeout": common["socket_connect_timeout"],
                       "socket_timeout": common["socket_timeout"] or common["socket_connect_timeout"]}
    manager = Sentinel(sentinels, sentinel_kwargs=sentinel_kwargs, **common, **kwargs)  # type: ignore[no-untyped-call, unused-ignore]
    return cast(aioredis.Redis, manager.master_for(config.service, redis_class=_SentinelMaster))


def describe(config: RedisConfig) -> str:
    """Which Redis, for a message: the password never shown."""
    url = mask_url(config.url)
    if config.mode == "cluster":
        return f"Redis Cluster at {url}"
    if config.mode == "sentinel":
        return f"Redis master {config.service!r} via sentinels {', '.join(config.sentinels)}"
    return f"Redis at {url}"


async def writable(client: aioredis.Redis) -> None:
    """Raise unless Redis takes writes: it answers, and (off a cluster, whose client routes to
    masters itself) as a master, not as a replica or a demoted master that refuses them."""
    if is_cluster(client):
        await client.ping()
        return
    try:
        role = await client.execute_command("ROLE")  # type: ignore[no-untyped-call]
    except redis.exceptions.ResponseError:  # ROLE not allowed to this user (ACL): PING must do
        await client.ping()
        return
    if role[0] not in (b"master", "master"):
        raise redis.exceptions.ReadOnlyError("Redis answers as a replica: writes are refused (READONLY)")


def is_cluster(client: aioredis.Redis) -> bool:
    return isinstance(client, RedisCluster)


async def until_done(call: Callable[[], Awaitable[T]], what: str, deadline: float = OPERATION_DEADLINE) -> T:
    """Run a Redis operation, waiting with backoff through outages instead of failing; one
    that takes longer than `deadline` (a hung server) is an outage too."""
    delays = backoff_delays(0.05, 2.0)
    failures = 0
    while True:
        try:
            async with asyncio.timeout(deadline):
                result = await call()
            # redis-py (8.1) can swallow a cancellation that lands mid-command and return the
            # reply anyway; honour it here, or a cancelled helper task runs on forever.
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise asyncio.CancelledError
            return result
        except Exception as exc:
            if not is_outage(exc):
                raise
            failures += 1
            delay = next(delays)
            if failures == 1 or failures % 20 == 0:
                error = str(exc) or f"no reply within {deadline:g} s"
                log.warning("redis_unavailable", operation=what, error=error, failures=failures)
            await asyncio.sleep(delay)


def text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def text_map(
    mapping: Mapping[bytes, bytes] | Mapping[str, str] | Mapping[bytes | str, bytes | str],
) -> dict[str, str]:
    """A Redis hash reply as str -> str, whether the client decodes responses or not."""
    return {text(k): text(v) for k, v in mapping.items()}

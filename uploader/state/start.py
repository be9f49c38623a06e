"""How a job's run begins in Redis: START, which decides whose run it is, or a lazy start.

START decides between a fresh run (a job ID used again after its run finished: the old
counters, marks and reasons go), a resumed one (the same delivery again) and a cancelled one.
A new job (probe.py found no key of it) needs none of that: its start is kept here and
written with its first outcomes (APPLY, CLOSE), or by START before any other write.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal, cast

import redis.asyncio as aioredis
import structlog
from redis.typing import EncodableT

from uploader.errors import BadJobError
from uploader.redisio import Keys, is_cluster, text, until_done
from uploader.source.base import Delivery
from uploader.state.scripts import START_SCRIPT, scripted

log = structlog.get_logger("uploader.state.progress")

# Seconds two estimates of one job's put time (now - beanstalkd's `age`) may differ by: `age` is
# whole seconds, and each daemon reads it with its own clock.
SAME_DELIVERY_SLACK = 5
# Seconds since another worker's last progress write within which its run may still be alive.
OVERLAP_WINDOW = 30
NOT_LAZY: list[EncodableT] = ["", "", "", "", "", ""]  # APPLY's and CLOSE's start arguments

Start = Literal["fresh", "resume", "cancelled"]


@dataclass(frozen=True, slots=True)
class Lazy:
    """A run's start, not yet written."""

    total: int | None
    delivery: Delivery | None
    since: float  # monotonic


class Starts:
    def __init__(self, redis: aioredis.Redis, keys: Keys, worker: str) -> None:
        self._redis = redis
        self._keys = keys
        self._worker = worker
        self._legacy = not is_cluster(redis)  # where pre-0.5 key names can still be found
        self._lazy: dict[str, Lazy] = {}

    # --- lazy starts ---

    def lazily(self, job_id: str, total: int | None, delivery: Delivery | None) -> None:
        self._lazy[job_id] = Lazy(total, delivery, time.monotonic())

    def __contains__(self, job_id: str) -> bool:
        return job_id in self._lazy

    def args(self, job_id: str) -> list[EncodableT]:
        """The start arguments of APPLY and CLOSE: the lazy start, or none."""
        if (lazy := self._lazy.get(job_id)) is None:
            return NOT_LAZY
        return [self._worker, "" if lazy.total is None else lazy.total, *_who(lazy.delivery)]

    def written(self, job_id: str) -> Lazy | None:
        """The job's lazy start is written (or no longer to be): it, if it had one."""
        return self._lazy.pop(job_id, None)

    def overdue(self, age: float) -> list[str]:
        """Lazy starts older than `age` seconds."""
        since = time.monotonic() - age
        return [job_id for job_id, lazy in self._lazy.items() if lazy.since <= since]

    def set_total(self, job_id: str, total: int) -> bool:
        """True when the total goes with the lazy start (nothing to write now)."""
        if (lazy := self._lazy.get(job_id)) is None:
            return False
        self._lazy[job_id] = Lazy(total, lazy.delivery, lazy.since)
        return True

    # --- START ---

    async def check_keys(self, job_id: str) -> None:
        """Refuse a job whose failed reasons key holds something else (a producer's mistake):
        every write to it would fail. START checks the keys of the job's own slot."""
        key = self._keys.failed(job_id)
        found = text(await until_done(lambda: self._redis.type(key), "check keys"))
        if found not in ("none", "hash"):
            raise BadJobError(wrong_type(key, found))

    async def start(self, job_id: str, total: int | None, delivery: Delivery | None = None) -> Start:
        """Mark a job running, in one script that also decides whose run this is.

        A job ID may be used again once its run has finished: a delivery other than the one
        that ran it last (another beanstalkd job, or the same id put at another time) starts
        afresh, with counters, marks and reasons of the old run gone. The same delivery again
        (a crash, a drain, a TTR lapse, a kick) resumes from the marks. Failures of an earlier
        run are forgotten either way: they are retried now.
        """
        k = self._keys
        keys = [k.job(job_id), *k.internal(job_id), *(k.legacy(job_id) if self._legacy else ())]
        args = [self._worker, int(time.time()), "" if total is None else total, *_who(delivery),
                SAME_DELIVERY_SLACK, OVERLAP_WINDOW]
        reply, _ = await until_done(lambda: scripted(self._redis, lambda pipe: [
            START_SCRIPT(pipe, keys, args),
            pipe.delete(k.failed(job_id)),
        ]), "start job")
        mode, *rest = (text(part) for part in reply)
        if mode == "badkey":
            raise BadJobError(wrong_type(*rest))
        if overlap := rest[0]:
            # Counters stay exact (see APPLY); the log says why files may be uploaded twice.
            other, seconds = overlap.rsplit(" ", 1)
            log.warning("job_run_overlap", job_id=job_id, other_worker=other, seconds_since=int(seconds),
                        reason="another worker's run of this job wrote progress moments ago")
        return cast(Start, mode)


def _who(delivery: Delivery | None) -> tuple[str, str, str, str]:
    """A delivery as START and a lazy start write it: beanstalkd address, job, put time, tube."""
    if delivery is None:
        return "", "", "", ""
    return delivery.address, str(delivery.job), str(int(delivery.put_at)), delivery.tube


def wrong_type(key: str, found: str) -> str:
    return (f"{key} is a Redis {found}, where the daemon keeps this job's progress: "
            "delete it or use another job ID")

"""The whole fleet as the status page shows it, read from Redis with bounded work.

One refresh costs three round trips and, whatever the number of jobs, at most: a ZRANGEBYSCORE
and MAX_WORKERS GETs (the live workers), MAX_ACTIVE + RECENT + FAILED_PAGE HMGETs (progress of
the running, recently finished and failed jobs shown), FAILED_PAGE HSCANs (their first reasons),
two ZREVRANGEs, a ZCARD and MINUTES HMGETs (throughput). Everything it reads expires.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import cast

import redis.asyncio as aioredis

from uploader.redisio import Keys, text
from uploader.state.heartbeat import HEARTBEAT_TTL, THROUGHPUT_BUCKET, info_key, throughput_key, workers_key

MAX_WORKERS = 200  # workers shown
MAX_ACTIVE = 100  # running jobs shown, oldest first
RECENT = 50  # recently finished jobs shown
FAILED_PAGE = 20  # failed jobs per page
REASONS_SHOWN = 3  # failure reasons per failed job
MINUTES = 60  # throughput buckets charted

JOB_FIELDS = ("state", "total", "uploaded", "skipped", "failed", "bytes", "tube", "worker",
              "started_at", "updated_at", "finished_at", "put_at", "note")
NUMBERS = frozenset({"total", "uploaded", "skipped", "failed", "bytes", "started_at", "updated_at",
                     "finished_at", "beanstalk_job", "put_at"})


def field_value(name: str, value: str) -> object:
    """A progress hash field as JSON shows it: counts and times as numbers."""
    return int(value) if name in NUMBERS and value.lstrip("-").isdigit() else value


@dataclass(frozen=True, slots=True)
class Listing:
    """What to read: the page of failed jobs from `failed_offset`."""

    failed_offset: int = 0


class Fleet:
    def __init__(self, redis: aioredis.Redis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys

    async def read(self, now: float, listing: Listing = Listing()) -> dict[str, object]:
        live = cast(list[bytes], await self.redis.zrangebyscore(
            workers_key(self.keys), now - HEARTBEAT_TTL, "+inf", start=0, num=MAX_WORKERS))
        minute = int(now // THROUGHPUT_BUCKET)
        minutes = range(minute - MINUTES + 1, minute + 1)
        async with self.redis.pipeline(transaction=False) as pipe:
            for name in live:
                pipe.get(info_key(self.keys, text(name)))
            pipe.zrevrange(self.keys.finished_jobs, 0, RECENT - 1)
            pipe.zrevrange(self.keys.failed_jobs, listing.failed_offset,
                           listing.failed_offset + FAILED_PAGE - 1)
            pipe.zcard(self.keys.failed_jobs)
            for m in minutes:
                pipe.hmget(throughput_key(self.keys, m), ["files", "bytes"])
            replies = await pipe.execute()
        workers = [json.loads(info) for info in replies[: len(live)] if info is not None]
        finished, failed, failed_total, *buckets = replies[len(live):]
        active = _active(workers)
        shown = await self._jobs([job_id for job_id, _ in active],
                                 [text(i) for i in finished], [text(i) for i in failed])
        return {
            "now": now,
            "workers": sorted(workers, key=lambda w: str(w.get("name"))),
            "active": [_running(job_id, worker, shown[0].get(job_id)) for job_id, worker in active],
            "finished": [row for row in shown[1].values() if row.get("state") != "running"],
            "failed": {"total": failed_total, "offset": listing.failed_offset,
                       "jobs": [row for row in shown[2].values() if row.get("state") == "failed"]},
            "throughput": [_bucket(m, reply, now) for m, reply in zip(minutes, buckets, strict=True)],
        }

    async def _jobs(self, *groups: list[str]) -> list[dict[str, dict[str, object]]]:
        """Each group's jobs (id -> fields, those whose progress expired left out), in one
        round trip; the last group also gets its first failure reasons."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for group in groups:
                for job_id in group:
                    pipe.hmget(self.keys.job(job_id), JOB_FIELDS)
            for job_id in groups[-1]:
                pipe.hscan(self.keys.failed(job_id), 0, count=REASONS_SHOWN)
            replies = iter(await pipe.execute())
        rows = [{job_id: _row(job_id, next(replies)) for job_id in group} for group in groups]
        for job_id in groups[-1]:
            _, reasons = next(replies)
            shown = list(reasons.items())[:REASONS_SHOWN]
            rows[-1][job_id]["reasons"] = [[text(path), text(reason)] for path, reason in shown]
        return [{job_id: row for job_id, row in group.items() if "state" in row} for group in rows]


def _row(job_id: str, values: list[bytes | None]) -> dict[str, object]:
    row: dict[str, object] = {"id": job_id}
    for name, value in zip(JOB_FIELDS, values, strict=True):
        if value is not None:
            row[name] = field_value(name, text(value))
    return row


def _active(workers: list[dict[str, object]]) -> list[tuple[str, str]]:
    """(job ID, worker) of the jobs the workers hold, the longest held first, MAX_ACTIVE at most."""
    held = [
        (float(job[2]), str(job[0]), str(w.get("name")))
        for w in workers
        for job in cast(list[list[object]], w.get("jobs") or [])
        if len(job) == 3 and isinstance(job[2], int | float)
    ]
    held.sort(key=lambda h: -h[0])
    return [(job_id, worker) for _, job_id, worker in held[:MAX_ACTIVE]]


def _running(job_id: str, worker: str, row: dict[str, object] | None) -> dict[str, object]:
    """A held job's progress; one so new that its first write is not made yet shows `running`."""
    return {"id": job_id, "worker": worker, "state": "running", **(row or {})}


def _bucket(minute: int, reply: list[bytes | None], now: float) -> dict[str, object]:
    start = minute * THROUGHPUT_BUCKET
    files, nbytes = (int(v) if v is not None else 0 for v in reply)
    return {"at": start, "seconds": min(THROUGHPUT_BUCKET, max(1.0, now - start)), "files": files,
            "bytes": nbytes}

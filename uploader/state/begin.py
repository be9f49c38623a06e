"""How a delivery of a job starts, decided in one call: the pipeline asks once and acts.

A job no run has touched (the common case) starts lazily on the page the probe read: its start
is written with its first outcomes (probe.py). Any other job takes the full way: its keys are
checked, its list's length read, and START decides between a fresh run, a resumed one and one
that stays cancelled. A list that cannot be read fails the job with that reason; a key of the
job's that holds another type refuses it (buried for an operator).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import redis.asyncio as aioredis

from uploader.entries.manifest import Manifest
from uploader.errors import BadJobError
from uploader.redisio import Keys
from uploader.source.base import Delivery
from uploader.state import probe
from uploader.state.progress import Progress

# "fresh" and "resume" runs are served; "cancelled" settles at once; "unreadable" was recorded
# failed here and settles as such; "refused" is buried with the reason.
How = Literal["fresh", "resume", "cancelled", "unreadable", "refused"]


@dataclass(frozen=True, slots=True)
class Beginning:
    how: How
    total: int = 0
    lazy: bool = False  # a fresh run whose start is written with its first outcomes
    reason: str = ""  # why a job is unreadable or refused

    @property
    def serves(self) -> bool:
        return self.how in ("fresh", "resume")


async def begin(
    progress: Progress,
    redis: aioredis.Redis,
    keys: Keys,
    job_id: str,
    manifest: Manifest,
    inline: Sequence[object] | None,
    delivery: Delivery,
    page_size: int,
) -> Beginning:
    """Start this delivery's run in Redis (or arrange its lazy start), and say how it starts;
    the manifest is primed with the first page when the probe read it."""
    head = await probe.probe(redis, keys, job_id, inline, page_size)
    if head is not None:
        total = head.total if head.total is not None else await manifest.length()
        manifest.prime(head.page)
        progress.start_lazily(job_id, total, delivery)
        return Beginning("fresh", total, lazy=True)
    try:
        await progress.starts.check_keys(job_id)
        try:
            total = await manifest.length()
        except BadJobError as exc:
            await progress.fail_unreadable(job_id, delivery, str(exc))
            return Beginning("unreadable", reason=str(exc))
        mode = await progress.start(job_id, total, delivery)
    except BadJobError as exc:  # a key of the job's that holds something else
        return Beginning("refused", reason=str(exc))
    return Beginning(mode, total)

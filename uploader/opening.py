"""A job's first read, in one round trip: the head of its list, and whether any key of it
exists (its cancel flag included).

Most job IDs are new: no run has left a hash, marks or reasons, so there is nothing to reset
and nothing to resume. Such a run needs no START of its own: it begins on the page read here,
and its start is written with its first outcomes (APPLY or CLOSE, see progresslua.py). Any
other job (a key of it exists, the list is empty or unreadable) takes the full way: START,
which decides between a fresh run, a resumed one and a cancelled one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import redis.asyncio as aioredis

from uploader.manifest import Page
from uploader.redisio import Keys, is_cluster, until_done


@dataclass(frozen=True, slots=True)
class Head:
    """A new job's first page, and its length when the page holds the whole list."""

    page: Page
    total: int | None


async def probe(
    redis: aioredis.Redis, keys: Keys, job_id: str, inline: Sequence[object] | None, page_size: int
) -> Head | None:
    """The first page of a job that no run has touched; None for any other job."""
    own = [keys.job(job_id), *keys.internal(job_id)]  # one slot: the hash's
    apart = [keys.failed(job_id), keys.cancel(job_id)]
    if not is_cluster(redis):  # one EXISTS for all: a set cancel flag takes START's way too
        own, apart = own + apart, []

    async def call() -> list[object]:
        async with redis.pipeline(transaction=False) as pipe:
            if inline is None:
                pipe.lrange(keys.files(job_id), 0, page_size - 1)
            pipe.exists(*own)
            for key in apart:
                pipe.exists(key)
            replies: list[object] = await pipe.execute(raise_on_error=False)
            return replies

    replies = await until_done(call, "read job")
    entries: object = list(inline[:page_size]) if inline is not None else replies.pop(0)
    if not isinstance(entries, list) or not entries or any(n != 0 for n in replies):
        return None  # a wrong type, an empty list, keys of an earlier run, a cancel: START decides
    if inline is not None:
        total: int | None = len(inline)
    else:
        total = len(entries) if len(entries) < page_size else None
    return Head(Page(0, entries, b"", cancelled=False), total)

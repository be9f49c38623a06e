"""A job's first read, in one round trip: the head of its list, and whether any key of it
exists (its cancel flag included).

Most job IDs are new: no run has left a hash, marks or reasons, so there is nothing to reset
and nothing to resume. Such a run needs no START of its own: it begins on the page read here,
and its start is written with its first outcomes (APPLY or CLOSE, see scripts.py). Any
other job (a key of it exists, the list is empty or unreadable) takes the full way: START,
which decides between a fresh run, a resumed one and a cancelled one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import redis.asyncio as aioredis

from uploader.entries.manifest import Page
from uploader.redisio import Keys, is_cluster, until_done
from uploader.state.scripts import Lua, call_script


@dataclass(frozen=True, slots=True)
class Head:
    """A new job's first page, and its length when the page holds the whole list."""

    page: Page
    total: int | None


# Off a cluster, the whole read in one script call. KEYS: the list, then every key of the job.
# ARGV: the page size. Returns {how many of the job's keys exist, the page}, or {-1} when
# the list's key holds another type (START says so).
PROBE = """
local page = redis.pcall('LRANGE', KEYS[1], 0, tonumber(ARGV[1]) - 1)
if page.err then return {-1} end
return {redis.call('EXISTS', unpack(KEYS, 2)), page}
"""
PROBE_SCRIPT = Lua(PROBE)


async def probe(
    redis: aioredis.Redis, keys: Keys, job_id: str, inline: Sequence[object] | None, page_size: int
) -> Head | None:
    """The first page of a job that no run has touched; None for any other job."""
    own = [keys.job(job_id), *keys.internal(job_id), keys.failed(job_id), keys.cancel(job_id)]
    if is_cluster(redis):
        replies = await until_done(lambda: _read_apart(redis, keys, job_id, inline, page_size), "read job")
    elif inline is None:
        reply = await until_done(
            lambda: call_script(redis, PROBE_SCRIPT, [keys.files(job_id), *own], [page_size]), "read job")
        replies = [reply[1], reply[0]] if reply[0] != -1 else [None]
    else:
        replies = [await until_done(lambda: redis.exists(*own), "read job")]
    entries: object = list(inline[:page_size]) if inline is not None else replies.pop(0)
    if not isinstance(entries, list) or not entries or any(n != 0 for n in replies):
        return None  # a wrong type, an empty list, keys of an earlier run, a cancel: START decides
    if inline is not None:
        total: int | None = len(inline)
    else:
        total = len(entries) if len(entries) < page_size else None
    return Head(Page(0, entries, b"", cancelled=False), total)


async def _read_apart(
    redis: aioredis.Redis, keys: Keys, job_id: str, inline: Sequence[object] | None, page_size: int
) -> list[object]:
    """On a cluster: the page, the keys in the hash's slot, and the two in slots of their own."""
    async with redis.pipeline(transaction=False) as pipe:
        if inline is None:
            pipe.lrange(keys.files(job_id), 0, page_size - 1)
        pipe.exists(keys.job(job_id), *keys.internal(job_id))
        pipe.exists(keys.failed(job_id))
        pipe.exists(keys.cancel(job_id))
        replies: list[object] = await pipe.execute(raise_on_error=False)
        return replies

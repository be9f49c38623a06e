"""What an operator does to one job, from the CLI or the status page: cancel it, retry it.

Each checks the job's progress hash first and refuses, with a one-line reason, a job the action
does not apply to; the CLI and the page say the same words.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from uploader.redisio import Keys, text_map
from uploader.source.base import Placed, SourceAdmin

if TYPE_CHECKING:
    from redis.asyncio import Redis

FINAL_STATES = frozenset({"done", "failed", "cancelled"})
LIVE_STATES = frozenset({"queued", "running"})


class Refused(Exception):
    """The job is not in a state the action applies to."""


def not_cancellable(state: dict[str, str], listed: bool) -> str | None:
    """Why a job cannot be cancelled (`state done`, `unknown`); None when it is queued or running.

    A job with a files list and no progress hash yet was put and not started: it is queued.
    """
    if state.get("state") in LIVE_STATES and "finished_at" not in state:
        return None
    if not state and listed:
        return None
    return f"state {state['state']}" if "state" in state else "unknown"


async def cancel(redis: Redis, keys: Keys, job_id: str, ttl: int) -> str:
    """Set the job's cancel flag: pending files are skipped, in-flight ones finish."""
    state = text_map(await redis.hgetall(keys.job(job_id)))
    listed = bool(await redis.exists(keys.files(job_id)))
    refusal = not_cancellable(state, listed)
    if refusal is not None:
        raise Refused(f"job {job_id} is not queued or running ({refusal})")
    # Expiring with the progress, so a stale flag never cancels a later job of this ID.
    await redis.set(keys.cancel(job_id), int(time.time()), ex=ttl)
    return f"cancel requested for {job_id}"


async def retry(redis: Redis, keys: Keys, job_id: str, admin: SourceAdmin) -> str:
    """Requeue the failed job where it failed; the next daemon to reserve it runs its failed
    files again (what was uploaded is skipped)."""
    state = text_map(await redis.hgetall(keys.job(job_id)))
    return await retry_failed(admin, job_id, state)


async def retry_failed(admin: SourceAdmin, job_id: str, state: dict[str, str]) -> str:
    """Requeue one failed job; its hash names the server and the beanstalkd job that was buried."""
    address, number = state.get("beanstalkd", ""), state.get("beanstalk_job", "")
    if state.get("state") != "failed" or not address or not number.isdigit():
        raise Refused(f"job {job_id} is not failed (state {state.get('state', 'unknown')})")
    try:
        await admin.retry(Placed(address, int(number)))
    except LookupError:
        raise Refused(f"job {job_id} is not buried on {address} (beanstalkd job {number})") from None
    return f"kicked {job_id} (beanstalkd job {number} on {address})"

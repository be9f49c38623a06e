"""The commands that talk to Redis and the job source: enqueue a job as a producer would, and
inspect, cancel and retry jobs as an operator does. The source is reached through its
operators' side (`source.base.SourceAdmin`, from `open_admin`), never a broker's own client.

Each checks its input before anything is sent, so a mistake is refused here and not buried
in the daemon, and each says in one line which server it could not reach.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, cast

from uploader.cli.command import NO, OK, UNREACHABLE, USAGE, CliError, load_config, redis_keys, run_async
from uploader.config.settings import TUBE_NAME, Config, SourceConfig
from uploader.entries.manifest import JOB_ID, BadEntry, parse_entry
from uploader.redisio import Keys, text, text_map
from uploader.source import open_admin
from uploader.source.base import Placed, SourceAdmin, SourceRefused, SourceUnavailable
from uploader.web import actions

if TYPE_CHECKING:
    from redis.asyncio import Redis

FINAL_STATES = actions.FINAL_STATES
LIVE_STATES = actions.LIVE_STATES
HINT_AFTER = 5.0  # seconds a waited-for job may sit queued before we look for a daemon


# --- checking input before anything is sent ---


def _job_id(text: str) -> str:
    """A job ID as the daemon accepts it; anything else would only be buried there."""
    if not JOB_ID.match(text):
        raise CliError(f"{text!r} is not a job ID (1-200 of A-Z a-z 0-9 . _ : -)", USAGE)
    return text


def _tube(name: str) -> str:
    if not TUBE_NAME.match(name):
        raise CliError(f"{name!r} is not a valid beanstalkd tube name", USAGE)
    return name


def _entry(index: int, path: str) -> str:
    """One command-line path as a manifest entry, refused here rather than failed by the daemon."""
    full = os.path.abspath(path)
    try:
        data = full.encode("utf-8")
    except UnicodeEncodeError:  # argv bytes that are not UTF-8 arrive as surrogate escapes
        shown = os.fsencode(full).decode("utf-8", "backslashreplace")
        raise CliError(f"{shown}: path is not valid UTF-8", USAGE) from None
    parsed = parse_entry(index, data)
    if isinstance(parsed, BadEntry):
        raise CliError(f"{parsed.label}: {parsed.reason}", USAGE)
    return full


# --- commands ---


def cmd_enqueue(args: argparse.Namespace) -> int:
    config = load_config(args.config, required=False)
    job_id = _job_id(args.job) if args.job is not None else uuid.uuid4().hex
    tube = _tube(args.tube or config.source.tubes[0].name)
    entries = [_entry(i, p) for i, p in enumerate(args.paths)]

    async def main() -> int:
        admin = open_admin(config.source)
        try:
            into = (await admin.choose(job_id, tube), tube)  # checked before Redis is written
            async with redis_keys(config) as (redis, keys):
                await _refuse_unfinished(redis, keys, job_id)
                await _write_job(redis, keys, job_id, entries)
                placed = await _put_or_undo(admin, into, redis, keys, job_id, args.priority, args.ttr)
                print(job_id, flush=True)
                if not args.wait:
                    return OK
                hint = functools.partial(_unwatched_hint, placed, tube, admin)
                return await _watch(redis, keys, job_id, hint)
        finally:
            await admin.close()

    return run_async(main())


async def _refuse_unfinished(redis: Redis, keys: Keys, job_id: str) -> None:
    """A job ID may be used again once its run has finished, never while it is queued or running."""
    state = text_map(await redis.hgetall(keys.job(job_id)))
    if state.get("state") in LIVE_STATES and "finished_at" not in state:
        worker = f" (worker {state['worker']})" if state.get("worker") else ""
        raise CliError(f"job {job_id} is {state['state']}{worker}; cancel it or use another ID", NO)


async def _write_job(redis: Redis, keys: Keys, job_id: str, entries: list[str]) -> None:
    """The new files list and a fresh progress hash, with every trace of a previous run removed,
    so `--wait` can never report the old run and the daemon runs the new list afresh."""
    async with redis.pipeline(transaction=False) as pipe:
        # One key per DEL: on a cluster they live in different slots.
        for key in (keys.files(job_id), keys.job(job_id), keys.failed(job_id), keys.cancel(job_id),
                    *keys.internal(job_id), *keys.legacy(job_id)):
            pipe.delete(key)
        for i in range(0, len(entries), 1000):
            pipe.rpush(keys.files(job_id), *entries[i : i + 1000])
        pipe.hset(
            keys.job(job_id),
            mapping={"state": "queued", "total": len(entries), "updated_at": int(time.time())},
        )
        await pipe.execute()


async def _put_or_undo(
    admin: SourceAdmin, into: tuple[str, str], redis: Redis, keys: Keys, job_id: str, priority: int, ttr: int
) -> Placed:
    """Put the ID on `into` (server, tube); if the source did not take it, remove what was
    written, leaving nothing half-done."""
    try:
        return await admin.put(*into, job_id.encode(), priority, ttr)
    except BaseException:
        for key in (keys.files(job_id), keys.job(job_id)):
            await redis.delete(key)
        raise


async def _watch(redis: Redis, keys: Keys, job_id: str, hint: Callable[[], Awaitable[str | None]]) -> int:
    """Draw a progress bar on stderr until the job reaches a final state; hint once if it sits
    queued in a tube no daemon watches."""
    loop = asyncio.get_running_loop()
    next_hint: float | None = loop.time() + HINT_AFTER
    while True:
        state = text_map(await redis.hgetall(keys.job(job_id)))
        _draw(state)
        if state.get("state") in FINAL_STATES:
            return await _report_end(redis, keys, job_id, state["state"])
        if next_hint is not None and state.get("state") == "queued" and loop.time() >= next_hint:
            message = await hint()
            if message is not None:
                sys.stderr.write(f"\nuploader: {message}\n")
            next_hint = None if message is not None else loop.time() + HINT_AFTER
        await asyncio.sleep(0.2)


def _draw(state: dict[str, str]) -> None:
    total = int(state.get("total", 0) or 0)
    settled = sum(int(state.get(k, 0) or 0) for k in ("uploaded", "skipped", "failed"))
    width = 30
    filled = width if total == 0 else min(width, width * settled // max(total, 1))
    sys.stderr.write(
        f"\r[{'#' * filled}{'.' * (width - filled)}] {settled}/{total} files, "
        f"{int(state.get('bytes', 0) or 0):,} bytes, {state.get('state', '?'):<9}"
    )
    sys.stderr.flush()


async def _report_end(redis: Redis, keys: Keys, job_id: str, state: str) -> int:
    sys.stderr.write("\n")
    if state == "done":
        return OK
    for path, reason in await _first_failures(redis, keys, job_id, 20):
        sys.stderr.write(f"  failed: {path}: {reason}\n")
    return NO


async def _unwatched_hint(where: Placed, tube: str, admin: SourceAdmin | None = None) -> str | None:
    """Why a job may wait forever: no daemon watches its tube on the server that holds it. None
    while one does (or we cannot tell). Asks `admin`, else one opened for that server alone."""
    if admin is None:
        own = open_admin(SourceConfig(addresses=(where.address,)))
        try:
            return await _unwatched_hint(where, tube, own)
        finally:
            await own.close()
    if await admin.watched(where.address, tube) is not False:
        return None
    return f"no daemon watches tube {tube!r} on {where.address} yet; still waiting (Ctrl-C to stop)"


async def _first_failures(redis: Redis, keys: Keys, job_id: str, count: int) -> list[tuple[str, str]]:
    """The first `count` failure reasons by HSCAN: a failed hash may hold millions of paths."""
    found: list[tuple[str, str]] = []
    cursor = 0
    while True:
        cursor, batch = await redis.hscan(keys.failed(job_id), cursor, count=max(count, 10))
        assert isinstance(batch, dict)
        found += list(text_map(batch).items())
        if cursor == 0 or len(found) >= count:
            return found[:count]


def cmd_status(args: argparse.Namespace) -> int:
    config = load_config(args.config, required=False)
    job_id = _job_id(args.job)

    async def main() -> int:
        async with redis_keys(config) as (redis, keys):
            raw = await redis.hgetall(keys.job(job_id))
            if not raw:
                raise CliError(f"no job {job_id!r} (unknown, or its progress expired)", NO)
            status: dict[str, object] = dict(text_map(raw))
            failed = await redis.hgetall(keys.failed(job_id))
        if failed:
            status["failures"] = text_map(failed)
        print(json.dumps(status, indent=2, sort_keys=True))
        return OK

    return run_async(main())


def cmd_cancel(args: argparse.Namespace) -> int:
    config = load_config(args.config, required=False)
    job_id = _job_id(args.job)

    async def main() -> int:
        async with redis_keys(config) as (redis, keys):
            try:
                print(await actions.cancel(redis, keys, job_id, config.redis.progress_ttl))
            except actions.Refused as exc:
                raise CliError(str(exc), NO) from None
        return OK

    return run_async(main())


def cmd_failed(args: argparse.Namespace) -> int:
    config = load_config(args.config, required=False)
    tube = _tube(args.tube) if args.tube is not None else None
    tubes = (tube,) if tube is not None else tuple(t.name for t in config.source.tubes)

    async def main() -> int:
        async with redis_keys(config) as (redis, keys):
            for job_id, state in await _failed_jobs(redis, keys, tube, args.limit):
                print(_failed_line(job_id, state, await _first_failures(redis, keys, job_id, 3)))
        admin = open_admin(config.source)
        try:
            await _buried_counts(admin, tubes)
        finally:
            await admin.close()
        return OK

    return run_async(main())


async def _failed_jobs(
    redis: Redis, keys: Keys, tube: str | None, limit: int
) -> list[tuple[str, dict[str, str]]]:
    """The newest failed jobs, newest first; members whose hash no longer says failed (retried,
    run again, expired) are skipped."""
    found: list[tuple[str, dict[str, str]]] = []
    start = 0
    while len(found) < limit:
        page = cast(list[bytes], await redis.zrevrange(keys.failed_jobs, start, start + limit - 1))
        members = [text(m) for m in page]
        if not members:
            break
        start += len(members)
        async with redis.pipeline(transaction=False) as pipe:
            for job_id in members:
                pipe.hgetall(keys.job(job_id))
            hashes = [text_map(h) for h in await pipe.execute()]
        found += [
            (job_id, state)
            for job_id, state in zip(members, hashes, strict=True)
            if state.get("state") == "failed" and (tube is None or state.get("tube") == tube)
        ]
    return found[:limit]


def _failed_line(job_id: str, state: dict[str, str], reasons: list[tuple[str, str]]) -> str:
    finished = state.get("finished_at", "")
    try:
        when = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(float(finished)))
    except ValueError:
        when = "?"
    shown = "; ".join(f"{path}: {reason}" for path, reason in reasons)
    counts = f"{state.get('failed', '?')}/{state.get('total', '?')} failed"
    return f"{job_id}\t{state.get('tube', '?')}\t{counts}\t{when}\t{shown}"


async def _buried_counts(admin: SourceAdmin, tubes: tuple[str, ...]) -> None:
    """Buried jobs per tube on each server, whatever buried them (a failed job, a bad body); a
    server that does not answer is told after the others."""
    failure: SourceUnavailable | None = None
    for address in admin.servers:
        try:
            for name, buried in (await admin.failed(address, tubes)).items():
                print(f"{address}\t{name}\t{buried} buried")
        except SourceUnavailable as exc:
            failure = failure or exc
    if failure is not None:
        raise failure


def cmd_retry(args: argparse.Namespace) -> int:
    config = load_config(args.config, required=False)
    if args.all == bool(args.jobs):
        raise CliError("retry takes job IDs or --all, not both and not neither", USAGE)
    if args.all:
        return run_async(_retry_all(config))
    job_ids = [_job_id(j) for j in args.jobs]
    return run_async(_retry_jobs(config, job_ids))


async def _retry_jobs(config: Config, job_ids: list[str]) -> int:
    """Kick each failed job on the server that buried it; one that cannot be kicked does not
    stop the others."""
    async with redis_keys(config) as (redis, keys):
        states = [text_map(await redis.hgetall(keys.job(j))) for j in job_ids]
    code = OK
    admin = open_admin(config.source)
    try:
        for job_id, state in zip(job_ids, states, strict=True):
            try:
                print(await actions.retry_failed(admin, job_id, state))
            except actions.Refused as exc:
                print(f"uploader: {exc}", file=sys.stderr)
                code = max(code, NO)
            except (SourceUnavailable, SourceRefused) as exc:
                print(f"uploader: {exc}", file=sys.stderr)
                code = max(code, UNREACHABLE)
    finally:
        await admin.close()
    return code


async def _retry_all(config: Config) -> int:
    """Kick every buried job of every configured tube on every configured server."""
    code = OK
    tubes = tuple(t.name for t in config.source.tubes)
    admin = open_admin(config.source)
    try:
        for address in admin.servers:
            try:
                kicked = await admin.retry_all(address, tubes)
            except SourceUnavailable as exc:
                print(f"uploader: {exc}", file=sys.stderr)
                code = UNREACHABLE
                continue
            for tube, count in kicked.items():
                print(f"{address}\t{tube}\tkicked {count}")
    finally:
        await admin.close()
    return code

"""`uploader recover`: find jobs stranded on a beanstalkd that lost them, and put them again.

beanstalkd has no replication: a server that is gone for good (or restarted without its
binlog) takes its jobs with it, and their files lists sit in Redis with nothing to run them.
A job is stranded when
- its files list (`{prefix}job:{id}:files`) exists and its run is not finished: no progress
  hash, or one that is `queued` or `running` (no `finished_at`);
- it is older than `--older-than` (the hash's `updated_at`; with no hash, the seconds since
  its files list was last touched, Redis's OBJECT IDLETIME), so a producer between its RPUSH
  and its put is left alone;
- no live worker runs it (`running` by a worker whose heartbeat is fresh, see state/heartbeat.py);
- no live beanstalkd holds it in any state: every server that answers, configured or named
  in a hash, is looked at job by job (pipelined `peek`, newest first, until every job it holds
  was seen or SCAN_LIMIT IDs were read), and bodies that carry the job ID count as held.
A stranded job's ID is put again by the enqueue rule (`SourceAdmin.choose`) into
its tube, and its hash says `queued` with a note and the new delivery, so running recover
twice puts nothing twice. The re-delivered run resumes from the job's marks: no file uploaded
twice.
"""

from __future__ import annotations

import argparse
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from uploader.cli.command import OK, UNREACHABLE, CliError, load_config, redis_keys, run_async
from uploader.config.settings import Config
from uploader.entries.manifest import JOB_ID, parse_body
from uploader.errors import BadJobError
from uploader.redisio import Keys, text, text_map
from uploader.source import open_admin
from uploader.source.base import DEFAULT_PRIORITY, Placed, SourceAdmin, SourceRefused, SourceUnavailable
from uploader.state.heartbeat import live_workers

if TYPE_CHECKING:
    from redis.asyncio import Redis

DEFAULT_OLDER_THAN = 3600  # seconds: well past any producer's RPUSH-then-put, or a flush
SCAN_LIMIT = 1_000_000  # job IDs looked at per server at most
FINAL = {"done", "failed", "cancelled"}


@dataclass(slots=True)
class Candidate:
    id: str
    state: dict[str, str]
    age: float | None  # seconds, None when Redis cannot tell

    def named(self) -> tuple[str, int] | None:
        """The delivery its hash names: server and beanstalkd job."""
        address, number = self.state.get("beanstalkd", ""), self.state.get("beanstalk_job", "")
        return (address, int(number)) if address and number.isdigit() else None


@dataclass(slots=True)
class ServerSurvey:
    """What the beanstalkd servers hold, as far as they answer."""

    admin: SourceAdmin
    live: list[str] = field(default_factory=list)  # the servers that answered
    down: dict[str, str] = field(default_factory=dict)
    held: set[str] = field(default_factory=set)  # job IDs in a body on a live server
    partial: list[str] = field(default_factory=list)  # live servers not looked at to the end


def cmd_recover(args: argparse.Namespace) -> int:
    config = load_config(args.config, required=False)
    return run_async(recover(config, args.older_than, args.dry_run))


async def recover(config: Config, older_than: float, dry_run: bool) -> int:
    survey = ServerSurvey(open_admin(config.source))
    try:
        async with redis_keys(config) as (redis, keys):
            now = time.time()
            candidates = [c async for c in _unfinished(redis, keys, now, older_than)]
            live = await live_workers(redis, keys, now)
            candidates = [c for c in candidates if not _live_run(c, live)]
            named = {n[0] for c in candidates if (n := c.named())}
            await _look(survey, [*config.source.addresses, *sorted(named - set(config.source.addresses))])
            stranded = [c for c in candidates if await _stranded(survey, c)]
            for address, why in survey.down.items():
                print(f"beanstalkd {address} unreachable, counted as lost: {why}")
            for address in survey.partial:
                print(f"beanstalkd {address} holds more than {SCAN_LIMIT} job IDs: "
                      "jobs it may hold are left alone")
            if dry_run:
                for c in stranded:
                    print(f"stranded\t{c.id}\t{c.state.get('state', 'no progress')}\t{_where(c)}")
            put = 0 if dry_run else await _put_all(config, redis, keys, survey, stranded)
            print(f"{len(stranded)} stranded of {len(candidates)} unfinished jobs; put again: {put}")
    finally:
        await survey.admin.close()
    return OK


def _where(candidate: Candidate) -> str:
    named = candidate.named()
    return f"was beanstalkd job {named[1]} on {named[0]}" if named else "never started"


def _live_run(candidate: Candidate, live: set[str]) -> bool:
    return candidate.state.get("state") == "running" and candidate.state.get("worker", "") in live


async def _unfinished(redis: Redis, keys: Keys, now: float, older_than: float) -> AsyncIterator[Candidate]:
    """Jobs with a files list and no finished run, older than `older_than` seconds."""
    pattern = re.sub(r"([*?\[\]\\])", r"\\\1", keys.prefix) + "job:*:files"
    start, end = len(keys.prefix) + len("job:"), -len(":files")
    batch: list[str] = []
    async for key in redis.scan_iter(match=pattern, count=1000):
        job_id = text(key)[start:end]
        if JOB_ID.match(job_id) and keys.files(job_id) == text(key):
            batch.append(job_id)
        if len(batch) >= 500:
            for c in await _read(redis, keys, batch, now):
                if not (c.age is not None and c.age < older_than):
                    yield c
            batch = []
    for c in await _read(redis, keys, batch, now) if batch else []:
        if not (c.age is not None and c.age < older_than):
            yield c


async def _read(redis: Redis, keys: Keys, job_ids: list[str], now: float) -> list[Candidate]:
    async with redis.pipeline(transaction=False) as pipe:
        for job_id in job_ids:
            pipe.hgetall(keys.job(job_id))
            pipe.object("idletime", keys.files(job_id))
        replies = await pipe.execute(raise_on_error=False)
    found = []
    for i, job_id in enumerate(job_ids):
        raw, idle = replies[2 * i], replies[2 * i + 1]
        if isinstance(raw, Exception):  # not a hash: the daemon refuses such a job itself
            continue
        state = text_map(raw)
        if "finished_at" in state or state.get("state") in FINAL:
            continue
        updated = state.get("updated_at", "")
        if state and updated.isdigit():
            age: float | None = now - int(updated)
        else:
            age = float(idle) if isinstance(idle, int) else None
        found.append(Candidate(job_id, state, age))
    return found


async def _look(survey: ServerSurvey, addresses: list[str]) -> None:
    """Read every job ID each server holds; those that cannot be read are down."""
    for address in dict.fromkeys(addresses):
        try:
            held, complete = await survey.admin.held(address, _body_id, SCAN_LIMIT)
        except (SourceUnavailable, SourceRefused) as exc:
            survey.down[address] = str(exc)
            continue
        survey.live.append(address)
        survey.held |= held
        if not complete:
            survey.partial.append(address)


def _body_id(body: bytes) -> str | None:
    try:
        return parse_body(body).id
    except BadJobError:  # a completion message, a bad body: not a job of ours
        return None


async def _stranded(survey: ServerSurvey, candidate: Candidate) -> bool:
    """No live server holds the job; with a server not looked at to the end, only a job whose
    hash names its delivery can be told (by peeking at that one job)."""
    if candidate.id in survey.held:
        return False
    named = candidate.named()
    if named is not None and named[0] in survey.live:
        body = await survey.admin.peek(Placed(*named))
        if body is not None and _body_id(body) == candidate.id:
            return False
    return not survey.partial


async def _put_all(
    config: Config, redis: Redis, keys: Keys, survey: ServerSurvey, stranded: list[Candidate]
) -> int:
    live = tuple(a for a in config.source.addresses if a in survey.live)
    if stranded and not live:
        down = "; ".join(f"{a}: {why}" for a, why in survey.down.items())
        raise CliError(f"no configured beanstalkd answers, nothing put ({down})", UNREACHABLE)
    tubes = [t.name for t in config.source.tubes]
    for candidate in stranded:
        tube = candidate.state.get("tube", "")
        tube = tube if tube in tubes else tubes[0]
        address, number = await _put(survey, live, candidate.id, tube)
        now = int(time.time())
        note = f"recovered at {now}: put again on {address} as beanstalkd job {number} by uploader recover"
        await redis.hset(keys.job(candidate.id), mapping={
            "state": "queued", "updated_at": now, "note": note, "beanstalkd": address,
            "beanstalk_job": number, "tube": tube,
        })
        was = candidate.state.get("state", "no progress")
        print(f"recovered\t{candidate.id}\t{was}\t{address}\tjob {number}")
    return len(stranded)


async def _put(survey: ServerSurvey, live: tuple[str, ...], job_id: str, tube: str) -> tuple[str, int]:
    """Put on the first server the placement rule gives among `live` that takes it."""
    failure: SourceUnavailable | None = None
    left = live
    while left:
        try:
            address = await survey.admin.choose(job_id, tube, among=left)
        except SourceUnavailable as exc:
            failure = exc
            break
        try:
            placed = await survey.admin.put(address, tube, job_id.encode(), DEFAULT_PRIORITY, 60)
        except SourceUnavailable as exc:
            failure = exc
            survey.down[address] = str(exc)
            left = tuple(a for a in left if a != address)
            continue
        return placed.address, placed.job
    raise CliError(f"job {job_id} not put again, no beanstalkd took it: {failure}", UNREACHABLE)

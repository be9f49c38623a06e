"""Per-job progress in Redis, written in batches: counters, resume marks and failure reasons.

A file's outcome is buffered and reaches Redis in one transaction with many others, every
`flush_interval` or `flush_batch` outcomes, so the hot path never waits on a round trip.
Marks and counters travel in the same MULTI/EXEC, so they never disagree, and what a crash
loses is uploaded again (at least once, never zero times).

A batch whose reply is lost (Redis stopped after applying it) is sent again. Marks and
reasons are idempotent; counters are not, so each batch carries a sequence number and a
small script adds its counts only if this process has not applied that number to the job.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import secrets
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Literal, cast

import redis.asyncio as aioredis
import redis.exceptions
import structlog
from redis.asyncio.client import Pipeline
from redis.typing import EncodableT, FieldT

from uploader.config import RedisConfig
from uploader.errors import BadJobError
from uploader.redisio import Keys, text, until_done

log = structlog.get_logger("uploader.progress")

State = Literal["queued", "running", "done", "failed", "cancelled"]
Outcome = Literal["uploaded", "skipped", "failed"]
MAX_REASON = 500
RECENT_JOBS = 500  # finished jobs listed for operators, newest first
FAILED_JOBS = 10_000  # failed jobs kept for `uploader failed` and `retry`
COMPLETION_COUNTS = ("total", "uploaded", "skipped", "failed", "bytes")  # in completion messages
LIST_LABEL = "<files list>"  # where a job-level failure's reason is kept in the failed hash

# KEYS: the job's hash, its applied-batch hash. ARGV: writer, sequence, now, then the counts.
_ADD_COUNTS = """
local seq = tonumber(ARGV[2])
if tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0') >= seq then return 0 end
redis.call('HSET', KEYS[2], ARGV[1], seq)
local names = {'uploaded', 'skipped', 'failed', 'bytes'}
for i = 1, 4 do
  local n = tonumber(ARGV[3 + i])
  if n ~= 0 then redis.call('HINCRBY', KEYS[1], names[i], n) end
end
redis.call('HSET', KEYS[1], 'updated_at', ARGV[3])
return 1
"""

# Seconds two estimates of one job's put time (now - beanstalkd's `age`) may differ by: `age` is
# whole seconds, and each daemon reads it with its own clock.
SAME_DELIVERY_SLACK = 5

# KEYS: the job's hash, marks, applied batches, failed reasons, directory walk digests.
# ARGV: worker, now, total ('' if unknown), beanstalkd address, job id, put time, tube, slack.
# Returns 'fresh' (a new run of a finished job's ID), 'resume', or 'cancelled' (the same
# delivery of a run that was cancelled: it stays cancelled).
_START = """
local h = KEYS[1]
local mode = 'resume'
if redis.call('HEXISTS', h, 'finished_at') == 1 then
  local was = redis.call('HMGET', h, 'beanstalkd', 'beanstalk_job', 'put_at', 'state')
  local put = tonumber(was[3] or '')
  local same = ARGV[4] ~= '' and was[1] == ARGV[4] and was[2] == ARGV[5] and put ~= nil
    and math.abs(put - tonumber(ARGV[6])) <= tonumber(ARGV[8])
  if not same then
    mode = 'fresh'
  elseif was[4] == 'cancelled' then
    return 'cancelled'
  end
end
if mode == 'fresh' then
  redis.call('DEL', h, KEYS[2], KEYS[3], KEYS[5])
end
redis.call('HSET', h, 'state', 'running', 'worker', ARGV[1], 'updated_at', ARGV[2], 'failed', 0)
if ARGV[3] ~= '' then redis.call('HSET', h, 'total', ARGV[3]) end
if ARGV[4] ~= '' then
  redis.call('HSET', h, 'beanstalkd', ARGV[4], 'beanstalk_job', ARGV[5], 'put_at', ARGV[6], 'tube', ARGV[7])
end
for _, name in ipairs({'uploaded', 'skipped', 'bytes'}) do redis.call('HSETNX', h, name, 0) end
redis.call('HSETNX', h, 'started_at', ARGV[2])
redis.call('HDEL', h, 'finished_at')
redis.call('DEL', KEYS[4])
for i = 1, 3 do redis.call('PERSIST', KEYS[i]) end
return mode
"""

Start = Literal["fresh", "resume", "cancelled"]


@dataclass(frozen=True, slots=True)
class Delivery:
    """Which beanstalkd job carries a run: a job ID's runs are told apart by it."""

    address: str
    job: int
    put_at: float
    tube: str


@dataclass(slots=True)
class Counts:
    uploaded: int = 0
    skipped: int = 0
    failed: int = 0
    bytes: int = 0

    def add(self, outcome: Outcome, nbytes: int) -> None:
        if outcome == "uploaded":
            self.uploaded += 1
        elif outcome == "skipped":
            self.skipped += 1
        else:
            self.failed += 1
        self.bytes += nbytes

    @property
    def settled(self) -> int:
        return self.uploaded + self.skipped + self.failed


@dataclass(slots=True)
class _Pending:
    counts: Counts = field(default_factory=Counts)
    marks: list[int] = field(default_factory=list)
    reasons: dict[FieldT, EncodableT] = field(default_factory=dict)


def mark_args(indexes: list[int]) -> list[str | int]:
    """BITFIELD arguments that set these bits: 64 or 8 at once where a batch covers a whole
    aligned word or byte (setting all of its bits to 1 is the same as OR-ing them in), single
    bits elsewhere. A batch of files finished in order costs ~1/64 of the arguments."""
    ordered = sorted(set(indexes))
    args: list[str | int] = []
    i, n = 0, len(ordered)
    while i < n:
        index = ordered[i]
        if index % 64 == 0 and i + 63 < n and ordered[i + 63] == index + 63:
            args += ["SET", "i64", f"#{index // 64}", -1]
            i += 64
        elif index % 8 == 0 and i + 7 < n and ordered[i + 7] == index + 7:
            args += ["SET", "u8", f"#{index // 8}", 255]
            i += 8
        else:
            args += ["SET", "u1", index, 1]
            i += 1
    return args


class Progress:
    def __init__(self, redis: aioredis.Redis, keys: Keys, config: RedisConfig, worker: str) -> None:
        self._redis = redis
        self._keys = keys
        self._config = config
        self._worker = worker
        # Names this process's batch numbers; a restarted process (same pid or not) starts anew.
        self._writer = f"{worker}:{secrets.token_hex(4)}"
        self._add_counts = redis.register_script(_ADD_COUNTS)
        self._start_script = redis.register_script(_START)
        self._sequence = 0
        self._unsent: list[tuple[int, dict[str, _Pending]]] = []
        self._pending: dict[str, _Pending] = defaultdict(_Pending)
        self._buffered = 0
        self._full = asyncio.Event()
        self._flush_lock = asyncio.Lock()
        self._stopping = False

    def record(
        self, job_id: str, index: int, outcome: Outcome, nbytes: int = 0, label: str = "", reason: str = ""
    ) -> None:
        """Buffer one file's outcome; failed files are not marked, so a re-run retries them."""
        pending = self._pending[job_id]
        pending.counts.add(outcome, nbytes)
        if outcome == "failed":
            pending.reasons[label] = reason[:MAX_REASON].replace("\n", " ")
        else:
            pending.marks.append(index)
        self._buffered += 1
        if self._buffered >= self._config.flush_batch:
            self._full.set()

    async def run(self) -> None:
        """Flush every interval, or sooner when the buffer is full, until `stop()`.

        Stopping is a flag rather than a cancellation, so a pipeline is never cut in half.
        """
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._config.flush_interval):
                    await self._full.wait()
            await self.flush()

    @property
    def unsaved(self) -> int:
        """Outcomes not yet acknowledged by Redis."""
        return self._buffered + sum(p.counts.settled for _, batch in self._unsent for p in batch.values())

    def stop(self) -> None:
        self._stopping = True
        self._full.set()

    async def flush(self) -> None:
        """Write what is buffered. A batch keeps its number until Redis has acknowledged it,
        also when this is cancelled mid-write, so sending it again can never count it twice."""
        async with self._flush_lock:
            if self._pending:
                self._full.clear()
                self._sequence += 1
                self._unsent.append((self._sequence, self._pending))
                self._pending = defaultdict(_Pending)
                self._buffered = 0
            while self._unsent:
                try:
                    await until_done(functools.partial(self._write, *self._unsent[0]), "flush progress")
                except redis.exceptions.ResponseError as exc:
                    # A key of another type (see check_keys): the transaction applied all the
                    # rest; sending it again would fail the same way.
                    log.error("progress_write_refused", error=str(exc))
                self._unsent.pop(0)

    async def _write(self, sequence: int, batch: dict[str, _Pending]) -> None:
        now = int(time.time())
        async with self._redis.pipeline(transaction=True) as pipe:
            for job_id, pending in batch.items():
                c = pending.counts
                await self._add_counts(
                    keys=[self._keys.job(job_id), self._keys.applied(job_id)],
                    args=[self._writer, sequence, now, c.uploaded, c.skipped, c.failed, c.bytes],
                    client=pipe,
                )
                if pending.marks:
                    pipe.execute_command("BITFIELD", self._keys.marks(job_id), *mark_args(pending.marks))
                if pending.reasons:
                    pipe.hset(self._keys.failed(job_id), mapping=pending.reasons)
            await pipe.execute()

    async def check_keys(self, job_id: str) -> None:
        """Refuse a job whose progress keys hold something else (a producer's mistake): every
        write to them would fail, so nothing could be recorded."""
        expected = {
            self._keys.job(job_id): "hash",
            self._keys.failed(job_id): "hash",
            self._keys.applied(job_id): "hash",
            self._keys.marks(job_id): "string",
        }

        async def call() -> list[object]:
            async with self._redis.pipeline(transaction=False) as pipe:
                for key in expected:
                    pipe.type(key)
                result: list[object] = await pipe.execute()
                return result

        for (key, kind), found in zip(expected.items(), await until_done(call, "check keys"), strict=True):
            found_kind = text(found) if isinstance(found, bytes | str) else str(found)
            if found_kind not in ("none", kind):
                raise BadJobError(f"{key} is a Redis {found_kind}, where the daemon keeps this job's "
                                  "progress: delete it or use another job ID")

    async def start(self, job_id: str, total: int | None, delivery: Delivery | None = None) -> Start:
        """Mark a job running, in one script that also decides whose run this is.

        A job ID may be used again once its run has finished: a delivery other than the one
        that ran it last (another beanstalkd job, or the same id put at another time) starts
        afresh, with counters, marks and reasons of the old run gone. The same delivery again
        (a crash, a drain, a TTR lapse, a kick) resumes from the marks. Failures of an earlier
        run are forgotten either way: they are retried now.
        """
        now = int(time.time())
        who = ("", "", "", "") if delivery is None else (
            delivery.address, str(delivery.job), str(int(delivery.put_at)), delivery.tube
        )
        keys = [
            self._keys.job(job_id),
            self._keys.marks(job_id),
            self._keys.applied(job_id),
            self._keys.failed(job_id),
            self._keys.walk(job_id),
        ]
        args = [self._worker, now, "" if total is None else total, *who, SAME_DELIVERY_SLACK]
        mode = await until_done(lambda: self._start_script(keys=keys, args=args), "start job")
        return cast(Start, text(mode) if isinstance(mode, bytes | str) else "resume")

    async def set_total(self, job_id: str, total: int) -> None:
        await until_done(lambda: self._redis.hset(self._keys.job(job_id), "total", total), "set total")

    async def set_state(self, job_id: str, state: State) -> None:
        await self.flush()
        key = self._keys.job(job_id)
        await until_done(
            lambda: self._redis.hset(key, mapping={"state": state, "updated_at": int(time.time())}),
            "set state",
        )

    async def fail_list(self, job_id: str, reason: str) -> None:
        """The job's list of files cannot be read (any more): the reason goes where failed
        files' reasons go, under `<files list>`, and the job ends failed."""
        await until_done(
            lambda: self._redis.hset(self._keys.failed(job_id), LIST_LABEL, reason[:MAX_REASON]),
            "record job failure",
        )

    async def fail_unreadable(self, job_id: str, delivery: Delivery | None, reason: str) -> None:
        """A job whose list is unreadable from the start: running at 0 files, then failed."""
        await self.start(job_id, 0, delivery)
        await self.fail_list(job_id, reason)

    async def finish(
        self, job_id: str, seconds: float, *, cancelled: bool = False, failed: int = 0
    ) -> dict[str, object]:
        """Flush, decide and settle the final state, start the expiry clock; return the
        completion message. `failed`: files this run failed; failures recorded by earlier
        runs or for the list itself make the job failed too."""
        await self.flush()
        state: State = "cancelled" if cancelled else "failed" if failed else await self._verdict(job_id)
        key = self._keys.job(job_id)
        ttl = self._config.progress_ttl
        now = int(time.time())

        async def call() -> list[object]:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.hset(key, mapping={"state": state, "finished_at": now, "updated_at": now})
                pipe.hgetall(key)
                for k in (
                    key,
                    self._keys.failed(job_id),
                    self._keys.marks(job_id),
                    self._keys.applied(job_id),
                    self._keys.walk(job_id),
                ):
                    pipe.expire(k, ttl)
                # The flag was for this run, whether it saw it or not: never for a later one.
                pipe.delete(self._keys.cancel(job_id))
                self._index(pipe, job_id, state, now)
                result: list[object] = await pipe.execute()
                return result

        stored = (await until_done(call, "finish job"))[1]
        assert isinstance(stored, dict)
        counts = {name: int(stored.get(name.encode(), 0)) for name in COMPLETION_COUNTS}
        return {"id": job_id, "state": state, **counts, "seconds": round(seconds, 3)}

    async def _verdict(self, job_id: str) -> State:
        failures = await until_done(lambda: self._redis.hlen(self._keys.failed(job_id)), "hlen")
        return "failed" if failures else "done"

    def _index(self, pipe: Pipeline, job_id: str, state: State, now: int) -> None:
        """Keep the bounded lists of finished and failed jobs that operators read (`/jobs`,
        `uploader failed`): newest first, trimmed by count and by age, expiring when idle."""
        ttl = self._config.progress_ttl
        lists = [(self._keys.finished_jobs, RECENT_JOBS)]
        if state == "failed":
            lists.append((self._keys.failed_jobs, FAILED_JOBS))
        else:
            pipe.zrem(self._keys.failed_jobs, job_id)
        for name, keep in lists:
            pipe.zadd(name, {job_id: now})
            pipe.zremrangebyrank(name, 0, -keep - 1)
            pipe.zremrangebyscore(name, "-inf", now - ttl)
            pipe.expire(name, ttl)

    async def publish(self, message: dict[str, object]) -> None:
        payload = json.dumps(message, separators=(",", ":"))
        await until_done(lambda: self._redis.publish(self._keys.events, payload), "publish")

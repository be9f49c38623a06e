"""Per-job progress in Redis, written in batches: counters, resume marks and failure reasons.

A file's outcome is buffered and reaches Redis in one transaction with many others, every
`flush_interval` or `flush_batch` outcomes, so the hot path never waits on a round trip.
What a crash loses is uploaded again (at least once, never zero times).

Counters are exact by construction: an entry counts only when its resume mark goes from unset
to set, decided in the same script that sets it. So a batch sent again (its reply was lost),
or two runs of one job at once (a reservation lost unnoticed, a TTR that ran out), can upload
a file twice but never count it twice. A failure counts once per entry, and is taken back if
another run then uploads the entry.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Literal, cast

import redis.asyncio as aioredis
import redis.exceptions
import structlog
from redis.asyncio.client import Pipeline
from redis.typing import EncodableT

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

# KEYS: the job's hash, marks, failed entries (index -> label), failed reasons (label -> why).
# ARGV: now, then four per outcome: index, kind ('u'ploaded, 's'kipped, 'f'ailed), then bytes
# and '' for a success, or label and reason for a failure.
_APPLY = """
local h, marks, failing, reasons = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local up, sk, fl, by = 0, 0, 0, 0
local any_failing = redis.call('EXISTS', failing) == 1
for i = 2, #ARGV, 4 do
  local index, kind = tonumber(ARGV[i]), ARGV[i + 1]
  if kind == 'f' then
    if redis.call('GETBIT', marks, index) == 0 then
      redis.call('HSET', reasons, ARGV[i + 2], ARGV[i + 3])
      if redis.call('HSETNX', failing, index, ARGV[i + 2]) == 1 then
        fl = fl + 1
        any_failing = true
      end
    end
  elseif redis.call('SETBIT', marks, index, 1) == 0 then
    if kind == 'u' then
      up = up + 1
      by = by + tonumber(ARGV[i + 2])
    else
      sk = sk + 1
    end
    local label = any_failing and redis.call('HGET', failing, index)
    if label then
      redis.call('HDEL', failing, index)
      redis.call('HDEL', reasons, label)
      fl = fl - 1
    end
  end
end
local names, counts = {'uploaded', 'skipped', 'failed', 'bytes'}, {up, sk, fl, by}
for i = 1, 4 do
  if counts[i] ~= 0 then redis.call('HINCRBY', h, names[i], counts[i]) end
end
redis.call('HSET', h, 'updated_at', ARGV[1])
"""

# Seconds two estimates of one job's put time (now - beanstalkd's `age`) may differ by: `age` is
# whole seconds, and each daemon reads it with its own clock.
SAME_DELIVERY_SLACK = 5
# Seconds since another worker's last progress write within which its run may still be alive.
OVERLAP_WINDOW = 30

# KEYS: the job's hash, marks, applied batches (older versions), failed reasons, directory walk
# digests, failed entries.
# ARGV: worker, now, total ('' if unknown), beanstalkd address, job id, put time, tube, slack,
# overlap window. Returns {mode, overlap}: mode 'fresh' (a new run of a finished job's ID),
# 'resume', or 'cancelled' (the same delivery of a run that was cancelled: it stays so);
# overlap '' or "worker seconds" when another worker's run wrote progress that recently.
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
    return {'cancelled', ''}
  end
end
if mode == 'fresh' then
  redis.call('DEL', h, KEYS[2], KEYS[3], KEYS[5])
end
local other, seen = redis.call('HGET', h, 'worker'), tonumber(redis.call('HGET', h, 'updated_at') or '')
local overlap = ''
if mode == 'resume' and redis.call('HGET', h, 'state') == 'running' and other and other ~= ARGV[1]
    and seen and tonumber(ARGV[2]) - seen <= tonumber(ARGV[9]) then
  overlap = other .. ' ' .. (tonumber(ARGV[2]) - seen)
end
redis.call('HSET', h, 'state', 'running', 'worker', ARGV[1], 'updated_at', ARGV[2], 'failed', 0)
if ARGV[3] ~= '' then redis.call('HSET', h, 'total', ARGV[3]) end
if ARGV[4] ~= '' then
  redis.call('HSET', h, 'beanstalkd', ARGV[4], 'beanstalk_job', ARGV[5], 'put_at', ARGV[6], 'tube', ARGV[7])
end
for _, name in ipairs({'uploaded', 'skipped', 'bytes'}) do redis.call('HSETNX', h, name, 0) end
redis.call('HSETNX', h, 'started_at', ARGV[2])
redis.call('HDEL', h, 'finished_at')
redis.call('DEL', KEYS[4], KEYS[6])
for i = 1, 3 do redis.call('PERSIST', KEYS[i]) end
return {mode, overlap}
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


class Progress:
    def __init__(self, redis: aioredis.Redis, keys: Keys, config: RedisConfig, worker: str) -> None:
        self._redis = redis
        self._keys = keys
        self._config = config
        self._worker = worker
        self._apply = redis.register_script(_APPLY)
        self._start_script = redis.register_script(_START)
        # Per job, four script arguments per outcome (see _APPLY); a batch stays in `_unsent`
        # until Redis acknowledges it, and sending it again counts nothing twice.
        self._unsent: list[dict[str, list[EncodableT]]] = []
        self._pending: dict[str, list[EncodableT]] = defaultdict(list)
        self._buffered = 0
        self._full = asyncio.Event()
        self._flush_lock = asyncio.Lock()
        self._stopping = False

    def record(
        self, job_id: str, index: int, outcome: Outcome, nbytes: int = 0, label: str = "", reason: str = ""
    ) -> None:
        """Buffer one file's outcome; failed files are not marked, so a re-run retries them."""
        if outcome == "failed":
            self._pending[job_id] += (index, "f", label, reason[:MAX_REASON].replace("\n", " "))
        else:
            self._pending[job_id] += (index, outcome[0], nbytes, "")
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
        return self._buffered + sum(len(args) // 4 for batch in self._unsent for args in batch.values())

    def stop(self) -> None:
        self._stopping = True
        self._full.set()

    async def flush(self) -> None:
        """Write what is buffered. A batch stays queued until Redis has acknowledged it, also
        when this is cancelled mid-write; sending it again counts nothing twice."""
        async with self._flush_lock:
            if self._pending:
                self._full.clear()
                self._unsent.append(self._pending)
                self._pending = defaultdict(list)
                self._buffered = 0
            while self._unsent:
                try:
                    await until_done(functools.partial(self._write, self._unsent[0]), "flush progress")
                except redis.exceptions.ResponseError as exc:
                    # A key of another type (see check_keys): the transaction applied all the
                    # rest; sending it again would fail the same way.
                    log.error("progress_write_refused", error=str(exc))
                self._unsent.pop(0)

    async def _write(self, batch: dict[str, list[EncodableT]]) -> None:
        now = int(time.time())
        async with self._redis.pipeline(transaction=True) as pipe:
            for job_id, args in batch.items():
                k = self._keys
                keys = [k.job(job_id), k.marks(job_id), k.failing(job_id), k.failed(job_id)]
                await self._apply(keys=keys, args=[now, *args], client=pipe)
            await pipe.execute()

    async def check_keys(self, job_id: str) -> None:
        """Refuse a job whose progress keys hold something else (a producer's mistake): every
        write to them would fail, so nothing could be recorded."""
        expected = {
            self._keys.job(job_id): "hash",
            self._keys.failed(job_id): "hash",
            self._keys.applied(job_id): "hash",
            self._keys.failing(job_id): "hash",
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
            self._keys.failing(job_id),
        ]
        args = [self._worker, now, "" if total is None else total, *who, SAME_DELIVERY_SLACK, OVERLAP_WINDOW]
        reply = await until_done(lambda: self._start_script(keys=keys, args=args), "start job")
        mode, overlap = (text(part) for part in reply)
        if overlap:
            # Counters stay exact (see _APPLY); the log says why files may be uploaded twice.
            other, seconds = overlap.rsplit(" ", 1)
            log.warning("job_run_overlap", job_id=job_id, other_worker=other, seconds_since=int(seconds),
                        reason="another worker's run of this job wrote progress moments ago")
        return cast(Start, mode)

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

    async def finish(self, job_id: str, seconds: float, *, cancelled: bool = False) -> dict[str, object]:
        """Flush, decide and settle the final state, start the expiry clock; return the
        completion message. The verdict is Redis's, not this run's: another run of the job
        may have uploaded a file this one failed."""
        await self.flush()
        state: State = "cancelled" if cancelled else await self._verdict(job_id)
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
                    self._keys.failing(job_id),
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
        """Failed when a file counts as failed, or the list itself could not be read."""

        async def call() -> list[object]:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.hget(self._keys.job(job_id), "failed")
                pipe.hexists(self._keys.failed(job_id), LIST_LABEL)
                result: list[object] = await pipe.execute()
                return result

        failed, unreadable = await until_done(call, "read verdict")
        return "failed" if int(failed or 0) > 0 or unreadable else "done"  # type: ignore[call-overload]

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

"""Per-job progress in Redis, written in batches: counters, resume marks and failure reasons.

A file's outcome is buffered and reaches Redis in one pipeline with many others (a script per
job, per node on a cluster), every `flush_interval` or `flush_batch` outcomes, so the hot path
never waits on a round trip. What a crash loses is uploaded again (at least once, never zero
times).

Counters are exact by construction: an entry counts only when its resume mark goes from unset
to set, decided in the same script that sets it (see progresslua.APPLY). So a batch sent again
(its reply was lost), or two runs of one job at once (a reservation lost unnoticed, a TTR that
ran out), can upload a file twice but never count it twice. A failure counts once per entry,
and is taken back if another run then uploads the entry. A failover that loses acknowledged
writes is made good by the final write, from what the run keeps in memory (`Ledger`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, cast

import redis.asyncio as aioredis
import redis.exceptions
import structlog
from redis.asyncio.client import Pipeline

from uploader.config import RedisConfig
from uploader.errors import BadJobError
from uploader.finalwrite import LIST_LABEL, FinalWrite
from uploader.finalwrite import State as State
from uploader.progresslua import APPLY_SCRIPT, SCRIPTS, START_SCRIPT, Batch, Ledger
from uploader.redisio import Keys, is_cluster, text, until_done

log = structlog.get_logger("uploader.progress")

Outcome = Literal["uploaded", "skipped", "failed"]
MAX_REASON = 500
COMPLETION_COUNTS = ("total", "uploaded", "skipped", "failed", "bytes")  # in completion messages

# Seconds two estimates of one job's put time (now - beanstalkd's `age`) may differ by: `age` is
# whole seconds, and each daemon reads it with its own clock.
SAME_DELIVERY_SLACK = 5
# Seconds since another worker's last progress write within which its run may still be alive.
OVERLAP_WINDOW = 30
# Outcomes per job in a batch below which a full buffer does not force an early write, and
# the interval's write waits, up to SPARSE_WAIT intervals (and at most a second longer).
PER_JOB_BATCH = 256
SPARSE_WAIT = 10

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
        self._legacy = not is_cluster(redis)  # where pre-0.5 key names can still be found
        # A batch stays in `_unsent` until Redis acknowledges it; sending it again counts
        # nothing twice. What each running job settled stays in its ledger until it finishes.
        self._unsent: list[dict[str, Batch]] = []
        self._pending: dict[str, Batch] = defaultdict(Batch)
        self._ledgers: dict[str, Ledger] = {}
        self._buffered = 0
        self._full = asyncio.Event()
        self._flush_lock = asyncio.Lock()
        self._stopping = False
        self._final = FinalWrite(redis, keys, config, self._write, self._scripted)

    def record(
        self, job_id: str, index: int, outcome: Outcome, nbytes: int = 0, label: str = "", reason: str = ""
    ) -> None:
        """Buffer one file's outcome; failed files are not marked, so a re-run retries them."""
        batch = self._pending[job_id]
        ledger = self._ledgers.get(job_id)
        if outcome == "failed":
            reason = reason[:MAX_REASON].replace("\n", " ")
            batch.failures += (index, label, reason)
            if ledger is not None:
                ledger.failures[index] = (label, reason)
        else:
            size = nbytes if outcome == "uploaded" else -1
            batch.success(index, size)
            if ledger is not None:
                ledger.success(index, size)
        self._buffered += 1
        # Sized to the load: a job's script costs Redis about as much as 30 outcomes, so an
        # early write waits for enough outcomes per job in the batch to pay for it.
        if self._buffered >= max(self._config.flush_batch, PER_JOB_BATCH * len(self._pending)):
            self._full.set()

    def forget(self, job_id: str) -> None:
        """The run is over without a final write (released, lost): its ledger goes."""
        self._ledgers.pop(job_id, None)

    async def run(self) -> None:
        """Flush every interval, or sooner when the buffer is full, until `stop()`.

        Stopping is a flag rather than a cancellation, so a pipeline is never cut in half.
        """
        interval = self._config.flush_interval
        longest = min(SPARSE_WAIT * interval, max(1.0, interval))
        waited = 0.0
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await self._full.wait()
            waited += interval
            if self._sparse and waited < longest and not self._full.is_set() and not self._stopping:
                continue
            waited = 0.0
            await self.flush()

    @property
    def _sparse(self) -> bool:
        """Few outcomes for many jobs: a write would cost Redis a script per job for a handful
        of entries each, so it waits a little longer (a job that finishes writes its own)."""
        return self._buffered < PER_JOB_BATCH * len(self._pending)

    @property
    def unsaved(self) -> int:
        """Outcomes not yet acknowledged by Redis."""
        return self._buffered + sum(len(b) for batch in self._unsent for b in batch.values())

    def stop(self) -> None:
        self._stopping = True
        self._full.set()

    async def flush(self, job_id: str | None = None) -> None:
        """Write what is buffered, or only one job's part of it (a job that finishes need not
        write every other job's outcomes early). A batch stays queued until Redis has
        acknowledged it, also when this is cancelled mid-write; sending it again counts
        nothing twice."""
        async with self._flush_lock:
            if job_id is None and self._pending:
                self._full.clear()
                self._unsent.append(self._pending)
                self._pending = defaultdict(Batch)
                self._buffered = 0
            elif job_id is not None and (own := self._pending.pop(job_id, None)):
                self._unsent.append({job_id: own})
                self._buffered -= len(own)
            while self._unsent:
                try:
                    await until_done(functools.partial(self._write, self._unsent[0]), "flush progress")
                except redis.exceptions.ResponseError as exc:
                    # A key of another type (see start): the rest of the batch is applied;
                    # sending it again would fail the same way.
                    log.error("progress_write_refused", error=str(exc))
                self._unsent.pop(0)

    async def _write(self, batch: dict[str, Batch]) -> list[int]:
        """Apply each job's outcomes (one script per job, pipelined, per node on a cluster),
        then bring the failed reasons in line; returns each job's failed count."""
        now = int(time.time())
        jobs = list(batch.items())

        replies = await self._scripted(lambda pipe: [
            APPLY_SCRIPT(pipe, self._apply_keys(job_id), outcomes.args(now)) for job_id, outcomes in jobs
        ])
        async with self._redis.pipeline(transaction=False) as pipe:
            for (job_id, outcomes), (taken, recorded, _) in zip(jobs, replies, strict=True):
                if reasons := outcomes.reasons(recorded):
                    pipe.hset(self._keys.failed(job_id), mapping=reasons)  # type: ignore[arg-type]
                if taken:
                    pipe.hdel(self._keys.failed(job_id), *taken)
            if len(pipe):
                await pipe.execute()
        return [int(failed) for _, _, failed in replies]

    async def _scripted(self, queue: Callable[[Pipeline], object]) -> list[Any]:
        """Run a pipeline of script calls; on NOSCRIPT load the scripts and run it again."""
        for attempt in (1, 2):
            try:
                async with self._redis.pipeline(transaction=False) as pipe:
                    queue(pipe)
                    replies: list[Any] = await pipe.execute()
                    return replies
            except redis.exceptions.NoScriptError:
                if attempt == 2:
                    raise
                for script in SCRIPTS:
                    await script.load(self._redis)
        raise AssertionError("unreachable")

    def _apply_keys(self, job_id: str) -> list[str]:
        k = self._keys
        return [k.job(job_id), k.marks(job_id), k.failing(job_id)]

    def _script_keys(self, job_id: str) -> list[str]:
        """The job's hash and internal keys, as START and FINISH take them."""
        return [self._keys.job(job_id), *self._keys.internal(job_id)]

    async def check_keys(self, job_id: str) -> None:
        """Refuse a job whose failed reasons key holds something else (a producer's mistake):
        every write to it would fail. START checks the keys of the job's own slot."""
        key = self._keys.failed(job_id)
        found = text(await until_done(lambda: self._redis.type(key), "check keys"))
        if found not in ("none", "hash"):
            raise BadJobError(_wrong_type(key, found))

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
        keys = self._script_keys(job_id) + (list(self._keys.legacy(job_id)) if self._legacy else [])
        args = [self._worker, now, "" if total is None else total, *who, SAME_DELIVERY_SLACK, OVERLAP_WINDOW]
        reply, _ = await until_done(lambda: self._scripted(lambda pipe: [
            START_SCRIPT(pipe, keys, args),
            pipe.delete(self._keys.failed(job_id)),
        ]), "start job")
        mode, *rest = (text(part) for part in reply)
        if mode == "badkey":
            raise BadJobError(_wrong_type(*rest))
        self._ledgers[job_id] = Ledger()
        if overlap := rest[0]:
            # Counters stay exact (see APPLY); the log says why files may be uploaded twice.
            other, seconds = overlap.rsplit(" ", 1)
            log.warning("job_run_overlap", job_id=job_id, other_worker=other, seconds_since=int(seconds),
                        reason="another worker's run of this job wrote progress moments ago")
        return cast(Start, mode)

    async def set_total(self, job_id: str, total: int) -> None:
        await until_done(lambda: self._redis.hset(self._keys.job(job_id), "total", total), "set total")

    async def set_state(self, job_id: str, state: State) -> None:
        await self.flush(job_id)
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

    # --- the final write ---

    async def finish(
        self, job_id: str, seconds: float, *, cancelled: bool = False, total: int | None = None
    ) -> dict[str, object]:
        """Flush, decide and settle the final state, start the expiry clocks; return the
        completion message. The verdict is Redis's, not this run's: another run of the job
        may have uploaded a file this one failed.

        The whole write is idempotent and runs again, from the ledger, after any outage on
        the way: so what a failover took (acknowledged, never replicated) is written again,
        and in Sentinel mode a replica has the result before the job is settled."""
        await self.flush(job_id)
        ledger = self._ledgers.pop(job_id, None) or Ledger()
        stored = await until_done(lambda: self._final(job_id, ledger, cancelled, total), "finish job")
        counts = {name: int(stored.get(name.encode(), 0)) for name in COMPLETION_COUNTS}
        return {"id": job_id, "state": text(stored[b"state"]), **counts, "seconds": round(seconds, 3)}

    async def publish(self, message: dict[str, object]) -> None:
        payload = json.dumps(message, separators=(",", ":"))
        await until_done(lambda: self._redis.publish(self._keys.events, payload), "publish")


def _wrong_type(key: str, found: str) -> str:
    return (f"{key} is a Redis {found}, where the daemon keeps this job's progress: "
            "delete it or use another job ID")



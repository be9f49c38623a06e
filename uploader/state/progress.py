"""Per-job progress in Redis, written in batches: counters, resume marks and failure reasons.

A file's outcome is buffered and reaches Redis in one pipeline with many others (a script per
job, per node on a cluster), every `flush_interval` or `flush_batch` outcomes, so the hot path
never waits on a round trip. What a crash loses is uploaded again (at least once, never zero
times).

Counters are exact by construction: an entry counts only when its resume mark goes from unset
to set, decided in the same script that sets it (see scripts.APPLY). So a batch sent again
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
from dataclasses import dataclass
from typing import Literal

import redis.asyncio as aioredis
import redis.exceptions
import structlog

from uploader.config.settings import RedisConfig
from uploader.redisio import Keys, text, until_done
from uploader.source.base import Delivery
from uploader.state.finish import LIST_LABEL, Closing, FinalWrite, State
from uploader.state.ledger import Batch, Ledger
from uploader.state.scripts import APPLY_SCRIPT, scripted
from uploader.state.start import Start, Starts

log = structlog.get_logger("uploader.state.progress")

Outcome = Literal["uploaded", "skipped", "failed"]
MAX_REASON = 500
COMPLETION_COUNTS = ("total", "uploaded", "skipped", "failed", "bytes")  # in completion messages

# Outcomes per job in a batch below which a full buffer does not force an early write, and
# the interval's write waits, up to SPARSE_WAIT intervals (and at most a second longer).
PER_JOB_BATCH = 256
SPARSE_WAIT = 10

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
        # A batch stays in `_unsent` until Redis acknowledges it; sending it again counts
        # nothing twice. What each running job settled stays in its ledger until it finishes.
        self._unsent: list[dict[str, Batch]] = []
        self._pending: dict[str, Batch] = defaultdict(Batch)
        self._ledgers: dict[str, Ledger] = {}
        self.starts = Starts(redis, keys, worker)
        self._list_failed: set[str] = set()  # runs whose list could not be read to the end
        self._buffered = 0
        self._full = asyncio.Event()
        self._flush_lock = asyncio.Lock()
        self._stopping = False
        self._final = FinalWrite(redis, keys, config, self._write)

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
        self.starts.written(job_id)
        self._list_failed.discard(job_id)

    def start_lazily(self, job_id: str, total: int | None, delivery: Delivery | None) -> None:
        """A run of a job that had no keys (probe.py): nothing to reset or resume, so its
        start is written with its first outcomes, or by `ensure_started` before other writes."""
        self.starts.lazily(job_id, total, delivery)
        self._ledgers[job_id] = Ledger()

    async def start(self, job_id: str, total: int | None, delivery: Delivery | None = None) -> Start:
        """START (see start.py); the run's ledger begins."""
        mode = await self.starts.start(job_id, total, delivery)
        self._ledgers[job_id] = Ledger()
        return mode

    async def ensure_started(self, job_id: str) -> None:
        """Write a lazy start now, with START (a write that is not APPLY or CLOSE follows)."""
        if (lazy := self.starts.written(job_id)) is not None:
            await self.starts.start(job_id, lazy.total, lazy.delivery)

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
            # A lazy start older than an interval is written even with no outcome: a run that
            # lasts shows `running` within `flush_interval`.
            overdue = self.starts.overdue(interval)
            early = self._full.is_set() or self._stopping or overdue
            if self._sparse and waited < longest and not early:
                continue
            for job_id in overdue:
                self._pending[job_id]  # an empty batch: the start alone is written
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
                self._unsent.append(self._marked(self._pending))
                self._pending = defaultdict(Batch)
                self._buffered = 0
            elif job_id is not None and (own := self._pending.pop(job_id, None)):
                self._unsent.append(self._marked({job_id: own}))
                self._buffered -= len(own)
            while self._unsent:
                try:
                    await until_done(functools.partial(self._write, self._unsent[0]), "flush progress")
                except redis.exceptions.ResponseError as exc:
                    # A key of another type (see start): the rest of the batch is applied;
                    # sending it again would fail the same way.
                    log.error("progress_write_refused", error=str(exc))
                else:
                    self._acknowledged(self._unsent[0])
                self._unsent.pop(0)

    def _marked(self, batches: dict[str, Batch]) -> dict[str, Batch]:
        """Each batch knows how much of its job's ledger it completes (ledgers grow in the
        order outcomes are recorded, so everything before it is in earlier batches)."""
        for job_id, batch in batches.items():
            if (ledger := self._ledgers.get(job_id)) is not None:
                batch.upto = len(ledger.settled)
        return batches

    def _acknowledged(self, batches: dict[str, Batch]) -> None:
        for job_id, batch in batches.items():
            if (ledger := self._ledgers.get(job_id)) is not None:
                ledger.acked = max(ledger.acked, batch.upto)

    async def _write(self, batch: dict[str, Batch]) -> dict[str, int]:
        """Apply each job's outcomes (one script per job, pipelined, per node on a cluster),
        then bring the failed reasons in line; returns each job's failed count."""
        now = int(time.time())
        replies = dict(zip(batch, await scripted(self._redis, lambda pipe: [
            APPLY_SCRIPT(pipe, self._apply_keys(job_id), [*self.starts.args(job_id), *outcomes.args(now)])
            for job_id, outcomes in batch.items()
        ]), strict=True))
        failed: dict[str, int] = {}
        if again := [job_id for job_id, reply in replies.items() if reply[2] == -1]:
            # A lazy start found another run's hash: START decides, then the outcomes go again.
            for job_id in again:
                await self.ensure_started(job_id)
                del replies[job_id]
            failed = await self._write({job_id: batch[job_id] for job_id in again})
        async with self._redis.pipeline(transaction=False) as pipe:
            for job_id, (taken, recorded, count) in replies.items():
                self.starts.written(job_id)
                failed[job_id] = int(count)
                if reasons := batch[job_id].reasons(recorded):
                    pipe.hset(self._keys.failed(job_id), mapping=reasons)  # type: ignore[arg-type]
                if taken:
                    pipe.hdel(self._keys.failed(job_id), *taken)
            if len(pipe):
                await pipe.execute()
        return failed

    def _apply_keys(self, job_id: str) -> list[str]:
        k = self._keys
        return [k.job(job_id), k.marks(job_id), k.failing(job_id)]

    async def set_total(self, job_id: str, total: int) -> None:
        if self.starts.set_total(job_id, total):
            return  # written with the lazy start
        await until_done(lambda: self._redis.hset(self._keys.job(job_id), "total", total), "set total")

    async def set_state(self, job_id: str, state: State) -> None:
        await self.flush(job_id)
        if job_id in self.starts:
            return  # nothing of the run was written: no hash, as before it started
        key = self._keys.job(job_id)
        await until_done(
            lambda: self._redis.hset(key, mapping={"state": state, "updated_at": int(time.time())}),
            "set state",
        )

    async def fail_list(self, job_id: str, reason: str) -> None:
        """The job's list of files cannot be read (any more): the reason goes where failed
        files' reasons go, under `<files list>`, and the job ends failed."""
        self._list_failed.add(job_id)
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
        self, job_id: str, seconds: float, *, cancelled: bool = False, total: int | None = None,
        walked: bool = False,
    ) -> dict[str, object]:
        """Decide and settle the final state, start the expiry clocks, publish the completion
        message and return it. The verdict is Redis's, not this run's: another run of the job
        may have uploaded a file this one failed.

        The whole write is idempotent and runs again, from the ledger, after any outage on
        the way: so what a failover took (acknowledged, never replicated) is written again,
        and in Sentinel mode a replica has the result before the job is settled. A run whose
        ledger fits in one call, with no failure, finishes in one round trip (CLOSE)."""
        ledger = self._ledgers.get(job_id) or Ledger()
        if job_id not in self._list_failed and self._final.closable(ledger):
            closing = Closing(job_id, ledger, self.starts.args(job_id), cancelled, total, seconds, walked)
            async with self._flush_lock:
                self._drop(job_id)  # the ledger carries every outcome of the run
                message = await until_done(lambda: self._final.close(closing), "finish job")
            if message is not None:
                self.forget(job_id)
                return message
        await self.ensure_started(job_id)
        await self.flush(job_id)
        ledger = self._ledgers.get(job_id) or Ledger()
        stored = await until_done(lambda: self._final(job_id, ledger, cancelled, total), "finish job")
        self.forget(job_id)
        counts = {name: int(stored.get(name.encode(), 0)) for name in COMPLETION_COUNTS}
        message = {"id": job_id, "state": text(stored[b"state"]), **counts, "seconds": round(seconds, 3)}
        await self.publish(message)
        return message

    def _drop(self, job_id: str) -> None:
        """The job's outcomes not yet written, left to its final write."""
        if own := self._pending.pop(job_id, None):
            self._buffered -= len(own)
        for batch in self._unsent:
            batch.pop(job_id, None)
        self._unsent = [batch for batch in self._unsent if batch]

    async def publish(self, message: dict[str, object]) -> None:
        payload = json.dumps(message, separators=(",", ":"))
        await until_done(lambda: self._redis.publish(self._keys.events, payload), "publish")

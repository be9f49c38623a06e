"""Fair, bounded fan-out of files over the active jobs, and the drain that ends it.

One dispatcher takes an upload slot *before* it creates a file's task, so there are never more
file tasks than slots, whatever the job sizes. It picks the next file round-robin over the
active jobs (weighted by tube), so a small job that arrives behind a huge one is not starved.
Each job keeps at most one page of its manifest ahead of what is being dispatched.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import redis.asyncio as aioredis
import structlog

from uploader.aimd import Aimd
from uploader.beanstalk import BeanstalkError, ConnectionLost, NotFound
from uploader.config import Config, UploadConfig
from uploader.contenttype import ContentTypes
from uploader.errors import BadJobError, FileError, PermanentFileError, StoreUnavailableError
from uploader.files import Root, locate, open_source
from uploader.health import Health
from uploader.limits import ByteBudget, Slots
from uploader.manifest import (
    BadEntry,
    Entry,
    InlineManifest,
    JobSpec,
    Manifest,
    RedisManifest,
    key_problem,
    parse_body,
    parse_entry,
)
from uploader.metrics import Metrics
from uploader.progress import Counts, Delivery, Outcome, Progress, State
from uploader.ratelimit import RateLimiter
from uploader.redisio import Keys, until_done
from uploader.retry import RetryPolicy, backoff_delays
from uploader.source import HeldJob, Source
from uploader.stores.base import PutRequest, PutResult, Store, already_stored
from uploader.walk import DirectoryExpander

log = structlog.get_logger("uploader.scheduler")

_JobAction = Callable[[HeldJob], Awaitable[None]]
_Put = Callable[[bytes], Awaitable[int]]

CANCEL_POLL = 1.0  # seconds between checks of a job's cancel key
DUPLICATE_DELAY = 5  # seconds a job waits in beanstalkd when its ID is already running here
STORE_PROBE_FIRST = 0.5  # seconds before the first re-check of a store that refused writes
STORE_PROBE_CAP = 30.0  # seconds between checks at the most
STORE_PROBE_TIMEOUT = 10.0  # seconds one check may take


class JobRun:
    """One held job: its queue of entries, what is in flight, and why it stopped."""

    def __init__(self, held: HeldJob, spec: JobSpec, manifest: Manifest) -> None:
        self.held = held
        self.id = spec.id
        self.manifest = manifest
        self.weight = held.weight
        self.credit = held.weight
        self.pending: deque[Entry] = deque()
        self.next_page: list[Entry] | None = None
        self.want_page = asyncio.Event()
        self.want_page.set()
        self.loaded = False
        self.inflight = 0
        self.counts = Counts()
        self.total = 0
        self.cancelled = False
        self.lost = False
        self.draining = False
        self.paused = False  # the store is down: in-flight uploads end, then the job goes back
        self.unsettled = 0  # entries taken whose upload ended with no outcome (cut, store down)
        self.idle = asyncio.Event()
        self.started = time.monotonic()

    @property
    def complete(self) -> bool:
        return (
            self.loaded
            and not self.pending
            and self.next_page is None
            and self.inflight == 0
            and self.unsettled == 0
        )

    @property
    def stopped(self) -> bool:
        """No more files are handed out: cancelled, lost, draining or paused."""
        return self.cancelled or self.lost or self.draining or self.paused

    def take(self) -> Entry | None:
        if self.stopped:
            return None
        if not self.pending and self.next_page is not None:
            self.pending.extend(self.next_page)
            self.next_page = None
            self.want_page.set()
        return self.pending.popleft() if self.pending else None

    def stop(self, why: str) -> None:
        """Stop handing out files; in-flight ones finish. `why`: cancelled, lost, draining or
        paused (the last two keep what is pending: the job goes back and resumes)."""
        setattr(self, why, True)
        if why not in ("draining", "paused"):
            self.pending.clear()
            self.next_page = None
        self.want_page.set()
        self.check_idle()

    def check_idle(self) -> None:
        if self.inflight == 0 and (self.complete or self.stopped):
            self.idle.set()


@dataclass(slots=True)
class Summary:
    uploaded: int = 0
    skipped: int = 0
    failed: int = 0
    retried: int = 0
    bytes: int = 0
    jobs_finished: int = 0
    jobs_released: int = 0
    jobs_buried: int = 0
    uploads_cancelled: int = 0  # cut by the drain deadline or a second signal


class Scheduler:
    def __init__(
        self,
        config: Config,
        source: Source,
        store: Store,
        redis: aioredis.Redis,
        progress: Progress,
        metrics: Metrics,
        completions: CompletionSink,
        retry: RetryPolicy | None = None,
        health: Health | None = None,
    ) -> None:
        self.config = config
        self.source = source
        self.store = store
        self.redis = redis
        self.progress = progress
        self.metrics = metrics
        self.completions = completions
        self.health = health or Health()
        self.keys = Keys(config.redis.key_prefix)
        self.retry = retry or RetryPolicy(config.upload.retry)
        self.roots = tuple(Root.of(r) for r in config.upload.allowed_roots)
        self.slots = Slots(config.upload.concurrency)
        self.aimd = Aimd(self.slots, config.upload, metrics)  # resizes slots on store throttling
        self.budget = ByteBudget(config.upload.max_inflight_bytes)
        self.limiter = RateLimiter(config.limits)
        self.room = asyncio.Semaphore(config.source.max_active_jobs)
        self.runs: dict[str, JobRun] = {}
        self.summary = Summary()
        self._ring: deque[JobRun] = deque()
        self._wake = asyncio.Event()
        self._uploads: set[asyncio.Task[None]] = set()
        self._jobs: set[asyncio.Task[None]] = set()
        self._no_jobs = asyncio.Event()
        self._no_jobs.set()
        self._tg: asyncio.TaskGroup | None = None
        self._store_watch: asyncio.Task[None] | None = None
        self._store_probe: asyncio.Future[str | None] | None = None
        self.draining = False
        metrics.slots.set(config.upload.concurrency)
        # Read at scrape time: no gauge lock taken twice per file.
        metrics.inflight.set_function(lambda: len(self._uploads))
        self._content_types = ContentTypes()

    # --- the whole life of the pipeline ---

    async def run(self, stop: asyncio.Event, force: asyncio.Event) -> Summary:
        """Work until `stop` is set, then drain: `force` (a second signal) cuts the wait short."""
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            flusher = tg.create_task(self.progress.run(), name="progress-flusher")
            reservers = [
                tg.create_task(
                    self.source.reserve_forever(a, self.room, self._accept, self.health.wait_clear),
                    name=f"reserve {a}",
                )
                for a in self.config.source.addresses
            ]
            dispatcher = tg.create_task(self._dispatch(), name="dispatcher")
            self._store_watch = tg.create_task(self._watch_store(), name="store check")
            await stop.wait()

            # Phase 1: take no new jobs and start no new files.
            self.draining = True
            self.metrics.draining.set(1)
            for task in (*reservers, dispatcher, self._store_watch):
                task.cancel()
            for run in self.runs.values():
                run.stop("draining")
            log.info(
                "drain_started",
                active_jobs=len(self.runs),
                inflight=len(self._uploads),
                deadline=self.config.daemon.drain_timeout,
            )

            # Phase 2: in-flight uploads finish, until the deadline or a second signal.
            await _first(self._all_uploads_done(), force.wait(), timeout=self.config.daemon.drain_timeout)

            # Phase 3: cancel what is left; unrecorded files are uploaded again on resume.
            cut = len(self._uploads)
            for task in list(self._uploads):
                task.cancel()

            # Phase 4: every job settles: finished, or released for another instance. Settling
            # writes progress to Redis first; if Redis is down that waits, but only until
            # `release_timeout`: then the jobs go back as they are, and their unrecorded files
            # are uploaded again on resume (at least once, never lost).
            deadline = time.monotonic() + self.config.daemon.release_timeout

            def left() -> float:
                return max(0.0, deadline - time.monotonic())

            if not await _first(self._no_jobs.wait(), timeout=left()):
                log.warning("release_forced", jobs=len(self._jobs),
                            reason="Redis unreachable: jobs released without saving their progress")
                for task in list(self._jobs):
                    task.cancel()  # each job releases itself as it goes
                await self._no_jobs.wait()
            self.progress.stop()
            await _first(flusher, timeout=left())
        # At least a moment for the last few outcomes, also when the jobs took all the time.
        if self.progress.unsaved and not await _first(self.progress.flush(), timeout=max(left(), 0.5)):
            log.warning("progress_unsaved", files=self.progress.unsaved,
                        reason="Redis unreachable: these files are uploaded again when their jobs resume")
        self.summary.uploads_cancelled = cut  # the daemon logs the one summary line
        return self.summary

    async def _all_uploads_done(self) -> None:
        while self._uploads:
            await asyncio.wait(list(self._uploads))

    # --- jobs ---

    async def _accept(self, held: HeldJob) -> None:
        assert self._tg is not None
        task = self._tg.create_task(self._job(held), name=f"job {held.id}")
        self._jobs.add(task)
        self._no_jobs.clear()
        task.add_done_callback(self._job_done)

    def _job_done(self, task: asyncio.Task[None]) -> None:
        self._jobs.discard(task)
        self.room.release()
        if not self._jobs:
            self._no_jobs.set()

    async def _job(self, held: HeldJob) -> None:
        try:
            spec = parse_body(held.body)
        except BadJobError as exc:
            await self._refuse(held, exc)
            return
        if self.draining or not self.health.ok:
            # Taken in the instant the daemon stopped taking work: back at once, untouched.
            log.info("job_returned", job_id=spec.id, beanstalk_job=held.id,
                     reason="draining" if self.draining else self.health.describe())
            await self._settle_with_beanstalk(held, self.source.release)
            return
        if spec.id in self.runs:
            log.warning("job_already_running", job_id=spec.id, beanstalk_job=held.id)
            await self._settle_with_beanstalk(held, lambda h: self.source.release(h, DUPLICATE_DELAY))
            return
        manifest: Manifest = (
            InlineManifest(self.redis, self.keys, spec.id, spec.inline)
            if spec.inline is not None
            else RedisManifest(self.redis, self.keys, spec.id)
        )
        run = JobRun(held, spec, manifest)
        self.runs[run.id] = run
        self.metrics.active_jobs.inc()
        try:
            with structlog.contextvars.bound_contextvars(job_id=run.id):
                await self._work(run)
        except asyncio.CancelledError:
            # A drain that Redis held up past `release_timeout`: the job goes back as it is.
            # Uncancelled while it does, so the release's own timeouts behave as usual.
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            if not held.settled:
                await self._settle_with_beanstalk(held, self.source.release)
                self.summary.jobs_released += 1
                self.metrics.jobs_released.inc()
                log.warning("job_released", job_id=run.id, progress_saved=False, **_fields(run.counts))
            raise
        except Exception:
            # A state of Redis or of the job that no check foresaw: this job stops, buried for
            # an operator to look at; the daemon and every other job go on.
            log.exception("job_crashed", job_id=run.id, beanstalk_job=held.id)
            if not held.settled:
                await self._settle_with_beanstalk(held, self.source.bury)
                self.summary.jobs_buried += 1
        finally:
            del self.runs[run.id]
            self.metrics.active_jobs.dec()

    async def _refuse(self, held: HeldJob, exc: BadJobError) -> None:
        """A job that cannot even start: buried for an operator, the reason in the log."""
        log.error("job_refused", beanstalk_job=held.id, tube=held.tube, reason=str(exc))
        self.summary.jobs_buried += 1
        await self._settle_with_beanstalk(held, self.source.bury)

    async def _work(self, run: JobRun) -> None:
        try:
            await self.progress.check_keys(run.id)
        except BadJobError as exc:
            await self._refuse(run.held, exc)
            return
        delivery = Delivery(run.held.address, run.held.id, run.held.put_at, run.held.tube)
        try:
            run.total = await run.manifest.length()
        except BadJobError as exc:
            await self.progress.start(run.id, 0, delivery)
            await self.progress.fail_job(run.id, "<files list>", str(exc))
            log.error("job_failed", reason=str(exc))
            run.loaded = True
            await self._finish(run)
            return
        mode = await self.progress.start(run.id, run.total, delivery)
        if mode == "cancelled":  # this very delivery was cancelled before: it stays so
            run.loaded = True
            run.stop("cancelled")
            await self._finish(run)
            return
        log.info("job_started", total=run.total, tube=run.held.tube, beanstalk_job=run.held.id, run=mode)
        self._ring.append(run)
        self._wake.set()
        try:
            async with asyncio.TaskGroup() as tg:
                helpers = [
                    tg.create_task(self._load(run)),
                    tg.create_task(self._keep_alive(run)),
                    tg.create_task(self._watch_cancel(run)),
                ]
                await run.idle.wait()
                for task in helpers:
                    task.cancel()
        finally:
            self._ring.remove(run)
        if run.lost:
            await self.progress.flush()
            log.warning(
                "job_lost",
                reason="beanstalkd connection lost; the job is back in its tube",
                **_fields(run.counts),
            )
            await self.source.abandon(run.held)
        elif run.complete or run.cancelled:
            await self._finish(run)
        else:
            await self.progress.set_state(run.id, "queued")
            await self._settle_with_beanstalk(run.held, self.source.release)
            self.summary.jobs_released += 1
            self.metrics.jobs_released.inc()
            log.info("job_released", **_fields(run.counts))

    async def _finish(self, run: JobRun) -> None:
        # Announce only a job still ours: after a beanstalkd restart (or a TTR lapse) it is back
        # in its tube, and the run that holds it next finishes it, so it is announced once.
        try:
            await self.source.touch(run.held)
        except (ConnectionLost, NotFound) as exc:
            await self.progress.flush()
            log.warning("job_lost", reason="reservation lost before the job finished", error=str(exc))
            await self.source.abandon(run.held)
            return
        seconds = time.monotonic() - run.started
        state_guess: State = "cancelled" if run.cancelled else "failed" if run.counts.failed else "done"
        if state_guess == "done":
            # Failures may come from an earlier job-level error recorded in Redis.
            failures = await until_done(lambda: self.redis.hlen(self.keys.failed(run.id)), "hlen")
            state_guess = "failed" if failures else "done"
        message = await self.progress.finish(run.id, state_guess, seconds)
        await self.completions.announce(message)
        if state_guess == "failed":
            await self._settle_with_beanstalk(run.held, self.source.bury)
            self.summary.jobs_buried += 1
        else:
            await self._settle_with_beanstalk(run.held, self.source.delete)
        self.summary.jobs_finished += 1
        self.metrics.jobs.labels(state_guess).inc()
        c = run.counts
        log.info(
            "job_finished",
            state=state_guess,
            total=message["total"],
            uploaded=c.uploaded,
            skipped=c.skipped,
            failed=c.failed,
            bytes=c.bytes,
            seconds=round(seconds, 3),
            files_per_second=round(c.settled / seconds, 1) if seconds > 0 else None,
        )

    async def _settle_with_beanstalk(self, held: HeldJob, action: _JobAction) -> None:
        try:
            await action(held)
        except (ConnectionLost, NotFound) as exc:
            # The reservation is gone with the connection: beanstalkd has the job again, and a
            # re-run resumes from the marks, so nothing is lost, at worst announced twice.
            log.warning("job_settle_failed", beanstalk_job=held.id, error=str(exc))
            await self.source.abandon(held)
        except BeanstalkError as exc:
            log.error("job_settle_failed", beanstalk_job=held.id, error=str(exc))
            await self.source.abandon(held)

    async def _load(self, run: JobRun) -> None:
        """Fetch pages of the manifest, one ahead of dispatch, until the list ends."""
        size = self.config.redis.page_size
        start = 0
        listed = run.total  # the list's length at start: directories' files are numbered after it
        dirs = (
            DirectoryExpander(self.redis, self.keys, run.id, listed, size, self.config.redis.progress_ttl)
            if self.config.upload.directories
            else None
        )
        try:
            while True:
                await run.want_page.wait()
                if run.stopped:
                    return
                page = await run.manifest.page(start, size)
                if page.cancelled:
                    log.info("job_cancel_requested")
                    run.stop("cancelled")
                    return
                entries: list[Entry] = []
                for offset, raw in enumerate(page.entries):
                    index = start + offset
                    if page.is_marked(index):
                        continue
                    entry = parse_entry(index, raw)
                    if isinstance(entry, BadEntry):
                        self._record(run, index, "failed", 0, entry.label, entry.reason)
                    else:
                        entries.append(entry)
                start += len(page.entries)
                if dirs is not None:
                    entries = await self._expand(run, dirs, entries)
                    if run.stopped:
                        return
                if entries:
                    run.next_page = entries
                    run.want_page.clear()
                    self._wake.set()
                if len(page.entries) < size:
                    break
        except BadJobError as exc:
            await self.progress.fail_job(run.id, "<files list>", str(exc))
            run.counts.failed += 1
            log.error("manifest_unreadable", reason=str(exc))
        if start != listed:
            run.total += start - listed
            await self.progress.set_total(run.id, run.total)
        run.loaded = True
        run.check_idle()

    async def _expand(self, run: JobRun, dirs: DirectoryExpander, entries: list[Entry]) -> list[Entry]:
        """Hand on each directory entry's files chunk by chunk, each chunk once the one before
        is taken (as pages are); returns the page's other entries, still to be handed on."""
        roots = await dirs.directories(entries, self.roots)
        if not any(roots):
            return entries
        plain: list[Entry] = []
        for entry, root in zip(entries, roots, strict=True):
            if root is None:
                plain.append(entry)
                continue
            async with contextlib.aclosing(dirs.expand(entry, root)) as chunks:
                async for chunk in chunks:
                    for index, label, reason in chunk.failures:
                        self._record(run, index, "failed", 0, label, reason)
                    if chunk.total_delta:
                        run.total += chunk.total_delta
                        await self.progress.set_total(run.id, run.total)
                    for batch in (plain, chunk.entries):
                        if not batch:
                            continue
                        await run.want_page.wait()
                        if run.stopped:
                            return []
                        run.next_page = batch
                        run.want_page.clear()
                        self._wake.set()
                    plain = []
                    await run.want_page.wait()  # taken: only now is the next chunk made
                    if run.stopped:
                        return []
        return plain

    async def _keep_alive(self, run: JobRun) -> None:
        """Touch the job about every TTR/2 so that no other worker is handed it meanwhile."""
        every = self.source.touch_interval(run.held)
        while True:
            await asyncio.sleep(every)
            try:
                await self.source.touch(run.held)
            except (ConnectionLost, NotFound) as exc:
                log.warning("job_touch_failed", error=str(exc))
                run.stop("lost")
                return

    async def _watch_cancel(self, run: JobRun) -> None:
        """Producers cancel by SET-ting a key, so this polls Redis: one EXISTS per job a second."""
        key = self.keys.cancel(run.id)
        while True:
            if await until_done(lambda: self.redis.exists(key), "exists"):
                break
            await asyncio.sleep(CANCEL_POLL)
        log.info("job_cancel_requested")
        run.stop("cancelled")

    # --- files ---

    async def _dispatch(self) -> None:
        while True:
            await self.slots.acquire()
            try:
                run, entry = await self._next_entry()
            except BaseException:
                self.slots.release()
                raise
            run.inflight += 1
            assert self._tg is not None
            task = self._tg.create_task(self._upload(run, entry))
            self._uploads.add(task)
            task.add_done_callback(self._uploads.discard)

    async def _next_entry(self) -> tuple[JobRun, Entry]:
        """Weighted round-robin: a job of weight w gets w files in a row, then the next job."""
        ring = self._ring
        while True:
            throttled: float | None = None  # soonest a tube over its rate limit may go again
            for _ in range(len(ring)):
                run = ring[0]
                wait = self.limiter.tube_wait(run.held.tube)
                entry = run.take() if wait <= 0 else None
                if wait > 0:
                    throttled = wait if throttled is None else min(throttled, wait)
                if entry is not None:
                    self.limiter.tube_take(run.held.tube)
                    run.credit -= 1
                    if run.credit <= 0:
                        run.credit = run.weight
                        ring.rotate(-1)
                    return run, entry
                run.credit = run.weight
                ring.rotate(-1)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(throttled):
                    await self._wake.wait()

    async def _upload(self, run: JobRun, entry: Entry) -> None:
        started = time.monotonic()
        settled = False
        try:
            outcome, nbytes, label, reason = await self._transfer(run, entry)
            self._record(run, entry.index, outcome, nbytes, label, reason)
            settled = True
            self.metrics.upload_seconds.observe(time.monotonic() - started)
        except StoreUnavailableError as exc:
            if exc.per_key and await self._store_answers():
                self._record(run, entry.index, "failed", 0, entry.path, exc.reason)
                settled = True
            else:
                self.store_down(exc.reason)
        finally:
            if not settled:  # cut by the drain or the store: not counted, uploaded on resume
                run.unsettled += 1
            run.inflight -= 1
            self.slots.release()
            run.check_idle()

    def _record(
        self, run: JobRun, index: int, outcome: Outcome, nbytes: int, label: str, reason: str
    ) -> None:
        self.progress.record(run.id, index, outcome, nbytes, label, reason)
        run.counts.add(outcome, nbytes)
        # The labelled children are looked up once, in Metrics, not per file.
        if outcome == "failed":
            self.metrics.files_failed.inc()
            self.summary.failed += 1
            log.warning("file_failed", path=label, reason=reason)
        elif outcome == "skipped":
            self.metrics.files_skipped.inc()
            self.summary.skipped += 1
        else:
            self.metrics.files_uploaded.inc()
            self.summary.uploaded += 1
            self.summary.bytes += nbytes
            self.metrics.bytes.inc(nbytes)

    async def _transfer(self, run: JobRun, entry: Entry) -> tuple[Outcome, int, str, str]:
        """Upload one entry under the retry policy; returns (outcome, bytes, label, reason)."""
        label = entry.path
        try:
            root, relpath = locate(entry.path, self.roots)
            key = entry.key or self._key_for(run.id, relpath, entry.index)
        except PermanentFileError as exc:
            return "failed", 0, label, exc.reason
        upload = self.config.upload
        skip = upload.skip_existing
        request = PutRequest(
            key,
            entry.content_type or self._content_type(entry.path) or upload.default_content_type,
            entry.metadata,
            entry.url,
            skip != "never",
            skip == "same-checksum",
        )

        async def attempt() -> PutResult:
            with open_source(
                entry.path, root, allow_hard_links=upload.allow_hard_links, relpath=relpath
            ) as source:
                if skip != "never" and await already_stored(self.store, key, source, skip):
                    return PutResult(0, already_present=True)
                # Per attempt, outside the memory budget: a retry is a request like any other.
                await self.limiter.acquire(run.held.tube, source.size)
                need = self.store.memory_needed(source.size)
                if need <= 0:  # the local store: no budget to take, no context manager to build
                    return await self.store.put(source, request)
                async with self.budget.hold(need):
                    return await self.store.put(source, request)

        def retrying(error: FileError, attempt_no: int, delay: float) -> None:
            self.summary.retried += 1
            self.aimd.attempt_failed(error)
            self.metrics.retries.labels(type(error).__name__).inc()
            log.info(
                "upload_retry", path=label, attempt=attempt_no, reason=error.reason, retry_in=round(delay, 3)
            )

        result, attempts = await self.retry.run(attempt, retrying)
        if isinstance(attempts.error, StoreUnavailableError):
            raise attempts.error
        if attempts.error is not None:
            return "failed", 0, label, attempts.error.reason
        assert result is not None
        self.aimd.succeeded()
        if result.already_present:
            return "skipped", 0, label, ""
        return "uploaded", result.bytes_sent, label, ""

    def _content_type(self, path: str) -> str | None:
        return self._content_types.for_path(path)

    def _key_for(self, job_id: str, relpath: str, index: int) -> str:
        key = self.config.upload.key_template.format_map(
            {"job_id": job_id, "relpath": relpath, "name": relpath.rsplit("/", 1)[-1], "index": index}
        )
        if (problem := key_problem(key)) is not None:
            raise PermanentFileError(f"key template gives a bad key {key!r}: {problem}")
        return key

    # --- the store's health ---

    def store_down(self, reason: str) -> None:
        """The store refuses writes: take no work, send every held job back with its progress
        saved (another instance, or this one later, resumes it), and probe until it is back."""
        self.health.fail("store", reason)
        for run in self.runs.values():
            if not run.stopped:
                run.stop("paused")
        if self.draining:  # the jobs go back anyway; a probe now would outlive the drain
            return
        if self._store_watch is None or self._store_watch.done():
            assert self._tg is not None
            self._store_watch = self._tg.create_task(self._watch_store(), name="store check")

    async def _store_answers(self) -> bool:
        """One probe of the store, shared by every upload that asks at the same time."""
        if self._store_probe is None or self._store_probe.done():
            self._store_probe = asyncio.ensure_future(self._probe_store())
        return await asyncio.shield(self._store_probe) is None

    async def _probe_store(self) -> str | None:
        """None when the store answers its check, else why not."""
        try:
            async with asyncio.timeout(STORE_PROBE_TIMEOUT):
                await self.store.check()
        except Exception as exc:  # noqa: BLE001 - whatever the probe met is the reason shown
            return str(exc) or type(exc).__name__
        return None

    async def _watch_store(self) -> None:
        """Probe the store with backoff until it answers; then work is taken again."""
        delays = backoff_delays(STORE_PROBE_FIRST, STORE_PROBE_CAP)
        while (problem := await self._probe_store()) is not None:
            self.health.fail("store", problem)
            await asyncio.sleep(next(delays))
        self.health.recover("store")

    # --- live reconfiguration ---

    def retune(self, upload: UploadConfig) -> None:
        """SIGHUP: concurrency and the AIMD keys; the slots follow the new ceiling unless
        backed off by throttling."""
        self.aimd.retune(upload)

    def apply_limits(self, config: Config) -> None:
        """New [limits] (SIGHUP): waiting uploads re-time themselves, throttled tubes re-checked."""
        self.limiter.apply(config.limits)
        self._wake.set()


class CompletionSink:
    """Announces finished jobs: the completion tube and the Redis events channel."""

    def __init__(self, progress: Progress, put: _Put | None) -> None:
        self._progress = progress
        self._put = put

    async def announce(self, message: dict[str, object]) -> None:
        if self._put is not None:
            await self._put(json.dumps(message, separators=(",", ":")).encode())
        await self._progress.publish(message)


async def _first(*aws: Awaitable[object], timeout: float) -> bool:
    """Wait until the first of several awaitables finishes, or `timeout` (then False); cancel
    the rest."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        done, _ = await asyncio.wait(tasks, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        return bool(done)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _fields(obj: object) -> dict[str, object]:
    return {name: getattr(obj, name) for name in obj.__slots__}  # type: ignore[attr-defined]

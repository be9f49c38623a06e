"""A job's life, from the moment beanstalkd hands it over until it is settled.

Admit it (or send it back), check its progress keys, start its run in Redis (fresh, resumed,
or still cancelled), seat it in the fair ring while its pages are fed and it is kept alive
and watched for a cancel, then finish it (delete or bury, announced) or release it with its
progress saved. Whatever happens, the job ends deleted, buried or back in beanstalkd.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import cast

import redis.asyncio as aioredis
import structlog

from uploader.clock import SYSTEM, Time
from uploader.entries.manifest import InlineManifest, JobSpec, Manifest, RedisManifest, parse_body
from uploader.errors import BadJobError
from uploader.pipeline.health import Health
from uploader.pipeline.jobrun import JobRun, Stop
from uploader.pipeline.ring import Ring
from uploader.pipeline.tally import Tally
from uploader.redisio import Keys
from uploader.source.base import HeldJob, ReservationLost, Source
from uploader.state.begin import begin
from uploader.state.cancels import CancelFlags
from uploader.state.finish import State
from uploader.state.heartbeat import hand_back
from uploader.state.progress import Progress

log = structlog.get_logger("uploader.pipeline.jobs")

DUPLICATE_DELAY = 5  # seconds a job waits in beanstalkd when its ID is already running here
QUICK_JOB = 0.05  # seconds a job may run before it is kept alive and watched for a cancel

@dataclass(eq=False)
class Jobs:
    source: Source
    redis: aioredis.Redis
    keys: Keys
    progress: Progress
    tally: Tally
    health: Health
    feed: Callable[[JobRun], Coroutine[object, object, None]]  # hands a job's files on, page by page
    time: Time = SYSTEM
    worker: str = ""  # as the progress hash's `worker` field names this daemon
    page_size: int = 500  # entries of a job's list read at once
    ring: Ring[JobRun] = field(init=False, default_factory=Ring)
    wake: asyncio.Event = field(init=False, default_factory=asyncio.Event)  # the ring may have files
    runs: dict[str, JobRun] = field(init=False, default_factory=dict)
    draining: bool = field(init=False, default=False)
    cancels: CancelFlags = field(init=False)

    def __post_init__(self) -> None:
        self.cancels = CancelFlags(self.redis, self.keys, self.time)

    # --- admission ---

    async def handle(self, held: HeldJob) -> None:
        """The whole life of one held job; returns once it is settled."""
        spec = await self._admit(held)
        if spec is None:
            return
        run = JobRun(held, spec, self._manifest(spec), self.time.monotonic(), self.wake.set)
        self.runs[run.id] = run
        self.tally.metrics.active_jobs.inc()
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
                await self.source.settle(held, "release")
                self.tally.released()
                log.warning("job_released", job_id=run.id, progress_saved=False, **_fields(run.counts))
            raise
        except Exception:
            # A state of Redis or of the job that no check foresaw: this job stops, buried for
            # an operator to look at; the daemon and every other job go on.
            log.exception("job_crashed", job_id=run.id, beanstalk_job=held.delivery.job)
            if not held.settled:
                await self.source.settle(held, "bury")
                self.tally.buried()
        finally:
            del self.runs[run.id]
            self.progress.forget(run.id)
            self.tally.metrics.active_jobs.dec()

    async def _admit(self, held: HeldJob) -> JobSpec | None:
        """The job's spec, or None when it was settled here: refused, or sent back."""
        try:
            spec = parse_body(held.body)
        except BadJobError as exc:
            await self._refuse(held, exc)
            return None
        if self.draining or not self.health.ok:
            # Taken in the instant the daemon stopped taking work: back at once, untouched.
            log.info("job_returned", job_id=spec.id, beanstalk_job=held.delivery.job,
                     reason="draining" if self.draining else self.health.describe())
            await self.source.settle(held, "release")
            return None
        if spec.id in self.runs:
            log.warning("job_already_running", job_id=spec.id, beanstalk_job=held.delivery.job)
            await self.source.settle(held, "release", DUPLICATE_DELAY)
            return None
        return spec

    def _manifest(self, spec: JobSpec) -> Manifest:
        if spec.inline is not None:
            return InlineManifest(self.redis, self.keys, spec.id, spec.inline)
        return RedisManifest(self.redis, self.keys, spec.id)

    async def _refuse(self, held: HeldJob, exc: BadJobError) -> None:
        """A job that cannot even start: buried for an operator, the reason in the log."""
        log.error("job_refused", beanstalk_job=held.delivery.job, tube=held.tube, reason=str(exc))
        self.tally.buried()
        await self.source.settle(held, "bury")

    # --- the run ---

    async def _work(self, run: JobRun) -> None:
        if await self._begin(run):
            await self._serve(run)
        if run.lost:
            await self._lost(run, "beanstalkd connection lost; the job is back in its tube")
        elif run.complete or run.cancelled:
            await self._finish(run)
        elif not run.held.settled:
            await self.progress.set_state(run.id, "queued")
            await self.source.settle(run.held, "release")
            self.tally.released()
            log.info("job_released", **_fields(run.counts))

    async def _begin(self, run: JobRun) -> bool:
        """Start the run (state/begin.py); False when there is nothing to serve (refused, an
        unreadable list, or a delivery that was cancelled before and stays so)."""
        start = await begin(self.progress, self.redis, self.keys, run.id, run.manifest, run.inline,
                            run.held.delivery, self.page_size)
        run.total = start.total
        if start.how == "refused":
            await self._refuse(run.held, BadJobError(start.reason))
        elif start.how == "unreadable":
            log.error("job_failed", reason=start.reason)
            run.loaded = True
        elif start.how == "cancelled":
            run.loaded = True
            run.stop("cancelled")
        elif start.lazy:
            run.unannounced = "fresh"  # a quick job says it all in one line, job_finished
        else:
            _announce(run, start.how, self.time.monotonic())
        return start.serves

    async def _serve(self, run: JobRun) -> None:
        """Seat the job in the ring until it is idle: done, or stopped with nothing in flight."""
        self.ring.add(run, run.weight)
        self.wake.set()
        try:
            async with asyncio.TaskGroup() as tg:
                helpers = [tg.create_task(self.feed(run))]
                # A short job needs no keeper: its TTR is far off, and its first page said
                # whether it was cancelled. One that lasts gets both.
                if not await _set_within(run.idle, QUICK_JOB):
                    if run.unannounced:
                        _announce(run, run.unannounced, self.time.monotonic())
                    helpers += [tg.create_task(self._keep_alive(run)),
                                tg.create_task(self._watch_cancel(run))]
                    await run.idle.wait()
                for task in helpers:
                    task.cancel()
        finally:
            self.ring.remove(run)

    async def _finish(self, run: JobRun) -> None:
        # Announce only a job still ours: after a beanstalkd restart (or a TTR lapse) it is back
        # in its tube, and the run that holds it next finishes it, so it is announced once.
        try:
            await self.source.confirm(run.held)
        except ReservationLost as exc:
            await self._lost(run, f"reservation lost before the job finished: {exc}")
            return
        seconds = self.time.monotonic() - run.started
        c = run.counts
        message = await self.progress.finish(run.id, seconds, cancelled=run.cancelled, total=run.total,
                                             walked=run.walked)
        # The final write published it on the events channel; the source's completion queue too.
        await self.source.announce(json.dumps(message, separators=(",", ":")).encode(), run.held.delivery)
        state = cast(State, message["state"])
        await self.source.settle(run.held, "bury" if state == "failed" else "delete")
        self.tally.finished(state)
        log.info(
            "job_finished", state=state, total=message["total"], uploaded=c.uploaded, skipped=c.skipped,
            failed=c.failed, bytes=c.bytes, seconds=round(seconds, 3),
            files_per_second=round(c.settled / seconds, 1) if seconds > 0 else None,
            tube=run.held.tube, beanstalk_job=run.held.delivery.job, run=run.unannounced or "logged",
        )

    async def _lost(self, run: JobRun, reason: str) -> None:
        """The job is beanstalkd's again (or gone with its server): save what was done, and
        hand the run back (`queued`, with a note), so no hash says `running` for nobody."""
        await self.progress.flush()
        delivery = run.held.delivery
        log.warning("job_lost", reason=reason, beanstalkd=delivery.address, **_fields(run.counts))
        await self.source.abandon(run.held)
        now = int(self.time.wall())
        note = (f"run by {self.worker} stopped at {now}: {reason} (beanstalkd {delivery.address}, "
                f"job {delivery.job}); `uploader recover` puts it again if that server lost it")
        await hand_back(self.redis, self.keys, run.id, self.worker, delivery.address, delivery.job, now, note)

    async def _keep_alive(self, run: JobRun) -> None:
        """Keep the reservation; once it is lost, stop handing out the job's files."""
        try:
            await self.source.keep(run.held)
        except ReservationLost as exc:
            log.warning("job_touch_failed", error=str(exc))
            run.stop("lost")

    async def _watch_cancel(self, run: JobRun) -> None:
        await self.cancels.wait(run.id)
        log.info("job_cancel_requested")
        run.stop("cancelled")

    # --- the daemon's say ---

    def stop_all(self, why: Stop) -> None:
        for run in self.runs.values():
            if not run.stopped:
                run.stop(why)


def _announce(run: JobRun, mode: str, now: float) -> None:
    """The job_started line: at once for a resumed or restarted run, once it outlasts
    QUICK_JOB for a fresh one (at hundreds of jobs a second, one line per job, not two)."""
    run.unannounced = None
    held = run.held
    log.info("job_started", total=run.total, tube=held.tube, beanstalk_job=held.delivery.job, run=mode,
             since=round(now - run.started, 3))


async def _set_within(event: asyncio.Event, seconds: float) -> bool:
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await event.wait()
            return True
    return False


def _fields(obj: object) -> dict[str, object]:
    return {name: getattr(obj, name) for name in obj.__slots__}  # type: ignore[attr-defined]

"""One held job while it runs: its queue of entries, what is in flight, and why it stopped.

Shared by the job's life (jobs.py), its feed (feed.py), the dispatcher (scheduler.py) and the
tally, which hands outcomes back to it.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Literal

from uploader.entries.manifest import Entry, JobSpec, Manifest
from uploader.source.base import HeldJob
from uploader.state.progress import Counts

Stop = Literal["cancelled", "lost", "draining", "paused"]


class JobRun:
    """One held job: its queue of entries, what is in flight, and why it stopped."""

    def __init__(self, held: HeldJob, spec: JobSpec, manifest: Manifest, started: float,
                 wake: Callable[[], None]) -> None:
        self.held = held
        self.id = spec.id
        self.inline = spec.inline
        self.manifest = manifest
        self.weight = held.weight
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
        self.walked = False  # directories were expanded: the walk digests expire with the job
        self.idle = asyncio.Event()
        self.started = started
        self.unannounced: str | None = None  # a fresh run's mode until its job_started line is out
        self._wake = wake  # the dispatcher: files are there to take

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

    def offer(self, entries: list[Entry]) -> None:
        """The next page, for `take` once the current one is used up."""
        self.next_page = entries
        self.want_page.clear()
        self._wake()

    async def wait_taken(self) -> bool:
        """Until the page offered last is taken; False if the job stopped meanwhile."""
        await self.want_page.wait()
        return not self.stopped

    async def hand_on(self, entries: list[Entry]) -> bool:
        """Offer `entries` once the page before is taken; False if the job stopped first."""
        if not await self.wait_taken():
            return False
        self.offer(entries)
        return True

    def stop(self, why: Stop) -> None:
        """Stop handing out files; in-flight ones finish. Draining and paused keep what is
        pending: the job goes back and resumes."""
        setattr(self, why, True)
        if why not in ("draining", "paused"):
            self.pending.clear()
            self.next_page = None
        self.want_page.set()
        self.check_idle()

    def check_idle(self) -> None:
        if self.inflight == 0 and (self.complete or self.stopped):
            self.idle.set()

"""A job's files, handed to the dispatcher one page at a time: read from Redis, parsed, and
directories expanded into their files.

A page is read only once the one before is taken, so a job of millions of files holds one
page in memory, and a directory of millions one chunk. Entries already marked done (a resumed
job) are passed over; a bad entry is recorded failed here, before any file is touched.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import redis.asyncio as aioredis
import structlog

from uploader.config.settings import Config
from uploader.entries.files import Root
from uploader.entries.manifest import BadEntry, Entry, Page, parse_entry
from uploader.entries.walk import DirectoryExpander
from uploader.errors import BadJobError
from uploader.pipeline.jobrun import JobRun
from uploader.pipeline.tally import Result, Tally
from uploader.redisio import Keys
from uploader.state.progress import Progress

log = structlog.get_logger("uploader.pipeline.feed")


@dataclass(eq=False)
class Feeder:
    config: Config
    redis: aioredis.Redis
    keys: Keys
    progress: Progress
    tally: Tally
    roots: tuple[Root, ...] = field(init=False)

    def __post_init__(self) -> None:
        self.roots = tuple(Root.of(r) for r in self.config.upload.allowed_roots)

    async def feed(self, run: JobRun) -> None:
        """Hand on the job's entries, page by page, until the list ends or the job stops."""
        size = self.config.redis.page_size
        start = 0
        listed = run.total  # the list's length at start: directories' files are numbered after it
        dirs = self._expander(run) if self.config.upload.directories else None
        try:
            while await run.wait_taken():
                page = await run.manifest.page(start, size)
                if page.cancelled:
                    log.info("job_cancel_requested")
                    run.stop("cancelled")
                    return
                entries = self._parse(run, start, page)
                start += len(page.entries)
                if dirs is not None:
                    entries = await self._expand(run, dirs, entries)
                    if run.stopped:
                        return
                if entries:
                    run.offer(entries)
                if len(page.entries) < size:
                    break
            else:
                return  # stopped before the list ended
        except BadJobError as exc:
            await self.progress.fail_list(run.id, str(exc))
            run.counts.failed += 1
            log.error("manifest_unreadable", reason=str(exc))
        if start != listed:
            run.total += start - listed
            await self.progress.set_total(run.id, run.total)
        run.loaded = True
        run.check_idle()

    def _expander(self, run: JobRun) -> DirectoryExpander:
        conf = self.config.redis
        return DirectoryExpander(self.redis, self.keys, run.id, run.total, conf.page_size, conf.progress_ttl)

    def _parse(self, run: JobRun, start: int, page: Page) -> list[Entry]:
        """The page's entries still to upload; bad ones are recorded failed on the way."""
        entries: list[Entry] = []
        for offset, raw in enumerate(page.entries):
            index = start + offset
            if page.is_marked(index):
                continue
            entry = parse_entry(index, raw)
            if isinstance(entry, BadEntry):
                self.tally.file(run, index, Result("failed", entry.label, reason=entry.reason))
            else:
                entries.append(entry)
        return entries

    async def _expand(self, run: JobRun, dirs: DirectoryExpander, entries: list[Entry]) -> list[Entry]:
        """Hand on each directory entry's files chunk by chunk, each chunk once the one before
        is taken (as pages are); returns the page's other entries, still to be handed on."""
        roots = await dirs.directories(entries, self.roots)
        if not any(roots):
            return entries
        run.walked = True
        plain: list[Entry] = []
        for entry, root in zip(entries, roots, strict=True):
            if root is None:
                plain.append(entry)
                continue
            async with contextlib.aclosing(dirs.expand(entry, root)) as chunks:
                async for chunk in chunks:
                    for index, label, reason in chunk.failures:
                        self.tally.file(run, index, Result("failed", label, reason=reason))
                    if chunk.total_delta:
                        run.total += chunk.total_delta
                        await self.progress.set_total(run.id, run.total)
                    for batch in (plain, chunk.entries):
                        if batch and not await run.hand_on(batch):
                            return []
                    plain = []
                    if not await run.wait_taken():  # taken: only now is the next chunk made
                        return []
        return plain

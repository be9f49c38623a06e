"""One file's way to the store: find and open it, name its key, then put it under the retry
policy, the rate limits and the memory budget.

A transfer ends in a `Result` (uploaded, skipped as already stored, or failed with a reason),
or raises `StoreUnavailableError`: the store, not the file, is the problem, and nothing is
recorded for the file, so it is uploaded when its job runs again.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import structlog

from uploader.config.settings import UploadConfig
from uploader.entries.contenttype import ContentTypes
from uploader.entries.files import Root, SourceFile, locate, open_source
from uploader.entries.manifest import Entry, key_problem
from uploader.errors import FileError, PermanentFileError, StoreUnavailableError
from uploader.pipeline.aimd import Aimd
from uploader.pipeline.limits import ByteBudget
from uploader.pipeline.ratelimit import RateLimiter
from uploader.pipeline.retry import RetryPolicy
from uploader.pipeline.tally import Result, Tally
from uploader.stores.base import PutRequest, PutResult, Store, already_stored

log = structlog.get_logger("uploader.pipeline.transfer")


@dataclass(eq=False)
class Transfer:
    upload: UploadConfig
    store: Store
    retry: RetryPolicy
    limiter: RateLimiter
    budget: ByteBudget
    aimd: Aimd
    tally: Tally
    roots: tuple[Root, ...] = field(init=False)
    _content_types: ContentTypes = field(init=False, default_factory=ContentTypes)

    def __post_init__(self) -> None:
        self.roots = tuple(Root.of(r) for r in self.upload.allowed_roots)

    async def run(self, job_id: str, tube: str, entry: Entry) -> Result:
        """Upload one entry; a file's own problem is a failed Result, never an exception."""
        try:
            root, relpath = locate(entry.path, self.roots)
            request = self._request(entry, entry.key or self._key_for(job_id, relpath, entry.index))
        except PermanentFileError as exc:
            return Result("failed", entry.path, reason=exc.reason)

        async def attempt() -> PutResult:
            with open_source(
                entry.path, root, allow_hard_links=self.upload.allow_hard_links, relpath=relpath
            ) as source:
                return await self._put(tube, source, request)

        def retrying(error: FileError, attempt_no: int, delay: float) -> None:
            self.tally.retried(type(error).__name__)
            self.aimd.attempt_failed(error)
            log.info("upload_retry", path=entry.path, attempt=attempt_no, reason=error.reason,
                     retry_in=round(delay, 3))

        result, attempts = await self.retry.run(attempt, retrying)
        if isinstance(attempts.error, StoreUnavailableError):
            raise attempts.error
        if attempts.error is not None:
            return Result("failed", entry.path, reason=attempts.error.reason)
        assert result is not None
        self.aimd.succeeded()
        if result.already_present:
            return Result("skipped", entry.path)
        return Result("uploaded", entry.path, result.bytes_sent)

    async def _put(self, tube: str, source: SourceFile, request: PutRequest) -> PutResult:
        """One attempt, on an opened file: skip if stored, else wait for the limits and put."""
        skip = self.upload.skip_existing
        if skip != "never" and await already_stored(self.store, request.key, source, skip):
            return PutResult(0, already_present=True)
        # Per attempt, outside the memory budget: a retry is a request like any other.
        await self.limiter.acquire(tube, source.size)
        need = self.store.memory_needed(source.size)
        if need <= 0:  # the local store: no budget to take, no context manager to build
            return await self.store.put(source, request)
        async with self.budget.hold(need):
            return await self.store.put(source, request)

    def _request(self, entry: Entry, key: str) -> PutRequest:
        skip = self.upload.skip_existing
        fields = entry.fields
        if entry.content_type:  # the entry's type stands as given, with its own encoding only
            content_type, encoding = entry.content_type, None
        else:
            guessed, encoding = self._content_types.for_path(entry.path)
            content_type = guessed or self.upload.default_content_type
        if fields is None:
            return PutRequest(
                key, content_type, entry.metadata, entry.url, skip != "never", skip == "same-checksum",
                content_encoding=encoding,
            )
        return PutRequest(
            key, content_type, entry.metadata, entry.url, skip != "never", skip == "same-checksum",
            content_encoding=fields.content_encoding or encoding,
            cache_control=fields.cache_control,
            content_disposition=fields.content_disposition,
            tagging=fields.tagging,
        )

    def _key_for(self, job_id: str, relpath: str, index: int) -> str:
        key = self.upload.key_template.format_map(
            {"job_id": job_id, "relpath": relpath, "name": relpath.rsplit("/", 1)[-1], "index": index}
        )
        if (problem := key_problem(key)) is not None:
            raise PermanentFileError(f"key template gives a bad key {key!r}: {problem}")
        return key

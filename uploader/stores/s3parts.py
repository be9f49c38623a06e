"""A big file to S3 in parts, `part_concurrency` of them in flight at once.

The file holds one upload slot; its parts share the byte budget that `memory_needed` charged
(part_size for each part in flight), so no other accounting is needed: a part is read only
when a worker is free to send it, and dropped once S3 has it. Every part carries its
Content-MD5, so S3 verifies each one; an upload that does not complete is always aborted.

A completion refused with InvalidPart or InvalidPartOrder after every part was acknowledged
is the server's race, not the file's fault: a server may answer a part before its record of
it is committed (Ceph RGW does, under load), and a completion sent right after then meets a
part it does not know yet. `complete` lists the parts the server holds, sends again any that
is missing or other than acknowledged, and completes again with backoff; only past that is
the upload given up, as a transient error the whole file is retried for.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import math
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import botocore.exceptions
import structlog

from uploader.entries.files import SourceFile
from uploader.errors import TransientFileError
from uploader.stores.s3errors import client_error_parts
from uploader.stores.s3objects import content_md5

log = structlog.get_logger("uploader.s3")

MAX_PARTS = 10_000
# An abort that does not take is sent again, after 0.25, 0.5 and 1 s: a bucket left with the
# parts of an upload nobody completes is billed for them until a lifecycle rule clears it.
ABORT_ATTEMPTS = 4
ABORT_PAUSE = 0.25
# A completion that meets a part the server has not recorded yet is sent again, after the
# parts are checked, 0.25, 0.5 and 1 s later: the race closes in milliseconds.
RACED_COMPLETION_CODES = frozenset({"InvalidPart", "InvalidPartOrder"})
COMPLETE_ATTEMPTS = 4
COMPLETE_PAUSE = 0.25
LIST_PAGE = 1000


def part_size_for(size: int, part_size: int) -> int:
    """`part_size`, or bigger when the file would otherwise need more than S3's 10,000 parts."""
    return max(part_size, math.ceil(size / MAX_PARTS))


def parts_in_flight(size: int, part_size: int, concurrency: int) -> int:
    return max(1, min(concurrency, math.ceil(size / part_size_for(size, part_size))))


class Multipart:
    """One multipart upload already created (`upload_id`): its parts, then complete or abort."""

    def __init__(
        self,
        client: Any,
        bucket: str,
        name: str,
        upload_id: str,
        source: SourceFile,
        part_size: int,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.client = client
        self._sleep = sleep
        self.bucket = bucket
        self.name = name
        self.upload_id = upload_id
        self.source = source
        self.part_size = part_size_for(source.size, part_size)
        self._etags: dict[int, str] = {}

    def _numbered(self) -> Iterator[tuple[int, int]]:
        return enumerate(range(0, self.source.size, self.part_size), start=1)

    async def _send(self, number: int, offset: int) -> None:
        length = min(self.part_size, self.source.size - offset)
        body = await self.source.read(offset, length)
        md5 = await content_md5(body)
        # The part goes as a BytesIO that holds the only reference to its bytes: botocore would
        # wrap bytes in one anyway, and aiohttp's getbuffer() on it copies a buffer that is
        # shared (one more part_size per part in flight), not one the BytesIO owns alone.
        stream = io.BytesIO(body)
        del body
        response = await self.client.upload_part(
            Bucket=self.bucket,
            Key=self.name,
            UploadId=self.upload_id,
            PartNumber=number,
            Body=stream,
            ContentLength=length,
            ContentMD5=md5,
        )
        self._etags[number] = response["ETag"]

    async def _worker(self, parts: Iterator[tuple[int, int]]) -> None:
        # One shared iterator: each worker takes the next part when it is free (no await
        # between taking and starting, so no part is taken twice or skipped).
        for number, offset in parts:
            await self._send(number, offset)

    async def send_all(self, concurrency: int) -> None:
        """Every part, `concurrency` at a time; the first failure stops the others and is raised
        as itself (not in an ExceptionGroup), so the store's translation sees it."""
        parts = self._numbered()
        workers = parts_in_flight(self.source.size, self.part_size, concurrency)
        if workers == 1:
            await self._worker(parts)
            return
        try:
            async with asyncio.TaskGroup() as group:
                for _ in range(workers):
                    group.create_task(self._worker(parts))
        except BaseExceptionGroup as failed:
            raise failed.exceptions[0] from None

    async def complete(self) -> None:
        """Complete the upload; a refusal the server's own race explains is mended and sent
        again (see the module's docstring), any other error raised as it came."""
        for attempt in range(COMPLETE_ATTEMPTS):
            if attempt:
                await self._sleep(COMPLETE_PAUSE * 2 ** (attempt - 1))
                await self._mend()
            try:
                await self._complete_once()
                return
            except botocore.exceptions.ClientError as exc:
                code, status, _ = client_error_parts(exc)
                if code not in RACED_COMPLETION_CODES:
                    raise
                log.warning("s3_completion_refused", key=self.name, code=code, attempt=attempt + 1)
        raise TransientFileError(
            f"s3: {code} ({status}) on completion {COMPLETE_ATTEMPTS} times, with every part acknowledged"
        )

    async def _complete_once(self) -> None:
        parts = [{"ETag": self._etags[n], "PartNumber": n} for n in sorted(self._etags)]
        await self.client.complete_multipart_upload(
            Bucket=self.bucket, Key=self.name, UploadId=self.upload_id, MultipartUpload={"Parts": parts}
        )

    async def _mend(self) -> None:
        """Send again every part the server does not hold as it acknowledged it."""
        held = await self.held_parts()
        missing = [
            (number, offset)
            for number, offset in self._numbered()
            if _unquoted(held.get(number)) != _unquoted(self._etags.get(number))
        ]
        for number, offset in missing:
            log.info("s3_part_sent_again", key=self.name, part=number)
            await self._send(number, offset)
        if missing:
            self.source.check_unchanged()  # a part read again must be the file that was read

    async def held_parts(self) -> dict[int, str]:
        """The parts the server holds for this upload, by number: their ETags (ListParts, paged)."""
        held: dict[int, str] = {}
        marker = 0
        while True:
            page = await self.client.list_parts(
                Bucket=self.bucket,
                Key=self.name,
                UploadId=self.upload_id,
                MaxParts=LIST_PAGE,
                PartNumberMarker=marker,
            )
            held.update({int(p["PartNumber"]): str(p["ETag"]) for p in page.get("Parts", [])})
            if not page.get("IsTruncated"):
                return held
            marker = int(page["NextPartNumberMarker"])


def _unquoted(etag: str | None) -> str | None:
    return etag.strip('"') if etag is not None else None


async def abort(
    client: Any, bucket: str, name: str, upload_id: str, pending: set[asyncio.Task[None]]
) -> None:
    """Abort an unfinished upload until S3 says it is gone; shielded from cancellation, its
    failure never raised. The task stays in `pending` until it ends, for the store's close()
    to wait on."""

    async def run() -> None:
        for attempt in range(ABORT_ATTEMPTS):
            if attempt:
                await asyncio.sleep(ABORT_PAUSE * 2 ** (attempt - 1))
            with contextlib.suppress(Exception):
                await client.abort_multipart_upload(Bucket=bucket, Key=name, UploadId=upload_id)
            if await _gone(client, bucket, name, upload_id):
                return

    task = asyncio.ensure_future(run())
    pending.add(task)
    task.add_done_callback(pending.discard)
    # A second cancellation ends this wait (and wins over the original error, as it
    # must); the abort goes on and close() awaits it.
    await asyncio.shield(task)


async def _gone(client: Any, bucket: str, name: str, upload_id: str) -> bool:
    """Whether S3 knows the upload no more. An abort can fail, and a part still on its way
    when it came can land after it (S3's documentation says to abort again then)."""
    try:
        await client.list_parts(Bucket=bucket, Key=name, UploadId=upload_id, MaxParts=1)
    except botocore.exceptions.ClientError as exc:
        return bool(exc.response.get("Error", {}).get("Code") == "NoSuchUpload")
    except Exception:  # noqa: BLE001 - whatever the check met, the upload may still be there
        return False
    return False

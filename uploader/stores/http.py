"""A store that PUTs each object to a URL: a key template, or a presigned URL from the entry.

One aiohttp session with a connection pool sized to `concurrency`. Files below
`stream_threshold` are read in one call and sent as one body; bigger ones are streamed from
the file in `chunk_size` pieces with an explicit Content-Length, so memory per upload is
bounded by one chunk. Configured headers carry secrets (API keys): they go only to the
template's own origin, never to a URL a producer wrote, and never into a log or a reason.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections.abc import AsyncIterator
from urllib.parse import quote, urlsplit

import aiohttp
from yarl import URL

from uploader.config.stores import HttpStoreConfig
from uploader.entries.files import SourceFile
from uploader.errors import (
    FileError,
    InfrastructureError,
    PermanentFileError,
    StoreUnavailableError,
    ThrottledError,
    TransientFileError,
)
from uploader.stores import base
from uploader.stores.base import SHA256_META, PutRequest, PutResult, StoredObject, file_digest

EXCERPT = 200  # characters of an error response's body kept in the reason
THROTTLE_STATUSES = frozenset({429, 503})
# An ETag of 32 hex digits is taken for the content's MD5 (S3-like stores); when it is not,
# the file merely fails to match and is uploaded again.
_MD5_ETAG = re.compile(r'^"?([0-9a-fA-F]{32})"?$')


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    return parts.scheme, (parts.hostname or "").lower(), port


def _one_line(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= EXCERPT else text[: EXCERPT - 3] + "..."


def status_error(status: int, reason: str, excerpt: str, presigned: bool = False) -> FileError:
    """The error for a non-2xx answer: 408/429/5xx are worth a retry, other 4xx are not.

    401 and 507 say the store refuses every write (our credentials, its space): an outage. A
    403 from the configured server may be the key's alone: the scheduler asks the store's
    probe. A 403 for an entry's presigned URL is that URL's own (expired, or signed for
    another object): the file fails."""
    head = f"http: {status} {reason}".rstrip()
    text = f"{head}: {excerpt}" if excerpt else head
    if status in (401, 507) or (status == 403 and not presigned):
        return StoreUnavailableError(text, per_key=status == 403)
    if status in THROTTLE_STATUSES:
        return ThrottledError(text)
    if status == 408 or status >= 500:
        return TransientFileError(text)
    return PermanentFileError(text)


def connection_error(exc: BaseException) -> FileError | None:
    """Translate what aiohttp raises; the message never carries the URL (presigned queries)."""
    if isinstance(exc, FileError):
        return exc
    if isinstance(exc, aiohttp.InvalidURL):
        return PermanentFileError("http: invalid URL")  # an entry's own URL: no retry mends it
    return base.transport_error(exc, "http")


class HttpStore:
    def __init__(self, config: HttpStoreConfig, concurrency: int) -> None:
        self.config = config
        self.concurrency = concurrency
        self._session: aiohttp.ClientSession | None = None
        self._origin = _origin(config.url_template) if config.url_template else None

    def memory_needed(self, size: int) -> int:
        if size < self.config.stream_threshold:
            return size
        return self.config.chunk_size

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        if self._session is not None:
            return
        t = self.config.timeout
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=max(1, self.concurrency), limit_per_host=0),
            # No total: a big file may take long; a stalled connect or answer may not.
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=t, sock_read=t),
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
        )

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    def _require(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("HttpStore used before start() or after close()")
        return self._session

    async def check(self) -> None:
        """GET the health URL (any 2xx), or just connect to the template's host."""
        session = self._require()
        with base.translated(base.probe_failure(connection_error, "http: store not reachable")):
            if self.config.health_url:
                async with session.get(
                    URL(self.config.health_url, encoded=True), headers=self._static(self.config.health_url)
                ) as response:
                    if not 200 <= response.status < 300:
                        raise InfrastructureError(f"http: health check answered {response.status}")
                return
            if self._origin is None:
                return
            _, host, port = self._origin
            async with asyncio.timeout(self.config.timeout):
                _, writer = await asyncio.open_connection(host, port)
            writer.close()
            await writer.wait_closed()

    # -- objects -----------------------------------------------------------------------------

    def _url_for(self, key: str) -> str:
        if not self.config.url_template:
            raise PermanentFileError("http: no url_template configured and the entry has no url")
        return self.config.url_template.format(key=quote(key, safe="/"))

    def _check_entry_url(self, url: str) -> None:
        """A manifest entry's URL may only name a host of `url_hosts` (when that is set): the
        entry cannot send a file's bytes to wherever it likes."""
        allowed = self.config.url_hosts
        host = (urlsplit(url).hostname or "").lower()
        if allowed and not any(
            host == p or (p.startswith("*.") and host.endswith(p[1:])) for p in allowed
        ):
            raise PermanentFileError(f"http: the entry's url host {host!r} is not in [store.http].url_hosts")

    def _static(self, url: str) -> dict[str, str]:
        """The configured headers, only for the template's own origin."""
        if self._origin is None or _origin(url) != self._origin:
            return {}
        return dict(self.config.headers)

    def _headers(self, url: str, request: PutRequest, size: int) -> dict[str, str]:
        # Configured names cannot be Content-Type/-Length (config refuses them), and metadata
        # names all carry the prefix, so a plain dict cannot end up with a header twice.
        headers = self._static(url)
        headers["Content-Type"] = request.content_type
        headers["Content-Length"] = str(size)
        if request.content_encoding:
            headers["Content-Encoding"] = request.content_encoding
        for name, value in request.metadata.items():
            headers[self.config.meta_prefix + name] = value
        return headers

    def conditional(self, size: int) -> bool:
        return False

    async def stat(self, key: str, checksum: bool = False) -> StoredObject | None:
        """HEAD: Content-Length, an MD5-looking ETag, our SHA-256 metadata header if any."""
        if not self.config.head_for_size:
            return None
        session = self._require()
        url = self._url_for(key)
        with base.translated(connection_error):
            async with session.head(
                URL(url, encoded=True), headers=self._static(url), allow_redirects=False
            ) as response:
                if response.status in (404, 410):
                    return None
                if not 200 <= response.status < 300:
                    raise status_error(response.status, response.reason or "", "")
                length = response.headers.get("Content-Length")
                if length is None or not length.isdigit():
                    return None
                etag = _MD5_ETAG.match(response.headers.get("ETag", ""))
                sha256 = response.headers.get(self.config.meta_prefix + SHA256_META)
                return StoredObject(
                    int(length),
                    md5=etag.group(1).lower() if etag else None,
                    sha256=sha256.lower() if sha256 else None,
                )

    async def put(self, source: SourceFile, request: PutRequest) -> PutResult:
        session = self._require()
        if request.url:
            self._check_entry_url(request.url)
        url = request.url or self._url_for(request.key)
        size = source.size
        failure: list[BaseException] = []
        body: bytes | AsyncIterator[bytes]
        if size < self.config.stream_threshold:
            body = await source.read_all() if size else b""
            source.check_unchanged()
        else:
            body = self._chunks(source, failure)
        headers = self._headers(url, request, size)
        if request.checksum:
            digest = (
                hashlib.sha256(body).hexdigest()
                if isinstance(body, bytes)
                else await file_digest(source, "sha256")  # streamed: one extra read
            )
            headers[self.config.meta_prefix + SHA256_META] = digest
        # A failure reading the file surfaces from aiohttp as whatever it wrapped it in.
        with base.translated(lambda exc: connection_error(failure[0] if failure else exc)):
            async with session.put(
                URL(url, encoded=True),
                data=body,
                headers=headers,
                allow_redirects=False,
            ) as response:
                if not 200 <= response.status < 300:
                    raise status_error(
                        response.status, response.reason or "", await _excerpt(response), bool(request.url)
                    )
        return PutResult(bytes_sent=size)

    async def _chunks(self, source: SourceFile, failure: list[BaseException]) -> AsyncIterator[bytes]:
        """The file in chunks; checked unchanged before the last one, so a changed file is cut."""
        size, step = source.size, self.config.chunk_size
        try:
            for offset in range(0, size, step):
                chunk = await source.read(offset, min(step, size - offset))
                if offset + step >= size:
                    source.check_unchanged()
                yield chunk
        except Exception as exc:
            failure.append(exc)
            raise


async def _excerpt(response: aiohttp.ClientResponse) -> str:
    try:
        data = await response.content.read(EXCERPT * 4)
    except (aiohttp.ClientError, TimeoutError):
        return ""
    return _one_line(data.decode("utf-8", "replace"))


__all__ = ["HttpStore", "connection_error", "status_error"]

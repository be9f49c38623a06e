"""Azure Blob store over the official asyncio client (`azure.storage.blob.aio`).

Block blobs: files below `block_threshold` go up in one Put Blob; bigger ones as staged
blocks of `part_size`, `part_concurrency` at a time, then one Put Block List. Every request
that carries file bytes carries their MD5 (`Content-MD5`), so the service refuses a body
changed on the way, and that refusal is retried. The SDK's own retries are off:
`pipeline/retry.py` decides, from what `azureerrors.classify_azure_error` translates here, at
the boundary.
Uncommitted blocks of a failed upload need no abort: Azure drops them on the blob's next
commit, or after a week. A commit refused with InvalidBlockList after every block was
acknowledged (a block not yet recorded, or dropped by another writer's commit) is not the
file's fault: the blocks the service lacks are staged again and the commit sent again, with
backoff, before the whole file is retried.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import math
import os
import re
import secrets
from collections.abc import Awaitable, Mapping
from typing import Any, TypeVar

import aiohttp
import structlog
from azure.core import MatchConditions
from azure.core.exceptions import ClientAuthenticationError, HttpResponseError, ResourceNotFoundError
from azure.core.pipeline.transport import AioHttpTransport
from azure.storage.blob import BlobBlock, BlobType, ContentSettings
from azure.storage.blob.aio import BlobClient, BlobServiceClient, ContainerClient

from uploader.config.stores import AzureStoreConfig
from uploader.entries.files import SourceFile
from uploader.errors import ConfigError, PermanentFileError, TransientFileError
from uploader.stores import base
from uploader.stores.azureerrors import (
    OUTAGE_CODES,
    already_exists,
    classify_azure_error,
    refusal,
    reply_parts,
)
from uploader.stores.base import SHA256_META, PutRequest, PutResult, StoredObject

log = structlog.get_logger("uploader.azure")
T = TypeVar("T")

CONNECTION_STRING_ENV = "AZURE_STORAGE_CONNECTION_STRING"
# Azure metadata names are C# identifiers: SHA256_META with '_' for '-'.
SHA256_NAME = SHA256_META.replace("-", "_")
METADATA_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
MAX_BLOCKS = 50_000
_INLINE_HASH = 1024 * 1024  # bodies up to this are hashed on the loop, bigger ones in a thread
# A refused commit is mended and sent again after 0.25, 0.5 and 1 s (as S3's completion).
COMMIT_ATTEMPTS = 4
COMMIT_PAUSE = 0.25


def blob_name(prefix: str, key: str) -> str:
    """`prefix + key`, for a key that `key_problem` lets through (none climbs out of the prefix)."""
    base.checked_key(key, "azure")
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    return prefix + key


def checked_metadata(metadata: Mapping[str, str]) -> dict[str, str]:
    """The request's metadata, or PermanentFileError for what Azure would refuse (names that are
    no C# identifier, values no header can carry), before a byte of the file is read."""
    for name, value in metadata.items():
        if not METADATA_NAME.match(name):
            raise PermanentFileError(f"azure: metadata name {name!r} is not allowed (letters, digits, '_')")
        if not (value.isascii() and value.isprintable()):
            raise PermanentFileError(f"azure: metadata {name!r} must be printable ASCII")
    return dict(metadata)


def _digests(body: bytes, sha256: bool) -> tuple[bytes, str | None]:
    md5 = hashlib.md5(body, usedforsecurity=False).digest()
    return md5, hashlib.sha256(body).hexdigest() if sha256 else None


class _Whole:
    """The whole file's MD5 (and SHA-256 when asked), fed block by block in file order."""

    def __init__(self, sha256: bool) -> None:
        self.md5 = hashlib.md5(usedforsecurity=False)
        self.sha256 = hashlib.sha256() if sha256 else None

    def block(self, body: bytes) -> bytes:
        """The block's own MD5; run in a thread (hashlib releases the GIL), one at a time."""
        self.md5.update(body)
        if self.sha256 is not None:
            self.sha256.update(body)
        return hashlib.md5(body, usedforsecurity=False).digest()


def open_service(config: AzureStoreConfig, path: str, **options: Any) -> tuple[BlobServiceClient, Any]:
    """The service client, and the credential to close with it (None for a connection string):
    the configured connection string, else the environment's, else `account_url` with
    azure-identity's DefaultAzureCredential. Secrets are never part of a message."""
    where = f"{path}: [store.azure]"
    connection = config.connection_string or os.environ.get(CONNECTION_STRING_ENV, "")
    if connection:
        source = ".connection_string" if config.connection_string else f" ({CONNECTION_STRING_ENV})"
        try:
            return BlobServiceClient.from_connection_string(connection, **options), None
        except ValueError:
            raise ConfigError(f"{where}{source}: not a usable connection string (value not shown)") from None
    if not config.account_url:
        raise ConfigError(
            f"{where}: no credentials: set connection_string, {CONNECTION_STRING_ENV} or account_url"
        )
    try:
        identity = importlib.import_module("azure.identity.aio")
    except ImportError:
        raise ConfigError(
            f"{where}.account_url needs azure-identity for DefaultAzureCredential "
            "(pip install azure-identity), or set connection_string"
        ) from None
    credential = identity.DefaultAzureCredential()
    return BlobServiceClient(config.account_url, credential=credential, **options), credential


async def _within(seconds: float, request: Awaitable[T]) -> T:
    """An overall deadline besides the socket timeouts: a server that accepts the connection and
    then never answers must not hold an upload slot for ever."""
    async with asyncio.timeout(seconds):
        return await request


async def _first_done(tasks: set[asyncio.Task[Any]]) -> set[asyncio.Task[Any]]:
    """Wait for one of `tasks`; the ones still running, or the first failure raised."""
    done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    errors = [e for t in done if not t.cancelled() and (e := t.exception()) is not None]
    if errors:
        raise errors[0]
    return pending


class AzureStore:
    def __init__(self, config: AzureStoreConfig, concurrency: int, path: str = "<config>") -> None:
        self.config = config
        self.concurrency = concurrency
        self.path = path
        self._session: aiohttp.ClientSession | None = None
        self._service: BlobServiceClient | None = None
        self._credential: Any = None
        self._container: ContainerClient | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        if self._container is not None:
            return
        t = self.config.timeout
        # A socket for every request that may be in flight: each upload slot, and a big file's
        # blocks (the byte budget bounds how many big files go at once).
        sockets = max(10, self.concurrency * self.config.part_concurrency)
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=sockets, limit_per_host=0),
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
            trust_env=True,  # HTTPS_PROXY and NO_PROXY, as the SDK's own session would
        )
        transport = AioHttpTransport(
            session=session, session_owner=False, connection_timeout=t, read_timeout=t
        )
        try:
            self._service, self._credential = open_service(
                self.config,
                self.path,
                transport=transport,
                retry_total=0,
                max_single_put_size=self.config.block_threshold,
            )
        except BaseException:
            await session.close()
            raise
        self._session = session
        self._container = self._service.get_container_client(self.config.container)
        await self._first_check()

    async def _first_check(self) -> None:
        """Ask for the container once at start: ConfigError for what no wait can fix; a container
        missing or refused now, or not reachable, is an outage the daemon waits out."""
        container = self.config.container
        try:
            await self._require().get_container_properties()
        except HttpResponseError as exc:
            code, status, _ = reply_parts(exc)
            if not status and isinstance(exc, ClientAuthenticationError):
                await self.close()
                raise ConfigError(
                    f"azure: no usable credentials for container {container!r} ({type(exc).__name__})"
                ) from None
            if status in (401, 403, 404) or code in OUTAGE_CODES:
                # Missing or refused now, perhaps not in a minute (a container being created, a
                # role being granted): an outage that readiness reports, not a fatal error.
                log.warning("store_unavailable", reason=refusal(container, code, status))
            elif 400 <= status < 500 and status not in (408, 429):
                await self.close()
                raise ConfigError(refusal(container, code, status)) from None
        except Exception as exc:  # unreachable now: the daemon retries later
            if classify_azure_error(exc) is None:
                await self.close()
                raise

    async def close(self) -> None:
        service, self._service, self._container = self._service, None, None
        credential, self._credential = self._credential, None
        session, self._session = self._session, None
        if service is not None:
            await service.close()
        if credential is not None:
            await credential.close()
        if session is not None:
            await session.close()

    async def check(self) -> None:
        container = self._require()
        what = f"azure: container {self.config.container!r} not usable"
        with base.translated(base.probe_failure(classify_azure_error, what)):
            await container.get_container_properties()

    def _require(self) -> ContainerClient:
        if self._container is None:
            raise RuntimeError("AzureStore used before start() or after close()")
        return self._container

    # -- objects -----------------------------------------------------------------------------

    def _part_size(self, size: int) -> int:
        return max(self.config.part_size, math.ceil(size / MAX_BLOCKS))

    def memory_needed(self, size: int) -> int:
        """The whole body below the threshold; from it up, the blocks staged at once."""
        if size < self.config.block_threshold:
            return size
        part = self._part_size(size)
        return part * min(self.config.part_concurrency, math.ceil(size / part))

    def conditional(self, size: int) -> bool:
        return self.config.conditional_put and size < self.config.block_threshold

    async def stat(self, key: str, checksum: bool = False) -> StoredObject | None:
        """One HEAD: the size, the blob's Content-MD5 when it has one, our SHA-256 metadata if any."""
        blob = self._require().get_blob_client(blob_name(self.config.prefix, key))
        with base.translated(classify_azure_error):
            try:
                props = await _within(2 * self.config.timeout, blob.get_blob_properties())
            except ResourceNotFoundError as exc:
                if reply_parts(exc)[0] == "ContainerNotFound":
                    raise
                return None
        md5 = props.content_settings.content_md5
        sha256 = next((v for k, v in (props.metadata or {}).items() if k.lower() == SHA256_NAME), None)
        return StoredObject(
            size=int(props.size),
            md5=bytes(md5).hex() if md5 else None,
            sha256=sha256.lower() if sha256 else None,
        )

    async def put(self, source: SourceFile, request: PutRequest) -> PutResult:
        container = self._require()
        metadata = checked_metadata(request.metadata)
        blob = container.get_blob_client(blob_name(self.config.prefix, request.key))
        with base.translated(classify_azure_error):
            if source.size < self.config.block_threshold:
                return await self._put_single(blob, source, request, metadata)
            return await self._put_blocks(blob, source, request, metadata)

    async def _put_single(
        self, blob: BlobClient, source: SourceFile, request: PutRequest, metadata: dict[str, str]
    ) -> PutResult:
        body = await source.read_all() if source.size else b""
        source.check_unchanged()
        if len(body) <= _INLINE_HASH:
            md5, sha256 = _digests(body, request.checksum)
        else:
            md5, sha256 = await asyncio.to_thread(_digests, body, request.checksum)
        if sha256 is not None:
            metadata[SHA256_NAME] = sha256
        if_absent = request.if_absent and self.config.conditional_put
        # `match_condition` (the stub spells it `match_conditions`; the client reads this one).
        condition: dict[str, Any] = {"match_condition": MatchConditions.IfMissing} if if_absent else {}
        try:
            await _within(
                2 * self.config.timeout,
                blob.upload_blob(
                    body,
                    blob_type=BlobType.BLOCKBLOB,
                    length=len(body),
                    metadata=metadata,
                    content_settings=ContentSettings(content_type=request.content_type),
                    overwrite=not if_absent,
                    max_concurrency=1,
                    # Content-MD5: the service checks the body against it (the SDK's own
                    # validate_content would hash again, on the event loop).
                    transactional_content_md5=md5,
                    **condition,
                ),
            )
        except HttpResponseError as exc:
            if if_absent and already_exists(exc):
                return PutResult(0, already_present=True)
            raise
        return PutResult(bytes_sent=len(body))

    async def _put_blocks(
        self, blob: BlobClient, source: SourceFile, request: PutRequest, metadata: dict[str, str]
    ) -> PutResult:
        """Stage the blocks, then commit them with the whole file's MD5 as the blob's own (and
        its SHA-256 as metadata when asked), both hashed as the blocks were read: no extra read."""
        whole = _Whole(sha256=request.checksum)
        ids = await self._stage_all(blob, source, whole)
        source.check_unchanged()
        if whole.sha256 is not None:
            metadata[SHA256_NAME] = whole.sha256.hexdigest()
        settings = ContentSettings(
            content_type=request.content_type, content_md5=bytearray(whole.md5.digest())
        )
        for attempt in range(COMMIT_ATTEMPTS):
            if attempt:
                await asyncio.sleep(COMMIT_PAUSE * 2 ** (attempt - 1))
                await self._restage_missing(blob, source, ids)
            try:
                blocks = [BlobBlock(block_id=i) for i in ids]
                commit = blob.commit_block_list(blocks, content_settings=settings, metadata=metadata)
                await _within(2 * self.config.timeout, commit)
                return PutResult(bytes_sent=source.size)
            except HttpResponseError as exc:
                if reply_parts(exc)[0] != "InvalidBlockList":
                    raise
                log.warning("azure_commit_refused", blob=blob.blob_name, attempt=attempt + 1)
        raise TransientFileError(
            f"azure: InvalidBlockList on commit {COMMIT_ATTEMPTS} times, with every block acknowledged"
        )

    async def _restage_missing(self, blob: BlobClient, source: SourceFile, ids: list[str]) -> None:
        """Stage again every block of `ids` the service does not hold uncommitted."""
        _, uncommitted = await _within(2 * self.config.timeout, blob.get_block_list("uncommitted"))
        held = {block.id for block in uncommitted}
        part = self._part_size(source.size)
        missing = [(index, block_id) for index, block_id in enumerate(ids) if block_id not in held]
        for index, block_id in missing:
            log.info("azure_block_staged_again", blob=blob.blob_name, block=index)
            offset = index * part
            body = await source.read(offset, min(part, source.size - offset))
            md5 = await asyncio.to_thread(_digests, body, False)
            staged = blob.stage_block(block_id, body, len(body), transactional_content_md5=md5[0])
            await _within(2 * self.config.timeout, staged)
        if missing:
            source.check_unchanged()  # a block read again must be the file that was read

    async def _stage_all(self, blob: BlobClient, source: SourceFile, whole: _Whole) -> list[str]:
        """Stage every block, `part_concurrency` at a time, read in order; their ids in order.

        Ids are fresh per attempt: a retry never meets a block of an attempt that failed."""
        size, part = source.size, self._part_size(source.size)
        token = secrets.token_hex(8)
        ids: list[str] = []
        running: set[asyncio.Task[Any]] = set()
        try:
            for offset in range(0, size, part):
                while len(running) >= self.config.part_concurrency:
                    running = await _first_done(running)
                body = await source.read(offset, min(part, size - offset))
                md5 = await asyncio.to_thread(whole.block, body)
                block_id = f"{token}-{len(ids):06d}"  # the SDK base64-encodes it
                staged = blob.stage_block(block_id, body, len(body), transactional_content_md5=md5)
                running.add(asyncio.ensure_future(_within(2 * self.config.timeout, staged)))
                ids.append(block_id)
                del body
            while running:
                running = await _first_done(running)
        finally:
            for task in running:
                task.cancel()
            if running:
                await asyncio.gather(*running, return_exceptions=True)
        return ids

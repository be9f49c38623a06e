"""The one interface every store implements; stores know files and keys, never jobs."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol

import aiohttp
import structlog

from uploader.config.settings import SkipExisting
from uploader.entries.files import SourceFile
from uploader.entries.manifest import key_problem
from uploader.errors import InfrastructureError, PermanentFileError, TransientFileError, UploaderError

log = structlog.get_logger("uploader.stores")

# User metadata holding the hex SHA-256 of the content, written when skip_existing is
# "same-checksum" (x-amz-meta-uploader-sha256 on S3, the meta prefix's header over HTTP).
SHA256_META = "uploader-sha256"
_HASH_CHUNK = 1024 * 1024

# A store's one translation of the errors its libraries raise: ours, or None when unknown.
Translate = Callable[[BaseException], UploaderError | None]


@dataclass(frozen=True, slots=True)
class PutRequest:
    key: str
    content_type: str
    metadata: Mapping[str, str] = field(default_factory=dict)
    # Where to send the object instead of the store's own place for `key` (presigned URL);
    # only stores that speak HTTP use it.
    url: str | None = None
    # Create only if absent where the store can in the same request (`Store.conditional`).
    if_absent: bool = False
    # Record the content's SHA-256 with the object (SHA256_META), for skip_existing checks.
    checksum: bool = False
    # Content-Encoding (`gzip` for `a.css.gz`, uploader/entries/contenttype.py); stores that speak
    # HTTP send it, None: none sent.
    content_encoding: str | None = None
    # The entry's own object fields (uploader/config/objectfields.py); None: the store's setting.
    cache_control: str | None = None
    content_disposition: str | None = None
    tagging: tuple[tuple[str, str], ...] | None = None


@dataclass(frozen=True, slots=True)
class StoredObject:
    """What a store says about an object it holds; checksums are hex, None when unknown."""

    size: int
    md5: str | None = None
    sha256: str | None = None


@dataclass(frozen=True, slots=True)
class PutResult:
    bytes_sent: int
    # True when the store already held the object and nothing was sent.
    already_present: bool = False


class Store(Protocol):
    async def start(self) -> None:
        """Open clients and pools; raise ConfigError for credentials the store refuses."""

    async def put(self, source: SourceFile, request: PutRequest) -> PutResult:
        """Store the whole file under `request.key`, idempotently.

        Raises TransientFileError/ThrottledError to be retried, PermanentFileError to fail.
        """

    def memory_needed(self, size: int) -> int:
        """Bytes `put` holds in memory for a file of `size`: charged to the in-flight budget."""

    async def stat(self, key: str, checksum: bool = False) -> StoredObject | None:
        """The stored object, None when absent (used to skip what is present).

        `checksum`: the caller will compare content; a store that must do extra work to know
        a checksum (read the object) does it only then.
        """

    def conditional(self, size: int) -> bool:
        """True when `put` with `if_absent` checks presence itself for a file of `size`, in
        the upload's own request (S3 If-None-Match): then no `stat` is needed first."""

    async def check(self) -> None:
        """Raise if the store is unreachable; used by readiness probes."""

    async def close(self) -> None: ...


class translated:
    """Raise what the block's libraries raise as `translate` says, once, at the store's edge;
    an error it does not know (or returns as is) goes on unchanged, and cancellation too.

    A class, not a generator: it runs on every put, and costs under a third as much this way."""

    __slots__ = ("_translate",)

    def __init__(self, translate: Translate) -> None:
        self._translate = translate

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if not isinstance(exc, Exception):
            return
        error = self._translate(exc)
        if error is not None and error is not exc:
            raise error from None


def probe_failure(translate: Translate, what: str) -> Translate:
    """`translate` for a store's `check`: whatever it knows means the store is not usable."""

    def unusable(exc: BaseException) -> UploaderError | None:
        error = translate(exc)
        return None if error is None else InfrastructureError(f"{what}: {error}")

    return unusable


def transport_error(exc: BaseException, store: str) -> TransientFileError | None:
    """The connection's failures, for any store that speaks HTTP: each worth a retry.

    The library's own message is left out: the URL it names may be presigned, its query a
    credential."""
    if isinstance(exc, aiohttp.ClientConnectorError):
        reason = exc.os_error.strerror
        return TransientFileError(f"{store}: cannot connect to {exc.host}:{exc.port}: {reason}")
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return TransientFileError(f"{store}: server disconnected")
    if isinstance(exc, aiohttp.ClientError):
        return TransientFileError(f"{store}: connection error: {type(exc).__name__}")
    if isinstance(exc, TimeoutError):
        return TransientFileError(f"{store}: request timed out")
    if isinstance(exc, OSError):
        return TransientFileError(f"{store}: connection error: {exc.strerror or type(exc).__name__}")
    return None


def checked_key(key: str, store: str) -> str:
    """`key`, or PermanentFileError when `key_problem` refuses it: no key climbs out of the
    store's root or prefix, whoever built it."""
    if (problem := key_problem(key)) is not None:
        raise PermanentFileError(f"{store}: {problem}: {key!r}")
    return key


async def already_stored(store: Store, key: str, source: SourceFile, mode: SkipExisting) -> bool:
    """Whether `key` already holds this file, as `mode` judges; False when the store's
    conditional put will decide instead (no request spent here)."""
    if mode == "never" or store.conditional(source.size):
        return False
    stored = await store.stat(key, checksum=mode == "same-checksum")
    if stored is None or stored.size != source.size:
        return False
    if mode == "same-size":
        return True
    if stored.sha256 is not None:
        return await file_digest(source, "sha256") == stored.sha256
    if stored.md5 is not None:
        return await file_digest(source, "md5") == stored.md5
    log.info("skip_existing_size_only", key=key, reason="the store keeps no checksum for this object")
    return True


async def file_digest(source: SourceFile, algorithm: Literal["md5", "sha256"]) -> str:
    """Hex digest of the whole file: small ones on the loop, bigger ones in one thread call
    (hashlib releases the GIL), read in 1 MiB pieces so memory stays bounded."""
    if source.size <= _HASH_CHUNK:
        data = source.pread(0, source.size) if source.size else b""
        return hashlib.new(algorithm, data, usedforsecurity=False).hexdigest()
    fd = os.dup(source.fd)  # its own descriptor: a cancelled caller may close the source
    return await asyncio.to_thread(_digest_and_close, fd, source.size, algorithm)


def _digest_and_close(fd: int, size: int, algorithm: str) -> str:
    try:
        h = hashlib.new(algorithm, usedforsecurity=False)
        for offset in range(0, size, _HASH_CHUNK):
            chunk = os.pread(fd, min(_HASH_CHUNK, size - offset), offset)
            if not chunk:
                break  # shrank: the digest differs and the upload's own checks decide
            h.update(chunk)
        return h.hexdigest()
    finally:
        os.close(fd)

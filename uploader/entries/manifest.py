"""What a job asks for: the job body, and its file list read from Redis one page at a time."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import urlsplit

import redis.asyncio as aioredis
import redis.exceptions

from uploader.config.objectfields import ObjectFields, entry_fields
from uploader.errors import BadJobError
from uploader.redisio import Keys, until_done

JOB_ID = re.compile(r"^[A-Za-z0-9._:-]{1,200}\Z")  # \Z, not $: "$" also matches before a final "\n"
MAX_ENTRY_BYTES = 64 * 1024
MAX_KEY_BYTES = 1024
META_KEY = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
MAX_METADATA_BYTES = 2048
MAX_URL_BYTES = 8192
ENTRY_FIELDS = frozenset(
    {"path", "key", "content_type", "metadata", "url"}
    | {"cache_control", "content_disposition", "content_encoding", "tagging"}
)


@dataclass(frozen=True, slots=True)
class Entry:
    index: int
    path: str
    key: str | None = None
    content_type: str | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)
    # A presigned http(s) URL to PUT this file to (the http store only); None: built from the key.
    url: str | None = None
    # cache_control, content_disposition, content_encoding, tagging; None: none given.
    fields: ObjectFields | None = None


@dataclass(frozen=True, slots=True)
class BadEntry:
    """An entry refused before any file is touched; `label` names it in the failed hash."""

    index: int
    label: str
    reason: str


@dataclass(frozen=True, slots=True)
class JobSpec:
    id: str
    # Entries carried in the body itself (a JSON job); None when the list lives in Redis.
    inline: tuple[object, ...] | None = None


def parse_body(body: bytes) -> JobSpec:
    """A job body is a bare job ID, or a JSON object {"id": ..., "files": [...]}."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise BadJobError("job body is not UTF-8") from None
    if text.startswith("{"):
        return _parse_json_body(text)
    if not JOB_ID.match(text):
        raise BadJobError(f"job body is not a job ID (1-200 of A-Z a-z 0-9 . _ : -): {_clip(text)!r}")
    return JobSpec(text)


def _parse_json_body(text: str) -> JobSpec:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadJobError(f"job body is not valid JSON: {exc}") from None
    except RecursionError:  # json's C parser recurses per nesting level: a 60 KB body is enough
        raise BadJobError("job body is not valid JSON: nested too deeply") from None
    if not isinstance(data, dict):
        raise BadJobError("JSON job body must be an object")
    job_id, files = data.get("id"), data.get("files")
    if not isinstance(job_id, str) or not JOB_ID.match(job_id):
        raise BadJobError(f'JSON job body needs "id", a job ID string, got {_clip(repr(job_id))}')
    if not isinstance(files, list):
        raise BadJobError(f'JSON job body needs "files", a list, got {type(files).__name__}')
    unknown = sorted(set(data) - {"id", "files"})
    if unknown:
        raise BadJobError(f"JSON job body has unknown field {unknown[0]!r}")
    return JobSpec(job_id, tuple(files))


def _clip(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def parse_entry(index: int, raw: object) -> Entry | BadEntry:
    """One manifest entry: an absolute path, or a JSON object with at least "path"."""
    value: object = raw
    if isinstance(value, bytes):
        if len(value) > MAX_ENTRY_BYTES:
            return BadEntry(index, f"#{index}", f"entry is larger than {MAX_ENTRY_BYTES} bytes")
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            label = raw[:200].decode("utf-8", "backslashreplace") if isinstance(raw, bytes) else ""
            return BadEntry(index, label, "entry is not UTF-8")
    if isinstance(value, str):
        if not value.startswith("{"):
            return _path_entry(index, value)
        text = value
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            return BadEntry(index, _clip(text, 200), f"entry is not valid JSON: {exc}")
        except RecursionError:
            return BadEntry(index, _clip(text, 200), "entry is not valid JSON: nested too deeply")
    if not isinstance(value, dict):
        return BadEntry(index, _clip(repr(value), 200), "entry must be a path or a JSON object")
    return _object_entry(index, value)


def _path_entry(index: int, path: str) -> Entry | BadEntry:
    if not path:
        return BadEntry(index, f"#{index}", "empty entry")
    if any(c in path for c in "\x00\r\n"):
        return BadEntry(index, _clip(repr(path), 200), "path contains a control character")
    if not path.startswith("/"):
        return BadEntry(index, _clip(path, 200), "path is not absolute")
    return Entry(index, path)


def _object_entry(index: int, obj: dict[str, object]) -> Entry | BadEntry:
    path = obj.get("path")
    if not isinstance(path, str):
        return BadEntry(index, f"#{index}", 'JSON entry needs "path", a string')
    label = _clip(path, 200) or f"#{index}"
    unknown = sorted(set(obj) - ENTRY_FIELDS)
    if unknown:
        return BadEntry(index, label, f"JSON entry has unknown field {unknown[0]!r}")
    base = _path_entry(index, path)
    if isinstance(base, BadEntry):
        return base
    key = obj.get("key")
    if key is not None and (reason := key_problem(key)):
        return BadEntry(index, label, reason)
    content_type = obj.get("content_type")
    if content_type is not None and (
        not isinstance(content_type, str)
        or not content_type
        or len(content_type) > 255
        or not content_type.isprintable()
    ):
        return BadEntry(index, label, "content_type must be a printable string of 1-255 characters")
    metadata = obj.get("metadata", {})
    if (reason := _metadata_problem(metadata)) is not None:
        return BadEntry(index, label, reason)
    url = obj.get("url")
    if url is not None and (reason := _url_problem(url)) is not None:
        return BadEntry(index, label, reason)
    fields = entry_fields(obj)
    if isinstance(fields, str):
        return BadEntry(index, label, fields)
    assert isinstance(metadata, dict)
    assert key is None or isinstance(key, str)
    assert content_type is None or isinstance(content_type, str)
    assert url is None or isinstance(url, str)
    return Entry(index, path, key, content_type, metadata, url, fields)


def _url_problem(url: object) -> str | None:
    if not isinstance(url, str) or not url or len(url) > MAX_URL_BYTES:
        return f"url must be a string of 1-{MAX_URL_BYTES} characters"
    if not url.isascii() or not url.isprintable() or " " in url:
        return "url must be printable ASCII without spaces (percent-encode the rest)"
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "url must be an http(s) URL with a host"
    return None


def key_problem(key: object) -> str | None:
    """Why an object key is refused, or None: keys may not climb out of the store's prefix."""
    if not isinstance(key, str) or not key:
        return "key must be a non-empty string"
    if len(key.encode("utf-8")) > MAX_KEY_BYTES:
        return f"key is longer than {MAX_KEY_BYTES} bytes"
    if key.startswith("/") or "\\" in key:
        return "key must not start with '/' or contain '\\'"
    if any(part in ("", ".", "..") for part in key.split("/")):
        return "key must not contain empty, '.' or '..' segments"
    if not key.isprintable():
        return "key contains a control character"
    return None


def _metadata_problem(metadata: object) -> str | None:
    if not isinstance(metadata, dict):
        return "metadata must be an object of strings"
    size = 0
    for k, v in metadata.items():
        if not isinstance(k, str) or not META_KEY.match(k):
            return f"metadata key {_clip(repr(k))} must be 1-128 of A-Z a-z 0-9 _ -"
        if not isinstance(v, str) or not v.isascii() or not v.isprintable():
            return f"metadata value for {k!r} must be a printable ASCII string"
        size += len(k) + len(v)
    if size > MAX_METADATA_BYTES:
        return f"metadata is larger than {MAX_METADATA_BYTES} bytes"
    return None


@dataclass(frozen=True, slots=True)
class Page:
    start: int
    entries: Sequence[object]
    # The resume bitmap's bytes covering this page (may be short or empty).
    marks: bytes
    cancelled: bool

    def is_marked(self, index: int) -> bool:
        byte, bit = divmod(index - (self.start - self.start % 8), 8)
        return byte < len(self.marks) and bool(self.marks[byte] & (0x80 >> bit))


class Manifest(Protocol):
    async def length(self) -> int: ...
    async def page(self, start: int, count: int) -> Page: ...
    def prime(self, head: Page) -> None: ...


class _Primed:
    """The first page, when the job's first read had it already: not read twice."""

    _head: Page | None = None

    def prime(self, head: Page) -> None:
        self._head = head

    def _primed(self, start: int) -> Page | None:
        head, self._head = self._head, None
        return head if head is not None and start == head.start else None


class RedisManifest(_Primed):
    """A job's list in Redis, read by LRANGE with the resume marks and cancel flag alongside."""

    def __init__(self, redis: aioredis.Redis, keys: Keys, job_id: str) -> None:
        self._redis = redis
        self._keys = keys
        self._job_id = job_id

    async def length(self) -> int:
        key = self._keys.files(self._job_id)

        async def call() -> list[object]:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.type(key)
                pipe.llen(key)
                result: list[object] = await pipe.execute(raise_on_error=False)
                return result

        kind, length = await until_done(call, "llen")
        assert isinstance(kind, bytes)
        if kind == b"none":
            raise BadJobError(f"no files list at {key} (missing, expired or empty)")
        if kind != b"list":
            raise BadJobError(f"{key} is a Redis {kind.decode()}, not a list")
        assert isinstance(length, int)
        return length

    async def page(self, start: int, count: int) -> Page:
        if head := self._primed(start):
            return head
        files, marks, cancel = (
            self._keys.files(self._job_id),
            self._keys.marks(self._job_id),
            self._keys.cancel(self._job_id),
        )

        async def call() -> list[object]:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.lrange(files, start, start + count - 1)
                pipe.getrange(marks, start // 8, (start + count - 1) // 8)
                pipe.exists(cancel)
                result: list[object] = await pipe.execute(raise_on_error=False)
                return result

        entries, bitmap, cancelled = await until_done(call, "lrange")
        for value in (entries, bitmap):
            if isinstance(value, redis.exceptions.ResponseError):
                raise BadJobError(f"cannot read {files}: {value}")
        assert isinstance(entries, list)
        assert isinstance(bitmap, bytes)
        return Page(start, entries, bitmap, bool(cancelled))


class InlineManifest(_Primed):
    """Entries carried in a JSON job body; marks and cancel still live in Redis."""

    def __init__(self, redis: aioredis.Redis, keys: Keys, job_id: str, entries: tuple[object, ...]) -> None:
        self._redis = redis
        self._keys = keys
        self._job_id = job_id
        self._entries = entries

    async def length(self) -> int:
        return len(self._entries)

    async def page(self, start: int, count: int) -> Page:
        if head := self._primed(start):
            return head
        marks, cancel = self._keys.marks(self._job_id), self._keys.cancel(self._job_id)

        async def call() -> list[object]:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.getrange(marks, start // 8, (start + count - 1) // 8)
                pipe.exists(cancel)
                result: list[object] = await pipe.execute()
                return result

        bitmap, cancelled = await until_done(call, "getrange")
        assert isinstance(bitmap, bytes)
        return Page(start, self._entries[start : start + count], bitmap, bool(cancelled))

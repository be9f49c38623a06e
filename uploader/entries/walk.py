"""Manifest entries that name a directory: every regular file below it, a page at a time.

The walk (`Walker`) is plain blocking code run in a worker thread once per chunk of up to
`page_size` files, never once per file. It is iterative, with an explicit stack of the
directories on the current path, each holding its sorted child names: memory is the names of
those directories, not of the tree, and at most one chunk of entries exists at a time.
Each chunk also lists at most `page_size` directories, so a deep chain of empty directories
cannot keep one thread call busy for long. No file descriptor is held between calls.

Symlinks are never followed into directories: a directory is opened with O_NOFOLLOW, its
device and inode must be the ones the listing named, and its real place (read back from
/proc) must lie in the allowed root. A symlink to a directory is not descended (so `a -> ..`
cannot loop). A symlink to a regular file is passed on like a file: `open_source` applies the
same checks as for any entry, so one whose target leaves the root is refused and recorded.

Resume. A file found under a directory entry gets the index `length + n`: `length` is the
job's list length as read when the job started, `n` counts the files of all directory
entries in list order, and the walk order is deterministic (names sorted bytewise in every
directory). Marks stay in the job's one bitmap, so `Progress` needs nothing new. An index is
only meaningful while the tree is unchanged, so each chunk's place and names are hashed and
the digest kept in `{prefix}job:{id}:walk` (field: the chunk's first index) before any file
of the chunk is dispatched. A re-delivered job honours a chunk's marks only when its digest
matches; otherwise it clears that chunk's bits and uploads the chunk again. A tree changed
between runs therefore costs re-uploads, never a skipped file (at least once, never zero).
The producer contract has the list complete before the job is put, so `length` is stable.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import stat
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field

import redis.asyncio as aioredis
import structlog

from uploader.entries.files import Root, is_under, opened_path, place
from uploader.entries.manifest import Entry, key_problem
from uploader.errors import PermanentFileError
from uploader.redisio import Keys, until_done

log = structlog.get_logger("uploader.entries.walk")

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK

_FILE, _DIR, _LINK = 0, 1, 2
# Entries classified (one lstat each) per turn of the event loop.
CLASSIFY_SLICE = 100


@dataclass(frozen=True, slots=True)
class Found:
    """A file under a directory entry (`reason` empty), or a part of the tree that failed."""

    path: str
    rel: str  # relative to the directory entry, '/'-separated
    reason: str = ""


@dataclass(slots=True)
class _Frame:
    path: str
    rel: str  # prefix for children's rel: "" or "sub/dir/"
    names: list[tuple[str, int, int]]  # sorted (name, kind, inode)
    pos: int = 0


def _why(exc: OSError, path: str) -> str:
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied: {path!r}"
    if exc.errno == errno.ENOENT:
        return f"directory vanished while it was listed: {path!r}"
    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
        return f"replaced by a symlink or file while it was listed: {path!r}"
    return f"cannot list {path!r}: {exc.strerror or exc}"


class Walker:
    """Depth-first, name-ordered walk of one directory below an allowed root (blocking)."""

    def __init__(self, top: str, root: Root) -> None:
        self.top = os.path.normpath(top)
        self.root = root
        self._stack: list[_Frame] = []
        self.symlinked_dirs = 0  # not descended
        self.others = 0  # FIFOs, sockets, devices, symlinks to those or to nothing: not files

    @property
    def done(self) -> bool:
        return not self._stack

    def open_top(self) -> None:
        """List the entry's own directory; PermanentFileError when it may not be walked."""
        try:
            names = self._list(self.top, None)
        except OSError as exc:
            raise PermanentFileError(_why(exc, self.top)) from None
        self._stack.append(_Frame(self.top, "", names))

    def _list(self, path: str, inode: int | None) -> list[tuple[str, int, int]]:
        fd = os.open(path, _DIR_FLAGS)
        try:
            if inode is not None and os.fstat(fd).st_ino != inode:
                raise OSError(errno.ELOOP, "replaced while listed")
            real = opened_path(fd)
            if real is not None and not is_under(real, self.root.real):
                raise PermanentFileError(f"directory resolves outside its allowed root: {path!r}")
            items: list[tuple[str, int, int]] = []
            with os.scandir(fd) as it:
                for e in it:
                    kind = self._kind(e)
                    if kind is not None:
                        items.append((e.name, kind, e.inode()))
        finally:
            os.close(fd)
        items.sort(key=lambda item: os.fsencode(item[0]))
        return items

    def _kind(self, e: os.DirEntry[str]) -> int | None:
        try:
            if e.is_dir(follow_symlinks=False):
                return _DIR
            if e.is_file(follow_symlinks=False):
                return _FILE
            if e.is_symlink():
                if e.is_dir():
                    self.symlinked_dirs += 1
                    return None
                if e.is_file():
                    return _LINK
        except OSError:
            pass  # a loop or a vanished target: not a file
        self.others += 1
        return None

    def next_chunk(self, limit: int) -> list[Found]:
        """Up to `limit` files (and failed subdirectories), listing at most `limit` directories."""
        out: list[Found] = []
        listed = 0
        stack = self._stack
        while stack and len(out) < limit:
            frame = stack[-1]
            if frame.pos >= len(frame.names):
                stack.pop()
                continue
            name, kind, inode = frame.names[frame.pos]
            path, rel = f"{frame.path}/{name}", frame.rel + name
            if kind != _DIR:
                frame.pos += 1
                out.append(self._checked(path, rel))
                continue
            if listed >= limit:
                break  # resumed here by the next call
            frame.pos += 1
            listed += 1
            try:
                names = self._list(path, inode)
            except PermanentFileError as exc:
                out.append(Found(_label(path), rel, exc.reason))
                continue
            except OSError as exc:
                out.append(Found(_label(path), rel, _why(exc, _label(path))))
                continue
            stack.append(_Frame(path, rel + "/", names))
        return out

    @staticmethod
    def _checked(path: str, rel: str) -> Found:
        try:
            rel.encode("utf-8")
        except UnicodeEncodeError:
            return Found(_label(path), "", "file name is not UTF-8")
        return Found(path, rel)


def _label(path: str) -> str:
    """`path` as text that Redis can store: undecodable bytes of a name shown as escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def classify(entries: Sequence[Entry], roots: tuple[Root, ...]) -> list[Root | None]:
    """For each entry, its root when it names a directory (lstat: a final symlink is not one).

    Paths outside the roots are not touched: the upload refuses them with the usual reason.
    """
    found: list[Root | None] = []
    for entry in entries:
        try:
            root, _ = place(entry.path, roots)
            is_dir = stat.S_ISDIR(os.lstat(entry.path).st_mode)
        except (PermanentFileError, OSError, ValueError):
            is_dir = False
        found.append(root if is_dir else None)
    return found


@dataclass(slots=True)
class Chunk:
    """What one step of an expansion yields: entries to upload (unmarked), failures to record
    as (index, label, reason), and how much the job's total changes."""

    entries: list[Entry] = field(default_factory=list)
    failures: list[tuple[int, str, str]] = field(default_factory=list)
    total_delta: int = 0


class DirectoryExpander:
    """Expands a job's directory entries into chunks of file entries, resume marks applied."""

    def __init__(
        self, redis: aioredis.Redis, keys: Keys, job_id: str, length: int, page_size: int, ttl: int
    ) -> None:
        self._redis = redis
        self._marks = keys.marks(job_id)
        self._walk_key = keys.walk(job_id)
        self._length = length
        self._next = length
        self._page = max(1, page_size)
        self._ttl = ttl

    async def directories(self, entries: Sequence[Entry], roots: tuple[Root, ...]) -> list[Root | None]:
        """`classify` on the loop, CLASSIFY_SLICE entries between yields.

        Not in a worker thread: an lstat is what `open_source` already does on the loop for
        every file, and a thread call per page cost a quarter of the null-store pipeline in GIL
        hand-offs (one per lstat), more than the lstats themselves.
        """
        found: list[Root | None] = []
        for start in range(0, len(entries), CLASSIFY_SLICE):
            if start:
                await asyncio.sleep(0)  # let uploads and Redis replies in between slices
            found += classify(entries[start : start + CLASSIFY_SLICE], roots)
        return found

    async def expand(self, entry: Entry, root: Root) -> AsyncGenerator[Chunk, None]:
        """The entry's files in chunks of up to a page, in walk order, marked ones left out."""
        if entry.url is not None:
            yield Chunk(failures=[(entry.index, entry.path, "a directory entry cannot carry a url")])
            return
        walker = Walker(entry.path, root)
        try:
            await asyncio.to_thread(walker.open_top)
        except PermanentFileError as exc:
            yield Chunk(failures=[(entry.index, entry.path, exc.reason)])
            return
        delta = -1  # the entry itself is replaced by its files
        first_index = self._next
        while not walker.done:
            found = await asyncio.to_thread(walker.next_chunk, self._page)
            if not found:
                continue
            first = self._next
            self._next += len(found)
            marks = await self._marks_for(entry.index, first, found)
            chunk = Chunk(total_delta=delta + len(found))
            delta = 0
            for i, item in enumerate(found):
                index = first + i
                key = None if entry.key is None or item.reason else f"{entry.key}/{item.rel}"
                reason = item.reason or (key_problem(key) if key is not None else None)
                if reason:
                    chunk.failures.append((index, item.path, reason))
                elif not _marked(marks, first, index):
                    chunk.entries.append(
                        Entry(index, item.path, key, entry.content_type, entry.metadata, fields=entry.fields)
                    )
            yield chunk
        log.info(
            "directory_walked",
            path=entry.path,
            files=self._next - first_index,
            symlinked_dirs_skipped=walker.symlinked_dirs,
            not_regular_skipped=walker.others,
        )
        if delta:
            yield Chunk(total_delta=delta)  # an empty directory: the entry just goes

    async def _marks_for(self, entry_index: int, first: int, found: list[Found]) -> bytes:
        """The bitmap bytes covering the chunk when its digest matches the last run's; else
        clear the chunk's bits, store its digest, and return no marks."""
        h = hashlib.blake2b(f"{self._length}:{entry_index}:{first}:{len(found)}".encode(), digest_size=12)
        for item in found:
            h.update(b"\0" + item.path.encode("utf-8", "surrogateescape") + b"\0" + item.reason.encode())
        digest = h.hexdigest()
        last = first + len(found) - 1

        async def read() -> list[object]:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.hget(self._walk_key, str(first))
                pipe.getrange(self._marks, first // 8, last // 8)
                result: list[object] = await pipe.execute()
                return result

        stored, bitmap = await until_done(read, "read walk digest")
        assert isinstance(bitmap, bytes)
        if isinstance(stored, bytes) and stored.decode() == digest:
            return bitmap

        async def write() -> None:
            async with self._redis.pipeline(transaction=False) as pipe:
                if any(bitmap):
                    args: list[str | int] = []
                    for index in range(first, last + 1):
                        args += ["SET", "u1", index, 0]
                    pipe.execute_command("BITFIELD", self._marks, *args)
                pipe.hset(self._walk_key, str(first), digest)
                pipe.expire(self._walk_key, self._ttl)
                await pipe.execute()

        await until_done(write, "write walk digest")
        return b""


def _marked(bitmap: bytes, first: int, index: int) -> bool:
    byte, bit = divmod(index - (first - first % 8), 8)
    return byte < len(bitmap) and bool(bitmap[byte] & (0x80 >> bit))


__all__ = ["Chunk", "DirectoryExpander", "Found", "Walker", "classify"]

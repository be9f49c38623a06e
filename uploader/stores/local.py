"""A store that is a directory tree: one file per object, written atomically.

Keys are split on '/' and walked one directory at a time with `openat`-style calls
(`dir_fd=`, `O_NOFOLLOW`), so neither a crafted key nor a symlink planted inside the store
root can make a write land outside it. Each object is copied into a temporary file next to
its final name and renamed over it, so a reader never sees a partial object.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import hashlib
import os
import secrets
import stat
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from typing import TypeVar

from uploader.config.stores import LocalStoreConfig
from uploader.entries.files import INLINE_READ_LIMIT, SourceFile, is_under, opened_path
from uploader.errors import (
    ConfigError,
    FileError,
    InfrastructureError,
    PermanentFileError,
    StoreUnavailableError,
    TransientFileError,
)
from uploader.stores.base import PutRequest, PutResult, StoredObject, checked_key, translated
from uploader.stores.localsync import Cancelled, GroupCommit, Staged

# One copy syscall moves at most this much, so a cancelled upload stops within one chunk.
CHUNK = 8 * 1024 * 1024
# Threads for puts without fsync. Such a put is ~15 fast syscalls, each of which drops and
# retakes the GIL; more threads only fight the event loop over it (tmpfs, 2 cores, whole
# daemon: 1 thread 5,400 files/s, 2: 4,300, the default 6: 4,100). With fsync on, threads
# wait on the disk, and the loop's default pool is kept.
NO_FSYNC_THREADS = 1
# A put of a file up to this size copies into its temporary file on the event loop, like the
# small reads of `entries/files.py`: ~15 syscalls that never wait on the disk cost less there
# than the GIL hand-offs of a thread hop (tmpfs, 2 cores, whole daemon: 6,400 -> 13,500
# files/s unpinned). With fsync on, only the copy runs there: the fsyncs wait in the batch's
# thread.
INLINE_PUT_LIMIT = INLINE_READ_LIMIT

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_TMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC

# The store itself refuses writes: no file is to blame, and the daemon waits for the store.
_OUTAGE_REASONS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}
_TRANSIENT_REASONS = {
    errno.EIO: "I/O error",
}
_PERMANENT_REASONS = {
    errno.EISDIR: "the key names an existing directory",
    errno.ENOTDIR: "a parent of the key is not a directory",
    errno.ELOOP: "a symlink in the key's path was refused",
    errno.ENAMETOOLONG: "key name too long",
    errno.EFBIG: "file too large for the store's file system",
}
# Copy syscalls that the file systems involved do not support: fall back to the next way.
_UNSUPPORTED = frozenset({errno.ENOSYS, errno.EXDEV, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP})


_T = TypeVar("_T")
_NEVER = threading.Event()  # the cancellation flag of an inline put: never set


def split_key(key: str) -> list[str]:
    """The key's path segments, or PermanentFileError for a key that could escape the root."""
    return checked_key(key, "local store").split("/")


def translate_os_error(exc: OSError, key: str) -> FileError:
    """One-line, human reason for an OSError met while storing `key`."""
    code = exc.errno or 0
    if code in _OUTAGE_REASONS:
        # Permission may be refused below the root alone; space and a read-only mount never are.
        per_key = code in (errno.EACCES, errno.EPERM)
        return StoreUnavailableError(f"local store: {_OUTAGE_REASONS[code]}", per_key)
    if code in _TRANSIENT_REASONS:
        return TransientFileError(f"local store: {_TRANSIENT_REASONS[code]}")
    if code in _PERMANENT_REASONS:
        return PermanentFileError(f"local store: {_PERMANENT_REASONS[code]}: {key!r}")
    return TransientFileError(f"local store: {exc.strerror or exc} (errno {code}) for {key!r}")


def _os_errors(key: str) -> AbstractContextManager[None]:
    """The block's OSErrors leave the store as `translate_os_error` words them for `key`."""
    return translated(lambda exc: translate_os_error(exc, key) if isinstance(exc, OSError) else None)


PROBE_BYTES = 4096  # one block: a full file system refuses it, where an empty file may pass


def _write_probe(root: str) -> None:
    """Write and remove a block-sized file in the root: what a put needs, short of a key.

    `os.access` is not enough: root passes it on a read-only mount, and a full disk still
    answers yes."""
    name = os.path.join(root, f".uploader-probe-{os.getpid()}-{threading.get_ident()}")
    try:
        fd = os.open(name, _TMP_FLAGS, 0o600)
        try:
            os.write(fd, bytes(PROBE_BYTES))
        finally:
            os.close(fd)
            os.unlink(name)
    except OSError as exc:
        reason = _OUTAGE_REASONS.get(exc.errno or 0) or exc.strerror or str(exc)
        raise InfrastructureError(f"local store: cannot write to root {root!r}: {reason}") from None


class LocalStore:
    def __init__(self, config: LocalStoreConfig, where: str = "[store.local].root") -> None:
        self.config = config
        self.root = config.root
        self.where = where  # "FILE: [store.local].root", for the one error that names the key
        self._root_real: str | None = None  # resolved once at start, not per object
        self._executor: ThreadPoolExecutor | None = None  # None: the loop's default pool
        # With fsync on, puts become durable in shared batches (`localsync.py`).
        self._commits = GroupCommit() if config.fsync else None

    def memory_needed(self, size: int) -> int:
        return 0  # the kernel copies between descriptors; nothing is held in our memory

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        try:
            await asyncio.to_thread(os.makedirs, self.root, exist_ok=True)
        except OSError as exc:  # one line at startup (exit 2), not a traceback
            reason = exc.strerror or str(exc)
            raise ConfigError(f"{self.where}: cannot create {self.root!r}: {reason}") from None
        self._root_real = await asyncio.to_thread(os.path.realpath, self.root)
        if not self.config.fsync and self._executor is None:
            self._executor = ThreadPoolExecutor(NO_FSYNC_THREADS, thread_name_prefix="local-store")

    async def close(self) -> None:
        if self._commits is not None:
            self._commits.close()
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False)  # no put is running: the daemon closes stores last

    async def check(self) -> None:
        def probe() -> None:
            try:
                st = os.stat(self.root)
            except OSError as exc:
                raise InfrastructureError(
                    f"local store: root {self.root!r} unusable: {exc.strerror}"
                ) from None
            if not stat.S_ISDIR(st.st_mode):
                raise InfrastructureError(f"local store: root {self.root!r} is not a directory")
            _write_probe(self.root)

        await asyncio.to_thread(probe)

    # -- objects -----------------------------------------------------------------------------

    def conditional(self, size: int) -> bool:
        return False

    async def stat(self, key: str, checksum: bool = False) -> StoredObject | None:
        """The stored file's size; with `checksum`, its SHA-256 too (the file is read)."""
        parts = split_key(key)
        return await asyncio.to_thread(self._stat, key, parts, checksum)

    async def put(self, source: SourceFile, request: PutRequest) -> PutResult:
        """Returns once the object is whole under its name, and durable there with fsync on."""
        parts = split_key(request.key)
        # The copy works on its own descriptor: if this task is cancelled and the caller
        # closes the source, the number cannot be reused under the running thread.
        fd = os.dup(source.fd)
        inline = source.size <= INLINE_PUT_LIMIT  # done before it returns: nothing to cancel
        args = (fd, source.size, source.check_unchanged, request.key, parts)
        if self._commits is None:
            if inline:
                return self._put(*args, _NEVER)
            return await self._in_thread(functools.partial(self._put, *args))
        if inline:
            staged = self._stage(*args, _NEVER)
        else:
            staged = await self._in_thread(functools.partial(self._stage, *args))
        with _os_errors(request.key):
            await self._commits.commit(staged)
        return PutResult(bytes_sent=source.size)

    async def _in_thread(self, work: Callable[[threading.Event], _T]) -> _T:
        """`work(cancelled)` in a worker thread; a cancellation waits for its cleanup."""
        cancelled = threading.Event()
        # A bare executor future, not a Task: the upload costs no extra task to shield it.
        task = asyncio.get_running_loop().run_in_executor(self._executor, work, cancelled)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            # Let the thread notice, remove its temporary file and close its descriptor
            # before the caller goes on; a second cancellation stops the wait, not the cleanup.
            cancelled.set()
            await asyncio.wait([task])
            if not task.cancelled() and task.exception() is None:
                result = task.result()
                if isinstance(result, Staged):  # copied before it saw the flag: discard it
                    result.close()
            raise

    # -- blocking work, run in one worker thread per call (or inline for small files) -----

    def _open_parent(self, key: str, parts: list[str], create: bool) -> tuple[int, list[int]]:
        """Descriptor of the key's parent directory, walked without following symlinks.

        Returns it with the descriptors of directories this call created entries in (to be
        fsynced); the caller closes all of them.
        """
        root_real = self._root_real or os.path.realpath(self.root)
        dfd = os.open(root_real, _DIR_FLAGS)
        touched: list[int] = []
        try:
            for name in parts[:-1]:
                try:
                    # Most directories exist already: open first, mkdir only when missing.
                    child = _open_dir(name, dfd, create, touched)
                except OSError as exc:
                    if exc.errno in (errno.ENOTDIR, errno.ELOOP) and _is_symlink(name, dfd):
                        raise PermanentFileError(
                            f"local store: a symlink in the key's path was refused: {key!r}"
                        ) from None
                    raise
                os.close(dfd)
                dfd = child
            real = opened_path(dfd)
            if real is not None and not is_under(real, root_real):
                raise PermanentFileError(f"local store: key resolves outside the root: {key!r}")
            return dfd, touched
        except BaseException:
            os.close(dfd)
            for fd in touched:
                os.close(fd)
            raise

    def _stat(self, key: str, parts: list[str], checksum: bool) -> StoredObject | None:
        with _os_errors(key):
            try:
                dfd, _ = self._open_parent(key, parts, create=False)
            except OSError as exc:
                if isinstance(exc, FileNotFoundError) or exc.errno == errno.ENOTDIR:
                    return None
                raise
            try:
                st = os.stat(parts[-1], dir_fd=dfd, follow_symlinks=False)
                if not stat.S_ISREG(st.st_mode):
                    return None
                if not checksum:
                    return StoredObject(st.st_size)
                fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
            except FileNotFoundError:
                return None
            finally:
                os.close(dfd)
            try:
                h, size = hashlib.sha256(), 0
                while chunk := os.read(fd, 1024 * 1024):
                    h.update(chunk)
                    size += len(chunk)
            finally:
                os.close(fd)
        return StoredObject(size, sha256=h.hexdigest())

    def _put(
        self,
        src: int,
        size: int,
        check_unchanged: Callable[[], None],
        key: str,
        parts: list[str],
        cancelled: threading.Event,
    ) -> PutResult:
        """Without fsync: copy into a temporary file and rename it over the name at once."""
        dfd = -1
        touched: list[int] = []
        try:
            with _os_errors(key):
                dfd, touched = self._open_parent(key, parts, create=True)
                _refuse_directory(parts[-1], dfd, key)
                tmp_name, tmp_fd = _copy_to_temp(src, size, dfd, check_unchanged, cancelled)
                os.close(tmp_fd)
                try:
                    os.replace(tmp_name, parts[-1], src_dir_fd=dfd, dst_dir_fd=dfd)
                except BaseException:
                    with contextlib.suppress(OSError):
                        os.unlink(tmp_name, dir_fd=dfd)
                    raise
            return PutResult(bytes_sent=size)
        finally:
            for fd in (dfd, *touched) if dfd >= 0 else ():
                os.close(fd)
            os.close(src)

    def _stage(
        self,
        src: int,
        size: int,
        check_unchanged: Callable[[], None],
        key: str,
        parts: list[str],
        cancelled: threading.Event,
    ) -> Staged:
        """Copy into a temporary file beside the key's name: neither durable nor visible yet."""
        try:
            with _os_errors(key):
                dfd, touched = self._open_parent(key, parts, create=True)
                try:
                    _refuse_directory(parts[-1], dfd, key)
                    tmp_name, tmp_fd = _copy_to_temp(src, size, dfd, check_unchanged, cancelled)
                except BaseException:
                    for fd in (dfd, *touched):
                        os.close(fd)
                    raise
                return Staged(dfd, tmp_name, tmp_fd, parts[-1], touched)
        finally:
            os.close(src)


def _copy_to_temp(
    src: int, size: int, dfd: int, check_unchanged: Callable[[], None], cancelled: threading.Event
) -> tuple[str, int]:
    """A new temporary file in `dfd` holding the source's bytes, as name and open descriptor."""
    # Not derived from the key's name: a name near NAME_MAX (255 bytes) must still fit.
    tmp_name = f".{secrets.token_hex(8)}.tmp"
    tmp_fd = os.open(tmp_name, _TMP_FLAGS, 0o644, dir_fd=dfd)
    try:
        _copy(src, tmp_fd, size, cancelled)
        check_unchanged()
        if cancelled.is_set():
            raise Cancelled
    except BaseException:
        os.close(tmp_fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp_name, dir_fd=dfd)
        raise
    return tmp_name, tmp_fd


def _copy(src: int, dst: int, size: int, cancelled: threading.Event) -> None:
    """Copy `size` bytes from offset 0 of `src` to `dst`, in the kernel where it can."""
    offset = 0
    way = "copy_file_range" if hasattr(os, "copy_file_range") else "sendfile"
    while offset < size:
        if cancelled.is_set():
            raise Cancelled
        count = min(CHUNK, size - offset)
        n = 0
        try:
            if way == "copy_file_range":
                n = os.copy_file_range(src, dst, count, offset)
            elif way == "sendfile":
                n = os.sendfile(dst, src, offset, count)
            else:
                n = _read_write(src, dst, offset, count)
        except OSError as exc:
            if way == "read_write" or exc.errno not in _UNSUPPORTED:
                raise
            way = "sendfile" if way == "copy_file_range" else "read_write"
            continue
        if n == 0:
            if way != "read_write":
                # Some file systems report 0 instead of an error: let plain reads decide.
                way = "read_write"
                continue
            raise TransientFileError("file shrank while it was read")
        offset += n


def _read_write(src: int, dst: int, offset: int, count: int) -> int:
    data = os.pread(src, count, offset)
    view = memoryview(data)
    while view:
        written = os.write(dst, view)
        view = view[written:]
    return len(data)


def _open_dir(name: str, dfd: int, create: bool, touched: list[int]) -> int:
    """Open directory `name` under `dfd`, creating it if asked; a created one's parent joins
    `touched` (to be fsynced)."""
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=dfd)
    except FileNotFoundError:
        if not create:
            raise
    try:
        os.mkdir(name, 0o755, dir_fd=dfd)
        touched.append(os.dup(dfd))
    except FileExistsError:
        pass  # made by a concurrent upload in the meantime
    return os.open(name, _DIR_FLAGS, dir_fd=dfd)


def _is_symlink(name: str, dir_fd: int) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def _refuse_directory(name: str, dir_fd: int, key: str) -> None:
    """A key naming an existing directory fails: renaming a file over it cannot work."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        raise PermanentFileError(f"local store: the key names an existing directory: {key!r}")

"""Opening a producer's file safely: inside the allowed roots, by what was opened, not by name.

The name is checked first (cheap, gives a readable reason), then the file is opened without
following a final symlink and without blocking on FIFOs, and the *opened* file is checked
again, so a symlink swapped in between the check and the open cannot leak a file.
"""

from __future__ import annotations

import asyncio
import errno
import os
import stat
from dataclasses import dataclass

from uploader.errors import PermanentFileError, TransientFileError

# Reads up to this size happen on the event loop: a page-cache read of a few KiB costs less
# than the thread hop that would hide it.
INLINE_READ_LIMIT = 64 * 1024

_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY


@dataclass(frozen=True, slots=True)
class Root:
    """An allowed root as configured and as it really is on disk."""

    configured: str
    real: str

    @classmethod
    def of(cls, path: str) -> Root:
        return cls(configured=os.path.normpath(path), real=os.path.realpath(path))


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def locate(path: str, roots: tuple[Root, ...]) -> tuple[Root, str]:
    """Return the root that holds `path` and the path relative to it, or refuse it.

    Only the name is examined here; `open_source` checks what the name resolves to.
    """
    if not path:
        raise PermanentFileError("empty path")
    if "\x00" in path:
        raise PermanentFileError("path contains a NUL byte")
    if not os.path.isabs(path):
        raise PermanentFileError(f"path is not absolute: {path!r}")
    if ".." in path.split("/"):
        raise PermanentFileError(f"path contains '..': {path!r}")
    normal = os.path.normpath(path)
    for root in roots:
        for base in (root.configured, root.real):
            if _under(normal, base) and normal != base:
                # Both are normalised and `normal` lies below `base`: slicing is relpath.
                return root, normal[len(base.rstrip("/")) + 1 :]
    raise PermanentFileError(f"path outside the allowed roots: {path!r}")


class SourceFile:
    """An open, checked, regular file; reads go by offset so retries can start over."""

    __slots__ = ("_ino", "_mtime_ns", "fd", "path", "size")

    def __init__(self, fd: int, path: str, st: os.stat_result) -> None:
        self.fd = fd
        self.path = path
        self.size = st.st_size
        self._ino = st.st_ino
        self._mtime_ns = st.st_mtime_ns

    def pread(self, offset: int, length: int) -> bytes:
        return _pread_exactly(self.fd, offset, length)

    async def read(self, offset: int, length: int) -> bytes:
        if length <= INLINE_READ_LIMIT:
            return self.pread(offset, length)
        # The thread reads its own duplicate: if this task is cancelled and the file closed,
        # the number cannot be reused for another file under the still-running read.
        fd = os.dup(self.fd)
        return await asyncio.to_thread(_pread_and_close, fd, offset, length)

    async def read_all(self) -> bytes:
        return await self.read(0, self.size)

    def check_unchanged(self) -> None:
        """Refuse an upload of a file that was modified while it was read."""
        st = os.fstat(self.fd)
        if (st.st_size, st.st_mtime_ns, st.st_ino) != (self.size, self._mtime_ns, self._ino):
            raise TransientFileError("file changed while it was uploaded")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> SourceFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _pread_exactly(fd: int, offset: int, length: int) -> bytes:
    """Read exactly `length` bytes at `offset`; a short read means the file shrank."""
    chunks: list[bytes] = []
    while length > 0:
        chunk = os.pread(fd, length, offset)
        if not chunk:
            raise TransientFileError("file shrank while it was read")
        chunks.append(chunk)
        offset += len(chunk)
        length -= len(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _pread_and_close(fd: int, offset: int, length: int) -> bytes:
    try:
        return _pread_exactly(fd, offset, length)
    finally:
        os.close(fd)


def _refusal(exc: OSError, path: str) -> PermanentFileError | TransientFileError:
    if exc.errno == errno.ENOENT:
        return PermanentFileError(f"file not found: {path!r}")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return PermanentFileError(f"permission denied: {path!r}")
    if exc.errno == errno.ELOOP:
        return PermanentFileError(f"symlink refused: {path!r}")
    if exc.errno == errno.ENOTDIR:
        return PermanentFileError(f"a parent of the path is not a directory: {path!r}")
    if exc.errno in (errno.EMFILE, errno.ENFILE, errno.EIO, errno.EAGAIN):
        return TransientFileError(f"cannot open {path!r}: {exc.strerror}")
    return PermanentFileError(f"cannot open {path!r}: {exc.strerror}")


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def open_source(path: str, root: Root, *, allow_hard_links: bool = False) -> SourceFile:
    """Open `path` (already `locate`d under `root`) for reading, or raise a FileError.

    The common case, a regular file named without a final symlink, skips `realpath` (an lstat
    per path component): the file is opened without following a final symlink and its real
    place, read back from /proc, decides. Opening a regular file has no side effects and
    nothing is read before that check. Anything else takes the path-resolving way below.
    """
    try:
        st = os.lstat(path)
    except OSError:
        st = None
    if st is not None and stat.S_ISREG(st.st_mode):
        opened = _open_regular(path, root, st, allow_hard_links)
        if opened is not None:
            return opened
    return _open_resolved(path, root, allow_hard_links)


def _open_regular(path: str, root: Root, st: os.stat_result, allow_hard_links: bool) -> SourceFile | None:
    """The fast way; None when /proc cannot say where the file is (then resolve by name)."""
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError:
        return None  # the slow way gives the same refusal, with the same reason
    try:
        target = _opened_path(fd)
        if target is None:
            os.close(fd)
            return None
        if not _under(target, root.real):
            raise PermanentFileError(f"path resolves outside its allowed root: {path!r}")
        return _checked(fd, path, st, allow_hard_links)
    except BaseException:
        os.close(fd)
        raise


def _checked(fd: int, path: str, st: os.stat_result, allow_hard_links: bool) -> SourceFile:
    """The opened descriptor is the regular file that was examined by name, or refused."""
    opened = os.fstat(fd)
    if not stat.S_ISREG(opened.st_mode):
        raise PermanentFileError(f"{_kind(opened.st_mode)}, not a regular file: {path!r}")
    if (opened.st_dev, opened.st_ino) != (st.st_dev, st.st_ino):
        raise PermanentFileError(f"file was replaced while it was opened: {path!r}")
    if opened.st_nlink > 1 and not allow_hard_links:
        raise PermanentFileError(f"file has several hard links, refused: {path!r}")
    return SourceFile(fd, path, opened)


def _open_resolved(path: str, root: Root, allow_hard_links: bool) -> SourceFile:
    """Resolve every symlink by name first, so a path leaving its root is refused unopened."""
    real = os.path.realpath(path)
    if not _under(real, root.real):
        raise PermanentFileError(f"path resolves outside its allowed root: {path!r}")
    try:
        st = os.lstat(real)
    except OSError as exc:
        raise _refusal(exc, path) from None
    if not stat.S_ISREG(st.st_mode):
        # Checked before open(): opening a device can have side effects.
        raise PermanentFileError(f"{_kind(st.st_mode)}, not a regular file: {path!r}")
    try:
        fd = os.open(real, _OPEN_FLAGS)
    except OSError as exc:
        raise _refusal(exc, path) from None
    try:
        opened = os.fstat(fd)
        if not stat.S_ISREG(opened.st_mode):
            raise PermanentFileError(f"{_kind(opened.st_mode)}, not a regular file: {path!r}")
        if (opened.st_dev, opened.st_ino) != (st.st_dev, st.st_ino):
            raise PermanentFileError(f"file was replaced while it was opened: {path!r}")
        target = _opened_path(fd)
        if target is not None and not _under(target, root.real):
            raise PermanentFileError(f"path resolves outside its allowed root: {path!r}")
        if opened.st_nlink > 1 and not allow_hard_links:
            raise PermanentFileError(f"file has several hard links, refused: {path!r}")
        return SourceFile(fd, path, opened)
    except BaseException:
        os.close(fd)
        raise


def _opened_path(fd: int) -> str | None:
    """What the kernel says the descriptor is, where /proc can tell."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None

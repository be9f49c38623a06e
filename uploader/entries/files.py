"""Opening a producer's file safely: inside the allowed roots, by what was opened, not by name.

The name is checked first (cheap, gives a readable reason), then the file is opened without
following a final symlink and without blocking on FIFOs, and the *opened* file is checked
again, so a symlink swapped in between the check and the open cannot leak a file.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import os
import stat
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass

from uploader.errors import PermanentFileError, TransientFileError

# Reads up to this size happen on the event loop: a page-cache read of a few KiB costs less
# than the thread hop that would hide it.
INLINE_READ_LIMIT = 64 * 1024

_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY


class _OpenHow(ctypes.Structure):
    _fields_ = (("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64))


_SYS_OPENAT2 = 437  # one number on every architecture (Linux 5.6+)
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_BENEATH = 0x08


def _openat2() -> Callable[[int, bytes], int] | None:
    """openat2(2) with RESOLVE_BENEATH: the kernel keeps the whole resolution inside the root's
    directory, in one syscall, where the portable way opens and then reads /proc to see where
    it landed. None where it is missing (old kernel, other OS) or filtered (seccomp)."""
    if sys.platform != "linux":
        return None
    try:
        syscall = ctypes.CDLL(None, use_errno=True).syscall
    except (OSError, AttributeError):
        return None
    syscall.restype = ctypes.c_long
    syscall.argtypes = (ctypes.c_long, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_size_t)
    how = _OpenHow(_OPEN_FLAGS, 0, _RESOLVE_BENEATH | _RESOLVE_NO_MAGICLINKS)
    how_ref, how_size = ctypes.byref(how), ctypes.sizeof(how)

    def open_beneath(dir_fd: int, relpath: bytes) -> int:
        """A descriptor, or -1 for any refusal (the caller then takes the resolving way)."""
        return int(syscall(_SYS_OPENAT2, dir_fd, relpath, how_ref, how_size))

    try:
        probe_dir = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fd = open_beneath(probe_dir, b".")
    finally:
        os.close(probe_dir)
    if fd < 0:
        return None
    os.close(fd)
    return open_beneath


_open_beneath = _openat2()
# The roots' directories, held open for openat2 (O_PATH: no access to them is needed). A
# daemon has a few roots; the bound is for processes that see many, like the test suite.
_root_dirs: dict[str, int] = {}
_MAX_ROOT_DIRS = 32
# Held from taking a directory's descriptor to the openat2 that uses it: closed meanwhile (by
# another thread), its number could be reused for a directory outside every root.
_root_dirs_lock = threading.Lock()


def _root_dir(root: Root) -> int | None:
    fd = _root_dirs.get(root.real)
    if fd is None:
        if len(_root_dirs) >= _MAX_ROOT_DIRS:
            _forget_root_dir(next(iter(_root_dirs)))
        try:
            fd = os.open(root.real, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            return None
        _root_dirs[root.real] = fd
    return fd


def _forget_root_dir(real: str) -> None:
    """After a refusal: the directory may have been replaced since it was opened, and the next
    file must not be looked up in the old one."""
    fd = _root_dirs.pop(real, None)
    if fd is not None:
        os.close(fd)


@dataclass(frozen=True, slots=True)
class Root:
    """An allowed root as configured and as it really is on disk."""

    configured: str
    real: str

    @classmethod
    def of(cls, path: str) -> Root:
        return cls(configured=os.path.normpath(path), real=os.path.realpath(path))


def is_under(path: str, root: str) -> bool:
    """Whether the normalised `path` is `root` or lies below it (a string test: no lookups)."""
    return path == root or path.startswith(root.rstrip("/") + "/")


def locate(path: str, roots: tuple[Root, ...]) -> tuple[Root, str]:
    """Return the root that holds the file `path` and the path relative to it, or refuse it.

    Only the name is examined here; `open_source` checks what the name resolves to. A root
    itself is a directory, so it is refused as one, not as lying outside the roots.
    """
    root, relpath = place(path, roots)
    if not relpath:
        raise PermanentFileError(f"a directory, not a regular file: {path!r}")
    return root, relpath


def place(path: str, roots: tuple[Root, ...]) -> tuple[Root, str]:
    """Like `locate`, but a root itself is accepted with relpath "": a directory entry may
    name it, and its files then get relpaths from the root."""
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
            if is_under(normal, base):
                # Both are normalised and `normal` is or lies below `base`: slicing is relpath.
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


def open_source(
    path: str, root: Root, *, allow_hard_links: bool = False, relpath: str | None = None
) -> SourceFile:
    """Open `path` (already `locate`d under `root`, `relpath` below it) for reading, or raise a
    FileError.

    The common case, a regular file named without a final symlink, skips `realpath` (an lstat
    per path component): the file is opened beneath the root's directory by openat2, or else
    opened without following a final symlink and its real place, read back from /proc,
    decides. Opening a regular file has no side effects and nothing is read before that
    check. Anything else, and anything those refuse, takes the path-resolving way below.
    """
    try:
        st = os.lstat(path)
    except OSError:
        st = None
    if st is not None and stat.S_ISREG(st.st_mode):
        if _open_beneath is not None:
            opened = _open_regular_beneath(path, relpath, root, st, allow_hard_links)
        else:
            opened = _open_regular(path, root, st, allow_hard_links)
        if opened is not None:
            return opened
    return _open_resolved(path, root, allow_hard_links)


def _open_regular_beneath(
    path: str, relpath: str | None, root: Root, st: os.stat_result, allow_hard_links: bool
) -> SourceFile | None:
    """The fast way with openat2; None when it refuses (then resolve by name, for the reason)."""
    assert _open_beneath is not None
    if relpath is None:
        try:
            relpath = locate(path, (root,))[1]
        except PermanentFileError:
            return None
    name = os.fsencode(relpath)
    with _root_dirs_lock:
        root_fd = _root_dir(root)
        if root_fd is None:
            return None
        fd = _open_beneath(root_fd, name)
        if fd < 0:
            _forget_root_dir(root.real)
            return None
    try:
        return _checked(fd, path, st, allow_hard_links)
    except BaseException:
        os.close(fd)
        raise


def _open_regular(path: str, root: Root, st: os.stat_result, allow_hard_links: bool) -> SourceFile | None:
    """The fast way; None when /proc cannot say where the file is (then resolve by name)."""
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError:
        return None  # the slow way gives the same refusal, with the same reason
    try:
        target = opened_path(fd)
        if target is None:
            os.close(fd)
            return None
        if not is_under(target, root.real):
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
    if not is_under(real, root.real):
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
        target = opened_path(fd)
        if target is not None and not is_under(target, root.real):
            raise PermanentFileError(f"path resolves outside its allowed root: {path!r}")
        if opened.st_nlink > 1 and not allow_hard_links:
            raise PermanentFileError(f"file has several hard links, refused: {path!r}")
        return SourceFile(fd, path, opened)
    except BaseException:
        os.close(fd)
        raise


def opened_path(fd: int) -> str | None:
    """What the kernel says the descriptor is, where /proc can tell."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None

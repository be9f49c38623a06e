"""Opening a producer's file: only regular files that really live under an allowed root."""

from __future__ import annotations

import asyncio
import errno
import os
import platform
import re
import socket
import stat
import sys
import threading
from pathlib import Path

import pytest

from tests.helpers import wait_until
from uploader.entries import files
from uploader.entries.files import INLINE_READ_LIMIT, Root, SourceFile, locate, open_source, place
from uploader.errors import PermanentFileError, TransientFileError


@pytest.fixture
def root_dir(tmp_path: Path) -> Path:
    d = tmp_path / "root"
    (d / "sub").mkdir(parents=True)
    return d


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    d = tmp_path / "outside"
    d.mkdir()
    (d / "secret.txt").write_bytes(b"secret")
    return d


@pytest.fixture
def roots(root_dir: Path) -> tuple[Root, ...]:
    return (Root.of(str(root_dir)),)


def open_in(path: Path | str, roots: tuple[Root, ...], allow_hard_links: bool = False) -> SourceFile:
    """What the scheduler does: locate by name, then open and check what was opened."""
    root, relpath = locate(str(path), roots)
    return open_source(str(path), root, allow_hard_links=allow_hard_links, relpath=relpath)


def refused(path: Path | str, roots: tuple[Root, ...], match: str) -> PermanentFileError:
    with pytest.raises(PermanentFileError, match=match) as info:
        open_in(path, roots).close()
    assert "\n" not in info.value.reason
    return info.value


# --- locate ---


def test_locate_inside_the_root(root_dir: Path, roots: tuple[Root, ...]) -> None:
    root, rel = locate(str(root_dir / "sub" / "a.jpg"), roots)
    assert (root, rel) == (roots[0], "sub/a.jpg")


def test_locate_picks_the_root_that_holds_the_path(tmp_path: Path) -> None:
    a, b = Root.of(str(tmp_path / "a")), Root.of(str(tmp_path / "b"))
    assert locate(str(tmp_path / "b" / "x"), (a, b)) == (b, "x")


def test_locate_normalises_redundant_separators(root_dir: Path, roots: tuple[Root, ...]) -> None:
    assert locate(f"{root_dir}//sub/./a.jpg", roots)[1] == "sub/a.jpg"


@pytest.mark.parametrize(
    ("make_path", "match"),
    [
        (lambda r: str(r.parent / "outside" / "a"), "outside the allowed roots"),
        (lambda r: str(r) + "2/a", "outside the allowed roots"),  # a sibling sharing the prefix
        (lambda r: str(r), "a directory, not a regular file"),  # the root itself is no file
        (lambda r: str(r) + "/", "a directory, not a regular file"),
        (lambda r: "/etc/passwd", "outside the allowed roots"),
        (lambda r: str(r / "sub" / ".." / ".." / "outside" / "a"), "'..'"),
        (lambda r: str(r / ".." / "root" / "a"), "'..'"),
        (lambda r: "sub/a.jpg", "not absolute"),
        (lambda r: "", "empty"),
        (lambda r: str(r / "a\x00b"), "NUL"),
    ],
)
def test_locate_refuses(root_dir: Path, roots: tuple[Root, ...], make_path: object, match: str) -> None:
    assert callable(make_path)
    with pytest.raises(PermanentFileError, match=match):
        locate(make_path(root_dir), roots)


@pytest.mark.parametrize("slash", ["", "/"])
def test_place_accepts_the_root_itself_with_an_empty_relpath(
    root_dir: Path, roots: tuple[Root, ...], slash: str
) -> None:
    assert place(str(root_dir) + slash, roots) == (roots[0], "")


def test_place_accepts_the_root_by_its_real_name(tmp_path: Path, root_dir: Path) -> None:
    link = tmp_path / "current"
    link.symlink_to(root_dir)
    roots = (Root.of(str(link) + "/"),)  # configured with a trailing slash, through a symlink
    assert place(str(root_dir), roots) == (roots[0], "")
    assert place(str(link), roots) == (roots[0], "")


def test_place_refuses_what_locate_refuses_by_name(root_dir: Path, roots: tuple[Root, ...]) -> None:
    with pytest.raises(PermanentFileError, match="outside the allowed roots"):
        place(str(root_dir) + "2", roots)


def test_locate_through_a_root_configured_as_a_symlink(tmp_path: Path, root_dir: Path) -> None:
    link = tmp_path / "current"
    link.symlink_to(root_dir)
    (root_dir / "a.txt").write_bytes(b"a")
    roots = (Root.of(str(link)),)

    for path in (link / "a.txt", root_dir / "a.txt"):  # by either name
        with open_in(path, roots) as f:
            assert f.pread(0, 1) == b"a"


# --- open_source ---


def test_open_a_regular_file_inside_the_root(root_dir: Path, roots: tuple[Root, ...]) -> None:
    (root_dir / "sub" / "a.txt").write_bytes(b"hello")

    with open_in(root_dir / "sub" / "a.txt", roots) as f:
        assert (f.size, f.pread(0, 5)) == (5, b"hello")
        fd = f.fd
    assert f.fd == -1
    with pytest.raises(OSError, match="Bad file descriptor"):
        os.fstat(fd)


def test_a_symlink_inside_the_root_to_a_file_inside_is_followed(
    root_dir: Path, roots: tuple[Root, ...]
) -> None:
    (root_dir / "sub" / "real.txt").write_bytes(b"real")
    (root_dir / "link.txt").symlink_to(root_dir / "sub" / "real.txt")

    with open_in(root_dir / "link.txt", roots) as f:
        assert f.pread(0, 4) == b"real"


def test_a_relative_symlink_inside_the_root_is_followed(root_dir: Path, roots: tuple[Root, ...]) -> None:
    (root_dir / "sub" / "real.txt").write_bytes(b"real")
    (root_dir / "link.txt").symlink_to("sub/real.txt")

    with open_in(root_dir / "link.txt", roots) as f:
        assert f.pread(0, 4) == b"real"


def test_an_absolute_symlink_to_a_directory_inside_the_root_is_followed(
    root_dir: Path, roots: tuple[Root, ...]
) -> None:
    """openat2 refuses absolute symlinks on the way (EXDEV); resolving by name accepts this one."""
    (root_dir / "sub" / "a.txt").write_bytes(b"inside")
    (root_dir / "alias").symlink_to(root_dir / "sub", target_is_directory=True)
    with open_in(root_dir / "alias" / "a.txt", roots) as f:
        assert f.pread(0, 6) == b"inside"


def test_files_are_opened_beneath_the_root_directory_held_open(
    tmp_path: Path, root_dir: Path, roots: tuple[Root, ...]
) -> None:
    # No skip: on a kernel without openat2 the probe must say so, and the portable way serves.
    release = tuple(int(n) for n in re.findall(r"\d+", platform.release())[:2])
    has_openat2 = sys.platform == "linux" and release >= (5, 6)
    assert (files._open_beneath is not None) == has_openat2, "the openat2 probe disagrees with the kernel"
    (root_dir / "a.txt").write_bytes(b"a")
    open_in(root_dir / "a.txt", roots).close()
    assert (roots[0].real in files._root_dirs) == has_openat2
    for n in range(files._MAX_ROOT_DIRS + 8):  # many roots: the held directories stay bounded
        other = tmp_path / f"r{n}"
        other.mkdir()
        (other / "f").write_bytes(b"f")
        open_in(other / "f", (Root.of(str(other)),)).close()
    assert len(files._root_dirs) <= files._MAX_ROOT_DIRS


def test_a_symlink_escaping_the_root_is_refused(
    root_dir: Path, outside: Path, roots: tuple[Root, ...]
) -> None:
    (root_dir / "evil.txt").symlink_to(outside / "secret.txt")
    refused(root_dir / "evil.txt", roots, "resolves outside")


def test_a_relative_symlink_climbing_out_is_refused(
    root_dir: Path, outside: Path, roots: tuple[Root, ...]
) -> None:
    (root_dir / "sub" / "evil.txt").symlink_to("../../outside/secret.txt")
    refused(root_dir / "sub" / "evil.txt", roots, "resolves outside")


def test_a_symlinked_parent_directory_escaping_is_refused(
    root_dir: Path, outside: Path, roots: tuple[Root, ...]
) -> None:
    (root_dir / "escape").symlink_to(outside, target_is_directory=True)
    refused(root_dir / "escape" / "secret.txt", roots, "resolves outside")


def test_a_dangling_symlink_is_not_found(root_dir: Path, roots: tuple[Root, ...]) -> None:
    (root_dir / "dangling").symlink_to(root_dir / "nowhere")
    refused(root_dir / "dangling", roots, "not found")


def test_dev_null_through_a_symlink_is_refused_as_escaping(root_dir: Path, roots: tuple[Root, ...]) -> None:
    (root_dir / "null").symlink_to("/dev/null")
    refused(root_dir / "null", roots, "resolves outside")


@pytest.mark.timeout(10)
def test_a_fifo_is_refused_without_blocking(root_dir: Path, roots: tuple[Root, ...]) -> None:
    os.mkfifo(root_dir / "pipe")  # nobody writes: an open() that blocked would hang the test
    refused(root_dir / "pipe", roots, "a FIFO, not a regular file")


def test_a_directory_is_refused(root_dir: Path, roots: tuple[Root, ...]) -> None:
    refused(root_dir / "sub", roots, "a directory, not a regular file")


def test_a_socket_is_refused(root_dir: Path, roots: tuple[Root, ...]) -> None:
    # AF_UNIX paths are limited to ~108 bytes; bind by a short relative name from the directory.
    cwd = os.getcwd()
    with socket.socket(socket.AF_UNIX) as s:
        os.chdir(root_dir)
        try:
            s.bind("sock")
        finally:
            os.chdir(cwd)
        refused(root_dir / "sock", roots, "a socket, not a regular file")


def test_a_character_device_inside_the_root_is_refused(root_dir: Path, roots: tuple[Root, ...]) -> None:
    path = root_dir / "null-device"
    try:
        os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(1, 3))
    except PermissionError:
        pytest.skip("mknod needs CAP_MKNOD, which this environment does not grant")
    assert stat.S_ISCHR(os.lstat(path).st_mode)
    refused(path, roots, "a device, not a regular file")


def test_a_missing_file_is_not_found(root_dir: Path, roots: tuple[Root, ...]) -> None:
    refused(root_dir / "sub" / "missing.txt", roots, "file not found")


def test_a_file_as_a_parent_is_refused(root_dir: Path, roots: tuple[Root, ...]) -> None:
    (root_dir / "plain").write_bytes(b"x")
    with pytest.raises(PermanentFileError):
        open_in(root_dir / "plain" / "child", roots)


def test_permission_denied_is_permanent(
    root_dir: Path, roots: tuple[Root, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    # As root a mode-000 file still opens, so the kernel's EACCES is simulated at os.open.
    (root_dir / "locked.txt").write_bytes(b"x")

    def denied(path: str, flags: int, mode: int = 0o777) -> int:
        raise PermissionError(errno.EACCES, "Permission denied", path)

    monkeypatch.setattr(files.os, "open", denied)
    refused(root_dir / "locked.txt", roots, "permission denied")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads mode-000 files; covered by the EACCES test above")
def test_an_unreadable_file_is_permission_denied(root_dir: Path, roots: tuple[Root, ...]) -> None:
    path = root_dir / "locked.txt"
    path.write_bytes(b"x")
    path.chmod(0)
    refused(path, roots, "permission denied")


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        (errno.EMFILE, TransientFileError),
        (errno.EIO, TransientFileError),
        (errno.ENAMETOOLONG, PermanentFileError),
    ],
)
def test_open_errors_are_classified(
    root_dir: Path, roots: tuple[Root, ...], monkeypatch: pytest.MonkeyPatch, code: int, kind: type
) -> None:
    (root_dir / "a.txt").write_bytes(b"x")

    def failing(path: str, flags: int, mode: int = 0o777) -> int:
        raise OSError(code, os.strerror(code), path)

    monkeypatch.setattr(files.os, "open", failing)
    with pytest.raises(kind) as info:
        open_in(root_dir / "a.txt", roots)
    assert type(info.value) is kind


def test_a_hard_link_is_refused_unless_allowed(
    root_dir: Path, outside: Path, roots: tuple[Root, ...]
) -> None:
    # A hard link makes a file from outside the root look like one inside it.
    os.link(outside / "secret.txt", root_dir / "linked.txt")
    refused(root_dir / "linked.txt", roots, "hard links")

    with open_in(root_dir / "linked.txt", roots, allow_hard_links=True) as f:
        assert f.pread(0, 6) == b"secret"


def test_no_descriptor_leaks_when_a_file_is_refused(
    root_dir: Path, outside: Path, roots: tuple[Root, ...]
) -> None:
    os.link(outside / "secret.txt", root_dir / "linked.txt")  # refused after open()
    (root_dir / "warm.txt").write_bytes(b"w")
    open_in(root_dir / "warm.txt", roots).close()  # the root's directory stays open, by design
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        with pytest.raises(PermanentFileError):
            open_in(root_dir / "linked.txt", roots)
    assert len(os.listdir("/proc/self/fd")) == before


# --- SourceFile ---


def test_check_unchanged_passes_for_an_untouched_file(root_dir: Path, roots: tuple[Root, ...]) -> None:
    (root_dir / "a.txt").write_bytes(b"abc")
    with open_in(root_dir / "a.txt", roots) as f:
        f.check_unchanged()


def test_check_unchanged_detects_an_append(root_dir: Path, roots: tuple[Root, ...]) -> None:
    path = root_dir / "a.txt"
    path.write_bytes(b"abc")
    with open_in(path, roots) as f:
        with path.open("ab") as w:
            w.write(b"more")
        with pytest.raises(TransientFileError, match="changed"):
            f.check_unchanged()


def test_check_unchanged_detects_a_same_size_rewrite(root_dir: Path, roots: tuple[Root, ...]) -> None:
    path = root_dir / "a.txt"
    path.write_bytes(b"abc")
    with open_in(path, roots) as f:
        before = os.stat(path).st_mtime_ns
        path.write_bytes(b"xyz")
        # Coarse-timestamp filesystems may not move mtime within one tick; make sure it moved.
        if os.stat(path).st_mtime_ns == before:
            os.utime(path, ns=(before, before + 1_000_000_000))
        with pytest.raises(TransientFileError, match="changed"):
            f.check_unchanged()


def test_a_file_replaced_by_rename_is_read_as_opened(root_dir: Path, roots: tuple[Root, ...]) -> None:
    path = root_dir / "a.txt"
    path.write_bytes(b"old")
    with open_in(path, roots) as f:
        (root_dir / "new.txt").write_bytes(b"new!")
        os.replace(root_dir / "new.txt", path)
        assert f.pread(0, 3) == b"old"
        f.check_unchanged()  # the open file is intact: what is uploaded is consistent


def test_a_file_truncated_while_read_is_transient(root_dir: Path, roots: tuple[Root, ...]) -> None:
    path = root_dir / "a.txt"
    path.write_bytes(b"x" * 1000)
    with open_in(path, roots) as f:
        os.truncate(path, 10)
        with pytest.raises(TransientFileError, match="shrank"):
            f.pread(0, 1000)


async def test_a_large_read_runs_in_a_thread(
    root_dir: Path, roots: tuple[Root, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    (root_dir / "big.bin").write_bytes(data)
    threads: list[int] = []
    real = files._pread_and_close

    def recording(fd: int, offset: int, length: int) -> bytes:
        threads.append(threading.get_ident())
        return real(fd, offset, length)

    monkeypatch.setattr(files, "_pread_and_close", recording)
    with open_in(root_dir / "big.bin", roots) as f:
        assert await f.read_all() == data
        assert await f.read(1_000_000, 2_000_000) == data[1_000_000:3_000_000]
        assert await f.read(5, INLINE_READ_LIMIT) == data[5 : 5 + INLINE_READ_LIMIT]  # inline

    assert len(threads) == 2
    assert threading.get_ident() not in threads


async def test_cancelling_a_threaded_read_leaves_no_descriptor_behind(
    root_dir: Path, roots: tuple[Root, ...]
) -> None:
    (root_dir / "big.bin").write_bytes(os.urandom(4 * 1024 * 1024))
    open_in(root_dir / "big.bin", roots).close()  # the root's directory stays open, by design
    before = len(os.listdir("/proc/self/fd"))
    with open_in(root_dir / "big.bin", roots) as f:
        reading = asyncio.create_task(f.read_all())
        await asyncio.sleep(0)
        reading.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reading
    # The thread finishes its read on its own duplicate and closes it.
    await wait_until(lambda: len(os.listdir("/proc/self/fd")) == before, 10, "the duplicate to be closed")

"""LocalStore: atomic writes under a root that no key or planted symlink can escape."""

from __future__ import annotations

import asyncio
import errno
import functools
import os
import stat
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import OpenFile, wait_until
from uploader.config import settings as config_mod
from uploader.config.stores import LocalStoreConfig
from uploader.errors import (
    ConfigError,
    InfrastructureError,
    PermanentFileError,
    StoreUnavailableError,
    TransientFileError,
)
from uploader.stores import local as local_module
from uploader.stores import open_store
from uploader.stores.base import PutRequest, StoredObject
from uploader.stores.local import LocalStore, translate_os_error


@pytest.fixture
def store_root(tmp_path: Path) -> Path:
    return tmp_path / "store" / "objects"


@pytest.fixture
async def store(store_root: Path) -> AsyncIterator[LocalStore]:
    s = LocalStore(LocalStoreConfig(root=str(store_root), fsync=True))
    await s.start()
    yield s
    await s.close()


def all_files(top: Path) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), top) for d, _, files in os.walk(top) for f in files)


def temp_files(top: Path) -> list[str]:
    return [f for f in all_files(top) if f.endswith(".tmp")]


async def staged(top: Path, count: int) -> None:
    """Every put has written its temporary file and waits for the group's fsync."""
    await wait_until(lambda: len(temp_files(top)) == count, 10, f"{count} staged puts")


def req(key: str) -> PutRequest:
    return PutRequest(key=key, content_type="application/octet-stream")


async def test_start_creates_the_root_and_its_parents(store_root: Path) -> None:
    assert not store_root.parent.exists()
    s = LocalStore(LocalStoreConfig(root=str(store_root)))
    await s.start()
    assert all_files(store_root) == []
    await s.check()


async def test_a_root_that_cannot_be_created_is_refused_naming_the_file_and_key(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_bytes(b"")
    root = tmp_path / "a-file" / "objects"  # makedirs fails with ENOTDIR
    path = tmp_path / "uploader.toml"
    path.write_text(f'[store]\nkind = "local"\nlocal = {{ root = "{root}" }}\n')
    config = config_mod.load(str(path))
    store = open_store(config.store, 1, config.path)
    with pytest.raises(ConfigError) as refused:
        await store.start()
    assert str(refused.value) == f"{path}: [store.local].root: cannot create '{root}': Not a directory"


async def test_put_writes_the_bytes_under_the_key_atomically(
    store: LocalStore, store_root: Path, open_file: OpenFile
) -> None:
    data = os.urandom(300_000)
    with open_file("a.bin", data) as source:
        result = await store.put(source, req("job1/sub/dir/a.bin"))
    assert result.bytes_sent == len(data)
    assert not result.already_present
    assert (store_root / "job1/sub/dir/a.bin").read_bytes() == data
    assert all_files(store_root) == ["job1/sub/dir/a.bin"]


async def test_put_without_fsync_writes_the_same_bytes(store_root: Path, open_file: OpenFile) -> None:
    s = LocalStore(LocalStoreConfig(root=str(store_root), fsync=False))
    await s.start()
    with open_file("a.bin", b"hello") as source:
        await s.put(source, req("k/a.bin"))
    assert (store_root / "k/a.bin").read_bytes() == b"hello"
    assert temp_files(store_root) == []


async def test_empty_file_is_stored_as_an_empty_object(
    store: LocalStore, store_root: Path, open_file: OpenFile
) -> None:
    with open_file("empty", b"") as source:
        result = await store.put(source, req("e/empty"))
    assert result.bytes_sent == 0
    assert (store_root / "e/empty").read_bytes() == b""


async def test_large_file_is_copied_in_several_chunks(
    store: LocalStore, store_root: Path, open_file: OpenFile, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(local_module, "CHUNK", 64 * 1024)
    data = os.urandom(1_000_003)
    with open_file("big", data) as source:
        await store.put(source, req("big"))
    assert (store_root / "big").read_bytes() == data


async def test_overwrite_replaces_the_object(
    store: LocalStore, store_root: Path, open_file: OpenFile
) -> None:
    with open_file("v1", b"first version, longer") as source:
        await store.put(source, req("k/obj"))
    with open_file("v2", b"second") as source:
        await store.put(source, req("k/obj"))
    assert (store_root / "k/obj").read_bytes() == b"second"
    assert all_files(store_root) == ["k/obj"]


@pytest.mark.parametrize(
    "key",
    ["../x", "/abs", "a/../../b", "a/../b", "", "a//b", "./a", "a/.", "a/", "a\\b", "a\x00b"],
)
async def test_keys_that_could_escape_the_root_are_refused(
    store: LocalStore, store_root: Path, tmp_path: Path, open_file: OpenFile, key: str
) -> None:
    with open_file("f", b"payload") as source:
        before = all_files(tmp_path)
        with pytest.raises(PermanentFileError):
            await store.put(source, req(key))
    assert all_files(store_root) == []
    assert all_files(tmp_path) == before
    with pytest.raises(PermanentFileError):
        await store.stat(key)


async def test_symlinked_directory_inside_the_root_is_not_followed(
    store: LocalStore, store_root: Path, tmp_path: Path, open_file: OpenFile
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (store_root / "evil").symlink_to(outside)
    with open_file("f", b"payload") as source, pytest.raises(PermanentFileError, match="symlink"):
        await store.put(source, req("evil/x"))
    assert list(outside.iterdir()) == []


async def test_symlinked_directory_deeper_in_the_key_is_not_followed(
    store: LocalStore, store_root: Path, tmp_path: Path, open_file: OpenFile
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (store_root / "a").mkdir()
    (store_root / "a" / "b").symlink_to(outside)
    with open_file("f", b"payload") as source, pytest.raises(PermanentFileError):
        await store.put(source, req("a/b/c/x"))
    assert list(outside.iterdir()) == []


async def test_symlinked_final_name_is_replaced_not_written_through(
    store: LocalStore, store_root: Path, tmp_path: Path, open_file: OpenFile
) -> None:
    target = tmp_path / "outside-file"
    target.write_bytes(b"untouched")
    (store_root / "obj").symlink_to(target)
    with open_file("f", b"payload") as source:
        await store.put(source, req("obj"))
    assert target.read_bytes() == b"untouched"
    assert not (store_root / "obj").is_symlink()
    assert (store_root / "obj").read_bytes() == b"payload"


async def test_root_configured_through_a_symlink_works(tmp_path: Path, open_file: OpenFile) -> None:
    real = tmp_path / "real-root"
    real.mkdir()
    link = tmp_path / "link-root"
    link.symlink_to(real)
    s = LocalStore(LocalStoreConfig(root=str(link)))
    await s.start()
    with open_file("f", b"payload") as source:
        await s.put(source, req("x/y"))
    assert (real / "x/y").read_bytes() == b"payload"


async def test_key_naming_an_existing_directory_is_permanent(
    store: LocalStore, store_root: Path, open_file: OpenFile
) -> None:
    (store_root / "dir" / "inner").mkdir(parents=True)
    with open_file("f", b"payload") as source, pytest.raises(PermanentFileError, match="directory"):
        await store.put(source, req("dir"))
    assert temp_files(store_root) == []


async def test_key_below_an_existing_file_is_permanent(
    store: LocalStore, store_root: Path, open_file: OpenFile
) -> None:
    (store_root / "file").write_bytes(b"x")
    with open_file("f", b"payload") as source, pytest.raises(PermanentFileError):
        await store.put(source, req("file/child"))
    assert (store_root / "file").read_bytes() == b"x"


async def test_source_changed_while_copied_leaves_no_partial_file(
    store: LocalStore, store_root: Path, src_dir: Path, open_file: OpenFile
) -> None:
    source = open_file("grows", b"original contents")
    with source:
        with (src_dir / "grows").open("ab") as f:
            f.write(b" and more")
        with pytest.raises(TransientFileError, match="changed"):
            await store.put(source, req("k/grows"))
    assert all_files(store_root) == []


async def test_disk_full_is_an_outage_and_leaves_no_temp_file(
    store: LocalStore, store_root: Path, open_file: OpenFile, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(*args: object, **kwargs: object) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "copy_file_range", full)
    with open_file("f", b"payload") as source, pytest.raises(StoreUnavailableError) as info:
        await store.put(source, req("k/f"))
    assert info.value.reason == "local store: no space left on device"
    assert not info.value.per_key, "a full disk is full for every file"
    assert all_files(store_root) == []


async def test_disk_full_in_the_read_write_fallback_is_an_outage(
    store: LocalStore, store_root: Path, open_file: OpenFile, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unsupported(*args: object, **kwargs: object) -> int:
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))

    real_write = os.write

    def write(fd: int, data: bytes) -> int:
        try:
            name = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            name = ""
        if name.endswith(".tmp"):
            raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))
        return real_write(fd, data)

    monkeypatch.setattr(os, "copy_file_range", unsupported)
    monkeypatch.setattr(os, "sendfile", unsupported)
    monkeypatch.setattr(os, "write", write)
    with open_file("f", b"payload") as source, pytest.raises(StoreUnavailableError) as info:
        await store.put(source, req("k/f"))
    assert info.value.reason == "local store: disk quota exceeded"
    assert all_files(store_root) == []


async def test_copy_falls_back_when_kernel_copies_are_unsupported(
    store: LocalStore, store_root: Path, open_file: OpenFile, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []

    def unsupported(name: str) -> Callable[..., int]:
        def fail(*args: object, **kwargs: object) -> int:
            calls.append(name)
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))

        return fail

    monkeypatch.setattr(os, "copy_file_range", unsupported("copy_file_range"))
    monkeypatch.setattr(os, "sendfile", unsupported("sendfile"))
    data = os.urandom(200_000)
    with open_file("f", data) as source:
        await store.put(source, req("k/f"))
    assert calls == ["copy_file_range", "sendfile"]
    assert (store_root / "k/f").read_bytes() == data


async def test_cancelled_put_leaves_neither_object_nor_temp_file(
    store: LocalStore, store_root: Path, open_file: OpenFile, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(local_module, "INLINE_PUT_LIMIT", -1)  # copied in a thread, cancellable
    started = threading.Event()
    release = threading.Event()
    real_copy = os.copy_file_range

    def slow_copy(*args: int) -> int:
        started.set()
        release.wait(timeout=30)
        return real_copy(*args)

    monkeypatch.setattr(os, "copy_file_range", slow_copy)
    with open_file("f", b"payload") as source:
        task = asyncio.create_task(store.put(source, req("k/f")))
        await asyncio.to_thread(started.wait, 30)
        assert temp_files(store_root) != []
        task.cancel()
        # The task's cancellation runs before this thread hop completes (the loop is FIFO),
        # so the copy is released only once the store has flagged the cancellation.
        await asyncio.to_thread(release.set)
        with pytest.raises(asyncio.CancelledError):
            await task
    assert all_files(store_root) == []


async def test_stat_reports_stored_size_or_none(
    store: LocalStore, store_root: Path, open_file: OpenFile
) -> None:
    with open_file("f", b"12345") as source:
        await store.put(source, req("a/b/f"))
    (store_root / "a" / "dir").mkdir()
    assert await store.stat("a/b/f") == StoredObject(5)
    sha256_12345 = "5994471abb01112afcc18159f6cc74b4f511b99806da59b3caf5a9c173cacfc5"
    assert await store.stat("a/b/f", checksum=True) == StoredObject(5, sha256=sha256_12345)
    assert await store.stat("a/b/missing") is None
    assert await store.stat("nope/f") is None
    assert await store.stat("a/b/f/below-a-file") is None
    assert await store.stat("a/dir") is None


async def test_check_refuses_a_root_that_is_not_a_directory(tmp_path: Path) -> None:
    not_dir = tmp_path / "file"
    not_dir.write_bytes(b"")
    with pytest.raises(InfrastructureError, match="not a directory"):
        await LocalStore(LocalStoreConfig(root=str(not_dir))).check()
    with pytest.raises(InfrastructureError):
        await LocalStore(LocalStoreConfig(root=str(tmp_path / "missing"))).check()


@pytest.mark.parametrize(
    ("code", "kind", "reason"),
    [
        # The store refusing every write is an outage, not the file's fault.
        (errno.ENOSPC, StoreUnavailableError, "local store: no space left on device"),
        (errno.EDQUOT, StoreUnavailableError, "local store: disk quota exceeded"),
        (errno.EACCES, StoreUnavailableError, "local store: permission denied"),
        (errno.EPERM, StoreUnavailableError, "local store: operation not permitted"),
        (errno.EROFS, StoreUnavailableError, "local store: read-only file system"),
        (errno.EIO, TransientFileError, "local store: I/O error"),
        (errno.EISDIR, PermanentFileError, "local store: the key names an existing directory: 'k'"),
    ],
)
def test_os_errors_are_translated_with_readable_reasons(
    code: int, kind: type[Exception], reason: str
) -> None:
    error = translate_os_error(OSError(code, os.strerror(code)), "k")
    assert type(error) is kind
    assert error.reason == reason


# -- group commit: with fsync on, the puts staged meanwhile share one syncing step ----------


class Fsyncs:
    """os.fsync, counted and recorded as (kind, inode); the first call can be held back so
    the puts that follow gather into one batch behind it."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, hold_first: bool = False) -> None:
        self.calls: list[tuple[str, int]] = []
        self.release = threading.Event()
        if not hold_first:
            self.release.set()
        self.fail: Callable[[os.stat_result], bool] = lambda st: False
        self._real = os.fsync
        self._lock = threading.Lock()
        monkeypatch.setattr(os, "fsync", self)

    def __call__(self, fd: int) -> None:
        assert self.release.wait(30)
        st = os.fstat(fd)
        with self._lock:
            self.calls.append(("dir" if stat.S_ISDIR(st.st_mode) else "data", st.st_ino))
        if self.fail(st):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        self._real(fd)

    def count(self, kind: str) -> int:
        return sum(1 for k, _ in self.calls if k == kind)


def put_tasks(store: LocalStore, open_file: OpenFile, contents: dict[str, bytes]) -> list[asyncio.Task[Any]]:
    """One task per key; each source is closed once its put has settled."""
    tasks: list[asyncio.Task[Any]] = []
    for i, (key, data) in enumerate(contents.items()):
        source = open_file(f"src-{i}", data)
        task = asyncio.create_task(store.put(source, req(key)))
        task.add_done_callback(functools.partial(lambda source, _: source.close(), source))
        tasks.append(task)
    return tasks


async def test_many_concurrent_puts_with_fsync_all_land_with_their_bytes(
    store: LocalStore, store_root: Path, open_file: OpenFile
) -> None:
    contents = {f"job{i % 5}/f{i:03d}": os.urandom(100 + i * 37) for i in range(200)}
    contents["big/one"] = os.urandom(300_000)  # copied in a thread, synced with the rest
    await asyncio.gather(*put_tasks(store, open_file, contents))
    for key, data in contents.items():
        assert (store_root / key).read_bytes() == data
    assert temp_files(store_root) == []


async def test_a_batch_fsyncs_each_file_once_and_its_directory_once(
    store: LocalStore, store_root: Path, open_file: OpenFile, monkeypatch: pytest.MonkeyPatch
) -> None:
    fsyncs = Fsyncs(monkeypatch, hold_first=True)
    contents = {f"job/f{i:02d}": os.urandom(4096) for i in range(41)}
    tasks = put_tasks(store, open_file, contents)
    # Small files are staged on the loop: once all are, every put waits for the step, the
    # first alone in its batch (it found the store idle), the other 40 behind it.
    await staged(store_root, len(contents))
    fsyncs.release.set()
    await asyncio.gather(*tasks)
    assert fsyncs.count("data") == 41
    # First batch: "job" and the root it was created in; second batch: "job" once for 40.
    assert fsyncs.count("dir") == 3, "one per file and directory would be 42"


async def test_a_failed_fsync_fails_only_that_files_put(
    store: LocalStore, store_root: Path, open_file: OpenFile, monkeypatch: pytest.MonkeyPatch
) -> None:
    fsyncs = Fsyncs(monkeypatch, hold_first=True)
    fsyncs.fail = lambda st: stat.S_ISREG(st.st_mode) and st.st_size == 777
    contents = {f"job/f{i}": os.urandom(777 if i == 3 else 1000) for i in range(8)}
    tasks = put_tasks(store, open_file, contents)
    await staged(store_root, len(contents))  # all staged: one batch after the first
    fsyncs.release.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(results[3], TransientFileError)
    assert results[3].reason == "local store: I/O error"
    assert all(not isinstance(r, BaseException) for i, r in enumerate(results) if i != 3)
    assert all_files(store_root) == sorted(f"job/f{i}" for i in range(8) if i != 3)


async def test_a_failed_directory_fsync_fails_every_put_in_that_directory(
    store: LocalStore, store_root: Path, open_file: OpenFile, monkeypatch: pytest.MonkeyPatch
) -> None:
    (store_root / "good").mkdir(parents=True)
    (store_root / "bad").mkdir()
    bad = os.stat(store_root / "bad").st_ino
    fsyncs = Fsyncs(monkeypatch, hold_first=True)
    fsyncs.fail = lambda st: st.st_ino == bad
    contents = {f"{d}/f{i}": os.urandom(500) for i in range(3) for d in ("good", "bad")}
    tasks = put_tasks(store, open_file, contents)
    await staged(store_root, len(contents))
    fsyncs.release.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    outcomes = {key: type(r).__name__ for key, r in zip(contents, results, strict=True)}
    expected = {key: "TransientFileError" if key.startswith("bad") else "PutResult" for key in contents}
    assert outcomes == expected
    assert temp_files(store_root) == []


async def test_a_put_cancelled_in_a_batch_leaves_no_temp_file_and_the_others_land(
    store: LocalStore, store_root: Path, open_file: OpenFile, monkeypatch: pytest.MonkeyPatch
) -> None:
    fsyncs = Fsyncs(monkeypatch, hold_first=True)
    contents = {f"job/f{i}": os.urandom(2000) for i in range(6)}
    tasks = put_tasks(store, open_file, contents)
    await staged(store_root, 6)  # f0 is syncing (held); f1..f5 wait for the next batch
    tasks[3].cancel()
    fsyncs.release.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(results[3], asyncio.CancelledError)
    assert all_files(store_root) == [f"job/f{i}" for i in range(6) if i != 3]
    for i in (0, 1, 2, 4, 5):
        assert (store_root / f"job/f{i}").read_bytes() == contents[f"job/f{i}"]


async def test_data_is_durable_before_the_rename_and_the_directory_before_the_put_returns(
    store: LocalStore, store_root: Path, open_file: OpenFile, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[tuple[str, object]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        real_fsync(fd)
        st = os.fstat(fd)
        events.append(("dir synced" if stat.S_ISDIR(st.st_mode) else "data synced", st.st_ino))

    def replace(src: str, dst: str, **kwargs: int) -> None:
        events.append(("renamed", os.stat(src, dir_fd=kwargs["src_dir_fd"]).st_ino))
        real_replace(src, dst, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    contents = {f"d{i % 2}/f{i}": os.urandom(3000) for i in range(10)}
    tasks = put_tasks(store, open_file, contents)
    for key, task in zip(contents, tasks, strict=True):
        task.add_done_callback(functools.partial(lambda key, _: events.append(("returned", key)), key))
    await asyncio.gather(*tasks)
    for key in contents:
        ino, dir_ino = os.stat(store_root / key).st_ino, os.stat((store_root / key).parent).st_ino
        data, renamed = events.index(("data synced", ino)), events.index(("renamed", ino))
        returned = events.index(("returned", key))
        dir_synced = [i for i, e in enumerate(events) if e == ("dir synced", dir_ino) and renamed < i]
        assert data < renamed < dir_synced[0] < returned, key

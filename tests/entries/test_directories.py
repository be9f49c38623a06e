"""Manifest entries that name a directory: walked page by page, keys keep the layout, resume."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import Env, StoreWrapper, wait_until
from uploader.daemon import Daemon
from uploader.entries.files import Root, SourceFile
from uploader.entries.walk import Walker
from uploader.stores.base import PutRequest, PutResult, Store
from uploader.stores.local import LocalStore


class WatchingStore(StoreWrapper):
    """The real local store; records keys put, can hold puts after `allow` of them, and
    watches how many entries the scheduler holds queued for each job."""

    def __init__(self, inner: Store, allow: int | None = None) -> None:
        super().__init__(inner)
        self.allow = allow
        self.gate = asyncio.Event()
        self.keys: list[str] = []
        self.daemon: Daemon | None = None
        self.peak_queued = 0

    async def put(self, source: SourceFile, request: PutRequest) -> PutResult:
        if self.daemon is not None:
            for run in self.daemon.scheduler.runs.values():
                queued = len(run.pending) + len(run.next_page or ())
                self.peak_queued = max(self.peak_queued, queued)
        if self.allow is not None and len(self.keys) >= self.allow:
            await self.gate.wait()
        result = await self.inner.put(source, request)
        self.keys.append(request.key)
        return result


def make_tree(base: Path, trees: int, depth: int, per_dir: int) -> list[Path]:
    """`trees` chains of `depth` nested directories with `per_dir` small files in each."""
    files: list[Path] = []
    for t in range(trees):
        d = base / f"t{t:02d}"
        for level in range(depth):
            d = d / f"l{level:02d}"
            d.mkdir(parents=True)
            for f in range(per_dir):
                path = d / f"f{f}.txt"
                path.write_bytes(f"{t}/{level}/{f}".encode())
                files.append(path)
    return files


def stored(env: Env, key: str) -> bytes:
    return (env.objects / key).read_bytes()


@pytest.mark.timeout(180)
async def test_ten_thousand_files_in_two_thousand_nested_directories(env: Env) -> None:
    tree = env.uploads / "tree"
    files = make_tree(tree, trees=40, depth=50, per_dir=5)
    assert len(files) == 10_000
    store = WatchingStore(LocalStore(env.config().store.local))
    config = env.config(redis={"page_size": 500}, upload={"concurrency": 32})
    async with env.daemon(config, store=store) as daemon:
        store.daemon = daemon
        await env.push_job("big", [str(tree)])
        state = await env.wait_final("big", timeout=150)
    assert (state["state"], state["total"], state["uploaded"]) == ("done", "10000", "10000"), state
    assert len(store.keys) == len(set(store.keys)) == 10_000
    for path in files[::97]:
        assert stored(env, f"big/{path.relative_to(env.uploads)}") == path.read_bytes()
    assert {f"big/{p.relative_to(env.uploads)}" for p in files} == set(store.keys)
    # One chunk being dispatched and one waiting, never the tree.
    assert 0 < store.peak_queued <= 2 * 500


async def test_an_entry_key_is_the_prefix_of_the_layout_and_list_order_is_kept(env: Env) -> None:
    (env.uploads / "d" / "sub").mkdir(parents=True)
    (env.uploads / "d" / "a.txt").write_bytes(b"a")
    (env.uploads / "d" / "sub" / "b.txt").write_bytes(b"b")
    (env.uploads / "plain.txt").write_bytes(b"p")
    (env.uploads / "empty").mkdir()
    entries = [
        str(env.uploads / "plain.txt"),
        json.dumps({"path": str(env.uploads / "d"), "key": "pre/fix", "metadata": {"owner": "7"}}),
        str(env.uploads / "empty"),
        str(env.uploads / "d"),
    ]
    store = WatchingStore(LocalStore(env.config().store.local))
    async with env.daemon(env.config(upload={"concurrency": 1}), store=store):
        await env.push_job("k", entries)
        state = await env.wait_final("k")
    assert (state["state"], state["total"], state["uploaded"]) == ("done", "5", "5"), state
    assert store.keys == ["k/plain.txt", "pre/fix/a.txt", "pre/fix/sub/b.txt", "k/d/a.txt", "k/d/sub/b.txt"]
    assert stored(env, "pre/fix/sub/b.txt") == b"b"


async def test_symlink_loops_and_links_out_of_the_root_are_not_followed(env: Env, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    (outside / "deep").mkdir(parents=True)
    (outside / "secret.txt").write_bytes(b"secret")
    (outside / "deep" / "secret2.txt").write_bytes(b"secret")
    d = env.uploads / "d"
    (d / "sub").mkdir(parents=True)
    (d / "sub" / "real.txt").write_bytes(b"real")
    (d / "a").symlink_to("..")  # a loop back up the tree
    (d / "sub" / "self").symlink_to(".")
    (d / "out").symlink_to(outside)  # a directory outside the root
    (d / "alias.txt").symlink_to(d / "sub" / "real.txt")  # a file inside: uploaded
    os.mkfifo(d / "fifo")  # not a regular file: left alone
    leaky = env.uploads / "leaky"
    leaky.mkdir()
    (leaky / "ok.txt").write_bytes(b"ok")
    (leaky / "secret.txt").symlink_to(outside / "secret.txt")
    store = WatchingStore(LocalStore(env.config().store.local))
    async with env.daemon(env.config(), store=store):
        await env.push_job("links", [str(d)])
        await env.push_job("leaky", [str(leaky)])
        state = await env.wait_final("links")
        leaked = await env.wait_final("leaky")
    assert (state["state"], state["total"], state["uploaded"]) == ("done", "2", "2"), state
    assert sorted(store.keys) == ["leaky/leaky/ok.txt", "links/d/alias.txt", "links/d/sub/real.txt"]
    assert (leaked["state"], leaked["uploaded"], leaked["failed"]) == ("failed", "1", "1")
    assert await env.failures("leaky") == {
        str(leaky / "secret.txt"): f"path resolves outside its allowed root: {str(leaky / 'secret.txt')!r}"
    }
    assert not any(b"secret" in p.read_bytes() for p in env.objects.rglob("*") if p.is_file())


async def test_directories_outside_the_roots_are_refused_with_a_reason(env: Env, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere"
    (outside / "sub").mkdir(parents=True)
    (outside / "sub" / "f.txt").write_bytes(b"x")
    (env.uploads / "link").symlink_to(outside)
    via_link = env.uploads / "link" / "sub"  # inside by name, outside for real
    store = WatchingStore(LocalStore(env.config().store.local))
    async with env.daemon(env.config(), store=store):
        await env.push_job("out", [str(outside), str(via_link)])
        state = await env.wait_final("out")
    assert (state["state"], state["total"], state["failed"]) == ("failed", "2", "2"), state
    assert await env.failures("out") == {
        str(outside): f"path outside the allowed roots: {str(outside)!r}",
        str(via_link): f"directory resolves outside its allowed root: {str(via_link)!r}",
    }
    assert store.keys == []


@pytest.mark.parametrize(("slash", "in_config"), [("", ""), ("/", ""), ("", "/")])
async def test_an_allowed_root_named_as_an_entry_uploads_its_files_relative_to_it(
    env: Env, slash: str, in_config: str
) -> None:
    (env.uploads / "sub").mkdir()
    (env.uploads / "a.txt").write_bytes(b"a")
    (env.uploads / "sub" / "b.txt").write_bytes(b"b")
    store = WatchingStore(LocalStore(env.config().store.local))
    config = env.config(upload={"allowed_roots": [str(env.uploads) + in_config]})
    async with env.daemon(config, store=store):
        await env.push_job("root", [str(env.uploads) + slash])
        state = await env.wait_final("root")
    assert (state["state"], state["total"], state["uploaded"]) == ("done", "2", "2"), state
    assert sorted(store.keys) == ["root/a.txt", "root/sub/b.txt"]
    assert stored(env, "root/sub/b.txt") == b"b"


async def test_with_directories_off_the_root_itself_fails_as_a_directory(env: Env) -> None:
    async with env.daemon(env.config(upload={"directories": False})):
        await env.push_job("off", [str(env.uploads)])
        state = await env.wait_final("off")
    assert state["state"] == "failed"
    root = str(env.uploads)
    assert await env.failures("off") == {root: f"a directory, not a regular file: {root!r}"}


async def test_with_directories_off_a_directory_entry_fails_as_before(env: Env) -> None:
    (env.uploads / "d").mkdir()
    (env.uploads / "d" / "f").write_bytes(b"f")
    async with env.daemon(env.config(upload={"directories": False})):
        await env.push_job("off", [str(env.uploads / "d")])
        state = await env.wait_final("off")
    assert state["state"] == "failed"
    assert "a directory, not a regular file" in (await env.failures("off"))[str(env.uploads / "d")]


async def run_until(env: Env, job_id: str, allow: int, config: Any) -> list[str]:
    """Run a daemon that completes `allow` uploads, then holds the rest until it is stopped."""
    store = WatchingStore(LocalStore(config.store.local), allow=allow)
    async with env.daemon(config, store=store):
        await wait_until(lambda: len(store.keys) >= allow, 30, f"{allow} uploads")
    return store.keys


@pytest.mark.timeout(90)
async def test_a_redelivered_job_skips_the_files_it_uploaded(env: Env) -> None:
    tree = env.uploads / "tree"
    files = make_tree(tree, trees=4, depth=5, per_dir=15)  # 300 files, chunks of 64
    config = env.config(redis={"page_size": 64}, daemon={"drain_timeout": 0.2})
    await env.push_job("r", [str(tree)])
    first = await run_until(env, "r", 100, config)
    assert len(first) >= 100
    assert (await env.state("r"))["state"] == "queued"  # released by the drain
    store = WatchingStore(LocalStore(config.store.local))
    async with env.daemon(config, store=store):
        state = await env.wait_final("r")
    everything = {f"r/{p.relative_to(env.uploads)}" for p in files}
    assert set(store.keys) == everything - set(first)
    assert (state["state"], state["total"], state["uploaded"]) == ("done", "300", "300"), state


@pytest.mark.timeout(90)
async def test_a_tree_changed_between_runs_is_uploaded_again_never_skipped(env: Env) -> None:
    tree = env.uploads / "tree"
    files = make_tree(tree, trees=2, depth=4, per_dir=20)  # 160 files, chunks of 32
    config = env.config(redis={"page_size": 32}, daemon={"drain_timeout": 0.2})
    await env.push_job("c", [str(tree)])
    first = await run_until(env, "c", 60, config)
    # A name that sorts first shifts every later file's index by one.
    early = tree / "t00" / "a-new.txt"
    early.write_bytes(b"new")
    (tree / "t01" / "l00" / "f0.txt").unlink()
    files = [p for p in files if p.exists()] + [early]
    store = WatchingStore(LocalStore(config.store.local))
    async with env.daemon(config, store=store):
        state = await env.wait_final("c")
    everything = {f"c/{p.relative_to(env.uploads)}" for p in files}
    assert everything <= set(first) | set(store.keys)  # nothing skipped that was not uploaded
    assert (state["state"], state["total"]) == ("done", "160"), state
    for path in files:
        assert stored(env, f"c/{path.relative_to(env.uploads)}") == path.read_bytes()


def test_the_walk_needs_no_recursion_and_bounds_each_call(tmp_path: Path) -> None:
    root = tmp_path / "root"
    chain = [str(root / "top")]
    os.makedirs(chain[0])
    for _ in range(1500):  # far deeper than Python's recursion limit
        chain.append(chain[-1] + "/d")
        os.mkdir(chain[-1])
    bottom = Path(chain[-1], "bottom.txt")
    bottom.write_bytes(b"x")
    try:
        for i in range(30):
            (root / "top" / f"wide{i:02d}").mkdir()
        walker = Walker(chain[0], Root.of(str(root)))
        walker.open_top()
        found = []
        calls = 0
        while not walker.done:
            found += walker.next_chunk(10)  # at most 10 directories listed per call
            calls += 1
        assert [f.rel for f in found] == ["d/" * 1500 + "bottom.txt"]
        assert calls >= (1500 + 30) // 10
    finally:
        # pytest's own cleanup (shutil.rmtree) recurses per level: take the chain down here.
        bottom.unlink()
        for path in reversed(chain[1:]):
            os.rmdir(path)


async def test_a_name_that_is_not_utf8_fails_alone(env: Env) -> None:
    d = env.uploads / "names"
    d.mkdir()
    (d / "good.txt").write_bytes(b"good")
    fd = os.open(os.fsencode(d) + b"/bad-\xff.txt", os.O_WRONLY | os.O_CREAT, 0o644)
    os.close(fd)
    async with env.daemon(env.config()):
        await env.push_job("n", [str(d)])
        state = await env.wait_final("n")
    assert (state["state"], state["total"], state["uploaded"], state["failed"]) == ("failed", "2", "1", "1")
    assert await env.failures("n") == {f"{d}/bad-\\xff.txt": "file name is not UTF-8"}

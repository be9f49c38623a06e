"""Test helpers: a producer's view of the system (raw RPUSH and beanstalkd put) and a daemon
run in-process against the session's real servers."""

from __future__ import annotations

import asyncio
import copy
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis.asyncio as aioredis

from uploader import config as config_mod
from uploader import devservers
from uploader import files as files_mod
from uploader.beanstalk import Connection
from uploader.config import Config
from uploader.daemon import Daemon
from uploader.files import SourceFile
from uploader.redisio import Keys, text_map
from uploader.stores.base import PutRequest, PutResult, Store, StoredObject

REGION = "us-east-1"
CREDS = {"aws_access_key_id": "test", "aws_secret_access_key": "test"}
FINAL = frozenset({"done", "failed", "cancelled"})
T = TypeVar("T")
OpenFile = Callable[[str, bytes], SourceFile]


async def wait_until(
    check: Callable[[], Awaitable[T | None] | T | None], timeout: float = 30.0, what: str = "condition"
) -> T:
    """Poll `check` until it returns something truthy; fail the test after `timeout` seconds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = check()
        if asyncio.iscoroutine(value) or isinstance(value, asyncio.Future):
            value = await value
        if value:
            return value  # type: ignore[return-value]
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


class StoreWrapper:
    """A real store behind a test's instrumentation: subclasses override what they watch."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner

    async def start(self) -> None:
        await self.inner.start()

    def memory_needed(self, size: int) -> int:
        return self.inner.memory_needed(size)

    async def put(self, source: SourceFile, request: PutRequest) -> PutResult:
        return await self.inner.put(source, request)

    async def stat(self, key: str, checksum: bool = False) -> StoredObject | None:
        return await self.inner.stat(key, checksum)

    def conditional(self, size: int) -> bool:
        return self.inner.conditional(size)

    async def check(self) -> None:
        await self.inner.check()

    async def close(self) -> None:
        await self.inner.close()


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


@dataclass
class Env:
    tmp_path: Path
    beanstalkd: str
    redis_url: str
    s3_endpoint: str
    tag: str
    redis: aioredis.Redis = field(init=False)
    _conns: list[Connection] = field(default_factory=list)

    @property
    def tube(self) -> str:
        return f"up-{self.tag}"

    @property
    def done_tube(self) -> str:
        return f"done-{self.tag}"

    @property
    def prefix(self) -> str:
        return f"t{self.tag}:"

    @property
    def keys(self) -> Keys:
        return Keys(self.prefix)

    @property
    def uploads(self) -> Path:
        path = self.tmp_path / "uploads"
        path.mkdir(exist_ok=True)
        return path

    @property
    def objects(self) -> Path:
        return self.tmp_path / "objects"

    def config_data(self, store: str = "local", bucket: str = "", **overrides: Any) -> dict[str, Any]:
        data: dict[str, Any] = {
            "source": {"address": self.beanstalkd, "tubes": [self.tube], "completion_tube": self.done_tube},
            "redis": {"url": self.redis_url, "key_prefix": self.prefix, "flush_interval": 0.02},
            "upload": {
                "concurrency": 16,
                "allowed_roots": [str(self.uploads)],
                "retry": {"max_attempts": 3, "base": 0.01, "cap": 0.05},
            },
            "store": {
                "kind": store,
                "local": {"root": str(self.objects), "fsync": False},
                "s3": {
                    "bucket": bucket,
                    "endpoint_url": self.s3_endpoint,
                    "region": REGION,
                    "access_key_id": CREDS["aws_access_key_id"],
                    "secret_access_key": CREDS["aws_secret_access_key"],
                    "addressing_style": "path",
                },
            },
            "http": {"listen": ""},
            "daemon": {"drain_timeout": 5.0, "log_format": "json"},
        }
        return deep_merge(data, overrides)

    def config(self, store: str = "local", bucket: str = "", **overrides: Any) -> Config:
        return config_mod.parse(
            self.config_data(store, bucket, **overrides), str(self.tmp_path / "uploader.toml")
        )

    def write_files(self, count: int, sub: str = "", size: int = 100) -> list[Path]:
        """Files with distinct, checkable contents: the first bytes name the file."""
        base = self.uploads / sub if sub else self.uploads
        paths = []
        for i in range(count):
            path = base / f"d{i % 7}" / f"f{i:05d}.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            head = f"{path}\n".encode()
            path.write_bytes(head + os.urandom(max(0, size - len(head))))
            paths.append(path)
        return paths

    async def conn(self, address: str | None = None) -> Connection:
        connection = await Connection.connect(address or self.beanstalkd)
        self._conns.append(connection)
        return connection

    async def put(
        self,
        body: bytes | str,
        tube: str | None = None,
        priority: int = 1024,
        ttr: int = 60,
        delay: int = 0,
        address: str | None = None,
    ) -> int:
        conn = await self.conn(address)
        await conn.use(tube or self.tube)
        return await conn.put(body.encode() if isinstance(body, str) else body, priority, delay, ttr)

    async def push_job(
        self, job_id: str, entries: list[str], tube: str | None = None, ttr: int = 60, priority: int = 1024
    ) -> int:
        """What a PHP producer does: RPUSH the list, then put the ID."""
        key = self.keys.files(job_id)
        for i in range(0, len(entries), 1000):
            await self.redis.rpush(key, *entries[i : i + 1000])
        return await self.put(job_id, tube, priority=priority, ttr=ttr)

    async def state(self, job_id: str) -> dict[str, str]:
        return text_map(await self.redis.hgetall(self.keys.job(job_id)))

    async def failures(self, job_id: str) -> dict[str, str]:
        return text_map(await self.redis.hgetall(self.keys.failed(job_id)))

    async def wait_final(self, job_id: str, timeout: float = 30.0) -> dict[str, str]:
        async def final() -> dict[str, str] | None:
            state = await self.state(job_id)
            return state if state.get("state") in FINAL else None

        return await wait_until(final, timeout, f"job {job_id} to finish")

    async def completions(self, count: int, timeout: float = 30.0) -> list[dict[str, Any]]:
        return await devservers.await_completions(self.beanstalkd, self.done_tube, count, timeout)

    async def tube_stats(self, tube: str | None = None) -> dict[str, str]:
        conn = await self.conn()
        return await conn.stats_tube(tube or self.tube)

    @asynccontextmanager
    async def daemon(
        self, config: Config, store: Store | None = None, stop_timeout: float = 30.0
    ) -> AsyncIterator[Daemon]:
        """A daemon running in this event loop; stopped (drained) when the block ends."""
        daemon = Daemon(config, store=store)
        task = asyncio.create_task(daemon.run())
        try:
            yield daemon
        finally:
            daemon.request_stop()
            async with asyncio.timeout(stop_timeout):
                await task

    async def close(self) -> None:
        for conn in self._conns:
            await conn.close()
        await self.redis.aclose()


def toml_text(data: dict[str, Any]) -> str:
    """Config data as TOML, enough for `Env.config_data`: tables of scalars, lists, inline tables.

    A dozen lines instead of a dev dependency; `config.load` proves the output on every use.
    """

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)  # JSON's escapes are valid in TOML basic strings
        if isinstance(v, list | tuple):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{json.dumps(k)} = {value(x)}" for k, x in v.items()) + " }"
        raise TypeError(f"cannot write {v!r} as TOML")

    lines: list[str] = []
    for table, items in data.items():
        lines.append(f"[{table}]")
        lines += [f"{json.dumps(k)} = {value(v)}" for k, v in items.items()]
        lines.append("")
    return "\n".join(lines)


def write_config(path: Path, data: dict[str, Any]) -> Path:
    """Write config data as a TOML file and check that the daemon would accept it."""
    path.write_text(toml_text(data))
    config_mod.load(str(path))
    return path


def hook_open(
    monkeypatch: pytest.MonkeyPatch, target: Path, action: Callable[[], None], once: bool = False
) -> None:
    """Run `action` just before the daemon opens `target`, whichever way `uploader.files` opens
    it (os.open, or openat2 beneath its root): after every check by name. An OSError that
    `action` raises is that open's failure. With `once`, only the first open runs it."""
    done: list[bool] = []

    def fire() -> None:
        if once and done:
            return
        done.append(True)
        action()

    real_open = os.open

    def patched_open(p: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if os.fspath(p) == str(target):
            fire()
        return real_open(p, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", patched_open)
    real_beneath = files_mod._open_beneath
    if real_beneath is None:
        return
    whole = os.fsencode(str(target))

    def patched_beneath(dir_fd: int, relpath: bytes) -> int:
        if whole.endswith(b"/" + relpath):
            try:
                fire()
            except OSError:
                return -1  # refused as the kernel would; the resolving way then meets it too
        return real_beneath(dir_fd, relpath)

    monkeypatch.setattr(files_mod, "_open_beneath", patched_beneath)

"""Test helpers shared by the test modules: a producer's view of the system (raw RPUSH and
beanstalkd put), a daemon run in-process or as a subprocess against the session's real
servers, private servers to kill and restart, stores that record or slow their puts, and the
HTTP API's client side. Test modules import shared helpers from here, never from each other."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
import redis.asyncio as aioredis

from uploader.config import settings as config_mod
from uploader.config.settings import Config
from uploader.config.stores import LocalStoreConfig
from uploader.daemon import Daemon
from uploader.dev import servers as devservers
from uploader.dev.servers import Server
from uploader.entries import files as files_mod
from uploader.entries.files import SourceFile
from uploader.errors import PermanentFileError, TransientFileError
from uploader.redisio import Keys, text_map
from uploader.source.beanstalkd.wire import Connection
from uploader.stores.base import PutRequest, PutResult, Store, StoredObject
from uploader.stores.local import LocalStore

REPO = Path(__file__).resolve().parent.parent
REGION = "us-east-1"
CREDS = {"aws_access_key_id": "test", "aws_secret_access_key": "test"}
FINAL = frozenset({"done", "failed", "cancelled"})
# A distinctive password for the private Redis servers: it may never show up in a log line.
REDIS_PASSWORD = "chaos-redis-PW-" + uuid.uuid4().hex
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
    """Run `action` just before the daemon opens `target`, whichever way
    `uploader.entries.files` opens it (os.open, or openat2 beneath its root): after every check
    by name. An OSError that `action` raises is that open's failure. With `once`, only the first
    open runs it."""
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


async def tube_settled(env: Env, address: str | None = None) -> bool:
    """Every job of the test's tube is gone from the server (the session's, or `address`):
    deleted, not ready, reserved, delayed or buried."""
    conn = await env.conn(address)
    stats = await conn.stats_tube(env.tube)
    return all(stats[f"current-jobs-{s}"] == "0" for s in ("ready", "reserved", "delayed", "buried"))


async def uploaded(env: Env, job_id: str) -> int:
    """The job's `uploaded` counter in its Redis progress hash (0 before it has one)."""
    return int((await env.state(job_id)).get("uploaded", 0))


async def total_uploaded(env: Env, job_ids: list[str]) -> int:
    return sum([await uploaded(env, j) for j in job_ids])


async def uploaded_at_least(env: Env, job_id: str, count: int) -> bool:
    return await uploaded(env, job_id) >= count


# --- private servers, to be killed and restarted ------------------------------------------------


@asynccontextmanager
async def private_env(
    tmp_path: Path, moto_endpoint: str, beanstalkd: Server | None = None, redis_server: Server | None = None,
    shared: Env | None = None,
) -> AsyncIterator[Env]:
    """An Env on private servers (to be killed and restarted) where given, else the session's."""
    assert shared is not None
    redis_url = shared.redis_url
    if redis_server is not None:
        redis_url = f"redis://:{REDIS_PASSWORD}@{redis_server.address}/0"
    env = Env(tmp_path=tmp_path, beanstalkd=beanstalkd.address if beanstalkd else shared.beanstalkd,
              redis_url=redis_url, s3_endpoint=moto_endpoint, tag=uuid.uuid4().hex[:10])
    env.redis = aioredis.Redis.from_url(redis_url)
    try:
        yield env
    finally:
        await env.close()


def protected_redis() -> Server:
    """A Redis of a test's own: AOF on, `REDIS_PASSWORD` required."""
    server = devservers.redis(aof=True)
    server.argv += ["--requirepass", REDIS_PASSWORD]
    return server


@asynccontextmanager
async def on_private_redis(
    tmp_path: Path, moto_endpoint: str, shared: Env
) -> AsyncIterator[tuple[Server, Env]]:
    """A Redis of the test's own (AOF, password) to stop and start, and an Env that uses it."""
    server = protected_redis().start()
    try:
        async with private_env(tmp_path, moto_endpoint, redis_server=server, shared=shared) as penv:
            yield server, penv
    finally:
        server.stop()


# --- stores ---------------------------------------------------------------------------------


class RecordingStore(StoreWrapper):
    """Wraps a real store: counts concurrent puts and can inject failures or slowness."""

    def __init__(
        self,
        inner: Store,
        delay: float = 0.0,
        transient_failures: int = 0,
        permanent: frozenset[str] = frozenset(),
    ) -> None:
        super().__init__(inner)
        self.delay = delay
        self.transient_failures = transient_failures
        self.permanent = permanent
        self.active = 0
        self.peak = 0
        self.attempts: dict[str, int] = {}
        self.order: list[str] = []

    async def put(self, source: SourceFile, request: PutRequest) -> PutResult:
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            n = self.attempts[request.key] = self.attempts.get(request.key, 0) + 1
            if self.delay:
                await asyncio.sleep(self.delay)
            if request.key in self.permanent:
                raise PermanentFileError("store says no: 403 Forbidden")
            if n <= self.transient_failures:
                raise TransientFileError("store hiccup: 503")
            result = await self.inner.put(source, request)
            self.order.append(request.key)
            return result
        finally:
            self.active -= 1


class HeldStore(StoreWrapper):
    """The real local store; the puts after the first `allow` wait for `gate`."""

    def __init__(self, inner: Store, allow: int) -> None:
        super().__init__(inner)
        self.allow = allow
        self.gate = asyncio.Event()
        self.order: list[str] = []

    async def put(self, source: SourceFile, request: PutRequest) -> PutResult:
        if len(self.order) >= self.allow:
            await self.gate.wait()
        result = await self.inner.put(source, request)
        self.order.append(request.key)
        return result


class ChangingSource(SourceFile):
    """A source whose file grows once its first bytes have been read: the store must notice."""

    __slots__ = ()

    async def read(self, offset: int, length: int) -> bytes:
        data = await super().read(offset, length)
        if offset == 0:
            _append(self.path, b"appended while uploading")
        return data


def _append(path: str, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)


def local_store(env: Env) -> LocalStore:
    return LocalStore(env.config().store.local)


# --- the HTTP API ---------------------------------------------------------------------------


def listen(env: Env, **overrides: Any) -> tuple[Config, str]:
    """A config with the HTTP API on a free port, and the API's base URL."""
    port = devservers.free_port()
    config = env.config(http={"listen": f"127.0.0.1:{port}", **overrides.pop("http", {})}, **overrides)
    return config, f"http://127.0.0.1:{port}"


async def get(session: aiohttp.ClientSession, url: str, token: str = "") -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with session.get(url, headers=headers) as response:
        if response.content_type == "application/json":
            return response.status, await response.json()
        return response.status, await response.text()


# --- the daemon as a subprocess -------------------------------------------------------------


class DaemonProcess:
    """One `python -m uploader.cli.main run --config FILE` process, stdout and stderr (its JSON log
    lines, its one-line startup failures) in a log file of its own. `extra_env` adds to the
    environment, e.g. NOTIFY_SOCKET for sd_notify. Control it from sync code (`stop`, `kill`)
    or async code (`wait`, `wait_event`); `returncode` is the exit status once it is known."""

    def __init__(self, config: Path, log: Path, extra_env: dict[str, str] | None = None) -> None:
        self.config = config
        self.log = log
        self.extra_env = extra_env or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.returncode: int | None = None

    def start(self) -> DaemonProcess:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "uploader.cli.main", "run", "--config", str(self.config)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
                env={**os.environ, "PYTHONPATH": str(REPO), **self.extra_env},
            )
        return self

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        """The JSON log lines, in order; only those of event `name` if given."""
        found = []
        for line in self.text().splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict) and (name is None or event.get("event") == name):
                found.append(event)
        return found

    async def wait_event(self, name: str, timeout: float = 20.0) -> dict[str, Any]:
        """The first `name` event the daemon logs; fails the test if the daemon exits first."""

        def seen() -> dict[str, Any] | None:
            if not self.alive:
                code = None if self.proc is None else self.proc.poll()
                raise AssertionError(f"the daemon exited ({code}):\n{self.text()[-3000:]}")
            events = self.events(name)
            return events[0] if events else None

        return await wait_until(seen, timeout, f"the daemon to log {name!r}")

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def wait(self, timeout: float) -> int:
        """The exit status, waited for without blocking the event loop; TimeoutError after
        `timeout` seconds."""
        assert self.proc is not None
        deadline = asyncio.get_running_loop().time() + timeout
        while (code := self.proc.poll()) is None:
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"the daemon still runs after {timeout}s")
            await asyncio.sleep(0.01)
        self.returncode = code
        return code

    def kill(self) -> None:
        """SIGKILL, if it still runs, and reap it."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.kill()
        self.returncode = self.proc.wait(10)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, the drain, and the exit code (blocks: the daemon is another process)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        self.returncode = self.proc.wait(timeout)
        return self.returncode


class Daemons:
    """The daemon processes of one test, each with its own log under `tmp_path`; `close` kills
    what still runs (the `daemons` fixture calls it)."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.started: list[DaemonProcess] = []

    def new(self, config: Path, extra_env: dict[str, str] | None = None) -> DaemonProcess:
        """A daemon process not started yet."""
        daemon = DaemonProcess(config, self.tmp_path / f"daemon-{len(self.started)}.log", extra_env)
        self.started.append(daemon)
        return daemon

    def start(self, config: Path, extra_env: dict[str, str] | None = None) -> DaemonProcess:
        return self.new(config, extra_env).start()

    def close(self) -> None:
        for daemon in self.started:
            if daemon.proc is not None and daemon.alive:
                daemon.kill()

    def assert_clean_logs(self, secrets: tuple[str, ...]) -> None:
        """No secret and no traceback in any daemon's log."""
        for daemon in self.started:
            text = daemon.text()
            for secret in secrets:
                assert secret not in text, f"a secret is in {daemon.log}"
            assert "Traceback" not in text, f"the daemon logged a traceback:\n{text[-3000:]}"


# --- systemd's notify socket, and the command line --------------------------------------------


@contextlib.contextmanager
def notify_socket() -> Iterator[tuple[str, list[str]]]:
    """An sd_notify socket (abstract address) and the lines received on it, read in a thread."""
    name = f"uploader-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(0.1)
    seen: list[str] = []
    done = threading.Event()

    def receive() -> None:
        while not done.is_set():
            with contextlib.suppress(TimeoutError):
                seen.extend(sock.recv(4096).decode().splitlines())

    reader = threading.Thread(target=receive, daemon=True)
    reader.start()
    try:
        yield "@" + name, seen
    finally:
        done.set()
        reader.join(5)
        sock.close()


async def run_cli(*args: str) -> tuple[int, str, str]:
    """`python -m uploader.cli.main ARGS...`: exit status, stdout, stderr."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "uploader.cli.main", *args, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode("utf-8", "replace")


# --- several beanstalkd ---------------------------------------------------------------------


class SlowStore(LocalStore):
    """A local store whose uploads take `delay` seconds, so jobs are provably mid-run."""

    def __init__(self, config: LocalStoreConfig, delay: float = 0.02) -> None:
        super().__init__(config)
        self.delay = delay

    async def put(self, source: SourceFile, request: PutRequest) -> PutResult:
        await asyncio.sleep(self.delay)
        return await super().put(source, request)


@asynccontextmanager
async def two_servers(env: Env) -> AsyncIterator[tuple[Env, Server, Server]]:
    """Two private beanstalkd (the second with a binlog, to be killed or thrown away), and an
    Env whose producer side talks to the first: that is where completion messages go."""
    first = devservers.beanstalkd().start()
    second = devservers.beanstalkd(binlog=True).start()
    penv = Env(tmp_path=env.tmp_path, beanstalkd=first.address, redis_url=env.redis_url,
               s3_endpoint=env.s3_endpoint, tag=uuid.uuid4().hex[:10])
    penv.redis = aioredis.Redis.from_url(env.redis_url)
    try:
        yield penv, first, second
    finally:
        await penv.close()
        first.stop()
        second.stop()

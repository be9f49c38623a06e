"""What a daemon costs Redis: a counting proxy in front of it, and INFO read around a run.

`CountingProxy` listens on loopback and forwards to one redis-server, counting on every client
connection the turns (a burst of client->server bytes after the server last spoke, or at the
connection's start), the commands sent (the client's RESP parsed with hiredis) and the bytes
each way. It runs its own event loop in a thread of the bench process, so the daemon under
test is untouched.

`InfoReader` takes `INFO all` over one raw socket of its own (no client library, so no
handshake commands), and `redis_delta` subtracts what the reader itself cost: one INFO call,
the bytes of one request in and of one reply out, the CPU of that one INFO.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

try:
    import hiredis
except ImportError:  # then commands sent are not counted, the rest is
    hiredis = None

T = TypeVar("T")


@dataclass
class ProxyStats:
    connections: int = 0
    turns: int = 0
    bytes_up: int = 0  # client -> server
    bytes_down: int = 0
    commands: Counter[str] = field(default_factory=Counter)  # sent by the clients, by name
    last_up: float = 0.0  # time.monotonic() of the last client -> server bytes

    def copy(self) -> ProxyStats:
        return ProxyStats(
            self.connections, self.turns, self.bytes_up, self.bytes_down, Counter(self.commands), self.last_up
        )


class _Client(asyncio.Protocol):
    """The daemon's side of one connection."""

    def __init__(self, proxy: CountingProxy) -> None:
        self.proxy = proxy
        self.transport: asyncio.Transport | None = None
        self.server: _Server | None = None
        self.last = ""  # who spoke last on this connection: "", "client" or "server"
        self.reader = hiredis.Reader() if hiredis is not None else None
        self.pending: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        transport.pause_reading()  # until the upstream connection is there
        self.proxy.stats.connections += 1
        self.proxy.clients.add(self)
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, server = await loop.create_connection(lambda: _Server(self), "127.0.0.1", self.proxy.target)
        except OSError:
            if self.transport is not None:
                self.transport.close()
            return
        self.server = server
        assert server.transport is not None
        for data in self.pending:
            server.transport.write(data)
        self.pending.clear()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        stats = self.proxy.stats
        if self.last != "client":
            stats.turns += 1
            self.last = "client"
        stats.bytes_up += len(data)
        stats.last_up = time.monotonic()
        if self.reader is not None:
            self.reader.feed(data)
            while (request := self.reader.gets()) is not False:
                if isinstance(request, list) and request and isinstance(request[0], bytes):
                    stats.commands[request[0].decode(errors="replace").lower()] += 1
        if self.server is None or self.server.transport is None:
            self.pending.append(data)  # uvloop may deliver before pause_reading takes hold
        else:
            self.server.transport.write(data)

    def pause_writing(self) -> None:
        if self.server is not None and self.server.transport is not None:
            self.server.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.server is not None and self.server.transport is not None:
            self.server.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.proxy.clients.discard(self)
        if self.server is not None and self.server.transport is not None:
            self.server.transport.close()


class _Server(asyncio.Protocol):
    """Redis's side of one connection."""

    def __init__(self, client: _Client) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.client.last = "server"
        self.client.proxy.stats.bytes_down += len(data)
        if self.client.transport is not None:
            self.client.transport.write(data)

    def pause_writing(self) -> None:
        if self.client.transport is not None:
            self.client.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.client.transport is not None:
            self.client.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.client.transport is not None:
            self.client.transport.close()


class CountingProxy:
    """127.0.0.1:<port> -> 127.0.0.1:<target>, counting; `url` is what the daemon is given."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = 0
        self.stats = ProxyStats()
        self.clients: set[_Client] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.AbstractServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> CountingProxy:
        try:
            import uvloop

            loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
        except ImportError:
            loop = asyncio.new_event_loop()
        self._loop = loop
        server = loop.run_until_complete(loop.create_server(lambda: _Client(self), "127.0.0.1", 0))
        self._server = server
        self.port = server.sockets[0].getsockname()[1]
        self._thread = threading.Thread(target=loop.run_forever, name="redis-proxy", daemon=True)
        self._thread.start()
        return self

    def _call(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the proxy's loop and return its result: a consistent read of the counts."""
        assert self._loop is not None
        done: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            try:
                done.set_result(fn())
            except BaseException as exc:  # handed to the caller
                done.set_exception(exc)

        self._loop.call_soon_threadsafe(run)
        return done.result(timeout=10)

    def snapshot(self) -> ProxyStats:
        return self._call(self.stats.copy)

    def settle(self, quiet: float = 0.05, limit: float = 1.0) -> float:
        """Wait until no client has sent anything for `quiet` seconds (at most `limit`): the
        writes that follow a job's completion message land before INFO is read. Reads no Redis."""
        started = time.monotonic()
        while True:
            now = time.monotonic()
            idle = now - self.snapshot().last_up
            if idle >= quiet or now - started >= limit:
                return now - started
            time.sleep(min(quiet - idle, 0.01) if idle < quiet else 0.01)

    def stop(self) -> None:
        loop = self._loop
        if loop is None:
            return

        def close() -> None:
            assert self._server is not None
            self._server.close()
            for client in list(self.clients):
                if client.transport is not None:
                    client.transport.close()

        self._call(close)
        loop.call_soon_threadsafe(loop.stop)
        assert self._thread is not None
        self._thread.join(timeout=10)
        loop.close()
        self._loop = None


# --- INFO -----------------------------------------------------------------------------------

INFO_REQUEST = b"*2\r\n$4\r\nINFO\r\n$3\r\nall\r\n"


@dataclass
class Info:
    fields: dict[str, str]
    calls: dict[str, int]  # commandstats: calls by command (subcommands as "client|setinfo")
    usec: dict[str, int]
    rejected: dict[str, int]  # refused before running (unknown subcommand, wrong arity): not in calls
    reply_bytes: int  # the whole RESP reply to this INFO, as Redis counted it out

    def number(self, name: str) -> float | None:
        value = self.fields.get(name)
        return float(value) if value is not None else None


class InfoReader:
    """`INFO all` over one socket of its own, opened before the first snapshot."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buf = b""

    def _fill(self) -> None:
        chunk = self.sock.recv(1 << 16)
        if not chunk:
            raise ConnectionError("redis closed the INFO connection")
        self.buf += chunk

    def _read(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def snapshot(self) -> Info:
        self.sock.sendall(INFO_REQUEST)
        while b"\r\n" not in self.buf:
            self._fill()
        head, _, self.buf = self.buf.partition(b"\r\n")
        if not head.startswith(b"$"):
            raise RuntimeError(f"unexpected INFO reply: {head[:200]!r}")
        size = int(head[1:])
        body = self._read(size + 2)[:size].decode()
        fields: dict[str, str] = {}
        calls: dict[str, int] = {}
        usec: dict[str, int] = {}
        rejected: dict[str, int] = {}
        for line in body.splitlines():
            if not line or line.startswith("#") or ":" not in line:
                continue
            key, value = line.split(":", 1)
            if key.startswith("cmdstat_"):
                stat = dict(kv.split("=", 1) for kv in value.split(","))
                name = key[len("cmdstat_") :]
                calls[name] = int(stat["calls"])
                usec[name] = int(stat["usec"])
                rejected[name] = int(stat.get("rejected_calls", 0))
            else:
                fields[key] = value
        return Info(fields, calls, usec, rejected, len(head) + 2 + size + 2)

    def close(self) -> None:
        self.sock.close()


def redis_delta(before: Info, after: Info) -> dict[str, Any]:
    """After minus before, less the reader's own cost: the before-INFO is in the after figures
    (commandstats counts a command once it has run, its reply goes out after), and so is the
    after-INFO's request (counted in as it is read); the after-INFO's reply and CPU are not."""
    calls = Counter({k: after.calls.get(k, 0) - before.calls.get(k, 0) for k in after.calls})
    usec = {k: after.usec.get(k, 0) - before.usec.get(k, 0) for k in after.usec}
    own_usec = usec.get("info", 0) if calls.get("info", 0) == 1 else 0
    calls["info"] -= 1  # the bench's own INFO: the daemon never sends one, or it shows as 1+
    calls = Counter({k: v for k, v in calls.items() if v > 0})

    def diff(name: str) -> float | None:
        a, b = after.number(name), before.number(name)
        return a - b if a is not None and b is not None else None

    cpu = [diff("used_cpu_sys"), diff("used_cpu_user")]
    main = [diff("used_cpu_sys_main_thread"), diff("used_cpu_user_main_thread")]
    net_in, net_out = diff("total_net_input_bytes"), diff("total_net_output_bytes")
    return {
        "calls": dict(calls.most_common()),
        "usec": {k: v for k, v in sorted(usec.items(), key=lambda kv: -kv[1]) if v > 0 and k != "info"},
        "commands": sum(calls.values()),
        "rejected": sum(after.rejected.values()) - sum(before.rejected.values()),
        "usec_in_commands": sum(usec.values()) - own_usec,
        "cpu_s": sum(c for c in cpu if c is not None) - own_usec / 1e6 if None not in cpu else None,
        "cpu_main_s": sum(c for c in main if c is not None) - own_usec / 1e6 if None not in main else None,
        "net_in": net_in - len(INFO_REQUEST) if net_in is not None else None,
        "net_out": net_out - before.reply_bytes if net_out is not None else None,
        "redis_version": after.fields.get("redis_version", "?"),
    }


def proxy_delta(before: ProxyStats, after: ProxyStats) -> dict[str, Any]:
    """What the proxy counted between two snapshots."""
    sent = after.commands - before.commands
    return {
        "round_trips": after.turns - before.turns,
        "connections": after.connections - before.connections,
        "sent": sum(sent.values()),  # 0 without hiredis
        "sent_calls": dict(sent.most_common()),
        "bytes_up": after.bytes_up - before.bytes_up,
        "bytes_down": after.bytes_down - before.bytes_down,
    }

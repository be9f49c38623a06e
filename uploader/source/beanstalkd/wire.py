"""The beanstalkd wire protocol (protocol.txt) over asyncio streams.

Written by hand: the asyncio clients on PyPI are unmaintained or lean on greenstalk's private
functions. One `Connection` is one TCP connection: beanstalkd answers one command at a time and
ties reservations to the connection, so callers own connections rather than share a pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from uploader.clock import backoff_delays
from uploader.errors import InfrastructureError, UploaderError
from uploader.source.base import DEFAULT_PRIORITY as DEFAULT_PRIORITY  # the wire default, shared


class BeanstalkError(UploaderError):
    """beanstalkd answered with an error reply."""


class ConnectionLost(BeanstalkError, InfrastructureError):
    """The connection broke; any job reserved on it is back in its tube."""


class OutOfMemory(BeanstalkError): ...


class InternalError(BeanstalkError): ...


class BadFormat(BeanstalkError): ...


class UnknownCommand(BeanstalkError): ...


class ExpectedCrlf(BeanstalkError): ...


class JobTooBig(BeanstalkError): ...


class Draining(BeanstalkError): ...


class NotFound(BeanstalkError): ...


class NotIgnored(BeanstalkError): ...


class DeadlineSoon(BeanstalkError): ...


class Buried(BeanstalkError):
    """`put` or `release` could not grow the priority queue; the job was buried."""

    def __init__(self, reply: str, job_id: int | None) -> None:
        super().__init__(reply)
        self.job_id = job_id


class UnexpectedReply(BeanstalkError): ...


_ERRORS: dict[str, type[BeanstalkError]] = {
    "OUT_OF_MEMORY": OutOfMemory,
    "INTERNAL_ERROR": InternalError,
    "BAD_FORMAT": BadFormat,
    "UNKNOWN_COMMAND": UnknownCommand,
    "EXPECTED_CRLF": ExpectedCrlf,
    "JOB_TOO_BIG": JobTooBig,
    "DRAINING": Draining,
    "NOT_FOUND": NotFound,
    "NOT_IGNORED": NotIgnored,
    "DEADLINE_SOON": DeadlineSoon,
}

MAX_TUBE_NAME = 200


@dataclass(frozen=True, slots=True)
class Job:
    id: int
    body: bytes


def _why(exc: OSError) -> str:
    """The OS's words ("Connection refused"), not asyncio's "Connect call failed (...)"."""
    if isinstance(exc, TimeoutError):
        return "timed out"
    return os.strerror(exc.errno) if exc.errno else str(exc)


def parse_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


class _Protocol(asyncio.StreamReaderProtocol):
    """asyncio's stream protocol, telling `gone` the moment the server closes or the connection
    breaks, whether or not a command is waiting for a reply."""

    def __init__(self, reader: asyncio.StreamReader, gone: asyncio.Event) -> None:
        super().__init__(reader)
        self._gone = gone

    def eof_received(self) -> bool:
        self._gone.set()
        return bool(super().eof_received())

    def connection_lost(self, exc: Exception | None) -> None:
        self._gone.set()
        super().connection_lost(exc)


class Connection:
    """One connection to beanstalkd. Commands are serialised; a broken stream is closed."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        address: str,
        gone: asyncio.Event | None = None,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._lock = asyncio.Lock()
        self._gone = gone or asyncio.Event()
        self.address = address
        self.closed = False

    @classmethod
    async def connect(cls, address: str, timeout: float = 5.0) -> Connection:
        host, port = parse_address(address)
        loop = asyncio.get_running_loop()
        reader, gone = asyncio.StreamReader(), asyncio.Event()
        try:
            async with asyncio.timeout(timeout):
                transport, protocol = await loop.create_connection(
                    lambda: _Protocol(reader, gone), host, port
                )
        except (OSError, TimeoutError) as exc:
            raise ConnectionLost(f"cannot connect to beanstalkd at {address}: {_why(exc)}") from None
        return cls(reader, asyncio.StreamWriter(transport, protocol, reader, loop), address, gone)

    @property
    def gone(self) -> bool:
        """Closed here, or by the server (or broken): no command can succeed on it."""
        return self.closed or self._gone.is_set()

    async def wait_gone(self) -> None:
        """Until the server closes the connection or it breaks (reservations on it are over)."""
        await self._gone.wait()

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._writer.close()
        with contextlib.suppress(OSError, ConnectionError):
            await self._writer.wait_closed()

    async def _call(self, command: bytes, body: bytes | None = None) -> tuple[str, bytes | None]:
        """Send one command, return the reply line's words and any data block."""
        if self.closed:
            raise ConnectionLost(f"connection to {self.address} is closed")
        if b"\r" in command or b"\n" in command:
            # A tube name with a line break would smuggle a second command onto the wire.
            raise BadFormat(f"refusing a command with a line break: {command[:60]!r}")
        async with self._lock:
            try:
                self._writer.write(command + b"\r\n" if body is None else command + b"\r\n" + body + b"\r\n")
                await self._writer.drain()
                line = await self._reader.readuntil(b"\r\n")
                reply = line[:-2].decode("ascii")
                data = None
                if reply.startswith(("RESERVED ", "FOUND ", "OK ")):
                    size = int(reply.rsplit(" ", 1)[1])
                    data = (await self._reader.readexactly(size + 2))[:-2]
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError) as exc:
                await self._abandon()
                raise ConnectionLost(f"lost connection to beanstalkd at {self.address}: {exc!r}") from None
            except BaseException:
                # Cancelled mid-reply: the stream is out of step with the server; drop it.
                await self._abandon()
                raise
        word = reply.split(" ", 1)[0]
        if word == "BAD_FORMAT" and body is not None:
            # beanstalkd refused the command line without reading the body, and would now
            # parse the body as the next command: the stream is out of step; drop it.
            await self._abandon()
        if word in _ERRORS:
            raise _ERRORS[word](f"{command.split(b' ', 1)[0].decode()}: {reply}")
        return reply, data

    async def _abandon(self) -> None:
        self.closed = True
        self._writer.close()

    def _expect(self, reply: str, *words: str) -> list[str]:
        parts = reply.split(" ")
        if parts[0] not in words:
            raise UnexpectedReply(f"unexpected reply from {self.address}: {reply!r}")
        return parts

    # --- producer commands ---

    async def use(self, tube: str) -> None:
        reply, _ = await self._call(f"use {tube}".encode())
        self._expect(reply, "USING")

    async def put(self, body: bytes, priority: int = DEFAULT_PRIORITY, delay: int = 0, ttr: int = 60) -> int:
        reply, _ = await self._call(f"put {priority} {delay} {ttr} {len(body)}".encode(), body)
        parts = self._expect(reply, "INSERTED", "BURIED")
        if parts[0] == "BURIED":
            raise Buried(reply, int(parts[1]) if len(parts) > 1 else None)
        return int(parts[1])

    # --- worker commands ---

    async def watch(self, tube: str) -> int:
        reply, _ = await self._call(f"watch {tube}".encode())
        return int(self._expect(reply, "WATCHING")[1])

    async def ignore(self, tube: str) -> int:
        reply, _ = await self._call(f"ignore {tube}".encode())
        return int(self._expect(reply, "WATCHING")[1])

    async def reserve(self, timeout: int | None = None) -> Job | None:
        """Reserve a job; None only when the server said TIMED_OUT, never on a lost connection."""
        command = b"reserve" if timeout is None else f"reserve-with-timeout {timeout}".encode()
        reply, data = await self._call(command)
        parts = self._expect(reply, "RESERVED", "TIMED_OUT")
        if parts[0] == "TIMED_OUT":
            return None
        assert data is not None
        return Job(int(parts[1]), data)

    async def reserve_job(self, job_id: int) -> Job:
        reply, data = await self._call(f"reserve-job {job_id}".encode())
        parts = self._expect(reply, "RESERVED")
        assert data is not None
        return Job(int(parts[1]), data)

    async def touch(self, job_id: int) -> None:
        reply, _ = await self._call(f"touch {job_id}".encode())
        self._expect(reply, "TOUCHED")

    async def delete(self, job_id: int) -> None:
        reply, _ = await self._call(f"delete {job_id}".encode())
        self._expect(reply, "DELETED")

    async def release(self, job_id: int, priority: int = DEFAULT_PRIORITY, delay: int = 0) -> None:
        reply, _ = await self._call(f"release {job_id} {priority} {delay}".encode())
        parts = self._expect(reply, "RELEASED", "BURIED")
        if parts[0] == "BURIED":
            raise Buried(reply, job_id)

    async def bury(self, job_id: int, priority: int = DEFAULT_PRIORITY) -> None:
        reply, _ = await self._call(f"bury {job_id} {priority}".encode())
        self._expect(reply, "BURIED")

    async def kick_job(self, job_id: int) -> None:
        """Back to ready: a buried or delayed job; NotFound for any other."""
        reply, _ = await self._call(f"kick-job {job_id}".encode())
        self._expect(reply, "KICKED")

    async def kick(self, bound: int) -> int:
        """Kick up to `bound` jobs of the used tube: its buried ones, or its delayed ones when
        none is buried (so check the buried count first if delayed jobs must stay delayed)."""
        reply, _ = await self._call(f"kick {bound}".encode())
        return int(self._expect(reply, "KICKED")[1])

    # --- inspection ---

    async def peek(self, job_id: int) -> Job:
        reply, data = await self._call(f"peek {job_id}".encode())
        parts = self._expect(reply, "FOUND")
        assert data is not None
        return Job(int(parts[1]), data)

    async def peek_many(self, job_ids: Sequence[int]) -> dict[int, bytes]:
        """`peek` each ID, the commands pipelined in one write: the bodies of those that exist
        (in any state), by ID. For `uploader recover`, which looks at every job of a server."""
        if self.closed:
            raise ConnectionLost(f"connection to {self.address} is closed")
        found: dict[int, bytes] = {}
        async with self._lock:
            try:
                self._writer.write(b"".join(b"peek %d\r\n" % i for i in job_ids))
                await self._writer.drain()
                for _ in job_ids:
                    reply = (await self._reader.readuntil(b"\r\n"))[:-2].decode("ascii")
                    parts = self._expect(reply, "FOUND", "NOT_FOUND")
                    if parts[0] == "FOUND":
                        found[int(parts[1])] = (await self._reader.readexactly(int(parts[2]) + 2))[:-2]
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError) as exc:
                await self._abandon()
                raise ConnectionLost(f"lost connection to beanstalkd at {self.address}: {exc!r}") from None
            except BaseException:
                await self._abandon()  # out of step with the server
                raise
        return found

    async def stats_job(self, job_id: int) -> dict[str, str]:
        return await self._stats(f"stats-job {job_id}")

    async def stats_tube(self, tube: str) -> dict[str, str]:
        return await self._stats(f"stats-tube {tube}")

    async def stats(self) -> dict[str, str]:
        return await self._stats("stats")

    async def _stats(self, command: str) -> dict[str, str]:
        reply, data = await self._call(command.encode())
        self._expect(reply, "OK")
        assert data is not None
        return _parse_yaml_dict(data)


def _parse_yaml_dict(data: bytes) -> dict[str, str]:
    """beanstalkd's stats are a flat YAML mapping of scalars; no YAML library needed."""
    out: dict[str, str] = {}
    for line in data.decode("utf-8", "replace").splitlines():
        key, sep, value = line.partition(": ")
        if sep:
            out[key.strip()] = value.strip().strip('"')
    return out


async def connect_with_backoff(
    address: str,
    *,
    base: float = 0.1,
    cap: float = 5.0,
    on_retry: Callable[[ConnectionLost, float], None] | None = None,
) -> Connection:
    """Connect, waiting with capped exponential backoff while beanstalkd is unreachable."""
    delays = backoff_delays(base, cap)
    while True:
        try:
            return await Connection.connect(address)
        except ConnectionLost as exc:
            delay = next(delays)
            if on_retry is not None:
                on_retry(exc, delay)
            await asyncio.sleep(delay)


class Producer:
    """Puts into one tube, reconnecting on loss; for completion messages.

    With several servers a message goes to the server named by `prefer` (the one that held the
    job) while it answers, else to the next server in the configured order that does, so one
    dead beanstalkd cannot hold up the announcements of jobs from the others. `is_up` (the
    daemon's view of its servers) moves servers known to be down to the end of the order.
    """

    def __init__(
        self,
        addresses: str | tuple[str, ...],
        tube: str,
        is_up: Callable[[str], bool] | None = None,
        timeout: float = 5.0,
    ) -> None:
        self.addresses = (addresses,) if isinstance(addresses, str) else addresses
        self.tube = tube
        self.is_up = is_up
        self.timeout = timeout  # seconds to connect, and for each reply
        self._conns: dict[str, Connection] = {}
        self._lock = asyncio.Lock()

    def order(self, prefer: str | None = None) -> list[str]:
        """The servers to try, first choice first."""
        first = [prefer] if prefer in self.addresses else []
        rest = [a for a in self.addresses if a != prefer]
        ordered = [*first, *rest]
        if self.is_up is None:
            return ordered
        up = self.is_up
        return [a for a in ordered if up(a)] + [a for a in ordered if not up(a)]

    async def put(
        self,
        body: bytes,
        priority: int = DEFAULT_PRIORITY,
        delay: int = 0,
        ttr: int = 60,
        prefer: str | None = None,
    ) -> int:
        delays: Iterator[float] | None = None  # made at the first round that no server took
        async with self._lock:
            while True:
                for address in self.order(prefer):
                    try:
                        async with asyncio.timeout(self.timeout):
                            conn = await self._conn(address)
                            return await conn.put(body, priority, delay, ttr)
                    except (ConnectionLost, TimeoutError):
                        await self._forget(address)
                if delays is None:
                    delays = backoff_delays(0.1, 5.0)
                await asyncio.sleep(next(delays))

    async def _conn(self, address: str) -> Connection:
        conn = self._conns.get(address)
        if conn is None or conn.gone:
            await self._forget(address)
            conn = await Connection.connect(address, self.timeout)
            try:
                await conn.use(self.tube)
            except BaseException:
                await conn.close()
                raise
            self._conns[address] = conn
        return conn

    async def _forget(self, address: str) -> None:
        conn = self._conns.pop(address, None)
        if conn is not None:
            await conn.close()

    async def close(self) -> None:
        for address in list(self._conns):
            await self._forget(address)

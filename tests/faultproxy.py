"""An HTTP/1.1 fault proxy of the tests' own, between a daemon and moto's S3 server.

It runs on its own event loop in a thread, so it serves a daemon that is a subprocess as well
as one in the test's loop. Every request is read whole, then matched against the current rules
(switchable at any time from the test thread); the first rule that matches picks the fault:

- ``slowdown``: answer ``503 SlowDown`` as S3 does when it throttles;
- ``reset``: read half the body, then reset the connection (RST, not FIN);
- ``blackhole``: read the request and never answer, until the client gives up;
- ``delay``: forward, then hold the answer for ``delay`` seconds (a slow S3);
- ``hold``: forward only once the test releases the key (`release`), so a test can act while
  an upload is provably in flight;
- ``corrupt``: forward the request with one byte in the middle of its body flipped (a body
  damaged on the way, which the store must refuse by its checksum), its headers unchanged;
- ``invalidpart``: answer ``400 InvalidPart`` without forwarding, as a server does to a
  completion that names a part it has not recorded yet (Ceph RGW under load);
  ``invalidblocklist``: the same for an Azure block list commit;
- ``hidepart``: forward, then drop the first ``<Part>`` or ``<Block>`` from the answer (a
  ListParts or Get Block List that does not show one yet).

Requests are forwarded one per upstream connection with ``Connection: close`` and the answer
is relayed back with ``Connection: close``: no response parsing, and a fault can never leave
a pooled connection in a state the test did not choose. Every request is logged as a `Record`;
`forwarded` counts, by key, the requests that reached the store (what was uploaded, measured at
the store's door), and `waiting` is how many a ``delay`` or ``hold`` holds back right now.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

# "slowdown" | "reset" | "blackhole" | "delay" | "hold" | "corrupt" | "invalidpart"
# | "invalidblocklist" | "hidepart"
Fault = str

SLOWDOWN_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)
INVALID_PART_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>InvalidPart</Code>'
    b"<Message>One or more of the specified parts could not be found.</Message></Error>"
)
INVALID_BLOCK_LIST_BODY = (
    b'<?xml version="1.0" encoding="utf-8"?><Error><Code>InvalidBlockList</Code>'
    b"<Message>The specified block list is invalid.</Message></Error>"
)
PART_ELEMENT = re.compile(rb"<(Part|Block)>.*?</\1>", re.DOTALL)
MAX_HEAD = 64 * 1024
HOLD_POLL = 0.01  # seconds between checks of a held request's release


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    bucket: str
    key: str
    query: str

    @property
    def is_part(self) -> bool:
        return "partNumber=" in self.query


@dataclass
class Rule:
    """Which requests get a fault, and how many: `per_key` times per key, `count` in all,
    or every match until `until` (time.monotonic()); no bound at all means every match."""

    fault: Fault
    prefix: str = ""  # object key prefix; "" matches every request, bucket-level ones too
    methods: frozenset[str] = frozenset({"GET", "PUT", "POST", "HEAD", "DELETE"})
    per_key: int | None = None
    count: int | None = None
    until: float | None = None
    delay: float = 0.0
    parts_only: bool = False
    query: str = ""  # a text the request's query must hold: "uploadId=" for a completion (POST)
    hits: dict[str, int] = field(default_factory=dict)
    used: int = 0

    def take(self, request: Request, now: float) -> bool:
        if request.method not in self.methods or not request.key.startswith(self.prefix):
            return False
        if self.parts_only and not request.is_part:
            return False
        if self.query not in request.query:
            return False
        if self.until is not None and now >= self.until:
            return False
        if self.count is not None and self.used >= self.count:
            return False
        if self.per_key is not None and self.hits.get(request.key, 0) >= self.per_key:
            return False
        self.used += 1
        self.hits[request.key] = self.hits.get(request.key, 0) + 1
        return True


@dataclass
class Record:
    request: Request
    fault: Fault | None
    started: float
    ended: float | None = None
    status: int | None = None  # what the client was answered; None: no answer
    forwarded: bool = False  # sent on to the store


class FaultProxy:
    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self._upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self._lock = threading.Lock()
        self._rules: list[Rule] = []
        self._released: set[str] = set()
        self._seen_held: set[str] = set()
        self.records: list[Record] = []
        self._waiting = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fault-proxy", daemon=True)
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self.port = 0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # --- control, from the test's thread ---

    def start(self) -> FaultProxy:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._serve, "127.0.0.1", 0), self._loop
        ).result(10)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        async def shutdown() -> None:
            assert self._server is not None
            self._server.close()
            for task in list(self._handlers):
                task.cancel()
            await asyncio.gather(*self._handlers, return_exceptions=True)
            await self._server.wait_closed()

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def add(self, rule: Rule) -> Rule:
        with self._lock:
            self._rules.append(rule)
        return rule

    def clear(self) -> None:
        with self._lock:
            self._rules.clear()

    def release(self, key: str) -> None:
        with self._lock:
            self._released.add(key)

    def held(self, key: str) -> bool:
        with self._lock:
            return key in self._seen_held

    def snapshot(self) -> list[Record]:
        with self._lock:
            return list(self.records)

    def count(self, match: Callable[[Record], bool]) -> int:
        return sum(1 for r in self.snapshot() if match(r))

    def forwarded(self, method: str = "PUT", bucket: str | None = None) -> Counter[str]:
        """How many `method` requests (of `bucket`, if given) were sent on to the store, by key."""
        return Counter(
            r.request.key for r in self.snapshot()
            if r.forwarded and r.request.method == method and bucket in (None, r.request.bucket)
        )

    @property
    def waiting(self) -> int:
        """Requests a ``delay`` or ``hold`` rule holds back at this moment."""
        with self._lock:
            return self._waiting

    @contextlib.contextmanager
    def _held_back(self) -> Iterator[None]:
        with self._lock:
            self._waiting += 1
        try:
            yield
        finally:
            with self._lock:
                self._waiting -= 1

    # --- the proxy, on its own loop ---

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            await self._one(reader, writer)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            pass
        finally:
            self._handlers.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        if len(head) > MAX_HEAD:
            raise ValueError("request head too large")
        lines = head.decode("latin-1").split("\r\n")
        method, target, _ = lines[0].split(" ", 2)
        headers = [tuple(h.split(":", 1)) for h in lines[1:] if ":" in h]
        length = next((int(v) for k, v in headers if k.strip().lower() == "content-length"), 0)
        url = urlsplit(target)
        path = unquote(url.path).lstrip("/")
        bucket, _, key = path.partition("/")
        request = Request(method, bucket, key, url.query)
        now = time.monotonic()
        with self._lock:
            rule = next((r for r in self._rules if r.take(request, now)), None)
            record = Record(request, rule.fault if rule else None, now)
            self.records.append(record)
        fault = rule.fault if rule else None

        if fault == "blackhole":
            assert rule is not None
            # Silence, even after the rule ends, until the client gives up: not even the
            # "100 Continue" a client may wait for before it sends its body.
            while await reader.read(65536):
                pass
            record.ended = time.monotonic()
            return
        expect = any(k.strip().lower() == "expect" and "100" in v for k, v in headers)
        if expect:  # as S3 does; botocore sends PutObject and UploadPart bodies only after it
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            await writer.drain()
        if fault == "reset":
            await reader.readexactly(length // 2)
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            record.ended = time.monotonic()
            return
        body = await reader.readexactly(length)
        if fault == "corrupt" and body:
            middle = len(body) // 2
            body = body[:middle] + bytes([body[middle] ^ 0xFF]) + body[middle + 1 :]
        if fault in ("slowdown", "invalidpart", "invalidblocklist"):
            await self._answer(writer, record, self._error(fault))
            return
        if fault == "hold":
            with self._lock:
                self._seen_held.add(key)
            with self._held_back():
                while True:
                    with self._lock:
                        if key in self._released:
                            break
                    await asyncio.sleep(HOLD_POLL)
        kept = [f"{k}:{v}" for k, v in headers if k.strip().lower() not in ("connection", "expect")]
        upstream_head = "\r\n".join([lines[0], *kept, "Connection: close", "", ""]).encode("latin-1")
        answer = await self._forward(upstream_head + body, record)
        if fault == "hidepart":
            answer = self._without_first_part(answer)
        if fault == "delay":
            assert rule is not None
            with self._held_back():
                await asyncio.sleep(rule.delay)
        await self._answer(writer, record, answer)

    async def _forward(self, raw: bytes, record: Record) -> bytes:
        up_reader, up_writer = await asyncio.open_connection(*self._upstream)
        try:
            up_writer.write(raw)
            await up_writer.drain()
            record.forwarded = True
            return await up_reader.read()
        finally:
            up_writer.close()
            with contextlib.suppress(Exception):
                await up_writer.wait_closed()

    @staticmethod
    def _error(fault: Fault) -> bytes:
        status, body, code = "503 Slow Down", SLOWDOWN_BODY, "SlowDown"
        if fault == "invalidpart":
            status, body, code = "400 Bad Request", INVALID_PART_BODY, "InvalidPart"
        elif fault == "invalidblocklist":
            status, body, code = "400 Bad Request", INVALID_BLOCK_LIST_BODY, "InvalidBlockList"
        head = (
            f"HTTP/1.1 {status}\r\nContent-Type: application/xml\r\nx-ms-error-code: {code}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        return head.encode() + body

    @staticmethod
    def _without_first_part(answer: bytes) -> bytes:
        head, sep, body = answer.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        if any(ln.lower().replace(b" ", b"") == b"transfer-encoding:chunked" for ln in lines):
            body = _unchunked(body)
        body = PART_ELEMENT.sub(b"", body, count=1)
        framing = (b"content-length:", b"transfer-encoding:")
        lines = [ln for ln in lines if not ln.lower().startswith(framing)]
        return b"\r\n".join([*lines, b"Content-Length: %d" % len(body)]) + sep + body

    async def _answer(self, writer: asyncio.StreamWriter, record: Record, answer: bytes) -> None:
        """Relay an answer with `Connection: close`, so the client never reuses this socket."""
        head, sep, body = answer.partition(b"\r\n\r\n")
        lines = [ln for ln in head.split(b"\r\n") if not ln.lower().startswith(b"connection:")]
        with contextlib.suppress(ValueError, IndexError):
            record.status = int(lines[0].split(b" ")[1])
        writer.write(b"\r\n".join([*lines, b"Connection: close"]) + sep + body)
        await writer.drain()
        record.ended = time.monotonic()


def _unchunked(body: bytes) -> bytes:
    """A chunked body's bytes (an answer read whole, up to its last chunk)."""
    out = bytearray()
    while body:
        size_line, _, rest = body.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += rest[:size]
        body = rest[size + 2 :]
    return bytes(out)

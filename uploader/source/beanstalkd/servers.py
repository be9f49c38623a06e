"""Which beanstalkd servers this daemon can use right now: one verdict per server; and a
server reached under a deadline, for the commands (`connect`, `within`).

Two sides report: the Source (its reserving connections: connecting, the handshake, a lost
connection) and the Monitor (a `stats` probe on a side connection, every second). A server is
up when both say so; its verdict changes are logged once each (`beanstalkd_down` with the
cause, `beanstalkd_up` with how long it was away) and shown as `uploader_source_up{server}`,
in `/readyz` and in STATUS=. A dead server is only waited for: the others are served.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import TypeVar

import structlog

from uploader.source.base import CONNECT_TIMEOUT, REPLY_TIMEOUT
from uploader.source.beanstalkd.wire import Connection, ConnectionLost

log = structlog.get_logger("uploader.source.beanstalkd.servers")

T = TypeVar("T")

UNCHECKED = "not checked yet"
# What a beanstalkd out of file descriptors looks like from here: the kernel completes the TCP
# handshake, the server never accepts, so nothing answers (or the socket is closed at once).
FULL_HINT = "the server may be out of file descriptors (beanstalkd's LimitNOFILE, see docs/operations.md)"


def no_answer(address: str, seconds: float) -> str:
    return (f"beanstalkd at {address} accepted the connection but did not answer within {seconds:g} s: "
            f"{FULL_HINT}")


def closed_at_once(address: str, error: str) -> str:
    return f"beanstalkd at {address} closed the connection right after accepting it ({error}): {FULL_HINT}"


class ServerVerdicts:
    """One verdict per server, up or why not, from the Source's word and the Monitor's."""

    def __init__(
        self, addresses: Iterable[str], on_change: Callable[[str, bool], None] | None = None
    ) -> None:
        self.addresses = tuple(addresses)
        self._reserving: dict[str, str | None] = dict.fromkeys(self.addresses, UNCHECKED)
        self._probed: dict[str, str | None] = dict.fromkeys(self.addresses, UNCHECKED)
        self._verdict: dict[str, str | None] = dict.fromkeys(self.addresses, UNCHECKED)
        self._since: dict[str, float] = dict.fromkeys(self.addresses, time.monotonic())
        self.on_change = on_change

    def reserving(self, address: str, problem: str | None) -> None:
        """The Source's word: None once a connection works, else why it does not."""
        self._reserving[address] = problem
        self._judge(address)

    def probed(self, address: str, problem: str | None) -> None:
        """The Monitor's word, from its `stats` probe."""
        self._probed[address] = problem
        self._judge(address)

    def connected(self, address: str) -> bool:
        """The Source's last connection to `address` works."""
        return self._reserving.get(address, UNCHECKED) is None

    def up(self, address: str) -> bool:
        return self._verdict.get(address, UNCHECKED) is None

    def any_up(self) -> bool:
        return any(v is None for v in self._verdict.values())

    def down(self) -> dict[str, str]:
        """The servers that are not up, each with why (UNCHECKED before the first verdicts)."""
        return {a: v for a, v in self._verdict.items() if v is not None}

    def failing(self) -> list[str]:
        """The servers found down (not merely unchecked yet)."""
        return [a for a, v in self._verdict.items() if v not in (None, UNCHECKED)]

    def unchecked(self) -> bool:
        """No server is up, and some still wait for their first verdict."""
        return not self.any_up() and UNCHECKED in self._verdict.values()

    def view(self) -> dict[str, dict[str, object]]:
        """For /readyz: every server, `ok` and, when not, `error`."""
        return {a: {"ok": v is None, **({"error": v} if v is not None else {})}
                for a, v in self._verdict.items()}

    def _judge(self, address: str) -> None:
        reserving, probed = self._reserving[address], self._probed[address]
        # A real problem beats "not checked yet"; both sides must be fine for the server to be up.
        problems = [p for p in (reserving, probed) if p is not None]
        verdict = next((p for p in problems if p != UNCHECKED), problems[0] if problems else None)
        before = self._verdict[address]
        self._verdict[address] = verdict
        now = time.monotonic()
        if verdict is None and before is not None:
            if before != UNCHECKED:
                log.info("beanstalkd_up", address=address, after=before,
                         down_seconds=round(now - self._since[address], 3))
        elif verdict not in (None, UNCHECKED) and before in (None, UNCHECKED):
            log.warning("beanstalkd_down", address=address, cause=verdict,
                        action="serving the other servers; retrying this one with backoff")
        else:
            return
        self._since[address] = now
        if self.on_change is not None:
            self.on_change(address, verdict is None)


async def connect(address: str) -> Connection:
    return await Connection.connect(address, timeout=CONNECT_TIMEOUT)


async def within(conn: Connection, call: Awaitable[T]) -> T:
    """A beanstalkd reply within REPLY_TIMEOUT: a server that connects but never answers is down."""
    try:
        async with asyncio.timeout(REPLY_TIMEOUT):
            return await call
    except TimeoutError:
        await conn.close()
        raise ConnectionLost(f"beanstalkd at {conn.address} did not answer in {REPLY_TIMEOUT:g} s") from None

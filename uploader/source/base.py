"""What the pipeline and the operators' commands need of a job source, whatever its broker.

`Source` is the daemon's side: reserve jobs within the free job slots and hand them over,
keep each held job alive (and notice at once when it is lost), settle it, announce
completions, and say which of its servers answer and how much work waits. `SourceAdmin` is
the operators' side: put a job by the placement rule, tell whether anyone consumes a queue,
count and requeue failed jobs. A broker's own errors never pass these protocols: a held job
that is no longer ours is `ReservationLost`, a server that cannot be reached
`SourceUnavailable`, a server's no `SourceRefused`. Stores have the same shape
(`stores/base.py`); `open_source` and `open_admin` pick the implementation.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Literal, Protocol

Settle = Literal["delete", "bury", "release"]


class ReservationLost(Exception):
    """The job is no longer ours: its connection closed, or the source gave it to another
    worker after its TTR ran out. The source has it; nothing here may settle it."""


class SourceUnavailable(Exception):
    """No server of the source can be used for this call; the message names them and why."""


class SourceRefused(Exception):
    """A server answered, and its answer was no; the message names it and says what it said."""


DEFAULT_PRIORITY = 2**31  # a job's priority unless its producer says otherwise (lower is sooner)
CONNECT_TIMEOUT = 3.0  # seconds to reach Redis or a job source's server before saying it is unreachable
REPLY_TIMEOUT = 10.0  # seconds a connected server may take to answer one command


@dataclass(frozen=True, slots=True)
class Delivery:
    """Which delivery of a job carries a run, opaque to the pipeline: a job ID's runs are told
    apart by it (a re-delivery resumes; a new submission of a finished ID starts fresh).

    `address` is the server that holds it, `job` the source's own ID of the submission,
    `put_at` the Unix time of the producer's put, `tube` the queue it came from."""

    address: str
    job: int
    put_at: float
    tube: str


class HeldJob(Protocol):
    """A job this daemon holds: reserved, and not yet settled."""

    @property
    def body(self) -> bytes: ...

    @property
    def tube(self) -> str: ...

    @property
    def weight(self) -> int: ...

    @property
    def delivery(self) -> Delivery: ...

    @property
    def settled(self) -> bool:
        """Settled or abandoned: no longer ours to settle."""
        ...


OnJob = Callable[[HeldJob], Awaitable[None]]


class Source(Protocol):
    """The daemon's side of a job source."""

    async def reserve(
        self, room: asyncio.Semaphore, on_job: OnJob, clear: Callable[[], Awaitable[None]]
    ) -> None:
        """Until cancelled: take a job slot from `room` (once `clear` returns: no outage keeps
        the daemon from working), reserve one job, hand it to `on_job`, which owns the slot
        from then on. A server that does not answer holds no slot while it is waited for."""
        ...

    async def keep(self, job: HeldJob) -> None:
        """Keep the job reserved for as long as it runs; raise ReservationLost the moment it
        is no longer ours."""
        ...

    async def confirm(self, job: HeldJob) -> None:
        """Raise ReservationLost unless the job is still ours (before it is announced)."""
        ...

    async def settle(self, job: HeldJob, how: Settle, delay: int = 0) -> None:
        """Done (delete), failed (bury) or back to its queue after `delay` seconds (release).
        Never raises for the broker's sake: a job that cannot be settled is abandoned, and the
        source hands it out again."""
        ...

    async def abandon(self, job: HeldJob) -> None:
        """Let the job go without a word: the source hands it out again by itself."""
        ...

    async def announce(self, message: bytes, delivery: Delivery) -> None:
        """Put a completion message on the completion queue (near the job's own server)."""
        ...

    async def ping(self) -> None:
        """Raise SourceUnavailable unless at least one server can be used."""
        ...

    async def backlog(self) -> Mapping[str, int]:
        """Ready jobs per watched queue, over the servers that answer."""
        ...

    def servers(self) -> Mapping[str, Mapping[str, object]]:
        """Per server, for `/readyz` and the page: `ok` and, when not, `error`."""
        ...

    def failing(self) -> list[str]:
        """The servers found down (not merely unchecked yet), for STATUS=."""
        ...

    def unchecked(self) -> bool:
        """No server is known to be up, and some still wait for their first verdict."""
        ...

    async def watch(self) -> None:
        """Until cancelled: probe every server about once a second, so that verdicts (and the
        `on_change` callback given at opening) follow servers that come and go."""
        ...

    def describe(self) -> dict[str, object]:
        """What the `started` log line says of the source."""
        ...

    async def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Placed:
    """Where a job is: as `SourceAdmin.put` put it, or as its progress hash names it."""

    address: str
    job: int


class SourceAdmin(Protocol):
    """The operators' side of a job source (the CLI, the status page's actions). It owns its
    connections, opened when first needed and kept across calls until `close`. A server that
    cannot be reached or does not answer in time is `SourceUnavailable`, one that answers no
    `SourceRefused`; both name the server."""

    @property
    def servers(self) -> tuple[str, ...]:
        """The configured servers, in the config's order."""
        ...

    async def choose(self, job_id: str, tube: str, among: tuple[str, ...] | None = None) -> str:
        """The server the placement rule gives the job now (over `among`, by default the
        configured servers): its first choice that answers, ready to take it into `tube`;
        SourceUnavailable when none does. Nothing is put yet, so a producer can check before
        it writes anything else."""
        ...

    async def put(self, address: str, tube: str, body: bytes, priority: int, ttr: int) -> Placed:
        """Put a job on `address` (as `choose` gave it) into `tube`."""
        ...

    async def watched(self, address: str, tube: str) -> bool | None:
        """Whether any consumer watches `tube` on `address`; None when the server cannot tell."""
        ...

    async def failed(self, address: str, tubes: tuple[str, ...]) -> Mapping[str, int]:
        """Failed (buried) jobs per queue on one server, whatever failed them."""
        ...

    async def retry(self, where: Placed) -> None:
        """Requeue one failed job; LookupError when it is not failed there."""
        ...

    async def retry_all(self, address: str, tubes: tuple[str, ...]) -> Mapping[str, int]:
        """Requeue every failed job of these queues on one server; how many per queue. A
        queue with none failed is left alone (nothing else of it moves)."""
        ...

    async def held(
        self, address: str, read: Callable[[bytes], str | None], limit: int
    ) -> tuple[set[str], bool]:
        """For `recover`: what `read` finds (a job ID, or None) in the body of every job
        `address` holds in any state, newest first, at most `limit` jobs looked at; and
        whether every job it holds was seen."""
        ...

    async def peek(self, where: Placed) -> bytes | None:
        """The body of that one job, whatever its state; None when the server no longer has it."""
        ...

    async def close(self) -> None: ...

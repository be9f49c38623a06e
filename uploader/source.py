"""The beanstalkd boundary: reserving jobs, keeping them, settling them, and watching tubes.

Nothing past this module sees a beanstalkd error: a lost reservation is `ReservationLost`,
and settling a job (delete, bury, release) never raises: if the reservation is gone with its
connection, beanstalkd has the job back by itself, and a re-run resumes from the marks.

Reservations are made one connection per held job.

beanstalkd ties a reservation to the connection that made it, and answers one command at a
time, so each held job keeps the connection that reserved it: `touch` never waits behind a
blocking `reserve`, and if this process dies the server sees the socket close and puts the
job straight back to ready. Connections are reused for the next reservation once free.

Tubes of different weights are reserved in proportion to their weights when all have ready
jobs (like asynq's weighted queues), which beanstalkd's own `reserve` cannot do: it takes the
most urgent job of any watched tube. So each tube also gets connections that watch it alone:
the tubes are tried in smooth weighted round-robin order with `reserve-with-timeout 0`, and
only when none has a ready job does a blocking reserve on all of them wait for the next one.
With one tube, or equal weights, there is only the blocking reserve: no extra round trip.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal

import structlog

from uploader.beanstalk import (
    DEFAULT_PRIORITY,
    BeanstalkError,
    Connection,
    ConnectionLost,
    NotFound,
    connect_with_backoff,
)
from uploader.clock import SYSTEM, Time
from uploader.config import SourceConfig

log = structlog.get_logger("uploader.source")

RESERVE_TIMEOUT = 2  # seconds; also how often a quiet connection proves it is alive
RESERVE_BACKOFF = 1.0  # seconds after an error reply, so a sick server is not hammered

Settle = Literal["delete", "bury", "release"]


class ReservationLost(Exception):
    """The job is no longer ours: its connection closed, or beanstalkd gave it to another
    worker after its TTR ran out. beanstalkd has it; nothing here may settle it."""


@dataclass(eq=False, slots=True)
class HeldJob:
    conn: Connection
    id: int
    body: bytes
    tube: str
    priority: int
    ttr: int
    weight: int = 1
    address: str = ""
    put_at: float = 0.0  # Unix time of the producer's put, from beanstalkd's `age` of the job
    _done: bool = field(default=False, repr=False)

    @property
    def settled(self) -> bool:
        """Deleted, buried, released or abandoned: no longer ours to settle."""
        return self._done


class TubeOrder:
    """nginx's smooth weighted round-robin over the tubes that have ready jobs.

    Weights 3 and 1 give A A B A, A A B A, ...: the share follows the weights, and no tube
    waits long for its turn. A tube found empty is left out of the round and starts afresh
    (credit 0) when it has jobs again, so an idle spell never turns into a burst later.
    """

    def __init__(self, weights: dict[str, int]) -> None:
        self.weights = weights
        self.credit = dict.fromkeys(weights, 0)

    def order(self) -> list[str]:
        """Tubes to try, best first; ties go to the heavier tube, then the one named first."""
        return sorted(self.weights, key=lambda t: (-(self.credit[t] + self.weights[t]), -self.weights[t]))

    def served(self, tube: str, empty: set[str]) -> None:
        """`tube` gave a job after the tubes in `empty` gave none: one round-robin step."""
        if tube not in self.weights:
            return
        eligible = [t for t in self.weights if t not in empty]
        for t in eligible:
            self.credit[t] += self.weights[t]
        self.credit[tube] -= sum(self.weights[t] for t in eligible)
        for t in empty:
            self.credit[t] = 0


ALL = ""  # the pool of connections that watch every configured tube


class Source:
    def __init__(self, config: SourceConfig, time: Time = SYSTEM) -> None:
        self.config = config
        self._time = time
        self._weights = {t.name: t.weight for t in config.tubes}
        self._weighted = len(set(self._weights.values())) > 1
        # Idle connections per (address, tube they watch alone, or ALL).
        self._idle: dict[tuple[str, str], list[Connection]] = {}
        self._pool: dict[Connection, tuple[str, str]] = {}
        self._order = {a: TubeOrder(self._weights) for a in config.addresses}
        self.connected: dict[str, bool] = dict.fromkeys(config.addresses, False)

    async def _connection(self, address: str, tube: str = ALL) -> Connection:
        idle = self._idle.setdefault((address, tube), [])
        while idle:
            conn = idle.pop()
            if not conn.closed:
                return conn
            self._pool.pop(conn, None)

        def retrying(exc: ConnectionLost, delay: float) -> None:
            self.connected[address] = False
            log.warning("beanstalkd_unavailable", address=address, error=str(exc), retry_in=round(delay, 2))

        while True:
            conn = await connect_with_backoff(address, on_retry=retrying)
            watched = list(self._weights) if tube == ALL else [tube]
            try:
                for name in watched:
                    await conn.watch(name)
                if "default" not in watched:
                    await conn.ignore("default")
            except ConnectionLost:
                continue
            except BaseException:
                await conn.close()
                raise
            self.connected[address] = True
            self._pool[conn] = (address, tube)
            return conn

    async def reserve_forever(
        self,
        address: str,
        room: asyncio.Semaphore,
        on_job: Callable[[HeldJob], Awaitable[None]],
        clear: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """Reserve a job whenever there is room for one (and `clear` returns: no outage keeps
        the daemon from working), hand it over, repeat until cancelled.

        Cancelling this coroutine closes the connection it was reserving on, so a job the server
        handed out in that instant goes back to ready rather than being stranded.
        """
        while True:
            await room.acquire()
            handed_over = False
            try:
                job = await self._reserve_one(address, clear)
                handed_over = True
                await on_job(job)
            finally:
                if not handed_over:
                    room.release()

    async def _reserve_one(self, address: str, clear: Callable[[], Awaitable[None]] | None) -> HeldJob:
        while True:
            if clear is not None:
                await clear()
            job = await (self._reserve_weighted(address) if self._weighted else self._reserve(address))
            if job is not None:
                return job

    async def _reserve_weighted(self, address: str) -> HeldJob | None:
        """Try each tube alone, in weighted order, without waiting; then wait on all of them."""
        order = self._order[address]
        empty: set[str] = set()
        for tube in order.order():
            job = await self._reserve(address, tube, timeout=0)
            if job is not None:
                order.served(tube, empty)
                return job
            empty.add(tube)
        job = await self._reserve(address)
        if job is not None:
            order.served(job.tube, empty)
        return job

    async def _reserve(self, address: str, tube: str = ALL, timeout: int = RESERVE_TIMEOUT) -> HeldJob | None:
        """One reserve on a connection watching `tube` (or all); None if nothing came."""
        conn = await self._connection(address, tube)
        try:
            job = await conn.reserve(timeout)
            if job is None:
                self._idle[address, tube].append(conn)
                return None
            stats = await conn.stats_job(job.id)
        except ConnectionLost as exc:
            self.connected[address] = False
            self._pool.pop(conn, None)
            log.warning("beanstalkd_connection_lost", address=address, error=str(exc))
            return None
        except BeanstalkError as exc:
            # DEADLINE_SOON, OUT_OF_MEMORY and the like: drop the connection, start afresh.
            log.warning("beanstalkd_error", address=address, error=str(exc))
            await self._drop(conn)
            await self._time.sleep(RESERVE_BACKOFF)
            return None
        except BaseException:
            await self._drop(conn)
            raise
        name = stats.get("tube", "")
        return HeldJob(
            conn=conn,
            id=job.id,
            body=job.body,
            tube=name,
            priority=int(stats.get("pri", DEFAULT_PRIORITY)),
            ttr=max(1, int(stats.get("ttr", 60))),
            weight=self._weights.get(name, 1),
            address=address,
            put_at=self._time.wall() - int(stats.get("age", 0)),
        )

    def touch_interval(self, job: HeldJob) -> float:
        return max(self.config.min_touch_interval, job.ttr / 2)

    async def keep(self, job: HeldJob) -> None:
        """Touch the job about every TTR/2 so that no other worker is handed it; raise
        ReservationLost the moment its connection goes (a beanstalkd restart), not at the next
        touch, so a run that is no longer ours stops handing out files at once."""
        every = self.touch_interval(job)
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(every):
                    await job.conn.wait_gone()
                    raise ReservationLost(f"beanstalkd at {job.address} closed the connection")
            await self.touch(job)

    async def touch(self, job: HeldJob) -> None:
        """Restart the job's TTR; raises ReservationLost if it is no longer ours."""
        try:
            await job.conn.touch(job.id)
        except (ConnectionLost, NotFound) as exc:
            raise ReservationLost(str(exc)) from exc

    async def settle(self, job: HeldJob, how: Settle, delay: int = 0) -> None:
        """Delete, bury or release (back to ready after `delay` seconds, at its own priority,
        for any instance to resume). Never raises for beanstalkd's sake: a job that cannot be
        settled is abandoned, and beanstalkd hands it out again."""
        conn = job.conn
        command = (
            conn.delete(job.id)
            if how == "delete"
            else conn.bury(job.id, job.priority)
            if how == "bury"
            else conn.release(job.id, job.priority, delay)
        )
        try:
            await self._finish(job, command)
        except (ConnectionLost, NotFound) as exc:
            log.warning("job_settle_failed", beanstalk_job=job.id, action=how, error=str(exc))
            await self.abandon(job)
        except BeanstalkError as exc:
            log.error("job_settle_failed", beanstalk_job=job.id, action=how, error=str(exc))
            await self.abandon(job)

    async def _finish(self, job: HeldJob, command: Awaitable[None]) -> None:
        job._done = True
        await command
        pool = self._pool.get(job.conn)
        if pool is None:  # not one of ours (or already dropped): nothing to reuse
            await job.conn.close()
        else:
            self._idle.setdefault(pool, []).append(job.conn)

    async def abandon(self, job: HeldJob) -> None:
        """Close the job's connection: the server puts the job back to ready by itself."""
        job._done = True
        await self._drop(job.conn)

    async def _drop(self, conn: Connection) -> None:
        self._pool.pop(conn, None)
        await conn.close()

    async def close(self) -> None:
        for conns in self._idle.values():
            for conn in conns:
                await conn.close()
            conns.clear()
        self._pool.clear()


class Monitor:
    """One side connection per beanstalkd address, for probes and tube stats; never reserves.

    Kept apart from the Source's connections so that a probe never waits behind a reserve.
    """

    def __init__(self, addresses: tuple[str, ...], tubes: tuple[str, ...], timeout: float) -> None:
        self.addresses = addresses
        self.tubes = tubes
        self.timeout = timeout
        self._conns: dict[str, Connection] = {}
        self._connecting = asyncio.Lock()  # the probe and the stats poll may both ask first

    async def _conn(self, address: str) -> Connection:
        async with self._connecting:
            conn = self._conns.get(address)
            if conn is None or conn.closed:
                conn = self._conns[address] = await Connection.connect(address, timeout=self.timeout)
            return conn

    async def ping(self) -> None:
        """Raise unless every configured beanstalkd answers."""
        for address in self.addresses:
            await (await self._conn(address)).stats()

    async def ready_jobs(self) -> dict[str, int]:
        """Ready jobs per watched tube, summed over the servers that answer."""
        counts = dict.fromkeys(self.tubes, 0)
        for address in self.addresses:
            try:
                conn = await self._conn(address)
                for tube in self.tubes:
                    try:
                        stats = await conn.stats_tube(tube)
                    except NotFound:  # nobody watches or uses it there: nothing is ready
                        continue
                    counts[tube] += int(stats.get("current-jobs-ready", 0))
            except (BeanstalkError, ValueError) as exc:
                log.debug("tube_stats_failed", address=address, error=str(exc))
        return counts

    async def close(self) -> None:
        for conn in self._conns.values():
            await conn.close()
        self._conns.clear()

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

Several servers: one reserver each. A reserver holds an active-job slot only for one reserve
round on a connection that works; while its server is down it waits for it (with backoff)
holding none, so a dead server costs the others nothing, and its jobs are taken as soon as it
answers again. Each pool keeps at most one idle connection, so a daemon needs at most
`max_active_jobs` + a few connections per server (`connections_needed`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import structlog

from uploader.clock import SYSTEM, Time, backoff_delays
from uploader.config.settings import SourceConfig
from uploader.source.base import Delivery, ReservationLost, Settle
from uploader.source.beanstalkd.servers import ServerVerdicts, closed_at_once, no_answer
from uploader.source.beanstalkd.wire import (
    DEFAULT_PRIORITY,
    BeanstalkError,
    Connection,
    ConnectionLost,
    NotFound,
)

log = structlog.get_logger("uploader.source.beanstalkd.source")

RESERVE_TIMEOUT = 2  # seconds; also how often a quiet connection proves it is alive
RESERVE_BACKOFF = 1.0  # seconds after an error reply, so a sick server is not hammered
CONNECT_TIMEOUT = 3.0  # seconds to connect, and again for the first reply (the handshake)
REPLY_GRACE = 5.0  # seconds a reserve may overrun its own timeout before the server counts as hung
RETRY_FIRST, RETRY_CAP = 0.1, 2.0  # seconds between attempts on a server that is down

@dataclass(eq=False, slots=True)
class BeanstalkdJob:
    conn: Connection
    id: int
    body: bytes
    tube: str
    priority: int
    ttr: int
    weight: int = 1
    address: str = ""
    put_at: float = 0.0  # Unix time of the producer's put, from beanstalkd's `age` of the job
    touched: float = 0.0  # monotonic time of the reserve or the last touch
    _done: bool = field(default=False, repr=False)

    @property
    def settled(self) -> bool:
        """Deleted, buried, released or abandoned: no longer ours to settle."""
        return self._done

    @property
    def delivery(self) -> Delivery:
        return Delivery(self.address, self.id, self.put_at, self.tube)


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


def connections_needed(config: SourceConfig) -> int:
    """Connections one daemon may open to each beanstalkd at most: one per held job, one idle
    per reserving pool (all tubes, and each tube alone when weights differ), the probe's and the
    completion producer's. A fleet needs this times its daemons, per server."""
    weighted = len({t.weight for t in config.tubes}) > 1
    return config.max_active_jobs + 1 + (len(config.tubes) if weighted else 0) + 2


class Source:
    def __init__(
        self, config: SourceConfig, time: Time = SYSTEM, servers: ServerVerdicts | None = None
    ) -> None:
        self.config = config
        self._time = time
        self._weights = {t.name: t.weight for t in config.tubes}
        self._weighted = len(set(self._weights.values())) > 1
        # Idle connections per (address, tube they watch alone, or ALL).
        self._idle: dict[tuple[str, str], list[Connection]] = {}
        self._pool: dict[Connection, tuple[str, str]] = {}
        self._opened: dict[str, int] = {}  # our connections per server, held, idle or reserving
        self._order = {a: TubeOrder(self._weights) for a in config.addresses}
        self.servers = servers or ServerVerdicts(config.addresses)

    async def _connection(self, address: str, tube: str = ALL, wait: bool = True) -> Connection:
        """An idle connection of the pool, else a new one; `wait` retries with backoff while the
        server is down, else one attempt (ConnectionLost)."""
        idle = self._idle.setdefault((address, tube), [])
        while idle:
            conn = idle.pop()
            if not conn.gone:
                return conn
            await self._drop(conn)
        delays = backoff_delays(RETRY_FIRST, RETRY_CAP)
        while True:
            try:
                conn = await self._open(address, tube)
            except ConnectionLost as exc:
                self.servers.reserving(address, str(exc))
                if not wait:
                    raise
                await asyncio.sleep(next(delays))
                continue
            self.servers.reserving(address, None)
            self._pool[conn] = (address, tube)
            self._opened[address] = self._opened.get(address, 0) + 1
            return conn

    async def _open(self, address: str, tube: str) -> Connection:
        """Connect and watch, each under CONNECT_TIMEOUT; a server that accepts and then says
        nothing, or closes at once, is told apart (a full server does that)."""
        conn = await Connection.connect(address, timeout=CONNECT_TIMEOUT)
        watched = list(self._weights) if tube == ALL else [tube]
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                for name in watched:
                    await conn.watch(name)
                if "default" not in watched:
                    await conn.ignore("default")
        except TimeoutError:
            await conn.close()
            raise ConnectionLost(no_answer(address, CONNECT_TIMEOUT)) from None
        except ConnectionLost as exc:
            raise ConnectionLost(closed_at_once(address, str(exc).rsplit(": ", 1)[-1])) from None
        except BaseException:
            await conn.close()
            raise
        return conn

    async def reserve_forever(
        self,
        address: str,
        room: asyncio.Semaphore,
        on_job: Callable[[BeanstalkdJob], Awaitable[None]],
        clear: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """Reserve a job whenever there is room for one (and `clear` returns: no outage keeps
        the daemon from working), hand it over, repeat until cancelled. A slot is held only for
        one reserve round on a server that answers: a dead server holds none.

        Cancelling this coroutine closes the connection it was reserving on, so a job the server
        handed out in that instant goes back to ready rather than being stranded.
        """
        while True:
            await self._until_up(address)  # first: whether the server answers is worth knowing
            if clear is not None:
                await clear()
            await room.acquire()
            handed_over = False
            try:
                job = await (self._reserve_weighted(address) if self._weighted else self._reserve(address))
                if job is not None:
                    handed_over = True
                    await on_job(job)
            finally:
                if not handed_over:
                    room.release()

    async def _until_up(self, address: str) -> None:
        """Until the server answers, holding no slot: an idle connection is ready for the round."""
        conn = await self._connection(address, ALL)
        self._idle[address, ALL].append(conn)

    async def _reserve_weighted(self, address: str) -> BeanstalkdJob | None:
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

    async def _reserve(
        self, address: str, tube: str = ALL, timeout: int = RESERVE_TIMEOUT
    ) -> BeanstalkdJob | None:
        """One reserve on a connection watching `tube` (or all); None if nothing came, or the
        server is gone (then the round ends and the reserver waits for it holding no slot)."""
        try:
            conn = await self._connection(address, tube, wait=False)
        except ConnectionLost:
            return None
        try:
            async with asyncio.timeout(timeout + REPLY_GRACE):
                job = await conn.reserve(timeout)
                if job is None:
                    await self._keep_idle(conn, (address, tube))
                    return None
                stats = await conn.stats_job(job.id)
        except (ConnectionLost, TimeoutError) as exc:
            reason = (str(exc) if isinstance(exc, ConnectionLost)
                      else no_answer(address, timeout + REPLY_GRACE))
            self.servers.reserving(address, reason)
            await self._drop(conn)
            log.warning("beanstalkd_connection_lost", address=address, error=reason)
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
        return BeanstalkdJob(
            conn=conn,
            id=job.id,
            body=job.body,
            tube=name,
            priority=int(stats.get("pri", DEFAULT_PRIORITY)),
            ttr=max(1, int(stats.get("ttr", 60))),
            weight=self._weights.get(name, 1),
            address=address,
            put_at=self._time.wall() - int(stats.get("age", 0)),
            touched=self._time.monotonic(),
        )

    def touch_interval(self, job: BeanstalkdJob) -> float:
        return max(self.config.min_touch_interval, job.ttr / 2)

    async def keep(self, job: BeanstalkdJob) -> None:
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

    async def touch(self, job: BeanstalkdJob) -> None:
        """Restart the job's TTR; raises ReservationLost if it is no longer ours."""
        try:
            await job.conn.touch(job.id)
        except (ConnectionLost, NotFound) as exc:
            raise ReservationLost(str(exc)) from exc
        job.touched = self._time.monotonic()

    async def confirm(self, job: BeanstalkdJob) -> None:
        """Raise ReservationLost unless the job is still ours. Its connection is open and its
        TTR was restarted less than half a TTR ago (and a second short of it): it is, with no
        round trip; else a touch asks the server."""
        if job.conn.gone:
            raise ReservationLost(f"beanstalkd at {job.address} closed the connection")
        if self._time.monotonic() - job.touched >= min(job.ttr / 2, job.ttr - 1):
            await self.touch(job)

    async def settle(self, job: BeanstalkdJob, how: Settle, delay: int = 0) -> None:
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

    async def _finish(self, job: BeanstalkdJob, command: Awaitable[None]) -> None:
        job._done = True
        await command
        pool = self._pool.get(job.conn)
        if pool is None:  # not one of ours (or already dropped): nothing to reuse
            await job.conn.close()
        else:
            await self._keep_idle(job.conn, pool)

    async def _keep_idle(self, conn: Connection, pool: tuple[str, str]) -> None:
        """Back to its pool for the next reserve, so a stream of short jobs opens no connection
        per job. A pool keeps one idle connection, the pool of all tubes as many as the server's
        share of the budget leaves room for (max_active_jobs + 1 open ones): the rest close."""
        address, tube = pool
        idle = self._idle.setdefault(pool, [])
        room = tube == ALL and self._opened.get(address, 0) <= self.config.max_active_jobs + 1
        if idle and not room:
            await self._drop(conn)
        else:
            idle.append(conn)

    async def abandon(self, job: BeanstalkdJob) -> None:
        """Close the job's connection: the server puts the job back to ready by itself."""
        job._done = True
        await self._drop(job.conn)

    async def _drop(self, conn: Connection) -> None:
        if (pool := self._pool.pop(conn, None)) is not None:
            self._opened[pool[0]] -= 1
        await conn.close()

    async def close(self) -> None:
        for conns in self._idle.values():
            for conn in conns:
                await conn.close()
            conns.clear()
        self._pool.clear()
        self._opened.clear()

"""beanstalkd as a `source.base.SourceAdmin`: what the operators' commands and the status page's
actions do to jobs on the servers (put by the placement rule, see who watches a tube, count
and kick buried jobs, read the bodies a server holds for `recover`).

One connection per server, opened when first needed under the command deadlines
(servers.py's `connect` and `within`) and kept until `close`. beanstalkd's errors end here:
a server that cannot be reached or does not answer is `SourceUnavailable`, any other error
reply `SourceRefused`, each in the words that name the server.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import TypeVar

from uploader.config.settings import SourceConfig
from uploader.source.base import Placed, SourceRefused, SourceUnavailable
from uploader.source.beanstalkd import placement
from uploader.source.beanstalkd.servers import connect, within
from uploader.source.beanstalkd.wire import BeanstalkError, Connection, ConnectionLost, NotFound

T = TypeVar("T")
KICK_BOUND = 1_000_000  # buried jobs one `kick` moves at most
PEEK_BATCH = 500  # peeks per pipelined write
PROBE_TUBE = "uploader-recover-probe"  # where one probe job shows a server's newest job ID
HELD_STATES = ("ready", "reserved", "delayed", "buried")


@contextmanager
def translated(missing: bool = False) -> Iterator[None]:
    """beanstalkd's errors as the protocol's: unreachable or hung, or an answer that says no.
    With `missing`, NOT_FOUND passes as NotFound, for the caller to tell what it means."""
    try:
        yield
    except ConnectionLost as exc:
        raise SourceUnavailable(str(exc)) from exc
    except BeanstalkError as exc:
        if missing and isinstance(exc, NotFound):
            raise
        raise SourceRefused(f"beanstalkd refused: {exc}") from exc


class BeanstalkdAdmin:
    def __init__(self, config: SourceConfig) -> None:
        self.config = config
        self._conns: dict[str, Connection] = {}

    @property
    def servers(self) -> tuple[str, ...]:
        return self.config.addresses

    async def _conn(self, address: str) -> Connection:
        conn = self._conns.get(address)
        if conn is None or conn.gone:
            with translated():
                conn = self._conns[address] = await connect(address)
        return conn

    async def _call(self, address: str, call: Awaitable[T], missing: bool = False) -> T:
        """One command on `address`'s connection, under the reply deadline."""
        conn = self._conns[address]
        with translated(missing):
            return await within(conn, call)

    async def _stats_tube(self, address: str, tube: str) -> dict[str, str]:
        conn = await self._conn(address)
        try:
            return await self._call(address, conn.stats_tube(tube), missing=True)
        except NotFound:  # beanstalkd forgets a tube with no jobs and no clients
            return {}

    async def choose(self, job_id: str, tube: str, among: tuple[str, ...] | None = None) -> str:
        failure: SourceUnavailable | None = None
        for address in placement.order(job_id, self.config.addresses if among is None else among):
            try:
                conn = await self._conn(address)
                await self._call(address, conn.use(tube))
            except SourceUnavailable as exc:  # accepted, then no answer: a full server, say
                await self._forget(address)
                failure = exc
                continue
            return address
        assert failure is not None
        raise failure

    async def put(self, address: str, tube: str, body: bytes, priority: int, ttr: int) -> Placed:
        conn = await self._conn(address)
        await self._call(address, conn.use(tube))
        return Placed(address, await self._call(address, conn.put(body, priority=priority, ttr=ttr)))

    async def watched(self, address: str, tube: str) -> bool | None:
        try:
            stats = await self._stats_tube(address, tube)
        except (SourceUnavailable, SourceRefused):
            return None
        return int(stats.get("current-watching", "0")) > 0

    async def failed(self, address: str, tubes: tuple[str, ...]) -> Mapping[str, int]:
        counts: dict[str, int] = {}
        for tube in tubes:
            stats = await self._stats_tube(address, tube)
            counts[tube] = int(stats.get("current-jobs-buried", "0"))
        return counts

    async def retry(self, where: Placed) -> None:
        conn = await self._conn(where.address)
        try:
            await self._call(where.address, conn.kick_job(where.job), missing=True)
        except NotFound:
            raise LookupError(f"job {where.job} is not buried on {where.address}") from None

    async def retry_all(self, address: str, tubes: tuple[str, ...]) -> Mapping[str, int]:
        """With none buried, nothing is kicked: `kick` would then take the tube's delayed jobs
        and cut a producer's delay short."""
        kicked: dict[str, int] = {}
        for tube in tubes:
            stats = await self._stats_tube(address, tube)
            if int(stats.get("current-jobs-buried", "0")) == 0:
                kicked[tube] = 0
                continue
            conn = await self._conn(address)
            await self._call(address, conn.use(tube))
            kicked[tube] = await self._call(address, conn.kick(KICK_BOUND))
        return kicked

    async def held(
        self, address: str, read: Callable[[bytes], str | None], limit: int
    ) -> tuple[set[str], bool]:
        """Job IDs are consecutive per server: one probe job shows the newest, and pipelined
        peeks walk down from it until every job the server holds was seen."""
        conn = await self._conn(address)
        stats = await self._call(address, conn.stats())
        present = sum(int(stats.get(f"current-jobs-{kind}", "0")) for kind in HELD_STATES)
        await self._call(address, conn.use(PROBE_TUBE))
        top = await self._call(address, conn.put(b"probe", 0, 0, 1))  # the next job ID, minus one
        await self._call(address, conn.delete(top))
        found: set[str] = set()
        seen, high, low = 0, top - 1, max(1, top - limit)
        while high >= low and seen < present:
            ids = list(range(high, max(low, high - PEEK_BATCH + 1) - 1, -1))
            bodies = await self._call(address, conn.peek_many(ids))
            seen += len(bodies)
            found.update(job_id for body in bodies.values() if (job_id := read(body)))
            high = ids[-1] - 1
        return found, seen >= present or high < 1

    async def peek(self, where: Placed) -> bytes | None:
        conn = await self._conn(where.address)
        bodies = await self._call(where.address, conn.peek_many([where.job]))
        return bodies.get(where.job)

    async def _forget(self, address: str) -> None:
        conn = self._conns.pop(address, None)
        if conn is not None:
            await conn.close()

    async def close(self) -> None:
        for address in list(self._conns):
            await self._forget(address)

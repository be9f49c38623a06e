"""One side connection per beanstalkd, for probes and tube stats: never reserves, so a probe
never waits behind a reserve."""

from __future__ import annotations

import asyncio

import structlog

from uploader.source.beanstalkd.servers import ServerVerdicts, no_answer
from uploader.source.beanstalkd.wire import BeanstalkError, Connection, ConnectionLost, NotFound

log = structlog.get_logger("uploader.source")


class Monitor:
    """One side connection per beanstalkd address, for probes and tube stats; never reserves.

    Kept apart from the Source's connections so that a probe never waits behind a reserve.
    """

    def __init__(
        self,
        addresses: tuple[str, ...],
        tubes: tuple[str, ...],
        timeout: float,
        servers: ServerVerdicts | None = None,
    ) -> None:
        self.addresses = addresses
        self.tubes = tubes
        self.timeout = timeout
        self.servers = servers or ServerVerdicts(addresses)
        self._conns: dict[str, Connection] = {}
        # Per server: the probe and the stats poll may both ask first; a dead one delays no other.
        self._connecting = {a: asyncio.Lock() for a in addresses}

    async def _conn(self, address: str) -> Connection:
        async with self._connecting[address]:
            conn = self._conns.get(address)
            if conn is None or conn.gone:
                if conn is not None:
                    await conn.close()
                    del self._conns[address]
                conn = self._conns[address] = await Connection.connect(address, timeout=self.timeout)
            return conn

    async def ping(self) -> None:
        """Probe every server at once; raise unless at least one of them can be used."""
        await asyncio.gather(*(self._probe(a) for a in self.addresses))
        if not self.servers.any_up():
            down = "; ".join(f"{a}: {why}" for a, why in self.servers.down().items())
            raise ConnectionLost(f"no beanstalkd answers ({down})")

    async def _probe(self, address: str) -> None:
        try:
            async with asyncio.timeout(self.timeout):
                await (await self._conn(address)).stats()
        except TimeoutError:
            self.servers.probed(address, no_answer(address, self.timeout))
        except (BeanstalkError, ValueError) as exc:
            self.servers.probed(address, str(exc))
        else:
            self.servers.probed(address, None)

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

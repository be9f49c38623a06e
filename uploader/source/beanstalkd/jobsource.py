"""beanstalkd as a `source.base.Source`: the reservers, the probe, the completion producer and
the per-server verdicts, behind the one protocol the pipeline and the daemon speak.

One reserver per server runs in a task group of its own (`reserve`), so a dead server holds
no job slot while the others are served; see `source.py` for the connection per held job.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Mapping

from uploader.clock import SYSTEM, Time
from uploader.config.settings import SourceConfig
from uploader.source.base import Delivery, HeldJob, OnJob, Settle, SourceUnavailable
from uploader.source.beanstalkd.monitor import Monitor
from uploader.source.beanstalkd.servers import ServerVerdicts
from uploader.source.beanstalkd.source import BeanstalkdJob, Source, connections_needed
from uploader.source.beanstalkd.wire import ConnectionLost, Producer

CHECK_INTERVAL = 1.0  # seconds between probes of every beanstalkd (uploader_source_up)


class BeanstalkdSource:
    def __init__(
        self,
        config: SourceConfig,
        probe_timeout: float,
        time: Time = SYSTEM,
        on_change: Callable[[str, bool], None] | None = None,
    ) -> None:
        self.config = config
        self._time = time
        self.verdicts = ServerVerdicts(config.addresses, on_change=on_change)
        self.reservers = Source(config, time, self.verdicts)
        tubes = tuple(t.name for t in config.tubes)
        self.monitor = Monitor(config.addresses, tubes, probe_timeout, self.verdicts)
        completion = config.completion_tube
        self.producer = Producer(config.addresses, completion, self.verdicts.up) if completion else None

    # --- held jobs ---

    async def reserve(
        self, room: asyncio.Semaphore, on_job: OnJob, clear: Callable[[], Awaitable[None]]
    ) -> None:
        async def hand_over(job: BeanstalkdJob) -> None:
            await on_job(job)

        async with asyncio.TaskGroup() as tg:
            for address in self.config.addresses:
                tg.create_task(self.reservers.reserve_forever(address, room, hand_over, clear),
                               name=f"reserve {address}")

    async def keep(self, job: HeldJob) -> None:
        await self.reservers.keep(_own(job))

    async def confirm(self, job: HeldJob) -> None:
        await self.reservers.confirm(_own(job))

    async def settle(self, job: HeldJob, how: Settle, delay: int = 0) -> None:
        await self.reservers.settle(_own(job), how, delay)

    async def abandon(self, job: HeldJob) -> None:
        await self.reservers.abandon(_own(job))

    async def announce(self, message: bytes, delivery: Delivery) -> None:
        """To the server that held the job while it answers, else another live one."""
        if self.producer is not None:
            await self.producer.put(message, prefer=delivery.address)

    # --- servers ---

    async def ping(self) -> None:
        try:
            await self.monitor.ping()
        except ConnectionLost as exc:
            raise SourceUnavailable(str(exc)) from None

    async def backlog(self) -> Mapping[str, int]:
        return await self.monitor.ready_jobs()

    def servers(self) -> Mapping[str, Mapping[str, object]]:
        return self.verdicts.view()

    def failing(self) -> list[str]:
        return self.verdicts.failing()

    def unchecked(self) -> bool:
        return self.verdicts.unchecked()

    def connected(self, address: str) -> bool:
        """The reservers' last connection to `address` works."""
        return self.verdicts.connected(address)

    async def watch(self) -> None:
        while True:
            with contextlib.suppress(SourceUnavailable):  # the verdicts are recorded
                await self.ping()
            await self._time.sleep(CHECK_INTERVAL)

    def describe(self) -> dict[str, object]:
        return {"beanstalkd": list(self.config.addresses),
                "connections_per_beanstalkd": connections_needed(self.config)}

    async def close(self) -> None:
        if self.producer is not None:
            await self.producer.close()
        await self.monitor.close()
        await self.reservers.close()


def _own(job: HeldJob) -> BeanstalkdJob:
    """A held job is the source's own: a job of another source here is a programming error."""
    if not isinstance(job, BeanstalkdJob):
        raise TypeError(f"not a beanstalkd job: {job!r}")
    return job

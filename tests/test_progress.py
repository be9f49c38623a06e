"""Progress batches against a real redis-server: counts are exact even when a reply is lost."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import redis.asyncio as aioredis

from uploader.config import RedisConfig
from uploader.devservers import Server
from uploader.progress import Progress, mark_args
from uploader.redisio import Keys

pytestmark = pytest.mark.timeout(30)


class ReplyDropper:
    """A TCP hop to Redis that, once armed, lets the next progress batch through but never delivers its
    reply: the connection closes as if Redis had stopped right after applying the batch, or
    with `hold` stays open and silent, as a reply stuck in a dying network would."""

    def __init__(self, upstream: str, hold: bool = False) -> None:
        host, port = upstream.rsplit(":", 1)
        self._upstream = (host, int(port))
        self._hold = hold
        self.armed = False
        self.dropped = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return f"redis://127.0.0.1:{port}/0"

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection(*self._upstream)
        exec_sent = asyncio.Event()

        async def upstream() -> None:
            while data := await client_r.read(65536):
                if self.armed and b"BITFIELD" in data:
                    exec_sent.set()
                server_w.write(data)
                await server_w.drain()

        async def downstream() -> None:
            while data := await server_r.read(65536):
                if exec_sent.is_set() and b"*" in data:
                    self.armed = False
                    self.dropped.set()
                    if self._hold:
                        await asyncio.Event().wait()
                    return
                client_w.write(data)
                await client_w.drain()

        pumps = [asyncio.create_task(upstream()), asyncio.create_task(downstream())]
        self._tasks.update(pumps)
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pump in pumps:
                pump.cancel()
            for writer in (client_w, server_w):
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()


@asynccontextmanager
async def progress_through(
    redis_server: Server, hold: bool = False
) -> AsyncIterator[tuple[ReplyDropper, Progress, Keys]]:
    """A Progress whose Redis connection runs through a ReplyDropper, on keys of its own."""
    dropper = ReplyDropper(redis_server.address, hold=hold)
    client = aioredis.Redis.from_url(await dropper.start())
    keys = Keys(prefix=f"test-{uuid.uuid4().hex[:8]}:")
    try:
        yield dropper, Progress(client, keys, RedisConfig(), "test:1"), keys
    finally:
        await client.aclose()
        await dropper.close()


@pytest.fixture
async def direct(redis_server: Server) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(f"redis://{redis_server.address}/0")
    yield client
    await client.aclose()


async def test_a_batch_whose_reply_is_lost_is_counted_once(
    redis_server: Server, direct: aioredis.Redis
) -> None:
    async with progress_through(redis_server) as (dropper, progress, keys):
        await progress.start("job", 20)
        for i in range(10):
            progress.record("job", i, "uploaded", 100)
        progress.record("job", 10, "failed", label="/x", reason="gone")
        dropper.armed = True
        await progress.flush()  # applied, reply lost, sent again on a new connection
        assert dropper.dropped.is_set(), "the proxy never dropped a reply: the test proved nothing"

        for i in range(11, 15):
            progress.record("job", i, "skipped")
        await progress.flush()

        state = {k.decode(): v.decode() for k, v in (await direct.hgetall(keys.job("job"))).items()}
        counts = (state["uploaded"], state["skipped"], state["failed"], state["bytes"])
        assert counts == ("10", "4", "1", "1000")
        assert await direct.hgetall(keys.failed("job")) == {b"/x": b"gone"}
        assert await direct.bitcount(keys.marks("job")) == 14


async def test_a_flush_cancelled_after_redis_applied_it_is_resent_and_counted_once(
    redis_server: Server, direct: aioredis.Redis
) -> None:
    """Shutdown cancels a flush whose batch Redis has already applied; the final flush sends
    that batch again under its number, and it must not add up twice."""
    async with progress_through(redis_server, hold=True) as (dropper, progress, keys):
        await progress.start("job", 5)
        for i in range(3):
            progress.record("job", i, "uploaded", 10)
        dropper.armed = True
        flushing = asyncio.create_task(progress.flush())
        await asyncio.wait_for(dropper.dropped.wait(), 10)
        assert await direct.hget(keys.job("job"), "uploaded") == b"3", "Redis applied the batch"
        flushing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await flushing

        progress.record("job", 3, "uploaded", 10)
        await progress.flush()
        state = await direct.hgetall(keys.job("job"))
        assert (state[b"uploaded"], state[b"bytes"]) == (b"4", b"40")


def test_mark_args_use_whole_words_only_where_a_batch_covers_them() -> None:
    assert mark_args([3, 1, 1]) == ["SET", "u1", 1, 1, "SET", "u1", 3, 1]
    assert mark_args(list(range(8, 16))) == ["SET", "u8", "#1", 255]
    assert mark_args([*range(64, 128), 130]) == ["SET", "i64", "#1", -1, "SET", "u1", 130, 1]

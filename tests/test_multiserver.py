"""Several beanstalkd servers: one daemon reserves from each, finishes every job on the server
(and connection) that handed it out, and rides out one server's death and restart."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import redis.asyncio as aioredis

from tests.helpers import Env, total_uploaded, tube_settled, wait_until
from uploader import devservers
from uploader.devservers import Server
from uploader.files import SourceFile
from uploader.stores.base import PutRequest, PutResult
from uploader.stores.local import LocalStore

FILES_PER_JOB = 60


class SlowStore(LocalStore):
    """A local store whose uploads take a little while, so jobs are provably mid-run."""

    async def put(self, source: SourceFile, request: PutRequest) -> PutResult:
        await asyncio.sleep(0.02)
        return await super().put(source, request)


@asynccontextmanager
async def two_servers(env: Env) -> AsyncIterator[tuple[Env, Server, Server]]:
    """Two private beanstalkd (the second with a binlog, to be killed), and an Env whose
    producer side talks to the first: that is where completion messages go."""
    first = devservers.beanstalkd().start()
    second = devservers.beanstalkd(binlog=True).start()
    penv = Env(tmp_path=env.tmp_path, beanstalkd=first.address, redis_url=env.redis_url,
               s3_endpoint=env.s3_endpoint, tag=uuid.uuid4().hex[:10])
    penv.redis = aioredis.Redis.from_url(env.redis_url)
    try:
        yield penv, first, second
    finally:
        await penv.close()
        first.stop()
        second.stop()


async def push(env: Env, job_id: str, files: list[str], server: Server) -> None:
    await env.redis.rpush(env.keys.files(job_id), *files)
    await env.put(job_id, address=server.address)


@pytest.mark.timeout(120)
async def test_jobs_from_two_servers_finish_and_one_server_restart_is_ridden_out(env: Env) -> None:
    async with two_servers(env) as (penv, first, second):
        files = [str(p) for p in penv.write_files(FILES_PER_JOB, size=64)]
        config = penv.config(
            source={"address": [first.address, second.address]}, upload={"concurrency": 4}
        )
        on_first = [f"one-{penv.tag}-{i}" for i in range(3)]
        on_second = [f"two-{penv.tag}-{i}" for i in range(3)]
        for job_id in on_first:
            await push(penv, job_id, files, first)
        for job_id in on_second:
            await push(penv, job_id, files, second)

        async with penv.daemon(config, store=SlowStore(config.store.local)) as daemon:
            source = daemon.source
            await wait_until(lambda: _at_least(penv, on_second, 10), 30, "the second server's jobs under way")
            assert await total_uploaded(penv, on_second) < 3 * FILES_PER_JOB, "too late to kill mid-run"
            second.stop(kill=True)
            await wait_until(lambda: not source.connected[second.address], 10, "the loss noticed")

            # The first server is served as before while the second is down.
            late = f"one-{penv.tag}-late"
            await push(penv, late, files, first)
            for job_id in [*on_first, late]:
                state = await penv.wait_final(job_id, 30)
                assert (state["state"], state["uploaded"], state["failed"]) == ("done", "60", "0")
            assert not source.connected[second.address]

            second.start()  # same port, and its binlog brings the held jobs back to ready
            for job_id in on_second:
                state = await penv.wait_final(job_id, 60)
                assert (state["state"], state["uploaded"], state["failed"]) == ("done", "60", "0")
            assert source.connected[second.address]

            await wait_until(lambda: tube_settled(penv, first.address), 10,
                             "every job deleted on the first server")
            await wait_until(lambda: tube_settled(penv, second.address), 10,
                             "every job deleted on the second server")
            messages = await penv.completions(len(on_first) + 1 + len(on_second))
        assert sorted(m["id"] for m in messages) == sorted([*on_first, late, *on_second])
        assert all(m["state"] == "done" for m in messages)
        stats = await (await penv.conn(first.address)).stats_tube(penv.tube)
        assert stats["total-jobs"] == str(len(on_first) + 1), "a job was put back on the wrong server"


async def _at_least(env: Env, job_ids: list[str], count: int) -> bool:
    return await total_uploaded(env, job_ids) >= count


async def test_completion_producer_moves_past_a_dead_server(beanstalkd_server: Server) -> None:
    from uploader.beanstalk import Connection, Producer

    dead = devservers.beanstalkd()  # configured, never started: nothing listens there
    tube = f"done-{uuid.uuid4().hex[:8]}"
    producer = Producer((dead.address, beanstalkd_server.address), tube)
    try:
        async with asyncio.timeout(10):
            await producer.put(b'{"id": "x"}')
    finally:
        await producer.close()
    conn = await Connection.connect(beanstalkd_server.address)
    try:
        assert (await conn.stats_tube(tube))["current-jobs-ready"] == "1"
    finally:
        await conn.close()

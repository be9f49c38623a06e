"""A Redis that stops answering (SIGSTOP: the kernel still takes the bytes, nothing replies).

The daemon's client has no timeout per reply; each operation carries one deadline
(`redisio.until_done`). These tests prove the deadline turns a hang into an outage that is
waited out, and that a call abandoned mid-reply leaves the client in step: the next reply read
is the next command's, never the abandoned one's.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
import tomllib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
import structlog

from tests.daemon.test_chaos import TOKEN, assert_all_landed, chaos_config, wait_final_through_outage
from tests.faultproxy import FaultProxy, Rule
from tests.helpers import Daemons, Env, get, on_private_redis, uploaded_at_least, wait_until
from uploader import redisio
from uploader.config.settings import RedisConfig
from uploader.dev import servers as devservers


def _pause(pid: int) -> None:
    os.kill(pid, signal.SIGSTOP)


def _resume(pid: int) -> None:
    os.kill(pid, signal.SIGCONT)


@pytest.fixture
async def standalone() -> AsyncIterator[tuple[int, aioredis.Redis]]:
    """A redis-server of the test's own, its pid to stop and continue, and a client as the
    daemon's: no timeout per reply."""
    server = devservers.redis().start()
    assert server.proc is not None
    client = redisio.connect(RedisConfig(url=f"redis://{server.address}/0"), reply_timeout=None)
    try:
        yield server.proc.pid, client
    finally:
        _resume(server.proc.pid)
        await client.aclose()
        server.stop()


@pytest.mark.timeout(30)
async def test_a_call_past_its_deadline_is_an_outage_and_the_client_stays_in_step(
    standalone: tuple[int, aioredis.Redis],
) -> None:
    pid, client = standalone
    await client.mset({"a": "1", "b": "2"})
    _pause(pid)
    try:
        with structlog.testing.capture_logs() as logs:
            call = asyncio.create_task(redisio.until_done(lambda: client.get("a"), "get a", deadline=0.3))

            def timed_out() -> bool:
                return any(e["event"] == "redis_unavailable" for e in logs)

            await wait_until(timed_out, 5, "the deadline to fire")
            assert not call.done()
    finally:
        _resume(pid)
    assert await asyncio.wait_for(call, 10) == b"1"
    unavailable = [e for e in logs if e["event"] == "redis_unavailable"]
    assert unavailable[0]["error"] == "no reply within 0.3 s"
    # The abandoned request's reply must not be taken for a later command's.
    assert await client.get("b") == b"2"
    async with client.pipeline(transaction=False) as pipe:
        pipe.get("b").get("a").get("missing")
        assert await pipe.execute() == [b"2", b"1", None]


@pytest.mark.timeout(30)
async def test_a_hang_within_the_deadline_is_waited_out_in_one_call(
    standalone: tuple[int, aioredis.Redis],
) -> None:
    pid, client = standalone
    await client.set("a", "1")
    _pause(pid)
    with structlog.testing.capture_logs() as logs:
        call = asyncio.create_task(redisio.until_done(lambda: client.incr("a"), "incr a", deadline=10))
        await asyncio.sleep(0.5)  # the hang itself, not a wait for an event
        _resume(pid)
        assert await asyncio.wait_for(call, 10) == 2
    assert logs == []
    assert await client.get("a") == b"2"  # sent once, counted once


@pytest.mark.timeout(90)
async def test_redis_hung_mid_job_pauses_the_daemon_and_fails_no_file(
    env: Env, tmp_path: Path, moto_endpoint: str, s3: Any, bucket: str, proxy: FaultProxy, daemons: Daemons
) -> None:
    async with on_private_redis(tmp_path, moto_endpoint, env) as (server, penv):
        assert server.proc is not None
        proxy.add(Rule("delay", methods=frozenset({"PUT"}), delay=0.05))
        paths = penv.write_files(120, size=1024)
        job_id = f"hang-{penv.tag}"
        await penv.push_job(job_id, [str(p) for p in paths], ttr=30)
        config = chaos_config(penv, proxy, bucket, upload={"concurrency": 4}, redis={"page_size": 20})
        daemon = daemons.start(config)
        await wait_until(lambda: uploaded_at_least(penv, job_id, 20), 30, "20 files uploaded")
        base = f"http://{tomllib.loads(config.read_text())['http']['listen']}"

        _pause(server.proc.pid)
        paused_at = time.monotonic()
        try:
            async with aiohttp.ClientSession() as http:

                async def not_ready() -> dict[str, Any] | None:
                    status, body = await get(http, f"{base}/readyz", TOKEN)
                    return body if status == 503 else None

                body = await wait_until(not_ready, 15, "/readyz to say Redis does not answer")
                assert body["checks"]["redis"]["ok"] is False
                await asyncio.sleep(3.0)  # the hang itself, not a wait for an event
        finally:
            _resume(server.proc.pid)
        hung_for = time.monotonic() - paused_at

        state = await wait_final_through_outage(penv, job_id)
        assert (state["state"], state["uploaded"], state["failed"]) == ("done", "120", "0")
        assert await penv.failures(job_id) == {}
        assert daemon.events("file_failed") == []
        assert_all_landed(s3, bucket, penv, {job_id: paths})
        assert daemon.stop() == 0
        print(f"Redis hung for {hung_for:.1f} s mid-job: /readyz said so, 0 files failed or lost")


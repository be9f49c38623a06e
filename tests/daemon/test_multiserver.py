"""Several beanstalkd servers: one daemon reserves from each, finishes every job on the server
(and connection) that handed it out, announces it there, and rides out one server's death,
absence at start, restart, and running out of file descriptors."""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from tests.helpers import (
    Daemons,
    Env,
    SlowStore,
    get,
    notify_socket,
    total_uploaded,
    tube_settled,
    two_servers,
    wait_until,
    write_config,
)
from uploader.dev import servers as devservers
from uploader.dev.servers import Server
from uploader.source.beanstalkd.source import connections_needed

FILES_PER_JOB = 60






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
            await wait_until(lambda: not source.connected(second.address), 10, "the loss noticed")
            # Its held jobs are handed back, not left `running` for nobody.
            for job_id in on_second:
                await wait_until(lambda j=job_id: _state_is(penv, j, "queued"), 10, f"{job_id} queued")
                assert "connection lost" in (await penv.state(job_id))["note"]

            # The first server is served as before while the second is down.
            late = f"one-{penv.tag}-late"
            await push(penv, late, files, first)
            for job_id in [*on_first, late]:
                state = await penv.wait_final(job_id, 30)
                assert (state["state"], state["uploaded"], state["failed"]) == ("done", "60", "0")
            assert not source.connected(second.address)

            second.start()  # same port, and its binlog brings the held jobs back to ready
            for job_id in on_second:
                state = await penv.wait_final(job_id, 60)
                assert (state["state"], state["uploaded"], state["failed"]) == ("done", "60", "0")
            assert source.connected(second.address)

            await wait_until(lambda: tube_settled(penv, first.address), 10,
                             "every job deleted on the first server")
            await wait_until(lambda: tube_settled(penv, second.address), 10,
                             "every job deleted on the second server")
            # Each completion message is on the server that held the job.
            on_one = await penv.completions(len(on_first) + 1)
            on_two = await devservers.await_completions(second.address, penv.done_tube, len(on_second), 30)
        assert sorted(m["id"] for m in on_one) == sorted([*on_first, late])
        assert sorted(m["id"] for m in on_two) == sorted(on_second)
        assert all(m["state"] == "done" for m in [*on_one, *on_two])
        stats = await (await penv.conn(first.address)).stats_tube(penv.tube)
        assert stats["total-jobs"] == str(len(on_first) + 1), "a job was put back on the wrong server"


async def _at_least(env: Env, job_ids: list[str], count: int) -> bool:
    return await total_uploaded(env, job_ids) >= count


async def _state_is(env: Env, job_id: str, state: str) -> bool:
    return (await env.state(job_id)).get("state") == state


async def test_completion_producer_prefers_the_named_server_and_moves_past_a_dead_one(
    beanstalkd_server: Server,
) -> None:
    from uploader.source.beanstalkd.wire import Connection, Producer

    dead = devservers.beanstalkd()  # configured, never started: nothing listens there
    other = devservers.beanstalkd().start()
    tube = f"done-{uuid.uuid4().hex[:8]}"
    producer = Producer((dead.address, beanstalkd_server.address, other.address), tube)
    try:
        async with asyncio.timeout(10):
            await producer.put(b'{"id": "x"}', prefer=dead.address)  # dead: the next live one
            await producer.put(b'{"id": "y"}', prefer=other.address)
    finally:
        await producer.close()
    try:
        for address, ready in ((beanstalkd_server.address, "1"), (other.address, "1")):
            conn = await Connection.connect(address)
            try:
                assert (await conn.stats_tube(tube))["current-jobs-ready"] == ready
            finally:
                await conn.close()
    finally:
        other.stop()


def two_server_config(env: Env, first: Server, second: Server, name: str, **overrides: Any) -> Path:
    data = env.config_data(source={"address": [first.address, second.address]}, **overrides)
    return write_config(env.tmp_path / name, data)


@pytest.mark.timeout(90)
async def test_a_daemon_started_with_one_of_two_servers_down_is_ready_at_once_and_takes_its_jobs_once_back(
    env: Env, daemons: Daemons
) -> None:
    """Before: readiness needed every server, so no READY=1 (systemd killed the start after
    90 s, in a loop) and /readyz said 503. Now the live server is served at once, the dead one
    named, and its jobs (kept by its binlog) are taken within moments of its return."""
    async with two_servers(env) as (penv, first, second):
        files = [str(p) for p in penv.write_files(20, size=64)]
        on_second = [f"two-{penv.tag}-{i}" for i in range(2)]
        for job_id in on_second:
            await push(penv, job_id, files, second)
        second.stop()  # its binlog keeps the jobs for its return
        port = devservers.free_port()
        config = two_server_config(penv, first, second, "down.toml", http={"listen": f"127.0.0.1:{port}"})
        with notify_socket() as (address, seen):
            started = time.monotonic()
            daemon = daemons.start(config, {"NOTIFY_SOCKET": address})
            await wait_until(lambda: "READY=1" in seen, 20, "READY=1 with one server down")
            ready_after = time.monotonic() - started
            async with aiohttp.ClientSession() as session:
                status, body = await get(session, f"http://127.0.0.1:{port}/readyz")
                assert status == 200, body
                assert body["sources"][first.address] == {"ok": True}
                assert body["sources"][second.address]["ok"] is False
                assert "Connection refused" in body["sources"][second.address]["error"]
                _, metrics = await get(session, f"http://127.0.0.1:{port}/metrics")
            assert f'uploader_source_up{{server="{first.address}"}} 1.0' in metrics
            assert f'uploader_source_up{{server="{second.address}"}} 0.0' in metrics
            down = await daemon.wait_event("beanstalkd_down")
            assert down["address"] == second.address

            on_first = [f"one-{penv.tag}-{i}" for i in range(3)]
            for job_id in on_first:
                await push(penv, job_id, files, first)
            for job_id in on_first:
                assert (await penv.wait_final(job_id, 20))["state"] == "done"

            second.start()
            back = time.monotonic()
            await wait_until(lambda: _any_started(penv, on_second), 20, "the returned server's jobs taken")
            taken_after = time.monotonic() - back
            for job_id in on_second:
                state = await penv.wait_final(job_id, 20)
                assert (state["state"], state["uploaded"]) == ("done", "20")
            await daemon.wait_event("beanstalkd_up")
            assert daemon.stop() == 0
        print(f"ready after {ready_after:.2f} s with one of two servers down; "
              f"its jobs taken {taken_after:.2f} s after it returned")
        assert ready_after < 10
        assert taken_after < 5
        assert len([e for e in daemon.events("beanstalkd_down") if e["address"] == second.address]) == 1
        daemons.assert_clean_logs(())


async def _any_started(env: Env, job_ids: list[str]) -> bool:
    return any([(await env.state(j)).get("state") in ("running", "done") for j in job_ids])


@pytest.mark.timeout(90)
async def test_a_full_server_is_told_in_one_line_and_the_others_are_served(
    env: Env, daemons: Daemons
) -> None:
    """A beanstalkd out of file descriptors completes TCP handshakes it never accepts: the
    daemon says so once, with the cause, serves the other server, and the full one once it
    has room again."""
    async with two_servers(env) as (penv, first, second):
        second.stop()
        full = devservers.beanstalkd(nofile=16).start()
        files = [str(p) for p in penv.write_files(5, size=64)]
        waiting = f"full-{penv.tag}"
        await push(penv, waiting, files, full)
        fillers: list[socket.socket] = []
        try:
            fillers = await asyncio.to_thread(_fill, full)
            config = two_server_config(penv, first, full, "full.toml")
            daemon = daemons.start(config)
            down = await daemon.wait_event("beanstalkd_down", 20)
            assert down["address"] == full.address
            assert "did not answer" in down["cause"] and "file descriptors" in down["cause"]
            served = f"one-{penv.tag}"
            await push(penv, served, files, first)
            assert (await penv.wait_final(served, 20))["state"] == "done"
            assert len(daemon.events("beanstalkd_down")) == 1, "told once, not on every retry"
            for sock in fillers:
                sock.close()
            fillers = []
            assert (await penv.wait_final(waiting, 30))["state"] == "done"
            await daemon.wait_event("beanstalkd_up")
            assert daemon.stop() == 0
        finally:
            for sock in fillers:
                sock.close()
            full.stop()
        daemons.assert_clean_logs(())


def _fill(server: Server) -> list[socket.socket]:
    """Open connections until the server answers no more: it is out of file descriptors."""
    socks: list[socket.socket] = []
    while len(socks) < 64:
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        socks.append(sock)
        sock.settimeout(0.5)
        sock.sendall(b"stats\r\n")
        try:
            if not sock.recv(16):
                return socks
        except TimeoutError:
            return socks
    raise AssertionError("the server never ran out of file descriptors")


@pytest.mark.timeout(60)
async def test_a_daemon_stays_within_its_connection_budget(env: Env) -> None:
    """`connections_needed` (README: the fleet's connection budget) bounds what one daemon opens
    to a server while it holds as many jobs as it may."""
    server = devservers.beanstalkd().start()
    try:
        penv = Env(tmp_path=env.tmp_path, beanstalkd=server.address, redis_url=env.redis_url,
                   s3_endpoint=env.s3_endpoint, tag=uuid.uuid4().hex[:10])
        penv.redis = aioredis.Redis.from_url(env.redis_url)
        try:
            config = penv.config(source={"max_active_jobs": 3}, upload={"concurrency": 4})
            files = [str(p) for p in penv.write_files(30, size=64)]
            producer = await penv.conn()
            await producer.use(penv.tube)
            job_ids = [f"b-{penv.tag}-{i}" for i in range(12)]
            for job_id in job_ids:
                await penv.redis.rpush(penv.keys.files(job_id), *files)
                await producer.put(job_id.encode())
            watcher = await penv.conn()
            peak = 0
            async with penv.daemon(config, store=SlowStore(config.store.local)), asyncio.timeout(60):
                for job_id in job_ids:  # sampled every 50 ms until each job is final
                    while (await penv.state(job_id)).get("state") not in ("done", "failed"):
                        stats = await watcher.stats()
                        peak = max(peak, int(stats["current-connections"]) - 2)  # less ours
                        await asyncio.sleep(0.05)
            assert 3 <= peak <= connections_needed(config.source), peak
        finally:
            await penv.close()
    finally:
        server.stop()

"""The daemon on a real Redis Cluster (3 masters) and a real Sentinel deployment (master,
replica, 3 sentinels): the same jobs, the same exact counts, through a resharding, a READONLY
window and a `kill -9` of the master."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, cast

import aiohttp
import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster as ClusterClient

from tests.helpers import Env, RecordingStore, local_store, run_cli, toml_text, wait_until
from uploader.config.settings import RedisConfig
from uploader.dev import redis as devredis
from uploader.dev import servers as devservers
from uploader.dev.redis import RedisCluster, RedisSentinel
from uploader.dev.servers import Server
from uploader.redisio import connect
from uploader.state import heartbeat as heartbeat_mod

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
async def cluster_env(
    tmp_path: Path, beanstalkd_server: Server, redis_cluster: RedisCluster, moto_endpoint: str
) -> AsyncIterator[Env]:
    env = Env(tmp_path=tmp_path, beanstalkd=beanstalkd_server.address, redis_url=redis_cluster.url,
              s3_endpoint=moto_endpoint, tag=uuid.uuid4().hex[:10])
    client = ClusterClient.from_url(redis_cluster.url)
    await client.initialize()
    env.redis = cast(aioredis.Redis, client)
    yield env
    await env.close()


def sentinel_env(tmp_path: Path, beanstalkd: str, deployment: RedisSentinel, moto_endpoint: str) -> Env:
    env = Env(tmp_path=tmp_path, beanstalkd=beanstalkd, redis_url="redis://127.0.0.1:1/0",
              s3_endpoint=moto_endpoint, tag=uuid.uuid4().hex[:10])
    env.redis = connect(sentinel_config(deployment))
    return env


def sentinel_config(deployment: RedisSentinel) -> RedisConfig:
    return RedisConfig(mode="sentinel", url="redis://ignored:1/0", sentinels=tuple(deployment.sentinels),
                       service=deployment.service)


def sentinel_overrides(deployment: RedisSentinel) -> dict[str, Any]:
    return {"redis": {"mode": "sentinel", "sentinels": list(deployment.sentinels),
                      "service": deployment.service}}


def slow_local(env: Env, delay: float) -> RecordingStore:
    return RecordingStore(local_store(env), delay=delay)


def stored(env: Env) -> int:
    return sum(len(files) for _, _, files in os.walk(env.objects))


async def assert_exact(env: Env, job_id: str, total: int, failed: int = 0) -> dict[str, str]:
    """The final hash says what the store and the marks say, to the file."""
    state = await env.wait_final(job_id, timeout=60)
    counts = (state["total"], state["uploaded"], state["failed"])
    assert counts == (str(total), str(total - failed), str(failed))
    marks = await env.redis.get(env.keys.marks(job_id)) or b""
    assert sum(bin(b).count("1") for b in marks) == total - failed, "a mark for every stored file"
    assert len(await env.failures(job_id)) == failed
    return state


def assert_no_dropped_writes(log: str) -> None:
    for event in ("progress_write_refused", "job_crashed", "file_failed"):
        assert event not in log, f"{event} in the daemon's log"


# --- Redis Cluster ---


async def test_jobs_whose_keys_live_on_different_cluster_nodes_finish_with_exact_counts(
    cluster_env: Env, redis_cluster: RedisCluster
) -> None:
    env = cluster_env
    job_ids = [f"c{i}-{env.tag}" for i in range(6)]
    nodes = {redis_cluster.node_for(env.keys.job(j)).port for j in job_ids}
    nodes |= {redis_cluster.node_for(env.keys.files(j)).port for j in job_ids}
    assert len(nodes) >= 2, "the jobs' keys should span nodes, or the test proves nothing"
    first = job_ids[0]
    assert redis_cluster.keyslot(env.keys.marks(first)) == redis_cluster.keyslot(env.keys.job(first))
    for n, job_id in enumerate(job_ids):
        paths = [str(p) for p in env.write_files(30, sub=job_id)]
        if n % 2:
            paths.append(str(env.uploads / "missing.txt"))  # a failed file, with its reason
        await env.push_job(job_id, paths)

    async with env.daemon(env.config(redis={"mode": "cluster"})):
        for n, job_id in enumerate(job_ids):
            failed = n % 2
            state = await assert_exact(env, job_id, 30 + failed, failed)
            assert state["state"] == ("failed" if failed else "done")
        messages = await env.completions(len(job_ids))
    assert sorted(m["id"] for m in messages) == sorted(job_ids)
    assert stored(env) == 30 * len(job_ids)


async def test_a_slot_moved_to_another_node_mid_job_drops_no_progress(
    cluster_env: Env, redis_cluster: RedisCluster, capsys: pytest.CaptureFixture[str]
) -> None:
    env = cluster_env
    job_id = f"moved-{env.tag}"
    await env.push_job(job_id, [str(p) for p in env.write_files(150)])
    store = slow_local(env, 0.01)
    async with env.daemon(env.config(redis={"mode": "cluster"}, upload={"concurrency": 4}), store=store):
        await wait_until(lambda: _uploaded_at_least(env, job_id, 20), 30, "progress before the move")
        for key in (env.keys.job(job_id), env.keys.files(job_id)):
            slot = redis_cluster.keyslot(key)
            owner = redis_cluster.owner_of_slot(slot)
            target = next(n for n in redis_cluster.nodes if n.port != owner.port)
            await asyncio.to_thread(redis_cluster.migrate_slot, slot, target)
        state = await assert_exact(env, job_id, 150)
    assert state["state"] == "done"
    assert stored(env) == 150
    assert_no_dropped_writes(capsys.readouterr().out)


async def _uploaded_at_least(env: Env, job_id: str, count: int) -> bool:
    return int((await env.state(job_id)).get("uploaded", 0)) >= count


async def test_the_cli_commands_work_on_a_cluster(cluster_env: Env, tmp_path: Path) -> None:
    env = cluster_env
    config = tmp_path / "cluster.toml"
    config.write_text(toml_text(env.config_data(redis={"mode": "cluster"})))
    paths = [str(p) for p in env.write_files(3)]
    job_id = f"cli-{env.tag}"
    async with env.daemon(env.config(redis={"mode": "cluster"})):
        code, out, err = await run_cli("enqueue", "--config", str(config), "--job", job_id, "--wait", *paths)
        assert code == 0, err
        code, out, err = await run_cli("status", "--config", str(config), job_id)
        assert code == 0 and "done" in out, err
        code, _, err = await run_cli("cancel", "--config", str(config), job_id)
        assert code == 1, err  # finished: nothing to cancel
        code, out, err = await run_cli("failed", "--config", str(config))
        assert code == 0, err
        code, out, err = await run_cli("recover", "--config", str(config), "--dry-run", "--older-than", "0")
        assert code == 0, err  # SCAN over every master
        # Enqueue again: the reset deletes keys of several slots, one DEL each.
        code, out, err = await run_cli("enqueue", "--config", str(config), "--job", job_id, "--wait", *paths)
        assert code == 0, err


# --- Sentinel ---


async def test_a_redis_that_turns_read_only_mid_job_holds_every_write_until_it_takes_them(
    tmp_path: Path, beanstalkd_server: Server, moto_endpoint: str, capsys: pytest.CaptureFixture[str],
) -> None:
    """READONLY, as a demoted master answers until it is reconfigured: the daemon takes no new
    work and says why, progress waits (no batch dropped, no file failed, no job buried), and
    the job ends exact once Redis takes writes again."""
    server = devservers.redis().start()
    env = Env(tmp_path=tmp_path, beanstalkd=beanstalkd_server.address, redis_url=f"redis://{server.address}/0",
              s3_endpoint=moto_endpoint, tag=uuid.uuid4().hex[:10])
    env.redis = aioredis.Redis.from_url(env.redis_url)
    try:
        job_id = f"ro-{env.tag}"
        await env.push_job(job_id, [str(p) for p in env.write_files(120)])
        store = slow_local(env, 0.01)
        async with env.daemon(env.config(upload={"concurrency": 4}), store=store) as daemon:
            await wait_until(lambda: _uploaded_at_least(env, job_id, 20), 30, "progress before the window")
            # A replica of a port nobody listens on never syncs: it keeps its data, refuses writes.
            devredis.command(server, "REPLICAOF", "127.0.0.1", "1")
            began = time.monotonic()
            try:
                await wait_until(lambda: not daemon.health.ok, 30, "the daemon to see Redis read-only")
                reason = daemon.health.describe()
            finally:
                devredis.command(server, "REPLICAOF", "NO", "ONE")
            with capsys.disabled():
                print(f"READONLY window {time.monotonic() - began:.2f} s: {reason}")
            state = await assert_exact(env, job_id, 120)
        assert "replica" in reason, reason
        assert state["state"] == "done"
        assert stored(env) == 120
        assert_no_dropped_writes(capsys.readouterr().out)
    finally:
        await env.close()
        server.stop()


@pytest.mark.timeout(180)
async def test_kill_9_of_the_master_mid_job_loses_and_miscounts_nothing(
    tmp_path: Path, beanstalkd_server: Server, fresh_sentinel: Callable[..., RedisSentinel],
    moto_endpoint: str, capsys: pytest.CaptureFixture[str],
) -> None:
    """Writes the master acknowledged but never replicated (its replica is stopped for a
    moment before the kill) vanish with it: the final write makes them good from the run's
    ledger, so the counts equal what was stored."""
    deployment = fresh_sentinel()
    env = sentinel_env(tmp_path, beanstalkd_server.address, deployment, moto_endpoint)
    try:
        job_id = f"kill-{env.tag}"
        total = 400
        await env.push_job(job_id, [str(p) for p in env.write_files(total)])
        store = slow_local(env, 0.02)
        config = env.config(**sentinel_overrides(deployment), upload={"concurrency": 8})
        async with env.daemon(config, store=store):
            await wait_until(lambda: _uploaded_at_least(env, job_id, 40), 30, "progress before the kill")
            replica = deployment.replica
            assert replica.proc is not None
            # What the master acknowledges from now on is never copied: the replica is stopped
            # and its link cut (what was on the wire before is still read once it continues).
            os.kill(replica.proc.pid, signal.SIGSTOP)
            try:
                devredis.command(deployment.master, "CLIENT", "KILL", "TYPE", "replica")
                before = len(store.order)
                await wait_until(lambda: len(store.order) >= before + 40, 30, "uploads the replica misses")
                await wait_until(lambda: _uploaded_at_least(env, job_id, before + 30), 30,
                                 "the master acknowledging progress the replica misses")
                seen_before = int((await env.state(job_id)).get("uploaded", 0))
                store.delay = 1.0  # the job still runs once the new master is in place
                killed = deployment.kill_master()
            finally:
                os.kill(replica.proc.pid, signal.SIGCONT)
            await asyncio.to_thread(deployment.wait_for_promotion, 30)
            promoted = time.monotonic() - killed
            after_promotion = int((await env.state(job_id)).get("uploaded", 0))
            store.delay = 0.02
            await wait_until(lambda: _uploaded_at_least(env, job_id, after_promotion + 1), 60,
                             "progress moving on the new master")
            moving = time.monotonic() - killed
            state = await assert_exact(env, job_id, total)
            with capsys.disabled():
                print(f"kill -9 at 0 s; promoted at {promoted:.2f} s; progress moving at {moving:.2f} s; "
                      f"uploaded seen {seen_before} before the kill, {after_promotion} on the new master")
        assert state["state"] == "done"
        assert stored(env) == total
        assert after_promotion < seen_before, "the failover lost no write: the test proved nothing"
        assert_no_dropped_writes(capsys.readouterr().out)
    finally:
        await env.close()


async def test_directories_the_http_api_retry_and_files_ttl_on_a_cluster(
    cluster_env: Env, tmp_path: Path
) -> None:
    """The rest of what the daemon and the CLI send Redis, once on a cluster: a directory
    entry (walk digests), `/jobs` and `/jobs/ID`, `retry` of a failed job, `files_ttl`."""
    import aiohttp

    from tests.helpers import get, listen

    env = cluster_env
    tree = env.uploads / "tree"
    for i in range(20):
        (tree / f"s{i % 3}").mkdir(parents=True, exist_ok=True)
        (tree / f"s{i % 3}" / f"f{i}.txt").write_bytes(b"x" * i)
    dir_job, bad_job = f"dir-{env.tag}", f"bad-{env.tag}"
    await env.push_job(dir_job, [str(tree)])
    await env.push_job(bad_job, [str(env.uploads / "gone.txt")])
    config, api = listen(env, redis={"mode": "cluster", "files_ttl": 600})
    async with env.daemon(config), aiohttp.ClientSession() as session:
        state = await env.wait_final(dir_job)
        assert (state["state"], state["uploaded"], state["total"]) == ("done", "20", "20")
        assert (await env.wait_final(bad_job))["state"] == "failed"
        assert 0 < await env.redis.ttl(env.keys.files(dir_job)) <= 600
        status, body = await get(session, f"{api}/jobs")
        assert status == 200, body
        status, body = await get(session, f"{api}/jobs/{bad_job}")
        assert status == 200 and body["state"] == "failed", body
        path = tmp_path / "cluster.toml"
        path.write_text(toml_text(env.config_data(redis={"mode": "cluster"})))
        (env.uploads / "gone.txt").write_bytes(b"back")
        code, _, err = await run_cli("retry", "--config", str(path), bad_job)
        assert code == 0, err
        await wait_until(lambda: _state_is(env, bad_job, "done"), 30, "the retried job done")


async def _state_is(env: Env, job_id: str, state: str) -> bool:
    return (await env.state(job_id)).get("state") == state


async def test_the_status_page_reads_the_fleet_from_a_cluster(
    cluster_env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Workers, throughput and jobs are keys on several nodes: one refresh reads them all, and
    an action goes to the job's node."""
    monkeypatch.setattr(heartbeat_mod, "HEARTBEAT_INTERVAL", 0.2)
    env = cluster_env
    job_ids = [f"page{i}-{env.tag}" for i in range(4)]
    for n, job_id in enumerate(job_ids):
        paths = [str(p) for p in env.write_files(3, sub=job_id)]
        await env.push_job(job_id, paths + ([str(env.uploads / "missing.txt")] if n % 2 else []))
    port = devservers.free_port()
    config = env.config(redis={"mode": "cluster"}, http={"listen": f"127.0.0.1:{port}", "token": "t0k"})
    async with env.daemon(config), aiohttp.ClientSession() as http:
        for job_id in job_ids:
            await env.wait_final(job_id)
        auth = {"Authorization": "Bearer t0k"}

        async def fleet() -> dict[str, Any] | None:
            async with http.get(f"http://127.0.0.1:{port}/fleet", headers=auth) as reply:
                body: dict[str, Any] = await reply.json()
            counted = sum(bucket["files"] for bucket in body["throughput"])
            return body if body["workers"] and counted == 14 else None

        body = await wait_until(fleet, 20, "the fleet, read from the cluster")
        assert {job["id"] for job in body["finished"]} == set(job_ids)
        assert sorted(job["id"] for job in body["failed"]["jobs"]) == sorted(job_ids[1::2])
        assert all(job["reasons"][0][0].endswith("missing.txt") for job in body["failed"]["jobs"])
        url = f"http://127.0.0.1:{port}/jobs/{job_ids[1]}/retry"
        async with http.post(url, headers={**auth, "X-Confirm": "retry"}) as reply:
            assert reply.status == 200, await reply.text()

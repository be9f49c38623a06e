"""The real Redis Cluster and Sentinel test servers (`uploader/dev/redis.py`), proved with
redis-py's own cluster and sentinel clients."""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest
import redis.exceptions
from redis.asyncio.cluster import RedisCluster as ClusterClient
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff

from uploader.dev import redis as devredis
from uploader.dev.redis import RedisCluster, RedisSentinel
from uploader.dev.servers import Server


def tag() -> str:
    return uuid.uuid4().hex[:10]


@asynccontextmanager
async def cluster_client(cluster: RedisCluster) -> AsyncIterator[ClusterClient]:
    client = ClusterClient.from_url(cluster.url)
    # redis-py 8.1 queues a transaction pipeline's commands through asyncio.run() in a thread:
    # a client first initialized there holds connections of that dead loop (RuntimeError
    # "attached to a different loop", and on aclose "Event loop is closed"). So not there.
    await client.initialize()
    try:
        yield client
    finally:
        await client.aclose()


def keys_on_every_node(cluster: RedisCluster, prefix: str) -> dict[int, str]:
    """One key per node: node port -> a key whose slot that node serves."""
    found: dict[int, str] = {}
    i = 0
    while len(found) < len(cluster.nodes):
        key = f"{prefix}:{i}"
        found.setdefault(cluster.node_for(key).port, key)
        i += 1
    return found


@pytest.mark.timeout(30)
async def test_keys_of_different_slots_land_on_their_nodes_and_a_pipeline_spans_them(
    redis_cluster: RedisCluster,
) -> None:
    keys = keys_on_every_node(redis_cluster, tag())
    assert len({redis_cluster.keyslot(k) for k in keys.values()}) == 3
    async with cluster_client(redis_cluster) as client:
        pipe = client.pipeline(transaction=False)
        for port, key in keys.items():
            pipe.set(key, str(port))
        assert await pipe.execute() == [True, True, True]
        pipe = client.pipeline(transaction=False)
        for key in keys.values():
            pipe.get(key)
        assert await pipe.execute() == [str(port).encode() for port in keys]
    for port, key in keys.items():  # each key is stored on the node that owns its slot, only
        slot = redis_cluster.keyslot(key)
        assert [n.port for n in redis_cluster.nodes if stored_on(n, slot, key)] == [port]


def stored_on(node: Server, slot: int, key: str) -> bool:
    """Whether `node` itself holds `key` (EXISTS elsewhere than its slot's owner is MOVED)."""
    return key.encode() in devredis.command(node, "CLUSTER", "GETKEYSINSLOT", slot, 1000)


@pytest.mark.timeout(30)
async def test_hash_tagged_keys_share_a_slot_and_a_transaction_spans_them(
    redis_cluster: RedisCluster,
) -> None:
    name = tag()
    keys = [f"{{{name}}}:a", f"{{{name}}}:b", f"{{{name}}}:c"]
    assert len({redis_cluster.keyslot(k) for k in keys}) == 1
    async with cluster_client(redis_cluster) as client:
        pipe = client.pipeline(transaction=True)
        for key in keys:
            pipe.incrby(key, 5)
            pipe.get(key)  # (MGET is refused in a cluster pipeline, even with one slot)
        assert await pipe.execute() == [5, b"5"] * 3
        with pytest.raises(redis.exceptions.RedisClusterException):  # not so across slots
            await client.pipeline(transaction=True).set(f"{name}:x", 1).set(f"{name}:y", 1).execute()


@pytest.mark.timeout(30)
async def test_a_slot_migrated_under_a_client_keeps_its_keys_readable(redis_cluster: RedisCluster) -> None:
    name = tag()
    keys = [f"{{{name}}}:{i}" for i in range(250)]  # more than one MIGRATE batch, one slot
    slot, source = redis_cluster.keyslot(keys[0]), redis_cluster.node_for(keys[0])
    target = next(n for n in redis_cluster.nodes if n is not source)
    async with cluster_client(redis_cluster) as client:
        for key in keys:
            await client.set(key, key)
        assert client.get_node_from_key(keys[0]).port == source.port  # the client's slot map

        moving = asyncio.create_task(asyncio.to_thread(redis_cluster.migrate_slot, slot, target, 20))
        while not moving.done():  # reads meanwhile: ASK redirects, for keys already moved
            assert [await client.get(k) for k in keys[::25]] == [k.encode() for k in keys[::25]]
        await moving

        assert redis_cluster.node_for(keys[0]) is target
        assert devredis.command(source, "CLUSTER", "COUNTKEYSINSLOT", slot) == 0
        assert devredis.command(target, "CLUSTER", "COUNTKEYSINSLOT", slot) == len(keys)
        assert [await client.get(k) for k in keys] == [k.encode() for k in keys]  # MOVED, followed
        assert client.get_node_from_key(keys[0]).port == target.port
        await client.set(keys[0], "after")
        assert devredis.command(target, "GET", keys[0]) == b"after"


@asynccontextmanager
async def sentinel_client(deployment: RedisSentinel) -> AsyncIterator[Sentinel]:
    """Clients as the uploader makes them: short timeouts, and no retries of their own, so
    that every error of the failover window reaches the caller."""
    hosts = [(a.split(":")[0], int(a.split(":")[1])) for a in deployment.sentinels]
    sentinel = Sentinel(hosts, socket_timeout=1, socket_connect_timeout=1, retry=Retry(NoBackoff(), 0))
    try:
        yield sentinel
    finally:
        for client in sentinel.sentinels:
            await client.aclose()


@pytest.mark.timeout(30)
async def test_the_sentinels_master_takes_writes_and_its_replica_gets_them(
    redis_sentinel: RedisSentinel,
) -> None:
    service, key = redis_sentinel.service, tag()
    async with sentinel_client(redis_sentinel) as sentinel:
        assert await sentinel.discover_master(service) == ("127.0.0.1", redis_sentinel.master.port)
        async with sentinel.master_for(service) as master, sentinel.slave_for(service) as replica:
            await master.set(key, "v")
            assert await master.get(key) == b"v"
            assert await master.wait(1, 2000) == 1
            assert await replica.get(key) == b"v"
            with pytest.raises(redis.exceptions.ReadOnlyError):
                await replica.set(key, "w")


async def fail_over(deployment: RedisSentinel, errors: list[BaseException]) -> tuple[float, float]:
    """Kill the master and write through the same `master_for` client until a write succeeds,
    while waiting for the promotion; (kill to promotion, kill to first write), in seconds."""
    async with sentinel_client(deployment) as sentinel, sentinel.master_for(deployment.service) as master:
        await master.set("before", "1")
        assert await master.wait(1, 2000) == 1  # replication is asynchronous: else it may be lost
        old = deployment.master
        killed_at = deployment.kill_master()
        promotion = asyncio.create_task(asyncio.to_thread(deployment.wait_for_promotion, 20))
        to_write = await devredis.first_write(master, "after", killed_at, timeout=20, errors=errors)
        new_address = await promotion
        to_promotion = time.monotonic() - killed_at  # an upper bound; promotion came first
        assert new_address != old.address and deployment.master.address == new_address
        assert deployment.replica is old
        await master.set("again", "1")  # the same client keeps writing
        stored = devredis.command(deployment.master, "MGET", "before", "after", "again")
        assert stored == [b"1", b"after-failover", b"1"]
    print(f"\nfailover ({len(deployment.sentinels)} sentinels): kill to first write {to_write:.2f}s, "
          f"to promotion seen <= {to_promotion:.2f}s; errors meanwhile: {error_kinds(errors)}")
    return to_promotion, to_write


def error_kinds(errors: list[BaseException]) -> dict[str, int]:
    kinds: dict[str, int] = {}
    for exc in errors:
        name = f"{type(exc).__name__}({str(exc)[:40]})"
        kinds[name] = kinds.get(name, 0) + 1
    return kinds


@pytest.mark.timeout(60)
async def test_after_the_master_is_killed_the_same_client_writes_to_the_promoted_replica(
    fresh_sentinel: Callable[..., RedisSentinel],
) -> None:
    deployment = fresh_sentinel(sentinels=3)
    errors: list[BaseException] = []
    _, to_write = await fail_over(deployment, errors)
    assert errors, "a write went through while the master was dead"
    assert all(isinstance(e, devredis.FAILOVER_ERRORS) for e in errors)
    assert to_write < 15


@pytest.mark.slow
@pytest.mark.timeout(90)
async def test_a_restarted_old_master_is_made_a_replica_of_the_new_one(
    fresh_sentinel: Callable[..., RedisSentinel],
) -> None:
    deployment = fresh_sentinel(sentinels=1)
    await fail_over(deployment, [])
    started = time.monotonic()
    old: Server = deployment.restart_old_master()
    print(f"old master a replica again after {time.monotonic() - started:.2f}s")
    assert devredis.in_sync(old, deployment.master)
    assert devredis.command(deployment.master, "WAIT", 1, 2000) == 1
    assert devredis.command(old, "GET", "again") == b"1"


@pytest.mark.timeout(30)
def test_a_start_that_fails_leaves_no_process_behind() -> None:
    cluster = RedisCluster()
    with pytest.raises(TimeoutError):
        cluster.start(timeout=0)  # a new cluster master waits 2 s before it says "ok"
    assert len(cluster.nodes) == 3 and all(node.proc is None for node in cluster.nodes)
    for node in cluster.nodes:
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", node.port), timeout=1).close()

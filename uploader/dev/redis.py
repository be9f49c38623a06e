"""Real Redis Cluster and Redis Sentinel deployments on free loopback ports.

Like `servers.py` beside it, for the test suite and the benchmarks only; never used by the
daemon. Every process is a `servers.Server` kept by its deployment, so `stop()` ends them all,
even after a start that failed half way.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import redis
import redis.asyncio as aioredis
import redis.exceptions

from uploader.dev.servers import Server, free_port, require

T = TypeVar("T")
SLOTS = 16384
SERVICE = "mymaster"
# What a client sees while a master is gone or just demoted (see tests/dev/test_redis_servers.py).
FAILOVER_ERRORS: tuple[type[BaseException], ...] = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.ReadOnlyError,
    OSError,
)


def admin(server: Server | str) -> redis.Redis:
    """A short-timeout synchronous client for one server (a `Server` or "host:port")."""
    host, port = (server.address if isinstance(server, Server) else server).rsplit(":", 1)
    return redis.Redis(host=host, port=int(port), socket_timeout=2, socket_connect_timeout=2)


def command(server: Server | str, *args: Any) -> Any:
    with admin(server) as client:
        return client.execute_command(*args)


def poll(what: str, check: Callable[[], T | None], timeout: float, interval: float = 0.02) -> T:
    """Call `check` until it returns something other than None (or False); its errors are
    retried too, and the last one is reported with the TimeoutError."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while True:
        try:
            value = check()
            if value is not None and value is not False:
                return value
        except (redis.exceptions.RedisError, OSError) as exc:
            last = exc
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not after {timeout}s (last error: {last!r})")
        time.sleep(interval)


def info(server: Server | str, section: str) -> dict[str, str]:
    with admin(server) as client:
        return {key: str(value) for key, value in client.info(section).items()}


def redis_argv(port: int, workdir: str, *extra: str) -> list[str]:
    return [
        require("redis-server"), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
        "--appendonly", "no", "--protected-mode", "no", "--dir", workdir,
        "--repl-diskless-sync-delay", "0",  # a replica's full sync starts now, not in 5 s
        *extra,
    ]  # fmt: skip


def node_dir(root: str, name: str) -> str:
    path = os.path.join(root, name)
    os.makedirs(path, exist_ok=True)
    return path


@dataclass
class Deployment:
    """Processes started together in one temporary directory, and stopped together."""

    root: str
    servers: list[Server] = field(default_factory=list)

    def add(self, name: str, argv_for: Callable[[int, str], list[str]], port: int | None = None) -> Server:
        port = port or free_port()
        workdir = node_dir(self.root, name)
        server = Server(argv_for(port, workdir), port, workdir)
        self.servers.append(server)
        return server.start()

    def stop(self) -> None:
        for server in self.servers:
            server.stop(kill=True)
        shutil.rmtree(self.root, ignore_errors=True)


class RedisCluster(Deployment):
    """`masters` cluster-enabled redis-server processes owning all 16384 slots, no replicas.

    `.url` is one seed node; a cluster client discovers the rest from it.
    """

    def __init__(self, masters: int = 3, node_timeout_ms: int = 2000) -> None:
        super().__init__(tempfile.mkdtemp(prefix="redis-cluster-"))
        self.node_timeout_ms = node_timeout_ms
        self.bus_ports: dict[int, int] = {}
        self.masters = masters

    @property
    def nodes(self) -> list[Server]:
        return self.servers

    @property
    def url(self) -> str:
        return f"redis://{self.nodes[0].address}/0"

    def argv(self, port: int, workdir: str) -> list[str]:
        bus = self.bus_ports[port] = free_port()  # the default, port + 10000, may not be free
        return redis_argv(
            port, workdir, "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
            "--cluster-port", str(bus), "--cluster-node-timeout", str(self.node_timeout_ms),
        )  # fmt: skip

    def start(self, timeout: float = 10.0) -> RedisCluster:
        try:
            for i in range(self.masters):
                self.add(f"node{i}", self.argv)
            self.create(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def create(self, timeout: float) -> None:
        """What `redis-cli --cluster create --cluster-replicas 0` does, without its 1 s sleeps:
        equal slot ranges, distinct config epochs, MEET, then wait for every node to agree."""
        seed = self.nodes[0]
        for i, node in enumerate(self.nodes):
            first, last = SLOTS * i // self.masters, SLOTS * (i + 1) // self.masters - 1
            command(node, "CLUSTER", "ADDSLOTSRANGE", first, last)
            command(node, "CLUSTER", "SET-CONFIG-EPOCH", i + 1)
            if node is not seed:
                command(seed, "CLUSTER", "MEET", "127.0.0.1", node.port, self.bus_ports[node.port])
        self.wait_consistent(timeout)

    def wait_consistent(self, timeout: float = 10.0) -> None:
        """Until every node says cluster_state:ok, knows every node and sees the same slot map."""

        def agreed() -> bool:
            maps = set()
            for node in self.nodes:
                state = info_cluster(node)
                if state.get("cluster_state") != "ok" or state.get("cluster_known_nodes") != str(
                    len(self.nodes)
                ):
                    return False
                maps.add(tuple(sorted(self.slot_map(node).items())))
            return len(maps) == 1

        poll("cluster consistent", agreed, timeout)

    def node_id(self, node: Server) -> str:
        return str(command(node, "CLUSTER", "MYID").decode())

    def slot_map(self, asked: Server | None = None) -> dict[tuple[int, int], int]:
        """(first, last) slot range -> port of its master, as `asked` (default: node 0) sees it."""
        rows = command(asked or self.nodes[0], "CLUSTER", "SLOTS")
        return {(int(row[0]), int(row[1])): int(row[2][1]) for row in rows}

    def keyslot(self, key: str) -> int:
        return int(command(self.nodes[0], "CLUSTER", "KEYSLOT", key))

    def owner_of_slot(self, slot: int) -> Server:
        for (first, last), port in self.slot_map().items():
            if first <= slot <= last:
                return next(node for node in self.nodes if node.port == port)
        raise LookupError(f"slot {slot} is not served")

    def node_for(self, key: str) -> Server:
        """The master that serves `key`'s hash slot now."""
        return self.owner_of_slot(self.keyslot(key))

    def migrate_slot(self, slot: int, target: Server, batch: int = 100, timeout: float = 10.0) -> None:
        """Move one hash slot and its keys to `target`, live, as `redis-cli --cluster reshard`
        does: IMPORTING/MIGRATING, MIGRATE the keys, then SETSLOT NODE on every node."""
        source = self.owner_of_slot(slot)
        if source is target:
            return
        source_id, target_id = self.node_id(source), self.node_id(target)
        command(target, "CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
        command(source, "CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
        while keys := command(source, "CLUSTER", "GETKEYSINSLOT", slot, batch):
            command(source, "MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "REPLACE", "KEYS", *keys)
        for node in [target, source, *(n for n in self.nodes if n not in (target, source))]:
            command(node, "CLUSTER", "SETSLOT", slot, "NODE", target_id)
        poll(f"slot {slot} on {target.address} everywhere", lambda: self.agree_owner(slot, target), timeout)

    def agree_owner(self, slot: int, target: Server) -> bool:
        return all(self.owner_in_view(node, slot) == target.port for node in self.nodes)

    def owner_in_view(self, node: Server, slot: int) -> int | None:
        for (first, last), port in self.slot_map(node).items():
            if first <= slot <= last:
                return port
        return None


def info_cluster(node: Server) -> dict[str, str]:
    raw = command(node, "CLUSTER", "INFO")
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    return dict(line.strip().split(":", 1) for line in text.splitlines() if ":" in line)


def redis_cluster(masters: int = 3, node_timeout_ms: int = 2000, timeout: float = 10.0) -> RedisCluster:
    """Start a cluster of `masters` nodes and wait until it serves every slot."""
    return RedisCluster(masters, node_timeout_ms).start(timeout)


def sentinel_conf(port: int, master_port: int, quorum: int, down_after_ms: int) -> str:
    return "\n".join([
        f"port {port}", "bind 127.0.0.1", "protected-mode no", "sentinel resolve-hostnames no",
        f"sentinel monitor {SERVICE} 127.0.0.1 {master_port} {quorum}",
        f"sentinel down-after-milliseconds {SERVICE} {down_after_ms}",
        f"sentinel failover-timeout {SERVICE} 5000", f"sentinel parallel-syncs {SERVICE} 1", "",
    ])  # fmt: skip


def known_sentinels(me: int, peers: dict[int, str]) -> str:
    """Each sentinel's id and its peers up front: otherwise they meet through hello messages
    on the master, one every 2 s, and a quorum of 2 cannot be reached before they have."""
    lines = [f"sentinel myid {peers[me]}"]
    lines += [f"sentinel known-sentinel {SERVICE} 127.0.0.1 {p} {i}" for p, i in peers.items() if p != me]
    return "\n".join([*lines, ""])


class RedisSentinel(Deployment):
    """A master, one replica and `sentinels` sentinels (quorum: a majority) watching `.service`.

    `.master` and `.replica` are the servers in those roles as of the last start or
    `wait_for_promotion()`; `.sentinels` are "127.0.0.1:port" addresses.

    down-after-milliseconds is 1500, not 1000: after a failover the sentinels show the new
    master as "disconnected" for up to a second (their reconnects are throttled to one a
    second), and with 1000 ms one of three runs saw it marked subjectively down in that gap;
    with quorum 1 that is a second failover, once onto the old master restarted empty.
    """

    def __init__(self, sentinels: int = 1, down_after_ms: int = 1500) -> None:
        super().__init__(tempfile.mkdtemp(prefix="redis-sentinel-"))
        self.count, self.down_after_ms = sentinels, down_after_ms
        self.quorum = sentinels // 2 + 1
        self.service = SERVICE
        self.sentinel_servers: list[Server] = []
        self.peers: dict[int, str] = {}  # sentinel port -> its run id
        self.killed: Server | None = None
        self.killed_at: float | None = None

    @property
    def sentinels(self) -> list[str]:
        return [s.address for s in self.sentinel_servers]

    def start(self, timeout: float = 10.0) -> RedisSentinel:
        try:
            self.master = self.add("master", redis_argv)
            self.replica = self.add("replica", self.replica_argv)
            poll("replica in sync", lambda: in_sync(self.replica), timeout)
            while len(self.peers) < self.count:
                self.peers[free_port()] = os.urandom(20).hex()
            for i, port in enumerate(self.peers):
                self.sentinel_servers.append(self.add(f"sentinel{i}", self.sentinel_argv, port))
            poll("sentinels know master, replica and each other", self.sentinels_ready, timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def replica_argv(self, port: int, workdir: str) -> list[str]:
        return redis_argv(port, workdir, "--replicaof", "127.0.0.1", str(self.master.port))

    def sentinel_argv(self, port: int, workdir: str) -> list[str]:
        path = os.path.join(workdir, "sentinel.conf")  # sentinel rewrites it: one per sentinel
        with open(path, "w") as f:
            f.write(sentinel_conf(port, self.master.port, self.quorum, self.down_after_ms))
            f.write(known_sentinels(port, self.peers))
        return [require("redis-server"), path, "--sentinel"]

    def sentinels_ready(self) -> bool:
        for address in self.sentinels:
            with admin(address) as client:
                state: dict[str, Any] = client.sentinel_master(self.service)
                replicas: list[dict[str, Any]] = client.sentinel_slaves(self.service)
            if state["port"] != self.master.port or state["num-other-sentinels"] < self.count - 1:
                return False
            if not any(r["port"] == self.replica.port and not r["is_sdown"] for r in replicas):
                return False
        return True

    def settled(self, sentinel: str) -> bool:
        """The sentinel has a live link to its master, which it thinks up: right after a
        failover the new master is "disconnected" for up to a second (see RedisSentinel)."""
        with admin(sentinel) as client:
            state: dict[str, Any] = client.sentinel_master(self.service)
        flags = set(str(state["flags"]).split(","))
        return not flags & {"disconnected", "s_down", "o_down", "failover_in_progress"}

    def master_address(self, sentinel: str | None = None) -> str:
        with admin(sentinel or self.sentinels[0]) as client:
            host, port = client.sentinel_get_master_addr_by_name(self.service)
        return f"{host.decode()}:{port}"

    def server_at(self, address: str) -> Server:
        return next(s for s in self.servers if s.address == address)

    def kill_master(self) -> float:
        """SIGKILL the process the sentinels call master; returns (and keeps) the monotonic time."""
        victim = self.server_at(self.master_address())
        assert victim.proc is not None, f"{victim.address} is not running"
        os.kill(victim.proc.pid, signal.SIGKILL)
        victim.proc.wait()
        self.killed, self.killed_at = victim, time.monotonic()
        return self.killed_at

    def wait_for_promotion(self, timeout: float = 20.0) -> str:
        """Until every sentinel names the same new master, is linked to it, and it answers ROLE
        as master; its address. `.master` becomes that server, `.replica` the old master."""
        old = self.killed.address if self.killed else self.master.address

        def promoted() -> str | None:
            named = {self.master_address(s) for s in self.sentinels}
            if len(named) != 1 or old in named or not all(map(self.settled, self.sentinels)):
                return None
            address = named.pop()
            return address if role(address) == "master" else None

        address = poll(f"a master other than {old}", promoted, timeout)
        self.master, self.replica = self.server_at(address), self.server_at(old)
        return address

    def restart_old_master(self, timeout: float = 30.0) -> Server:
        """Start the killed server again on its port; wait until it replicates the new master
        (a sentinel demotes it once it has reported itself master for about 8 s)."""
        assert self.killed is not None, "kill_master() first"
        server, self.killed = self.killed.start(), None
        what = f"{server.address} replica of {self.master.address}"
        poll(what, lambda: in_sync(server, self.master), timeout)
        return server


def role(address: str) -> str:
    return str(command(address, "ROLE")[0].decode())


def in_sync(replica: Server, master: Server | None = None) -> bool:
    state = info(replica, "replication")
    expected = master is None or state.get("master_port") == str(master.port)
    return state.get("role") == "slave" and state.get("master_link_status") == "up" and expected


def redis_sentinel(sentinels: int = 1, down_after_ms: int = 1500, timeout: float = 10.0) -> RedisSentinel:
    """Start a master, a replica in sync with it and `sentinels` sentinels that know both."""
    return RedisSentinel(sentinels, down_after_ms).start(timeout)


async def first_write(
    client: aioredis.Redis,
    key: str,
    since: float,
    timeout: float = 30.0,
    errors: list[BaseException] | None = None,
) -> float:
    """SET `key` through `client` until it succeeds, retrying FAILOVER_ERRORS (kept in `errors`)
    until `timeout`; the seconds from `since` (a time.monotonic()) to the successful write."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            await client.set(key, "after-failover")
            return time.monotonic() - since
        except FAILOVER_ERRORS as exc:
            if errors is not None:
                errors.append(exc)
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)

"""Real servers for the whole session: beanstalkd, redis-server and moto's S3 over HTTP.

Tests share the servers but never each other's data: each gets its own tubes, Redis key
prefix and bucket.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
import redis.asyncio as aioredis
from moto.server import ThreadedMotoServer

from tests.faultproxy import FaultProxy
from tests.helpers import CREDS, REGION, Daemons, Env, OpenFile
from tests.rclones3 import RcloneS3, rclone_binary
from uploader.dev import redis as devredis
from uploader.dev import servers as devservers
from uploader.dev.redis import RedisCluster, RedisSentinel
from uploader.dev.servers import Server
from uploader.entries.files import Root, SourceFile, locate, open_source


@pytest.fixture(scope="session")
def beanstalkd_server() -> Iterator[Server]:
    server = devservers.beanstalkd().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[Server]:
    server = devservers.redis().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisCluster]:
    """Three cluster masters sharing the 16384 slots (`uploader/dev/redis.py`). Shared: tests may
    move slots, so look up a key's node (`node_for`) rather than assume the initial layout."""
    cluster = devredis.redis_cluster()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def redis_sentinel() -> Iterator[RedisSentinel]:
    """A master, a replica and three sentinels (quorum 2). Shared: never kill its master;
    take `fresh_sentinel` for that."""
    deployment = devredis.redis_sentinel(sentinels=3)
    yield deployment
    deployment.stop()


@pytest.fixture
def fresh_sentinel() -> Iterator[Callable[..., RedisSentinel]]:
    """A factory of private sentinel deployments, for tests that kill a master: each call
    takes `redis_sentinel()`'s arguments; all are stopped when the test ends."""
    started: list[RedisSentinel] = []

    def make(sentinels: int = 3, down_after_ms: int = 1500) -> RedisSentinel:
        deployment = RedisSentinel(sentinels, down_after_ms)
        started.append(deployment)  # before start(): a failed start is stopped too
        return deployment.start()

    yield make
    for deployment in started:
        deployment.stop()


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    _, port = server.get_host_and_port()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture(scope="session")
def azurite_endpoint() -> Iterator[str]:
    """Azurite's blob service on a free loopback port (`devservers.azurite`): its endpoint,
    for `devservers.azurite_connection_string`. Started only by the tests that ask for it."""
    server = devservers.azurite().start()
    yield f"http://{server.address}"
    server.stop()


@pytest.fixture(scope="session")
def rclone_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RcloneS3]:
    """`rclone serve s3`, which verifies signatures and Content-MD5 (moto does neither)."""
    binary = rclone_binary()
    if binary is None:
        pytest.fail("rclone not found: scripts/setup.sh fetches it (or set RCLONE=path)")
    server = RcloneS3(binary, tmp_path_factory.mktemp("rclone-s3"))
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def no_ambient_aws(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Keep the developer's ~/.aws and environment out of the tests."""
    for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture
def src_dir(tmp_path: Path) -> Path:
    d = tmp_path / "src"
    d.mkdir()
    return d


@pytest.fixture
def open_file(src_dir: Path) -> OpenFile:
    """Write a file under an allowed root and open it as the scheduler would."""

    def make(name: str, data: bytes) -> SourceFile:
        path = src_dir / name
        path.write_bytes(data)
        root, _ = locate(str(path), (Root.of(str(src_dir)),))
        return open_source(str(path), root)

    return make


@pytest.fixture
def s3(moto_endpoint: str) -> Any:
    return boto3.client("s3", endpoint_url=moto_endpoint, region_name=REGION, **CREDS)


@pytest.fixture
def bucket(s3: Any) -> str:
    name = f"test-{uuid.uuid4().hex[:16]}"
    s3.create_bucket(Bucket=name)
    return name


@pytest.fixture
async def env(
    tmp_path: Path, beanstalkd_server: Server, redis_server: Server, moto_endpoint: str
) -> AsyncIterator[Env]:
    """Everything one pipeline test needs, isolated from every other test."""
    environment = Env(
        tmp_path=tmp_path,
        beanstalkd=beanstalkd_server.address,
        redis_url=f"redis://{redis_server.address}/0",
        s3_endpoint=moto_endpoint,
        tag=uuid.uuid4().hex[:10],
    )
    environment.redis = aioredis.Redis.from_url(environment.redis_url)
    yield environment
    await environment.close()


@pytest.fixture
def proxy(moto_endpoint: str) -> Iterator[FaultProxy]:
    """The fault proxy in front of moto's S3 (`tests/faultproxy.py`), no rule set."""
    fault_proxy = FaultProxy(moto_endpoint).start()
    yield fault_proxy
    fault_proxy.stop()


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[Daemons]:
    """Daemon subprocesses for a test; whatever still runs at its end is killed."""
    started = Daemons(tmp_path)
    yield started
    started.close()

"""AzureStore against Azurite's blob service over real HTTP, a daemon end to end on it, its
config, and the error translation at its boundary."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from azure.core.exceptions import HttpResponseError, ServiceRequestError
from azure.storage.blob.aio import BlobServiceClient, ContainerClient

from tests.faultproxy import FaultProxy, Rule
from tests.helpers import ChangingSource, Env, OpenFile, wait_until
from uploader.config import settings as config_mod
from uploader.config.stores import AzureStoreConfig
from uploader.dev.servers import AZURITE_ACCOUNT, AZURITE_KEY, azurite_connection_string
from uploader.entries.files import SourceFile
from uploader.errors import (
    ConfigError,
    InfrastructureError,
    PermanentFileError,
    StoreUnavailableError,
    ThrottledError,
    TransientFileError,
)
from uploader.stores import open_store
from uploader.stores.azure import AzureStore, blob_name
from uploader.stores.azureerrors import classify_azure_error
from uploader.stores.base import PutRequest, already_stored

KiB = 1024
PART = 64 * KiB
PUT = frozenset({"PUT"})
THRESHOLD = 256 * KiB  # small, so that a big file stays fast: 64 KiB blocks from 256 KiB up


def make_config(connection: str, container: str, **overrides: Any) -> AzureStoreConfig:
    values: dict[str, Any] = {
        "container": container,
        "connection_string": connection,
        "block_threshold": THRESHOLD,
        "part_size": PART,
        "part_concurrency": 3,
        "timeout": 10.0,
    }
    values.update(overrides)
    return AzureStoreConfig(**values)


@pytest.fixture(autouse=True)
def no_ambient_azure(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AZURE_STORAGE_CONNECTION_STRING", raising=False)


@pytest.fixture
def connection(azurite_endpoint: str) -> str:
    return azurite_connection_string(azurite_endpoint)


@pytest.fixture
async def container(connection: str) -> AsyncIterator[ContainerClient]:
    """A fresh container of the test's own, read back with the official client."""
    async with BlobServiceClient.from_connection_string(connection) as service:
        client = service.get_container_client(f"t{uuid.uuid4().hex[:16]}")
        await client.create_container()
        yield client


@pytest.fixture
async def store(connection: str, container: ContainerClient) -> AsyncIterator[AzureStore]:
    s = AzureStore(make_config(connection, container.container_name), concurrency=4)
    await s.start()
    yield s
    await s.close()


@pytest.fixture
def azurite_proxy(azurite_endpoint: str) -> Iterator[FaultProxy]:
    """The tests' fault proxy in front of Azurite: its keys read `<container>/<blob>`."""
    proxy = FaultProxy(azurite_endpoint).start()
    yield proxy
    proxy.stop()


def md5hex(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def via(proxy: FaultProxy) -> str:
    """The dev account's connection string through the fault proxy."""
    return azurite_connection_string(proxy.endpoint)


async def read_back(container: ContainerClient, name: str) -> tuple[bytes, Any]:
    blob = container.get_blob_client(name)
    data = await (await blob.download_blob()).readall()
    return data, await blob.get_blob_properties()


# -- put and stat --------------------------------------------------------------------------------


async def test_small_put_lands_with_bytes_content_type_metadata_and_md5(
    store: AzureStore, container: ContainerClient, open_file: OpenFile
) -> None:
    data = os.urandom(70_000)
    request = PutRequest("job1/a.txt", "text/plain", {"owner": "42"})
    with open_file("a.txt", data) as source:
        result = await store.put(source, request)
    assert result.bytes_sent == len(data)
    got, props = await read_back(container, "job1/a.txt")
    assert got == data
    assert props.content_settings.content_type == "text/plain"
    assert props.metadata == {"owner": "42"}
    stored = await store.stat("job1/a.txt")
    assert stored is not None
    assert (stored.size, stored.md5, stored.sha256) == (len(data), md5hex(data), None)
    assert await store.stat("job1/absent") is None


async def test_zero_byte_file_is_a_plain_put(
    store: AzureStore, container: ContainerClient, open_file: OpenFile
) -> None:
    with open_file("empty", b"") as source:
        assert (await store.put(source, PutRequest("e/empty", "application/octet-stream"))).bytes_sent == 0
    assert (await read_back(container, "e/empty"))[0] == b""


async def test_big_file_goes_up_as_staged_blocks_and_keeps_its_md5(
    store: AzureStore, container: ContainerClient, open_file: OpenFile
) -> None:
    data = os.urandom(16 * PART + 123)
    with open_file("big", data) as source:
        request = PutRequest("big/file", "application/x-big", {"k": "v"}, checksum=True)
        result = await store.put(source, request)
    assert result.bytes_sent == len(data)
    got, props = await read_back(container, "big/file")
    assert got == data
    assert props.content_settings.content_type == "application/x-big"
    assert props.metadata == {"k": "v", "uploader_sha256": hashlib.sha256(data).hexdigest()}
    committed, uncommitted = await container.get_blob_client("big/file").get_block_list("all")
    assert (len(committed), len(uncommitted)) == (17, 0)
    stored = await store.stat("big/file")
    assert stored is not None
    assert (stored.md5, stored.sha256) == (md5hex(data), hashlib.sha256(data).hexdigest())


async def test_blocks_are_staged_part_concurrency_at_a_time(
    connection: str, container: ContainerClient, azurite_proxy: FaultProxy, open_file: OpenFile
) -> None:
    """Three blocks in flight, held at the proxy, and no fourth sent until one is answered."""
    store = AzureStore(make_config(via(azurite_proxy), container.container_name), concurrency=4)
    key = f"{container.container_name}/held"
    data = os.urandom(10 * PART)
    assert store.memory_needed(len(data)) == 3 * PART
    assert store.memory_needed(THRESHOLD - 1) == THRESHOLD - 1
    await store.start()
    try:
        azurite_proxy.add(Rule("hold", prefix=key, methods=PUT))
        with open_file("held", data) as source:
            task = asyncio.create_task(store.put(source, PutRequest("held", "application/x")))
            await wait_until(lambda: azurite_proxy.waiting == 3, 20, "three blocks held")
            assert azurite_proxy.count(lambda r: r.request.key == key) == 3
            azurite_proxy.release(key)
            assert (await asyncio.wait_for(task, 30)).bytes_sent == len(data)
    finally:
        await store.close()
    assert (await read_back(container, "held"))[0] == data


@pytest.mark.parametrize("hidden", [False, True], ids=["all-held", "one-not-listed"])
async def test_a_commit_refused_as_invalid_block_list_is_mended_and_sent_again(
    connection: str, container: ContainerClient, azurite_proxy: FaultProxy, open_file: OpenFile, hidden: bool
) -> None:
    """Every block acknowledged, the first commit refused: the blocks the service does not list
    are staged again (only those), the commit sent again, the blob whole."""
    store = AzureStore(make_config(via(azurite_proxy), container.container_name), concurrency=4)
    key = f"{container.container_name}/raced"
    data = os.urandom(4 * PART + 5)
    azurite_proxy.add(Rule("invalidblocklist", prefix=key, methods=PUT, query="comp=blocklist", count=1))
    if hidden:
        listing = Rule("hidepart", prefix=key, methods=frozenset({"GET"}), query="comp=blocklist", count=1)
        azurite_proxy.add(listing)
    await store.start()
    try:
        with open_file("raced", data) as source:
            assert (await store.put(source, PutRequest("raced", "application/x"))).bytes_sent == len(data)
    finally:
        await store.close()
    puts = [r for r in azurite_proxy.snapshot() if r.request.key == key and r.request.method == "PUT"]
    commits = [r.status for r in puts if "comp=blocklist" in r.request.query]
    staged = [r for r in puts if "comp=block&" in r.request.query or r.request.query.endswith("comp=block")]
    assert commits == [400, 201]
    assert len(staged) == 5 + hidden
    got, props = await read_back(container, "raced")
    assert got == data and bytes(props.content_settings.content_md5).hex() == md5hex(data)


class BlockingSource(SourceFile):
    """A source that stops before its second block until the test lets it go (never)."""

    __slots__ = ("never", "second")

    def __init__(self, fd: int, path: str, st: os.stat_result) -> None:
        super().__init__(fd, path, st)
        self.second = asyncio.Event()
        self.never = asyncio.Event()

    async def read(self, offset: int, length: int) -> bytes:
        if offset > 0:
            self.second.set()
            await self.never.wait()
        return await super().read(offset, length)


def opened(cls: type[SourceFile], path: Path, data: bytes) -> SourceFile:
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    return cls(fd, str(path), os.fstat(fd))


async def test_a_file_changing_while_its_blocks_go_up_commits_nothing(
    store: AzureStore, src_dir: Path
) -> None:
    source = opened(ChangingSource, src_dir / "grows", os.urandom(6 * PART))
    with source, pytest.raises(TransientFileError, match="changed"):
        await store.put(source, PutRequest("grows", "application/x"))
    assert await store.stat("grows") is None


async def test_a_cancelled_block_upload_commits_nothing_and_leaves_no_task(
    store: AzureStore, src_dir: Path
) -> None:
    before = asyncio.all_tasks()
    with opened(BlockingSource, src_dir / "big", os.urandom(6 * PART)) as source:
        assert isinstance(source, BlockingSource)
        task = asyncio.create_task(store.put(source, PutRequest("cancelled", "application/x")))
        await asyncio.wait_for(source.second.wait(), 20)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert asyncio.all_tasks() == before
    assert await store.stat("cancelled") is None


async def test_prefix_is_applied_to_the_blob_name(
    connection: str, container: ContainerClient, open_file: OpenFile
) -> None:
    store = AzureStore(make_config(connection, container.container_name, prefix="tenant/a"), 2)
    await store.start()
    try:
        with open_file("f", b"payload") as source:
            await store.put(source, PutRequest("job/f", "text/plain"))
        assert (await store.stat("job/f")) is not None
    finally:
        await store.close()
    assert [b.name async for b in container.list_blobs()] == ["tenant/a/job/f"]


@pytest.mark.parametrize("key", ["../x", "a/../b", "/abs", ""])
def test_keys_escaping_the_prefix_are_refused(key: str) -> None:
    with pytest.raises(PermanentFileError):
        blob_name("p/", key)


async def test_metadata_azure_refuses_fails_the_file_before_it_is_read(
    store: AzureStore, container: ContainerClient, open_file: OpenFile
) -> None:
    with open_file("f", b"x") as source, pytest.raises(PermanentFileError, match="not allowed"):
        await store.put(source, PutRequest("m/f", "text/plain", {"has-hyphen": "1"}))
    assert await store.stat("m/f") is None


# -- skip existing, conditional create ----------------------------------------------------------


async def test_conditional_create_refuses_to_overwrite(
    connection: str, container: ContainerClient, open_file: OpenFile
) -> None:
    store = AzureStore(make_config(connection, container.container_name, conditional_put=True), 2)
    assert store.conditional(THRESHOLD - 1) and not store.conditional(THRESHOLD)
    await store.start()
    try:
        with open_file("one", b"first") as source:
            first = await store.put(source, PutRequest("c/k", "text/plain", if_absent=True))
        assert not first.already_present
        with open_file("two", b"second!") as source:
            result = await store.put(source, PutRequest("c/k", "text/plain", if_absent=True))
        assert (result.already_present, result.bytes_sent) == (True, 0)
        with open_file("three", b"third") as source:  # without if_absent it overwrites
            await store.put(source, PutRequest("c/k", "text/plain"))
    finally:
        await store.close()
    assert (await read_back(container, "c/k"))[0] == b"third"


@pytest.mark.parametrize("size", [1000, 5 * PART])  # one Put Blob; staged blocks
async def test_skip_existing_judges_size_and_checksum(
    store: AzureStore, open_file: OpenFile, size: int
) -> None:
    data = os.urandom(size)
    with open_file("orig", data) as source:
        await store.put(source, PutRequest("s/k", "application/x", checksum=True))
    same, other = open_file("same", data), open_file("other", os.urandom(size))
    with same, other:
        assert await already_stored(store, "s/k", same, "same-size")
        assert await already_stored(store, "s/k", same, "same-checksum")
        assert await already_stored(store, "s/k", other, "same-size")
        assert not await already_stored(store, "s/k", other, "same-checksum")
        assert not await already_stored(store, "s/absent", same, "same-size")


# -- integrity, throttling, outages ----------------------------------------------------------


@pytest.mark.parametrize("size", [50_000, 5 * PART])  # the Put Blob's body; one staged block's
async def test_a_byte_flipped_in_flight_is_refused_and_retried_clean(
    connection: str, container: ContainerClient, azurite_proxy: FaultProxy, open_file: OpenFile, size: int
) -> None:
    store = AzureStore(make_config(via(azurite_proxy), container.container_name), 2)
    await store.start()
    data = os.urandom(size)
    try:
        azurite_proxy.add(Rule("corrupt", prefix=f"{container.container_name}/", methods=PUT, count=1))
        with open_file("f", data) as source:
            with pytest.raises(TransientFileError, match="arrived changed"):
                await store.put(source, PutRequest("x/f", "application/x"))
            assert await store.stat("x/f") is None
            await store.put(source, PutRequest("x/f", "application/x"))
    finally:
        await store.close()
    assert (await read_back(container, "x/f"))[0] == data


async def test_503_is_throttling_and_the_sdk_does_not_retry_it(
    connection: str, container: ContainerClient, azurite_proxy: FaultProxy, open_file: OpenFile
) -> None:
    store = AzureStore(make_config(via(azurite_proxy), container.container_name), 2)
    await store.start()
    key = f"{container.container_name}/busy"
    try:
        azurite_proxy.add(Rule("slowdown", prefix=key))
        with open_file("f", b"payload") as source, pytest.raises(ThrottledError):
            await store.put(source, PutRequest("busy", "text/plain"))
    finally:
        await store.close()
    assert azurite_proxy.count(lambda r: r.request.key == key) == 1  # pipeline/retry.py decides, not the SDK


async def test_missing_container_starts_and_its_check_names_it(connection: str, open_file: OpenFile) -> None:
    """Like S3's missing bucket: an outage readiness reports (it may be created in a minute)."""
    missing = f"missing-{uuid.uuid4().hex[:12]}"
    store = AzureStore(make_config(connection, missing), 2)
    with structlog.testing.capture_logs() as logged:
        await store.start()
    assert [(e["event"], e["reason"]) for e in logged] == [
        ("store_unavailable", f"azure: container {missing!r} does not exist (ContainerNotFound, 404)")
    ]
    try:
        with pytest.raises(InfrastructureError, match=missing) as info:
            await store.check()
        source = open_file("f", b"x")
        with source, pytest.raises(StoreUnavailableError, match="ContainerNotFound") as put:
            await store.put(source, PutRequest("f", "text/plain"))
        with pytest.raises(StoreUnavailableError):
            await store.stat("f")
    finally:
        await store.close()
    assert "ContainerNotFound" in str(info.value) and "\n" not in str(info.value)
    assert not put.value.per_key


async def test_wrong_account_key_is_refused_and_never_shown(
    container: ContainerClient, azurite_endpoint: str
) -> None:
    wrong = "V3JvbmdLZXlXcm9uZ0tleVdyb25nS2V5V3JvbmdLZXk="
    connection = azurite_connection_string(azurite_endpoint).replace(AZURITE_KEY, wrong)
    store = AzureStore(make_config(connection, container.container_name), 2)
    await store.start()
    try:
        with pytest.raises(InfrastructureError) as info:
            await store.check()
    finally:
        await store.close()
    assert wrong not in str(info.value) and "\n" not in str(info.value)


async def test_unreachable_endpoint_starts_and_puts_are_transient(open_file: OpenFile) -> None:
    # Nothing listens on port 9 of the loopback: connection refused at once.
    store = AzureStore(make_config(azurite_connection_string("http://127.0.0.1:9"), "uploads"), 1)
    await store.start()
    try:
        with open_file("f", b"payload") as source, pytest.raises(TransientFileError, match="cannot connect"):
            await store.put(source, PutRequest("f", "text/plain"))
        with pytest.raises(TransientFileError):
            await store.stat("f")
    finally:
        await store.close()


async def test_no_credentials_anywhere_is_a_one_line_config_error() -> None:
    store = AzureStore(AzureStoreConfig(container="uploads"), 1, "/etc/uploader.toml")
    with pytest.raises(ConfigError, match="AZURE_STORAGE_CONNECTION_STRING") as info:
        await store.start()
    assert str(info.value).startswith("/etc/uploader.toml: [store.azure]") and "\n" not in str(info.value)


async def test_account_url_without_azure_identity_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "azure.identity.aio", None)  # absent, even where installed
    config = AzureStoreConfig(container="uploads", account_url="https://a.blob.core.windows.net")
    store = AzureStore(config, 1)
    with pytest.raises(ConfigError, match="azure-identity"):
        await store.start()


async def test_a_malformed_connection_string_is_not_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", "s3cr3t-garbage")
    store = AzureStore(AzureStoreConfig(container="uploads"), 1)
    with pytest.raises(ConfigError, match="AZURE_STORAGE_CONNECTION_STRING") as info:
        await store.start()
    assert "s3cr3t" not in str(info.value)


async def test_store_refuses_use_before_start(connection: str) -> None:
    with pytest.raises(RuntimeError):
        await AzureStore(make_config(connection, "uploads"), 1).stat("x")


# -- config ---------------------------------------------------------------------------------------


def parse_store(store: dict[str, Any]) -> config_mod.Config:
    return config_mod.parse({"store": store}, "up.toml")


def test_config_reads_the_azure_table_and_masks_the_connection_string() -> None:
    config = parse_store(
        {"kind": "azure", "azure": {"container": "media", "connection_string": "AccountName=a;AccountKey=k"}}
    )
    assert config.store.azure.container == "media"
    assert config.store.azure.part_concurrency == 4
    shown = config_mod.redacted(config)["store"]["azure"]
    assert shown["connection_string"] == "***"
    assert isinstance(open_store(config.store, 4, "up.toml"), AzureStore)


@pytest.mark.parametrize(
    ("azure", "message"),
    [
        ({"bogus": 1}, "up.toml: [store.azure].bogus is not a known key (value 1)"),
        ({"container": ""}, "up.toml: [store.azure].container must be set when [store].kind is 'azure'"),
        ({"container": "Bad_Name"}, "up.toml: [store.azure].container must be 3-63 of a-z, 0-9 and"),
        ({"part_concurrency": 0}, "up.toml: [store.azure].part_concurrency must be >= 1, got 0"),
        ({"connection_string": "s3cr3t"}, "up.toml: [store.azure].connection_string must be KEY=VALUE"),
        ({"account_url": "ftp://x"}, "up.toml: [store.azure].account_url must be an http(s) URL"),
    ],
)
def test_bad_azure_config_is_one_line_naming_the_key(azure: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_store({"kind": "azure", "azure": azure})
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value) and "s3cr3t" not in str(info.value)


# -- through the daemon ----------------------------------------------------------------------------


def azure_config(env: Env, connection: str, container: str, **upload: Any) -> config_mod.Config:
    data = env.config_data()
    data["store"] = {
        "kind": "azure",
        "azure": {
            "container": container,
            "connection_string": connection,
            "block_threshold": THRESHOLD,
            "part_size": PART,
            "part_concurrency": 2,
        },
    }
    data["upload"].update(upload)
    return config_mod.parse(data, str(env.tmp_path / "uploader.toml"))


@pytest.mark.timeout(60)
async def test_a_job_end_to_end_through_the_daemon(
    env: Env, connection: str, container: ContainerClient
) -> None:
    paths = env.write_files(30, size=2000)
    big = env.uploads / "big.bin"
    big.write_bytes(os.urandom(5 * PART + 7))
    job_id = f"az-{env.tag}"
    big_entry = {"path": str(big), "key": "custom/big", "metadata": {"o": "1"}}
    entries = [str(p) for p in paths] + [json.dumps(big_entry)]
    await env.push_job(job_id, entries)
    async with env.daemon(azure_config(env, connection, container.container_name)):
        state = await env.wait_final(job_id, timeout=45)
    assert state["state"] == "done", (state, await env.failures(job_id))
    assert (state["uploaded"], state["failed"]) == ("31", "0")
    for path in paths:
        got, props = await read_back(container, f"{job_id}/{path.relative_to(env.uploads)}")
        assert got == path.read_bytes()
        assert props.content_settings.content_type == "text/plain"
    got, props = await read_back(container, "custom/big")
    assert got == big.read_bytes() and props.metadata == {"o": "1"}


@pytest.mark.timeout(60)
async def test_the_daemon_resends_a_body_corrupted_on_the_way(
    env: Env, azurite_proxy: FaultProxy, container: ContainerClient
) -> None:
    path = env.uploads / "c.bin"
    path.write_bytes(os.urandom(40_000))
    job_id = f"azc-{env.tag}"
    await env.push_job(job_id, [json.dumps({"path": str(path), "key": "c.bin"})])
    key = f"{container.container_name}/c.bin"
    azurite_proxy.add(Rule("corrupt", prefix=key, methods=PUT, count=1))
    config = azure_config(env, via(azurite_proxy), container.container_name)
    async with env.daemon(config):
        state = await env.wait_final(job_id, timeout=45)
    assert state["state"] == "done", (state, await env.failures(job_id))
    assert azurite_proxy.forwarded(bucket=AZURITE_ACCOUNT)[key] == 2  # corrupted, then clean
    assert (await read_back(container, "c.bin"))[0] == path.read_bytes()


# -- classify_azure_error ----------------------------------------------------------------------


def reply(status: int, code: str, message: str = "msg\nRequestId:1") -> HttpResponseError:
    error = HttpResponseError(message=message)
    error.status_code = status
    error.error_code = code
    return error


@pytest.mark.parametrize(
    ("exc", "kind", "reason"),
    [
        (reply(503, "ServerBusy"), ThrottledError, "azure: ServerBusy (503)"),
        (reply(429, "TooManyRequests"), ThrottledError, "azure: TooManyRequests (429)"),
        (reply(400, "Md5Mismatch", "bad"), TransientFileError, "azure: Md5Mismatch (400): bad (the body"),
        (reply(500, "InternalError"), TransientFileError, "azure: InternalError (500): msg"),
        (reply(400, "InvalidBlockList"), TransientFileError, "azure: InvalidBlockList (400)"),
        (reply(404, "ContainerNotFound"), StoreUnavailableError, "azure: ContainerNotFound (404)"),
        (reply(403, "AuthenticationFailed"), StoreUnavailableError, "azure: AuthenticationFailed (403)"),
        (reply(400, "InvalidMetadata"), PermanentFileError, "azure: InvalidMetadata (400): msg"),
        (ServiceRequestError("boom"), TransientFileError, "azure: ServiceRequestError"),
    ],
)
def test_errors_are_classified(exc: BaseException, kind: type[Exception], reason: str) -> None:
    error = classify_azure_error(exc)
    assert type(error) is kind
    assert error is not None and error.reason.startswith(reason) and "\n" not in error.reason


def test_a_refusal_of_one_path_is_asked_of_the_probe_a_bad_key_is_not() -> None:
    per_key = classify_azure_error(reply(403, "AuthorizationPermissionMismatch"))
    whole = classify_azure_error(reply(403, "AuthenticationFailed"))
    assert isinstance(per_key, StoreUnavailableError) and per_key.per_key
    assert isinstance(whole, StoreUnavailableError) and not whole.per_key


def test_unknown_errors_are_not_translated() -> None:
    assert classify_azure_error(ValueError("x")) is None

"""S3Store against moto's S3 server over real HTTP, and the error translation at its boundary."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from botocore.exceptions import (
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    ReadTimeoutError,
)

from tests.helpers import ChangingSource, OpenFile
from uploader.config.stores import S3StoreConfig
from uploader.config.table import MiB
from uploader.entries.files import SourceFile
from uploader.errors import (
    InfrastructureError,
    PermanentFileError,
    StoreUnavailableError,
    ThrottledError,
    TransientFileError,
)
from uploader.stores.base import PutRequest, StoredObject
from uploader.stores.s3 import S3Store, classify_s3_error, object_name

REGION = "us-east-1"
CREDS = {"aws_access_key_id": "test", "aws_secret_access_key": "test"}



def make_config(endpoint: str, bucket: str, **overrides: Any) -> S3StoreConfig:
    values: dict[str, Any] = {
        "bucket": bucket,
        "region": REGION,
        "endpoint_url": endpoint,
        "access_key_id": "test",
        "secret_access_key": "test",
        "addressing_style": "path",
        "multipart_threshold": 5 * MiB,
        "part_size": 5 * MiB,
        "timeout": 10.0,
    }
    values.update(overrides)
    return S3StoreConfig(**values)


@pytest.fixture
async def store(moto_endpoint: str, bucket: str) -> AsyncIterator[S3Store]:
    s = S3Store(make_config(moto_endpoint, bucket), concurrency=4)
    await s.start()
    yield s
    await s.close()


def uploads_in_progress(s3: Any, bucket: str) -> list[dict[str, Any]]:
    uploads: list[dict[str, Any]] = s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    return uploads


# -- put ---------------------------------------------------------------------------------------


async def test_small_put_lands_with_bytes_content_type_and_metadata(
    store: S3Store, s3: Any, bucket: str, open_file: OpenFile
) -> None:
    data = os.urandom(70_000)
    request = PutRequest(key="job1/a.txt", content_type="text/plain", metadata={"job": "job1"})
    with open_file("a.txt", data) as source:
        result = await store.put(source, request)
    assert result.bytes_sent == len(data)
    got = s3.get_object(Bucket=bucket, Key="job1/a.txt")
    assert got["Body"].read() == data
    assert got["ContentType"] == "text/plain"
    assert got["Metadata"] == {"job": "job1"}


async def test_zero_byte_file_is_a_plain_put(
    store: S3Store, s3: Any, bucket: str, open_file: OpenFile
) -> None:
    with open_file("empty", b"") as source:
        result = await store.put(source, PutRequest("e/empty", "application/octet-stream"))
    assert result.bytes_sent == 0
    assert s3.get_object(Bucket=bucket, Key="e/empty")["Body"].read() == b""


async def test_file_above_threshold_goes_up_in_parts_and_is_completed(
    store: S3Store, s3: Any, bucket: str, open_file: OpenFile
) -> None:
    data = os.urandom(11 * MiB + 123)
    with open_file("big", data) as source:
        result = await store.put(source, PutRequest("big/file", "application/x-big", {"k": "v"}))
    assert result.bytes_sent == len(data)
    got = s3.get_object(Bucket=bucket, Key="big/file")
    assert got["Body"].read() == data
    assert got["ContentType"] == "application/x-big"
    assert got["Metadata"] == {"k": "v"}
    # A multipart object's ETag ends with the number of parts: 5 + 5 + 1 MiB.
    assert got["ETag"].strip('"').endswith("-3")
    assert uploads_in_progress(s3, bucket) == []


async def test_source_changing_mid_multipart_aborts_the_upload(
    store: S3Store, s3: Any, bucket: str, src_dir: Path
) -> None:
    path = src_dir / "grows"
    path.write_bytes(os.urandom(11 * MiB))
    fd = os.open(path, os.O_RDONLY)
    source = ChangingSource(fd, str(path), os.fstat(fd))
    with source, pytest.raises(TransientFileError, match="changed"):
        await store.put(source, PutRequest("grows", "application/octet-stream"))
    assert uploads_in_progress(s3, bucket) == []
    assert await store.stat("grows") is None


class BlockingSource(SourceFile):
    """A source that stops before its second part until the test lets it go."""

    __slots__ = ("never", "second_part")

    def __init__(self, fd: int, path: str, st: os.stat_result) -> None:
        super().__init__(fd, path, st)
        self.second_part = asyncio.Event()
        self.never = asyncio.Event()

    async def read(self, offset: int, length: int) -> bytes:
        if offset > 0:
            self.second_part.set()
            await self.never.wait()
        return await super().read(offset, length)


async def test_cancelled_multipart_upload_is_aborted(
    store: S3Store, s3: Any, bucket: str, src_dir: Path
) -> None:
    path = src_dir / "big"
    path.write_bytes(os.urandom(11 * MiB))
    fd = os.open(path, os.O_RDONLY)
    with BlockingSource(fd, str(path), os.fstat(fd)) as source:
        task = asyncio.create_task(store.put(source, PutRequest("big", "application/x")))
        await source.second_part.wait()
        assert len(uploads_in_progress(s3, bucket)) == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert uploads_in_progress(s3, bucket) == []


async def test_prefix_is_applied_to_the_object_name(
    moto_endpoint: str, s3: Any, bucket: str, open_file: OpenFile
) -> None:
    store = S3Store(make_config(moto_endpoint, bucket, prefix="tenant/a/"), concurrency=2)
    await store.start()
    try:
        with open_file("f", b"payload") as source:
            await store.put(source, PutRequest("job/f", "text/plain"))
        stored = await store.stat("job/f")
        assert stored is not None and stored.size == len(b"payload")
    finally:
        await store.close()
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]]
    assert keys == ["tenant/a/job/f"]


@pytest.mark.parametrize("key", ["../x", "a/../b", "/abs", ""])
async def test_keys_escaping_the_prefix_are_refused(
    store: S3Store, s3: Any, bucket: str, open_file: OpenFile, key: str
) -> None:
    with open_file("f", b"payload") as source, pytest.raises(PermanentFileError):
        await store.put(source, PutRequest(key, "text/plain"))
    assert s3.list_objects_v2(Bucket=bucket).get("KeyCount") == 0


def test_object_name_joins_prefix_and_key() -> None:
    assert object_name("", "a/b") == "a/b"
    assert object_name("p/", "a/b") == "p/a/b"


async def test_put_to_a_deleted_bucket_is_an_outage_of_every_key(
    store: S3Store, s3: Any, bucket: str, open_file: OpenFile
) -> None:
    s3.delete_bucket(Bucket=bucket)
    source = open_file("f", b"payload")
    with source, pytest.raises(StoreUnavailableError, match="NoSuchBucket") as info:
        await store.put(source, PutRequest("f", "text/plain"))
    assert not info.value.per_key


# -- stat, check, start -----------------------------------------------------------------


async def test_stat_reports_present_and_absent_objects(store: S3Store, s3: Any, bucket: str) -> None:
    s3.put_object(Bucket=bucket, Key="present", Body=b"12345")
    # A single-part object's ETag is the MD5 of its content.
    assert await store.stat("present") == StoredObject(5, md5="827ccb0eea8a706c4c34a16891f84e7b")
    assert await store.stat("absent") is None


async def test_check_passes_for_a_reachable_bucket_and_fails_after_it_is_gone(
    store: S3Store, s3: Any, bucket: str
) -> None:
    await store.check()
    s3.delete_bucket(Bucket=bucket)
    with pytest.raises(InfrastructureError, match=bucket):
        await store.check()


async def test_start_with_a_missing_bucket_starts_and_its_check_names_the_bucket(
    moto_endpoint: str,
) -> None:
    """A missing bucket is an outage that readiness reports (it may be created in a minute),
    not a reason to exit."""
    missing = f"missing-{uuid.uuid4().hex[:12]}"
    store = S3Store(make_config(moto_endpoint, missing, secret_access_key="s3cr3t-value"), 2)
    await store.start()
    try:
        with pytest.raises(InfrastructureError, match=missing) as info:
            await store.check()
    finally:
        await store.close()
    assert "s3cr3t-value" not in str(info.value)
    assert "\n" not in str(info.value)


async def test_start_with_an_unreachable_endpoint_returns_and_put_is_transient(
    bucket: str, open_file: OpenFile
) -> None:
    # Nothing listens on port 9 of the loopback: connection refused at once.
    store = S3Store(make_config("http://127.0.0.1:9", bucket), concurrency=1)
    await store.start()
    try:
        with open_file("f", b"payload") as source, pytest.raises(TransientFileError):
            await store.put(source, PutRequest("f", "text/plain"))
        with pytest.raises(TransientFileError):
            await store.stat("f")
    finally:
        await store.close()


async def test_store_refuses_use_before_start(moto_endpoint: str, bucket: str) -> None:
    store = S3Store(make_config(moto_endpoint, bucket), concurrency=1)
    with pytest.raises(RuntimeError):
        await store.stat("x")


# -- classify_s3_error ---------------------------------------------------------------------


def client_error(code: str, status: int, message: str = "msg") -> ClientError:
    return ClientError(
        {
            "Error": {"Code": code, "Message": message},
            "ResponseMetadata": {"HTTPStatusCode": status},
        },
        "PutObject",
    )


@pytest.mark.parametrize(
    ("exc", "kind", "reason"),
    [
        (client_error("SlowDown", 503), ThrottledError, "s3: SlowDown (503)"),
        (client_error("Throttling", 400), ThrottledError, "s3: Throttling (400)"),
        (client_error("TooManyRequests", 429), ThrottledError, "s3: TooManyRequests (429)"),
        (client_error("ServiceUnavailable", 503), ThrottledError, "s3: ServiceUnavailable (503)"),
        (
            client_error("InternalError", 500, "oops"),
            TransientFileError,
            "s3: InternalError (500): oops",
        ),
        (client_error("BadGateway", 502, ""), TransientFileError, "s3: BadGateway (502)"),
        (
            client_error("RequestTimeout", 400, "slow"),
            TransientFileError,
            "s3: RequestTimeout (400): slow",
        ),
        # Refusals that may hold for every key: outages, asked of the store's probe.
        (
            client_error("AccessDenied", 403, "Access Denied"),
            StoreUnavailableError,
            "s3: AccessDenied (403): Access Denied",
        ),
        (
            client_error("NoSuchBucket", 404, "gone"),
            StoreUnavailableError,
            "s3: NoSuchBucket (404): gone",
        ),
        (client_error("ExpiredToken", 400, ""), StoreUnavailableError, "s3: ExpiredToken (400)"),
        (
            client_error("EntityTooLarge", 400, "too\nbig"),
            PermanentFileError,
            "s3: EntityTooLarge (400): too big",
        ),
    ],
)
def test_client_errors_are_classified(exc: ClientError, kind: type[Exception], reason: str) -> None:
    error = classify_s3_error(exc)
    assert type(error) is kind
    assert error is not None
    assert error.reason == reason


@pytest.mark.parametrize(
    "exc",
    [
        EndpointConnectionError(endpoint_url="http://127.0.0.1:9"),
        ReadTimeoutError(endpoint_url="http://127.0.0.1:9"),
        ConnectTimeoutError(endpoint_url="http://127.0.0.1:9"),
        aiohttp.ServerDisconnectedError(),
        TimeoutError(),
        ConnectionResetError(104, "Connection reset by peer"),
    ],
)
def test_network_errors_are_transient(exc: BaseException) -> None:
    error = classify_s3_error(exc)
    assert type(error) is TransientFileError


def test_missing_credentials_are_an_outage_not_a_bad_file() -> None:
    """Credentials gone at run time (an expired role, a rotated file) fail every key alike."""
    assert type(classify_s3_error(NoCredentialsError())) is StoreUnavailableError


def test_unknown_errors_and_cancellation_are_not_translated() -> None:
    assert classify_s3_error(ValueError("x")) is None
    assert classify_s3_error(asyncio.CancelledError()) is None

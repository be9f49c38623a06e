"""The lean single-part PUT: its signer against botocore's, and real round trips through moto
and through `rclone serve s3`, which checks every signature."""

from __future__ import annotations

import datetime
import hashlib
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials as BotoCredentials
from botocore.exceptions import ClientError

from tests.rclones3 import RCLONE_KEY, RCLONE_SECRET, RcloneS3
from uploader.config.stores import S3StoreConfig
from uploader.entries.files import Root, open_source
from uploader.errors import PermanentFileError, StoreUnavailableError, ThrottledError
from uploader.stores.base import PutRequest, PutResult
from uploader.stores.s3 import S3Store, classify_s3_error
from uploader.stores.s3lean import Credentials, LeanPut, Signer, UseBotocore, check_reply, host_of, object_url

REGION = "us-east-1"


# --- the signer, byte for byte against botocore's ---------------------------------------------


@pytest.mark.parametrize(
    ("url", "headers", "token"),
    [
        ("http://127.0.0.1:9000/bucket/job/a.txt", {"Content-Type": "text/plain"}, None),
        (
            "https://bucket.s3.amazonaws.com/" + "dir/with%20space/%C3%A9t%C3%A9%2Bplus.jpg",
            {"Content-Type": "image/jpeg", "x-amz-meta-Owner": "42", "x-amz-meta-note": " two  spaces "},
            "session/token+x==",
        ),
        ("http://localhost:4566/b/k", {"Content-Type": "application/octet-stream"}, None),
        (
            "http://127.0.0.1:9000/bucket/a.css.gz",
            {
                "Content-Type": "text/css", "Content-MD5": "XUFAKrxLKna5cZ2REBfFkg==",
                "Content-Encoding": "gzip", "Cache-Control": "public,  max-age=60",
                "Content-Disposition": 'attachment; filename="a.css"', "x-amz-acl": "public-read",
                "x-amz-storage-class": "STANDARD_IA", "x-amz-tagging": "team=a%20b&tier=hot",
                "x-amz-server-side-encryption": "aws:kms",
                "x-amz-server-side-encryption-aws-kms-key-id": "alias/k",
            },
            None,
        ),
    ],
)
def test_signature_matches_botocores(url: str, headers: dict[str, str], token: str | None) -> None:
    body = b"some bytes\n" * 100
    payload = hashlib.sha256(body).hexdigest()
    request = AWSRequest(method="PUT", url=url, data=body, headers=dict(headers))
    request.headers["X-Amz-Content-SHA256"] = payload  # as the lean path always signs the payload
    S3SigV4Auth(BotoCredentials("AKIDEXAMPLE", "secret/key+x", token), "s3", REGION).add_auth(request)
    when = datetime.datetime.strptime(request.headers["X-Amz-Date"], "%Y%m%dT%H%M%SZ")

    ours = Signer(REGION).sign(
        "PUT", url, headers, payload, Credentials("AKIDEXAMPLE", "secret/key+x", token), when
    )

    assert ours["Authorization"] == request.headers["Authorization"]
    assert ours["Host"] == host_of(url)


def test_signing_key_follows_the_day_and_the_secret() -> None:
    signer = Signer(REGION)
    day1 = datetime.datetime(2026, 1, 1, 23, 59, 59)
    day2 = datetime.datetime(2026, 1, 2, 0, 0, 1)
    creds = Credentials("AK", "one")
    a = signer.sign("PUT", "http://h/b/k", {}, "0" * 64, creds, day1)["Authorization"]
    b = signer.sign("PUT", "http://h/b/k", {}, "0" * 64, creds, day2)["Authorization"]
    c = signer.sign("PUT", "http://h/b/k", {}, "0" * 64, Credentials("AK", "two"), day2)["Authorization"]
    assert len({a, b, c}) == 3
    assert Signer(REGION).sign("PUT", "http://h/b/k", {}, "0" * 64, creds, day1)["Authorization"] == a


def test_keys_are_encoded_as_botocore_sends_them() -> None:
    assert object_url("http://h/b/", "a b/c+d~e/é") == "http://h/b/a%20b/c%2Bd~e/%C3%A9"
    assert host_of("https://h.example:443/x") == "h.example"
    assert host_of("http://127.0.0.1:9000/x") == "127.0.0.1:9000"


# --- replies ----------------------------------------------------------------------------------


def test_an_error_reply_becomes_the_same_clienterror_botocore_would_raise() -> None:
    body = b"<?xml version='1.0'?><Error><Code>SlowDown</Code><Message>Reduce your rate</Message></Error>"
    with pytest.raises(ClientError) as caught:
        check_reply(503, body)
    assert caught.value.response["Error"] == {"Code": "SlowDown", "Message": "Reduce your rate"}
    assert isinstance(classify_s3_error(caught.value), ThrottledError)


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (301, b"<Error><Code>PermanentRedirect</Code></Error>"),
        (307, b""),
        (400, b"<Error><Code>AuthorizationHeaderMalformed</Code><Message>region</Message></Error>"),
    ],
)
def test_redirects_and_region_mismatches_are_left_to_botocore(status: int, body: bytes) -> None:
    with pytest.raises(UseBotocore):
        check_reply(status, body)


def test_an_empty_error_reply_is_classified_by_its_status() -> None:
    with pytest.raises(ClientError) as caught:
        check_reply(403, b"")
    refused = classify_s3_error(caught.value)
    assert isinstance(refused, StoreUnavailableError) and refused.per_key  # the probe decides
    with pytest.raises(ClientError) as caught:
        check_reply(400, b"")
    assert isinstance(classify_s3_error(caught.value), PermanentFileError)


# --- round trips --------------------------------------------------------------------------------


async def _put_and_read(store: S3Store, tmp_path: Path, client: Any, bucket: str, key: str) -> dict[str, Any]:
    root = tmp_path / "src"
    root.mkdir(exist_ok=True)
    path = root / "f.bin"
    path.write_bytes(b"lean body " * 300)
    with open_source(str(path), Root.of(str(root))) as source:
        result = await store.put(
            source, PutRequest(key=key, content_type="image/png", metadata={"owner": "42"})
        )
    assert result.bytes_sent == 3000
    got: dict[str, Any] = client.get_object(Bucket=bucket, Key=key)
    assert got["Body"].read() == b"lean body " * 300
    return got


async def test_a_small_put_goes_the_lean_way_and_lands_whole_in_moto(
    moto_endpoint: str, bucket: str, s3: Any, tmp_path: Path
) -> None:
    config = S3StoreConfig(
        bucket=bucket,
        region=REGION,
        endpoint_url=moto_endpoint,
        access_key_id="test",
        secret_access_key="test",
        addressing_style="path",
    )
    store = S3Store(config, concurrency=4)
    await store.start()
    try:
        assert store._lean is not None
        key = "job 1/é+x.png"
        got = await _put_and_read(store, tmp_path, s3, bucket, key)
        assert got["ContentType"] == "image/png"
        assert got["Metadata"] == {"owner": "42"}
    finally:
        await store.close()


async def test_a_body_over_a_mebibyte_goes_the_lean_way_without_a_warning(
    moto_endpoint: str, bucket: str, s3: Any, tmp_path: Path
) -> None:
    """aiohttp warns (ResourceWarning, an error under this suite's filters) for a bytes body
    over 1 MiB; the lean path silences that one warning and sends the bytes as they are."""
    config = S3StoreConfig(
        bucket=bucket, region=REGION, endpoint_url=moto_endpoint, access_key_id="test",
        secret_access_key="test", addressing_style="path",
    )
    store = S3Store(config, concurrency=2)
    await store.start()
    data = os.urandom(3 << 20)
    (tmp_path / "big").write_bytes(data)
    try:
        assert store._lean is not None
        with open_source(str(tmp_path / "big"), Root.of(str(tmp_path))) as source:
            await store.put(source, PutRequest("big/one", "image/png"))
        assert store._lean is not None
    finally:
        await store.close()
    got = s3.get_object(Bucket=bucket, Key="big/one")
    assert (got["ContentType"], got["Body"].read() == data) == ("image/png", True)


async def test_a_conditional_put_goes_the_lean_way_and_never_overwrites(
    moto_endpoint: str, bucket: str, s3: Any, tmp_path: Path
) -> None:
    config = S3StoreConfig(
        bucket=bucket, region=REGION, endpoint_url=moto_endpoint, access_key_id="test",
        secret_access_key="test", addressing_style="path", conditional_put=True,
    )
    store = S3Store(config, concurrency=4)
    await store.start()
    try:
        assert store._lean is not None
        request = PutRequest("cond/k", "text/plain", if_absent=True)
        for name, body, expected in ((b"a", b"first", PutResult(5)),
                                     (b"b", b"second!", PutResult(0, already_present=True))):
            path = tmp_path / name.decode()
            path.write_bytes(body)
            with open_source(str(path), Root.of(str(tmp_path))) as source:
                assert await store.put(source, request) == expected
        assert store._lean is not None, "the lean path gave up on a conditional put"
        assert s3.get_object(Bucket=bucket, Key="cond/k")["Body"].read() == b"first"
        with pytest.raises(ClientError) as refused:
            await store._lean.put("cond/k", b"third", "text/plain", {}, if_absent=True)
        assert refused.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
    finally:
        await store.close()


async def test_a_put_to_a_missing_bucket_is_an_outage(moto_endpoint: str) -> None:
    lean = LeanPut(
        f"{moto_endpoint}/no-such-{uuid.uuid4().hex[:8]}/", REGION, _static("test", "test"), 2, 10.0
    )
    await lean.start()
    try:
        with pytest.raises(ClientError) as caught:
            await lean.put("k", b"x", "text/plain", {})
    finally:
        await lean.close()
    error = classify_s3_error(caught.value)
    assert isinstance(error, StoreUnavailableError) and not error.per_key
    assert "NoSuchBucket" in error.reason


def _static(access: str, secret: str) -> Any:
    async def credentials() -> Credentials | None:
        return Credentials(access, secret)

    return credentials


# --- against rclone serve s3, which verifies signatures ----------------------------------------

@pytest.fixture(scope="module")
def rclone_endpoint(rclone_s3: RcloneS3) -> tuple[str, str]:
    return rclone_s3.endpoint, rclone_s3.bucket("lean")


@pytest.fixture
async def rclone_store(
    rclone_endpoint: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[S3Store]:
    endpoint, bucket = rclone_endpoint
    # Credentials from the environment: the lean path must find them through botocore's chain.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", RCLONE_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", RCLONE_SECRET)
    store = S3Store(
        S3StoreConfig(bucket=bucket, region=REGION, endpoint_url=endpoint, addressing_style="path"),
        concurrency=4,
    )
    await store.start()
    yield store
    await store.close()


def _boto(endpoint: str) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id=RCLONE_KEY,
        aws_secret_access_key=RCLONE_SECRET,
    )


async def test_rclone_accepts_the_lean_signature_with_credentials_from_the_environment(
    rclone_store: S3Store, rclone_endpoint: tuple[str, str], tmp_path: Path
) -> None:
    endpoint, bucket = rclone_endpoint
    assert rclone_store._lean is not None
    got = await _put_and_read(rclone_store, tmp_path, _boto(endpoint), bucket, "dir one/é+x.png")
    assert got["ContentType"] == "image/png"


async def test_rclone_accepts_the_lean_signature_over_every_object_option(
    rclone_endpoint: tuple[str, str], tmp_path: Path
) -> None:
    """The options are signed headers: a server that checks signatures takes them all."""
    endpoint, bucket = rclone_endpoint
    config = S3StoreConfig(
        bucket=bucket, region=REGION, endpoint_url=endpoint, access_key_id=RCLONE_KEY,
        secret_access_key=RCLONE_SECRET, addressing_style="path", storage_class="STANDARD",
        cache_control="public, max-age=60", content_disposition="attachment",
        tagging=(("team", "a b"), ("path", "x/y@z")),
    )
    store = S3Store(config, concurrency=2)
    await store.start()
    try:
        assert store._lean is not None
        (tmp_path / "a.css.gz").write_bytes(b"body")
        with open_source(str(tmp_path / "a.css.gz"), Root.of(str(tmp_path))) as source:
            await store.put(source, PutRequest("opts/a.css.gz", "text/css", content_encoding="gzip"))
        assert store._lean is not None
    finally:
        await store.close()
    got = _boto(endpoint).head_object(Bucket=bucket, Key="opts/a.css.gz")
    assert (got["ContentType"], got["ContentLength"]) == ("text/css", 4)


async def test_rclone_refuses_a_wrong_secret_and_that_is_an_outage(rclone_endpoint: tuple[str, str]) -> None:
    """Wrong credentials fail no file: the store is unusable for every key until they are fixed."""
    endpoint, bucket = rclone_endpoint
    lean = LeanPut(f"{endpoint}/{bucket}/", REGION, _static(RCLONE_KEY, "not-the-secret"), 2, 10.0)
    await lean.start()
    try:
        with pytest.raises(ClientError) as caught:
            await lean.put("k", b"x", "text/plain", {})
    finally:
        await lean.close()
    assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    error = classify_s3_error(caught.value)
    assert isinstance(error, StoreUnavailableError) and not error.per_key

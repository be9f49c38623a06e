"""Every byte S3 stores is verified: each PutObject and UploadPart carries its Content-MD5, on
the lean path and through aioboto3, and a body changed on the way (the fault proxy's `corrupt`
flips one byte) is refused by the server (BadDigest), retried, and lands intact.

Against `rclone serve s3` (tests/rclones3.py): moto verifies no checksum at all."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.faultproxy import FaultProxy, Rule
from tests.helpers import Env
from tests.rclones3 import RCLONE_KEY, RCLONE_SECRET, RcloneS3
from uploader.config import settings as config_mod
from uploader.config.settings import RetryConfig
from uploader.config.stores import S3StoreConfig
from uploader.config.table import MiB
from uploader.entries.files import Root, open_source
from uploader.errors import TransientFileError
from uploader.pipeline.retry import RetryPolicy
from uploader.stores.base import PutRequest, PutResult
from uploader.stores.s3 import S3Store
from uploader.stores.s3errors import DIGEST_CODES, classify_s3_error
from uploader.stores.s3lean import error_from_reply

BUCKET = "integrity"


@pytest.fixture
def rclone_proxy(rclone_s3: RcloneS3) -> Iterator[FaultProxy]:
    rclone_s3.bucket(BUCKET)
    proxy = FaultProxy(rclone_s3.endpoint).start()
    yield proxy
    proxy.stop()


async def _store(proxy: FaultProxy, lean: bool) -> S3Store:
    config = S3StoreConfig(
        bucket=BUCKET, region="us-east-1", endpoint_url=proxy.endpoint, access_key_id=RCLONE_KEY,
        secret_access_key=RCLONE_SECRET, addressing_style="path", multipart_threshold=5 * MiB,
        part_size=5 * MiB, part_concurrency=2, timeout=10.0,
    )
    store = S3Store(config, concurrency=4)
    await store.start()
    if not lean:
        off, store._lean = store._lean, None
        assert off is not None
        await off.close()
    return store


@pytest.fixture(params=["lean", "aioboto3"])
async def store(request: pytest.FixtureRequest, rclone_proxy: FaultProxy) -> AsyncIterator[S3Store]:
    s = await _store(rclone_proxy, lean=request.param == "lean")
    yield s
    await s.close()


async def _put_with_retries(store: S3Store, path: Path, key: str) -> tuple[PutResult | None, int]:
    policy = RetryPolicy(RetryConfig(max_attempts=3, base=0.0, cap=0.0))
    errors: list[str] = []

    async def attempt() -> PutResult:
        with open_source(str(path), Root.of(str(path.parent))) as source:
            return await store.put(source, PutRequest(key, "application/octet-stream"))

    result, attempts = await policy.run(attempt, lambda error, n, delay: errors.append(error.reason))
    assert attempts.error is None, attempts.error
    assert len(errors) == attempts.attempts - 1 and all("BadDigest" in e for e in errors), errors
    return result, attempts.attempts


async def test_a_single_put_damaged_on_the_way_is_refused_retried_and_lands_intact(
    store: S3Store, rclone_proxy: FaultProxy, rclone_s3: RcloneS3, tmp_path: Path
) -> None:
    data = os.urandom(200_000)
    path = tmp_path / "one.bin"
    path.write_bytes(data)
    rclone_proxy.add(Rule("corrupt", prefix="single/", methods=frozenset({"PUT"}), per_key=1))

    result, attempts = await _put_with_retries(store, path, "single/one.bin")

    assert result == PutResult(len(data)) and attempts == 2
    puts = [r for r in rclone_proxy.snapshot() if r.request.method == "PUT"]
    assert [(r.fault, r.status) for r in puts] == [("corrupt", 400), (None, 200)]
    assert rclone_s3.client().get_object(Bucket=BUCKET, Key="single/one.bin")["Body"].read() == data


async def test_a_part_damaged_on_the_way_is_refused_and_the_upload_retried_whole(
    store: S3Store, rclone_proxy: FaultProxy, rclone_s3: RcloneS3, tmp_path: Path
) -> None:
    data = os.urandom(11 * MiB + 5)
    path = tmp_path / "big.bin"
    path.write_bytes(data)
    rclone_proxy.add(Rule("corrupt", prefix="multi/", parts_only=True, count=1))

    result, attempts = await _put_with_retries(store, path, "multi/big.bin")

    assert result == PutResult(len(data)) and attempts == 2
    damaged = [r for r in rclone_proxy.snapshot() if r.fault == "corrupt"]
    assert len(damaged) == 1 and damaged[0].request.is_part and damaged[0].status == 400
    aborted = [r for r in rclone_proxy.snapshot() if r.request.method == "DELETE"]
    assert len(aborted) == 1  # the failed attempt's upload, aborted
    got: Any = rclone_s3.client().get_object(Bucket=BUCKET, Key="multi/big.bin")
    assert got["Body"].read() == data


@pytest.mark.parametrize("code", sorted(DIGEST_CODES))
def test_a_digest_mismatch_is_transient_on_either_path(code: str) -> None:
    error = classify_s3_error(error_from_reply(400, f"<Error><Code>{code}</Code></Error>".encode()))
    assert type(error) is TransientFileError and code in error.reason


@pytest.mark.timeout(180)
async def test_a_200_mib_file_whose_completion_is_refused_is_stored_whole_and_counted_once(
    env: Env, rclone_proxy: FaultProxy, rclone_s3: RcloneS3
) -> None:
    # Ceph RGW's race, end to end: every part answered 200, the first completion refused
    # with InvalidPart. The file is neither failed nor sent twice.
    big = env.uploads / "big.bin"
    digest = hashlib.sha256()
    with big.open("wb") as out:
        for _ in range(200):
            chunk = os.urandom(MiB)
            digest.update(chunk)
            out.write(chunk)
    job_id = f"race-{env.tag}"
    await env.push_job(job_id, [json.dumps({"path": str(big), "key": "race/big.bin"})])
    rclone_proxy.add(Rule("invalidpart", methods=frozenset({"POST"}), query="uploadId=", count=1))
    data = env.config_data("s3", BUCKET)
    data["store"]["s3"].update(
        endpoint_url=rclone_proxy.endpoint, access_key_id=RCLONE_KEY, secret_access_key=RCLONE_SECRET
    )
    async with env.daemon(config_mod.parse(data, str(env.tmp_path / "uploader.toml"))):
        state = await env.wait_final(job_id, timeout=150)
    assert state["state"] == "done", (state, await env.failures(job_id))
    assert (state["uploaded"], state["failed"]) == ("1", "0")
    posts = [r for r in rclone_proxy.snapshot() if r.request.method == "POST"]
    completions = [r.status for r in posts if "uploadId" in r.request.query]
    assert completions.count(400) == 1 and completions[-1] == 200
    stored = hashlib.sha256()
    body = rclone_s3.client().get_object(Bucket=BUCKET, Key="race/big.bin")["Body"]
    for chunk in iter(lambda: body.read(MiB), b""):
        stored.update(chunk)
    assert stored.hexdigest() == digest.hexdigest()

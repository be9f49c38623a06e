"""[upload] skip_existing: never, same-size, same-checksum, and S3's conditional put."""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import structlog

from tests.helpers import Env, StoreWrapper
from uploader.config.table import MiB
from uploader.entries.files import SourceFile
from uploader.stores.base import SHA256_META, PutRequest, PutResult, Store, StoredObject, already_stored
from uploader.stores.local import LocalStore
from uploader.stores.s3 import S3Store


class CountingStore(StoreWrapper):
    """A real store that counts the requests the scheduler makes of it."""

    def __init__(self, inner: Store) -> None:
        super().__init__(inner)
        self.calls: Counter[str] = Counter()

    async def put(self, source: SourceFile, request: PutRequest) -> PutResult:
        self.calls["put"] += 1
        return await self.inner.put(source, request)

    async def stat(self, key: str, checksum: bool = False) -> StoredObject | None:
        self.calls["stat"] += 1
        return await self.inner.stat(key, checksum)


def five_files(env: Env) -> list[Path]:
    paths = []
    for i in range(5):
        path = env.uploads / f"f{i}.bin"
        path.write_bytes(f"content {i} ".encode() * 50)
        paths.append(path)
    return paths


def entries(paths: list[Path]) -> list[str]:
    """Explicit keys, so that a second job writes to the first one's objects."""
    return [json.dumps({"path": str(p), "key": f"same/{p.name}"}) for p in paths]


def config_for(env: Env, kind: str, bucket: str, skip: str, conditional: bool = False) -> Any:
    config = env.config(kind, bucket, upload={"skip_existing": skip})
    s3 = replace(config.store.s3, conditional_put=conditional)
    return replace(config, store=replace(config.store, s3=s3))


def real_store(config: Any) -> Store:
    if config.store.kind == "s3":
        return S3Store(config.store.s3, config.upload.concurrency)
    return LocalStore(config.store.local)


MODES = [
    ("never", False, 5, 0),
    ("same-size", False, 1, 5),  # a same-size change goes unnoticed
    ("same-checksum", False, 2, 5),
]
CONDITIONAL = ("same-size", True, 0, 0)  # any existing object counts: no HEAD, one PUT each


@pytest.mark.parametrize(
    ("kind", "skip", "conditional", "uploaded", "stats"),
    [("local", *m) for m in MODES] + [("s3", *m) for m in [*MODES, CONDITIONAL]],
)
async def test_a_second_job_over_the_same_keys(
    env: Env, bucket: str, kind: str, skip: str, conditional: bool, uploaded: int, stats: int
) -> None:
    paths = five_files(env)
    async with env.daemon(config_for(env, kind, bucket, "never")):
        await env.push_job("first", entries(paths))
        assert (await env.wait_final("first"))["uploaded"] == "5"
    paths[1].write_bytes(paths[1].read_bytes().replace(b"content", b"CONTENT"))  # same size
    paths[2].write_bytes(b"longer " + paths[2].read_bytes())
    config = config_for(env, kind, bucket, skip, conditional)
    store = CountingStore(real_store(config))
    async with env.daemon(config, store=store):
        await env.push_job("second", entries(paths))
        state = await env.wait_final("second")
    counts = (state["state"], state.get("uploaded", "0"), state.get("skipped", "0"))
    assert counts == ("done", str(uploaded), str(5 - uploaded))
    assert store.calls["stat"] == stats
    assert store.calls["put"] == (5 if conditional else uploaded)


@pytest.fixture
async def s3_store(env: Env, bucket: str) -> Any:
    config = env.config("s3", bucket).store.s3
    store = S3Store(replace(config, multipart_threshold=5 * MiB, part_size=5 * MiB, conditional_put=True), 4)
    await store.start()
    yield store
    await store.close()


async def test_s3_conditional_put_creates_only_when_absent(s3_store: S3Store, open_file: Any, s3: Any,
                                                            bucket: str) -> None:
    request = PutRequest("c/k", "text/plain", if_absent=True)
    with open_file("a", b"first") as source:
        assert await s3_store.put(source, request) == PutResult(5)
    with open_file("b", b"second!") as source:
        assert await s3_store.put(source, request) == PutResult(0, already_present=True)
        assert (await s3_store.put(source, replace(request, if_absent=False))).bytes_sent == 7
    assert s3.get_object(Bucket=bucket, Key="c/k")["Body"].read() == b"second!"
    assert s3_store.conditional(5 * MiB - 1) and not s3_store.conditional(5 * MiB)


async def test_s3_multipart_objects_compare_by_stored_sha256_or_else_by_size(
    s3_store: S3Store, open_file: Any
) -> None:
    size = 5 * MiB + 10
    data = os.urandom(size)
    with open_file("big", data) as source:
        await s3_store.put(source, PutRequest("m/with", "application/octet-stream", checksum=True))
        await s3_store.put(source, PutRequest("m/without", "application/octet-stream"))
    with_sum = await s3_store.stat("m/with")
    assert with_sum is not None and with_sum.md5 is None  # a multipart ETag is no MD5
    assert with_sum.sha256 is not None
    changed = bytes([data[0] ^ 1]) + data[1:]
    with open_file("same", data) as same, open_file("changed", changed) as other:
        assert await already_stored(s3_store, "m/with", same, "same-checksum")
        assert not await already_stored(s3_store, "m/with", other, "same-checksum")
        with structlog.testing.capture_logs() as logs:
            assert await already_stored(s3_store, "m/without", other, "same-checksum")
    assert [e["event"] for e in logs] == ["skip_existing_size_only"]


async def test_single_part_uploads_in_checksum_mode_carry_their_sha256(
    s3_store: S3Store, open_file: Any, s3: Any, bucket: str
) -> None:
    with open_file("a", b"hello") as source:
        await s3_store.put(source, PutRequest("s/a", "text/plain", {"owner": "1"}, checksum=True))
    head = s3.head_object(Bucket=bucket, Key="s/a")
    sha = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
    assert head["Metadata"] == {"owner": "1", SHA256_META: sha}
    assert await s3_store.stat("s/a") == StoredObject(5, md5="5d41402abc4b2a76b9719d911017c592", sha256=sha)


async def test_local_store_compares_content_only_when_asked(env: Env, open_file: Any) -> None:
    store = LocalStore(env.config().store.local)
    await store.start()
    try:
        with open_file("a", b"12345") as source:
            await store.put(source, PutRequest("x/a", "text/plain"))
        with open_file("b", b"54321") as other:
            assert await already_stored(store, "x/a", other, "same-size")
            assert not await already_stored(store, "x/a", other, "same-checksum")
            assert not await already_stored(store, "x/absent", other, "same-size")
            assert not await already_stored(store, "x/a", other, "never")
    finally:
        await store.close()

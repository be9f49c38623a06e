"""A big file's parts go up `part_concurrency` at a time, within the memory the store asked for,
and one failing part stops the rest and aborts the upload."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qs

import pytest

from tests.faultproxy import FaultProxy, Record, Rule
from tests.helpers import OpenFile
from tests.stores.test_store_s3 import make_config, uploads_in_progress
from uploader.config.table import MiB
from uploader.errors import ThrottledError, TransientFileError
from uploader.stores.base import PutRequest
from uploader.stores.s3 import S3Store


@pytest.fixture
async def proxied(proxy: FaultProxy, bucket: str) -> AsyncIterator[S3Store]:
    store = S3Store(make_config(proxy.endpoint, bucket, part_concurrency=4), concurrency=2)
    await store.start()
    yield store
    await store.close()


def most_at_once(records: list[Record]) -> int:
    """The most requests in flight at one moment, from when the proxy got each and answered it."""
    events = sorted(
        [(r.started, 1) for r in records if r.ended is not None]
        + [(r.ended, -1) for r in records if r.ended is not None]
    )
    now = most = 0
    for _, step in events:  # at equal times an end (-1) sorts before a start: no false overlap
        now += step
        most = max(most, now)
    return most


def completions(proxy: FaultProxy) -> list[Record]:
    """The CompleteMultipartUpload requests the proxy saw (a POST naming an upload)."""
    return [r for r in proxy.snapshot() if r.request.method == "POST" and "uploadId=" in r.request.query]


async def test_parts_overlap_up_to_part_concurrency_and_the_bytes_arrive_whole(
    proxied: S3Store, proxy: FaultProxy, s3: Any, bucket: str, open_file: OpenFile
) -> None:
    data = os.urandom(40 * MiB)
    # Each part held 0.3 s at the proxy: parts sent one by one could never overlap.
    proxy.add(Rule("delay", parts_only=True, delay=0.3))
    with open_file("big", data) as source:
        await proxied.put(source, PutRequest("p/big", "application/octet-stream"))
    parts = [r for r in proxy.snapshot() if r.request.is_part]
    assert len(parts) == 8 and all(r.status == 200 for r in parts)
    assert 2 <= most_at_once(parts) <= 4
    assert s3.get_object(Bucket=bucket, Key="p/big")["Body"].read() == data
    assert uploads_in_progress(s3, bucket) == []


async def test_a_failing_part_stops_the_others_and_the_upload_is_aborted(
    proxied: S3Store, proxy: FaultProxy, s3: Any, bucket: str, open_file: OpenFile
) -> None:
    # The first part to arrive is answered 503 SlowDown (a reset would be re-sent by aiohttp
    # itself, on a fresh connection, and succeed).
    proxy.add(Rule("slowdown", parts_only=True, count=1))
    with open_file("big", os.urandom(21 * MiB)) as source, pytest.raises(ThrottledError):
        await proxied.put(source, PutRequest("p/fails", "application/octet-stream"))
    assert uploads_in_progress(s3, bucket) == []
    assert await proxied.stat("p/fails") is None


async def test_an_abort_that_is_refused_is_sent_again_until_the_upload_is_gone(
    proxied: S3Store, proxy: FaultProxy, s3: Any, bucket: str, open_file: OpenFile
) -> None:
    # A part fails, then S3 refuses the first abort (as moto does, 500, when a part still lands).
    proxy.add(Rule("slowdown", parts_only=True, count=1))
    proxy.add(Rule("slowdown", methods=frozenset({"DELETE"}), count=1))
    with open_file("big", os.urandom(21 * MiB)) as source, pytest.raises(ThrottledError):
        await proxied.put(source, PutRequest("p/refused", "application/octet-stream"))
    aborts = [r.status for r in proxy.snapshot() if r.request.method == "DELETE"]
    assert aborts == [503, 204]
    assert uploads_in_progress(s3, bucket) == []


def test_memory_needed_is_a_part_for_each_part_in_flight(moto_endpoint: str) -> None:
    store = S3Store(make_config(moto_endpoint, "b", part_concurrency=4), concurrency=1)
    assert store.memory_needed(4 * MiB) == 4 * MiB  # below the threshold: the whole body
    assert store.memory_needed(40 * MiB) == 4 * 5 * MiB
    assert store.memory_needed(6 * MiB) == 2 * 5 * MiB  # two parts: never more than two in flight
    one = S3Store(make_config(moto_endpoint, "b", part_concurrency=1), concurrency=1)
    assert one.memory_needed(40 * MiB) == 5 * MiB


async def test_a_completion_refused_as_invalid_part_is_checked_and_sent_again(
    proxied: S3Store, proxy: FaultProxy, s3: Any, bucket: str, open_file: OpenFile
) -> None:
    # Every part was answered 200, then the completion meets a part the server has not
    # recorded yet (Ceph RGW: "total parts mismatch"): not the file's fault.
    data = os.urandom(21 * MiB)
    proxy.add(Rule("invalidpart", methods=frozenset({"POST"}), query="uploadId=", count=1))
    with open_file("big", data) as source:
        await proxied.put(source, PutRequest("p/raced", "application/octet-stream"))
    assert [r.status for r in completions(proxy)] == [400, 200]
    assert sum(1 for r in proxy.snapshot() if r.request.is_part) == 5  # no part sent twice
    assert s3.get_object(Bucket=bucket, Key="p/raced")["Body"].read() == data
    assert uploads_in_progress(s3, bucket) == []


async def test_a_part_the_server_does_not_list_is_sent_again_before_the_next_completion(
    proxied: S3Store, proxy: FaultProxy, s3: Any, bucket: str, open_file: OpenFile
) -> None:
    data = os.urandom(21 * MiB)
    proxy.add(Rule("invalidpart", methods=frozenset({"POST"}), query="uploadId=", count=1))
    proxy.add(Rule("hidepart", methods=frozenset({"GET"}), query="uploadId=", count=1))
    with open_file("big", data) as source:
        await proxied.put(source, PutRequest("p/hidden", "application/octet-stream"))
    sent = [r.request.query for r in proxy.snapshot() if r.request.is_part]
    numbers = Counter(parse_qs(query)["partNumber"][0] for query in sent)
    assert numbers == {"1": 2, "2": 1, "3": 1, "4": 1, "5": 1}  # the hidden one, and only it, again
    assert s3.get_object(Bucket=bucket, Key="p/hidden")["Body"].read() == data
    assert uploads_in_progress(s3, bucket) == []


async def test_a_completion_refused_every_time_is_transient_and_aborted(
    proxied: S3Store, proxy: FaultProxy, s3: Any, bucket: str, open_file: OpenFile
) -> None:
    proxy.add(Rule("invalidpart", methods=frozenset({"POST"}), query="uploadId="))
    never = PutRequest("p/never", "application/octet-stream")
    refused = pytest.raises(TransientFileError, match="InvalidPart")
    with open_file("big", os.urandom(11 * MiB)) as source, refused:
        await proxied.put(source, never)
    assert len(completions(proxy)) == 4
    assert uploads_in_progress(s3, bucket) == []
    assert await proxied.stat("p/never") is None

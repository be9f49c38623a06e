"""Job bodies and manifest entries as producers write them, and the file list read from real Redis."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from uploader import redisio
from uploader.config.objectfields import ObjectFields
from uploader.config.settings import RedisConfig
from uploader.dev.servers import Server
from uploader.entries.manifest import (
    MAX_ENTRY_BYTES,
    BadEntry,
    Entry,
    JobSpec,
    Page,
    RedisManifest,
    parse_body,
    parse_entry,
)
from uploader.errors import BadJobError
from uploader.redisio import Keys

# --- parse_body ---


@pytest.mark.parametrize(
    "body",
    [b"a", b"job-42", b"2026.11:batch_7-x", b"A" * 200, b"0123456789abcdef0123456789abcdef"],
)
def test_a_valid_job_id_body(body: bytes) -> None:
    assert parse_body(body) == JobSpec(body.decode())


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b"", "empty"),
        (b"A" * 201, "201 characters"),
        (b"job 42", "space"),
        (b"job/42", "slash"),
        (b"job\n", "trailing newline"),
        (b"job\r\n", "trailing CRLF"),
        (b"\njob", "leading newline"),
        (b"j\x00b", "NUL"),
        ("jöb".encode(), "non-ASCII letter"),
        (b"job{1}", "braces"),
    ],
)
def test_an_invalid_job_id_body_is_refused(body: bytes, why: str) -> None:
    with pytest.raises(BadJobError, match="not a job ID"):
        parse_body(body)


def test_a_non_utf8_body_is_refused() -> None:
    with pytest.raises(BadJobError, match="not UTF-8"):
        parse_body(b"job-\xff\xfe")


def test_a_json_body_carries_its_entries() -> None:
    body = json.dumps({"id": "j1", "files": ["/srv/a", {"path": "/srv/b", "key": "x/b"}]}).encode()
    assert parse_body(body) == JobSpec("j1", ("/srv/a", {"path": "/srv/b", "key": "x/b"}))


def test_a_json_body_with_no_files_is_an_empty_job() -> None:
    assert parse_body(b'{"id": "j1", "files": []}') == JobSpec("j1", ())


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (b'{"id": 42, "files": []}', '"id"'),
        (b'{"id": "bad id", "files": []}', '"id"'),
        (b'{"id": "", "files": []}', '"id"'),
        (b'{"files": []}', '"id"'),
        (b'{"id": "j1", "files": "/srv/a"}', '"files"'),
        (b'{"id": "j1", "files": {"0": "/srv/a"}}', '"files"'),
        (b'{"id": "j1"}', '"files"'),
        (b'{"id": "j1", "files": [], "priority": 1}', "unknown field 'priority'"),
        (b'{"id": "j1", "files": [}', "not valid JSON"),
        (b"{not json", "not valid JSON"),
    ],
)
def test_a_bad_json_body_is_refused(body: bytes, match: str) -> None:
    with pytest.raises(BadJobError, match=match):
        parse_body(body)


def test_a_json_array_body_is_not_a_job_id_either() -> None:
    with pytest.raises(BadJobError):
        parse_body(b'["/srv/a"]')


# --- parse_entry ---


def test_a_plain_path_entry() -> None:
    assert parse_entry(3, b"/srv/uploads/a b.jpg") == Entry(3, "/srv/uploads/a b.jpg")


def test_a_str_entry_as_a_json_body_carries_it() -> None:
    assert parse_entry(0, "/srv/uploads/a.jpg") == Entry(0, "/srv/uploads/a.jpg")


def test_a_utf8_path_entry() -> None:
    assert parse_entry(0, "/srv/uploads/été.jpg".encode()) == Entry(0, "/srv/uploads/été.jpg")


def test_a_json_entry_with_every_field() -> None:
    obj = {"path": "/srv/a.jpg", "key": "av/a.jpg", "content_type": "image/jpeg", "metadata": {"o": "42"}}
    raw = json.dumps(obj).encode()

    assert parse_entry(7, raw) == Entry(7, "/srv/a.jpg", "av/a.jpg", "image/jpeg", {"o": "42"})


def test_a_json_entry_with_object_fields_carries_them() -> None:
    obj = {
        "path": "/srv/a.css.gz", "cache_control": "max-age=60", "content_disposition": "inline",
        "content_encoding": "gzip", "tagging": {"owner": "42"},
    }
    fields = ObjectFields("max-age=60", "inline", "gzip", (("owner", "42"),))
    assert parse_entry(3, json.dumps(obj).encode()) == Entry(3, "/srv/a.css.gz", fields=fields)


@pytest.mark.parametrize(
    ("obj", "reason"),
    [
        ({"cache_control": 5}, "cache_control must be a string"),
        ({"tagging": {"a": "b", "c": ["d"]}}, "tag value for 'c'"),
        ({"content_encoding": ""}, "content_encoding must be a content-coding"),
        ({"expires": "never"}, "unknown field 'expires'"),
    ],
)
def test_a_bad_object_field_fails_the_entry_alone(obj: dict[str, object], reason: str) -> None:
    bad = parse_entry(4, json.dumps({"path": "/srv/a"} | obj).encode())
    assert isinstance(bad, BadEntry) and reason in bad.reason and bad.label == "/srv/a"


def test_a_json_entry_needs_only_a_path() -> None:
    assert parse_entry(1, b'{"path": "/srv/a.jpg"}') == Entry(1, "/srv/a.jpg")


def test_an_already_decoded_json_object_entry() -> None:
    assert parse_entry(2, {"path": "/srv/a", "key": "k"}) == Entry(2, "/srv/a", "k")


def refused(index: int, raw: object) -> BadEntry:
    result = parse_entry(index, raw)
    assert isinstance(result, BadEntry), result
    assert result.index == index
    assert "\n" not in result.reason
    return result


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"", "empty"),
        (b"relative/a.jpg", "not absolute"),
        (b"./a.jpg", "not absolute"),
        (b"/srv/a\x00b", "control character"),
        (b"/srv/a\nb", "control character"),
        (b'{"path": "/srv/a", ', "not valid JSON"),
        (b'{"path": 5}', '"path"'),
        (b'{"key": "k"}', '"path"'),
        (b'{"path": "rel/a"}', "not absolute"),
        (b'{"path": "/srv/a", "owner": "x"}', "unknown field 'owner'"),
        (b'{"path": "/srv/a", "key": "../etc/passwd"}', "'..'"),
        (b'{"path": "/srv/a", "key": "a/../../b"}', "'..'"),
        (b'{"path": "/srv/a", "key": "/etc/passwd"}', "start with '/'"),
        (b'{"path": "/srv/a", "key": "a//b"}', "empty"),
        (b'{"path": "/srv/a", "key": "a\\\\b"}', "contain '\\'"),
        (b'{"path": "/srv/a", "key": ""}', "non-empty"),
        (b'{"path": "/srv/a", "key": 7}', "string"),
        (b'{"path": "/srv/a", "key": "a\\nb"}', "control"),
        (b'{"path": "/srv/a", "content_type": "text/plain\\r\\nX-Evil: 1"}', "content_type"),
        (b'{"path": "/srv/a", "content_type": "text/plain\\n"}', "content_type"),
        (b'{"path": "/srv/a", "content_type": ""}', "content_type"),
        (b'{"path": "/srv/a", "content_type": 5}', "content_type"),
        (b'{"path": "/srv/a", "metadata": {"owner": 42}}', "metadata value"),
        (b'{"path": "/srv/a", "metadata": {"owner": null}}', "metadata value"),
        (b'{"path": "/srv/a", "metadata": {"owner": "a\\r\\nb"}}', "metadata value"),
        (b'{"path": "/srv/a", "metadata": {"owner": "\\u00e9"}}', "ASCII"),
        (b'{"path": "/srv/a", "metadata": {"bad key": "x"}}', "metadata key"),
        (b'{"path": "/srv/a", "metadata": ["x"]}', "metadata must be"),
        (b"[1, 2]", "not absolute"),
        (b"/srv/\xff\xfe.jpg", "not UTF-8"),
    ],
)
def test_a_bad_entry_is_refused_with_a_reason(raw: bytes, reason: str) -> None:
    assert reason in refused(4, raw).reason


def test_a_decoded_non_object_entry_is_refused() -> None:
    assert "path or a JSON object" in refused(0, 12).reason


def test_an_oversized_metadata_is_refused() -> None:
    metadata = {f"k{i}": "v" * 100 for i in range(30)}
    raw = json.dumps({"path": "/srv/a", "metadata": metadata}).encode()
    assert "larger than" in refused(0, raw).reason


def test_a_10_mb_entry_is_refused_without_decoding_it() -> None:
    bad = refused(9, b"/" + b"a" * (10 * 1024 * 1024))
    assert bad.reason == f"entry is larger than {MAX_ENTRY_BYTES} bytes"
    assert bad.label == "#9"  # never a 10 MB field name in the failed hash


def test_an_entry_at_the_size_limit_is_accepted() -> None:
    raw = b"/" + b"a" * (MAX_ENTRY_BYTES - 1)
    assert isinstance(parse_entry(0, raw), Entry)


def test_the_label_of_a_non_utf8_entry_is_printable() -> None:
    bad = refused(0, b"/srv/\xff.jpg")
    assert bad.label == "/srv/\\xff.jpg"


# --- Page.is_marked ---


def bitmap(marked: set[int], upto: int) -> bytes:
    """The resume bitmap as Redis SETBIT lays it out: bit i is byte i // 8, most significant first."""
    out = bytearray((upto + 7) // 8)
    for i in marked:
        out[i // 8] |= 0x80 >> (i % 8)
    return bytes(out)


@pytest.mark.parametrize("start", [0, 1, 7, 8, 13, 21, 64, 99])
@pytest.mark.parametrize("count", [1, 5, 8, 17])
def test_is_marked_reads_the_bits_of_its_own_page(start: int, count: int) -> None:
    marked = {i for i in range(200) if i % 3 == 0 or i in (8, 15, 16, 63, 64)}
    full = bitmap(marked, 200)
    # What GETRANGE returns for the page: bytes start // 8 .. (start + count - 1) // 8.
    page = Page(start, [b"/x"] * count, full[start // 8 : (start + count - 1) // 8 + 1], False)

    assert [page.is_marked(i) for i in range(start, start + count)] == [
        i in marked for i in range(start, start + count)
    ]


def test_is_marked_is_false_past_a_short_bitmap() -> None:
    page = Page(16, [b"/x"] * 24, b"\xff", False)  # marks cover 16..23 only
    assert all(page.is_marked(i) for i in range(16, 24))
    assert not any(page.is_marked(i) for i in range(24, 40))


def test_is_marked_with_no_bitmap() -> None:
    assert not Page(5, [b"/x"] * 3, b"", False).is_marked(6)


# --- RedisManifest against redis-server ---


@pytest.fixture
async def redis(redis_server: Server) -> AsyncIterator[aioredis.Redis]:
    client = redisio.connect(RedisConfig(url=f"redis://{redis_server.address}/0"))
    yield client
    await client.aclose()


@pytest.fixture
def keys() -> Keys:
    return Keys(f"tm{uuid.uuid4().hex[:10]}:")


async def test_length_and_pages_come_from_the_list(redis: aioredis.Redis, keys: Keys) -> None:
    entries = [f"/srv/f{i}".encode() for i in range(25)]
    await redis.rpush(keys.files("j"), *entries)
    manifest = RedisManifest(redis, keys, "j")

    assert await manifest.length() == 25
    pages = [await manifest.page(start, 10) for start in (0, 10, 20)]
    assert [list(p.entries) for p in pages] == [entries[0:10], entries[10:20], entries[20:25]]
    assert [p.start for p in pages] == [0, 10, 20]
    assert (await manifest.page(30, 10)).entries == []


async def test_marks_set_by_setbit_are_honoured(redis: aioredis.Redis, keys: Keys) -> None:
    await redis.rpush(keys.files("j"), *[f"/srv/f{i}" for i in range(40)])
    marked = {0, 7, 13, 14, 22, 31, 39}
    for i in marked:
        await redis.setbit(keys.marks("j"), i, 1)
    manifest = RedisManifest(redis, keys, "j")

    for start, count in ((0, 40), (13, 10), (5, 3), (30, 10)):
        page = await manifest.page(start, count)
        got = {i for i in range(start, start + count) if page.is_marked(i)}
        assert got == marked & set(range(start, start + count)), (start, count)


async def test_the_cancel_flag_rides_with_the_page(redis: aioredis.Redis, keys: Keys) -> None:
    await redis.rpush(keys.files("j"), "/srv/a")
    manifest = RedisManifest(redis, keys, "j")
    assert not (await manifest.page(0, 10)).cancelled

    await redis.set(keys.cancel("j"), "1")

    assert (await manifest.page(0, 10)).cancelled


async def test_a_missing_list_is_a_bad_job_naming_the_key(redis: aioredis.Redis, keys: Keys) -> None:
    with pytest.raises(BadJobError) as info:
        await RedisManifest(redis, keys, "nope").length()
    assert keys.files("nope") in str(info.value)


async def test_a_list_key_of_the_wrong_type_is_a_bad_job(redis: aioredis.Redis, keys: Keys) -> None:
    await redis.set(keys.files("s"), "/srv/a")
    await redis.hset(keys.files("h"), "0", "/srv/a")
    await redis.set(keys.marks("m"), "x")  # a string is what a bitmap is; fine
    await redis.rpush(keys.files("m"), "/srv/a")

    for job in ("s", "h"):
        manifest = RedisManifest(redis, keys, job)
        with pytest.raises(BadJobError, match="not a list") as info:
            await manifest.length()
        assert keys.files(job) in str(info.value)
        with pytest.raises(BadJobError, match=keys.files(job)):
            await manifest.page(0, 10)
    assert (await RedisManifest(redis, keys, "m").page(0, 10)).entries == [b"/srv/a"]


async def test_a_marks_key_of_the_wrong_type_is_a_bad_job(redis: aioredis.Redis, keys: Keys) -> None:
    await redis.rpush(keys.files("j"), "/srv/a")
    await redis.rpush(keys.marks("j"), "oops")

    with pytest.raises(BadJobError):
        await RedisManifest(redis, keys, "j").page(0, 10)

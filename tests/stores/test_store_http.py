"""HttpStore against a real aiohttp server on a loopback port that keeps what it receives."""

from __future__ import annotations

import gzip
import json
import os
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from tests.helpers import Env, wait_until
from uploader.config import settings as config_mod
from uploader.config.stores import HttpStoreConfig
from uploader.entries.files import SourceFile
from uploader.entries.manifest import BadEntry, Entry, parse_entry
from uploader.errors import (
    ConfigError,
    InfrastructureError,
    PermanentFileError,
    StoreUnavailableError,
    ThrottledError,
    TransientFileError,
)
from uploader.stores import open_store
from uploader.stores.base import PutRequest, StoredObject
from uploader.stores.http import HttpStore

MiB = 1024 * 1024
SECRET = "s3cr3t-api-key"


@dataclass
class Blobs:
    """What the server received, and what it is told to answer."""

    url: str = ""
    objects: dict[str, bytes] = field(default_factory=dict)
    headers: dict[str, Mapping[str, str]] = field(default_factory=dict)
    raw_paths: list[str] = field(default_factory=list)
    attempts: Counter[str] = field(default_factory=Counter)
    # Status to answer on each key's first attempt (then 201), and per-key fixed answers.
    fail_first: int | None = None
    answers: dict[str, tuple[int, str]] = field(default_factory=dict)

    async def put(self, request: web.Request) -> web.Response:
        key = request.match_info["key"]
        self.attempts[key] += 1
        body = bytearray()
        async for chunk in request.content.iter_any():
            body += chunk
        if key in self.answers:
            status, text = self.answers[key]
            return web.Response(status=status, text=text)
        if self.fail_first is not None and self.attempts[key] == 1:
            return web.Response(status=self.fail_first, text="try later")
        self.objects[key] = bytes(body)
        self.headers[key] = request.headers
        self.raw_paths.append(request.raw_path)
        return web.Response(status=201)

    async def head(self, request: web.Request) -> web.Response:
        data = self.objects.get(request.match_info["key"])
        return web.Response(status=404) if data is None else web.Response(body=data)

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")


Serve = Callable[[], Awaitable[Blobs]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    runners: list[web.AppRunner] = []

    async def start() -> Blobs:
        blobs = Blobs()
        app = web.Application(client_max_size=64 * MiB)
        app.router.add_put("/bucket/{key:.+}", blobs.put)
        app.router.add_head("/bucket/{key:.+}", blobs.head)
        app.router.add_get("/healthz", blobs.health)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        port = runner.addresses[0][1]
        blobs.url = f"http://127.0.0.1:{port}"
        return blobs

    yield start
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
async def blobs(serve: Serve) -> Blobs:
    return await serve()


def http_config(blobs: Blobs, **overrides: Any) -> HttpStoreConfig:
    base = HttpStoreConfig(
        url_template=f"{blobs.url}/bucket/{{key}}",
        headers=(("X-Api-Key", SECRET),),
        timeout=5.0,
    )
    return replace(base, **overrides)


@pytest.fixture
async def store(blobs: Blobs) -> AsyncIterator[HttpStore]:
    s = HttpStore(http_config(blobs), concurrency=4)
    await s.start()
    yield s
    await s.close()


async def test_small_file_arrives_intact_with_headers_and_metadata(
    store: HttpStore, blobs: Blobs, open_file: Callable[[str, bytes], SourceFile]
) -> None:
    data = os.urandom(1000)
    with open_file("a.bin", data) as src:
        request = PutRequest("dir/a.bin", "image/png", {"owner": "42"})
        result = await store.put(src, request)
    assert result.bytes_sent == 1000
    assert blobs.objects["dir/a.bin"] == data
    headers = blobs.headers["dir/a.bin"]
    assert headers["Content-Type"] == "image/png"
    assert headers["Content-Length"] == "1000"
    assert headers["x-meta-owner"] == "42"
    assert headers["X-Api-Key"] == SECRET


async def test_a_content_encoding_is_sent_and_none_when_unset(
    store: HttpStore, blobs: Blobs, open_file: Callable[[str, bytes], SourceFile]
) -> None:
    with open_file("a.css.gz", gzip.compress(b"a{}")) as src:
        await store.put(src, PutRequest("a.css.gz", "text/css", content_encoding="gzip"))
    with open_file("b.css", b"b{}") as src:
        await store.put(src, PutRequest("b.css", "text/css"))
    assert blobs.headers["a.css.gz"]["Content-Encoding"] == "gzip"
    assert "Content-Encoding" not in blobs.headers["b.css"]


async def test_large_file_is_streamed_in_chunks_with_a_content_length(
    store: HttpStore, blobs: Blobs, open_file: Callable[[str, bytes], SourceFile],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    size = 9 * MiB + 123
    data = os.urandom(size)
    reads: list[int] = []
    real_read = SourceFile.read

    async def spy(self: SourceFile, offset: int, length: int) -> bytes:
        reads.append(length)
        return await real_read(self, offset, length)

    monkeypatch.setattr(SourceFile, "read", spy)
    with open_file("big.bin", data) as src:
        await store.put(src, PutRequest("big.bin", "application/octet-stream"))
    assert blobs.objects["big.bin"] == data
    assert blobs.headers["big.bin"]["Content-Length"] == str(size)
    assert "Transfer-Encoding" not in blobs.headers["big.bin"]
    assert max(reads) == MiB and len(reads) == 10
    assert store.memory_needed(size) == MiB
    assert store.memory_needed(1000) == 1000


async def test_a_file_changed_while_streamed_is_cut_off_and_retried(
    store: HttpStore, blobs: Blobs, open_file: Callable[[str, bytes], SourceFile], src_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real_read = SourceFile.read

    async def grow_then_read(self: SourceFile, offset: int, length: int) -> bytes:
        if offset == 0:
            os.truncate(src_dir / "big.bin", 8 * MiB + 4)
        return await real_read(self, offset, length)

    monkeypatch.setattr(SourceFile, "read", grow_then_read)
    with open_file("big.bin", os.urandom(8 * MiB)) as src, pytest.raises(TransientFileError, match="changed"):
        await store.put(src, PutRequest("big.bin", "application/octet-stream"))
    assert "big.bin" not in blobs.objects


async def test_keys_are_url_quoted_with_slashes_kept(
    store: HttpStore, blobs: Blobs, open_file: Callable[[str, bytes], SourceFile]
) -> None:
    with open_file("x", b"x") as src:
        await store.put(src, PutRequest("a b/ü?#.txt", "text/plain"))
    assert blobs.raw_paths == ["/bucket/a%20b/%C3%BC%3F%23.txt"]
    assert blobs.objects["a b/ü?#.txt"] == b"x"


async def test_a_presigned_entry_url_is_used_verbatim_without_the_secret_headers(
    store: HttpStore, serve: Serve, open_file: Callable[[str, bytes], SourceFile]
) -> None:
    other = await serve()
    url = f"{other.url}/bucket/signed/a.txt?X-Sig=ab%2Fc%3D&X-Expires=60"
    with open_file("a.txt", b"hello") as src:
        await store.put(src, PutRequest("ignored/a.txt", "text/plain", {"k": "v"}, url=url))
    assert other.objects["signed/a.txt"] == b"hello"
    assert other.raw_paths == ["/bucket/signed/a.txt?X-Sig=ab%2Fc%3D&X-Expires=60"]
    assert "X-Api-Key" not in other.headers["signed/a.txt"]
    assert other.headers["signed/a.txt"]["x-meta-k"] == "v"


async def test_an_entry_url_outside_url_hosts_fails_before_a_byte_is_sent(
    blobs: Blobs, serve: Serve, open_file: Callable[[str, bytes], SourceFile]
) -> None:
    other = await serve()
    store = HttpStore(http_config(blobs, url_hosts=("*.example.com", "127.0.0.1")), 2)
    await store.start()
    try:
        with open_file("a.txt", b"hello") as src:
            await store.put(src, PutRequest("a.txt", "text/plain", url=f"{other.url}/bucket/ok.txt"))
            elsewhere = other.url.replace("127.0.0.1", "localhost")
            refused = r"host 'localhost' is not in \[store.http\].url_hosts"
            with pytest.raises(PermanentFileError, match=refused):
                await store.put(src, PutRequest("a.txt", "text/plain", url=f"{elsewhere}/bucket/no.txt"))
    finally:
        await store.close()
    assert list(other.objects) == ["ok.txt"]
    assert other.raw_paths == ["/bucket/ok.txt"]


@pytest.mark.parametrize(
    ("status", "error"),
    [
        # Refusals the store may give every key are outages; the daemon's probe decides.
        (401, StoreUnavailableError),
        (403, StoreUnavailableError),
        (507, StoreUnavailableError),
        (404, PermanentFileError),
        (408, TransientFileError),
        (429, ThrottledError),
        (500, TransientFileError),
        (503, ThrottledError),
    ],
)
async def test_statuses_are_classified(
    store: HttpStore, blobs: Blobs, open_file: Callable[[str, bytes], SourceFile], status: int,
    error: type[Exception],
) -> None:
    blobs.answers["k"] = (status, "the store says\nno  way")
    with open_file("k", b"data") as src, pytest.raises(error) as caught:
        await store.put(src, PutRequest("k", "text/plain"))
    assert type(caught.value) is error
    if status == 403:
        assert str(caught.value) == "http: 403 Forbidden: the store says no way"


async def test_connection_refused_is_transient_and_names_no_secret(
    blobs: Blobs, open_file: Callable[[str, bytes], SourceFile]
) -> None:
    store = HttpStore(http_config(blobs, url_template="http://127.0.0.1:1/b/{key}?sig=SIG"), 2)
    await store.start()
    try:
        with open_file("k", b"data") as src, pytest.raises(TransientFileError) as caught:
            await store.put(src, PutRequest("k", "text/plain"))
        assert "127.0.0.1:1" in str(caught.value)
        assert "SIG" not in str(caught.value)
        with pytest.raises(InfrastructureError):
            await store.check()
    finally:
        await store.close()


async def test_stat_uses_head_and_absent_is_none(
    store: HttpStore, blobs: Blobs, open_file: Callable[[str, bytes], SourceFile]
) -> None:
    blobs.objects["there"] = b"12345"
    assert await store.stat("there") == StoredObject(5)
    assert await store.stat("missing") is None
    off = HttpStore(http_config(blobs, head_for_size=False), 1)
    await off.start()
    try:
        assert await off.stat("there") is None
    finally:
        await off.close()


async def test_check_gets_the_health_url_or_connects(blobs: Blobs, store: HttpStore) -> None:
    await store.check()
    healthy = HttpStore(http_config(blobs, health_url=f"{blobs.url}/healthz"), 1)
    sick = HttpStore(http_config(blobs, health_url=f"{blobs.url}/nothing-here"), 1)
    for s in (healthy, sick):
        await s.start()
    try:
        await healthy.check()
        with pytest.raises(InfrastructureError, match="404"):
            await sick.check()
    finally:
        for s in (healthy, sick):
            await s.close()


def test_config_validates_the_http_table_and_hides_header_values() -> None:
    good = {"store": {"kind": "http", "http": {
        "url_template": "https://blobs.example/b/{key}", "headers": {"X-Api-Key": SECRET}, "timeout": 3,
    }}}
    config = config_mod.parse(good, "u.toml")
    assert config.store.http.headers == (("X-Api-Key", SECRET),)
    assert isinstance(open_store(config.store, 8), HttpStore)
    assert SECRET not in repr(config)
    assert SECRET not in json.dumps(config_mod.redacted(config))
    assert config_mod.redacted(config)["store"]["http"]["headers"] == {"X-Api-Key": "***"}
    hosts = config_mod.parse({"store": {"http": {"url_hosts": ["*.S3.amazonaws.com", "::1"]}}}, "u.toml")
    assert hosts.store.http.url_hosts == ("*.s3.amazonaws.com", "::1")
    bad = [
        ({"kind": "http"}, "[store.http].url_template must be set"),
        ({"http": {"url_template": "http://h/b/"}}, "must contain {key}"),
        ({"http": {"url_template": "http://h/{key}/{job_id}"}}, "must contain {key}"),
        ({"http": {"url_template": "ftp://h/{key}"}}, "must be an http(s) URL"),
        ({"http": {"headers": {"Content-Length": "1"}}}, "[store.http.headers].Content-Length"),
        ({"http": {"headers": {"X-Key": "a\nb" + SECRET}}}, "value not shown"),
        ({"http": {"timeout": 0}}, "[store.http].timeout must be >= 0.1"),
        ({"http": {"url_tempate": "x"}}, "url_tempate is not a known key"),
        ({"http": {"url_hosts": ["https://h.example"]}}, "[store.http].url_hosts holds 'https://h.example'"),
        ({"http": {"url_hosts": "h.example"}}, "[store.http].url_hosts must be a list of strings"),
    ]
    for store, message in bad:
        with pytest.raises(ConfigError) as caught:
            config_mod.parse({"store": store}, "u.toml")
        assert message in str(caught.value)
        assert SECRET not in str(caught.value)


def test_manifest_entries_may_carry_an_http_url() -> None:
    entry = parse_entry(0, json.dumps({"path": "/srv/a", "url": "https://h/b/a?sig=1"}))
    assert isinstance(entry, Entry)
    assert entry.url == "https://h/b/a?sig=1"
    for url in ("ftp://h/a", "/relative", "https:///nohost", 5, "http://h/a b"):
        refused = parse_entry(0, json.dumps({"path": "/srv/a", "url": url}))
        assert isinstance(refused, BadEntry)
        assert "url" in refused.reason


# --- through the daemon -------------------------------------------------------------------


def daemon_config(env: Env, blobs: Blobs) -> config_mod.Config:
    data = env.config_data("http")
    data["store"]["http"] = {"url_template": f"{blobs.url}/bucket/{{key}}", "timeout": 5.0}
    return config_mod.parse(data, str(env.tmp_path / "uploader.toml"))


@pytest.mark.timeout(60)
async def test_daemon_retries_each_file_after_a_503_until_all_are_done(env: Env, blobs: Blobs) -> None:
    blobs.fail_first = 503
    paths = env.write_files(50)
    async with env.daemon(daemon_config(env, blobs)) as daemon:
        await env.push_job("j1", [str(p) for p in paths])
        state = await env.wait_final("j1")
        assert daemon.scheduler.summary.retried == 50
    assert state["state"] == "done"
    assert state["uploaded"] == "50"
    assert set(blobs.attempts.values()) == {2}
    for path in paths:
        assert blobs.objects[f"j1/{path.relative_to(env.uploads)}"] == path.read_bytes()


async def test_daemon_fails_a_file_refused_with_403_and_buries_the_job(env: Env, blobs: Blobs) -> None:
    paths = env.write_files(3)
    denied = f"j2/{paths[1].relative_to(env.uploads)}"
    blobs.answers[denied] = (403, "AccessDenied: not your bucket")
    async with env.daemon(daemon_config(env, blobs)):
        await env.push_job("j2", [str(p) for p in paths])
        state = await env.wait_final("j2")
        assert state["state"] == "failed"
        assert (state["uploaded"], state["failed"]) == ("2", "1")
        assert await env.failures("j2") == {
            str(paths[1]): "http: 403 Forbidden: AccessDenied: not your bucket"
        }

        async def buried() -> bool:  # the final state is written before the job is buried
            return (await env.tube_stats())["current-jobs-buried"] == "1"

        await wait_until(buried, what="the job buried")
    assert blobs.attempts[denied] == 1

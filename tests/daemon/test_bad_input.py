"""Hostile and broken input ends as the contract says, with a reason a person can act on.

One parametrised test walks every case: a bad job body, a bad files list, a bad entry (next to
a good one), a bad config on reload. Each runs against an in-process daemon on the session's
real servers, and each ends with a good job that must finish `done`: the daemon serves on.
Then the security properties: the status API's exposure, secrets kept out of everything a
person or a scraper can read, and object keys that cannot leave their prefix, bucket or root.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import stat
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog

from tests.helpers import Env, deep_merge, hook_open, toml_text, wait_until, write_config
from uploader.cli import main as cli
from uploader.config import settings as config_mod
from uploader.config.settings import HttpConfig
from uploader.daemon import Daemon
from uploader.dev.servers import free_port
from uploader.errors import ConfigError
from uploader.source.beanstalkd.wire import JobTooBig
from uploader.web import statuspage

# --- what a case expects -------------------------------------------------------------------


@dataclass(frozen=True)
class Buried:
    """The body itself is refused: the job is buried, the log says why."""

    reason: str


@dataclass(frozen=True)
class RefusedAtPut:
    """beanstalkd itself refuses the body; the daemon never sees it."""


@dataclass(frozen=True)
class JobFailed:
    """The job cannot run at all: failed, with the reason under `<files list>`."""

    reason: str


@dataclass(frozen=True)
class EntryFailed:
    """The job's good entry is uploaded, the bad one fails with `reason` under `label`."""

    label: str
    reason: str | tuple[str, ...]  # alternatives: any of these refusals is right
    failed: int = 1


@dataclass(frozen=True)
class Done:
    total: int


@dataclass(frozen=True)
class Settled:
    """Any final state with a reason per failure; the harness checks nothing leaked."""


@dataclass(frozen=True)
class ReloadRefused:
    """A bad config file on SIGHUP: refused with a reason naming the key, the old one kept."""

    reason: str


Expect = Buried | RefusedAtPut | JobFailed | EntryFailed | Done | Settled | ReloadRefused


@dataclass
class Ctx:
    env: Env
    daemon: Daemon
    good: Path
    outside: Path
    monkeypatch: pytest.MonkeyPatch
    job_id: str = ""
    entries: list[str | bytes] = field(default_factory=list)

    async def body(self, body: bytes | str) -> None:
        await self.env.put(body)

    async def job_with(self, bad: str | bytes) -> str:
        """A job of the good file then `bad`; returns `bad` as its failed-hash label."""
        self.entries = [str(self.good), bad]
        await self.env.push_job(self.job_id, self.entries)  # type: ignore[arg-type]
        return bad if isinstance(bad, str) else bad.decode("utf-8", "backslashreplace")

    def file(self, name: str, data: bytes = b"data") -> Path:
        path = self.env.uploads / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return path

    def swap_on_open(self, target: Path, swap: Callable[[], None]) -> None:
        """Run `swap` once, just before the daemon opens `target`: after every name check."""
        hook_open(self.monkeypatch, target, swap, once=True)


Case = Callable[[Ctx], Awaitable[Expect]]
CASES: dict[str, Case] = {}


def case(name: str) -> Callable[[Case], Case]:
    def register(fn: Case) -> Case:
        CASES[name] = fn
        return fn

    return register


def entry(**fields: object) -> str:
    return json.dumps(fields)


# --- job bodies ----------------------------------------------------------------------------

NOT_AN_ID = "not a job ID"


@case("body-empty")
async def _(c: Ctx) -> Expect:
    await c.body(b"")
    return Buried(NOT_AN_ID)


@case("body-id-too-long")
async def _(c: Ctx) -> Expect:
    await c.body("a" * 201)
    return Buried(NOT_AN_ID)


@case("body-not-utf8")
async def _(c: Ctx) -> Expect:
    await c.body(b"job-\xff\xfe")
    return Buried("not UTF-8")


@case("body-bad-characters")
async def _(c: Ctx) -> Expect:
    await c.body("job id; rm -rf /")
    return Buried(NOT_AN_ID)


@case("body-id-with-trailing-newline")
async def _(c: Ctx) -> Expect:
    await c.body(f"{c.job_id}\n")
    return Buried(NOT_AN_ID)


@case("body-json-invalid")
async def _(c: Ctx) -> Expect:
    await c.body('{"id": "x", "files": [')
    return Buried("not valid JSON")


@case("body-json-not-an-object")
async def _(c: Ctx) -> Expect:
    await c.body("[1, 2, 3]")
    return Buried(NOT_AN_ID)


@case("body-json-id-wrong-type")
async def _(c: Ctx) -> Expect:
    await c.body(json.dumps({"id": 42, "files": []}))
    return Buried('needs "id"')


@case("body-json-files-not-a-list")
async def _(c: Ctx) -> Expect:
    await c.body(json.dumps({"id": c.job_id, "files": str(c.good)}))
    return Buried('needs "files", a list')


@case("body-json-files-missing")
async def _(c: Ctx) -> Expect:
    await c.body(json.dumps({"id": c.job_id}))
    return Buried('needs "files", a list')


@case("body-json-unknown-field")
async def _(c: Ctx) -> Expect:
    await c.body(json.dumps({"id": c.job_id, "files": [], "priority": 1}))
    return Buried("unknown field")


@case("body-json-deeply-nested")
async def _(c: Ctx) -> Expect:
    depth = 30_000  # 60 KB: inside beanstalkd's limit, far past the JSON parser's recursion
    await c.body(f'{{"id": "{c.job_id}", "files": {"[" * depth}{"]" * depth}}}')
    return Buried("nested too deeply")


@case("body-json-too-big")
async def _(c: Ctx) -> Expect:
    files = [str(c.good)] * 4000  # ~70 KB: over beanstalkd's default job size
    with pytest.raises(JobTooBig):
        await c.body(json.dumps({"id": c.job_id, "files": files}))
    return RefusedAtPut()


@case("body-json-files-empty")
async def _(c: Ctx) -> Expect:
    await c.body(json.dumps({"id": c.job_id, "files": []}))
    return Done(total=0)


@case("body-json-entries-of-wrong-types")
async def _(c: Ctx) -> Expect:
    await c.body(json.dumps({"id": c.job_id, "files": [str(c.good), 5]}))
    return EntryFailed("5", "must be a path or a JSON object")


# --- the files list in Redis ---------------------------------------------------------------


@case("list-missing")
async def _(c: Ctx) -> Expect:
    await c.body(c.job_id)
    return JobFailed("no files list")


@case("list-emptied")
async def _(c: Ctx) -> Expect:
    key = c.env.keys.files(c.job_id)
    await c.env.redis.rpush(key, str(c.good))
    await c.env.redis.lpop(key)
    await c.body(c.job_id)
    return JobFailed("no files list")


@case("list-is-a-string")
async def _(c: Ctx) -> Expect:
    await c.env.redis.set(c.env.keys.files(c.job_id), str(c.good))
    await c.body(c.job_id)
    return JobFailed("is a Redis string, not a list")


@case("list-is-a-hash")
async def _(c: Ctx) -> Expect:
    await c.env.redis.hset(c.env.keys.files(c.job_id), "0", str(c.good))
    await c.body(c.job_id)
    return JobFailed("is a Redis hash, not a list")


@case("progress-hash-is-a-string")
async def _(c: Ctx) -> Expect:
    # The daemon's own keys, written by a producer's mistake: nothing could be recorded there.
    await c.env.redis.set(c.env.keys.job(c.job_id), "not a hash")
    await c.job_with(str(c.good))
    return Buried("is a Redis string, where the daemon keeps this job's progress")


@case("resume-marks-are-a-list")
async def _(c: Ctx) -> Expect:
    await c.env.redis.rpush(c.env.keys.marks(c.job_id), "x")
    await c.job_with(str(c.good))
    return Buried("is a Redis list, where the daemon keeps this job's progress")


# --- entries: names ------------------------------------------------------------------------


@case("entry-empty")
async def _(c: Ctx) -> Expect:
    await c.job_with("")
    return EntryFailed("#1", "empty entry")


@case("entry-relative-path")
async def _(c: Ctx) -> Expect:
    return EntryFailed(await c.job_with("relative/a.txt"), "not absolute")


@case("entry-dot-dot")
async def _(c: Ctx) -> Expect:
    return EntryFailed(await c.job_with(f"{c.env.uploads}/../outside/secret.txt"), "'..'")


@case("entry-outside-the-roots")
async def _(c: Ctx) -> Expect:
    return EntryFailed(await c.job_with(str(c.outside)), "outside the allowed roots")


@case("entry-control-characters")
async def _(c: Ctx) -> Expect:
    label = await c.job_with(f"{c.good}\r\nX-Injected: 1")
    return EntryFailed(repr(label), "control character")


@case("entry-non-utf8-name")
async def _(c: Ctx) -> Expect:
    raw = os.fsencode(c.env.uploads) + b"/caf\xe9.txt"
    fd = os.open(raw, os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, b"latin-1 name")
    os.close(fd)
    return EntryFailed(await c.job_with(raw), "not UTF-8")


@case("entry-10-mb")
async def _(c: Ctx) -> Expect:
    await c.job_with("/" + "a" * (10 * 1024 * 1024))
    return EntryFailed("#1", "larger than")


# --- entries: what the name leads to -------------------------------------------------------


@case("entry-symlink-escape")
async def _(c: Ctx) -> Expect:
    link = c.env.uploads / "escape.txt"
    link.symlink_to(c.outside)
    return EntryFailed(await c.job_with(str(link)), "outside its allowed root")


@case("entry-symlinked-directory-escape")
async def _(c: Ctx) -> Expect:
    link = c.env.uploads / "linkdir"
    link.symlink_to(c.outside.parent, target_is_directory=True)
    return EntryFailed(await c.job_with(str(link / c.outside.name)), "outside its allowed root")


@case("entry-hard-link-escape")
async def _(c: Ctx) -> Expect:
    link = c.env.uploads / "hard.txt"
    os.link(c.outside, link)
    return EntryFailed(await c.job_with(str(link)), "several hard links")


@case("entry-symlink-swapped-in-after-the-check")
async def _(c: Ctx) -> Expect:
    victim = c.file("swap.txt")

    def swap() -> None:
        victim.unlink()
        victim.symlink_to(c.outside)

    c.swap_on_open(victim, swap)
    return EntryFailed(await c.job_with(str(victim)), SWAP_REFUSALS)


@case("entry-parent-directory-swapped-after-the-check")
async def _(c: Ctx) -> Expect:
    victim = c.file(f"sub/{c.outside.name}")

    def swap() -> None:
        victim.unlink()
        victim.parent.rmdir()
        victim.parent.symlink_to(c.outside.parent, target_is_directory=True)

    c.swap_on_open(victim, swap)
    return EntryFailed(await c.job_with(str(victim)), SWAP_REFUSALS)


@case("entry-fifo-swapped-in-after-the-check")
async def _(c: Ctx) -> Expect:
    victim = c.file("becomes-fifo")

    def swap() -> None:
        victim.unlink()
        os.mkfifo(victim)

    c.swap_on_open(victim, swap)
    return EntryFailed(await c.job_with(str(victim)), ("FIFO", *SWAP_REFUSALS))


@case("entry-directory-holding-escapes")
async def _(c: Ctx) -> Expect:
    # A directory entry uploads its tree; what inside it leads out, or blocks, is not read.
    tree = c.env.uploads / "adir"
    (tree / "inner").mkdir(parents=True)
    (tree / "inner" / "ok.txt").write_bytes(b"inside")
    (tree / "link.txt").symlink_to(c.outside)
    (tree / "linkdir").symlink_to(c.outside.parent, target_is_directory=True)
    os.link(c.outside, tree / "hard.txt")
    os.mkfifo(tree / "fifo")
    await c.job_with(str(tree))
    return Settled()


@case("entry-device")
async def _(c: Ctx) -> Expect:
    dev = c.env.uploads / "zero"
    try:
        os.mknod(dev, stat.S_IFCHR | 0o600, os.makedev(1, 5))  # /dev/zero: a read never ends
    except PermissionError:
        pytest.skip("mknod needs CAP_MKNOD")
    return EntryFailed(await c.job_with(str(dev)), "a device, not a regular file")


@case("entry-fifo")
async def _(c: Ctx) -> Expect:
    fifo = c.env.uploads / "fifo"
    os.mkfifo(fifo)  # no writer: an open without O_NONBLOCK would hang the daemon
    return EntryFailed(await c.job_with(str(fifo)), "a FIFO, not a regular file")


@case("entry-socket")
async def _(c: Ctx) -> Expect:
    path = c.env.uploads / "s.sock"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(path))
    sock.close()
    return EntryFailed(await c.job_with(str(path)), "a socket, not a regular file")


@case("entry-unreadable")
async def _(c: Ctx) -> Expect:
    path = c.file("locked.txt")

    def deny() -> None:  # root ignores chmod 000: refuse as the kernel would
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    hook_open(c.monkeypatch, path, deny)
    return EntryFailed(await c.job_with(str(path)), "permission denied")


@case("entry-vanished")
async def _(c: Ctx) -> Expect:
    return EntryFailed(await c.job_with(str(c.env.uploads / "never-there.txt")), "file not found")


@case("entry-vanished-after-the-check")
async def _(c: Ctx) -> Expect:
    victim = c.file("going.txt")
    c.swap_on_open(victim, victim.unlink)
    return EntryFailed(await c.job_with(str(victim)), "file not found")


# Where a swap lands decides which check refuses it; every one of them is a refusal.
SWAP_REFUSALS = ("symlink refused", "replaced while it was opened", "outside its allowed root",
                 "not a regular file", "file not found")


# --- entries: JSON objects -----------------------------------------------------------------


@case("entry-json-invalid")
async def _(c: Ctx) -> Expect:
    return EntryFailed(await c.job_with('{"path": '), "not valid JSON")


@case("entry-json-deeply-nested")
async def _(c: Ctx) -> Expect:
    depth = 30_000
    label = await c.job_with('{"path": ' + "[" * depth + "]" * depth + "}")
    return EntryFailed(label[:197] + "...", "nested too deeply")


@case("entry-json-path-wrong-type")
async def _(c: Ctx) -> Expect:
    await c.job_with(entry(path=["/etc/passwd"]))
    return EntryFailed("#1", 'needs "path", a string')


@case("entry-json-unknown-field")
async def _(c: Ctx) -> Expect:
    await c.job_with(entry(path=str(c.good), acl="public-read"))
    return EntryFailed(str(c.good), "unknown field 'acl'")


@case("entry-key-with-dot-dot")
async def _(c: Ctx) -> Expect:
    await c.job_with(entry(path=str(c.good), key="a/../../escape.txt"))
    return EntryFailed(str(c.good), "'..' segments")


@case("entry-key-with-leading-slash")
async def _(c: Ctx) -> Expect:
    await c.job_with(entry(path=str(c.good), key="/etc/escape.txt"))
    return EntryFailed(str(c.good), "must not start with '/'")


@case("entry-key-too-long")
async def _(c: Ctx) -> Expect:
    await c.job_with(entry(path=str(c.good), key="k" * 2000))
    return EntryFailed(str(c.good), "longer than 1024 bytes")


@case("entry-content-type-with-crlf")
async def _(c: Ctx) -> Expect:
    await c.job_with(entry(path=str(c.good), content_type="text/plain\r\nX-Amz-Acl: public-read"))
    return EntryFailed(str(c.good), "content_type must be a printable string")


@case("entry-metadata-with-crlf")
async def _(c: Ctx) -> Expect:
    await c.job_with(entry(path=str(c.good), metadata={"owner": "42\r\nX-Injected: 1"}))
    return EntryFailed(str(c.good), "metadata value for 'owner'")


@case("entry-url-not-http")
async def _(c: Ctx) -> Expect:
    await c.job_with(entry(path=str(c.good), url="file:///etc/passwd"))
    return EntryFailed(str(c.good), "http(s) URL")


# --- config files, on reload (at startup `check-config`/`run` exit 2 with the same line) ----


def config_case(name: str, change: dict[str, Any], reason: str) -> None:
    async def run(c: Ctx) -> Expect:
        data = deep_merge(c.env.config_data(), change)
        Path(c.daemon.config.path).write_text(toml_text(data))  # noqa: ASYNC240 - a small local file
        c.daemon.reload()
        return ReloadRefused(reason)

    CASES[f"config-{name}"] = run


config_case("unknown-table", {"uplaod": {"concurrency": 4}}, "[uplaod] is not a known table")
config_case("unknown-key", {"upload": {"concurency": 4}}, "[upload].concurency is not a known key")
config_case("wrong-type", {"upload": {"concurrency": "64"}}, "[upload].concurrency must be an integer")
config_case("zero-concurrency", {"upload": {"concurrency": 0}}, "[upload].concurrency must be >= 1")
config_case("negative-drain", {"daemon": {"drain_timeout": -1.0}}, "[daemon].drain_timeout must be >= 0")
config_case("key-with-a-newline", {"store": {"local": {"a\nb": 1}}}, r'[store.local]."a\nb" is not a known')
config_case("zero-attempts", {"upload": {"retry": {"max_attempts": 0}}}, "max_attempts must be >= 1")
config_case("zero-active-jobs", {"source": {"max_active_jobs": 0}}, "max_active_jobs must be >= 1")
config_case(
    "half-the-credentials",
    {"store": {"s3": {"secret_access_key": ""}}},
    "secret_access_key and access_key_id must be set together",
)


# --- the one parametrised test -------------------------------------------------------------


@contextlib.contextmanager
def captured_logs() -> Iterator[list[dict[str, Any]]]:
    with structlog.testing.capture_logs() as events:
        yield events


@pytest.mark.timeout(30)
@pytest.mark.parametrize("name", sorted(CASES))
async def test_bad_input_ends_as_the_contract_says(
    env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    outside = tmp_path / "outside" / "secret.txt"
    outside.parent.mkdir()
    outside.write_bytes(b"SECRET: never to be uploaded")
    good = env.write_files(1, sub="good")[0]
    config = write_config(tmp_path / "uploader.toml", env.config_data())
    with captured_logs() as logs:
        async with env.daemon(config_mod.load(str(config))) as daemon:
            ctx = Ctx(env, daemon, good, outside, monkeypatch, job_id=f"bad-{env.tag}")
            expect = await CASES[name](ctx)
            await check(ctx, expect, logs)
            # Whatever came before, the daemon takes the next job and finishes it.
            after = f"after-{env.tag}"
            await env.push_job(after, [str(good)])
            assert (await env.wait_final(after))["state"] == "done"
    assert not [e for e in logs if e.get("exc_info")], "a traceback was logged"
    leaked = [p for p in env.objects.rglob("*") if p.is_file() and p.read_bytes().startswith(b"SECRET")]
    assert not leaked, "a file outside the allowed roots was uploaded"


async def check(c: Ctx, expect: Expect, logs: list[dict[str, Any]]) -> None:
    env = c.env
    if isinstance(expect, Buried):
        await wait_until(lambda: _refused(logs), 10, "the body to be refused")
        assert expect.reason in _refused(logs)[0]["reason"]
        await wait_until(_buried(env), 10, "the job to be buried")
    elif isinstance(expect, RefusedAtPut):
        assert (await env.tube_stats())["total-jobs"] == "0"
    elif isinstance(expect, JobFailed):
        state = await env.wait_final(c.job_id)
        assert (state["state"], state["total"]) == ("failed", "0")
        assert expect.reason in (await env.failures(c.job_id))["<files list>"]
        await wait_until(_buried(env), 10, "the job to be buried")
    elif isinstance(expect, EntryFailed):
        state = await env.wait_final(c.job_id)
        failures = await env.failures(c.job_id)
        assert (state["state"], state["uploaded"], state["failed"]) == ("failed", "1", str(expect.failed))
        assert expect.label in failures, failures
        reasons = (expect.reason,) if isinstance(expect.reason, str) else expect.reason
        assert any(r in failures[expect.label] for r in reasons), failures
        assert len(failures[expect.label]) <= 500
        assert (env.objects / f"{c.job_id}/good/d0/f00000.txt").read_bytes() == c.good.read_bytes()
        await wait_until(_buried(env), 10, "the job to be buried")
    elif isinstance(expect, Settled):
        await env.wait_final(c.job_id)
        assert all(reason for reason in (await env.failures(c.job_id)).values())
    elif isinstance(expect, Done):
        state = await env.wait_final(c.job_id)
        assert (state["state"], state["total"]) == ("done", str(expect.total))
    else:
        [refusal] = [e for e in logs if e["event"] == "reload_refused"]
        assert expect.reason in refusal["error"] and c.daemon.config.path in refusal["error"]
        assert c.daemon.config.upload.concurrency == 16, "the old config stays in force"


def _refused(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == "job_refused"]


def _buried(env: Env) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return (await env.tube_stats())["current-jobs-buried"] == "1"

    return check


def test_there_are_at_least_thirty_cases() -> None:
    assert len(CASES) >= 30


# --- security ------------------------------------------------------------------------------


def test_status_api_binds_loopback_by_default(tmp_path: Path) -> None:
    assert HttpConfig().listen.startswith("127.0.0.1:")
    (tmp_path / "empty.toml").write_text("")
    assert config_mod.load(str(tmp_path / "empty.toml")).http.listen.startswith("127.0.0.1:")


SECRET_KEY = "s3-SECRET-" + uuid.uuid4().hex
TOKEN = "api-TOKEN-" + uuid.uuid4().hex
CONTENT = b"file-CONTENT-" + uuid.uuid4().hex.encode()


async def test_token_guards_every_route_but_healthz_and_nothing_leaks(
    env: Env, bucket: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    port = free_port()
    data = deep_merge(
        env.config_data("s3", bucket, http={"listen": f"127.0.0.1:{port}", "token": TOKEN}),
        {"store": {"s3": {"secret_access_key": SECRET_KEY}}},
    )
    path = write_config(tmp_path / "uploader.toml", data)
    good = env.uploads / "content.txt"
    good.write_bytes(CONTENT)
    job_id = f"sec-{env.tag}"
    base = f"http://127.0.0.1:{port}"
    with captured_logs() as logs:
        async with env.daemon(config_mod.load(str(path))) as daemon, aiohttp.ClientSession() as http:
            await env.push_job(job_id, [str(good), str(tmp_path / "missing.txt"), "relative"])
            await env.put("bad body!")
            await env.wait_final(job_id)
            routes = sorted({r.resource.canonical for r in daemon.api.app().router.routes()
                             if r.resource is not None and r.method == "GET"})
            assert {"/healthz", "/readyz", "/metrics", "/jobs", "/jobs/{id}", "/fleet"} <= set(routes)
            bodies: list[str] = []
            for route in routes:
                url = base + route.replace("{id}", job_id)
                for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
                    async with http.get(url, headers=headers) as resp:
                        bodies.append(await resp.text())
                        open_route = route in statuspage.OPEN_PATHS  # the page's own files, no data
                        assert resp.status == (200 if open_route else 401), (route, headers)
            for action in ("retry", "cancel"):
                url = f"{base}/jobs/{job_id}/{action}"
                async with http.post(url, headers={"X-Confirm": action}) as resp:
                    bodies.append(await resp.text())
                    assert resp.status == 401, action
                async with http.get(url, headers={"Authorization": f"Bearer {TOKEN}"}) as resp:
                    bodies.append(await resp.text())
                    assert resp.status != 401, (route, bodies[-1])
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["check-config", str(path)])
    assert exit_info.value.code == 0
    printed = capsys.readouterr()
    everything = "\n".join([*bodies, json.dumps(logs, default=str), printed.out, printed.err,
                            json.dumps(await env.failures(job_id)), json.dumps(await env.state(job_id))])
    assert CONTENT.decode() not in everything, "a route or log revealed file contents"
    for secret in (SECRET_KEY, TOKEN):
        assert secret not in everything, "a secret leaked"
    assert '"secret_access_key": "***"' in printed.out


async def test_missing_store_credentials_stop_startup_with_one_line(
    env: Env, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name, raising=False)
    no_keys = {"store": {"s3": {"access_key_id": "", "secret_access_key": ""}}}
    data = deep_merge(env.config_data("s3", bucket), no_keys)
    config = config_mod.parse(data, "uploader.toml")
    with pytest.raises(ConfigError, match="no usable credentials"):
        await Daemon(config).run()


async def test_object_keys_never_leave_their_prefix_or_bucket(env: Env, s3: Any, bucket: str) -> None:
    other = f"{bucket}-other"
    s3.create_bucket(Bucket=other)
    refused = ["../other/x", f"../{other}/x", "/abs/x", "a/../../x", "a//x", "./x", "a\\..\\x",
               "a/\x00"]
    harmless = ["%2e%2e/y", "y?versionId=1", "y#frag", "ok/y"]  # literal names, nothing more
    paths = env.write_files(len(refused) + len(harmless))
    job_id = f"keys-{env.tag}"
    prefixed = {"store": {"s3": {"prefix": "tenant/a"}}}
    config = config_mod.parse(deep_merge(env.config_data("s3", bucket), prefixed))
    async with env.daemon(config):
        keys = refused + harmless
        await env.push_job(job_id, [entry(path=str(p), key=k) for p, k in zip(paths, keys, strict=True)])
        state = await env.wait_final(job_id)
    assert (state["uploaded"], state["failed"]) == (str(len(harmless)), str(len(refused)))
    failures = await env.failures(job_id)
    assert sorted(failures) == sorted(str(p) for p in paths[: len(refused)])
    stored = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert sorted(stored) == sorted(f"tenant/a/{k}" for k in harmless)
    assert s3.list_objects_v2(Bucket=other).get("KeyCount", 0) == 0


async def test_local_store_never_writes_outside_its_root(env: Env, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env.objects.mkdir()
    (env.objects / "planted").symlink_to(outside, target_is_directory=True)
    refused = {
        "planted/x": "symlink in the key's path was refused",
        "../elsewhere/x": "'..'",
        "/abs/x": "'/'",
        "a/../../elsewhere/x": "'..'",
        "a\\..\\x": "'\\'",
    }
    paths = env.write_files(len(refused))
    job_id = f"root-{env.tag}"
    async with env.daemon(env.config()):
        await env.push_job(job_id, [entry(path=str(p), key=k) for p, k in zip(paths, refused, strict=True)])
        state = await env.wait_final(job_id)
    assert (state.get("uploaded", "0"), state["failed"]) == ("0", str(len(refused)))
    failures = await env.failures(job_id)
    for path, reason in zip(paths, refused.values(), strict=True):
        assert reason in failures[str(path)], (reason, failures[str(path)])
    assert list(outside.iterdir()) == []
    assert [p for p in env.objects.rglob("*") if p.is_file()] == []

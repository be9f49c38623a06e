"""The fleet's status page over HTTP (its data, its login, its actions), in-process daemons
against the session's real servers; tests/web/test_browser.py renders it in Chromium."""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from tests.helpers import Env, HeldStore, get, listen, wait_until
from tests.web.test_web import serving
from uploader.dev import servers as devservers
from uploader.state import heartbeat as heartbeat_mod
from uploader.state.heartbeat import Heartbeat, Report, info_key, throughput_key
from uploader.stores.local import LocalStore
from uploader.web import fleet as fleet_mod

TOKEN = "page-token-1"


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
        yield session


@pytest.fixture(autouse=True)
def quick_beats(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(heartbeat_mod, "HEARTBEAT_INTERVAL", 0.2)


async def fleet(http: aiohttp.ClientSession, base: str, query: str = "") -> dict[str, Any]:
    status, body = await get(http, f"{base}/fleet{query}")
    assert status == 200, body
    assert isinstance(body, dict)
    return body


async def post(http: aiohttp.ClientSession, url: str, **headers: str) -> tuple[int, Any]:
    async with http.post(url, headers=headers, allow_redirects=False) as reply:
        if reply.content_type == "application/json":
            return reply.status, await reply.json()
        return reply.status, reply.headers.get("Location")


@pytest.mark.timeout(60)
async def test_the_fleet_shows_the_worker_a_running_a_done_and_a_failed_job(
    env: Env, http: aiohttp.ClientSession
) -> None:
    config, base = listen(env)
    files = env.write_files(4)
    missing = str(env.uploads / "gone.txt")
    store = HeldStore(LocalStore(config.store.local), allow=3)  # ok1's and bad1's puts, not slow's
    async with serving(env, http, config, base, store):
        await env.push_job("ok1", [str(f) for f in files[:2]])
        await env.push_job("bad1", [str(files[2]), missing])
        await env.wait_final("ok1")
        await env.wait_final("bad1")
        await env.push_job("slow", [str(files[3])])

        async def shown() -> dict[str, Any] | None:
            body = await fleet(http, base)
            counted = sum(bucket["files"] for bucket in body["throughput"])
            return body if body["active"] and counted >= 4 else None

        body = await wait_until(shown, 20, "the running job and the throughput")
        (worker,) = body["workers"]
        assert worker["name"].endswith(f":{os.getpid()}")
        assert worker["active_jobs"] == 1 and worker["slots"] == 16 and worker["version"]
        (running,) = body["active"]
        assert (running["id"], running["state"], running["worker"]) == ("slow", "running", worker["name"])
        finished = {job["id"]: job["state"] for job in body["finished"]}
        assert finished == {"ok1": "done", "bad1": "failed"}
        (failed,) = body["failed"]["jobs"]
        assert (failed["id"], failed["failed"], failed["total"]) == ("bad1", 1, 2)
        (path, reason), = failed["reasons"]
        assert path == missing and reason
        assert body["failed"]["total"] == 1 and body["actions"] is False
        buckets = body["throughput"]
        assert len(buckets) == fleet_mod.MINUTES and 1 <= buckets[-1]["seconds"] <= 60
        assert sum(b["files"] for b in buckets) == 4 and sum(b["bytes"] for b in buckets) == 300

        status, answer = await post(http, f"{base}/jobs/slow/cancel", **{"X-Confirm": "cancel"})
        assert (status, answer["error"]) == (403, "actions_disabled")
        store.gate.set()
        assert (await env.wait_final("slow"))["state"] == "done"


@pytest.mark.timeout(60)
async def test_with_a_token_nothing_but_the_page_shell_is_served_without_it(
    env: Env, http: aiohttp.ClientSession
) -> None:
    config, base = listen(env, http={"token": TOKEN})
    files = env.write_files(1)
    async with serving(env, http, config, base):
        await env.push_job("t1", [str(files[0])])
        await env.wait_final("t1")
        for path in ("/", "/static/status.js", "/static/status.css"):
            async with http.get(f"{base}{path}") as reply:
                assert reply.status == 200, path
                assert "t1" not in await reply.text()
                assert "script-src 'self'" in reply.headers["Content-Security-Policy"]
        status, body = await get(http, f"{base}/fleet")
        assert (status, body["error"]) == (401, "unauthorized")
        assert (await post(http, f"{base}/jobs/t1/cancel", **{"X-Confirm": "cancel"}))[0] == 401

        assert await login(http, base, "wrong") == "/#wrong-token"
        assert not http.cookie_jar.filter_cookies(base)
        assert (await get(http, f"{base}/fleet"))[0] == 401
        assert await login(http, base, TOKEN) == "/"
        assert {job["id"] for job in (await fleet(http, base))["finished"]} == {"t1"}
        assert (await get(http, f"{base}/jobs/t1"))[0] == 200  # the cookie opens the JSON API too

        await post(http, f"{base}/logout")
        assert (await get(http, f"{base}/fleet"))[0] == 401
        status, body = await get(http, f"{base}/fleet", TOKEN)  # scripts: the bearer token
        assert status == 200 and body["actions"] is True


async def login(http: aiohttp.ClientSession, base: str, token: str) -> str | None:
    async with http.post(f"{base}/login", data={"token": token}, allow_redirects=False) as reply:
        assert reply.status == 303
        cookie = reply.headers.get("Set-Cookie", "")
        if cookie:
            assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and TOKEN not in cookie
        return reply.headers.get("Location")


@pytest.mark.timeout(60)
async def test_actions_ask_to_confirm_and_refuse_what_does_not_apply(
    env: Env, http: aiohttp.ClientSession
) -> None:
    config, base = listen(env, http={"token": TOKEN})
    files = env.write_files(2)
    missing = env.uploads / "late.txt"
    auth = {"Authorization": f"Bearer {TOKEN}"}
    async with serving(env, http, config, base):
        await env.push_job("r1", [str(files[0]), str(missing)])
        assert (await env.wait_final("r1"))["state"] == "failed"
        status, body = await post(http, f"{base}/jobs/r1/retry", **auth)
        assert (status, body["error"]) == (400, "unconfirmed")
        status, body = await post(http, f"{base}/jobs/r1/cancel", **auth, **{"X-Confirm": "cancel"})
        assert (status, body["error"]) == (409, "refused") and "not queued or running" in body["message"]
        status, body = await post(http, f"{base}/jobs/bad%20id/retry", **auth, **{"X-Confirm": "retry"})
        assert (status, body["error"]) == (400, "bad_job_id")
        status, body = await post(http, f"{base}/jobs/r1/delete", **auth, **{"X-Confirm": "delete"})
        assert (status, body["error"]) == (404, "not_found")

        missing.write_text("here now")
        status, body = await post(http, f"{base}/jobs/r1/retry", **auth, **{"X-Confirm": "retry"})
        assert status == 200 and body["message"].startswith("kicked r1"), body

        async def done() -> bool:
            return (await env.state("r1")).get("state") == "done"

        await wait_until(done, 20, "the retried job to finish")
        assert (await env.state("r1"))["uploaded"] == "2"
        status, body = await post(http, f"{base}/jobs/r1/retry", **auth, **{"X-Confirm": "retry"})
        assert (status, body["error"]) == (409, "refused") and "not failed" in body["message"]


@pytest.mark.timeout(60)
async def test_one_refresh_costs_bounded_redis_work_whatever_the_number_of_jobs(env: Env) -> None:
    """Many more finished and failed jobs than are shown: the commands of one read stay within
    what the page's limits allow, and the read still answers."""
    keys = env.keys
    now = time.time()
    async with env.redis.pipeline(transaction=False) as pipe:
        for i in range(3000):
            job_id = f"many{i}"
            pipe.hset(keys.job(job_id), mapping={"state": "failed" if i % 3 == 0 else "done", "total": 1,
                                                  "finished_at": int(now) - i})
            pipe.expire(keys.job(job_id), 600)
            pipe.zadd(keys.finished_jobs, {job_id: now - i})
            if i % 3 == 0:
                pipe.zadd(keys.failed_jobs, {job_id: now - i})
                pipe.hset(keys.failed(job_id), mapping={f"/p/{n}": "gone" for n in range(50)})
                pipe.expire(keys.failed(job_id), 600)
        await pipe.execute()
    before = await commands_processed(env)
    body = await fleet_mod.Fleet(env.redis, keys).read(now, fleet_mod.Listing(40))
    spent = await commands_processed(env) - before - 1  # the INFO of the second count
    bound = 1 + fleet_mod.MAX_WORKERS + 3 + fleet_mod.MINUTES + fleet_mod.MAX_ACTIVE + fleet_mod.RECENT \
        + 2 * fleet_mod.FAILED_PAGE
    assert spent <= bound and spent < 200, spent
    assert len(body["finished"]) <= fleet_mod.RECENT and body["failed"]["total"] == 1000  # type: ignore[arg-type]
    page = body["failed"]["jobs"]  # type: ignore[index]
    assert [job["id"] for job in page] == [f"many{i}" for i in range(120, 180, 3)]
    assert all(len(job["reasons"]) == fleet_mod.REASONS_SHOWN for job in page)


async def commands_processed(env: Env) -> int:
    stats = await env.redis.info("stats")
    return int(stats["total_commands_processed"])


@pytest.mark.timeout(30)
async def test_what_a_worker_says_of_itself_expires_and_goes_with_a_clean_stop(env: Env) -> None:
    keys = env.keys
    reports = iter([Report(files=5, bytes=50), Report(files=7, bytes=90, jobs=(("j", "t", 1.5),))])
    beat = Heartbeat(env.redis, keys, "host-a:42", report=lambda: next(reports))
    await beat.beat()
    await beat.beat()
    info_ttl = await env.redis.ttl(info_key(keys, "host-a:42"))
    assert 0 < info_ttl <= heartbeat_mod.HEARTBEAT_TTL
    bucket = throughput_key(keys, int(time.time() // heartbeat_mod.THROUGHPUT_BUCKET))
    counted = await env.redis.hgetall(bucket)
    assert {k.decode(): int(v) for k, v in counted.items()} == {"files": 7, "bytes": 90}
    assert 0 < await env.redis.ttl(bucket) <= heartbeat_mod.THROUGHPUT_TTL
    body = await fleet_mod.Fleet(env.redis, keys).read(time.time())
    (worker,) = body["workers"]  # type: ignore[misc]
    shown = (worker["host"], worker["pid"], worker["active_jobs"], worker["jobs"])
    assert shown == ("host-a", "42", 1, [["j", "t", 1.5]])
    await beat.leave()
    assert not await env.redis.exists(info_key(keys, "host-a:42"))
    assert (await fleet_mod.Fleet(env.redis, keys).read(time.time()))["workers"] == []


@pytest.mark.timeout(30)
async def test_with_redis_down_the_page_data_says_so_fast(env: Env, http: aiohttp.ClientSession) -> None:
    dead = f"redis://127.0.0.1:{devservers.free_port()}/0"
    config, base = listen(env, redis={"url": dead})
    async with serving(env, http, config, base):
        started = time.monotonic()
        status, body = await get(http, f"{base}/fleet")
        assert (status, body["error"]) == (503, "redis_unavailable")
        assert time.monotonic() - started < 5
        async with http.get(base) as reply:  # the page itself still loads, and will say why
            assert reply.status == 200

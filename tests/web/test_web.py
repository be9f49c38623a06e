"""The HTTP API of a running daemon (in-process), against the session's real servers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import Env, StoreWrapper, get, listen, wait_until
from uploader import daemon as daemon_mod
from uploader.config.settings import Config
from uploader.dev import servers as devservers
from uploader.entries.files import SourceFile
from uploader.stores.base import PutRequest, PutResult, Store
from uploader.stores.local import LocalStore


class GatedStore(StoreWrapper):
    """The real local store, but every put waits for `gate`: keeps jobs active on demand."""

    def __init__(self, inner: Store) -> None:
        super().__init__(inner)
        self.gate = asyncio.Event()

    async def put(self, source: SourceFile, request: PutRequest) -> PutResult:
        await self.gate.wait()
        return await self.inner.put(source, request)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@asynccontextmanager
async def serving(env: Env, http: aiohttp.ClientSession, config: Config, base: str,
                  store: Store | None = None) -> AsyncIterator[None]:
    """An in-process daemon, once its HTTP API answers."""

    async def answers() -> bool:
        try:
            return (await get(http, f"{base}/healthz"))[0] == 200
        except aiohttp.ClientConnectionError:
            return False

    async with env.daemon(config, store=store):
        await wait_until(answers, what="the HTTP API")
        yield


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def test_metrics_count_the_files_uploaded(env: Env, http: aiohttp.ClientSession) -> None:
    config, base = listen(env)
    files = env.write_files(12, size=500)
    async with serving(env, http, config, base):
        await env.push_job("m1", [str(f) for f in files] + [str(env.uploads / "missing.txt")])

        async def job_counted() -> dict[tuple[str, tuple[tuple[str, str], ...]], float] | None:
            # Redis shows the final state a moment before the job's own metrics move.
            async with http.get(f"{base}/metrics") as response:
                assert response.status == 200
                assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
                values = samples(await response.text())
            return values if values.get(("uploader_jobs_finished_total", (("state", "failed"),))) else None

        values = await wait_until(job_counted, what="the finished job in /metrics")
    assert values[("uploader_files_total", (("outcome", "uploaded"),))] == 12
    assert values[("uploader_files_total", (("outcome", "failed"),))] == 1
    assert values[("uploader_bytes_total", ())] == 12 * 500
    assert values[("uploader_jobs_finished_total", (("state", "failed"),))] == 1
    assert values[("uploader_upload_slots", ())] == config.upload.concurrency


@pytest.mark.timeout(60)
async def test_readyz_fails_while_redis_is_down_and_recovers(env: Env, http: aiohttp.ClientSession) -> None:
    redis = devservers.redis().start()
    try:
        config, base = listen(env, redis={"url": f"redis://{redis.address}/0"})
        async with serving(env, http, config, base):
            status, body = await wait_until(lambda: _ready(http, base), what="ready")
            assert body["checks"] == {name: {"ok": True} for name in ("beanstalkd", "redis", "store")}

            redis.stop()
            status, body = await get(http, f"{base}/readyz")
            assert status == 503 and body["ready"] is False
            assert body["checks"]["redis"]["ok"] is False and body["checks"]["redis"]["error"]
            assert body["checks"]["beanstalkd"] == {"ok": True}
            assert (await get(http, f"{base}/healthz"))[0] == 200

            redis.start()
            await wait_until(lambda: _ready(http, base), what="ready again")
    finally:
        redis.stop()


async def _ready(http: aiohttp.ClientSession, base: str) -> tuple[int, Any] | None:
    status, body = await get(http, f"{base}/readyz")
    return (status, body) if status == 200 else None


async def test_a_token_guards_every_route_but_healthz(env: Env, http: aiohttp.ClientSession) -> None:
    config, base = listen(env, http={"token": "s3cret-token"})
    async with serving(env, http, config, base):
        assert (await get(http, f"{base}/healthz"))[0] == 200
        for path in ("/readyz", "/metrics", "/jobs", "/jobs/anything"):
            for token in ("", "wrong-token", "s3cret-token-longer"):
                status, body = await get(http, f"{base}{path}", token)
                assert (status, body["error"]) == (401, "unauthorized"), path
            assert (await get(http, f"{base}{path}", "s3cret-token"))[0] in (200, 404), path
        async with http.get(f"{base}/jobs", headers={"Authorization": "Basic s3cret-token"}) as response:
            assert response.status == 401
            assert response.headers["WWW-Authenticate"].startswith("Bearer")


async def test_job_progress_from_redis_and_404_for_unknown_jobs(
    env: Env, http: aiohttp.ClientSession
) -> None:
    config, base = listen(env)
    files = env.write_files(3)
    missing = str(env.uploads / "gone.txt")
    async with serving(env, http, config, base):
        await env.push_job("p1", [str(f) for f in files] + [missing])
        await env.wait_final("p1")
        status, body = await get(http, f"{base}/jobs/p1")
        assert status == 200
        assert {k: body[k] for k in ("id", "state", "total", "uploaded", "skipped", "failed")} == {
            "id": "p1", "state": "failed", "total": 4, "uploaded": 3, "skipped": 0, "failed": 1,
        }
        assert isinstance(body["finished_at"], int) and body["worker"]
        assert list(body["failures"]) == [missing] and body["failures_truncated"] is False

        status, body = await get(http, f"{base}/jobs/no-such-job")
        assert (status, body["error"]) == (404, "not_found") and "no-such-job" in body["message"]
        status, body = await get(http, f"{base}/nowhere")
        assert (status, body["error"]) == (404, "not_found")


@pytest.mark.timeout(60)
async def test_jobs_lists_active_jobs_and_the_tube_gauge_counts_waiting_ones(
    env: Env, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(daemon_mod, "TUBE_STATS_INTERVAL", 0.1)
    config, base = listen(env, source={"max_active_jobs": 1}, upload={"concurrency": 2})
    store = GatedStore(LocalStore(config.store.local))
    files = env.write_files(5)
    async with serving(env, http, config, base, store):
        for job in ("a1", "a2", "a3"):
            await env.push_job(job, [str(f) for f in files])

        async def one_busy_job() -> list[dict[str, Any]] | None:
            jobs = (await get(http, f"{base}/jobs"))[1]["jobs"]
            return jobs if jobs and jobs[0]["inflight"] == 2 else None

        [job] = await wait_until(one_busy_job, what="an active job with 2 uploads in flight")
        assert job["id"] == "a1" and job["tube"] == env.tube
        assert (job["total"], job["uploaded"], job["failed"], job["bytes"]) == (5, 0, 0, 0)
        assert job["seconds"] >= 0

        async def waiting_jobs() -> bool:
            values = samples((await get(http, f"{base}/metrics"))[1])
            return values.get(("uploader_tube_ready_jobs", (("tube", env.tube),))) == 2

        await wait_until(waiting_jobs, what="uploader_tube_ready_jobs == 2")
        store.gate.set()
        for job_id in ("a1", "a2", "a3"):
            assert (await env.wait_final(job_id))["state"] == "done"

        async def none_active() -> bool:
            return bool((await get(http, f"{base}/jobs"))[1]["jobs"] == [])

        await wait_until(none_active, what="no active jobs")

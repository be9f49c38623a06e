"""What an operator or a producer does in the ordinary course of things never loses a file:
reusing a job ID, cancelling, a store that refuses writes, Redis going away."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import aiohttp
import pytest

from tests.helpers import (
    Env,
    HeldStore,
    RecordingStore,
    StoreWrapper,
    get,
    listen,
    local_store,
    on_private_redis,
    wait_until,
)
from uploader.entries.files import SourceFile
from uploader.errors import InfrastructureError, StoreUnavailableError
from uploader.stores.base import PutRequest, PutResult


async def next_run(env: Env, job_id: str) -> dict[str, str]:
    """The job's hash once its next run has finished: each run sends one completion message."""
    [message] = await env.completions(1)
    assert message["id"] == job_id
    return await env.state(job_id)


async def replace_list(env: Env, job_id: str, entries: list[str]) -> None:
    """What a producer reusing an ID does: a new list under the same key."""
    await env.redis.delete(env.keys.files(job_id))
    await env.redis.rpush(env.keys.files(job_id), *entries)


# --- 1. a job ID used again ------------------------------------------------------------------


async def test_a_reused_job_id_uploads_its_new_list_with_fresh_counts(env: Env) -> None:
    old = env.write_files(3, sub="old")
    new = env.write_files(1, sub="new")
    job_id = f"docs-{env.tag}"
    store = RecordingStore(local_store(env))
    async with env.daemon(env.config(), store=store):
        await env.push_job(job_id, [str(p) for p in old])
        first = await next_run(env, job_id)
        assert (first["state"], first["uploaded"]) == ("done", "3")
        await replace_list(env, job_id, [str(new[0])])
        await env.put(job_id)
        second = await next_run(env, job_id)
    assert (second["state"], second["total"], second["uploaded"], second["skipped"], second["failed"]) == (
        "done", "1", "1", "0", "0"
    )
    assert int(second["bytes"]) == new[0].stat().st_size
    stored = env.objects / job_id / new[0].relative_to(env.uploads)
    assert stored.read_bytes() == new[0].read_bytes()


async def test_a_kicked_job_resumes_and_runs_only_its_failed_files_again(env: Env) -> None:
    paths = env.write_files(6)
    job_id = f"kick-{env.tag}"
    refused = f"{job_id}/{paths[2].relative_to(env.uploads)}"
    store = RecordingStore(local_store(env), permanent=frozenset({refused}))
    async with env.daemon(env.config(), store=store):
        bjob = await env.push_job(job_id, [str(p) for p in paths])
        first = await next_run(env, job_id)
        assert (first["state"], first["uploaded"], first["failed"]) == ("failed", "5", "1")
        assert first["beanstalk_job"] == str(bjob) and first["beanstalkd"] == env.beanstalkd
        assert await env.redis.zscore(env.keys.failed_jobs, job_id) is not None
        store.permanent = frozenset()
        await (await env.conn()).kick_job(bjob)
        second = await next_run(env, job_id)
    assert (second["state"], second["uploaded"], second["failed"]) == ("done", "6", "0")
    assert store.attempts[refused] == 2
    assert all(n == 1 for key, n in store.attempts.items() if key != refused), "marked files ran again"
    assert await env.redis.zscore(env.keys.failed_jobs, job_id) is None
    assert await env.failures(job_id) == {}


# --- 2. cancel flags -------------------------------------------------------------------------


async def test_a_cancel_flag_ends_with_its_run_and_never_cancels_the_next_submission(env: Env) -> None:
    paths = env.write_files(20)
    job_id = f"cxl-{env.tag}"
    store = HeldStore(local_store(env), allow=1)
    async with env.daemon(env.config(upload={"concurrency": 1}), store=store) as daemon:
        await env.push_job(job_id, [str(p) for p in paths])
        await wait_until(lambda: store.order, what="a first upload")
        await env.redis.set(env.keys.cancel(job_id), 1)
        # The second upload waits until the daemon has read the flag, however slow the tick.
        await wait_until(lambda: daemon.scheduler.runs[job_id].cancelled, what="the cancel seen", timeout=10)
        store.gate.set()
        first = await next_run(env, job_id)
        assert first["state"] == "cancelled"
        assert not await env.redis.exists(env.keys.cancel(job_id))
        await env.put(job_id)
        second = await next_run(env, job_id)
    assert (second["state"], second["uploaded"], second["total"]) == ("done", "20", "20")


async def test_the_same_delivery_of_a_cancelled_run_stays_cancelled(env: Env) -> None:
    """A cancelled job whose delete was lost comes back: it is announced again, not run."""
    paths = env.write_files(5)
    job_id = f"again-{env.tag}"
    bjob = await env.push_job(job_id, [str(p) for p in paths])
    now = int(time.time())
    await env.redis.hset(env.keys.job(job_id), mapping={
        "state": "cancelled", "finished_at": now, "total": 5, "uploaded": 1,
        "beanstalkd": env.beanstalkd, "beanstalk_job": bjob, "put_at": now, "tube": env.tube,
    })
    store = RecordingStore(local_store(env))
    async with env.daemon(env.config(), store=store):
        [message] = await env.completions(1)
    assert message["state"] == "cancelled" and message["id"] == job_id
    assert store.attempts == {}
    assert (await env.tube_stats())["current-jobs-ready"] == "0"


# --- 3. a store that refuses writes ------------------------------------------------------------


class SwitchableStore(StoreWrapper):
    """The real local store, but switched off it refuses every write as a read-only mount
    does, and its probe says so."""

    def __init__(self, env: Env, off_after: int) -> None:
        super().__init__(local_store(env))
        self.off_after = off_after
        self.off = False
        self.stored = 0

    async def put(self, source: SourceFile, request: PutRequest) -> PutResult:
        if self.off or self.stored >= self.off_after > 0:
            self.off = True
            raise StoreUnavailableError("local store: read-only file system")
        result = await self.inner.put(source, request)
        self.stored += 1
        return result

    async def check(self) -> None:
        if self.off:
            raise InfrastructureError("local store: cannot write to root: read-only file system")
        await self.inner.check()


async def reserved_stays_zero(env: Env, seconds: float) -> None:
    """Watch the tube for `seconds` (longer than a reserve's timeout): nothing gets reserved."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert (await env.tube_stats())["current-jobs-reserved"] == "0", "a job was reserved"
        await asyncio.sleep(0.1)


async def test_a_store_refusing_writes_mid_job_fails_no_file_and_resumes_when_back(env: Env) -> None:
    paths = env.write_files(40)
    job_id = f"ro-{env.tag}"
    store = SwitchableStore(env, off_after=10)
    config, base = listen(env, upload={"concurrency": 4})
    async with env.daemon(config, store=store) as daemon, aiohttp.ClientSession() as http:
        await env.push_job(job_id, [str(p) for p in paths])
        await wait_until(lambda: "store" in daemon.health.reasons(), what="the store outage to be seen")
        state = await wait_until(
            lambda: _state_is(env, job_id, "queued"), what="the job to go back to its tube"
        )
        assert state["failed"] == "0" and await env.failures(job_id) == {}
        status, body = await get(http, f"{base}/readyz")
        assert status == 503 and "read-only" in body["paused"]["store"]
        await env.push_job(f"{job_id}-b", [str(p) for p in paths[:2]])
        await reserved_stays_zero(env, 2.5)

        store.off, store.off_after = False, 0
        final = await env.wait_final(job_id)
        other = await env.wait_final(f"{job_id}-b")
        status, _ = await get(http, f"{base}/readyz")
        assert status == 200
    assert (final["state"], final["uploaded"], final["failed"], final["total"]) == ("done", "40", "0", "40")
    assert other["state"] == "done"
    assert store.stored == 42


async def _state_is(env: Env, job_id: str, wanted: str) -> dict[str, str] | None:
    state = await env.state(job_id)
    return state if state.get("state") == wanted else None


@contextmanager
def tmpfs(path: Path, size: str = "4m") -> Iterator[None]:
    path.mkdir(parents=True, exist_ok=True)
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                           capture_output=True, check=False)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mount.stderr.decode().strip()}")
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


def remount(path: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(path)], check=True, capture_output=True)


@pytest.mark.timeout(60)
async def test_a_read_only_store_at_start_takes_no_work_until_it_is_writable(env: Env) -> None:
    paths = env.write_files(5)
    with tmpfs(env.objects):
        remount(env.objects, "ro")
        config, base = listen(env)
        async with env.daemon(config) as daemon, aiohttp.ClientSession() as http:
            await env.push_job(f"a-{env.tag}", [str(p) for p in paths])
            await wait_until(lambda: "read-only" in daemon.health.reasons().get("store", ""),
                             what="the start check to refuse the store")
            assert not daemon.ready
            status, body = await get(http, f"{base}/readyz")
            assert status == 503 and "read-only" in body["paused"]["store"]
            await reserved_stays_zero(env, 2.5)
            remount(env.objects, "rw")
            state = await env.wait_final(f"a-{env.tag}")
            await wait_until(lambda: daemon.ready, what="READY=1 once the store is writable")
        assert (state["state"], state["uploaded"], state["failed"]) == ("done", "5", "0")


# --- 4. Redis down: nothing reserved ---------------------------------------------------------


@pytest.mark.timeout(60)
async def test_with_redis_down_no_job_is_reserved(env: Env, tmp_path: Path, moto_endpoint: str) -> None:
    async with on_private_redis(tmp_path, moto_endpoint, env) as (server, penv):
        paths = penv.write_files(3)
        async with penv.daemon(penv.config()) as daemon:
            await wait_until(lambda: daemon.ready, what="the daemon to be ready")
            server.stop()
            await wait_until(lambda: "redis" in daemon.health.reasons(), what="the outage to be seen")
            for i in range(3):  # JSON bodies: nothing in them needs Redis to start
                await penv.put(json.dumps({"id": f"inline-{i}-{penv.tag}", "files": [str(paths[i])]}))
            await reserved_stays_zero(penv, 2.5)
            assert (await penv.tube_stats())["current-jobs-ready"] == "3"
            server.start()
            for i in range(3):
                assert (await penv.wait_final(f"inline-{i}-{penv.tag}"))["state"] == "done"


# --- 6. what happened: finished and failed jobs in /jobs --------------------------------------


async def test_jobs_lists_recently_finished_and_failed_jobs(env: Env) -> None:
    paths = env.write_files(2)
    config, base = listen(env)
    async with env.daemon(config), aiohttp.ClientSession() as http:
        await env.push_job(f"ok-{env.tag}", [str(p) for p in paths])
        await env.push_job(f"bad-{env.tag}", [str(paths[0]), "/nowhere/at/all.txt"])
        await env.wait_final(f"ok-{env.tag}")
        await env.wait_final(f"bad-{env.tag}")
        status, body = await get(http, f"{base}/jobs")
    assert status == 200
    finished = {job["id"]: job for job in body["finished"]}
    assert finished[f"ok-{env.tag}"]["state"] == "done" and finished[f"ok-{env.tag}"]["uploaded"] == 2
    assert [job["id"] for job in body["failed"]] == [f"bad-{env.tag}"]
    assert body["failed"][0]["failed"] == 1 and body["failed"][0]["tube"] == env.tube
    for name in (env.keys.finished_jobs, env.keys.failed_jobs):
        assert 0 < await env.redis.ttl(name) <= config.redis.progress_ttl, f"{name} must expire"


# --- 7. counters from the start ---------------------------------------------------------------


async def test_every_counter_is_in_the_progress_hash_from_the_start(env: Env) -> None:
    job_id = f"zero-{env.tag}"
    async with env.daemon(env.config()):
        await env.push_job(job_id, [str(env.uploads / "missing-1.txt"), str(env.uploads / "missing-2.txt")])
        state = await env.wait_final(job_id)
    assert {k: state.get(k) for k in ("uploaded", "skipped", "failed", "bytes", "total")} == {
        "uploaded": "0", "skipped": "0", "failed": "2", "bytes": "0", "total": "2"
    }


# --- the drain: an upload cut short never lets its job finish ------------------------------------


async def test_an_upload_cut_by_the_drain_deadline_sends_its_job_back_not_done(env: Env) -> None:
    paths = env.write_files(1)
    job_id = f"cut-{env.tag}"
    store = RecordingStore(local_store(env), delay=30.0)
    bjob = await env.push_job(job_id, [str(p) for p in paths])
    async with env.daemon(env.config(daemon={"drain_timeout": 0.3}), store=store) as daemon:
        await wait_until(lambda: store.active, what="the upload to start")
    assert daemon.scheduler.summary.uploads_cancelled == 1
    state = await env.state(job_id)
    assert state["state"] == "queued" and state["uploaded"] == "0"
    assert (await (await env.conn()).stats_job(bjob))["state"] == "ready"

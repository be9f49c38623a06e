"""The core pipeline end to end: a producer's raw RPUSH + put, a daemon, real servers."""

from __future__ import annotations

import asyncio
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import Env, HeldStore, RecordingStore, hook_open, local_store, wait_until
from uploader.state.progress import Progress


def mixed_entries(env: Env, paths: list[Path], job_id: str) -> tuple[list[str], dict[str, tuple[Path, str]]]:
    """Every other entry a JSON object with its own key and content type; returns key -> (path, type).

    Plain paths get the default template's key, {job_id}/{relpath under the allowed root}.
    """
    entries: list[str] = []
    expected: dict[str, tuple[Path, str]] = {}
    for i, path in enumerate(paths):
        if i % 2:
            key = f"custom/{job_id}/{i}.bin"
            entry = {"path": str(path), "key": key, "content_type": "image/png", "metadata": {"owner": "42"}}
            entries.append(json.dumps(entry))
            expected[key] = (path, "image/png")
        else:
            entries.append(str(path))
            expected[f"{job_id}/{path.relative_to(env.uploads)}"] = (path, "text/plain")
    return entries, expected


async def submit_jobs(env: Env, jobs: int, files: int) -> dict[str, dict[str, tuple[Path, str]]]:
    expected: dict[str, dict[str, tuple[Path, str]]] = {}
    for j in range(jobs):
        job_id = f"job-{env.tag}-{j}"
        entries, expected[job_id] = mixed_entries(env, env.write_files(files, sub=f"j{j}"), job_id)
        await env.push_job(job_id, entries)
    return expected


async def check_done(env: Env, expected: dict[str, dict[str, tuple[Path, str]]], files: int) -> None:
    for job_id in expected:
        state = await env.wait_final(job_id, timeout=60)
        assert state["state"] == "done", (job_id, state, await env.failures(job_id))
        assert (state["total"], state["uploaded"], state["failed"]) == (str(files), str(files), "0")
        assert int(state["bytes"]) == sum(p.stat().st_size for p, _ in expected[job_id].values())
        assert {"worker", "started_at", "updated_at", "finished_at"} <= state.keys()
    messages = await env.completions(len(expected))
    assert sorted(m["id"] for m in messages) == sorted(expected)
    assert all(m["state"] == "done" and m["uploaded"] == files for m in messages)
    assert (await env.tube_stats())["current-jobs-ready"] == "0"


# Every object is read back through moto, which shares this process (and its GIL) with the
# daemon: 2,000 objects take about 55 s on a slow 2-core VM at rest (4,000 took 110 s).
@pytest.mark.timeout(300)
async def test_s3_end_to_end_as_an_outside_producer(env: Env, s3: Any, bucket: str) -> None:
    expected = await submit_jobs(env, jobs=10, files=200)
    config = env.config("s3", bucket, upload={"concurrency": 32})
    async with env.daemon(config):
        await check_done(env, expected, files=200)

    def check(key: str, path: Path, ctype: str) -> None:
        obj = s3.get_object(Bucket=bucket, Key=key)
        assert obj["Body"].read() == path.read_bytes(), key
        assert obj["ContentType"] == ctype
        if key.startswith("custom/"):
            assert obj["Metadata"] == {"owner": "42"}

    # Read back 4,000 objects over several connections: one at a time is most of the test's
    # time on a loaded machine.
    with ThreadPoolExecutor(8) as pool:
        checks = [
            pool.submit(check, key, path, ctype)
            for keys in expected.values()
            for key, (path, ctype) in keys.items()
        ]
        for done in checks:
            done.result()
    listed = sum(
        page.get("KeyCount", 0) for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
    )
    assert listed == 10 * 200


@pytest.mark.timeout(90)
async def test_local_end_to_end_as_an_outside_producer(env: Env) -> None:
    expected = await submit_jobs(env, jobs=20, files=200)
    async with env.daemon(env.config()):
        await check_done(env, expected, files=200)
    for keys in expected.values():
        for key, (path, _) in keys.items():
            assert (env.objects / key).read_bytes() == path.read_bytes(), key
    assert not [p for p in env.objects.rglob("*.tmp")]


@pytest.mark.timeout(120)
async def test_uploads_and_tasks_stay_bounded_by_concurrency(env: Env) -> None:
    concurrency = 8
    store = RecordingStore(local_store(env), delay=0.001)
    config = env.config(
        upload={"concurrency": concurrency}, source={"max_active_jobs": 5}, redis={"page_size": 200}
    )
    jobs = []
    for j in range(5):
        paths = env.write_files(2000, sub=f"b{j}", size=16)
        job_id = f"big-{env.tag}-{j}"
        await env.push_job(job_id, [str(p) for p in paths])
        jobs.append(job_id)
    peak_tasks = peak_upload_tasks = 0
    baseline = len(asyncio.all_tasks())
    async with env.daemon(config, store=store):

        async def all_done() -> bool:
            nonlocal peak_tasks, peak_upload_tasks
            tasks = asyncio.all_tasks()
            uploads = sum(1 for t in tasks if t.get_coro().__qualname__ == "Scheduler._upload")  # type: ignore[union-attr]
            peak_tasks = max(peak_tasks, len(tasks))
            peak_upload_tasks = max(peak_upload_tasks, uploads)
            states = [await env.state(j) for j in jobs]
            return all(s.get("state") == "done" for s in states)

        await wait_until(all_done, 100, "5 jobs of 2,000 files")
    assert store.peak <= concurrency
    assert store.peak == concurrency, "the pipeline should have used every slot"
    assert peak_upload_tasks == concurrency
    # Per job: its own task, a loader, a keep-alive and a cancel watcher; per daemon a handful
    # (run, flusher, reserver, dispatcher, monitors); plus at most one task per upload slot.
    assert peak_tasks <= baseline + concurrency + 5 * 4 + 16, (peak_tasks, baseline)
    assert sum(store.attempts.values()) == 10_000


async def _running(env: Env, job_id: str) -> bool:
    """A new job's start is written within `flush_interval` of its run's start (lazily)."""
    return (await env.state(job_id)).get("state") == "running"


@pytest.mark.timeout(90)
async def test_small_job_behind_a_huge_one_finishes_first(env: Env) -> None:
    store = RecordingStore(local_store(env), delay=0.002)
    big = [str(p) for p in env.write_files(5000, sub="big", size=16)]
    small = [str(p) for p in env.write_files(5, sub="small", size=16)]
    await env.push_job(f"huge-{env.tag}", big)
    config = env.config(upload={"concurrency": 4})
    async with env.daemon(config, store=store):
        await wait_until(lambda: len(store.order) > 50, 30, "the huge job to be under way")
        await wait_until(lambda: _running(env, f"huge-{env.tag}"), 10, "the huge job shown running")
        await env.push_job(f"tiny-{env.tag}", small)
        tiny = await env.wait_final(f"tiny-{env.tag}", timeout=30)
        huge = await env.state(f"huge-{env.tag}")
        assert tiny["state"] == "done"
        assert huge["state"] == "running", "the small job had to wait for the huge one"
        assert int(huge["uploaded"]) < 2500
        await env.wait_final(f"huge-{env.tag}", timeout=60)


async def test_transient_failures_are_retried_until_they_pass(env: Env) -> None:
    store = RecordingStore(local_store(env), transient_failures=2)
    paths = env.write_files(30)
    job_id = f"flaky-{env.tag}"
    await env.push_job(job_id, [str(p) for p in paths])
    async with env.daemon(
        env.config(upload={"retry": {"max_attempts": 3, "base": 0.001, "cap": 0.01}}), store=store
    ) as daemon:
        state = await env.wait_final(job_id)
        assert daemon.scheduler.summary.retried == 60
    assert state["state"] == "done" and state["uploaded"] == "30"
    assert set(store.attempts.values()) == {3}


async def test_permanent_failures_record_reasons_and_bury_the_job(env: Env) -> None:
    paths = env.write_files(10)
    job_id = f"perm-{env.tag}"
    refused = {f"{job_id}/{p.relative_to(env.uploads)}" for p in paths[:3]}
    store = RecordingStore(local_store(env), permanent=frozenset(refused))
    await env.push_job(job_id, [str(p) for p in paths])
    async with env.daemon(env.config(), store=store):
        state = await env.wait_final(job_id)
        [message] = await env.completions(1)
    assert (state["state"], state["uploaded"], state["failed"]) == ("failed", "7", "3")
    failures = await env.failures(job_id)
    assert set(failures) == {str(p) for p in paths[:3]}
    assert all("403 Forbidden" in reason for reason in failures.values())
    assert all(store.attempts[key] == 1 for key in refused), "permanent errors are not retried"
    assert message["state"] == "failed" and message["failed"] == 3
    assert (await env.tube_stats())["current-jobs-buried"] == "1"


async def test_redelivered_job_uploads_only_unmarked_entries(env: Env) -> None:
    paths = env.write_files(100)
    job_id = f"resume-{env.tag}"
    for index in range(0, 100, 2):  # an earlier run uploaded the even entries
        await env.redis.setbit(env.keys.marks(job_id), index, 1)
    await env.redis.hset(env.keys.job(job_id), mapping={"uploaded": 50, "state": "running"})
    store = RecordingStore(local_store(env))
    await env.push_job(job_id, [str(p) for p in paths])
    async with env.daemon(env.config(), store=store):
        state = await env.wait_final(job_id)
    uploaded = {key.rsplit("/", 1)[-1] for key in store.attempts}
    assert uploaded == {p.name for i, p in enumerate(paths) if i % 2}
    assert (state["state"], state["uploaded"], state["total"]) == ("done", "100", "100")


@pytest.mark.timeout(60)
async def test_job_outliving_its_ttr_is_touched_not_redelivered(env: Env) -> None:
    store = RecordingStore(local_store(env), delay=0.4)
    paths = env.write_files(15)
    job_id = f"ttr-{env.tag}"
    beanstalk_id = await env.push_job(job_id, [str(p) for p in paths], ttr=2)
    config = env.config(upload={"concurrency": 1})
    async with env.daemon(config, store=store):
        state = await env.wait_final(job_id, timeout=30)
    assert state["state"] == "done"
    assert max(store.attempts.values()) == 1, "no file was uploaded twice"
    conn = await env.conn()
    stats = await conn.stats_tube(env.tube)
    assert stats["current-jobs-reserved"] == "0" and stats["current-jobs-ready"] == "0"
    assert stats["total-jobs"] == "1"
    with pytest.raises(Exception, match="NOT_FOUND"):
        await conn.stats_job(beanstalk_id)


async def test_bad_input_ends_as_the_contract_says_and_the_daemon_serves_on(env: Env, tmp_path: Path) -> None:
    outside = tmp_path / "secret.txt"
    outside.write_text("do not upload")
    good, missing = env.write_files(2)
    os.unlink(missing)
    escape = env.uploads / "escape.txt"
    escape.symlink_to(outside)
    unreadable_fifo = env.uploads / "fifo"
    os.mkfifo(unreadable_fifo)
    job_id = f"bad-{env.tag}"
    entries = [
        str(good),
        str(outside),
        str(escape),
        str(missing),
        str(unreadable_fifo),
        "relative/path.txt",
        str(env.uploads / ".." / "secret.txt"),
    ]
    async with env.daemon(env.config()) as daemon:
        await env.put("not a job id!")
        await env.put(f"nolist-{env.tag}")
        await env.push_job(job_id, entries)
        state = await env.wait_final(job_id)
        nolist = await env.wait_final(f"nolist-{env.tag}")
        after = f"after-{env.tag}"
        await env.push_job(after, [str(good)])
        assert (await env.wait_final(after))["state"] == "done"
        assert daemon.scheduler.summary.jobs_buried == 3
    assert (state["state"], state["uploaded"], state["failed"]) == ("failed", "1", "6")
    reasons = await env.failures(job_id)
    assert "outside the allowed roots" in reasons[str(outside)]
    assert "outside its allowed root" in reasons[str(escape)]
    assert "not found" in reasons[str(missing)]
    assert "FIFO" in reasons[str(unreadable_fifo)]
    assert "not absolute" in reasons["relative/path.txt"]
    assert ".." in reasons[str(env.uploads / ".." / "secret.txt")]
    assert nolist["state"] == "failed"
    assert "no files list" in (await env.failures(f"nolist-{env.tag}"))["<files list>"]
    assert not list(env.objects.rglob("secret*")) and not list(env.objects.rglob("escape*"))
    assert (await env.tube_stats())["current-jobs-buried"] == "3"


async def test_unreadable_file_fails_with_a_reason(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    path = env.write_files(1)[0]

    def deny() -> None:  # tests run as root, where chmod 000 does not stop a read
        raise PermissionError(13, "Permission denied", str(path))

    hook_open(monkeypatch, path, deny)
    job_id = f"unreadable-{env.tag}"
    await env.push_job(job_id, [str(path)])
    async with env.daemon(env.config()):
        state = await env.wait_final(job_id)
    assert state["state"] == "failed"
    assert "permission denied" in (await env.failures(job_id))[str(path)]


async def test_cancel_skips_pending_files(env: Env) -> None:
    store = HeldStore(local_store(env), allow=10)
    paths = env.write_files(500)
    job_id = f"cancel-{env.tag}"
    await env.push_job(job_id, [str(p) for p in paths])
    async with env.daemon(env.config(upload={"concurrency": 2}), store=store) as daemon:
        await wait_until(lambda: len(store.order) >= 10, 20, "uploads to start")
        await env.redis.set(env.keys.cancel(job_id), 1)
        await wait_until(lambda: daemon.scheduler.runs[job_id].cancelled, what="the cancel seen", timeout=10)
        store.gate.set()
        state = await env.wait_final(job_id)
        [message] = await env.completions(1)
    assert state["state"] == "cancelled" and message["state"] == "cancelled"
    assert int(state["uploaded"]) < 500
    assert (await env.tube_stats())["current-jobs-buried"] == "0"


async def test_inline_json_job_without_redis_list(env: Env) -> None:
    paths = env.write_files(5)
    job_id = f"inline-{env.tag}"
    body = json.dumps({"id": job_id, "files": [str(p) for p in paths]})
    async with env.daemon(env.config()):
        await env.put(body)
        state = await env.wait_final(job_id)
    assert (state["state"], state["uploaded"]) == ("done", "5")


async def test_an_unforeseen_error_in_one_job_buries_it_and_the_daemon_goes_on(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    doomed, after = f"doomed-{env.tag}", f"after-{env.tag}"
    real_start = Progress.start

    async def start(self: Progress, job_id: str, total: int | None, *rest: Any) -> Any:
        if job_id == doomed:
            raise RuntimeError("a state no check foresaw")
        return await real_start(self, job_id, total, *rest)

    real_lazily = Progress.start_lazily

    def start_lazily(self: Progress, job_id: str, *rest: Any) -> None:
        if job_id == doomed:
            raise RuntimeError("a state no check foresaw")
        real_lazily(self, job_id, *rest)

    monkeypatch.setattr(Progress, "start", start)
    monkeypatch.setattr(Progress, "start_lazily", start_lazily)  # a new job's way
    paths = [str(p) for p in env.write_files(2)]
    await env.push_job(doomed, paths)
    await env.push_job(after, paths)
    async with env.daemon(env.config()) as daemon:
        assert (await env.wait_final(after))["state"] == "done"

        async def buried() -> bool:
            return (await env.tube_stats())["current-jobs-buried"] == "1"

        await wait_until(buried, 10, "the doomed job to be buried")
        assert daemon.scheduler.summary.jobs_buried == 1

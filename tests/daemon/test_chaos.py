"""Faults against the real daemon: a subprocess (`python -m uploader.cli.main run`) on real servers.

Every test ends with the same proof: every file of every manifest is in the store with the
right bytes (files lost: 0), the daemon is alive or exited 0 (crashes: 0), and its log holds
no secret. S3 faults go through `tests/faultproxy.py`, between the daemon and moto.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.exceptions

from tests.faultproxy import FaultProxy, Record, Rule
from tests.helpers import (
    REDIS_PASSWORD,
    Daemons,
    Env,
    deep_merge,
    on_private_redis,
    private_env,
    protected_redis,
    total_uploaded,
    tube_settled,
    uploaded_at_least,
    wait_until,
    write_config,
)
from uploader.dev import servers as devservers
from uploader.dev.servers import free_port
from uploader.source.beanstalkd.wire import Connection, NotFound

MiB = 1024 * 1024
# Distinctive secrets: none of them may ever show up in a log line.
S3_SECRET = "chaos-s3-SECRET-" + uuid.uuid4().hex
TOKEN = "chaos-api-TOKEN-" + uuid.uuid4().hex


@pytest.fixture(autouse=True)
def clean_logs(daemons: Daemons) -> Iterator[None]:
    """Crashes and leaks: at the end, whatever still runs is killed, and no daemon's log may
    hold a secret or a traceback."""
    yield
    daemons.close()
    daemons.assert_clean_logs((S3_SECRET, REDIS_PASSWORD, TOKEN))


def chaos_config(env: Env, proxy: FaultProxy, bucket: str, name: str = "uploader.toml",
                 **overrides: Any) -> Path:
    """The daemon's config: S3 through the fault proxy, the API on with a token, JSON logs."""
    data = env.config_data("s3", bucket)
    data = deep_merge(data, {
        "store": {"s3": {"endpoint_url": proxy.endpoint, "secret_access_key": S3_SECRET, "timeout": 10.0}},
        "http": {"listen": f"127.0.0.1:{free_port()}", "token": TOKEN},
        "daemon": {"drain_timeout": 10.0, "log_format": "json"},
    })
    return write_config(env.tmp_path / name, deep_merge(data, overrides))


def key_of(env: Env, job_id: str, path: Path) -> str:
    return f"{job_id}/{path.relative_to(env.uploads)}"


def assert_all_landed(s3: Any, bucket: str, env: Env, jobs: dict[str, list[Path]]) -> None:
    """Files lost: 0. Every file of every manifest is in the bucket with its bytes."""
    lost = []
    for job_id, paths in jobs.items():
        for path in paths:
            key = key_of(env, job_id, path)
            try:
                body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
            except s3.exceptions.NoSuchKey:
                lost.append(key)
                continue
            assert body == path.read_bytes(), f"{key} differs from {path}"
    assert lost == [], f"{len(lost)} files lost"


def successful_puts(records: list[Record], prefix: str) -> Counter[str]:
    return Counter(r.request.key for r in records
                   if r.request.method == "PUT" and r.request.key.startswith(prefix) and r.status == 200)


# --- crashes ---------------------------------------------------------------------------------


@pytest.mark.timeout(90)
async def test_kill_9_mid_job_then_a_fresh_instance_finishes_it(
    env: Env, s3: Any, bucket: str, proxy: FaultProxy, daemons: Daemons
) -> None:
    concurrency, ttr = 4, 5
    proxy.add(Rule("delay", methods=frozenset({"PUT"}), delay=0.1))
    paths = env.write_files(80, size=2048)
    job_id = f"kill-{env.tag}"
    config = chaos_config(env, proxy, bucket, upload={"concurrency": concurrency})
    await env.push_job(job_id, [str(p) for p in paths], ttr=ttr)

    first = daemons.start(config)
    await wait_until(lambda: uploaded_at_least(env, job_id, 20), 30, "20 files uploaded")
    first.kill()
    started_before_kill = {r.request.key for r in proxy.snapshot() if r.request.method == "PUT"}
    marks = await env.redis.get(env.keys.marks(job_id)) or b""
    recorded = {key_of(env, job_id, p) for i, p in enumerate(paths) if _bit(marks, i)}

    # The job is back in its tube within its TTR (at once, in fact: its connection closed).
    async def back() -> bool:
        return (await env.tube_stats())["current-jobs-ready"] == "1"

    await wait_until(back, ttr + 2, "the job to be ready again")
    second = daemons.start(config)
    state = await env.wait_final(job_id, 60)
    assert (state["state"], state["uploaded"], state["failed"]) == ("done", "80", "0")
    assert_all_landed(s3, bucket, env, {job_id: paths})
    puts = successful_puts(proxy.snapshot(), job_id)
    reuploaded = {key for key, n in puts.items() if n > 1}
    in_flight = started_before_kill - recorded  # started, not yet durably recorded
    assert reuploaded <= in_flight, "a file recorded as uploaded was uploaded again"
    assert not recorded & reuploaded
    assert len(in_flight) <= 2 * concurrency, (len(in_flight), "uploads unrecorded at the kill")
    print(f"kill -9: {len(recorded)} recorded, {len(in_flight)} in flight, {len(reuploaded)} re-uploaded")
    assert second.stop() == 0


def _bit(bitmap: bytes, index: int) -> bool:
    byte, bit = divmod(index, 8)
    return byte < len(bitmap) and bool(bitmap[byte] & (0x80 >> bit))


@pytest.mark.timeout(90)
async def test_beanstalkd_killed_and_restarted_with_its_binlog_loses_no_job(
    env: Env, tmp_path: Path, moto_endpoint: str, s3: Any, bucket: str, proxy: FaultProxy, daemons: Daemons
) -> None:
    server = devservers.beanstalkd(binlog=True).start()
    try:
        async with private_env(tmp_path, moto_endpoint, beanstalkd=server, shared=env) as penv:
            proxy.add(Rule("delay", methods=frozenset({"PUT"}), delay=0.05))
            jobs = {f"bs-{penv.tag}-{j}": penv.write_files(40, sub=f"j{j}", size=1024) for j in range(4)}
            for job_id, paths in jobs.items():
                await penv.push_job(job_id, [str(p) for p in paths], ttr=30)
            config = chaos_config(penv, proxy, bucket, upload={"concurrency": 4})
            daemon = daemons.start(config)
            await wait_until(lambda: _sum_at_least(penv, list(jobs), 30), 30, "30 files uploaded")

            server.stop(kill=True)
            await wait_until(
                lambda: daemon.events("beanstalkd_connection_lost") + daemon.events("beanstalkd_unavailable"),
                10, "the daemon to notice",
            )
            server.start()

            for job_id in jobs:
                state = await penv.wait_final(job_id, 60)
                assert (state["state"], state["uploaded"], state["failed"]) == ("done", "40", "0"), job_id

            await wait_until(lambda: tube_settled(penv), 30, "every job deleted from its tube")
            messages = await penv.completions(len(jobs))
            assert sorted(m["id"] for m in messages) == sorted(jobs), "a job finished twice or never"
            assert all(m["state"] == "done" for m in messages)
            assert (await penv.tube_stats(penv.done_tube))["current-jobs-ready"] == "0", "an extra completion"
            assert_all_landed(s3, bucket, penv, jobs)
            assert daemon.stop() == 0
    finally:
        server.stop()


async def _sum_at_least(env: Env, job_ids: list[str], count: int) -> bool:
    return await total_uploaded(env, job_ids) >= count


@pytest.mark.timeout(90)
async def test_redis_down_for_10s_fails_no_file(
    env: Env, tmp_path: Path, moto_endpoint: str, s3: Any, bucket: str, proxy: FaultProxy, daemons: Daemons
) -> None:
    async with on_private_redis(tmp_path, moto_endpoint, env) as (server, penv):
        proxy.add(Rule("delay", methods=frozenset({"PUT"}), delay=0.05))
        paths = penv.write_files(150, size=1024)
        job_id = f"redis-{penv.tag}"
        await penv.push_job(job_id, [str(p) for p in paths], ttr=10)
        # Small pages: the daemon needs Redis again and again to go on.
        config = chaos_config(penv, proxy, bucket, upload={"concurrency": 4}, redis={"page_size": 20})
        daemon = daemons.start(config)
        await wait_until(lambda: uploaded_at_least(penv, job_id, 30), 30, "30 files uploaded")

        server.stop()  # SIGTERM: redis-server writes its AOF and exits
        down_at = time.monotonic()
        await daemon.wait_event("redis_unavailable", 10)
        await asyncio.sleep(max(0.0, 10.0 - (time.monotonic() - down_at)))  # the outage itself
        server.start()

        state = await wait_final_through_outage(penv, job_id)
        assert (state["state"], state["uploaded"], state["failed"]) == ("done", "150", "0")
        assert await penv.failures(job_id) == {}
        assert daemon.events("file_failed") == []
        assert_all_landed(s3, bucket, penv, {job_id: paths})
        assert daemon.stop() == 0


@pytest.mark.timeout(90)
async def test_sigterm_while_redis_is_down_releases_the_job_and_exits_0(
    env: Env, tmp_path: Path, moto_endpoint: str, s3: Any, bucket: str, proxy: FaultProxy, daemons: Daemons
) -> None:
    """The drain cannot save progress without Redis; it waits `release_timeout`, then gives the
    job back as it is, and the next instance uploads again what was not recorded."""
    drain_timeout, release_timeout = 1.0, 2.0
    async with on_private_redis(tmp_path, moto_endpoint, env) as (server, penv):
        proxy.add(Rule("delay", methods=frozenset({"PUT"}), delay=0.1))
        paths = penv.write_files(60, size=1024)
        job_id = f"redis-drain-{penv.tag}"
        await penv.push_job(job_id, [str(p) for p in paths], ttr=30)
        config = chaos_config(
            penv, proxy, bucket, upload={"concurrency": 4}, redis={"page_size": 10},
            daemon={"drain_timeout": drain_timeout, "release_timeout": release_timeout},
        )
        first = daemons.start(config)
        await wait_until(lambda: uploaded_at_least(penv, job_id, 10), 30, "10 files uploaded")
        server.stop()
        await first.wait_event("redis_unavailable", 10)

        signalled = time.monotonic()
        assert first.stop(timeout=drain_timeout + 2 * release_timeout + 10) == 0
        took = time.monotonic() - signalled
        assert took <= drain_timeout + 2 * release_timeout + 3, f"the drain took {took:.1f} s"
        assert first.events("release_forced"), "the drain never gave up on Redis"
        released = first.events("job_released")
        assert [e["progress_saved"] for e in released] == [False]

        async def ready_again() -> bool:
            return (await penv.tube_stats())["current-jobs-ready"] == "1"

        await wait_until(ready_again, 5, "the job to be back in its tube")
        server.start()
        second = daemons.start(config)
        state = await wait_final_through_outage(penv, job_id)
        assert (state["state"], state["uploaded"], state["failed"]) == ("done", "60", "0")
        assert_all_landed(s3, bucket, penv, {job_id: paths})
        assert second.stop() == 0
        print(f"SIGTERM with Redis down: exit 0 after {took:.2f} s, job released, 0 lost")


async def wait_final_through_outage(env: Env, job_id: str) -> dict[str, str]:
    async def final() -> dict[str, str] | None:
        try:
            state = await env.state(job_id)
        except (redis.exceptions.ConnectionError, redis.exceptions.BusyLoadingError):
            return None
        return state if state.get("state") in ("done", "failed", "cancelled") else None

    return await wait_until(final, 60, f"job {job_id} to finish")


# --- S3 faults through the proxy ---------------------------------------------------------------


@pytest.mark.timeout(120)
async def test_s3_faults_land_every_file_within_the_retry_policy(
    env: Env, s3: Any, bucket: str, proxy: FaultProxy, daemons: Daemons
) -> None:
    max_attempts, cap, throttles = 10, 1.0, 12
    config = chaos_config(
        env, proxy, bucket,
        upload={"concurrency": 8, "retry": {"max_attempts": max_attempts, "base": 0.1, "cap": cap}},
        store={"s3": {"timeout": 2.5, "multipart_threshold": 5 * MiB, "part_size": 5 * MiB}},
    )
    jobs = {
        f"throttle-{env.tag}": env.write_files(6, sub="throttle", size=32 * 1024),
        f"reset-{env.tag}": [*env.write_files(6, sub="reset", size=256 * 1024),
                             *env.write_files(1, sub="reset-big", size=6 * MiB)],
        f"slow-{env.tag}": env.write_files(4, sub="slow", size=8 * 1024),
    }
    throttle_id, reset_id, slow_id = jobs
    # More SlowDowns per file than max_attempts: throttling must never fail a file.
    proxy.add(Rule("slowdown", prefix=f"{throttle_id}/", per_key=throttles))
    proxy.add(Rule("reset", prefix=f"{reset_id}/", methods=frozenset({"PUT"}), per_key=2))
    proxy.add(Rule("delay", prefix=f"{slow_id}/", delay=1.0))
    daemon = daemons.start(config)
    for job_id, paths in jobs.items():
        await env.push_job(job_id, [str(p) for p in paths])
    for job_id in jobs:
        state = await env.wait_final(job_id, 60)
        assert (state["state"], state["failed"]) == ("done", "0"), (job_id, await env.failures(job_id))

    # A 20 s blackhole: connections accepted, requests read, nothing ever answered.
    blackhole_id = f"blackhole-{env.tag}"
    jobs[blackhole_id] = env.write_files(4, sub="blackhole", size=4096)
    proxy.add(Rule("blackhole", until=time.monotonic() + 20.0))
    await env.push_job(blackhole_id, [str(p) for p in jobs[blackhole_id]])
    state = await env.wait_final(blackhole_id, 60)
    assert (state["state"], state["failed"]) == ("done", "0"), await env.failures(blackhole_id)

    assert_all_landed(s3, bucket, env, jobs)
    records = proxy.snapshot()
    for path in jobs[throttle_id]:
        key = key_of(env, throttle_id, path)
        assert sum(1 for r in records if r.request.key == key and r.fault == "slowdown") == throttles
    assert sum(1 for r in records if r.fault == "reset") >= 2 * 7
    assert sum(1 for r in records if r.fault == "blackhole") >= 4
    retries = daemon.events("upload_retry")
    assert retries, "the faults were never felt"
    assert max(r["retry_in"] for r in retries) <= cap, "backoff went past its cap"
    counted = Counter(r["path"] for r in retries if "SlowDown" not in r["reason"])
    assert max(counted.values()) < max_attempts, "a file was retried past max_attempts"
    assert daemon.events("file_failed") == []
    assert daemon.alive
    assert daemon.stop() == 0


# --- files that change under the daemon -------------------------------------------------------


@pytest.mark.timeout(90)
async def test_a_file_changed_while_uploaded_lands_as_one_whole_version(
    env: Env, s3: Any, bucket: str, proxy: FaultProxy, daemons: Daemons
) -> None:
    config = chaos_config(env, proxy, bucket,
                          store={"s3": {"multipart_threshold": 5 * MiB, "part_size": 5 * MiB}})
    job_id = f"change-{env.tag}"
    big = int(10.5 * MiB)
    files = {name: env.uploads / name for name in ("grow.bin", "rewrite.bin", "replace.bin", "truncate.bin")}
    small = env.uploads / "small.txt"
    versions: dict[Path, list[bytes]] = {}
    for path in files.values():
        path.write_bytes(os.urandom(big))
        versions[path] = [path.read_bytes()]
    small.write_bytes(os.urandom(10_000))
    versions[small] = [small.read_bytes()]
    for path in files.values():  # hold the first part, by then read and in flight
        proxy.add(Rule("hold", prefix=key_of(env, job_id, path), parts_only=True, count=1))
    proxy.add(Rule("hold", prefix=key_of(env, job_id, small), count=1))
    daemon = daemons.start(config)
    await env.push_job(job_id, [str(p) for p in [*files.values(), small]])

    for path in [*files.values(), small]:
        key = key_of(env, job_id, path)
        await wait_until(lambda key=key: proxy.held(key), 30, f"{key} in flight")
    _append(files["grow.bin"], os.urandom(MiB))
    _write_at(files["rewrite.bin"], 6 * MiB, os.urandom(MiB))
    replacement = files["replace.bin"].with_suffix(".new")
    replacement.write_bytes(os.urandom(big))
    os.replace(replacement, files["replace.bin"])
    os.truncate(files["truncate.bin"], MiB)
    small.write_bytes(os.urandom(10_000))
    for path in [*files.values(), small]:
        versions[path].append(path.read_bytes())
        proxy.release(key_of(env, job_id, path))

    state = await env.wait_final(job_id, 60)
    assert (state["state"], state["failed"]) == ("done", "0"), await env.failures(job_id)
    for path, (old, new) in versions.items():
        body = s3.get_object(Bucket=bucket, Key=key_of(env, job_id, path))["Body"].read()
        assert body in (old, new), f"{path.name}: the object is no whole version of the file"
        if path.name in ("grow.bin", "rewrite.bin", "truncate.bin"):
            assert body == new, f"{path.name}: a changed file must be uploaded again"
    assert daemon.stop() == 0


def _append(path: Path, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)


def _write_at(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _run(*argv: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(argv, capture_output=True, check=False)


# --- a full disk -----------------------------------------------------------------------------


@pytest.mark.timeout(90)
async def test_a_full_disk_fails_no_file_and_the_job_finishes_once_there_is_room(
    env: Env, proxy: FaultProxy, bucket: str, daemons: Daemons
) -> None:
    """A full store is an outage, not a bad file: the daemon stops taking work, sends the job
    back with what landed marked, says why, and finishes it once the disk has room."""
    env.objects.mkdir()
    mount = _run("mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(env.objects))
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mount.stderr.decode().strip()}")
    try:
        config = chaos_config(env, proxy, bucket, store={"kind": "local"},
                              upload={"concurrency": 2})
        daemon = daemons.start(config)
        paths = env.write_files(6, sub="big", size=512 * 1024)
        job_id = f"full-{env.tag}"
        await env.push_job(job_id, [str(p) for p in paths])

        async def paused() -> dict[str, Any] | None:
            events = daemon.events("taking_no_work")
            return events[0] if events else None

        event = await wait_until(paused, 30, "the daemon to stop taking work")
        assert event["cause"] == "store" and "no space left on device" in event["reason"]
        state = await wait_until(lambda: _queued(env, job_id), 30, "the job to go back to its tube")
        assert state["failed"] == "0" and await env.failures(job_id) == {}
        assert not [p for p in env.objects.rglob("*.tmp")]
        assert _run("mount", "-o", "remount,size=8m", str(env.objects)).returncode == 0

        state = await env.wait_final(job_id, 60)
        assert (state["state"], state["uploaded"], state["failed"]) == ("done", "6", "0")
        for path in paths:
            assert (env.objects / key_of(env, job_id, path)).read_bytes() == path.read_bytes()
        assert daemon.events("taking_work_again")
        assert daemon.alive and daemon.stop() == 0
    finally:
        _run("umount", "-l", str(env.objects))


async def _queued(env: Env, job_id: str) -> dict[str, str] | None:
    state = await env.state(job_id)
    return state if state.get("state") == "queued" else None


# --- the long soak: `scripts/soak.sh` (SOAK_SECONDS, default 600); not in the default run ------


@pytest.mark.slow
@pytest.mark.timeout(0)
async def test_soak_random_faults(
    env: Env, tmp_path: Path, moto_endpoint: str, s3: Any, bucket: str, proxy: FaultProxy, daemons: Daemons
) -> None:
    import random

    seconds = float(os.environ.get("SOAK_SECONDS", "600"))
    rng = random.Random(os.environ.get("SOAK_SEED", "uploader"))
    beanstalkd, redis_server = devservers.beanstalkd(binlog=True).start(), protected_redis().start()
    try:
        async with private_env(tmp_path, moto_endpoint, beanstalkd, redis_server, shared=env) as penv:
            config = chaos_config(
                penv, proxy, bucket, redis={"page_size": 25},
                upload={"concurrency": 8, "retry": {"max_attempts": 10, "base": 0.1, "cap": 1.0}},
                store={"s3": {"timeout": 2.5}},
            )
            daemon = daemons.start(config)
            jobs: dict[str, list[Path]] = {}
            faults: Counter[str] = Counter()
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                job_id = f"soak-{penv.tag}-{len(jobs)}"
                count, size = rng.randint(1, 60), rng.randint(0, 50_000)
                jobs[job_id] = penv.write_files(count, sub=f"s{len(jobs)}", size=size)
                await _push_through_outages(penv, job_id, [str(p) for p in jobs[job_id]], rng.choice([5, 30]))
                fault = rng.choice(
                    ["none", "kill", "beanstalkd", "redis", "slowdown", "reset", "delay", "blackhole"]
                )
                faults[fault] += 1
                await asyncio.sleep(rng.uniform(0.2, 2.0))  # let the work get under way
                if fault == "kill":
                    daemon.kill()
                    daemon = daemons.start(config)
                elif fault == "beanstalkd":
                    beanstalkd.stop(kill=True)
                    beanstalkd.start()
                elif fault == "redis":
                    redis_server.stop()
                    await asyncio.sleep(rng.uniform(1, 5))
                    redis_server.start()
                elif fault in ("slowdown", "reset"):
                    proxy.add(Rule(fault, methods=frozenset({"PUT"}), count=rng.randint(5, 40)))
                elif fault == "delay":
                    proxy.add(Rule("delay", delay=rng.uniform(0.1, 1.5), until=time.monotonic() + 5))
                elif fault == "blackhole":
                    proxy.add(Rule("blackhole", until=time.monotonic() + rng.uniform(2, 8)))
            for job_id in jobs:
                state = await wait_final_through_outage(penv, job_id)
                assert (state["state"], state["failed"]) == ("done", "0"), await penv.failures(job_id)
            assert_all_landed(s3, bucket, penv, jobs)
            files = sum(len(p) for p in jobs.values())
            print(f"soak: {seconds:.0f}s, {len(jobs)} jobs, {files} files, 0 lost, faults {dict(faults)}")
            assert daemon.stop() == 0
    finally:
        beanstalkd.stop()
        redis_server.stop()


async def _push_through_outages(env: Env, job_id: str, entries: list[str], ttr: int) -> None:
    """A producer that retries: the list is written whole (MULTI), then the ID is put."""
    key = env.keys.files(job_id)
    while True:
        try:
            async with env.redis.pipeline(transaction=True) as pipe:
                pipe.delete(key)
                pipe.rpush(key, *entries)
                await pipe.execute()
            break
        except (redis.exceptions.ConnectionError, redis.exceptions.BusyLoadingError):
            await asyncio.sleep(0.2)
    await env.put(job_id, ttr=ttr)


async def assert_counted_as_stored(
    penv: Env, s3: Any, bucket: str, job_id: str, files: int
) -> dict[str, str]:
    """The job's counters equal what the bucket holds: each file once, its bytes once."""
    state = await penv.wait_final(job_id, 90)
    assert state["state"] == "done", state
    counted = int(state["uploaded"]) + int(state["skipped"]) + int(state["failed"])
    assert (counted, state["total"], state["failed"]) == (files, str(files), "0"), state
    stored = [
        obj["Size"]
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{job_id}/")
        for obj in page.get("Contents", [])
    ]
    assert len(stored) == files
    assert int(state["bytes"]) == sum(stored), "a file's bytes were counted twice, or not at all"
    return state


def two_sizes(penv: Env, files: int) -> list[str]:
    half = files // 2
    paths = [*penv.write_files(half, sub="a", size=700), *penv.write_files(files - half, sub="b", size=1300)]
    return [str(p) for p in paths]


@pytest.mark.timeout(120)
async def test_two_runs_of_one_job_after_a_beanstalkd_restart_count_each_file_once(
    env: Env, tmp_path: Path, moto_endpoint: str, s3: Any, bucket: str, proxy: FaultProxy, daemons: Daemons
) -> None:
    """beanstalkd restarts from its binlog under a running job and a second daemon reserves it
    at once: the first must notice now, not at its next touch, and no file counts twice."""
    server = devservers.beanstalkd(binlog=True).start()
    try:
        async with private_env(tmp_path, moto_endpoint, beanstalkd=server, shared=env) as penv:
            proxy.add(Rule("delay", methods=frozenset({"PUT"}), delay=0.05))
            job_id = f"twice-{penv.tag}"
            await penv.push_job(job_id, two_sizes(penv, 300), ttr=20)
            one_job = {"upload": {"concurrency": 4}, "source": {"max_active_jobs": 1}}
            first = daemons.start(chaos_config(penv, proxy, bucket, **one_job))
            await wait_until(lambda: uploaded_at_least(penv, job_id, 40), 30, "the first run under way")
            second = daemons.start(chaos_config(penv, proxy, bucket, name="second.toml", **one_job))
            await second.wait_event("ready", 15)

            server.stop(kill=True)
            server.start()  # its binlog puts the held job back to ready: the second daemon takes it
            noticed = await first.wait_event("job_touch_failed", 5)
            assert "closed the connection" in noticed["error"]

            await assert_counted_as_stored(penv, s3, bucket, job_id, 300)
            started, lost = second.events("job_started"), first.events("job_lost")
            if started and not (lost and lost[0]["timestamp"] < started[0]["timestamp"]):
                # the first run still wrote `running` when the second began: that must be said
                # (had the first handed its run back first, the second simply resumed it)
                assert second.events("job_run_overlap"), "a second run began and nothing said so"
            assert first.stop() == 0 and second.stop() == 0
    finally:
        server.stop()


@pytest.mark.timeout(120)
async def test_a_job_whose_ttr_runs_out_mid_run_is_counted_once(
    env: Env, tmp_path: Path, moto_endpoint: str, s3: Any, bucket: str, proxy: FaultProxy, daemons: Daemons
) -> None:
    """A TTR of 2 s and a first daemon that touches too late: beanstalkd hands the job to the
    second daemon while the first is still uploading; both runs upload, each file counts once."""
    proxy.add(Rule("delay", methods=frozenset({"PUT"}), delay=0.05))
    job_id = f"ttr-{env.tag}"
    beanstalk_id = await env.push_job(job_id, two_sizes(env, 400), ttr=2)
    late = {"upload": {"concurrency": 2}, "source": {"max_active_jobs": 1, "min_touch_interval": 3600.0}}
    first = daemons.start(chaos_config(env, proxy, bucket, **late))
    await wait_until(lambda: uploaded_at_least(env, job_id, 10), 30, "the first run under way")
    # beanstalkd 1.12 enforces a TTR late, or not before the holder's next command, while other
    # connections watch the tube; so the second daemon starts once the job is ready again, and
    # a run that finished first (the lapse never came) proves nothing either way.
    conn = await env.conn()
    state = await wait_until(lambda: _job_state(conn, beanstalk_id), 30, "beanstalkd timing the job out")
    if state == "gone":
        pytest.skip("beanstalkd never timed the reservation out: the first run finished alone")
    second = daemons.start(chaos_config(env, proxy, bucket, name="second.toml",
                                        upload={"concurrency": 2}, source={"max_active_jobs": 1}))
    await second.wait_event("job_started", 15)  # the TTR ran out: the job is the second's too
    # The first sees the loss at its next touch, or, had its own run ended first, at its finish.
    await wait_until(lambda: first.events("job_touch_failed") or first.events("job_lost"), 30,
                     "the first daemon to notice that the job is no longer its own")
    await assert_counted_as_stored(env, s3, bucket, job_id, 400)
    assert second.events("job_run_overlap"), "a second run began and nothing said so"
    assert first.stop() == 0 and second.stop() == 0


async def _job_state(conn: Connection, job: int) -> str | None:
    """"ready" once beanstalkd has timed the job out, "gone" once it was deleted, else None."""
    try:
        state = (await conn.stats_job(job)).get("state")
    except NotFound:
        return "gone"
    return state if state == "ready" else None

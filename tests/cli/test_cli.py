"""The command line as a producer and an operator use it: enqueue --wait, status, cancel."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import Env, run_cli, wait_until, write_config
from uploader.cli import jobs as jobctl
from uploader.cli import main as cli
from uploader.config import settings as config_mod
from uploader.dev import servers as devservers
from uploader.source.beanstalkd import placement


def cli_config(env: Env, beanstalkd: str | None = None, redis_url: str | None = None) -> Path:
    path = env.tmp_path / "cli.toml"
    path.write_text(
        f'[source]\naddress = "{beanstalkd or env.beanstalkd}"\ntubes = ["{env.tube}"]\n'
        f'completion_tube = "{env.done_tube}"\n'
        f'[redis]\nurl = "{redis_url or env.redis_url}"\nkey_prefix = "{env.prefix}"\n'
    )
    return path


async def uploader(
    env: Env,
    *args: str | bytes,
    config: bool = True,
    beanstalkd: str | None = None,
    redis_url: str | None = None,
) -> tuple[int, str, str]:
    argv: list[str | bytes] = [sys.executable, "-m", "uploader.cli.main", *args]
    if config:
        argv[4:4] = ["--config", str(cli_config(env, beanstalkd, redis_url))]
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode("utf-8", "replace")


def nowhere() -> str:
    """An address where nothing listens: a port just bound and released."""
    return f"127.0.0.1:{devservers.free_port()}"


def one_line(err: str) -> str:
    """The single stderr line a failed command prints; never a traceback."""
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    return lines[0]


async def test_enqueue_wait_shows_progress_until_done(env: Env) -> None:
    paths = [str(p) for p in env.write_files(40)]
    async with env.daemon(env.config()):
        code, out, err = await uploader(env, "enqueue", "--job", f"cli-{env.tag}", "--wait", *paths)
    assert code == 0, err
    assert out.strip() == f"cli-{env.tag}"
    assert "40/40 files" in err and "done" in err
    assert len([p for p in env.objects.rglob("*") if p.is_file()]) == 40


async def test_enqueue_wait_exits_nonzero_and_lists_failures(env: Env) -> None:
    good = str(env.write_files(1)[0])
    missing = str(env.uploads / "nope.txt")
    async with env.daemon(env.config()):
        code, _, err = await uploader(env, "enqueue", "--job", f"clif-{env.tag}", "--wait", good, missing)
    assert code == 1
    assert "failed" in err and "nope.txt" in err and "file not found" in err


async def test_status_prints_the_progress_hash_and_failures(env: Env) -> None:
    job_id = f"st-{env.tag}"
    await env.redis.hset(env.keys.job(job_id), mapping={"state": "failed", "total": 2, "failed": 1})
    await env.redis.hset(env.keys.failed(job_id), "/srv/x", "file not found")
    code, out, _ = await uploader(env, "status", job_id)
    assert code == 0
    status = json.loads(out)
    assert status["state"] == "failed" and status["failures"] == {"/srv/x": "file not found"}
    code, _, err = await uploader(env, "status", f"unknown-{env.tag}")
    assert code == 1 and "no job" in err


async def test_check_config_names_file_key_and_value(env: Env) -> None:
    bad = env.tmp_path / "bad.toml"
    bad.write_text("[upload]\nconcurrency = 0\n")
    code, out, err = await uploader(env, "check-config", str(bad), config=False)
    assert code == 2 and out == ""
    assert err.strip() == f"uploader: {bad}: [upload].concurrency must be >= 1, got 0"


# --- failures: one line, an exit status that says which kind, nothing half-written ---


async def test_enqueue_with_beanstalkd_down_fails_fast_and_writes_nothing(env: Env) -> None:
    job_id = f"bd-{env.tag}"
    address = nowhere()
    path = str(env.write_files(1)[0])
    started = time.monotonic()

    code, out, err = await uploader(env, "enqueue", "--job", job_id, path, beanstalkd=address)

    assert time.monotonic() - started < 10
    assert (code, out) == (3, "")
    assert one_line(err) == f"uploader: cannot connect to beanstalkd at {address}: Connection refused"
    assert not await env.redis.exists(env.keys.files(job_id), env.keys.job(job_id))


@pytest.mark.parametrize("command", ["status", "enqueue", "cancel"])
async def test_redis_down_is_one_line_naming_the_server(env: Env, command: str) -> None:
    url = f"redis://{nowhere()}/0"
    args = [command, f"rd-{env.tag}"] if command != "enqueue" else [command, str(env.write_files(1)[0])]
    started = time.monotonic()

    code, _, err = await uploader(env, *args, redis_url=url)

    assert time.monotonic() - started < 10
    assert code == 3
    assert one_line(err) == f"uploader: Redis at {url} unreachable: Connection refused"


async def test_enqueue_with_redis_down_puts_nothing_into_beanstalkd(env: Env) -> None:
    code, _, _ = await uploader(
        env, "enqueue", str(env.write_files(1)[0]), redis_url=f"redis://{nowhere()}/0"
    )

    assert code == 3
    conn = await env.conn()
    await conn.watch(env.tube)
    assert await conn.reserve(timeout=0) is None


async def test_enqueue_refuses_a_bad_job_id_before_writing(env: Env) -> None:
    code, _, err = await uploader(env, "enqueue", "--job", "bad id!", str(env.write_files(1)[0]))

    assert code == 2
    assert one_line(err) == "uploader: 'bad id!' is not a job ID (1-200 of A-Z a-z 0-9 . _ : -)"
    assert not await env.redis.exists(env.keys.files("bad id!"), env.keys.job("bad id!"))


async def test_enqueue_refuses_a_file_name_that_is_not_utf8(env: Env) -> None:
    job_id = f"u8-{env.tag}"
    path = bytes(env.uploads) + b"/caf\xe9.txt"

    code, _, err = await uploader(env, "enqueue", "--job", job_id, path)

    assert code == 2
    assert one_line(err) == f"uploader: {env.uploads}/caf\\xe9.txt: path is not valid UTF-8"
    assert not await env.redis.exists(env.keys.files(job_id), env.keys.job(job_id))


async def test_enqueue_refuses_a_path_the_daemon_would_refuse(env: Env) -> None:
    job_id = f"nl-{env.tag}"
    code, _, err = await uploader(env, "enqueue", "--job", job_id, str(env.uploads / "a\nb"))

    assert code == 2
    assert one_line(err).endswith("path contains a control character")
    assert not await env.redis.exists(env.keys.files(job_id), env.keys.job(job_id))


async def test_a_put_that_fails_removes_the_list_and_hash_it_wrote(env: Env) -> None:
    job_id = f"too-big-for-this-server-{env.tag}"
    small = devservers.beanstalkd(max_job_size=8).start()  # the job ID is too big for it
    try:
        code, _, err = await uploader(
            env, "enqueue", "--job", job_id, str(env.uploads / "a"), beanstalkd=small.address
        )
    finally:
        small.stop()

    assert code == 1
    assert one_line(err) == "uploader: beanstalkd refused: put: JOB_TOO_BIG"
    assert not await env.redis.exists(env.keys.files(job_id), env.keys.job(job_id))


async def test_a_usage_error_is_one_line_with_exit_2(env: Env) -> None:
    code, _, err = await uploader(env, "enqueue", "--priority", "-1", "/x")

    assert code == 2
    assert one_line(err).startswith("uploader: argument --priority: must be 0 to 4294967295")


# --- re-using a job ID ---


async def test_enqueue_reuses_a_finished_id_and_resets_the_old_run(env: Env) -> None:
    job_id = f"again-{env.tag}"
    keys = env.keys
    await env.redis.rpush(keys.files(job_id), "/old/a", "/old/b")
    await env.redis.hset(
        keys.job(job_id), mapping={"state": "failed", "total": 2, "failed": 2, "finished_at": 1}
    )
    await env.redis.hset(keys.failed(job_id), "/old/a", "file not found")
    traces = (keys.cancel(job_id), *keys.internal(job_id), *keys.legacy(job_id))  # legacy: pre-0.5 names
    for key in traces:
        await env.redis.set(key, "1")
    path = str(env.write_files(1)[0])

    code, out, err = await uploader(env, "enqueue", "--job", job_id, path)

    assert code == 0, err
    assert out.strip() == job_id
    assert await env.redis.lrange(keys.files(job_id), 0, -1) == [path.encode()]
    state = await env.state(job_id)
    assert state.pop("updated_at").isdigit()
    assert state == {"state": "queued", "total": "1"}
    assert not await env.redis.exists(keys.failed(job_id), *traces)


async def test_enqueue_wait_on_a_reused_id_reports_the_new_run(env: Env) -> None:
    job_id = f"rerun-{env.tag}"
    await env.redis.hset(
        env.keys.job(job_id), mapping={"state": "failed", "total": 9, "failed": 9, "finished_at": 1}
    )
    paths = [str(p) for p in env.write_files(3)]
    async with env.daemon(env.config()):
        code, _, err = await uploader(env, "enqueue", "--job", job_id, "--wait", *paths)

    assert code == 0, err
    assert "3/3 files" in err and "done" in err


async def test_enqueue_refuses_an_id_that_is_still_running(env: Env) -> None:
    job_id = f"busy-{env.tag}"
    await env.redis.rpush(env.keys.files(job_id), "/srv/a")
    await env.redis.hset(env.keys.job(job_id), mapping={"state": "running", "worker": "h1:42"})

    code, _, err = await uploader(env, "enqueue", "--job", job_id, str(env.uploads / "b"))

    assert code == 1
    assert one_line(err) == f"uploader: job {job_id} is running (worker h1:42); cancel it or use another ID"
    assert await env.redis.lrange(env.keys.files(job_id), 0, -1) == [b"/srv/a"]


# --- cancel ---


async def test_cancel_of_a_queued_job_sets_a_flag_that_expires_with_progress(env: Env) -> None:
    job_id = f"c-{env.tag}"
    await env.redis.hset(env.keys.job(job_id), mapping={"state": "queued", "total": 1})
    before = int(time.time())

    code, out, err = await uploader(env, "cancel", job_id)

    assert code == 0, err
    assert out.strip() == f"cancel requested for {job_id}"
    assert before <= int(await env.redis.get(env.keys.cancel(job_id))) <= time.time()
    assert 0 < await env.redis.ttl(env.keys.cancel(job_id)) <= 7 * 24 * 3600


async def test_cancel_of_a_job_put_but_not_started_is_accepted(env: Env) -> None:
    job_id = f"cp-{env.tag}"
    await env.redis.rpush(env.keys.files(job_id), "/srv/a")

    code, _, err = await uploader(env, "cancel", job_id)

    assert code == 0, err
    assert await env.redis.exists(env.keys.cancel(job_id))


async def test_cancel_of_a_finished_job_exits_1(env: Env) -> None:
    job_id = f"cd-{env.tag}"
    await env.redis.hset(env.keys.job(job_id), mapping={"state": "done", "finished_at": 1})

    code, _, err = await uploader(env, "cancel", job_id)

    assert code == 1
    assert one_line(err) == f"uploader: job {job_id} is not queued or running (state done)"
    assert not await env.redis.exists(env.keys.cancel(job_id))


async def test_cancel_of_an_unknown_job_exits_1(env: Env) -> None:
    job_id = f"cu-{env.tag}"

    code, _, err = await uploader(env, "cancel", job_id)

    assert code == 1
    assert one_line(err) == f"uploader: job {job_id} is not queued or running (unknown)"
    assert not await env.redis.exists(env.keys.cancel(job_id))


async def test_cancel_refuses_a_bad_id(env: Env) -> None:
    code, _, err = await uploader(env, "cancel", "no spaces")

    assert code == 2
    assert "is not a job ID" in one_line(err)


# --- --wait on a tube nobody watches; --version ---


async def test_wait_hints_once_when_no_daemon_watches_the_tube(
    env: Env, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(jobctl, "HINT_AFTER", 0.1)
    job_id = f"lonely-{env.tag}"
    argv = ["enqueue", "--config", str(cli_config(env)), "--job", job_id, "--wait", str(env.uploads / "a")]
    running = asyncio.ensure_future(asyncio.to_thread(cli.run, argv))
    seen: list[str] = []

    def hinted() -> bool:
        seen.append(capsys.readouterr().err)
        return "no daemon watches" in "".join(seen)

    await wait_until(hinted, 10, "the hint")
    await env.redis.hset(env.keys.job(job_id), mapping={"state": "cancelled", "finished_at": 1})
    assert await asyncio.wait_for(running, 10) == 1
    err = "".join(seen) + capsys.readouterr().err
    hint = (
        f"uploader: no daemon watches tube '{env.tube}' on {env.beanstalkd} yet;"
        " still waiting (Ctrl-C to stop)"
    )
    assert err.count(hint) == 1


async def test_no_hint_while_a_daemon_watches_the_tube(env: Env) -> None:
    producer = await env.conn()
    await producer.use(env.tube)
    await producer.put(b"x")
    assert await jobctl._unwatched_hint(producer, env.tube) is not None

    watcher = await env.conn()
    await watcher.watch(env.tube)

    assert await jobctl._unwatched_hint(producer, env.tube) is None


async def test_version_names_the_package_version(env: Env) -> None:
    code, out, _ = await uploader(env, "--version", config=False)

    assert (code, out) == (0, "uploader 0.1.0\n")


# --- failed and retry, against a job really buried in beanstalkd ---


async def bury_failed(env: Env, job_id: str, finished_at: int, reasons: dict[str, str]) -> int:
    """What the daemon leaves behind for a failed job: a buried beanstalkd job, the zset member
    and the progress hash naming where it is buried."""
    beanstalk_job = await env.put(job_id)
    worker = await env.conn()
    await worker.watch(env.tube)
    await worker.ignore("default")
    job = await worker.reserve_job(beanstalk_job)
    await worker.bury(job.id)
    await env.redis.zadd(env.keys.failed_jobs, {job_id: finished_at})
    fields = {
        "state": "failed",
        "total": 10,
        "uploaded": 10 - len(reasons),
        "skipped": 0,
        "failed": len(reasons),
        "bytes": 1,
        "finished_at": finished_at,
        "tube": env.tube,
        "beanstalkd": env.beanstalkd,
        "beanstalk_job": beanstalk_job,
    }
    await env.redis.hset(env.keys.job(job_id), mapping=fields)
    await env.redis.hset(env.keys.failed(job_id), mapping=reasons)
    return beanstalk_job


async def test_failed_lists_failed_jobs_newest_first_then_buried_counts(env: Env) -> None:
    await bury_failed(env, f"old-{env.tag}", 1_700_000_000, {"/srv/a": "file not found"})
    reasons = {f"/srv/{i}": "permission denied" for i in range(5)}
    await bury_failed(env, f"new-{env.tag}", 1_700_000_100, reasons)
    await env.put("{not a job")  # buried by the daemon for its body: only a count shows it
    stray = await env.conn()
    await stray.watch(env.tube)
    await stray.ignore("default")
    job = await stray.reserve(timeout=5)
    assert job is not None
    await stray.bury(job.id)

    code, out, err = await uploader(env, "failed")

    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 3
    new, old, counts = (line.split("\t") for line in lines)
    assert new[:4] == [f"new-{env.tag}", env.tube, "5/10 failed", "2023-11-14 22:15:00Z"]
    assert new[4].count("permission denied") == 3
    assert old == [
        f"old-{env.tag}",
        env.tube,
        "1/10 failed",
        "2023-11-14 22:13:20Z",
        "/srv/a: file not found",
    ]
    assert counts == [env.beanstalkd, env.tube, "3 buried"]


async def test_failed_skips_jobs_that_no_longer_say_failed_and_honours_limit(env: Env) -> None:
    for i in range(3):
        await bury_failed(env, f"f{i}-{env.tag}", 1_700_000_000 + i, {"/srv/a": "gone"})
    await env.redis.hset(env.keys.job(f"f2-{env.tag}"), "state", "running")

    code, out, err = await uploader(env, "failed", "--limit", "1")

    assert code == 0, err
    assert [line.split("\t")[0] for line in out.splitlines()[:-1]] == [f"f1-{env.tag}"]


async def test_retry_kicks_a_failed_job_back_to_ready(env: Env) -> None:
    job_id = f"r-{env.tag}"
    beanstalk_job = await bury_failed(env, job_id, 1_700_000_000, {"/srv/a": "gone"})

    code, out, err = await uploader(env, "retry", job_id)

    assert code == 0, err
    assert out.strip() == f"kicked {job_id} (beanstalkd job {beanstalk_job} on {env.beanstalkd})"
    assert (await (await env.conn()).stats_job(beanstalk_job))["state"] == "ready"


async def test_retry_of_a_job_not_failed_exits_1_and_still_kicks_the_others(env: Env) -> None:
    job_id = f"r-{env.tag}"
    beanstalk_job = await bury_failed(env, job_id, 1_700_000_000, {"/srv/a": "gone"})
    await env.redis.hset(env.keys.job(f"ok-{env.tag}"), mapping={"state": "done", "finished_at": 1})

    code, _, err = await uploader(env, "retry", f"ok-{env.tag}", job_id)

    assert code == 1
    assert one_line(err) == f"uploader: job ok-{env.tag} is not failed (state done)"
    assert (await (await env.conn()).stats_job(beanstalk_job))["state"] == "ready"


async def test_retry_all_kicks_every_buried_job_of_the_configured_tubes(env: Env) -> None:
    buried = [await bury_failed(env, f"a{i}-{env.tag}", 1_700_000_000, {"/a": "x"}) for i in range(2)]
    delayed = await env.put("later", delay=3600)

    code, out, err = await uploader(env, "retry", "--all")

    assert code == 0, err
    assert out.splitlines() == [f"{env.beanstalkd}\t{env.tube}\tkicked 2"]
    conn = await env.conn()
    assert [(await conn.stats_job(j))["state"] for j in buried] == ["ready", "ready"]
    assert (await conn.stats_job(delayed))["state"] == "delayed"


async def test_check_config_output_written_back_as_toml_loads_the_same_config(env: Env) -> None:
    data = env.config_data(
        source={
            "address": [env.beanstalkd, "10.0.0.2:11300"],
            "tubes": [env.tube, {"name": "bulk", "weight": 3}],
        },
        limits={"files_per_second": 50.0, "tubes": {"bulk": {"bytes_per_second": 1000.0}}},
    )
    for secret in ("access_key_id", "secret_access_key"):  # printed masked, so never equal
        del data["store"]["s3"][secret]
    data["store"]["s3"]["tagging"] = {"project": "web", "team": "media"}
    original = write_config(env.tmp_path / "original.toml", data)

    code, out, err = await uploader(env, "check-config", str(original), config=False)

    assert code == 0, err
    printed = json.loads(out)
    assert printed["source"]["address"] == [env.beanstalkd, "10.0.0.2:11300"]
    again = write_config(env.tmp_path / "again.toml", printed)
    assert config_mod.load(str(again)) == dataclasses.replace(config_mod.load(str(original)), path=str(again))


async def test_a_job_the_daemon_buried_is_listed_by_failed_and_finished_by_retry(env: Env) -> None:
    """End to end, with what the daemon itself writes: the failed index and the hash's
    beanstalkd job; `retry` runs only the failed file again."""
    paths = env.write_files(3)
    job_id = f"e2e-{env.tag}"
    missing = env.uploads / "late.txt"
    async with env.daemon(env.config()):
        await env.push_job(job_id, [*(str(p) for p in paths), str(missing)])
        assert (await env.wait_final(job_id))["state"] == "failed"
        code, out, err = await uploader(env, "failed")
        assert code == 0, err
        [line] = [line for line in out.splitlines() if job_id in line]
        assert env.tube in line and "1/4" in line and "late.txt" in out
        missing.write_bytes(b"here now")
        code, out, err = await uploader(env, "retry", job_id)
        assert code == 0, err

        async def done() -> dict[str, str] | None:
            state = await env.state(job_id)
            return state if state.get("state") == "done" else None

        state = await wait_until(done, 30, "the retried job to finish")
    assert (state["uploaded"], state["failed"], state["total"]) == ("4", "0", "4")
    code, out, _ = await uploader(env, "failed")
    assert job_id not in out


@pytest.mark.timeout(60)
async def test_enqueue_puts_a_job_on_its_placement_server_and_fails_over(env: Env) -> None:
    """The producer rule (README): a stable hash of the job ID picks the server; when it does
    not answer, the next one in order takes the job."""
    other = devservers.beanstalkd().start()
    dead = nowhere()
    try:
        servers = [env.beanstalkd, other.address]
        path = env.tmp_path / "two.toml"
        data = env.config_data(source={"address": servers})
        write_config(path, data)
        files = [str(p) for p in env.write_files(1)]
        job_ids = [f"spread-{env.tag}-{i}" for i in range(8)]
        for job_id in job_ids:
            code, out, err = await run_cli("enqueue", "--config", str(path), "--job", job_id, *files)
            assert (code, out.strip(), err) == (0, job_id, "")
        expected = {a: sum(placement.order(j, servers)[0] == a for j in job_ids) for a in servers}
        assert 0 < expected[other.address] < len(job_ids), "the IDs chosen spread over both"
        for address, count in expected.items():
            conn = await env.conn(address)
            assert int((await conn.stats_tube(env.tube))["current-jobs-ready"]) == count

        write_config(path, env.config_data(source={"address": [dead, other.address]}))
        first_dead = next(f"dead-{env.tag}-{i}" for i in range(100)
                          if placement.order(f"dead-{env.tag}-{i}", [dead, other.address])[0] == dead)
        code, out, err = await run_cli("enqueue", "--config", str(path), "--job", first_dead, *files)
        assert (code, out.strip(), err) == (0, first_dead, "")
        conn = await env.conn(other.address)
        assert int((await conn.stats_tube(env.tube))["current-jobs-ready"]) == expected[other.address] + 1
    finally:
        other.stop()


def test_placement_is_stable_and_wraps() -> None:
    servers = ["a:1", "b:2", "c:3"]
    first = placement.order("job-42", servers)
    assert first == placement.order("job-42", servers) and sorted(first) == servers
    start = servers.index(first[0])
    assert first == servers[start:] + servers[:start], "the rest follow in order, wrapping"
    assert placement.order("x", []) == []

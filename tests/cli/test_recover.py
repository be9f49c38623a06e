"""`uploader recover`: jobs stranded on a beanstalkd that lost them are put again, each once;
what a live server or a live worker still holds is left alone. And the heartbeat it reads."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.helpers import Env, SlowStore, run_cli, total_uploaded, two_servers, wait_until, write_config
from uploader.dev import servers as devservers
from uploader.dev.servers import Server
from uploader.state.heartbeat import live_workers, workers_key

FILES = 30






async def push(env: Env, job_id: str, files: list[str], server: Server, delay: int = 0) -> None:
    await env.redis.rpush(env.keys.files(job_id), *files)
    await env.put(job_id, address=server.address, delay=delay)


def lose_binlog(server: Server) -> None:
    """kill -9, then its binlog thrown away: it comes back empty on the same port."""
    server.stop(kill=True)
    for name in os.listdir(server.workdir):
        if name.startswith("binlog."):
            os.remove(os.path.join(server.workdir, name))
    server.start()


async def tube_total(env: Env, server: Server, tube: str) -> int:
    conn = await env.conn(server.address)
    try:
        return int((await conn.stats_tube(tube))["total-jobs"])
    except Exception:
        return 0


async def recover(config: Path, *args: str) -> tuple[int, list[str]]:
    code, out, err = await run_cli("recover", "--config", str(config), "--older-than", "0", *args)
    assert "Traceback" not in err, err
    return code, out.splitlines()


def listed(lines: list[str], word: str) -> list[str]:
    return sorted(line.split("\t")[1] for line in lines if line.startswith(word + "\t"))


@pytest.mark.timeout(150)
async def test_recover_after_a_lost_binlog_runs_every_stranded_job_once(env: Env) -> None:
    async with two_servers(env) as (penv, first, second):
        files = [str(p) for p in penv.write_files(FILES, size=64)]
        data = penv.config_data(source={"address": [first.address, second.address], "max_active_jobs": 3},
                                upload={"concurrency": 2})
        config_path = write_config(penv.tmp_path / "two.toml", data)
        config = penv.config(**{k: v for k, v in data.items() if k in ("source", "upload")})
        tag = penv.tag
        finished, on_b = f"fin-{tag}", [f"b-{tag}-{i}" for i in range(5)]

        async with penv.daemon(config, store=SlowStore(config.store.local, 0.05)) as daemon:
            await push(penv, finished, files, first)
            assert (await penv.wait_final(finished, 30))["state"] == "done"
            for job_id in on_b:  # at most 3 held: the others wait in B, never started
                await push(penv, job_id, files, second)
            await wait_until(lambda: _at_least(penv, on_b, 6), 30, "B's jobs under way")
            lose_binlog(second)
            await wait_until(lambda: _none_running(penv, on_b), 10, "B's held jobs handed back")
            worker = daemon.worker
        assert worker not in await live_workers(penv.redis, penv.keys, time.time()), "it left at its stop"
        states = {j: (await penv.state(j)).get("state") for j in on_b}
        running = [j for j in on_b if states[j] == "queued"]
        waiting = [j for j in on_b if states[j] is None]
        assert running and waiting and len(running) + len(waiting) == len(on_b), states

        # What live servers hold is not stranded: a new job on B with a recycled beanstalkd job
        # ID (1), jobs ready and delayed on A with no progress hash yet.
        fresh, on_a, delayed = f"fresh-{tag}", [f"a-{tag}-{i}" for i in range(2)], f"later-{tag}"
        await push(penv, fresh, files, second)
        for job_id in on_a:
            await push(penv, job_id, files, first)
        await push(penv, delayed, files, first, delay=3600)
        stranded = sorted(on_b)
        puts = await tube_total(penv, first, penv.tube) + await tube_total(penv, second, penv.tube)

        code, lines = await recover(config_path, "--dry-run")
        assert code == 0, lines
        assert listed(lines, "stranded") == stranded, lines
        assert puts == await tube_total(penv, first, penv.tube) + await tube_total(penv, second, penv.tube)

        started = time.monotonic()
        code, lines = await recover(config_path)
        took = time.monotonic() - started
        assert code == 0, lines
        assert listed(lines, "recovered") == stranded, lines
        assert lines[-1] == "5 stranded of 9 unfinished jobs; put again: 5", lines
        code, again = await recover(config_path)
        assert (code, listed(again, "recovered")) == (0, []), again

        everything = [*stranded, fresh, *on_a]
        async with penv.daemon(config, store=SlowStore(config.store.local, 0.05)):
            for job_id in everything:
                state = await penv.wait_final(job_id, 60)
                assert (state["state"], state["uploaded"], state["failed"]) == ("done", str(FILES), "0")
        assert puts + len(stranded) == (
            await tube_total(penv, first, penv.tube) + await tube_total(penv, second, penv.tube)
        ), "a job put more than once"
        done_tube = penv.done_tube
        announced = await tube_total(penv, first, done_tube) + await tube_total(penv, second, done_tube)
        assert announced == 1 + len(everything), "every job finished once, the first one included"
        assert "recovered" in (await penv.state(running[0]))["note"]
        assert (await penv.state(delayed)) == {}
    print(f"recover put {len(stranded)} stranded jobs again in {took:.2f} s")


async def _state(env: Env, job_id: str, state: str) -> bool:
    return (await env.state(job_id)).get("state") == state


async def _none_running(env: Env, job_ids: list[str]) -> bool:
    return not any([await _state(env, j, "running") for j in job_ids])


async def _at_least(env: Env, job_ids: list[str], count: int) -> bool:
    return await total_uploaded(env, job_ids) >= count


@pytest.mark.timeout(60)
async def test_recover_leaves_a_job_that_a_live_worker_runs(env: Env) -> None:
    """A `running` hash whose worker's heartbeat is fresh is that worker's, wherever its server."""
    config = write_config(env.tmp_path / "one.toml", env.config_data())
    job_id = f"live-{env.tag}"
    await env.redis.rpush(env.keys.files(job_id), "/srv/none")
    await env.redis.hset(env.keys.job(job_id), mapping={
        "state": "running", "worker": "elsewhere:1", "updated_at": 1, "beanstalkd": "127.0.0.1:1",
        "beanstalk_job": 7,
    })
    await env.redis.zadd(workers_key(env.keys), {"elsewhere:1": time.time()})
    code, lines = await recover(config, "--dry-run")
    assert (code, listed(lines, "stranded")) == (0, []), lines
    await env.redis.zadd(workers_key(env.keys), {"elsewhere:1": time.time() - 3600})  # dead now
    code, lines = await recover(config, "--dry-run")
    assert (code, listed(lines, "stranded")) == (0, [job_id]), lines
    assert any(line.startswith("beanstalkd 127.0.0.1:1 unreachable") for line in lines), lines


@pytest.mark.timeout(60)
async def test_recover_skips_jobs_younger_than_older_than(env: Env) -> None:
    """A producer between its RPUSH and its put is left alone: the default age is an hour."""
    config = write_config(env.tmp_path / "one.toml", env.config_data())
    await env.redis.rpush(env.keys.files(f"young-{env.tag}"), "/srv/none")
    code, out, err = await run_cli("recover", "--config", str(config), "--dry-run")
    assert (code, err) == (0, ""), err
    assert out.splitlines()[-1] == "0 stranded of 0 unfinished jobs; put again: 0"


@pytest.mark.timeout(60)
async def test_recover_errors_are_one_line(env: Env, tmp_path: Path) -> None:
    dead = f"redis://127.0.0.1:{devservers.free_port()}/0"
    config = write_config(tmp_path / "bad.toml", env.config_data(redis={"url": dead}))
    code, out, err = await run_cli("recover", "--config", str(config))
    assert code == 3 and out == "" and len(err.splitlines()) == 1 and err.startswith("uploader: Redis at")
    code, _, err = await run_cli("recover", "--config", str(config), "--older-than", "-1")
    assert code == 2 and len(err.splitlines()) == 1, err


@pytest.mark.timeout(30)
async def test_a_daemon_heartbeat_says_it_is_alive_until_it_stops(env: Env) -> None:
    config = env.config()
    async with env.daemon(config) as daemon:
        await wait_until(lambda: _alive(env, daemon.worker), 10, "the first heartbeat")
        assert await env.redis.ttl(workers_key(env.keys)) > 0, "the key expires when nobody beats"
    assert not await _alive(env, daemon.worker)


async def _alive(env: Env, worker: str) -> bool:
    return worker in await live_workers(env.redis, env.keys, time.time())


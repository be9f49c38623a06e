"""The command line as a producer and an operator use it: enqueue --wait, status, cancel."""

from __future__ import annotations

import asyncio
import json
import sys

from tests.helpers import Env, wait_until


async def uploader(env: Env, *args: str, config: bool = True) -> tuple[int, str, str]:
    argv = [sys.executable, "-m", "uploader.cli", *args]
    if config:
        path = env.tmp_path / "cli.toml"
        path.write_text(
            f'[source]\naddress = "{env.beanstalkd}"\ntubes = ["{env.tube}"]\n'
            f'completion_tube = "{env.done_tube}"\n'
            f'[redis]\nurl = "{env.redis_url}"\nkey_prefix = "{env.prefix}"\n'
        )
        argv[4:4] = ["--config", str(path)]
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


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


async def test_cancel_sets_the_contract_key(env: Env) -> None:
    code, out, _ = await uploader(env, "cancel", f"c-{env.tag}")
    assert code == 0 and "cancel requested" in out
    assert await wait_until(lambda: env.redis.get(env.keys.cancel(f"c-{env.tag}")), 5, "cancel key") == b"1"


async def test_check_config_names_file_key_and_value(env: Env) -> None:
    bad = env.tmp_path / "bad.toml"
    bad.write_text("[upload]\nconcurrency = 0\n")
    code, out, err = await uploader(env, "check-config", str(bad), config=False)
    assert code == 2 and out == ""
    assert err.strip() == f"uploader: {bad}: [upload].concurrency must be >= 1, got 0"

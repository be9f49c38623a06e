"""A new job's short way through Redis (state/probe.py, the lazy start, CLOSE) and through
beanstalkd (no keeper, no touch, reused connections): as exact and as visible as the long way."""

from __future__ import annotations

import json
import uuid

import pytest
import redis.asyncio as aioredis
import redis.exceptions
import structlog

from tests.helpers import Env, HeldStore, local_store, wait_until
from uploader.config.settings import RedisConfig
from uploader.dev.servers import Server
from uploader.pipeline.jobs import QUICK_JOB
from uploader.redisio import Keys
from uploader.source.base import Delivery
from uploader.source.beanstalkd.wire import Connection
from uploader.state.progress import Progress

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def direct(redis_server: Server) -> aioredis.Redis:
    client = aioredis.Redis.from_url(f"redis://{redis_server.address}/0")
    yield client  # type: ignore[misc]
    await client.aclose()


async def test_a_one_file_job_is_announced_once_on_each_channel_and_its_keys_expire(env: Env) -> None:
    job_id = f"one-{env.tag}"
    [path] = env.write_files(1)
    pubsub = env.redis.pubsub()
    await pubsub.subscribe(env.keys.events)
    await env.redis.set(env.keys.cancel("unrelated"), 1)  # another job's flag: no matter
    with structlog.testing.capture_logs() as logged:
        async with env.daemon(env.config()):
            await env.push_job(job_id, [str(path)])
            [message] = await env.completions(1)
            state = await env.wait_final(job_id)
    # One line for a quick job, which says what job_started would have said.
    lines = [e for e in logged if e["event"] in ("job_started", "job_finished")]
    assert [e["event"] for e in lines] == ["job_finished"]
    assert lines[0]["run"] == "fresh" and lines[0]["tube"] == env.tube and lines[0]["beanstalk_job"] > 0
    events = []
    while (event := await pubsub.get_message(timeout=0.5)) is not None:  # until quiet
        if event["type"] == "message":
            events.append(json.loads(event["data"]))
    await pubsub.aclose()
    assert events == [message], "published once, the same message as the completion tube's"
    assert message == {"id": job_id, "state": "done", "total": 1, "uploaded": 1, "skipped": 0, "failed": 0,
                       "bytes": path.stat().st_size, "seconds": message["seconds"]}
    assert (state["state"], state["uploaded"], state["total"]) == ("done", "1", "1")
    written = {"worker", "started_at", "finished_at", "beanstalkd", "beanstalk_job", "put_at", "tube"}
    assert written <= state.keys()
    ttl = env.config().redis.progress_ttl
    for key in (env.keys.job(job_id), env.keys.marks(job_id), env.keys.finished_jobs):
        assert 0 < await env.redis.ttl(key) <= ttl, f"{key} must expire"
    assert await env.redis.zscore(env.keys.finished_jobs, job_id) is not None


async def test_a_new_job_shows_running_within_a_flush_interval_before_any_file_is_done(env: Env) -> None:
    job_id = f"slow-{env.tag}"
    store = HeldStore(local_store(env), allow=0)
    with structlog.testing.capture_logs() as logged:
        async with env.daemon(env.config(), store=store):
            await env.push_job(job_id, [str(p) for p in env.write_files(3)])

            async def running() -> dict[str, str] | None:
                state = await env.state(job_id)
                return state if state.get("state") == "running" else None

            state = await wait_until(running, 5, "the lazy start written")
            assert (state["total"], state["uploaded"], state["failed"]) == ("3", "0", "0")
            await wait_until(lambda: any(e["event"] == "job_started" for e in logged), 5, "job_started")
            store.gate.set()
            final = await env.wait_final(job_id)
    assert (final["state"], final["uploaded"]) == ("done", "3")
    # A job that outlasts QUICK_JOB says it started, once, and then that it finished.
    lines = [e for e in logged if e["event"] in ("job_started", "job_finished")]
    assert [e["event"] for e in lines] == ["job_started", "job_finished"]
    assert lines[0]["run"] == "fresh" and lines[0]["since"] >= QUICK_JOB and lines[1]["run"] == "logged"


async def test_a_cancel_flag_set_before_a_new_job_starts_cancels_it(env: Env) -> None:
    job_id = f"pre-{env.tag}"
    store = HeldStore(local_store(env), allow=0)
    await env.redis.set(env.keys.cancel(job_id), 1)
    async with env.daemon(env.config(), store=store):
        await env.push_job(job_id, [str(p) for p in env.write_files(3)])
        [message] = await env.completions(1)
    assert message["state"] == "cancelled" and store.order == []
    assert not await env.redis.exists(env.keys.cancel(job_id))


async def test_a_lazy_start_that_meets_another_runs_hash_takes_starts_way_and_counts_exactly(
    direct: aioredis.Redis,
) -> None:
    """Between the first read and the first write another worker started the job: the lazy start
    is refused (nothing applied), START decides, and every entry counts once."""
    keys = Keys(prefix=f"test-{uuid.uuid4().hex[:8]}:")
    delivery = Delivery("127.0.0.1:11300", 7, 1_700_000_000, "uploads")
    a, b = (Progress(direct, keys, RedisConfig(), w) for w in ("a:1", "b:2"))
    a.start_lazily("job", 6, delivery)
    assert await b.start("job", 6, delivery) == "resume"
    for index in (0, 1, 2):
        b.record("job", index, "uploaded", 10)
    await b.flush()
    for index in (1, 2, 3):  # 1 and 2 uploaded by both runs
        a.record("job", index, "uploaded", 10)
    await a.flush()  # APPLY answers -1: START, then the batch again
    state = {k.decode(): v.decode() for k, v in (await direct.hgetall(keys.job("job"))).items()}
    assert (state["uploaded"], state["bytes"], state["worker"]) == ("4", "40", "a:1")
    for index in (4, 5):
        a.record("job", index, "skipped")
    message = await a.finish("job", 0.5)
    assert (message["state"], message["uploaded"], message["skipped"], message["bytes"]) == ("done", 4, 2, 40)
    assert await direct.bitcount(keys.marks("job")) == 6


async def test_a_close_that_meets_another_runs_hash_finishes_by_the_long_way(direct: aioredis.Redis) -> None:
    keys = Keys(prefix=f"test-{uuid.uuid4().hex[:8]}:")
    a, b = (Progress(direct, keys, RedisConfig(), w) for w in ("a:1", "b:2"))
    a.start_lazily("job", 2, None)
    await b.start("job", 2)
    b.record("job", 0, "uploaded", 5)
    await b.flush()
    a.record("job", 0, "uploaded", 5)
    a.record("job", 1, "uploaded", 5)
    message = await a.finish("job", 0.1)  # CLOSE answers -1: START, then the final write
    assert (message["state"], message["uploaded"], message["bytes"]) == ("done", 2, 10)
    assert await direct.ttl(keys.job("job")) > 0 and await direct.ttl(keys.marks("job")) > 0


async def test_a_close_resent_after_a_lost_reply_counts_nothing_twice(direct: aioredis.Redis) -> None:
    """CLOSE is applied, its reply lost, and the final write runs again: the lazy start is seen
    as written, START resumes the finished run, and the verdict and counts stay as they were."""
    keys = Keys(prefix=f"test-{uuid.uuid4().hex[:8]}:")
    progress = Progress(direct, keys, RedisConfig(), "a:1")
    progress.start_lazily("job", 3, Delivery("127.0.0.1:11300", 9, 1_700_000_000, "uploads"))
    for index in range(3):
        progress.record("job", index, "uploaded", 7)
    calls = 0
    close = progress._final.close

    async def lossy(closing: object) -> object:
        nonlocal calls
        calls += 1
        result = await close(closing)  # type: ignore[arg-type]
        if calls == 1:
            raise redis.exceptions.ConnectionError("reply lost")  # an outage: until_done sends it again
        return result

    progress._final.close = lossy  # type: ignore[method-assign,assignment]
    message = await progress.finish("job", 0.2)
    assert calls == 2
    assert (message["state"], message["uploaded"], message["bytes"]) == ("done", 3, 21)
    state = await direct.hgetall(keys.job("job"))
    assert (state[b"state"], state[b"uploaded"]) == (b"done", b"3")


@pytest.mark.timeout(120)
async def test_a_stream_of_short_jobs_reuses_its_beanstalkd_connections(env: Env) -> None:
    producer = await Connection.connect(env.beanstalkd)
    await producer.use(env.tube)
    before = int((await producer.stats())["total-connections"])
    paths = [str(p) for p in env.write_files(200)]
    config = env.config(source={"max_active_jobs": 8})
    async with env.daemon(config):
        for i, path in enumerate(paths):  # one at a time, as a web frontend's requests come
            await env.redis.rpush(env.keys.files(f"s{i}-{env.tag}"), path)
            await producer.put(f"s{i}-{env.tag}".encode())
        messages = await env.completions(200, timeout=60)
    stats = await producer.stats()
    await producer.close()
    assert sorted(m["state"] for m in messages) == ["done"] * 200
    opened = int(stats["total-connections"]) - before
    # Reserving connections, the probe's and the completion producer's: far fewer than jobs.
    assert opened <= config.source.max_active_jobs + 6, opened


async def test_a_close_that_finds_acknowledged_outcomes_lost_writes_the_ledger_again(
    direct: aioredis.Redis,
) -> None:
    """A failover took an acknowledged batch (marks and counts): CLOSE sees a mark missing and
    answers -2, and the long way writes the whole ledger again: counts exact."""
    keys = Keys(prefix=f"test-{uuid.uuid4().hex[:8]}:")
    progress = Progress(direct, keys, RedisConfig(), "a:1")
    await progress.start("job", 5)
    for index in range(4):
        progress.record("job", index, "uploaded", 10)
    await progress.flush()
    await direct.delete(keys.marks("job"))  # the promoted replica never had the batch
    await direct.hset(keys.job("job"), mapping={"uploaded": 0, "bytes": 0})
    progress.record("job", 4, "uploaded", 10)
    message = await progress.finish("job", 1.0)
    assert (message["state"], message["uploaded"], message["bytes"]) == ("done", 5, 50)
    assert await direct.bitcount(keys.marks("job")) == 5

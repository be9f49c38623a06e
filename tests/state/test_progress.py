"""Progress batches against a real redis-server: counts are exact even when a reply is lost."""

from __future__ import annotations

import asyncio
import contextlib
import random
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import redis.asyncio as aioredis
import structlog.testing

from uploader.config.settings import RedisConfig
from uploader.dev.servers import Server
from uploader.redisio import Keys
from uploader.state.progress import Progress

pytestmark = pytest.mark.timeout(30)


class ReplyDropper:
    """A TCP hop to Redis that, once armed, lets the next progress batch through but never delivers its
    reply: the connection closes as if Redis had stopped right after applying the batch, or
    with `hold` stays open and silent, as a reply stuck in a dying network would."""

    def __init__(self, upstream: str, hold: bool = False) -> None:
        host, port = upstream.rsplit(":", 1)
        self._upstream = (host, int(port))
        self._hold = hold
        self.armed = False
        self.dropped = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return f"redis://127.0.0.1:{port}/0"

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection(*self._upstream)
        exec_sent = asyncio.Event()

        async def upstream() -> None:
            while data := await client_r.read(65536):
                if self.armed and b"EVALSHA" in data:
                    exec_sent.set()
                server_w.write(data)
                await server_w.drain()

        async def downstream() -> None:
            while data := await server_r.read(65536):
                if exec_sent.is_set() and b"*" in data:
                    self.armed = False
                    self.dropped.set()
                    if self._hold:
                        await asyncio.Event().wait()
                    return
                client_w.write(data)
                await client_w.drain()

        pumps = [asyncio.create_task(upstream()), asyncio.create_task(downstream())]
        self._tasks.update(pumps)
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pump in pumps:
                pump.cancel()
            for writer in (client_w, server_w):
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()


@asynccontextmanager
async def progress_through(
    redis_server: Server, hold: bool = False
) -> AsyncIterator[tuple[ReplyDropper, Progress, Keys]]:
    """A Progress whose Redis connection runs through a ReplyDropper, on keys of its own."""
    dropper = ReplyDropper(redis_server.address, hold=hold)
    client = aioredis.Redis.from_url(await dropper.start())
    keys = Keys(prefix=f"test-{uuid.uuid4().hex[:8]}:")
    try:
        yield dropper, Progress(client, keys, RedisConfig(), "test:1"), keys
    finally:
        await client.aclose()
        await dropper.close()


@pytest.fixture
async def direct(redis_server: Server) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(f"redis://{redis_server.address}/0")
    yield client
    await client.aclose()


async def test_a_batch_whose_reply_is_lost_is_counted_once(
    redis_server: Server, direct: aioredis.Redis
) -> None:
    async with progress_through(redis_server) as (dropper, progress, keys):
        await progress.start("job", 20)
        for i in range(10):
            progress.record("job", i, "uploaded", 100)
        progress.record("job", 10, "failed", label="/x", reason="gone")
        dropper.armed = True
        await progress.flush()  # applied, reply lost, sent again on a new connection
        assert dropper.dropped.is_set(), "the proxy never dropped a reply: the test proved nothing"

        for i in range(11, 15):
            progress.record("job", i, "skipped")
        await progress.flush()

        state = {k.decode(): v.decode() for k, v in (await direct.hgetall(keys.job("job"))).items()}
        counts = (state["uploaded"], state["skipped"], state["failed"], state["bytes"])
        assert counts == ("10", "4", "1", "1000")
        assert await direct.hgetall(keys.failed("job")) == {b"/x": b"gone"}
        assert await direct.bitcount(keys.marks("job")) == 14


async def test_a_flush_cancelled_after_redis_applied_it_is_resent_and_counted_once(
    redis_server: Server, direct: aioredis.Redis
) -> None:
    """Shutdown cancels a flush whose batch Redis has already applied; the final flush sends
    that batch again, and it must not add up twice."""
    async with progress_through(redis_server, hold=True) as (dropper, progress, keys):
        await progress.start("job", 5)
        for i in range(3):
            progress.record("job", i, "uploaded", 10)
        dropper.armed = True
        flushing = asyncio.create_task(progress.flush())
        await asyncio.wait_for(dropper.dropped.wait(), 10)
        assert await direct.hget(keys.job("job"), "uploaded") == b"3", "Redis applied the batch"
        flushing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await flushing

        progress.record("job", 3, "uploaded", 10)
        await progress.flush()
        state = await direct.hgetall(keys.job("job"))
        assert (state[b"uploaded"], state[b"bytes"]) == (b"4", b"40")


ENTRIES = 40


def size(index: int) -> int:
    return 1 + index


def kind(index: int) -> str:
    """The same file gives the same outcome to every run: stored already, or uploaded."""
    return "skipped" if index % 5 == 0 else "uploaded"


async def assert_counters_match_what_is_stored(direct: aioredis.Redis, keys: Keys, seed: int) -> None:
    state = {k.decode(): int(v) for k, v in (await direct.hgetall(keys.job("job"))).items()
             if k in (b"uploaded", b"skipped", b"failed", b"bytes")}
    bitmap = await direct.get(keys.marks("job")) or b""
    marked = [i for i in range(ENTRIES) if i // 8 < len(bitmap) and bitmap[i // 8] & (0x80 >> (i % 8))]
    # index -> label NUL reason
    stored = await direct.hgetall(keys.failing("job"))
    failing = {int(k): v.decode().split("\0")[0] for k, v in stored.items()}
    reasons = {k.decode() for k in await direct.hkeys(keys.failed("job"))}
    assert state.get("uploaded", 0) == sum(kind(i) == "uploaded" for i in marked), seed
    assert state.get("skipped", 0) == sum(kind(i) == "skipped" for i in marked), seed
    assert state.get("bytes", 0) == sum(size(i) for i in marked if kind(i) == "uploaded"), seed
    assert state.get("failed", 0) == len(failing), seed
    assert not set(failing) & set(marked), f"seed {seed}: an entry counts as failed and as done"
    assert reasons == set(failing.values()), seed


async def play(seed: int, direct: aioredis.Redis, redis_server: Server) -> None:
    """Two runs of one job, their outcomes interleaved at random, batches flushed at random
    and some sent again (a lost reply); the second run may start in the middle."""
    rng = random.Random(seed)
    keys = Keys(prefix=f"prop-{seed}-{uuid.uuid4().hex[:6]}:")
    client = aioredis.Redis.from_url(f"redis://{redis_server.address}/0")
    runs = [Progress(client, keys, RedisConfig(), worker) for worker in ("a:1", "b:2")]
    sent: list[tuple[Progress, dict[str, list[object]]]] = []
    for run in runs:
        write = run._write

        async def remembered(batch: dict[str, list[object]], run: Progress = run, write=write) -> None:  # type: ignore[no-untyped-def]
            sent.append((run, batch))
            await write(batch)  # type: ignore[arg-type]

        run._write = remembered  # type: ignore[method-assign]
    await runs[0].start("job", ENTRIES)
    todo = [rng.sample(range(ENTRIES), rng.randint(ENTRIES // 2, ENTRIES)) for _ in runs]
    b_started = False
    try:
        while any(todo):
            who = rng.choice([r for r in range(2) if todo[r]])
            if who == 1 and not b_started:
                await runs[1].start("job", ENTRIES)
                b_started = True
            index = todo[who].pop()
            if rng.random() < 0.2:
                runs[who].record("job", index, "failed", label=f"/f/{index}", reason=f"gone ({who})")
            else:
                runs[who].record("job", index, kind(index), size(index) if kind(index) == "uploaded" else 0)
            roll = rng.random()
            if roll < 0.15:
                await runs[rng.randrange(2)].flush()
            elif roll < 0.22 and sent:
                run, batch = rng.choice(sent)
                await run._write(batch)  # type: ignore[arg-type]
            await assert_counters_match_what_is_stored(direct, keys, seed)
        for run in runs:
            await run.flush()
        await assert_counters_match_what_is_stored(direct, keys, seed)
        # A last run uploads whatever is left: every entry then counts exactly once.
        for index in range(ENTRIES):
            runs[0].record("job", index, kind(index), size(index) if kind(index) == "uploaded" else 0)
        await runs[0].flush()
        await assert_counters_match_what_is_stored(direct, keys, seed)
        state = await direct.hgetall(keys.job("job"))
        assert int(state[b"uploaded"]) + int(state[b"skipped"]) == ENTRIES, seed
        assert int(state[b"failed"]) == 0, seed
    finally:
        await client.aclose()


@pytest.mark.timeout(120)
async def test_two_runs_interleaved_with_resends_count_each_entry_once(
    redis_server: Server, direct: aioredis.Redis
) -> None:
    for seed in range(150):
        await play(seed, direct, redis_server)


async def test_a_failure_is_taken_back_when_another_run_uploads_the_entry(direct: aioredis.Redis) -> None:
    keys = Keys(prefix=f"test-{uuid.uuid4().hex[:8]}:")
    a, b = (Progress(direct, keys, RedisConfig(), w) for w in ("a:1", "b:2"))
    await a.start("job", 2)
    a.record("job", 0, "failed", label="/x", reason="timed out")
    await a.flush()
    assert (await direct.hget(keys.job("job"), "failed"), await direct.hlen(keys.failed("job"))) == (b"1", 1)
    b.record("job", 0, "uploaded", 5)
    b.record("job", 1, "uploaded", 5)
    a.record("job", 1, "failed", label="/y", reason="late")  # after b's upload: no failure
    await b.flush()
    await a.flush()
    state = await direct.hgetall(keys.job("job"))
    assert (state[b"uploaded"], state[b"failed"], state[b"bytes"]) == (b"2", b"0", b"10")
    assert await direct.hlen(keys.failed("job")) == 0
    assert await a.finish("job", 1.0) == {"id": "job", "state": "done", "total": 2, "uploaded": 2,
                                          "skipped": 0, "failed": 0, "bytes": 10, "seconds": 1.0}


async def test_a_second_run_starting_while_another_writes_progress_is_logged(direct: aioredis.Redis) -> None:
    keys = Keys(prefix=f"test-{uuid.uuid4().hex[:8]}:")
    a, b = (Progress(direct, keys, RedisConfig(), w) for w in ("host-a:1", "host-b:2"))
    await a.start("job", 3)
    a.record("job", 0, "uploaded", 1)
    await a.flush()
    with structlog.testing.capture_logs() as logged:
        await b.start("job", 3)
        await a.start("job", 3)  # itself again, just after b: b is the other run now
    overlaps = [e for e in logged if e["event"] == "job_run_overlap"]
    assert [e["other_worker"] for e in overlaps] == ["host-a:1", "host-b:2"]
    await direct.hset(keys.job("job"), "updated_at", 0)  # long quiet: a crashed run, not a live one
    with structlog.testing.capture_logs() as logged:
        await b.start("job", 3)
    assert not [e for e in logged if e["event"] == "job_run_overlap"]


async def test_a_sparse_batch_and_its_resend_count_each_entry_once(direct: aioredis.Redis) -> None:
    """Entries far apart in one batch take the bit-by-bit path (no megabyte bitmap): the same
    counts, also when the batch arrives twice and partly overlaps an earlier one."""
    keys = Keys(prefix=f"test-{uuid.uuid4().hex[:8]}:")
    progress = Progress(direct, keys, RedisConfig(), "a:1")
    await progress.start("job", 2_000_001)
    for index in (0, 7, 1_000_000, 2_000_000):
        progress.record("job", index, "uploaded", 10)
    progress.record("job", 500_000, "skipped")
    await progress.flush()
    for index in (7, 2_000_000, 3):  # two sent again, one new
        progress.record("job", index, "uploaded", 10)
    await progress.flush()
    state = await direct.hgetall(keys.job("job"))
    assert (state[b"uploaded"], state[b"skipped"], state[b"bytes"]) == (b"5", b"1", b"50")
    assert await direct.bitcount(keys.marks("job")) == 6
    assert await direct.strlen(keys.marks("job")) == 2_000_000 // 8 + 1


async def test_a_job_half_done_under_the_old_key_names_resumes_from_its_marks(direct: aioredis.Redis) -> None:
    """The upgrade path: marks, walk digests and failures kept under 0.4's names are renamed
    when the job starts again, so nothing is uploaded again or counted twice."""
    keys = Keys(prefix=f"test-{uuid.uuid4().hex[:8]}:")
    old_marks, old_walk, old_failing, old_applied = keys.legacy("job")
    await direct.hset(keys.job("job"), mapping={"state": "running", "total": 4, "uploaded": 2, "skipped": 0,
                                                "failed": 0, "bytes": 20, "started_at": 1, "updated_at": 1})
    await direct.setbit(old_marks, 0, 1)
    await direct.setbit(old_marks, 1, 1)
    await direct.hset(old_walk, "0", "digest")
    await direct.hset(old_applied, "w", "1")
    progress = Progress(direct, keys, RedisConfig(), "a:1")
    assert await progress.start("job", 4) == "resume"
    assert not await direct.exists(old_marks, old_walk, old_failing, old_applied)
    assert await direct.bitcount(keys.marks("job")) == 2
    assert await direct.hget(keys.walk("job"), "0") == b"digest"
    for index in (1, 2, 3):  # 1 was uploaded by the old version already
        progress.record("job", index, "uploaded", 10)
    message = await progress.finish("job", 1.0)
    assert (message["uploaded"], message["bytes"], message["state"]) == (4, 40, "done")


async def test_the_final_write_puts_back_what_a_failover_took(direct: aioredis.Redis) -> None:
    """A promoted replica may lack the last acknowledged writes (marks and counts together,
    since a script replicates whole): the run's ledger writes them again at the finish."""
    keys = Keys(prefix=f"test-{uuid.uuid4().hex[:8]}:")
    progress = Progress(direct, keys, RedisConfig(), "a:1")
    await progress.start("job", 6)
    for index in range(4):
        progress.record("job", index, "uploaded", 10)
    progress.record("job", 4, "failed", label="/e", reason="gone")
    await progress.flush()
    # The failover: Redis is back as it was after the start, before any progress write.
    await direct.delete(keys.marks("job"), keys.failing("job"), keys.failed("job"))
    await direct.hset(keys.job("job"), mapping={"uploaded": 0, "failed": 0, "bytes": 0})
    progress.record("job", 5, "skipped")
    message = await progress.finish("job", 1.0)
    assert (message["uploaded"], message["skipped"], message["failed"], message["bytes"]) == (4, 1, 1, 40)
    assert message["state"] == "failed"
    assert await direct.bitcount(keys.marks("job")) == 5
    assert await direct.hgetall(keys.failed("job")) == {b"/e": b"gone"}

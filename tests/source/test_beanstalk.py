"""The beanstalkd client against a real beanstalkd: commands, typed errors, lost connections."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest

from tests.helpers import wait_until
from uploader.dev import servers as devservers
from uploader.dev.servers import Server
from uploader.source.beanstalkd.wire import (
    BadFormat,
    Connection,
    ConnectionLost,
    DeadlineSoon,
    JobTooBig,
    NotFound,
    NotIgnored,
    Producer,
    UnknownCommand,
    connect_with_backoff,
)


@pytest.fixture
def tube() -> str:
    return f"bt-{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def conn(beanstalkd_server: Server) -> AsyncIterator[Connection]:
    c = await Connection.connect(beanstalkd_server.address)
    yield c
    await c.close()


@pytest.fixture
async def other(beanstalkd_server: Server) -> AsyncIterator[Connection]:
    """A second client: a producer, or an observer reading stats."""
    c = await Connection.connect(beanstalkd_server.address)
    yield c
    await c.close()


@pytest.fixture
def private_server() -> Iterator[Server]:
    """A beanstalkd of this test's own, free to be stopped and restarted."""
    server = devservers.beanstalkd().start()
    yield server
    server.stop()


async def put_into(c: Connection, tube: str, body: bytes = b"x", **kw: int) -> int:
    await c.use(tube)
    return await c.put(body, **kw)


async def watch_only(c: Connection, tube: str) -> None:
    await c.watch(tube)
    await c.ignore("default")


async def waiting_on(observer: Connection, tube: str, count: int = 1) -> bool:
    stats = await observer.stats_tube(tube)
    return int(stats["current-waiting"]) >= count


# --- commands ---


async def test_put_then_reserve_returns_the_body(conn: Connection, other: Connection, tube: str) -> None:
    job_id = await put_into(other, tube, b"job-42")
    await watch_only(conn, tube)

    job = await conn.reserve(timeout=5)

    assert job is not None
    assert (job.id, job.body) == (job_id, b"job-42")


async def test_watch_and_ignore_return_the_watch_count(conn: Connection, tube: str) -> None:
    assert await conn.watch(tube) == 2
    assert await conn.watch(tube + "-b") == 3
    assert await conn.ignore("default") == 2
    assert await conn.ignore(tube + "-b") == 1


async def test_reserve_only_takes_from_watched_tubes(conn: Connection, other: Connection, tube: str) -> None:
    await put_into(other, tube + "-unwatched")
    await watch_only(conn, tube)

    assert await conn.reserve(timeout=0) is None


async def test_reserve_with_timeout_on_empty_tube_is_none(conn: Connection, tube: str) -> None:
    await watch_only(conn, tube)

    assert await conn.reserve(timeout=0) is None
    assert not conn.closed


async def test_delete_removes_the_job(conn: Connection, other: Connection, tube: str) -> None:
    job_id = await put_into(other, tube)
    await watch_only(conn, tube)
    job = await conn.reserve(timeout=5)
    assert job is not None

    await conn.delete(job.id)

    with pytest.raises(NotFound):
        await other.stats_job(job_id)


async def test_touch_extends_the_ttr(conn: Connection, other: Connection, tube: str) -> None:
    await put_into(other, tube, ttr=5)
    await watch_only(conn, tube)
    job = await conn.reserve(timeout=5)
    assert job is not None

    async def time_left() -> int:
        return int((await other.stats_job(job.id))["time-left"])

    async def ran_down() -> bool:
        return await time_left() <= 3

    # Let more than a second of the TTR run out, then touch: the clock starts over.
    await wait_until(ran_down, timeout=10, what="the TTR to run down")
    await conn.touch(job.id)

    assert await time_left() >= 4
    assert (await other.stats_job(job.id))["state"] == "reserved"


async def test_release_with_priority_and_delay(conn: Connection, other: Connection, tube: str) -> None:
    await put_into(other, tube, priority=100)
    await watch_only(conn, tube)
    job = await conn.reserve(timeout=5)
    assert job is not None

    await conn.release(job.id, priority=7, delay=30)

    stats = await other.stats_job(job.id)
    assert (stats["state"], stats["pri"], stats["delay"], stats["releases"]) == ("delayed", "7", "30", "1")


async def test_release_without_delay_makes_the_job_ready(
    conn: Connection, other: Connection, tube: str
) -> None:
    await put_into(other, tube)
    await watch_only(conn, tube)
    job = await conn.reserve(timeout=5)
    assert job is not None

    await conn.release(job.id)

    assert (await other.stats_job(job.id))["state"] == "ready"


async def test_bury_then_kick_job(conn: Connection, other: Connection, tube: str) -> None:
    await put_into(other, tube)
    await watch_only(conn, tube)
    job = await conn.reserve(timeout=5)
    assert job is not None

    await conn.bury(job.id, priority=9)
    stats = await other.stats_job(job.id)
    assert (stats["state"], stats["pri"], stats["buries"]) == ("buried", "9", "1")
    assert (await other.stats_tube(tube))["current-jobs-buried"] == "1"

    await other.kick_job(job.id)
    assert (await other.stats_job(job.id))["state"] == "ready"


async def test_kick_returns_buried_jobs_of_the_used_tube_to_ready(
    conn: Connection, other: Connection, tube: str
) -> None:
    ids = [await put_into(other, tube) for _ in range(3)]
    await watch_only(conn, tube)
    for _ in ids:
        job = await conn.reserve(timeout=5)
        assert job is not None
        await conn.bury(job.id)

    await other.use(tube)
    assert await other.kick(2) == 2
    assert await other.kick(1_000_000) == 1
    assert [(await other.stats_job(i))["state"] for i in ids] == ["ready"] * 3


async def test_kick_with_nothing_buried_or_delayed_kicks_none(other: Connection, tube: str) -> None:
    await put_into(other, tube)

    assert await other.kick(10) == 0


async def test_kick_job_of_a_ready_job_is_not_found(other: Connection, tube: str) -> None:
    job_id = await put_into(other, tube)

    with pytest.raises(NotFound):
        await other.kick_job(job_id)


async def test_connect_to_nothing_names_the_os_reason() -> None:
    address = f"127.0.0.1:{devservers.free_port()}"
    with pytest.raises(ConnectionLost) as caught:
        await Connection.connect(address, timeout=2)
    assert str(caught.value) == f"cannot connect to beanstalkd at {address}: Connection refused"


async def test_stats_job_describes_the_job(other: Connection, tube: str) -> None:
    job_id = await put_into(other, tube, priority=5, delay=0, ttr=77)

    stats = await other.stats_job(job_id)

    assert stats["id"] == str(job_id)
    assert (stats["tube"], stats["state"], stats["pri"], stats["ttr"]) == (tube, "ready", "5", "77")


async def test_stats_tube_counts_jobs(other: Connection, tube: str) -> None:
    for _ in range(3):
        await put_into(other, tube)
    await put_into(other, tube, delay=60)

    stats = await other.stats_tube(tube)

    assert stats["name"] == tube
    counts = (stats["current-jobs-ready"], stats["current-jobs-delayed"], stats["total-jobs"])
    assert counts == ("3", "1", "4")


async def test_peek_and_reserve_job_by_id(conn: Connection, other: Connection, tube: str) -> None:
    job_id = await put_into(other, tube, b"peeked")

    assert (await other.peek(job_id)).body == b"peeked"
    job = await conn.reserve_job(job_id)
    assert (job.id, job.body) == (job_id, b"peeked")


async def test_binary_body_with_crlf_round_trips(conn: Connection, other: Connection, tube: str) -> None:
    body = b"a\r\nb\r\n\x00\xff" * 100
    await put_into(other, tube, body)
    await watch_only(conn, tube)

    job = await conn.reserve(timeout=5)

    assert job is not None
    assert job.body == body


# --- typed errors ---


async def test_delete_of_unknown_id_is_not_found(conn: Connection) -> None:
    with pytest.raises(NotFound):
        await conn.delete(2**40)
    assert not conn.closed


async def test_body_over_the_limit_is_job_too_big_and_the_connection_survives(
    conn: Connection, tube: str
) -> None:
    await conn.use(tube)
    assert await conn.put(b"x" * 65535) > 0  # the default -z limit itself is accepted

    with pytest.raises(JobTooBig):
        await conn.put(b"x" * 65536)

    assert await conn.put(b"after") > 0  # the server skipped the body: still in step


async def test_private_server_job_size_limit() -> None:
    server = devservers.beanstalkd(max_job_size=16).start()
    try:
        c = await Connection.connect(server.address)
        try:
            assert await c.put(b"x" * 16) > 0
            with pytest.raises(JobTooBig):
                await c.put(b"x" * 17)
        finally:
            await c.close()
    finally:
        await asyncio.to_thread(server.stop)


async def test_ignoring_the_last_watched_tube_is_not_ignored(conn: Connection) -> None:
    with pytest.raises(NotIgnored):
        await conn.ignore("default")
    assert await conn.watch("default") == 1  # still in step


async def test_invalid_tube_name_is_bad_format(conn: Connection) -> None:
    with pytest.raises(BadFormat):
        await conn.use("-starts-with-a-dash")
    await conn.use("ok")


async def test_raw_bad_format_and_unknown_command(conn: Connection) -> None:
    # The client never sends these itself; the raw call checks the error word mapping.
    with pytest.raises(BadFormat):
        await conn._call(b"touch notanumber")
    with pytest.raises(UnknownCommand):
        await conn._call(b"frobnicate")
    await conn.use("still-in-step")


async def test_put_refused_as_bad_format_drops_the_connection(conn: Connection, tube: str) -> None:
    # beanstalkd does not read the body of a put it cannot parse; it would run it as a command.
    await conn.use(tube)
    with pytest.raises(BadFormat):
        await conn.put(b"stats", priority=2**32)
    assert conn.closed
    with pytest.raises(ConnectionLost):
        await conn.stats()


async def test_line_break_in_a_tube_name_is_never_sent(conn: Connection, tube: str) -> None:
    with pytest.raises(BadFormat):
        await conn.use(f"{tube}\r\nput 0 0 1 1")
    assert not conn.closed
    await conn.use(tube)


async def test_reserve_in_the_last_second_of_a_held_job_is_deadline_soon(
    conn: Connection, other: Connection, tube: str
) -> None:
    await put_into(other, tube, ttr=1)
    await watch_only(conn, tube)
    assert await conn.reserve(timeout=5) is not None

    with pytest.raises(DeadlineSoon):
        await conn.reserve(timeout=1)


# --- connections ---


async def test_connect_to_nothing_is_connection_lost() -> None:
    with pytest.raises(ConnectionLost):
        await Connection.connect(f"127.0.0.1:{devservers.free_port()}", timeout=2)


async def test_server_dying_mid_reserve_is_connection_lost_not_none(
    private_server: Server, tube: str
) -> None:
    c = await Connection.connect(private_server.address)
    observer = await Connection.connect(private_server.address)
    await watch_only(c, tube)
    reserving = asyncio.create_task(c.reserve(timeout=60))
    await wait_until(lambda: waiting_on(observer, tube), timeout=10, what="the reserve to block")
    await observer.close()

    await asyncio.to_thread(private_server.stop)

    with pytest.raises(ConnectionLost):
        await asyncio.wait_for(reserving, 10)
    assert c.closed
    with pytest.raises(ConnectionLost):
        await c.stats()


async def test_closing_a_connection_releases_its_reservation(
    beanstalkd_server: Server, other: Connection, tube: str
) -> None:
    job_id = await put_into(other, tube)
    a = await Connection.connect(beanstalkd_server.address)
    await watch_only(a, tube)
    assert await a.reserve(timeout=5) is not None
    assert (await other.stats_job(job_id))["state"] == "reserved"

    await a.close()

    async def ready() -> bool:
        return (await other.stats_job(job_id))["state"] == "ready"

    await wait_until(ready, timeout=10, what="the job to be ready again")


async def test_cancelling_a_reserve_closes_the_connection_and_frees_the_job(
    beanstalkd_server: Server, other: Connection, tube: str
) -> None:
    a = await Connection.connect(beanstalkd_server.address)
    await watch_only(a, tube)
    reserving = asyncio.create_task(a.reserve())
    await wait_until(lambda: waiting_on(other, tube), timeout=10, what="the reserve to block")

    # A raw producer: its write leaves at once, so beanstalkd may hand the job to `a` before
    # the cancellation lands. Either way the job must end up ready and nothing out of step.
    reader, writer = await asyncio.open_connection(*beanstalkd_server.address.split(":"))
    writer.write(f"use {tube}\r\nput 0 0 60 3\r\nabc\r\n".encode())
    reserving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reserving
    assert a.closed
    assert (await reader.readuntil(b"\r\n")).startswith(b"USING")
    reply = await reader.readuntil(b"\r\n")
    writer.close()
    await writer.wait_closed()
    assert reply.startswith(b"INSERTED ")
    job_id = int(reply.split()[1])

    async def ready() -> bool:
        return (await other.stats_job(job_id))["state"] == "ready"

    await wait_until(ready, timeout=10, what="the job to be ready again")
    b = await Connection.connect(beanstalkd_server.address)
    try:
        await watch_only(b, tube)
        job = await b.reserve(timeout=5)
        assert job is not None
        assert (job.id, job.body) == (job_id, b"abc")
    finally:
        await b.close()


async def test_connect_with_backoff_waits_for_the_server() -> None:
    server = devservers.beanstalkd()  # not started yet
    retries: list[float] = []
    connecting = asyncio.create_task(
        connect_with_backoff(server.address, base=0.02, cap=0.1, on_retry=lambda _exc, d: retries.append(d))
    )
    try:
        await wait_until(lambda: len(retries) >= 2, timeout=10, what="failed connection attempts")
        assert not connecting.done()
        await asyncio.to_thread(server.start)

        c = await asyncio.wait_for(connecting, 10)
        try:
            assert "version" in await c.stats()
        finally:
            await c.close()
        assert all(0 <= d <= 0.1 for d in retries)
    finally:
        connecting.cancel()
        await asyncio.to_thread(server.stop)


async def test_producer_reconnects_after_a_server_restart(private_server: Server, tube: str) -> None:
    producer = Producer(private_server.address, tube)
    try:
        await producer.put(b"before")
        await asyncio.to_thread(private_server.stop)
        await asyncio.to_thread(private_server.start)  # same port, empty (no binlog)

        await asyncio.wait_for(producer.put(b"after"), 15)

        c = await Connection.connect(private_server.address)
        try:
            await watch_only(c, tube)
            job = await c.reserve(timeout=5)
            assert job is not None
            assert job.body == b"after"
        finally:
            await c.close()
    finally:
        await producer.close()

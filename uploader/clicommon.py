"""What every `uploader` command shares: the exit statuses, the one-line error, the config it
reads, the event loop it runs on, and the servers it reaches under a deadline."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Coroutine
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, TypeVar

import redis.exceptions

from uploader import config as config_mod
from uploader import redisio
from uploader.beanstalk import Connection, ConnectionLost
from uploader.config import Config
from uploader.redisio import Keys

if TYPE_CHECKING:
    from redis.asyncio import Redis

T = TypeVar("T")
DEFAULT_CONFIG = os.environ.get("UPLOADER_CONFIG", "/etc/uploader/uploader.toml")
OK, NO, USAGE, UNREACHABLE = 0, 1, 2, 3
BUG = 70  # an error nobody foresaw: still one line, but a bug to report
CONNECT_TIMEOUT = 3.0  # seconds to reach Redis or beanstalkd before saying it is unreachable
REPLY_TIMEOUT = 10.0  # seconds a connected server may take to answer one command


class CliError(Exception):
    """A failure told in one line; `code` is the exit status."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def load_config(path: str | None, required: bool) -> Config:
    """The named config; the default path when it exists; else built-in defaults."""
    if path is not None or required or os.path.exists(DEFAULT_CONFIG):
        return config_mod.load(path or DEFAULT_CONFIG)
    return Config()


def run_async(main: Coroutine[Any, Any, int]) -> int:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def reason(exc: BaseException) -> str:
    """The innermost OS reason ("Connection refused"), else the error's own words."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, TimeoutError):
            return "timed out"
        if isinstance(seen, OSError) and seen.errno:
            return os.strerror(seen.errno)
        seen = seen.__cause__ or seen.__context__
    return str(exc) or type(exc).__name__


# --- servers: fail fast, and say which one ---


@asynccontextmanager
async def redis_keys(config: Config) -> AsyncIterator[tuple[Redis, Keys]]:
    """A client that gives up after CONNECT_TIMEOUT, its outages told as one line naming it,
    and the config's key names: every command that reads Redis needs both."""
    client = redisio.connect(config.redis, connect_timeout=CONNECT_TIMEOUT, reply_timeout=REPLY_TIMEOUT,
                             retry=False)
    try:
        yield client, Keys(config.redis.key_prefix)
    except Exception as exc:
        if not redisio.is_outage(exc) and not isinstance(exc, redis.exceptions.RedisClusterException):
            raise
        raise CliError(f"{redisio.describe(config.redis)} unreachable: {reason(exc)}", UNREACHABLE) from None
    finally:
        await client.aclose()


async def connect(address: str) -> Connection:
    return await Connection.connect(address, timeout=CONNECT_TIMEOUT)


async def within(conn: Connection, call: Awaitable[T]) -> T:
    """A beanstalkd reply within REPLY_TIMEOUT: a server that connects but never answers is down."""
    try:
        async with asyncio.timeout(REPLY_TIMEOUT):
            return await call
    except TimeoutError:
        await conn.close()
        raise ConnectionLost(f"beanstalkd at {conn.address} did not answer in {REPLY_TIMEOUT:g} s") from None

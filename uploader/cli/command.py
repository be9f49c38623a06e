"""What every `uploader` command shares: the exit statuses, the one-line error, the config it
reads, the event loop it runs on, and Redis reached under the same deadlines as the job
source's servers (source/base.py)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import redis.exceptions

from uploader import redisio
from uploader.config import settings as config_mod
from uploader.config.settings import Config
from uploader.redisio import Keys
from uploader.source.base import CONNECT_TIMEOUT, REPLY_TIMEOUT

if TYPE_CHECKING:
    from redis.asyncio import Redis

DEFAULT_CONFIG = os.environ.get("UPLOADER_CONFIG", "/etc/uploader/uploader.toml")
OK, NO, USAGE, UNREACHABLE = 0, 1, 2, 3
BUG = 70  # an error nobody foresaw: still one line, but a bug to report


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

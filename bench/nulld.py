"""`uploader run` with a store that keeps nothing: what is left is the daemon's own work.

Reserving, manifest paging, scheduling, opening and checking each file, progress and marks
all run as in production; only the transfer is skipped.
"""

from __future__ import annotations

import argparse
import asyncio

from uploader import logs
from uploader.config import settings as config_mod
from uploader.daemon import Daemon
from uploader.entries.files import SourceFile
from uploader.stores.base import PutRequest, PutResult, StoredObject


class NullStore:
    """Accepts every file at once; the protocol of `uploader.stores.base.Store`."""

    async def start(self) -> None:
        return None

    async def put(self, source: SourceFile, request: PutRequest) -> PutResult:
        return PutResult(bytes_sent=source.size)

    def memory_needed(self, size: int) -> int:
        return 0

    async def stat(self, key: str, checksum: bool = False) -> StoredObject | None:
        return None

    def conditional(self, size: int) -> bool:
        return False

    async def check(self) -> None:
        return None

    async def close(self) -> None:
        return None


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("command", choices=["run"])
    p.add_argument("--config", required=True)
    args = p.parse_args()
    config = config_mod.load(args.config)
    logs.configure(config.daemon.log_level, config.daemon.log_format)

    async def run() -> None:
        await Daemon(config, store=NullStore()).run()

    try:
        import uvloop
    except ImportError:
        asyncio.run(run())
    else:
        uvloop.run(run())


if __name__ == "__main__":
    main()

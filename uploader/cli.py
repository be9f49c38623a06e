"""Command line: run the daemon, enqueue a job as a producer would, inspect and cancel jobs."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import uuid
from collections.abc import Coroutine, Sequence
from typing import TYPE_CHECKING, Any

from uploader import config as config_mod
from uploader import redisio
from uploader.beanstalk import DEFAULT_PRIORITY, Producer
from uploader.config import Config
from uploader.errors import ConfigError

if TYPE_CHECKING:
    from redis.asyncio import Redis

DEFAULT_CONFIG = os.environ.get("UPLOADER_CONFIG", "/etc/uploader/uploader.toml")
FINAL_STATES = {"done", "failed", "cancelled"}


def _load(path: str | None, required: bool) -> Config:
    """The named config; the default path when it exists; else built-in defaults."""
    if path is not None or required or os.path.exists(DEFAULT_CONFIG):
        return config_mod.load(path or DEFAULT_CONFIG)
    return Config()


def _run_async(main: Coroutine[Any, Any, int]) -> int:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def cmd_run(args: argparse.Namespace) -> int:
    from uploader import logs
    from uploader.daemon import Daemon

    config = _load(args.config, required=True)
    logs.configure(config.daemon.log_level, config.daemon.log_format)

    async def main() -> int:
        await Daemon(config).run()
        return 0

    return _run_async(main())


def cmd_check_config(args: argparse.Namespace) -> int:
    config = config_mod.load(args.path)
    print(json.dumps(config_mod.redacted(config), indent=2))
    return 0


def cmd_enqueue(args: argparse.Namespace) -> int:
    config = _load(args.config, required=False)
    job_id = args.job or uuid.uuid4().hex
    tube = args.tube or config.source.tubes[0].name
    entries = [os.path.abspath(p) for p in args.paths]

    async def main() -> int:
        redis = redisio.connect(config.redis.url, decode=True)
        keys = redisio.Keys(config.redis.key_prefix)
        try:
            async with redis.pipeline(transaction=False) as pipe:
                pipe.delete(keys.files(job_id))
                for i in range(0, len(entries), 1000):
                    pipe.rpush(keys.files(job_id), *entries[i : i + 1000])
                pipe.hset(
                    keys.job(job_id),
                    mapping={"state": "queued", "total": len(entries), "updated_at": int(time.time())},
                )
                await pipe.execute()
            producer = Producer(config.source.addresses[0], tube)
            try:
                await producer.put(job_id.encode(), priority=args.priority, ttr=args.ttr)
            finally:
                await producer.close()
            print(job_id)
            if not args.wait:
                return 0
            return await _watch(redis, keys, job_id)
        finally:
            await redis.aclose()

    return _run_async(main())


async def _watch(redis: Redis, keys: redisio.Keys, job_id: str) -> int:
    """Draw a progress bar on stderr until the job reaches a final state."""
    while True:
        raw = await redis.hgetall(keys.job(job_id))
        state = redisio.text_map(raw)
        total = int(state.get("total", 0) or 0)
        settled = sum(int(state.get(k, 0) or 0) for k in ("uploaded", "skipped", "failed"))
        width = 30
        filled = width if total == 0 else min(width, width * settled // max(total, 1))
        sys.stderr.write(
            f"\r[{'#' * filled}{'.' * (width - filled)}] {settled}/{total} files, "
            f"{int(state.get('bytes', 0) or 0):,} bytes, {state.get('state', '?'):<9}"
        )
        sys.stderr.flush()
        if state.get("state") in FINAL_STATES:
            sys.stderr.write("\n")
            if state["state"] != "done":
                failed = redisio.text_map(await redis.hgetall(keys.failed(job_id)))
                for path, reason in list(failed.items())[:20]:
                    sys.stderr.write(f"  failed: {path}: {reason}\n")
            return 0 if state["state"] == "done" else 1
        await asyncio.sleep(0.2)


def cmd_status(args: argparse.Namespace) -> int:
    config = _load(args.config, required=False)

    async def main() -> int:
        redis = redisio.connect(config.redis.url, decode=True)
        keys = redisio.Keys(config.redis.key_prefix)
        try:
            raw = await redis.hgetall(keys.job(args.job))
            if not raw:
                print(f"no job {args.job!r} (unknown, or its progress expired)", file=sys.stderr)
                return 1
            status: dict[str, object] = dict(redisio.text_map(raw))
            failed = await redis.hgetall(keys.failed(args.job))
            if failed:
                status["failures"] = redisio.text_map(failed)
            print(json.dumps(status, indent=2, sort_keys=True))
            return 0
        finally:
            await redis.aclose()

    return _run_async(main())


def cmd_cancel(args: argparse.Namespace) -> int:
    config = _load(args.config, required=False)

    async def main() -> int:
        redis = redisio.connect(config.redis.url, decode=True)
        try:
            await redis.set(redisio.Keys(config.redis.key_prefix).cancel(args.job), 1)
            print(f"cancel requested for {args.job}")
            return 0
        finally:
            await redis.aclose()

    return _run_async(main())


def cmd_demo(args: argparse.Namespace) -> int:
    from uploader.demo import run_demo

    code: int = run_demo(files=args.files)
    return code


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="uploader", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the daemon")
    run.add_argument("--config", help=f"config file (default {DEFAULT_CONFIG})")
    run.set_defaults(func=cmd_run)

    check = sub.add_parser("check-config", help="validate a config file and print it, secrets masked")
    check.add_argument("path")
    check.set_defaults(func=cmd_check_config)

    enqueue = sub.add_parser("enqueue", help="submit a job as a producer would")
    enqueue.add_argument("--config")
    enqueue.add_argument("--job", help="job ID (default: a random one)")
    enqueue.add_argument("--tube", help="tube (default: the first configured)")
    enqueue.add_argument("--priority", type=int, default=DEFAULT_PRIORITY)
    enqueue.add_argument("--ttr", type=int, default=60)
    enqueue.add_argument("--wait", action="store_true", help="show progress until the job finishes")
    enqueue.add_argument("paths", nargs="+")
    enqueue.set_defaults(func=cmd_enqueue)

    status = sub.add_parser("status", help="print a job's progress")
    status.add_argument("--config")
    status.add_argument("job")
    status.set_defaults(func=cmd_status)

    cancel = sub.add_parser("cancel", help="cancel a job: pending files are skipped")
    cancel.add_argument("--config")
    cancel.add_argument("job")
    cancel.set_defaults(func=cmd_cancel)

    demo = sub.add_parser("demo", help="run the daemon on a sample job, end to end")
    demo.add_argument("--files", type=int, default=200)
    demo.set_defaults(func=cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        print(f"uploader: {exc}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()

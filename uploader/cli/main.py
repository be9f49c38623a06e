"""Command line: run the daemon, enqueue a job as a producer would, inspect, cancel and retry jobs.

Every failure is one line on stderr, `uploader: ...`, never a traceback, and the exit status
says which kind it was: 0 ok, 1 the answer is no (job failed, not found, not cancellable),
2 bad usage, config or input, 3 a server (Redis or beanstalkd) unreachable.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import sys
from collections.abc import Sequence
from typing import NoReturn

import redis.exceptions

from uploader.cli import jobs
from uploader.cli.command import (
    BUG,
    DEFAULT_CONFIG,
    NO,
    OK,
    UNREACHABLE,
    USAGE,
    CliError,
    load_config,
    reason,
    run_async,
)
from uploader.config import settings as config_mod
from uploader.errors import ConfigError
from uploader.source.base import DEFAULT_PRIORITY, SourceRefused, SourceUnavailable

MAX_UINT32 = 2**32 - 1


def _uint32(value: str) -> int:
    """An argparse type: beanstalkd's priorities and TTRs are 32-bit unsigned."""
    number = int(value)
    if not 0 <= number <= MAX_UINT32:
        raise argparse.ArgumentTypeError(f"must be 0 to {MAX_UINT32}, got {number}")
    return number


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {number}")
    return number


def _seconds(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, got {value!r}") from None
    if not 0 <= number < float("inf"):
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return number


# --- commands ---


def cmd_run(args: argparse.Namespace) -> int:
    from uploader import logs
    from uploader.daemon import Daemon

    config = load_config(args.config, required=True)
    logs.configure(config.daemon.log_level, config.daemon.log_format)

    async def main() -> int:
        await Daemon(config).run()
        return OK

    return run_async(main())


def cmd_check_config(args: argparse.Namespace) -> int:
    config = config_mod.load(args.path)
    print(json.dumps(config_mod.redacted(config), indent=2))
    return OK


def cmd_demo(args: argparse.Namespace) -> int:
    from uploader.cli.demo import run_demo

    code: int = run_demo(files=args.files)
    return code


def version() -> str:
    try:
        return importlib.metadata.version("uploader")
    except importlib.metadata.PackageNotFoundError:
        import uploader

        return str(getattr(uploader, "__version__", "unknown"))


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line like every other failure."""

    def error(self, message: str) -> NoReturn:
        self.exit(USAGE, f"uploader: {message} (see {self.prog} --help)\n")


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="uploader", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"uploader {version()}")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the daemon")
    run.add_argument("--config", help=f"config file (default {DEFAULT_CONFIG})")
    run.set_defaults(func=cmd_run)

    check = sub.add_parser("check-config", help="validate a config file and print it, secrets masked")
    check.add_argument("path")
    check.set_defaults(func=cmd_check_config)

    _add_enqueue(sub)
    _add_job_commands(sub)

    demo = sub.add_parser("demo", help="run the daemon on a sample job, end to end")
    demo.add_argument("--files", type=int, default=200)
    demo.set_defaults(func=cmd_demo)
    return p


def _add_enqueue(sub: argparse._SubParsersAction[_Parser]) -> None:
    enqueue = sub.add_parser("enqueue", help="submit a job as a producer would")
    enqueue.add_argument("--config")
    enqueue.add_argument("--job", help="job ID (default: a random one); a finished job's ID may be reused")
    enqueue.add_argument("--tube", help="tube (default: the first configured)")
    enqueue.add_argument("--priority", type=_uint32, default=DEFAULT_PRIORITY)
    enqueue.add_argument("--ttr", type=_uint32, default=60)
    enqueue.add_argument("--wait", action="store_true", help="show progress until the job finishes")
    enqueue.add_argument("paths", nargs="+")
    enqueue.set_defaults(func=jobs.cmd_enqueue)


def _add_job_commands(sub: argparse._SubParsersAction[_Parser]) -> None:
    """The operator's commands on jobs already enqueued."""
    status = sub.add_parser("status", help="print a job's progress")
    status.add_argument("--config")
    status.add_argument("job")
    status.set_defaults(func=jobs.cmd_status)

    cancel = sub.add_parser("cancel", help="cancel a queued or running job: pending files are skipped")
    cancel.add_argument("--config")
    cancel.add_argument("job")
    cancel.set_defaults(func=jobs.cmd_cancel)

    failed = sub.add_parser("failed", help="list failed jobs, newest first, and buried counts per tube")
    failed.add_argument("--config")
    failed.add_argument("--tube", help="only this tube (default: every configured tube)")
    failed.add_argument("--limit", type=_positive, default=100, help="at most this many jobs (default 100)")
    failed.set_defaults(func=jobs.cmd_failed)

    retry = sub.add_parser("retry", help="kick failed jobs back to ready")
    retry.add_argument("--config")
    retry.add_argument("--all", action="store_true", help="every buried job of every configured tube")
    retry.add_argument("jobs", nargs="*", metavar="ID")
    retry.set_defaults(func=jobs.cmd_retry)

    from uploader.cli import recover as recover_mod

    recover = sub.add_parser("recover", help="put again the jobs a lost beanstalkd stranded")
    recover.add_argument("--config")
    recover.add_argument("--older-than", type=_seconds, default=recover_mod.DEFAULT_OLDER_THAN, metavar="S",
                         help="only jobs untouched this many seconds (default %(default)s)")
    recover.add_argument("--dry-run", action="store_true", help="list them, put nothing")
    recover.set_defaults(func=recover_mod.cmd_recover)


def describe(exc: BaseException) -> tuple[str, int]:
    """The one line and the exit status for an error that reached the top."""
    if isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        return describe(exc.exceptions[0])
    if isinstance(exc, CliError):
        return str(exc), exc.code
    if isinstance(exc, ConfigError):
        return str(exc), USAGE
    if isinstance(exc, SourceUnavailable):
        return str(exc), UNREACHABLE
    if isinstance(exc, SourceRefused):
        return str(exc), NO
    if isinstance(exc, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError):
        return f"Redis unreachable: {reason(exc)}", UNREACHABLE
    if isinstance(exc, redis.exceptions.RedisError):
        return f"Redis: {exc}", NO
    if isinstance(exc, OSError):
        return f"{exc.filename + ': ' if exc.filename else ''}{reason(exc)}", UNREACHABLE
    return f"unexpected error, please report it: {type(exc).__name__}: {exc}", BUG


def run(argv: Sequence[str] | None = None) -> int:
    """Run one command: its exit status, every failure told in one line, never a traceback."""
    args = parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - every failure is told in one line, none escapes
        message, code = describe(exc)
        print(f"uploader: {message}", file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> None:
    sys.exit(run(argv))


if __name__ == "__main__":
    main()

"""The `redis` step (section 6): what the daemon costs Redis per file, for a daemon that starts
on a full queue. Each workload gets a fresh redis-server (nothing else talks to it) behind a
counting proxy, and a fresh null-store daemon."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from dataclasses import dataclass
from typing import Any

from bench.common import DaemonProc, daemon_origin, log_stamp, make_tree, median, push_lists, put_ids
from bench.harness import Bench, top_calls
from bench.rediscost import CountingProxy, Info, InfoReader, ProxyStats, redis_delta
from uploader.dev import servers as devservers

REDIS_WORKLOADS = ((1, 10_000), (100, 300), (500, 1))


def bench_redis(bench: Bench) -> None:
    """Per file: commands Redis ran, round trips, Redis CPU, for a daemon that starts on a
    full queue. Each workload gets a fresh redis-server (nothing else talks to it) behind a
    counting proxy, and a fresh null-store daemon."""
    paths = make_tree(os.path.join(bench.src, "redis"), 10_000, 64)
    origin = daemon_origin(bench.work)
    bench.log(f"redis: the daemon's uploader is {origin}")
    runs: dict[str, list[dict[str, Any]]] = {}
    for r in range(bench.runs):
        for jobs_n, per_job in REDIS_WORKLOADS:
            m = redis_cost(bench, paths, jobs_n, per_job, r)
            runs.setdefault(f"{jobs_n}x{per_job}", []).append(m)
            bench.log(
                f"redis run {r + 1} {jobs_n} x {per_job}: {m['commands_per_file']:.2f} commands/file, "
                f"{m['round_trips_per_file']:.3f} round trips/file, "
                f"{m['redis_cpu_us_per_file']:.1f} us Redis CPU/file, {m['files_per_s']:,.0f} files/s, "
                f"top: {top_calls(m['calls'], 4)}"
            )
    _redis_rows(bench, origin, runs)
    bench.results["redis"] = {"uploader": origin, "runs": runs}


def _redis_rows(bench: Bench, origin: str, runs: dict[str, list[dict[str, Any]]]) -> None:
    sec = f"6. Redis cost per file, null store, fresh daemon and redis-server per workload ({origin})"
    for jobs_n, per_job in REDIS_WORKLOADS:
        ms = runs[f"{jobs_n}x{per_job}"]

        def med(key: str, ms: list[dict[str, Any]] = ms) -> float:
            return median([m[key] for m in ms])

        main = (
            f" (main thread {med('redis_cpu_main_us_per_file'):.1f})"
            if all(m["redis_cpu_main_us_per_file"] is not None for m in ms)
            else ""
        )
        fastest = max(ms, key=lambda m: m["files_per_s"])
        bench.row(
            sec,
            f"{jobs_n:,} job{'s' if jobs_n > 1 else ''} x {per_job:,} file{'s' if per_job > 1 else ''}",
            f"{med('commands_per_file'):.2f} commands/file ({med('sent_per_file'):.2f} sent), "
            f"{med('round_trips_per_file'):.3f} round trips/file, "
            f"{med('redis_cpu_us_per_file'):.1f} us Redis CPU/file{main}, "
            f"{med('files_per_s'):,.0f} files/s, {med('daemon_cpu_us_per_file'):.0f} us daemon CPU/file, "
            f"{med('net_in_per_file'):.0f}/{med('net_out_per_file'):.0f} B in/out per file"
            f"<br>top by calls (fastest run): {top_calls(fastest['calls'], 6)}",
        )


@dataclass
class Measured:
    """One workload's run: the completion messages, when the daemon was started and when the
    last message came, the daemon's CPU, the proxy's counts, INFO before and after."""

    messages: list[dict[str, Any]]
    ready: float
    finished: float
    cpu: float
    turns: ProxyStats
    before: Info
    after: Info


def redis_cost(bench: Bench, paths: list[str], jobs_n: int, per_job: int, r: int) -> dict[str, Any]:
    server = devservers.redis().start()
    proxy = CountingProxy(server.port).start()
    try:
        tag = f"r{jobs_n}x{per_job}-{r}"
        daemon, names = bench.daemon("local", tag, null=True, redis_url=proxy.url)
        jobs = bench.jobs(tag, paths, jobs_n, per_job)
        # All queued first: the lists straight into Redis, the IDs into beanstalkd.
        asyncio.run(push_lists(f"redis://{server.address}/0", names["prefix"], jobs))
        asyncio.run(put_ids(bench.servers.beanstalkd.address, names["tube"], jobs))
        run = _measure(bench, daemon, names, server.port, proxy, jobs_n)
    finally:
        proxy.stop()
        server.stop()
        shutil.rmtree(server.workdir, ignore_errors=True)
    files = jobs_n * per_job
    done = sum(int(m["uploaded"]) + int(m["skipped"]) for m in run.messages)
    if done != files or any(int(m["failed"]) for m in run.messages):
        raise RuntimeError(f"{done} of {files} files done; daemon log: {daemon.log_path}")
    seconds = run.finished - (log_stamp(daemon.log_path) or run.ready)
    return _figures(run, jobs_n, per_job, seconds)


def _measure(
    bench: Bench, daemon: DaemonProc, names: dict[str, str], port: int, proxy: CountingProxy, jobs_n: int
) -> Measured:
    """Start the daemon on the full queue, wait for its `jobs_n` completion messages; stop it."""
    info = InfoReader(port)
    try:
        before = info.snapshot()
        daemon.start(poll=0.002)
        ready = time.time()
        cpu0 = daemon.cpu()
        try:
            messages = asyncio.run(
                devservers.await_completions(
                    bench.servers.beanstalkd.address, names["done_tube"], jobs_n, 300.0
                )
            )
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}; the daemon's log ends:\n{daemon.tail()}") from None
        finished = time.time()
        cpu = daemon.cpu() - cpu0
        # What follows a completion message (its publish) lands before INFO is read.
        proxy.settle()
        turns = proxy.snapshot()
        after = info.snapshot()
    finally:
        info.close()
        daemon.stop()
    return Measured(messages, ready, finished, cpu, turns, before, after)


def _figures(run: Measured, jobs_n: int, per_job: int, seconds: float) -> dict[str, Any]:
    """The figures of one run, in all and per file."""
    files = jobs_n * per_job
    turns = run.turns
    d = redis_delta(run.before, run.after)
    return {
        "jobs": jobs_n,
        "files_per_job": per_job,
        "files": files,
        "seconds": seconds,
        "files_per_s": files / seconds,
        "daemon_cpu_s": run.cpu,
        "daemon_cpu_us_per_file": run.cpu / files * 1e6,
        "commands": d["commands"],
        "commands_per_file": d["commands"] / files,
        "calls": d["calls"],
        "sent": sum(turns.commands.values()),  # 0 without hiredis
        "sent_per_file": sum(turns.commands.values()) / files,
        "sent_calls": dict(turns.commands.most_common()),
        "round_trips": turns.turns,
        "round_trips_per_file": turns.turns / files,
        "connections": turns.connections,
        "proxy_bytes_up": turns.bytes_up,
        "proxy_bytes_down": turns.bytes_down,
        **_redis_figures(d, files),
    }


def _redis_figures(d: dict[str, Any], files: int) -> dict[str, Any]:
    """What redis-server's INFO says the run cost it, in all and per file."""

    def per_file(value: float | None, scale: float = 1.0) -> float | None:
        return value * scale / files if value is not None else None

    return {
        "redis_cpu_s": d["cpu_s"],
        "redis_cpu_us_per_file": per_file(d["cpu_s"], 1e6),
        "redis_cpu_main_us_per_file": per_file(d["cpu_main_s"], 1e6),
        "redis_usec_in_commands": d["usec_in_commands"],
        "redis_usec": d["usec"],
        "net_in": d["net_in"],
        "net_out": d["net_out"],
        "net_in_per_file": per_file(d["net_in"]),
        "net_out_per_file": per_file(d["net_out"]),
        "redis_version": d["redis_version"],
    }

"""The `jobs` step: what a job costs the daemon, Redis and beanstalkd, against arq's no-op jobs.

Workloads (N = --jobs-n, 2,000 by default), each on a fresh redis-server behind a
`CountingProxy` and a fresh daemon that starts on a full queue (lists in Redis, IDs in
beanstalkd), as the `redis` step does:

- N one-file jobs, null store, max_active_jobs 32 (the default) and 128;
- N/20 twenty-file jobs: null store; local store on the real disk with fsync on; local store on
  tmpfs with fsync off.

arq runs on the redis-server of the first workload once the daemon is done with it: no-op jobs
(2.5 x max(N, 2,000)) enqueued first, then one worker in burst mode through the same proxy
(`bench/arqpeer.py` in arq's own virtualenv, `--arq`/ARQ_PYTHON). Its default poll_delay
(0.5 s) sleeps between reads of the queue and caps it near 200 jobs/s, so the baseline is arq
with poll_delay 0.01 s, the best of max_jobs 10/32/128; the defaults get a row of their own.

Per job: wall time from the daemon's "ready" line (arq: its start-up hook) to the last
completion message, the daemon's CPU, Redis commands (INFO commandstats) and round trips (the
proxy), Redis CPU, beanstalkd commands (every `cmd-*` of its global `stats`) and connections
(`total-connections`), less the bench's own (the completion messages it reserves and deletes,
its `stats`). Start-up is in the counts, spread over the jobs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from bench.beanstalkcost import BeanstalkStats, beanstalk_delta
from bench.common import (
    REPO,
    TMPFS,
    DaemonProc,
    daemon_origin,
    log_stamp,
    make_tree,
    median,
    push_lists,
    put_ids,
)
from bench.rediscost import CountingProxy, InfoReader, proxy_delta, redis_delta
from uploader.dev import servers as devservers
from uploader.dev.servers import Server
from uploader.source.beanstalkd.wire import Connection

if TYPE_CHECKING:
    from bench.harness import Bench

ARQ_PEER = REPO / "bench" / "arqpeer.py"
DISK = REPO / "bench" / "out"  # on the repository's disk, not tmpfs: fsync has to cost there
ARQ_POLL_DELAY = 0.01
ARQ_MAX_JOBS = (10, 32, 128)
ARQ_DEFAULTS_JOBS = 1000  # at ~200 jobs/s, enough for a rate

Store = Literal["null", "disk-fsync", "tmpfs"]
Runs = dict[str, list[dict[str, Any]]]  # workload -> the figures of each run


@dataclass(frozen=True)
class Workload:
    key: str
    label: str
    jobs: int
    files_per_job: int
    store: Store
    max_active_jobs: int = 32
    arq: bool = False  # arq runs on this workload's redis-server after the daemon

    @property
    def files(self) -> int:
        return self.jobs * self.files_per_job


# --- the completion messages ----------------------------------------------------------------


class Completions:
    """The completion messages, reserved and deleted on one connection opened (and watching)
    before the first snapshot; `sent` is what it sent since, to be taken off the counts."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.sent: Counter[str] = Counter()

    @classmethod
    async def open(cls, address: str, tube: str) -> Completions:
        conn = await Connection.connect(address)
        await conn.watch(tube)
        await conn.ignore("default")
        return cls(conn)

    async def take(self, count: int, timeout: float) -> list[dict[str, Any]]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        messages: list[dict[str, Any]] = []
        while len(messages) < count:
            left = deadline - loop.time()
            if left <= 0:
                raise TimeoutError(f"only {len(messages)} of {count} completion messages in {timeout:.0f} s")
            self.sent["reserve-with-timeout"] += 1
            job = await self.conn.reserve(max(1, int(left)))
            if job is not None:
                messages.append(json.loads(job.body))
                self.sent["delete"] += 1
                await self.conn.delete(job.id)
        return messages

    async def close(self) -> None:
        await self.conn.close()


# --- one run's counts -----------------------------------------------------------------------


class Meter:
    """Redis (INFO over its own socket, the proxy's counts) and beanstalkd (`stats`), read
    before and after one run on a redis-server that nothing else talks to."""

    def __init__(self, server: Server, proxy: CountingProxy, beanstalkd: str) -> None:
        self.proxy = proxy
        self.info = InfoReader(server.port)
        self.beanstalk = BeanstalkStats(beanstalkd)

    def start(self) -> None:
        self.before = (self.proxy.snapshot(), self.info.snapshot(), self.beanstalk.snapshot())

    def stop(self, own_beanstalk: Counter[str] | None = None) -> dict[str, Any]:
        # What follows a completion message (its publish, the delete) lands before the reads.
        self.proxy.settle()
        turns0, info0, bean0 = self.before
        turns = proxy_delta(turns0, self.proxy.snapshot())
        redis = redis_delta(info0, self.info.snapshot())
        beanstalk = beanstalk_delta(bean0, self.beanstalk.snapshot(), own_beanstalk or Counter())
        return {"redis": redis, "proxy": turns, "beanstalk": beanstalk}

    def close(self) -> None:
        self.info.close()
        self.beanstalk.close()


def per_job(counts: dict[str, Any], jobs: int, files: int, seconds: float, cpu_s: float) -> dict[str, Any]:
    """The figures of one run, per job (and per second, per file where it says so)."""
    redis, proxy, beanstalk = counts["redis"], counts["proxy"], counts["beanstalk"]
    cpu = redis["cpu_s"]
    return {
        "jobs": jobs,
        "files": files,
        "seconds": seconds,
        "jobs_per_s": jobs / seconds,
        "files_per_s": files / seconds,
        "cpu_ms_per_job": cpu_s / jobs * 1e3,
        "cpu_us_per_file": cpu_s / files * 1e6,
        "redis_commands_per_job": redis["commands"] / jobs,
        "redis_sent_per_job": proxy["sent"] / jobs,
        "redis_round_trips_per_job": proxy["round_trips"] / jobs,
        "redis_cpu_us_per_job": cpu * 1e6 / jobs if cpu is not None else None,
        "redis_connections": proxy["connections"],
        "beanstalk_commands_per_job": beanstalk["commands"] / jobs,
        "beanstalk_connections_per_job": beanstalk["connections"] / jobs,
        **counts,
    }


def per_job_calls(calls: dict[str, int], jobs: int, n: int = 8) -> str:
    """`evalsha 2.00, lrange 1.00, ...`: the top `n` commands by calls, per job."""
    top = sorted(calls.items(), key=lambda kv: -kv[1])[:n]
    return ", ".join(f"{name} {count / jobs:.2f}" for name, count in top) or "none"


# --- the step -------------------------------------------------------------------------------


def bench_jobs(bench: Bench) -> None:
    JobsBench(bench).run()


class JobsBench:
    def __init__(self, bench: Bench) -> None:
        self.bench = bench
        self.n: int = bench.args.jobs_n
        self.arq_python: str = bench.args.arq
        self.arq_jobs = int(max(self.n, 2000) * 2.5)
        self.beanstalkd = bench.servers.beanstalkd.address
        twenty = max(1, self.n // 20)
        one, many = f"{self.n:,} jobs x 1 file", f"{twenty:,} jobs x 20 files"
        self.workloads = [
            Workload("one-32", f"{one}, null store", self.n, 1, "null", arq=True),
            Workload("one-128", f"{one}, null store, max_active_jobs 128", self.n, 1, "null", 128),
            Workload("twenty-null", f"{many}, null store", twenty, 20, "null"),
            Workload("twenty-fsync", f"{many}, local store on disk, fsync on", twenty, 20, "disk-fsync"),
            Workload("twenty-tmpfs", f"{many}, local store on tmpfs, fsync off", twenty, 20, "tmpfs"),
        ]
        if only := [key for key in bench.args.jobs_workloads.split(",") if key]:
            self.workloads = [w for w in self.workloads if w.key in only]

    def run(self) -> None:
        b = self.bench
        self.paths = make_tree(os.path.join(b.src, "jobs"), max(self.n, 20), 1024)
        origin = daemon_origin(b.work)
        b.log(f"jobs: the daemon's uploader is {origin}; arq: {self.arq_python or 'none (no --arq)'}")
        up: Runs = {w.key: [] for w in self.workloads}
        arq: Runs = {}
        for r in range(b.runs):
            for w in self.workloads:
                with fresh_redis() as (server, proxy):
                    m = self.uploader(w, server, proxy, r)
                    up[w.key].append(m)
                    b.log(f"jobs run {r + 1} {w.key} (max_active_jobs {w.max_active_jobs}): {summary(m)}")
                    if w.arq and self.arq_python:
                        for name, max_jobs, poll, count in self.arq_configs():
                            a = self.arq(server, proxy, max_jobs, poll, count)
                            arq.setdefault(name, []).append(a)
                            b.log(f"jobs run {r + 1} arq {name}: {summary(a)}")
        self.report(origin, up, arq)

    def arq_configs(self) -> list[tuple[str, int, float, int]]:
        tuned = [(f"max_jobs {m}", m, ARQ_POLL_DELAY, self.arq_jobs) for m in ARQ_MAX_JOBS]
        return [*tuned, ("defaults", 10, 0.5, ARQ_DEFAULTS_JOBS)]

    # --- the daemon ---

    def uploader(self, w: Workload, server: Server, proxy: CountingProxy, r: int) -> dict[str, Any]:
        b = self.bench
        tag = f"j{w.key}-{r}"
        root = ""
        if w.store == "disk-fsync":
            DISK.mkdir(parents=True, exist_ok=True)
            root = tempfile.mkdtemp(prefix="jobs-fsync-", dir=DISK)
        elif w.store == "tmpfs":
            root = tempfile.mkdtemp(prefix="jobs-tmpfs-", dir=TMPFS)
        daemon, names = b.daemon(
            "local",
            tag,
            null=w.store == "null",
            max_active_jobs=w.max_active_jobs,
            redis_url=proxy.url,
            local_root=root,
            fsync=w.store == "disk-fsync",
        )
        jobs = b.jobs(tag, self.paths, w.jobs, w.files_per_job)
        asyncio.run(push_lists(f"redis://{server.address}/0", names["prefix"], jobs))
        asyncio.run(put_ids(self.beanstalkd, names["tube"], jobs))
        meter = Meter(server, proxy, self.beanstalkd)
        try:
            messages, cpu, finished, counts = asyncio.run(self._drive(daemon, names, meter, w.jobs))
        finally:
            meter.close()
            daemon.stop()
            if root:
                shutil.rmtree(root, ignore_errors=True)
        done = sum(int(m["uploaded"]) + int(m["skipped"]) for m in messages)
        if done != w.files or any(int(m["failed"]) for m in messages):
            raise RuntimeError(f"{done} of {w.files} files done; daemon log: {daemon.log_path}")
        ready = log_stamp(daemon.log_path)
        started = log_stamp(daemon.log_path, "started")
        if ready is None:
            raise RuntimeError(f"no ready line in {daemon.log_path}")
        m = per_job(counts, w.jobs, w.files, finished - ready, cpu)
        m["started_to_ready_ms"] = (ready - started) * 1e3 if started is not None else None
        return m

    async def _drive(
        self, daemon: DaemonProc, names: dict[str, str], meter: Meter, jobs: int
    ) -> tuple[list[dict[str, Any]], float, float, dict[str, Any]]:
        """Start the daemon on the full queue and wait for every completion message: the
        messages, the daemon's CPU after its ready line, the time of the last, the counts."""
        completions = await Completions.open(self.beanstalkd, names["done_tube"])
        try:
            meter.start()
            daemon.start(poll=0.002)  # blocks this loop, which has nothing else to do yet
            cpu0 = daemon.cpu()
            try:
                messages = await completions.take(jobs, 120.0)
            except TimeoutError as exc:
                raise TimeoutError(f"{exc}; the daemon's log ends:\n{daemon.tail()}") from None
            finished = time.time()
            cpu = daemon.cpu() - cpu0
            return messages, cpu, finished, meter.stop(completions.sent)
        finally:
            await completions.close()

    # --- arq ---

    def arq(
        self, server: Server, proxy: CountingProxy, max_jobs: int, poll_delay: float, count: int
    ) -> dict[str, Any]:
        """`count` no-op jobs enqueued straight into Redis (uncounted), then one burst worker
        through the proxy (counted)."""
        peer = [self.arq_python, str(ARQ_PEER)]
        subprocess.run([*peer, "enqueue", "--port", str(server.port), "--count", str(count)], check=True)
        work = [*peer, "work", "--port", str(proxy.port), "--max-jobs", str(max_jobs), "--poll-delay"]
        meter = Meter(server, proxy, self.beanstalkd)
        try:
            meter.start()
            out = subprocess.run([*work, str(poll_delay)], check=True, capture_output=True, text=True).stdout
            counts = meter.stop()
        finally:
            meter.close()
        result = json.loads(out.strip().splitlines()[-1])
        if result["complete"] != count or result["failed"]:
            raise RuntimeError(f"arq ran {result['complete']} of {count} jobs, {result['failed']} failed")
        m = per_job(counts, count, count, result["seconds"], result["cpu_s"])
        m.update(max_jobs=max_jobs, poll_delay=poll_delay)
        return m

    # --- rows ---

    def report(self, origin: str, up: Runs, arq: Runs) -> None:
        b = self.bench
        sec = f"7. Jobs through beanstalkd and Redis, fresh daemon and redis-server per workload ({origin})"
        tuned = {k: v for k, v in arq.items() if k != "defaults"}
        best = max(tuned, key=lambda k: med(tuned[k], "jobs_per_s")) if tuned else ""
        arq_rate = med(tuned[best], "jobs_per_s") if best else 0.0
        for w in self.workloads:
            ms = up[w.key]
            rate = med(ms, "jobs_per_s")
            value = f"{rate:,.0f} jobs/s"
            if w.files_per_job > 1:
                value += f" ({med(ms, 'files_per_s'):,.0f} files/s)"
            value += f"<br>{costs(ms)}"
            if w.files_per_job == 1 and arq_rate:
                b.row(
                    sec,
                    w.label,
                    value,
                    baseline=f"arq no-op, {best}: {arq_rate:,.0f} jobs/s",
                    ratio=f"{rate / arq_rate:.2f}x",
                    target=">= 1.5x",
                    met=rate >= 1.5 * arq_rate,
                )
            elif w.store == "disk-fsync":
                b.row(sec, w.label, value, target="2x the old code's files/s (run it with PYTHONPATH=<old>)")
            else:
                b.row(sec, w.label, value)
        if "one-32" in up:
            self.one_file_rows(sec, up["one-32"])
        for name, ms in arq.items():
            a = ms[0]
            how = f"poll_delay {a['poll_delay']:g} s, max_jobs {a['max_jobs']}"
            b.row(
                sec,
                f"arq no-op, {how}{' (its defaults)' if name == 'defaults' else ''}, {a['jobs']:,} jobs",
                f"{med(ms, 'jobs_per_s'):,.0f} jobs/s<br>{costs(ms, beanstalk=False)}"
                f"<br>Redis: {per_job_calls(a['redis']['calls'], a['jobs'], 6)}",
            )
        b.results["jobs"] = {"uploader": origin, "n": self.n, "runs": up, "arq": arq, "arq_best": best}

    def one_file_rows(self, sec: str, one: list[dict[str, Any]]) -> None:
        """The targets of one-file jobs, and where their commands went."""
        b = self.bench
        cpu = med(one, "cpu_ms_per_job")
        cmds = med(one, "redis_commands_per_job")
        trips = med(one, "redis_round_trips_per_job")
        what = "per one-file job (null store, max_active_jobs 32)"
        b.row(sec, f"daemon CPU {what}", f"{cpu:.3f} ms", target="<= 0.5 ms", met=cpu <= 0.5)
        b.row(
            sec,
            f"Redis commands {what}",
            f"{cmds:.2f} run (scripts' calls included), {med(one, 'redis_sent_per_job'):.2f} sent",
            target="<= 12",
            met=cmds <= 12,
        )
        b.row(sec, f"Redis round trips {what}", f"{trips:.2f}", target="<= 4", met=trips <= 4)
        fastest = max(one, key=lambda m: m["jobs_per_s"])
        jobs = fastest["jobs"]
        b.row(
            sec,
            f"breakdown {what}, fastest run",
            f"Redis run (commandstats, scripts' calls included): "
            f"{per_job_calls(fastest['redis']['calls'], jobs)}"
            f"<br>Redis sent (proxy): {per_job_calls(fastest['proxy']['sent_calls'], jobs)}"
            f"<br>beanstalkd: {per_job_calls(fastest['beanstalk']['calls'], jobs)}",
        )
        b.log(
            "jobs: per one-file job, Redis sent (proxy): "
            f"{per_job_calls(fastest['proxy']['sent_calls'], jobs, 20)}; Redis by calls: "
            f"{per_job_calls(fastest['redis']['calls'], jobs, 20)}; beanstalkd: "
            f"{per_job_calls(fastest['beanstalk']['calls'], jobs, 20)}"
        )


def med(ms: list[dict[str, Any]], key: str) -> float:
    return median([m[key] for m in ms])


def costs(ms: list[dict[str, Any]], beanstalk: bool = True) -> str:
    redis_cpu = (
        f", {med(ms, 'redis_cpu_us_per_job'):.0f} us Redis CPU"
        if all(m["redis_cpu_us_per_job"] is not None for m in ms)
        else ""
    )
    text = (
        f"per job: {med(ms, 'cpu_ms_per_job'):.3f} ms CPU, Redis {med(ms, 'redis_commands_per_job'):.2f} "
        f"commands ({med(ms, 'redis_sent_per_job'):.2f} sent) "
        f"in {med(ms, 'redis_round_trips_per_job'):.2f} round trips{redis_cpu}"
    )
    if beanstalk:
        text += (
            f", beanstalkd {med(ms, 'beanstalk_commands_per_job'):.2f} commands, "
            f"{med(ms, 'beanstalk_connections_per_job'):.3f} connections"
        )
    return text


def summary(m: dict[str, Any]) -> str:
    return (
        f"{m['jobs_per_s']:,.0f} jobs/s, {m['files_per_s']:,.0f} files/s, "
        f"{m['cpu_ms_per_job']:.3f} ms CPU/job, Redis {m['redis_commands_per_job']:.2f} commands/job "
        f"in {m['redis_round_trips_per_job']:.2f} round trips, "
        f"beanstalkd {m['beanstalk_commands_per_job']:.2f} commands/job"
    )


@contextlib.contextmanager
def fresh_redis() -> Iterator[tuple[Server, CountingProxy]]:
    """A redis-server of its own behind a CountingProxy, stopped and removed on exit."""
    server = devservers.redis().start()
    try:
        proxy = CountingProxy(server.port).start()
        try:
            yield server, proxy
        finally:
            proxy.stop()
    finally:
        server.stop()
        shutil.rmtree(server.workdir, ignore_errors=True)

"""Shared machinery for the benchmarks: servers, file trees, jobs, timed daemons and peers.

Everything runs on loopback: beanstalkd and redis-server from `uploader.dev.servers`, an S3
endpoint from `rclone serve s3` over a tmpfs directory. Each measured program runs as its own
process, so its CPU time and peak RSS are its own, read from /proc when it ends.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import redis.asyncio as aioredis

from uploader.dev.servers import Server, await_completions, free_port, wait_for_port
from uploader.source.beanstalkd.wire import Connection

REPO = Path(__file__).resolve().parent.parent
ACCESS_KEY = "benchaccesskey"
SECRET_KEY = "benchsecretkey"  # noqa: S105 - a throwaway key for a loopback endpoint
REGION = "us-east-1"
BUCKET = "bench"
TMPFS = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a live process and its threads, from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def peak_rss_mb(pid: int) -> float:
    """VmHWM: the process's peak resident set, in MB (10^6 bytes)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e6
    return 0.0


@dataclass
class Timed:
    seconds: float
    cpu: float  # CPU seconds of the measured process (children included for peers)
    files: int = 0
    rss_mb: float = 0.0
    nbytes: int = 0

    @property
    def files_per_s(self) -> float:
        return self.files / self.seconds if self.seconds else 0.0

    @property
    def cpu_ms_per_file(self) -> float:
        return self.cpu / self.files * 1e3 if self.files else 0.0

    @property
    def us_per_file(self) -> float:
        return self.cpu / self.files * 1e6 if self.files else 0.0

    @property
    def mb_per_s(self) -> float:
        return self.nbytes / self.seconds / 1e6 if self.seconds else 0.0


def run_timed(
    argv: Sequence[str], env: dict[str, str] | None = None, files: int = 0, nbytes: int = 0
) -> Timed:
    """Run a peer program to its end: wall time, and CPU from wait4's rusage (its children too)."""
    started = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[0]} exited {proc.returncode}: {err.decode(errors='replace')[-2000:]}")
    return Timed(seconds, usage.ru_utime + usage.ru_stime, files, usage.ru_maxrss * 1024 / 1e6, nbytes)


# --- servers ---------------------------------------------------------------------------------


@dataclass
class S3Endpoint:
    """`rclone serve s3` over a tmpfs directory: each top-level directory is a bucket.

    rclone caches the list of buckets, so the one bucket, BUCKET, exists before it starts and
    every run writes under its own prefix.
    """

    rclone: str
    root: str
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> S3Endpoint:
        os.makedirs(os.path.join(self.root, BUCKET), exist_ok=True)
        log = open(os.path.join(self.root, "..", "rclone-serve.log"), "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                self.rclone,
                "serve",
                "s3",
                "--auth-key",
                f"{ACCESS_KEY},{SECRET_KEY}",
                "--addr",
                f"127.0.0.1:{self.port}",
                "--config",
                "/dev/null",
                self.root,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        wait_for_port(self.port, proc=self.proc)
        return self

    def drop(self, prefix: str) -> None:
        """Delete what was written under `prefix` (a top-level directory of the bucket)."""
        shutil.rmtree(os.path.join(self.root, BUCKET, prefix), ignore_errors=True)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None


@dataclass
class Servers:
    beanstalkd: Server
    redis: Server
    s3: S3Endpoint | None

    @property
    def redis_url(self) -> str:
        return f"redis://{self.redis.address}/0"

    def stop(self) -> None:
        for server in (self.beanstalkd, self.redis):
            server.stop()
        if self.s3 is not None:
            self.s3.stop()


# --- files and jobs -------------------------------------------------------------------------


def make_tree(root: str, count: int, size: int, per_dir: int = 100) -> list[str]:
    """`count` files of `size` random-ish bytes in directories of `per_dir`; returns their paths."""
    paths = []
    block = os.urandom(max(size, 1))
    for i in range(count):
        d = os.path.join(root, f"d{i // per_dir:04d}")
        if i % per_dir == 0:
            os.makedirs(d, exist_ok=True)
        path = os.path.join(d, f"f{i:07d}.bin")
        with open(path, "wb") as f:
            f.write(i.to_bytes(8, "big") + block[: max(0, size - 8)])
        paths.append(path)
    return paths


def make_big_file(path: str, size: int) -> None:
    chunk = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for _ in range(size // len(chunk)):
            f.write(chunk)
        f.write(chunk[: size % len(chunk)])


async def push_lists(redis_url: str, prefix: str, jobs: dict[str, list[str]]) -> None:
    """RPUSH each job's list (in batches of 1,000, as a producer would)."""
    redis = aioredis.Redis.from_url(redis_url)
    try:
        async with redis.pipeline(transaction=False) as pipe:
            n = 0
            for job_id, entries in jobs.items():
                key = f"{prefix}job:{job_id}:files"
                for i in range(0, len(entries), 1000):
                    pipe.rpush(key, *entries[i : i + 1000])
                    n += 1
                    if n % 100 == 0:
                        await pipe.execute()
            await pipe.execute()
    finally:
        await redis.aclose()


async def put_ids(address: str, tube: str, ids: Iterable[str]) -> None:
    conn = await Connection.connect(address)
    try:
        await conn.use(tube)
        for job_id in ids:
            await conn.put(job_id.encode(), 1024, 0, 120)
    finally:
        await conn.close()


# --- the daemon as a subprocess ---------------------------------------------------------------


# The daemon's config; every value is a TOML literal (JSON's quoting is TOML's for these).
CONFIG_TOML = """
[source]
address = {beanstalkd}
tubes = [{tube}]
completion_tube = {done_tube}
max_active_jobs = {max_active_jobs}

[redis]
url = {redis_url}
key_prefix = {prefix}

[upload]
concurrency = {concurrency}
allowed_roots = [{roots}]

[store]
kind = {store}
local = {{ root = {local_root}, fsync = {fsync} }}

[store.s3]
bucket = {bucket}
endpoint_url = {s3_endpoint}
region = {region}
access_key_id = {access_key_id}
secret_access_key = {secret_access_key}
addressing_style = "path"


[http]
listen = ""

[daemon]
log_format = "json"
"""


def config_toml(
    *,
    beanstalkd: str,
    redis_url: str,
    tube: str,
    done_tube: str,
    prefix: str,
    roots: Sequence[str],
    store: str,
    concurrency: int = 64,
    max_active_jobs: int = 32,
    local_root: str = "/tmp/uploader-bench-objects",
    s3_endpoint: str = "",
    bucket: str = "",
    fsync: bool = False,
) -> str:
    """The daemon's config. fsync is off by default: the bench's stores are on tmpfs, where it
    has nothing to make durable, so it is off as an operator would set it there."""
    q = json.dumps
    return CONFIG_TOML.format(
        beanstalkd=q(beanstalkd),
        tube=q(tube),
        done_tube=q(done_tube),
        max_active_jobs=max_active_jobs,
        redis_url=q(redis_url),
        prefix=q(prefix),
        concurrency=concurrency,
        roots=", ".join(q(r) for r in roots),
        store=q(store),
        local_root=q(local_root),
        fsync=q(fsync),
        bucket=q(bucket),
        s3_endpoint=q(s3_endpoint),
        region=q(REGION),
        access_key_id=q(ACCESS_KEY),
        secret_access_key=q(SECRET_KEY),
    )


def log_stamp(log_path: str, event: str = "ready") -> float | None:
    """The time on the daemon's first `event` line (UTC, ISO), as time.time() reads it."""
    with open(log_path, errors="replace") as f:
        for line in f:
            if f'"{event}"' not in line:
                continue
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("event") == event and "timestamp" in entry:
                stamp = str(entry["timestamp"]).replace("Z", "+00:00")
                return datetime.datetime.fromisoformat(stamp).timestamp()
    return None


def daemon_env(workdir: str) -> tuple[dict[str, str] | None, str]:
    """The environment and working directory a daemon starts with: which `uploader` it runs.

    Without PYTHONPATH, this tree's (the working directory is the repository, first on the
    path of `python -m`). With PYTHONPATH=<another checkout>, that checkout's `uploader` (and
    its `bench.nulld`), this tree after it: the directory is then `workdir`, which shadows
    nothing. The bench's own code stays this tree's either way, so one bench measures an old
    commit and the new one alike.
    """
    path = os.environ.get("PYTHONPATH", "")
    if not path:
        return None, str(REPO)
    return dict(os.environ, PYTHONPATH=os.pathsep.join([path, str(REPO)])), workdir


def daemon_origin(workdir: str) -> str:
    """Where the daemon's `uploader` comes from: "<directory> @ <commit>" (+ if changed)."""
    env, cwd = daemon_env(workdir)
    code = "import os, uploader; print(os.path.dirname(os.path.dirname(uploader.__file__)))"
    where = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=cwd, capture_output=True, text=True, check=True
    ).stdout.strip()

    def git(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["git", "-C", where, *args], capture_output=True, text=True, check=False)

    commit = git("rev-parse", "--short", "HEAD")
    if commit.returncode != 0:
        return where
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", "uploader").stdout.strip()
    return f"{where} @ {commit.stdout.strip()}{' +changes' if dirty else ''}"


class DaemonProc:
    """`uploader run` (or the bench's null-store runner) as a subprocess, ready once it logs so.

    Which `uploader` it runs: see `daemon_env` (PYTHONPATH picks an older checkout).
    """

    def __init__(
        self, config_text: str, workdir: str, null_store: bool = False, cpus: set[int] | None = None
    ) -> None:
        self.cpus = cpus  # pin the process (all its threads) to these CPUs, as taskset would
        self.workdir = workdir
        self.config_path = os.path.join(workdir, f"uploader-{free_port()}.toml")
        Path(self.config_path).write_text(config_text)
        self.log_path = self.config_path + ".log"
        module = "bench.nulld" if null_store else "uploader.cli.main"
        self.argv = [sys.executable, "-m", module, "run", "--config", self.config_path]
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid = 0

    def start(self, timeout: float = 30.0, poll: float = 0.05) -> DaemonProc:
        log = open(self.log_path, "wb")  # noqa: SIM115
        cpus = self.cpus
        env, cwd = daemon_env(self.workdir)
        self.proc = subprocess.Popen(
            self.argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=env,
            preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
        )
        self.pid = self.proc.pid  # before any wait: stop() must never signal pid 0, our group
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            text = Path(self.log_path).read_text(errors="replace")
            if '"event": "ready"' in text or '"event":"ready"' in text:
                break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"daemon did not become ready:\n{text[-3000:]}")
            time.sleep(poll)
        return self

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def rss_mb(self) -> float:
        return peak_rss_mb(self.pid)

    def stop(self) -> str:
        """SIGTERM (a clean drain), then the log's tail for error reports."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.tail()

    def tail(self) -> str:
        return Path(self.log_path).read_text(errors="replace")[-3000:]


async def run_jobs(
    daemons: Sequence[DaemonProc],
    servers: Servers,
    tube: str,
    done_tube: str,
    prefix: str,
    jobs: dict[str, list[str]],
    timeout: float = 300.0,
) -> Timed:
    """Lists in Redis first, then time from the first job ID put to the last completion."""
    await push_lists(servers.redis_url, prefix, jobs)
    cpu0 = [d.cpu() for d in daemons]
    started = time.perf_counter()
    await put_ids(servers.beanstalkd.address, tube, jobs)
    try:
        messages = await await_completions(servers.beanstalkd.address, done_tube, len(jobs), timeout)
    except TimeoutError as exc:
        raise TimeoutError(f"{exc}; the daemon's log ends:\n{daemons[0].tail()}") from None
    seconds = time.perf_counter() - started
    cpu = sum(d.cpu() - c for d, c in zip(daemons, cpu0, strict=True))
    files = sum(int(m["uploaded"]) + int(m["skipped"]) for m in messages)
    failed = sum(int(m["failed"]) for m in messages)
    if failed:
        raise RuntimeError(f"{failed} files failed; daemon log: {daemons[0].log_path}")
    nbytes = sum(int(m["bytes"]) for m in messages)
    return Timed(seconds, cpu, files, max(d.rss_mb() for d in daemons), nbytes)

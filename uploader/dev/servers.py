"""Start real beanstalkd and redis-server processes on free loopback ports.

Used by the test suite, the benchmarks and the README's demo; never by the daemon itself.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_for_port(port: int, timeout: float = 10.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Poll until something accepts on 127.0.0.1:port; fail fast if `proc` died."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"server on port {port} exited with {proc.returncode}") from None
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s") from None
            time.sleep(0.02)


def require(binary: str) -> str:
    path = shutil.which(binary) or next(
        (p for p in (f"/usr/bin/{binary}", f"/usr/sbin/{binary}") if os.path.exists(p)), None
    )
    if path is None:
        raise RuntimeError(f"{binary} is not installed (apt-get install {binary})")
    return path


@dataclass
class Server:
    """One server process; `stop()` then `start()` restarts it on the same port and data."""

    argv: list[str]
    port: int
    workdir: str
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    quiet: bool = False  # output to /dev/null (a full beanstalkd logs every failed accept)
    ready_timeout: float = 10.0  # seconds to wait for its port

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> Server:
        log = open(os.devnull if self.quiet else os.path.join(self.workdir, "server.log"), "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir)
        log.close()
        wait_for_port(self.port, self.ready_timeout, proc=self.proc)
        return self

    def stop(self, kill: bool = False) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.kill() if kill else self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


def beanstalkd(
    port: int | None = None, binlog: bool = False, max_job_size: int = 65535, nofile: int | None = None
) -> Server:
    """`nofile` caps its open files (with util-linux's prlimit), to see a full server."""
    port = port or free_port()
    workdir = tempfile.mkdtemp(prefix="beanstalkd-")
    argv = [require("beanstalkd"), "-l", "127.0.0.1", "-p", str(port), "-z", str(max_job_size)]
    if binlog:
        argv += ["-b", workdir]
    if nofile is not None:
        argv = [require("prlimit"), f"--nofile={nofile}:{nofile}", *argv]
    return Server(argv, port, workdir, quiet=nofile is not None)


def redis(port: int | None = None, aof: bool = False) -> Server:
    port = port or free_port()
    workdir = tempfile.mkdtemp(prefix="redis-")
    argv = [
        require("redis-server"),
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--dir",
        workdir,
        "--appendonly",
        "yes" if aof else "no",
        "--protected-mode",
        "no",
    ]
    return Server(argv, port, workdir)


# Azure's well-known development account (Azurite's): public, in every Azure SDK's docs.
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


def azurite_connection_string(endpoint: str) -> str:
    """The dev account's connection string for Azurite's blob service at `endpoint` (http://host:port)."""
    return (
        f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};"
        f"BlobEndpoint={endpoint}/{AZURITE_ACCOUNT};"
    )


def azurite_binary() -> str:
    """`azurite-blob`: $AZURITE_BLOB, else the cache scripts/setup.sh installs it to, else PATH."""
    cache = os.environ.get("UPLOADER_TEST_CACHE") or os.path.expanduser("~/.cache/uploader-test")
    for candidate in (os.environ.get("AZURITE_BLOB", ""), f"{cache}/azurite/node_modules/.bin/azurite-blob"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which("azurite-blob")
    if found is None:
        raise RuntimeError("azurite-blob is not installed (bash scripts/setup.sh installs it with npm)")
    return found


def azurite(port: int | None = None) -> Server:
    """Azurite's blob service (the npm package), data in a temp dir, no telemetry, no access log."""
    port = port or free_port()
    workdir = tempfile.mkdtemp(prefix="azurite-")
    argv = [
        azurite_binary(),
        "--blobHost", "127.0.0.1",
        "--blobPort", str(port),
        "--location", workdir,
        "--silent",
        "--skipApiVersionCheck",
        "--loose",
        "--disableTelemetry",
    ]
    # Node starts in about a second; give a loaded machine far longer.
    return Server(argv, port, workdir, ready_timeout=60.0)


async def await_completions(address: str, tube: str, count: int, timeout: float) -> list[dict[str, Any]]:
    """Reserve and delete `count` completion messages from `tube`; TimeoutError after `timeout`."""
    from uploader.source.beanstalkd.wire import Connection

    conn = await Connection.connect(address)
    messages: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    try:
        await conn.watch(tube)
        await conn.ignore("default")
        deadline = loop.time() + timeout
        while len(messages) < count:
            left = deadline - loop.time()
            if left <= 0:
                raise TimeoutError(f"only {len(messages)} of {count} completion messages in {timeout}s")
            job = await conn.reserve(max(1, int(left)))
            if job is not None:
                messages.append(json.loads(job.body))
                await conn.delete(job.id)
    finally:
        await conn.close()
    return messages

"""`uploader demo`: a sample job end to end, on private beanstalkd and redis-server processes.

It never touches servers already running on the machine: its own run on free loopback ports
and stop when it ends, so it works the same on a fresh machine and a busy one.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO

from uploader.dev import servers as devservers


def _sample_files(root: Path, count: int) -> list[str]:
    paths = []
    for i in range(count):
        path = root / f"2026/11/{i % 10:02d}" / f"photo-{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(1024 + (i * 37) % 8192))
        paths.append(str(path))
    return paths


def run_demo(files: int = 200) -> int:
    work = Path(tempfile.mkdtemp(prefix="uploader-demo-"))
    uploads, objects = work / "uploads", work / "objects"
    beanstalkd, redis = devservers.beanstalkd(), devservers.redis()
    print(f"demo: working in {work}")
    beanstalkd.start()
    redis.start()
    print(f"demo: beanstalkd on {beanstalkd.address}, redis-server on {redis.address}")
    config = _write_config(work / "uploader.toml", beanstalkd.address, redis.address, uploads, objects)
    paths = _sample_files(uploads, files)
    print(f"demo: wrote {len(paths)} sample files under {uploads}")
    log_path = work / "daemon.log"
    log = open(log_path, "wb")  # noqa: SIM115
    daemon = subprocess.Popen(_uploader("run", "--config", str(config)), stdout=log, stderr=log)
    try:
        (work / "files.txt").write_text("\n".join(paths))
        enqueue = subprocess.run(
            _uploader("enqueue", "--config", str(config), "--job", "demo-1", "--wait", *paths), check=False
        )
        stored = _report_store(objects)
        subprocess.run(_uploader("status", "--config", str(config), "demo-1"), check=False)
    finally:
        code = _stop_daemon(daemon, log, log_path)
        beanstalkd.stop()
        redis.stop()
    ok = enqueue.returncode == 0 and code == 0 and stored == len(paths)
    print("demo: OK" if ok else "demo: FAILED")
    return 0 if ok else 1


def _write_config(path: Path, beanstalkd: str, redis: str, uploads: Path, objects: Path) -> Path:
    path.write_text(
        f'[source]\naddress = "{beanstalkd}"\n\n'
        f'[redis]\nurl = "redis://{redis}/0"\n\n'
        f'[upload]\nallowed_roots = ["{uploads}"]\n\n'
        f'[store]\nkind = "local"\nlocal = {{ root = "{objects}" }}\n\n'
        f'[http]\nlisten = ""\n\n[daemon]\nlog_format = "json"\n'
    )
    return path


def _uploader(*args: str) -> list[str]:
    """The command line of this very uploader, whatever is on PATH."""
    return [sys.executable, "-m", "uploader.cli.main", *args]


def _report_store(objects: Path) -> int:
    """Print what the store holds; the number of objects."""
    stored = [p for p in objects.rglob("*") if p.is_file()]
    print(f"demo: the store holds {len(stored)} objects, {sum(p.stat().st_size for p in stored):,} bytes")
    return len(stored)


def _stop_daemon(daemon: subprocess.Popen[bytes], log: IO[bytes], log_path: Path) -> int:
    """SIGTERM, as a service manager would send it: the daemon drains and exits."""
    daemon.send_signal(signal.SIGTERM)
    started = time.monotonic()
    code = daemon.wait(timeout=60)
    log.close()
    print(
        f"demo: daemon drained and exited with {code} in {time.monotonic() - started:.2f}s "
        f"(log: {log_path})"
    )
    return code

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

from uploader import devservers


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
    config = work / "uploader.toml"
    config.write_text(
        f'[source]\naddress = "{beanstalkd.address}"\n\n'
        f'[redis]\nurl = "redis://{redis.address}/0"\n\n'
        f'[upload]\nallowed_roots = ["{uploads}"]\n\n'
        f'[store]\nkind = "local"\nlocal = {{ root = "{objects}" }}\n\n'
        f'[http]\nlisten = ""\n\n[daemon]\nlog_format = "json"\n'
    )
    paths = _sample_files(uploads, files)
    print(f"demo: wrote {len(paths)} sample files under {uploads}")
    log = open(work / "daemon.log", "wb")  # noqa: SIM115
    daemon = subprocess.Popen(
        [sys.executable, "-m", "uploader.cli", "run", "--config", str(config)], stdout=log, stderr=log
    )
    try:
        list_file = work / "files.txt"
        list_file.write_text("\n".join(paths))
        enqueue = subprocess.run(
            [
                sys.executable,
                "-m",
                "uploader.cli",
                "enqueue",
                "--config",
                str(config),
                "--job",
                "demo-1",
                "--wait",
                *paths,
            ],
            check=False,
        )
        stored = [p for p in objects.rglob("*") if p.is_file()]
        print(f"demo: the store holds {len(stored)} objects, {sum(p.stat().st_size for p in stored):,} bytes")
        subprocess.run(
            [sys.executable, "-m", "uploader.cli", "status", "--config", str(config), "demo-1"], check=False
        )
    finally:
        daemon.send_signal(signal.SIGTERM)
        started = time.monotonic()
        code = daemon.wait(timeout=60)
        log.close()
        print(
            f"demo: daemon drained and exited with {code} in {time.monotonic() - started:.2f}s "
            f"(log: {work / 'daemon.log'})"
        )
        beanstalkd.stop()
        redis.stop()
    ok = enqueue.returncode == 0 and code == 0 and len(stored) == len(paths)
    print("demo: OK" if ok else "demo: FAILED")
    return 0 if ok else 1

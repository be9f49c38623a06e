"""What every step of the benchmark suite shares: the servers, the work directory, daemons and
jobs to drive through them, the rows of the table and the figures of results.json.

A step (bench/steps/) is a function that takes the `Bench` and adds rows and results to it;
bench/run.py calls them in order, then `save` writes bench/out/results.md and results.json.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Any

from bench.common import (
    REPO,
    TMPFS,
    DaemonProc,
    S3Endpoint,
    Servers,
    Timed,
    config_toml,
    make_tree,
    run_jobs,
)
from uploader.dev import servers as devservers

OUT = REPO / "bench" / "out"
GiB = 1 << 30


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.runs: int = args.runs
        self.work = tempfile.mkdtemp(prefix="uploader-bench-", dir=TMPFS)
        self.src = os.path.join(self.work, "src")
        self.rclone = args.rclone
        self.aws = args.aws
        self.servers = Servers(
            devservers.beanstalkd().start(),
            devservers.redis().start(),
            S3Endpoint(self.rclone, os.path.join(self.work, "s3")).start() if self.rclone else None,
        )
        self.rows: list[dict[str, Any]] = []
        self.results: dict[str, Any] = {}
        # files/s by concurrency, per tool: the s3 step fills it, the plot step draws it.
        self.curve: dict[str, dict[int, float]] = {}
        self.trees: dict[str, tuple[str, list[str]]] = {}

    # --- helpers --------------------------------------------------------------------------

    def log(self, text: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)

    def tree(self, name: str, count: int, size: int) -> tuple[str, list[str]]:
        """`count` files of `size` bytes under src/`name`, made once for every step that asks:
        the directory and the files' paths."""
        if name not in self.trees:
            root = os.path.join(self.src, name)
            self.trees[name] = (root, make_tree(root, count, size))
        return self.trees[name]

    def daemon(
        self,
        store: str,
        tag: str,
        *,
        null: bool = False,
        concurrency: int = 64,
        max_active_jobs: int = 32,
        bucket: str = "",
        local_root: str = "",
        cpus: set[int] | None = None,
        redis_url: str = "",
        fsync: bool = False,
    ) -> tuple[DaemonProc, dict[str, str]]:
        names = {"tube": f"up-{tag}", "done_tube": f"done-{tag}", "prefix": f"b{tag}:"}
        text = config_toml(
            beanstalkd=self.servers.beanstalkd.address,
            redis_url=redis_url or self.servers.redis_url,
            roots=[self.src],
            store=store,
            concurrency=concurrency,
            max_active_jobs=max_active_jobs,
            local_root=local_root or os.path.join(self.work, f"objects-{tag}"),
            s3_endpoint=self.servers.s3.url if self.servers.s3 else "",
            bucket=bucket,
            fsync=fsync,
            **names,
        )
        return DaemonProc(text, self.work, null_store=null, cpus=cpus), names

    def jobs(self, tag: str, paths: list[str], count: int, size: int) -> dict[str, list[str]]:
        """`count` jobs of `size` entries, cycling through `paths`; IDs unique to this run."""
        run = uuid.uuid4().hex[:6]
        return {
            f"{tag}-{run}-{j}": [paths[(j * size + i) % len(paths)] for i in range(size)]
            for j in range(count)
        }

    def drive(
        self,
        daemons: list[DaemonProc],
        names: dict[str, str],
        jobs: dict[str, list[str]],
        timeout: float = 300.0,
    ) -> Timed:
        return asyncio.run(
            run_jobs(daemons, self.servers, names["tube"], names["done_tube"], names["prefix"], jobs, timeout)
        )

    def warm(self, daemon: DaemonProc, names: dict[str, str], paths: list[str]) -> None:
        """One untimed job first: the daemon is long-lived, so its pools are open in production."""
        self.drive([daemon], names, self.jobs("warm", paths, 1, 500))

    def row(
        self,
        section: str,
        name: str,
        value: str,
        baseline: str = "",
        ratio: str = "",
        target: str = "",
        met: bool | None = None,
    ) -> None:
        self.rows.append(
            {
                "section": section,
                "name": name,
                "value": value,
                "baseline": baseline,
                "ratio": ratio,
                "target": target,
                "met": "" if met is None else ("yes" if met else "**no**"),
            }
        )

    # --- report -------------------------------------------------------------------------------

    def report(self, seconds: float) -> str:
        lines = [
            f"Run {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}, {machine()}, "
            f"median of {self.runs} runs, {seconds:.0f} s in all. S3 endpoint: {endpoint_name(self.rclone)}.",
            "",
            "| benchmark | measured | baseline (same run) | ratio | target | met |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        section = ""
        for row in self.rows:
            if row["section"] != section:
                section = row["section"]
                lines.append(f"| **{section}** | | | | | |")
            lines.append(
                f"| {row['name']} | {row['value']} | {row['baseline']} | {row['ratio']} | "
                f"{row['target']} | {row['met']} |"
            )
        return "\n".join(lines) + "\n"

    def save(self, seconds: float) -> str:
        """Write bench/out/results.md (the table) and results.json (every figure); the table."""
        text = self.report(seconds)
        (OUT / "results.md").write_text(text)
        (OUT / "results.json").write_text(json.dumps(self.results, indent=1, default=str))
        return text

    def close(self) -> None:
        self.servers.stop()
        shutil.rmtree(self.work, ignore_errors=True)


def top_calls(calls: dict[str, int], n: int) -> str:
    return ", ".join(f"{name} {count:,}" for name, count in sorted(calls.items(), key=lambda kv: -kv[1])[:n])


def empty(path: str) -> None:
    """Remove what a store wrote, keeping its root (the running daemon holds on to it)."""
    for name in os.listdir(path):
        shutil.rmtree(os.path.join(path, name), ignore_errors=True)


def machine() -> str:
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB
    return (
        f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB RAM, Linux {platform.release()}, "
        f"Python {platform.python_version()}"
    )


def endpoint_name(rclone: str) -> str:
    if not rclone:
        return "none"
    out = subprocess.run([rclone, "version"], capture_output=True, text=True, check=False).stdout
    return f"`rclone serve s3` ({out.splitlines()[0] if out else 'rclone'}) over tmpfs"

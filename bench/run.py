"""The benchmark suite: one command, one table. Ratios from one run are the result.

    python -m bench.run [--runs 3] [--only s3,pipeline,memory,large,scale,plot,redis,jobs,parts]
    PYTHONPATH=<older checkout> python -m bench.run --only redis   # the daemon of that checkout

Needs beanstalkd, redis-server and rclone (RCLONE=path, `bench/run.sh` fetches it) and
aws-cli in its own virtualenv (AWS=path to its `aws`); the `jobs` step compares with arq, in
a virtualenv of its own too (ARQ_PYTHON=path to its `python`, see bench/jobs.py). Writes
bench/out/results.md, bench/out/results.json and bench/out/files_per_s_vs_concurrency.png.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import (
    ACCESS_KEY,
    BUCKET,
    REGION,
    REPO,
    SECRET_KEY,
    TMPFS,
    DaemonProc,
    S3Endpoint,
    Servers,
    Timed,
    config_toml,
    daemon_origin,
    log_stamp,
    make_big_file,
    make_tree,
    median,
    push_lists,
    put_ids,
    run_jobs,
    run_timed,
)
from bench.jobs import JobsBench
from bench.parts import PartsBench
from bench.rediscost import CountingProxy, InfoReader, redis_delta
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
        self.curve: dict[str, dict[int, float]] = {}

    # --- helpers --------------------------------------------------------------------------

    def log(self, text: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)

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

    def s3_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY, AWS_DEFAULT_REGION=REGION)
        assert self.servers.s3 is not None
        env.update(
            RCLONE_CONFIG_BENCH_TYPE="s3",
            RCLONE_CONFIG_BENCH_PROVIDER="Other",
            RCLONE_CONFIG_BENCH_ACCESS_KEY_ID=ACCESS_KEY,
            RCLONE_CONFIG_BENCH_SECRET_ACCESS_KEY=SECRET_KEY,
            RCLONE_CONFIG_BENCH_ENDPOINT=self.servers.s3.url,
            RCLONE_CONFIG_BENCH_FORCE_PATH_STYLE="true",
            RCLONE_CONFIG_BENCH_REGION=REGION,
            RCLONE_CONFIG="/dev/null",
        )
        return env

    def rclone_copy(self, src: str, dest: str, transfers: int, files: int, nbytes: int = 0) -> Timed:
        # No listing of the destination and no bucket check: the daemon does neither.
        argv = [
            self.rclone,
            "copy",
            src,
            f"bench:{BUCKET}/{dest}",
            "--transfers",
            str(transfers),
            "--checkers",
            str(transfers),
            "--no-check-dest",
            "--no-traverse",
            "--s3-no-check-bucket",
            "-q",
        ]
        return run_timed(argv, self.s3_env(), files=files, nbytes=nbytes)

    def aws_cp(self, src: str, dest: str, concurrency: int, files: int) -> Timed:
        cfg = os.path.join(self.work, f"aws-{concurrency}.cfg")
        Path(cfg).write_text(
            f"[default]\ns3 =\n  max_concurrent_requests = {concurrency}\n  max_queue_size = 10000\n"
        )
        env = self.s3_env() | {"AWS_CONFIG_FILE": cfg, "AWS_SHARED_CREDENTIALS_FILE": "/dev/null"}
        assert self.servers.s3 is not None
        argv = [
            self.aws,
            "s3",
            "cp",
            "--recursive",
            "--quiet",
            "--endpoint-url",
            self.servers.s3.url,
            src,
            f"s3://{BUCKET}/{dest}/",
        ]
        return run_timed(argv, env, files=files)

    # --- 1. the S3 path against peers ------------------------------------------------------

    def bench_s3(self) -> None:
        s3 = self.servers.s3
        assert s3 is not None
        n, per_job = 5000, 500
        tree = os.path.join(self.src, "small")
        paths = make_tree(tree, n, 4096)
        listing = os.path.join(self.work, "baseline.txt")
        base_n = 1000  # the loop's rate does not depend on the count; 1,000 files keep it short
        Path(listing).write_text("\n".join(paths[:base_n]))
        up, names = self.daemon("s3", "s3", bucket=BUCKET, concurrency=self.args.concurrency)
        up.start()
        self.warm(up, names, paths)
        up_runs: list[Timed] = []
        rc_runs: dict[int, list[Timed]] = {t: [] for t in (16, 64, 128)}
        aws_runs: dict[int, list[Timed]] = {c: [] for c in (10, 32, 64)}
        base_runs: list[Timed] = []
        try:
            for r in range(self.runs):
                self.log(f"s3 run {r + 1}/{self.runs}")
                jobs = self.jobs("s3", paths, n // per_job, per_job)
                up_runs.append(self.drive([up], names, jobs))
                self.log(f"  uploader {up_runs[-1].files_per_s:.0f} files/s")
                for t, runs in rc_runs.items():
                    if r == 0 or t == self._best(rc_runs):
                        runs.append(self.rclone_copy(tree, f"rc{t}-{r}", t, n))
                        s3.drop(f"rc{t}-{r}")
                self.log(f"  rclone {self._best_rate(rc_runs):.0f} files/s")
                for c, runs in aws_runs.items():
                    if r == 0 or c == self._best(aws_runs):
                        runs.append(self.aws_cp(tree, f"aws{c}-{r}", c, n))
                        s3.drop(f"aws{c}-{r}")
                self.log(f"  aws-cli {self._best_rate(aws_runs):.0f} files/s")
                base_runs.append(
                    run_timed(
                        [sys.executable, "-m", "bench.oneatatime", s3.url, BUCKET, f"base{r}", listing],
                        files=base_n,
                    )
                )
                s3.drop(f"base{r}")
                self.log(f"  one at a time {base_runs[-1].files_per_s:.0f} files/s")
        finally:
            tail = up.stop()
        if any(t.files != n for t in up_runs):
            raise RuntimeError(f"uploader did not upload every file:\n{tail}")
        up_rate = median([t.files_per_s for t in up_runs])
        up_cpu = median([t.cpu_ms_per_file for t in up_runs])
        best_t, best_c = self._best(rc_runs), self._best(aws_runs)
        rc_rate = median([t.files_per_s for t in rc_runs[best_t]])
        aws_rate = median([t.files_per_s for t in aws_runs[best_c]])
        base_rate = median([t.files_per_s for t in base_runs])
        sec = "1. S3 path, 5,000 x 4 KiB"
        self.row(
            sec,
            f"uploader (10 jobs x 500, concurrency {self.args.concurrency})",
            f"{up_rate:,.0f} files/s, {up_cpu:.3f} ms CPU/file",
        )
        self.row(
            sec,
            f"rclone copy --transfers {best_t} (best of 16/64/128)",
            f"{rc_rate:,.0f} files/s, {median([t.cpu_ms_per_file for t in rc_runs[best_t]]):.3f} ms CPU/file",
            ratio=f"uploader {up_rate / rc_rate:.2f}x",
            target=">= 1x",
            met=up_rate >= rc_rate,
        )
        self.row(
            sec,
            f"aws s3 cp, max_concurrent_requests {best_c} (best of 10/32/64)",
            f"{aws_rate:,.0f} files/s, "
            f"{median([t.cpu_ms_per_file for t in aws_runs[best_c]]):.3f} ms CPU/file",
            ratio=f"uploader {up_rate / aws_rate:.2f}x",
            target=">= 3x",
            met=up_rate >= 3 * aws_rate,
        )
        self.row(
            sec,
            "one file at a time (boto3 loop, the old worker)",
            f"{base_rate:,.0f} files/s, {median([t.cpu_ms_per_file for t in base_runs]):.3f} ms CPU/file",
            ratio=f"uploader {up_rate / base_rate:.1f}x",
            target=">= 30x",
            met=up_rate >= 30 * base_rate,
        )
        self.row(
            sec, "uploader CPU per small file", f"{up_cpu:.3f} ms", target="<= 0.3 ms", met=up_cpu <= 0.3
        )
        self.results["s3"] = {
            "uploader": [vars(t) for t in up_runs],
            "rclone": {t: [vars(x) for x in v] for t, v in rc_runs.items()},
            "aws": {c: [vars(x) for x in v] for c, v in aws_runs.items()},
            "baseline": [vars(t) for t in base_runs],
        }
        self.curve.setdefault("rclone copy", {}).update(
            {t: median([x.files_per_s for x in v]) for t, v in rc_runs.items()}
        )
        self.curve.setdefault("aws s3 cp", {}).update(
            {c: median([x.files_per_s for x in v]) for c, v in aws_runs.items()}
        )
        self.curve.setdefault("uploader", {})[self.args.concurrency] = up_rate
        self.small_tree, self.small_paths = tree, paths

    @staticmethod
    def _best(runs: dict[int, list[Timed]]) -> int:
        return max(runs, key=lambda k: median([t.files_per_s for t in runs[k]]) if runs[k] else 0.0)

    def _best_rate(self, runs: dict[int, list[Timed]]) -> float:
        return median([t.files_per_s for t in runs[self._best(runs)]])

    # --- files/s against concurrency (the plot) ---------------------------------------------

    def bench_curve(self) -> None:
        s3 = self.servers.s3
        assert s3 is not None
        if not hasattr(self, "small_paths"):
            self.small_tree = os.path.join(self.src, "small")
            self.small_paths = make_tree(self.small_tree, 5000, 4096)
        for c in (4, 16, 128):
            up, names = self.daemon("s3", f"c{c}", bucket=BUCKET, concurrency=c)
            up.start()
            try:
                self.warm(up, names, self.small_paths)
                t = self.drive([up], names, self.jobs(f"c{c}", self.small_paths, 10, 500))
            finally:
                up.stop()
            self.curve.setdefault("uploader", {})[c] = t.files_per_s
            rc = self.rclone_copy(self.small_tree, f"rcc{c}", c, 5000)
            s3.drop(f"rcc{c}")
            self.curve.setdefault("rclone copy", {}).setdefault(c, rc.files_per_s)
            self.log(f"curve c={c}: uploader {t.files_per_s:.0f}, rclone {rc.files_per_s:.0f} files/s")
        self.plot()

    def plot(self) -> None:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            self.log("matplotlib missing (pip install -e .[bench]): no plot")
            return
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name, points in self.curve.items():
            xs = sorted(points)
            ax.plot(xs, [points[x] for x in xs], marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency (uploader concurrency, rclone --transfers, aws max_concurrent_requests)")
        ax.set_ylabel("files/s (5,000 x 4 KiB)")
        ax.set_title("S3 path on loopback (rclone serve s3), 2 cores")
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(OUT / "files_per_s_vs_concurrency.png", dpi=110)

    # --- 2. the pipeline alone ----------------------------------------------------------------

    def pipe_paths(self) -> list[str]:
        if not hasattr(self, "_pipe_paths"):
            self._pipe_paths = make_tree(os.path.join(self.src, "pipe"), 1000, 1024)
        return self._pipe_paths

    def bench_pipeline(self) -> None:
        paths = self.pipe_paths()
        null, nn = self.daemon("local", "null", null=True)
        local_root = os.path.join(self.work, "objects-local")
        local, ln = self.daemon("local", "local", local_root=local_root)
        pinned_root = os.path.join(self.work, "objects-pinned")
        pinned, pn = self.daemon("local", "pinned", local_root=pinned_root, cpus={0})
        for d in (null, local, pinned):
            d.start()
        null_runs: list[Timed] = []
        local_runs: list[Timed] = []
        pinned_runs: list[Timed] = []
        try:
            for r in range(self.runs):
                null_runs.append(self.drive([null], nn, self.jobs("null", paths, 100, 1000)))
                local_runs.append(self.drive([local], ln, self.jobs("local", paths, 100, 1000)))
                empty(local_root)
                pinned_runs.append(self.drive([pinned], pn, self.jobs("pinned", paths, 100, 1000)))
                empty(pinned_root)
                self.log(
                    f"pipeline run {r + 1}: null {null_runs[-1].files_per_s:.0f}, "
                    f"local {local_runs[-1].files_per_s:.0f}, "
                    f"local pinned {pinned_runs[-1].files_per_s:.0f} files/s"
                )
        finally:
            for d in (null, local, pinned):
                d.stop()
        sec = "2. Pipeline alone, 100 jobs x 1,000"
        for name, runs, target in (
            ("null store", null_runs, 25_000),
            ("local store on tmpfs", local_runs, 8_000),
            ("local store on tmpfs, daemon pinned to 1 core", pinned_runs, 8_000),
        ):
            rate = median([t.files_per_s for t in runs])
            self.row(
                sec,
                name,
                f"{rate:,.0f} files/s, {median([t.us_per_file for t in runs]):.0f} us CPU/file",
                target=f">= {target:,} files/s",
                met=rate >= target,
            )
        self.results["pipeline"] = {
            "null": [vars(t) for t in null_runs],
            "local": [vars(t) for t in local_runs],
            "local_pinned": [vars(t) for t in pinned_runs],
        }

    # --- 3. memory ----------------------------------------------------------------------------

    def bench_memory(self) -> None:
        paths = self.pipe_paths()
        peaks = {}
        for jobs_n in (10, 100):
            # The same active set (10 jobs) in both runs: only the depth of the queue differs.
            d, names = self.daemon("local", f"mem{jobs_n}", null=True, max_active_jobs=10)
            d.start()
            try:
                t = self.drive([d], names, self.jobs(f"m{jobs_n}", paths, jobs_n, 10_000), timeout=400)
            finally:
                d.stop()
            peaks[jobs_n] = t.rss_mb
            self.log(f"memory {jobs_n} jobs: peak {t.rss_mb:.1f} MB, {t.files_per_s:.0f} files/s")
        sec = "3. Memory, jobs of 10,000 entries queued, max_active_jobs 10"
        self.row(
            sec,
            "peak RSS, 100 jobs (1M entries)",
            f"{peaks[100]:.1f} MB",
            baseline=f"10 jobs: {peaks[10]:.1f} MB",
            ratio=f"{peaks[100] / peaks[10]:.3f}x",
            target="< 150 MB, within 10%",
            met=peaks[100] < 150 and peaks[100] <= 1.1 * peaks[10],
        )
        self.results["memory"] = peaks

    # --- 4. large files -----------------------------------------------------------------------

    def bench_large(self) -> None:
        s3 = self.servers.s3
        assert s3 is not None
        big_dir = os.path.join(self.src, "big")
        os.makedirs(big_dir, exist_ok=True)
        big = os.path.join(big_dir, "one.bin")
        make_big_file(big, GiB)
        up, names = self.daemon("s3", "big", bucket=BUCKET, concurrency=self.args.concurrency)
        up.start()
        up_runs: list[Timed] = []
        rc_runs: list[Timed] = []
        try:
            for r in range(self.runs):
                jobs = self.jobs("big", [big], 1, 1)
                up_runs.append(self.drive([up], names, jobs))
                for job_id in jobs:
                    s3.drop(job_id)
                rc_runs.append(self.rclone_copy(big, f"rcbig{r}", 4, 1, nbytes=GiB))
                s3.drop(f"rcbig{r}")
                self.log(
                    f"large run {r + 1}: uploader {up_runs[-1].mb_per_s:.0f} MB/s, "
                    f"rclone {rc_runs[-1].mb_per_s:.0f} MB/s"
                )
        finally:
            up.stop()
            os.unlink(big)
        up_rate = median([t.mb_per_s for t in up_runs])
        rc_rate = median([t.mb_per_s for t in rc_runs])
        sec = "4. Large file, 1 GiB multipart"
        self.row(
            sec,
            "uploader",
            f"{up_rate:,.0f} MB/s",
            baseline=f"rclone copy: {rc_rate:,.0f} MB/s",
            ratio=f"{up_rate / rc_rate:.2f}x",
            target=">= 0.9x",
            met=up_rate >= 0.9 * rc_rate,
        )
        self.results["large"] = {"uploader": [vars(t) for t in up_runs], "rclone": [vars(t) for t in rc_runs]}

    # --- 5. scale-out -------------------------------------------------------------------------

    def bench_scale(self) -> None:
        paths = self.pipe_paths()
        sec = "5. Scale-out, local store, 40 jobs x 1,000"
        self.results["scale"] = {}
        for pinned in (False, True):
            tag = "p" if pinned else "u"
            one, n1 = self.daemon(
                "local",
                f"one{tag}",
                local_root=os.path.join(self.work, f"objects-one{tag}"),
                cpus={0} if pinned else None,
            )
            # Both processes of the pair share one config: same tube, same prefix, same store.
            a, n2 = self.daemon(
                "local",
                f"two{tag}",
                local_root=os.path.join(self.work, f"objects-two{tag}"),
                cpus={0} if pinned else None,
            )
            b = DaemonProc(Path(a.config_path).read_text(), self.work, cpus={1} if pinned else None)
            for d in (one, a, b):
                d.start()
            ones: list[Timed] = []
            twos: list[Timed] = []
            try:
                for r in range(self.runs):
                    ones.append(self.drive([one], n1, self.jobs(f"one{tag}", paths, 40, 1000)))
                    twos.append(self.drive([a, b], n2, self.jobs(f"two{tag}", paths, 40, 1000)))
                    for name in ("one", "two"):
                        empty(os.path.join(self.work, f"objects-{name}{tag}"))
                    self.log(
                        f"scale run {r + 1} (pinned: {pinned}): one {ones[-1].files_per_s:.0f}, "
                        f"two {twos[-1].files_per_s:.0f}"
                    )
            finally:
                for d in (one, a, b):
                    d.stop()
            r1 = median([t.files_per_s for t in ones])
            r2 = median([t.files_per_s for t in twos])
            how = "each pinned to its own core" if pinned else "not pinned"
            self.row(
                sec,
                f"two daemon processes, {how}",
                f"{r2:,.0f} files/s",
                baseline=f"one process: {r1:,.0f} files/s",
                ratio=f"{r2 / r1:.2f}x",
                target=">= 1.6x",
                met=r2 >= 1.6 * r1,
            )
            self.results["scale"][how] = {"one": [vars(t) for t in ones], "two": [vars(t) for t in twos]}

    # --- 6. what the daemon costs Redis -------------------------------------------------------

    REDIS_WORKLOADS = ((1, 10_000), (100, 300), (500, 1))

    def bench_redis(self) -> None:
        """Per file: commands Redis ran, round trips, Redis CPU, for a daemon that starts on a
        full queue. Each workload gets a fresh redis-server (nothing else talks to it) behind a
        counting proxy, and a fresh null-store daemon."""
        paths = make_tree(os.path.join(self.src, "redis"), 10_000, 64)
        origin = daemon_origin(self.work)
        self.log(f"redis: the daemon's uploader is {origin}")
        runs: dict[str, list[dict[str, Any]]] = {}
        for r in range(self.runs):
            for jobs_n, per_job in self.REDIS_WORKLOADS:
                m = self.redis_cost(paths, jobs_n, per_job, r)
                runs.setdefault(f"{jobs_n}x{per_job}", []).append(m)
                self.log(
                    f"redis run {r + 1} {jobs_n} x {per_job}: {m['commands_per_file']:.2f} commands/file, "
                    f"{m['round_trips_per_file']:.3f} round trips/file, "
                    f"{m['redis_cpu_us_per_file']:.1f} us Redis CPU/file, {m['files_per_s']:,.0f} files/s, "
                    f"top: {top_calls(m['calls'], 4)}"
                )
        sec = f"6. Redis cost per file, null store, fresh daemon and redis-server per workload ({origin})"
        for jobs_n, per_job in self.REDIS_WORKLOADS:
            ms = runs[f"{jobs_n}x{per_job}"]

            def med(key: str, ms: list[dict[str, Any]] = ms) -> float:
                return median([m[key] for m in ms])

            main = (
                f" (main thread {med('redis_cpu_main_us_per_file'):.1f})"
                if all(m["redis_cpu_main_us_per_file"] is not None for m in ms)
                else ""
            )
            fastest = max(ms, key=lambda m: m["files_per_s"])
            self.row(
                sec,
                f"{jobs_n:,} job{'s' if jobs_n > 1 else ''} x {per_job:,} file{'s' if per_job > 1 else ''}",
                f"{med('commands_per_file'):.2f} commands/file ({med('sent_per_file'):.2f} sent), "
                f"{med('round_trips_per_file'):.3f} round trips/file, "
                f"{med('redis_cpu_us_per_file'):.1f} us Redis CPU/file{main}, "
                f"{med('files_per_s'):,.0f} files/s, {med('daemon_cpu_us_per_file'):.0f} us daemon CPU/file, "
                f"{med('net_in_per_file'):.0f}/{med('net_out_per_file'):.0f} B in/out per file"
                f"<br>top by calls (fastest run): {top_calls(fastest['calls'], 6)}",
            )
        self.results["redis"] = {"uploader": origin, "runs": runs}

    def redis_cost(self, paths: list[str], jobs_n: int, per_job: int, r: int) -> dict[str, Any]:
        server = devservers.redis().start()
        proxy = CountingProxy(server.port).start()
        try:
            tag = f"r{jobs_n}x{per_job}-{r}"
            daemon, names = self.daemon("local", tag, null=True, redis_url=proxy.url)
            jobs = self.jobs(tag, paths, jobs_n, per_job)
            files = jobs_n * per_job
            # All queued first: the lists straight into Redis, the IDs into beanstalkd.
            asyncio.run(push_lists(f"redis://{server.address}/0", names["prefix"], jobs))
            asyncio.run(put_ids(self.servers.beanstalkd.address, names["tube"], jobs))
            info = InfoReader(server.port)
            try:
                before = info.snapshot()
                daemon.start(poll=0.002)
                ready = time.time()
                cpu0 = daemon.cpu()
                try:
                    messages = asyncio.run(
                        devservers.await_completions(
                            self.servers.beanstalkd.address, names["done_tube"], jobs_n, 300.0
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
        finally:
            proxy.stop()
            server.stop()
            shutil.rmtree(server.workdir, ignore_errors=True)
        done = sum(int(m["uploaded"]) + int(m["skipped"]) for m in messages)
        if done != files or any(int(m["failed"]) for m in messages):
            raise RuntimeError(f"{done} of {files} files done; daemon log: {daemon.log_path}")
        d = redis_delta(before, after)
        seconds = finished - (log_stamp(daemon.log_path) or ready)

        def per_file(value: float | None, scale: float = 1.0) -> float | None:
            return value * scale / files if value is not None else None

        return {
            "jobs": jobs_n,
            "files_per_job": per_job,
            "files": files,
            "seconds": seconds,
            "files_per_s": files / seconds,
            "daemon_cpu_s": cpu,
            "daemon_cpu_us_per_file": cpu / files * 1e6,
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--only", default="s3,plot,pipeline,memory,large,scale,redis,jobs,parts")
    p.add_argument("--concurrency", type=int, default=64, help="the uploader's concurrency on the S3 path")
    p.add_argument("--rclone", default=os.environ.get("RCLONE", shutil.which("rclone") or ""))
    p.add_argument("--aws", default=os.environ.get("AWS", ""))
    p.add_argument("--arq", default=os.environ.get("ARQ_PYTHON", ""), help="python of arq's virtualenv")
    p.add_argument("--jobs-n", type=int, default=2000, help="one-file jobs of the jobs step (N/20 of 20)")
    p.add_argument("--jobs-workloads", default="", help="jobs workloads to run: one-32,twenty-fsync...")
    p.add_argument("--parts-mib", type=int, default=1024, help="the file of the parts step, in MiB")
    args = p.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    # SIGTERM unwinds like an error, so the servers and daemons started so far are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    only = set(args.only.split(","))
    started = time.perf_counter()
    bench = Bench(args)
    steps: list[tuple[str, Callable[[], None]]] = [
        ("s3", bench.bench_s3),
        ("plot", bench.bench_curve),
        ("pipeline", bench.bench_pipeline),
        ("memory", bench.bench_memory),
        ("large", bench.bench_large),
        ("scale", bench.bench_scale),
        ("redis", bench.bench_redis),
        ("jobs", JobsBench(bench).run),
        ("parts", PartsBench(bench).run),
    ]
    try:
        for name, step in steps:
            if name in only:
                if name in ("s3", "plot", "large") and not (args.rclone and (args.aws or name != "s3")):
                    bench.log(f"skipping {name}: needs rclone (and aws-cli for s3)")
                    continue
                bench.log(f"--- {name}")
                step()
    finally:
        bench.close()
    text = bench.report(time.perf_counter() - started)
    (OUT / "results.md").write_text(text)
    (OUT / "results.json").write_text(json.dumps(bench.results, indent=1, default=str))
    print(text)


if __name__ == "__main__":
    main()

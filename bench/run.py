"""The benchmark suite: one command, one table. Ratios from one run are the result.

    python -m bench.run [--runs 3] [--only s3,pipeline,memory,large,scale,plot,redis,jobs,parts]
    PYTHONPATH=<older checkout> python -m bench.run --only redis   # the daemon of that checkout

Needs beanstalkd, redis-server and rclone (RCLONE=path, `bench/run.sh` fetches it) and
aws-cli in its own virtualenv (AWS=path to its `aws`); the `jobs` step compares with arq, in
a virtualenv of its own too (ARQ_PYTHON=path to its `python`, see bench/steps/jobs.py). Writes
bench/out/results.md, bench/out/results.json and bench/out/files_per_s_vs_concurrency.png.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable

from bench.harness import OUT, Bench
from bench.steps.jobs import bench_jobs
from bench.steps.parts import bench_parts
from bench.steps.pipeline import bench_large, bench_memory, bench_pipeline, bench_scale
from bench.steps.redis import bench_redis
from bench.steps.s3 import bench_curve, bench_s3

# Every step, in the order they run; --only picks some of them.
STEPS: list[tuple[str, Callable[[Bench], None]]] = [
    ("s3", bench_s3),
    ("plot", bench_curve),
    ("pipeline", bench_pipeline),
    ("memory", bench_memory),
    ("large", bench_large),
    ("scale", bench_scale),
    ("redis", bench_redis),
    ("jobs", bench_jobs),
    ("parts", bench_parts),
]
NEEDS_RCLONE = ("s3", "plot", "large")  # and s3 aws-cli too


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--only", default=",".join(name for name, _ in STEPS))
    p.add_argument("--concurrency", type=int, default=64, help="the uploader's concurrency on the S3 path")
    p.add_argument("--rclone", default=os.environ.get("RCLONE", shutil.which("rclone") or ""))
    p.add_argument("--aws", default=os.environ.get("AWS", ""))
    p.add_argument("--arq", default=os.environ.get("ARQ_PYTHON", ""), help="python of arq's virtualenv")
    p.add_argument("--jobs-n", type=int, default=2000, help="one-file jobs of the jobs step (N/20 of 20)")
    p.add_argument("--jobs-workloads", default="", help="jobs workloads to run: one-32,twenty-fsync...")
    p.add_argument("--parts-mib", type=int, default=1024, help="the file of the parts step, in MiB")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    # SIGTERM unwinds like an error, so the servers and daemons started so far are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    only = set(args.only.split(","))
    started = time.perf_counter()
    bench = Bench(args)
    try:
        for name, step in STEPS:
            if name in only:
                if name in NEEDS_RCLONE and not (args.rclone and (args.aws or name != "s3")):
                    bench.log(f"skipping {name}: needs rclone (and aws-cli for s3)")
                    continue
                bench.log(f"--- {name}")
                step(bench)
    finally:
        bench.close()
    print(bench.save(time.perf_counter() - started))


if __name__ == "__main__":
    main()

"""Profile the daemon under a benchmark workload with py-spy; print the top functions.

    python -m bench.profile s3|null|local|jobs [--files 5000]

`jobs` is the one-file null-store workload of the `jobs` step: --files one-file jobs.

The daemon runs under `py-spy record` (sampling at 200 Hz, attached once the daemon is ready); the collapsed
stacks are folded into self time (the function on top of the stack) and total time (the
function anywhere on it), both as a share of all samples.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import signal
import subprocess
import sys
import time

from bench.harness import Bench


def summarise(path: str, top: int = 25) -> str:
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    samples = 0
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip().rpartition(" ")
            n = int(count)
            frames = [_short(fr) for fr in stack.split(";") if fr]
            frames = [fr for fr in frames if fr]
            if not frames:
                continue
            samples += n
            own[frames[-1]] += n
            for fr in set(frames):
                total[fr] += n
    out = [f"{samples} samples", "", "self %  function", "------ --------"]
    out += [f"{100 * n / samples:5.1f}  {fr}" for fr, n in own.most_common(top)]
    out += ["", "total % function", "------- --------"]
    out += [f"{100 * n / samples:6.1f}  {fr}" for fr, n in total.most_common(top) if "<module>" not in fr]
    return "\n".join(out)


def _short(frame: str) -> str:
    """`run (uploader/pipeline/scheduler.py:123)` -> `scheduler.py:run`; event-loop plumbing dropped."""
    name, _, where = frame.partition(" (")
    file = where.split(":")[0]
    short = "/".join(file.split("/")[-2:]) if "site-packages" in file or "uploader" in file else file
    if name in ("_run_module_as_main", "_run_code", "main", "run") and "runpy" in file:
        return ""
    return f"{short.split('site-packages/')[-1]}:{name}"


def record(pid: int, raw: str) -> subprocess.Popen[bytes]:
    """`py-spy record` of process `pid` into `raw` (collapsed stacks), 200 Hz, once attached."""
    spy = subprocess.Popen(
        [
            shutil.which("py-spy") or "py-spy",
            "record",
            "-p",
            str(pid),
            "-o",
            raw,
            "-f",
            "raw",
            "-r",
            "200",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    # py-spy gives no readiness signal; a head start lets it attach before the work begins
    # (a profile that misses the first second is still a profile, nothing is waited upon).
    time.sleep(1.0)
    return spy


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("kind", choices=["s3", "null", "local", "jobs"])
    p.add_argument("--files", type=int, default=5000)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--rclone", default=os.environ.get("RCLONE", ""))
    p.add_argument("--aws", default="")
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--out", default="bench/out/profile")
    args = p.parse_args()
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    bench = Bench(args)
    raw = f"{args.out}-{args.kind}.txt"
    try:
        from bench.common import BUCKET, make_tree

        paths = make_tree(os.path.join(bench.src, "p"), min(args.files, 5000), 4096)
        bucket = BUCKET
        store = "s3" if args.kind == "s3" else "local"
        per_job = 1 if args.kind == "jobs" else 500
        d, names = bench.daemon(
            store, "prof", null=args.kind in ("null", "jobs"), bucket=bucket, concurrency=args.concurrency
        )
        d.start()
        # Attached once the daemon is ready, so imports and startup stay out of the profile.
        spy = record(d.pid, raw)
        t = bench.drive([d], names, bench.jobs("prof", paths, max(1, args.files // per_job), per_job))
        spy.send_signal(signal.SIGINT)
        spy.wait(timeout=60)
        d.stop()
    finally:
        bench.close()
    print(
        f"{args.kind}: {t.files} files in jobs of {per_job}, {t.files_per_s:,.0f} files/s, "
        f"{t.us_per_file:.0f} us CPU/file (under the profiler)",
        file=sys.stderr,
    )
    print(summarise(raw))


if __name__ == "__main__":
    main()

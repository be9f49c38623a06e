"""The `s3` step (section 1: the S3 path against rclone copy, aws s3 cp and a one-at-a-time
boto3 loop, on `rclone serve s3` over loopback) and the `plot` step (files/s against
concurrency, drawn to bench/out/files_per_s_vs_concurrency.png)."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import ACCESS_KEY, BUCKET, REGION, SECRET_KEY, DaemonProc, Timed, median, run_timed
from bench.harness import OUT, Bench

SMALL_FILES, SMALL_SIZE = 5000, 4096  # 5,000 x 4 KiB
PER_JOB = 500
BASE_N = 1000  # the loop's rate does not depend on the count; 1,000 files keep it short
RCLONE_TRANSFERS = (16, 64, 128)
AWS_CONCURRENCY = (10, 32, 64)
CURVE_CONCURRENCY = (4, 16, 128)


def small_tree(bench: Bench) -> tuple[str, list[str]]:
    """The small files of both steps, made once: the directory and the files' paths."""
    return bench.tree("small", SMALL_FILES, SMALL_SIZE)


def s3_env(bench: Bench) -> dict[str, str]:
    env = dict(os.environ)
    env.update(AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY, AWS_DEFAULT_REGION=REGION)
    assert bench.servers.s3 is not None
    env.update(
        RCLONE_CONFIG_BENCH_TYPE="s3",
        RCLONE_CONFIG_BENCH_PROVIDER="Other",
        RCLONE_CONFIG_BENCH_ACCESS_KEY_ID=ACCESS_KEY,
        RCLONE_CONFIG_BENCH_SECRET_ACCESS_KEY=SECRET_KEY,
        RCLONE_CONFIG_BENCH_ENDPOINT=bench.servers.s3.url,
        RCLONE_CONFIG_BENCH_FORCE_PATH_STYLE="true",
        RCLONE_CONFIG_BENCH_REGION=REGION,
        RCLONE_CONFIG="/dev/null",
    )
    return env


def rclone_copy(bench: Bench, src: str, dest: str, transfers: int, files: int, nbytes: int = 0) -> Timed:
    # No listing of the destination and no bucket check: the daemon does neither.
    argv = [
        bench.rclone,
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
    return run_timed(argv, s3_env(bench), files=files, nbytes=nbytes)


def aws_cp(bench: Bench, src: str, dest: str, concurrency: int, files: int) -> Timed:
    cfg = os.path.join(bench.work, f"aws-{concurrency}.cfg")
    Path(cfg).write_text(
        f"[default]\ns3 =\n  max_concurrent_requests = {concurrency}\n  max_queue_size = 10000\n"
    )
    env = s3_env(bench) | {"AWS_CONFIG_FILE": cfg, "AWS_SHARED_CREDENTIALS_FILE": "/dev/null"}
    assert bench.servers.s3 is not None
    argv = [
        bench.aws,
        "s3",
        "cp",
        "--recursive",
        "--quiet",
        "--endpoint-url",
        bench.servers.s3.url,
        src,
        f"s3://{BUCKET}/{dest}/",
    ]
    return run_timed(argv, env, files=files)


# --- 1. the S3 path against peers ----------------------------------------------------------


@dataclass
class S3Runs:
    """Every run of the s3 step: the uploader's, the peers' by setting, the loop's."""

    up: list[Timed] = field(default_factory=list)
    rclone: dict[int, list[Timed]] = field(default_factory=lambda: {t: [] for t in RCLONE_TRANSFERS})
    aws: dict[int, list[Timed]] = field(default_factory=lambda: {c: [] for c in AWS_CONCURRENCY})
    base: list[Timed] = field(default_factory=list)


def bench_s3(bench: Bench) -> None:
    assert bench.servers.s3 is not None
    paths = small_tree(bench)[1]
    listing = os.path.join(bench.work, "baseline.txt")
    Path(listing).write_text("\n".join(paths[:BASE_N]))
    up, names = bench.daemon("s3", "s3", bucket=BUCKET, concurrency=bench.args.concurrency)
    up.start()
    bench.warm(up, names, paths)
    runs = S3Runs()
    try:
        for r in range(bench.runs):
            _s3_run(bench, runs, r, up, names, listing)
    finally:
        tail = up.stop()
    if any(t.files != SMALL_FILES for t in runs.up):
        raise RuntimeError(f"uploader did not upload every file:\n{tail}")
    _s3_rows(bench, runs)
    _s3_results(bench, runs)


def _s3_run(
    bench: Bench, runs: S3Runs, r: int, up: DaemonProc, names: dict[str, str], listing: str
) -> None:
    """Run `r`: the uploader, every peer setting (the first run) or the best so far, the loop."""
    s3 = bench.servers.s3
    assert s3 is not None
    tree, paths = small_tree(bench)
    n = SMALL_FILES
    bench.log(f"s3 run {r + 1}/{bench.runs}")
    jobs = bench.jobs("s3", paths, n // PER_JOB, PER_JOB)
    runs.up.append(bench.drive([up], names, jobs))
    bench.log(f"  uploader {runs.up[-1].files_per_s:.0f} files/s")
    for t, timed in runs.rclone.items():
        if r == 0 or t == _best(runs.rclone):
            timed.append(rclone_copy(bench, tree, f"rc{t}-{r}", t, n))
            s3.drop(f"rc{t}-{r}")
    bench.log(f"  rclone {_best_rate(runs.rclone):.0f} files/s")
    for c, timed in runs.aws.items():
        if r == 0 or c == _best(runs.aws):
            timed.append(aws_cp(bench, tree, f"aws{c}-{r}", c, n))
            s3.drop(f"aws{c}-{r}")
    bench.log(f"  aws-cli {_best_rate(runs.aws):.0f} files/s")
    runs.base.append(
        run_timed(
            [sys.executable, "-m", "bench.oneatatime", s3.url, BUCKET, f"base{r}", listing],
            files=BASE_N,
        )
    )
    s3.drop(f"base{r}")
    bench.log(f"  one at a time {runs.base[-1].files_per_s:.0f} files/s")


def _s3_rows(bench: Bench, runs: S3Runs) -> None:
    up_rate = median([t.files_per_s for t in runs.up])
    up_cpu = median([t.cpu_ms_per_file for t in runs.up])
    best_t, best_c = _best(runs.rclone), _best(runs.aws)
    sec = "1. S3 path, 5,000 x 4 KiB"
    bench.row(
        sec,
        f"uploader (10 jobs x 500, concurrency {bench.args.concurrency})",
        f"{up_rate:,.0f} files/s, {up_cpu:.3f} ms CPU/file",
    )
    rclone = f"rclone copy --transfers {best_t} (best of 16/64/128)"
    _peer_row(bench, sec, rclone, up_rate, runs.rclone[best_t], times=1, digits=2)
    aws = f"aws s3 cp, max_concurrent_requests {best_c} (best of 10/32/64)"
    _peer_row(bench, sec, aws, up_rate, runs.aws[best_c], times=3, digits=2)
    loop = "one file at a time (boto3 loop, the old worker)"
    _peer_row(bench, sec, loop, up_rate, runs.base, times=30, digits=1)
    bench.row(
        sec, "uploader CPU per small file", f"{up_cpu:.3f} ms", target="<= 0.3 ms", met=up_cpu <= 0.3
    )


def _peer_row(
    bench: Bench, sec: str, name: str, up_rate: float, runs: list[Timed], *, times: int, digits: int
) -> None:
    """A peer's row: its rate and CPU, the uploader's ratio to it, the target `times`x."""
    rate = median([t.files_per_s for t in runs])
    bench.row(
        sec,
        name,
        f"{rate:,.0f} files/s, {median([t.cpu_ms_per_file for t in runs]):.3f} ms CPU/file",
        ratio=f"uploader {up_rate / rate:.{digits}f}x",
        target=f">= {times}x",
        met=up_rate >= times * rate,
    )


def _s3_results(bench: Bench, runs: S3Runs) -> None:
    bench.results["s3"] = {
        "uploader": [vars(t) for t in runs.up],
        "rclone": {t: [vars(x) for x in v] for t, v in runs.rclone.items()},
        "aws": {c: [vars(x) for x in v] for c, v in runs.aws.items()},
        "baseline": [vars(t) for t in runs.base],
    }
    bench.curve.setdefault("rclone copy", {}).update(
        {t: median([x.files_per_s for x in v]) for t, v in runs.rclone.items()}
    )
    bench.curve.setdefault("aws s3 cp", {}).update(
        {c: median([x.files_per_s for x in v]) for c, v in runs.aws.items()}
    )
    bench.curve.setdefault("uploader", {})[bench.args.concurrency] = median([t.files_per_s for t in runs.up])


def _best(runs: dict[int, list[Timed]]) -> int:
    return max(runs, key=lambda k: median([t.files_per_s for t in runs[k]]) if runs[k] else 0.0)


def _best_rate(runs: dict[int, list[Timed]]) -> float:
    return median([t.files_per_s for t in runs[_best(runs)]])


# --- files/s against concurrency (the plot) ---------------------------------------------------


def bench_curve(bench: Bench) -> None:
    s3 = bench.servers.s3
    assert s3 is not None
    tree, paths = small_tree(bench)
    for c in CURVE_CONCURRENCY:
        up, names = bench.daemon("s3", f"c{c}", bucket=BUCKET, concurrency=c)
        up.start()
        try:
            bench.warm(up, names, paths)
            t = bench.drive([up], names, bench.jobs(f"c{c}", paths, 10, PER_JOB))
        finally:
            up.stop()
        bench.curve.setdefault("uploader", {})[c] = t.files_per_s
        rc = rclone_copy(bench, tree, f"rcc{c}", c, SMALL_FILES)
        s3.drop(f"rcc{c}")
        bench.curve.setdefault("rclone copy", {}).setdefault(c, rc.files_per_s)
        bench.log(f"curve c={c}: uploader {t.files_per_s:.0f}, rclone {rc.files_per_s:.0f} files/s")
    plot(bench)


def plot(bench: Bench) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        bench.log("matplotlib missing (pip install -e .[bench]): no plot")
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, points in bench.curve.items():
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

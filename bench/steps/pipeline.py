"""The daemon without a network: the `pipeline` step (section 2: null and local stores),
`memory` (section 3: peak RSS against the depth of the queue), `large` (section 4: one 1 GiB
file, multipart, against rclone copy) and `scale` (section 5: two processes against one)."""

from __future__ import annotations

import os
from pathlib import Path

from bench.common import BUCKET, DaemonProc, Timed, make_big_file, median
from bench.harness import Bench, GiB, empty
from bench.steps.s3 import rclone_copy


def pipe_paths(bench: Bench) -> list[str]:
    """1,000 files of 1 KiB, made once for the pipeline, memory and scale steps."""
    return bench.tree("pipe", 1000, 1024)[1]


# --- 2. the pipeline alone --------------------------------------------------------------------


def bench_pipeline(bench: Bench) -> None:
    paths = pipe_paths(bench)
    null, nn = bench.daemon("local", "null", null=True)
    local_root = os.path.join(bench.work, "objects-local")
    local, ln = bench.daemon("local", "local", local_root=local_root)
    pinned_root = os.path.join(bench.work, "objects-pinned")
    pinned, pn = bench.daemon("local", "pinned", local_root=pinned_root, cpus={0})
    for d in (null, local, pinned):
        d.start()
    null_runs: list[Timed] = []
    local_runs: list[Timed] = []
    pinned_runs: list[Timed] = []
    try:
        for r in range(bench.runs):
            null_runs.append(bench.drive([null], nn, bench.jobs("null", paths, 100, 1000)))
            local_runs.append(bench.drive([local], ln, bench.jobs("local", paths, 100, 1000)))
            empty(local_root)
            pinned_runs.append(bench.drive([pinned], pn, bench.jobs("pinned", paths, 100, 1000)))
            empty(pinned_root)
            bench.log(
                f"pipeline run {r + 1}: null {null_runs[-1].files_per_s:.0f}, "
                f"local {local_runs[-1].files_per_s:.0f}, "
                f"local pinned {pinned_runs[-1].files_per_s:.0f} files/s"
            )
    finally:
        for d in (null, local, pinned):
            d.stop()
    _pipeline_rows(bench, null_runs, local_runs, pinned_runs)


def _pipeline_rows(
    bench: Bench, null_runs: list[Timed], local_runs: list[Timed], pinned_runs: list[Timed]
) -> None:
    sec = "2. Pipeline alone, 100 jobs x 1,000"
    for name, runs, target in (
        ("null store", null_runs, 25_000),
        ("local store on tmpfs", local_runs, 8_000),
        ("local store on tmpfs, daemon pinned to 1 core", pinned_runs, 8_000),
    ):
        rate = median([t.files_per_s for t in runs])
        bench.row(
            sec,
            name,
            f"{rate:,.0f} files/s, {median([t.us_per_file for t in runs]):.0f} us CPU/file",
            target=f">= {target:,} files/s",
            met=rate >= target,
        )
    bench.results["pipeline"] = {
        "null": [vars(t) for t in null_runs],
        "local": [vars(t) for t in local_runs],
        "local_pinned": [vars(t) for t in pinned_runs],
    }


# --- 3. memory ----------------------------------------------------------------------------------


def bench_memory(bench: Bench) -> None:
    paths = pipe_paths(bench)
    peaks = {}
    for jobs_n in (10, 100):
        # The same active set (10 jobs) in both runs: only the depth of the queue differs.
        d, names = bench.daemon("local", f"mem{jobs_n}", null=True, max_active_jobs=10)
        d.start()
        try:
            t = bench.drive([d], names, bench.jobs(f"m{jobs_n}", paths, jobs_n, 10_000), timeout=400)
        finally:
            d.stop()
        peaks[jobs_n] = t.rss_mb
        bench.log(f"memory {jobs_n} jobs: peak {t.rss_mb:.1f} MB, {t.files_per_s:.0f} files/s")
    sec = "3. Memory, jobs of 10,000 entries queued, max_active_jobs 10"
    bench.row(
        sec,
        "peak RSS, 100 jobs (1M entries)",
        f"{peaks[100]:.1f} MB",
        baseline=f"10 jobs: {peaks[10]:.1f} MB",
        ratio=f"{peaks[100] / peaks[10]:.3f}x",
        target="< 150 MB, within 10%",
        met=peaks[100] < 150 and peaks[100] <= 1.1 * peaks[10],
    )
    bench.results["memory"] = peaks


# --- 4. large files -----------------------------------------------------------------------------


def bench_large(bench: Bench) -> None:
    s3 = bench.servers.s3
    assert s3 is not None
    big_dir = os.path.join(bench.src, "big")
    os.makedirs(big_dir, exist_ok=True)
    big = os.path.join(big_dir, "one.bin")
    make_big_file(big, GiB)
    up, names = bench.daemon("s3", "big", bucket=BUCKET, concurrency=bench.args.concurrency)
    up.start()
    up_runs: list[Timed] = []
    rc_runs: list[Timed] = []
    try:
        for r in range(bench.runs):
            jobs = bench.jobs("big", [big], 1, 1)
            up_runs.append(bench.drive([up], names, jobs))
            for job_id in jobs:
                s3.drop(job_id)
            rc_runs.append(rclone_copy(bench, big, f"rcbig{r}", 4, 1, nbytes=GiB))
            s3.drop(f"rcbig{r}")
            bench.log(
                f"large run {r + 1}: uploader {up_runs[-1].mb_per_s:.0f} MB/s, "
                f"rclone {rc_runs[-1].mb_per_s:.0f} MB/s"
            )
    finally:
        up.stop()
        os.unlink(big)
    _large_rows(bench, up_runs, rc_runs)


def _large_rows(bench: Bench, up_runs: list[Timed], rc_runs: list[Timed]) -> None:
    up_rate = median([t.mb_per_s for t in up_runs])
    rc_rate = median([t.mb_per_s for t in rc_runs])
    sec = "4. Large file, 1 GiB multipart"
    bench.row(
        sec,
        "uploader",
        f"{up_rate:,.0f} MB/s",
        baseline=f"rclone copy: {rc_rate:,.0f} MB/s",
        ratio=f"{up_rate / rc_rate:.2f}x",
        target=">= 0.9x",
        met=up_rate >= 0.9 * rc_rate,
    )
    bench.results["large"] = {"uploader": [vars(t) for t in up_runs], "rclone": [vars(t) for t in rc_runs]}


# --- 5. scale-out -------------------------------------------------------------------------------


def bench_scale(bench: Bench) -> None:
    paths = pipe_paths(bench)
    bench.results["scale"] = {}
    for pinned in (False, True):
        ones, twos = _scale_runs(bench, paths, pinned)
        r1 = median([t.files_per_s for t in ones])
        r2 = median([t.files_per_s for t in twos])
        how = "each pinned to its own core" if pinned else "not pinned"
        bench.row(
            "5. Scale-out, local store, 40 jobs x 1,000",
            f"two daemon processes, {how}",
            f"{r2:,.0f} files/s",
            baseline=f"one process: {r1:,.0f} files/s",
            ratio=f"{r2 / r1:.2f}x",
            target=">= 1.6x",
            met=r2 >= 1.6 * r1,
        )
        bench.results["scale"][how] = {"one": [vars(t) for t in ones], "two": [vars(t) for t in twos]}


def _scale_runs(bench: Bench, paths: list[str], pinned: bool) -> tuple[list[Timed], list[Timed]]:
    """Each run: 40 jobs x 1,000 through one daemon process, then through a pair."""
    tag = "p" if pinned else "u"
    one, n1 = bench.daemon(
        "local",
        f"one{tag}",
        local_root=os.path.join(bench.work, f"objects-one{tag}"),
        cpus={0} if pinned else None,
    )
    # Both processes of the pair share one config: same tube, same prefix, same store.
    a, n2 = bench.daemon(
        "local",
        f"two{tag}",
        local_root=os.path.join(bench.work, f"objects-two{tag}"),
        cpus={0} if pinned else None,
    )
    b = DaemonProc(Path(a.config_path).read_text(), bench.work, cpus={1} if pinned else None)
    for d in (one, a, b):
        d.start()
    ones: list[Timed] = []
    twos: list[Timed] = []
    try:
        for r in range(bench.runs):
            ones.append(bench.drive([one], n1, bench.jobs(f"one{tag}", paths, 40, 1000)))
            twos.append(bench.drive([a, b], n2, bench.jobs(f"two{tag}", paths, 40, 1000)))
            for name in ("one", "two"):
                empty(os.path.join(bench.work, f"objects-{name}{tag}"))
            bench.log(
                f"scale run {r + 1} (pinned: {pinned}): one {ones[-1].files_per_s:.0f}, "
                f"two {twos[-1].files_per_s:.0f}"
            )
    finally:
        for d in (one, a, b):
            d.stop()
    return ones, twos

"""arq, the peer of the `jobs` benchmark: no-op jobs enqueued, then one worker in burst mode.

Runs in arq's own virtualenv (ARQ_PYTHON), by path, so it never imports `uploader`:

    $ARQ_PYTHON bench/arqpeer.py enqueue --port P --count 5000
    $ARQ_PYTHON bench/arqpeer.py work --port P --max-jobs 10 [--poll-delay 0.5]

`work` prints one JSON line: the wall time and the process's CPU (all threads) from the
worker's start-up hook (its pool connected, interpreter and imports behind it, as the daemon's
"ready" line) to the end of the burst (queue empty, every job's result written), and arq's own
counts. uvloop is used when installed, as the daemon does.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

from arq import create_pool
from arq.connections import RedisSettings
from arq.worker import Worker

ENQUEUE_BATCH = 200  # enqueue_job calls in flight at once


async def noop(ctx: dict[str, Any]) -> None:
    return None


async def enqueue(port: int, count: int) -> None:
    pool = await create_pool(RedisSettings(port=port))
    try:
        for start in range(0, count, ENQUEUE_BATCH):
            batch = range(start, min(start + ENQUEUE_BATCH, count))
            jobs = await asyncio.gather(*(pool.enqueue_job("noop") for _ in batch))
            if any(job is None for job in jobs):
                raise RuntimeError("arq refused a job: its (random) ID was taken")
    finally:
        await pool.aclose()


def work(port: int, max_jobs: int, poll_delay: float) -> dict[str, Any]:
    marks: dict[str, float] = {}

    async def started(ctx: dict[str, Any]) -> None:
        marks["wall"], marks["cpu"] = time.time(), time.process_time()

    worker = Worker(
        functions=[noop],
        redis_settings=RedisSettings(port=port),
        burst=True,
        max_jobs=max_jobs,
        poll_delay=poll_delay,
        handle_signals=False,
        on_startup=started,
        log_results=False,
    )
    try:
        worker.loop.run_until_complete(worker.async_run())
        wall, cpu = time.time(), time.process_time()
    finally:
        worker.loop.run_until_complete(worker.close())
    return {
        "started": marks["wall"],
        "finished": wall,
        "seconds": wall - marks["wall"],
        "cpu_s": cpu - marks["cpu"],
        "complete": worker.jobs_complete,
        "failed": worker.jobs_failed,
        "retried": worker.jobs_retried,
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["enqueue", "work"])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--count", type=int, default=5000)
    p.add_argument("--max-jobs", type=int, default=10)
    p.add_argument("--poll-delay", type=float, default=0.5)
    args = p.parse_args()
    try:
        import uvloop
    except ImportError:
        pass
    else:
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    if args.mode == "enqueue":
        asyncio.run(enqueue(args.port, args.count))
    else:
        print(json.dumps(work(args.port, args.max_jobs, args.poll_delay)))


if __name__ == "__main__":
    main()

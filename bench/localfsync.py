"""LocalStore.put alone, on the real disk: lone 20-file jobs (p50 ms) and a burst (files/s).

    PYTHONPATH=$PWD python bench/localfsync.py --dir /work/tmp-bench [--no-fsync]

Run it with PYTHONPATH pointing at another checkout to compare. The directory must be on a
real disk: fsync on tmpfs costs nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import tempfile
import time

from uploader.config.stores import LocalStoreConfig
from uploader.entries.files import Root, SourceFile, locate, open_source
from uploader.stores.base import PutRequest
from uploader.stores.local import LocalStore


async def job(store: LocalStore, sources: list[SourceFile], name: str, slots: asyncio.Semaphore) -> float:
    async def one(i: int, source: SourceFile) -> None:
        async with slots:
            await store.put(source, PutRequest(f"{name}/{i:02d}.bin", "application/octet-stream"))

    start = time.perf_counter()
    await asyncio.gather(*(one(i, s) for i, s in enumerate(sources)))
    return time.perf_counter() - start


async def main(args: argparse.Namespace) -> None:
    os.makedirs(args.dir, exist_ok=True)
    work = tempfile.mkdtemp(dir=args.dir)
    try:
        src = os.path.join(work, "src")
        os.mkdir(src)
        sources = []
        for i in range(args.files):
            path = os.path.join(src, f"{i:02d}.bin")
            with open(path, "wb") as f:  # noqa: ASYNC230 - setup, before anything is timed
                f.write(os.urandom(args.size))
            root, _ = locate(path, (Root.of(src),))
            sources.append(open_source(path, root))
        store = LocalStore(LocalStoreConfig(root=os.path.join(work, "store"), fsync=not args.no_fsync))
        await store.start()
        slots = asyncio.Semaphore(args.concurrency)
        lone = [await job(store, sources, f"lone/{j:04d}", slots) for j in range(args.lone)]
        start, cpu = time.perf_counter(), time.process_time()
        jobs = (job(store, sources, f"burst/{j:04d}", slots) for j in range(args.jobs))
        burst = await asyncio.gather(*jobs)
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
        await store.close()
        files = args.jobs * args.files
        print(
            f"fsync={'off' if args.no_fsync else 'on'} lone job p50 {statistics.median(lone) * 1000:.1f} ms; "
            f"burst {args.jobs}x{args.files}: {files / elapsed:,.0f} files/s, "
            f"job p50 {statistics.median(burst) * 1000:.0f} ms, cpu {cpu / files * 1e6:.0f} us/file"
        )
    finally:
        shutil.rmtree(work)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", default="/work/tmp-bench")
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--files", type=int, default=20)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--lone", type=int, default=30)
    parser.add_argument("--no-fsync", action="store_true")
    asyncio.run(main(parser.parse_args()))

"""The `parts` step: one big file through the tests' fault proxy (20 ms added to every request,
its `delay` fault) to moto's S3 server, then to Azurite, at part_concurrency 1 and 4, side by side.

    python -m bench.run --only parts [--parts-mib 1024] [--runs 3]

moto and Azurite run as their own processes, the proxy in the bench's; the upload in a child
process of its own (`python -m bench.steps.parts upload KIND ...`: one store, one put), so its wall
time and peak RSS (VmHWM) are the store's alone, on the daemon's event loop (uvloop). Part
sizes and thresholds are each store's defaults (S3: 16 MiB parts; Azure: 8 MiB blocks).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import boto3

from bench.common import ACCESS_KEY, REPO, SECRET_KEY, TMPFS, make_big_file, median, peak_rss_mb
from tests.faultproxy import FaultProxy, Rule
from uploader.dev import servers as devservers
from uploader.dev.servers import free_port, wait_for_port

if TYPE_CHECKING:
    from bench.harness import Bench

MiB = 1 << 20
DELAY = 0.020
BUCKET = "parts"
CONCURRENCIES = (1, 4)
PART_MIB = {"s3": 16, "azure": 8}  # each store's default part (block) size


def bench_parts(bench: Bench) -> None:
    PartsBench(bench).run()


class PartsBench:
    def __init__(self, bench: Bench) -> None:
        self.bench = bench
        self.size = bench.args.parts_mib * MiB

    def run(self) -> None:
        path = os.path.join(TMPFS, f"uploader-parts-{os.getpid()}.bin")
        make_big_file(path, self.size)
        try:
            self._report("s3", "moto", self._s3(path))
            self._report("azure", "Azurite", self._azure(path))
        finally:
            os.unlink(path)

    def _s3(self, path: str) -> dict[int, list[dict[str, float]]]:
        port = free_port()
        moto = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            wait_for_port(port, proc=moto)
            s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1",
                              aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY)
            s3.create_bucket(Bucket=BUCKET)

            def stored(key: str) -> int:
                size = int(s3.head_object(Bucket=BUCKET, Key=key)["ContentLength"])
                s3.delete_object(Bucket=BUCKET, Key=key)  # moto holds objects in memory
                return size

            return self._behind_proxy(f"http://127.0.0.1:{port}", "s3", path, stored)
        finally:
            moto.terminate()
            moto.wait(timeout=30)

    def _azure(self, path: str) -> dict[int, list[dict[str, float]]]:
        from azure.storage.blob import BlobServiceClient

        server = devservers.azurite().start()
        try:
            service = BlobServiceClient.from_connection_string(
                devservers.azurite_connection_string(f"http://{server.address}"))
            container = service.create_container(BUCKET)

            def stored(key: str) -> int:
                blob = container.get_blob_client(key)
                size = int(blob.get_blob_properties().size)
                blob.delete_blob()
                return size

            return self._behind_proxy(f"http://{server.address}", "azure", path, stored)
        finally:
            server.stop()

    def _behind_proxy(
        self, upstream: str, kind: str, path: str, stored: Callable[[str], int]
    ) -> dict[int, list[dict[str, float]]]:
        proxy = FaultProxy(upstream).start()
        try:
            proxy.add(Rule("delay", delay=DELAY))
            return self._runs(kind, proxy.endpoint, path, stored)
        finally:
            proxy.stop()

    def _runs(
        self, kind: str, endpoint: str, path: str, stored: Callable[[str], int]
    ) -> dict[int, list[dict[str, float]]]:
        runs: dict[int, list[dict[str, float]]] = {c: [] for c in CONCURRENCIES}
        for r in range(self.bench.runs):
            for c in CONCURRENCIES:
                key = f"big-{c}-{r}"
                out = subprocess.run(
                    [sys.executable, "-m", "bench.steps.parts", "upload", kind, endpoint, path, key, str(c)],
                    capture_output=True, text=True, check=True, cwd=REPO,
                )
                m = json.loads(out.stdout.strip().splitlines()[-1])
                assert stored(key) == self.size
                runs[c].append(m)
                self.bench.log(
                    f"parts {kind} run {r + 1}, part_concurrency {c}: {m['seconds']:.2f} s, "
                    f"{self.size / MiB / m['seconds']:.0f} MiB/s, peak RSS {m['peak_rss_mb']:.0f} MB"
                )
        return runs

    def _report(self, kind: str, server: str, runs: dict[int, list[dict[str, float]]]) -> None:
        """Wall time and peak RSS side by side; the budget column is what the store charges
        [upload].max_inflight_bytes for the file (memory_needed), the RSS what it really took."""
        b = self.bench
        part = PART_MIB[kind]
        sec = (f"7. One {self.size // MiB} MiB file to {kind}, {part} MiB parts, "
               f"20 ms added per request ({server})")
        one = median([m["seconds"] for m in runs[1]])
        for c in CONCURRENCIES:
            secs = median([m["seconds"] for m in runs[c]])
            rss = median([m["peak_rss_mb"] for m in runs[c]])
            start = median([m["start_rss_mb"] for m in runs[c]])
            b.row(
                sec,
                f"part_concurrency {c} (budget charge {part * c} MiB)",
                f"{secs:.2f} s ({self.size / MiB / secs:.0f} MiB/s), peak RSS {rss:.0f} MB "
                f"({rss - start:+.0f} MB over the started store's {start:.0f} MB)",
                baseline="" if c == 1 else f"part_concurrency 1: {one:.2f} s",
                ratio="" if c == 1 else f"{one / secs:.2f}x faster",
            )
        b.results[f"parts_{kind}"] = {str(c): v for c, v in runs.items()}


def upload(kind: str, endpoint: str, path: str, key: str, part_concurrency: int) -> None:
    """One put of `path` by a started store, timed; prints one JSON line."""
    from uploader.entries.files import Root, open_source
    from uploader.stores.base import PutRequest

    store = _store(kind, endpoint, part_concurrency)

    async def main() -> dict[str, float]:
        await store.start()
        try:
            start_rss = peak_rss_mb(os.getpid())
            with open_source(path, Root.of(os.path.dirname(path))) as source:
                began = time.perf_counter()
                await store.put(source, PutRequest(key, "application/octet-stream"))
                seconds = time.perf_counter() - began
        finally:
            await store.close()
        return {"seconds": seconds, "peak_rss_mb": peak_rss_mb(os.getpid()), "start_rss_mb": start_rss}

    try:  # the daemon's loop (uploader/cli/command.py: run_async)
        import uvloop

        measured = uvloop.run(main())
    except ImportError:
        measured = asyncio.run(main())
    print(json.dumps(measured))


def _store(kind: str, endpoint: str, part_concurrency: int) -> Any:
    if kind == "azure":
        from uploader.config.stores import AzureStoreConfig
        from uploader.stores.azure import AzureStore

        return AzureStore(AzureStoreConfig(
            container=BUCKET, connection_string=devservers.azurite_connection_string(endpoint),
            part_concurrency=part_concurrency, timeout=120.0), concurrency=4)
    from uploader.config.stores import S3StoreConfig
    from uploader.stores.s3 import S3Store

    return S3Store(S3StoreConfig(
        bucket=BUCKET, region="us-east-1", endpoint_url=endpoint, access_key_id=ACCESS_KEY,
        secret_access_key=SECRET_KEY, addressing_style="path", part_concurrency=part_concurrency,
        timeout=120.0), concurrency=4)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["upload"])
    p.add_argument("kind", choices=["s3", "azure"])
    p.add_argument("endpoint")
    p.add_argument("path")
    p.add_argument("key")
    p.add_argument("part_concurrency", type=int)
    a = p.parse_args()
    upload(a.kind, a.endpoint, a.path, a.key, a.part_concurrency)

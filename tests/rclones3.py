"""`rclone serve s3` for the tests that need an S3 server which checks what it receives.

moto (5.2) verifies neither signatures nor Content-MD5 nor x-amz-checksum-* nor the signed
payload hash: a corrupted body is stored silently there. rclone's S3 server verifies the
signature and the Content-MD5 of PutObject and UploadPart (400 BadDigest), so integrity tests
run against it. scripts/setup.sh fetches rclone into ~/.cache/uploader-test; without it the
tests that need it fail, saying so.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import boto3

from uploader.dev.servers import free_port, wait_for_port

RCLONE_KEY, RCLONE_SECRET = "leanaccesskey", "leansecretkey"
REGION = "us-east-1"


def rclone_binary() -> str | None:
    """RCLONE, else the one scripts/setup.sh fetched, else bench/run.sh's, else PATH's (an old
    distribution rclone may lack `serve s3`, so it comes last)."""
    if os.environ.get("RCLONE"):
        return os.environ["RCLONE"]
    caches = [
        os.environ.get("UPLOADER_TEST_CACHE") or os.path.expanduser("~/.cache/uploader-test"),
        os.environ.get("UPLOADER_BENCH_CACHE") or os.path.expanduser("~/.cache/uploader-bench"),
    ]
    for cache in caches:
        hits = sorted(glob.glob(os.path.join(cache, "rclone", "**", "rclone"), recursive=True))
        if hits:
            return hits[0]
    return shutil.which("rclone")


class RcloneS3:
    """One `rclone serve s3` over `root`; each top-level directory is a bucket."""

    def __init__(self, binary: str, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self._proc = subprocess.Popen(
            [
                binary, "serve", "s3", "--auth-key", f"{RCLONE_KEY},{RCLONE_SECRET}",
                "--addr", f"127.0.0.1:{self.port}", "--config", "/dev/null", str(root),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_for_port(self.port, proc=self._proc)
        except BaseException:
            self.stop()
            raise

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def bucket(self, name: str) -> str:
        """Create bucket `name` through the server (its directory cache would not see a mkdir)."""
        client = self.client()
        if name not in {b["Name"] for b in client.list_buckets().get("Buckets", [])}:
            client.create_bucket(Bucket=name)
        return name

    def client(self) -> Any:
        return boto3.client(
            "s3", endpoint_url=self.endpoint, region_name=REGION,
            aws_access_key_id=RCLONE_KEY, aws_secret_access_key=RCLONE_SECRET,
        )

    def stop(self) -> None:
        self._proc.terminate()
        self._proc.wait(timeout=10)

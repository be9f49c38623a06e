"""The old worker's loop, the baseline: one file at a time, read it, PutObject, next.

Usage: python -m bench.oneatatime ENDPOINT BUCKET PREFIX LISTFILE
"""

from __future__ import annotations

import os
import sys

import boto3
from botocore.config import Config

from bench.common import ACCESS_KEY, REGION, SECRET_KEY


def main() -> None:
    endpoint, bucket, prefix, listing = sys.argv[1:5]
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        config=Config(s3={"addressing_style": "path"}, request_checksum_calculation="when_required"),
    )
    with open(listing) as f:
        paths = f.read().split()
    for path in paths:
        with open(path, "rb") as src:
            body = src.read()
        client.put_object(Bucket=bucket, Key=f"{prefix}/{os.path.basename(path)}", Body=body)


if __name__ == "__main__":
    main()

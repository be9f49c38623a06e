"""Where a producer puts a job when there are several beanstalkd servers.

The rule, for `uploader enqueue`, `uploader recover` and any producer that wants the same
spread: a stable hash of the job ID (CRC-32 of its UTF-8 bytes, modulo the number of servers)
picks the first choice; the others follow in configured order, wrapping around, and the job
goes to the first of them that takes it. Every producer with the same address list computes
the same order, so jobs spread evenly and a dead server's share moves to the next one.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence


def order(job_id: str, addresses: Sequence[str]) -> list[str]:
    """The servers to put `job_id` on, first choice first."""
    if not addresses:
        return []
    start = zlib.crc32(job_id.encode()) % len(addresses)
    return [*addresses[start:], *addresses[:start]]

"""What a run costs beanstalkd: its global `stats` read over a socket of the bench's own, before
and after, less what the bench itself sent (the `jobs` step, bench/steps/jobs.py)."""

from __future__ import annotations

import socket
from collections import Counter
from typing import Any


class BeanstalkStats:
    """`stats` over one socket of its own, opened before the first snapshot (so its connection
    is not in the delta; its `stats` commands are taken off by `beanstalk_delta`)."""

    def __init__(self, address: str) -> None:
        host, _, port = address.rpartition(":")
        self.sock = socket.create_connection((host, int(port)), timeout=10)
        self.buf = b""

    def snapshot(self) -> dict[str, int]:
        self.sock.sendall(b"stats\r\n")
        while b"\r\n" not in self.buf:
            self._fill()
        head, _, self.buf = self.buf.partition(b"\r\n")
        if not head.startswith(b"OK "):
            raise RuntimeError(f"unexpected stats reply: {head[:200]!r}")
        size = int(head[3:])
        while len(self.buf) < size + 2:
            self._fill()
        body, self.buf = self.buf[:size].decode(), self.buf[size + 2 :]
        out = {}
        for line in body.splitlines():
            key, _, value = line.partition(": ")
            if key.startswith("cmd-") or key == "total-connections":
                out[key] = int(value)
        return out

    def _fill(self) -> None:
        chunk = self.sock.recv(1 << 16)
        if not chunk:
            raise ConnectionError("beanstalkd closed the stats connection")
        self.buf += chunk

    def close(self) -> None:
        self.sock.close()


def beanstalk_delta(before: dict[str, int], after: dict[str, int], own: Counter[str]) -> dict[str, Any]:
    """Commands by name and connections opened, less the bench's: `own` and the after-`stats`
    (beanstalkd counts a command before it answers, so each snapshot counts itself)."""
    calls = Counter({k[4:]: after[k] - before.get(k, 0) for k in after if k.startswith("cmd-")})
    calls.subtract(own + Counter({"stats": 1}))
    calls = Counter({k: v for k, v in calls.items() if v > 0})
    return {
        "calls": dict(calls.most_common()),
        "commands": sum(calls.values()),
        "connections": after["total-connections"] - before["total-connections"],
    }

"""What a run settled, on its way to Redis (`Batch`, in APPLY's and CLOSE's argument shapes)
and kept until its final write (`Ledger`): see scripts.py for the scripts."""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field

from redis.typing import EncodableT


@dataclass(slots=True)
class Batch:
    """One job's outcomes on their way to Redis, in APPLY's argument shapes."""

    indexes: list[int] = field(default_factory=list)  # the successes
    upto: int = 0  # the length of its job's ledger (`settled`) once this batch is written
    sizes: list[int] = field(default_factory=list)  # their bytes, -1 when found present
    failures: list[EncodableT] = field(default_factory=list)  # index, label, reason, ...

    def __len__(self) -> int:
        return len(self.indexes) + len(self.failures) // 3

    def success(self, index: int, size: int) -> None:
        self.indexes.append(index)
        self.sizes.append(size)

    def args(self, now: int) -> list[EncodableT]:
        indexes, sizes = self.indexes, self.sizes
        first, bitmap = _bitmap(indexes)
        uploaded = [s for s in sizes if s >= 0]
        pairs = " ".join(f"{i} {s}" for i, s in zip(indexes, sizes, strict=True))
        return [now, first, bitmap, len(indexes), len(uploaded), len(sizes) - len(uploaded), sum(uploaded),
                pairs, *self.failures]

    def reasons(self, recorded: Sequence[bytes]) -> dict[str, str]:
        """label -> reason of the failures APPLY recorded."""
        wanted = {int(i) for i in recorded}
        triples = zip(self.failures[0::3], self.failures[1::3], self.failures[2::3], strict=True)
        return {str(label): str(reason) for index, label, reason in triples if index in wanted}


def _bitmap(indexes: list[int]) -> tuple[int, bytes]:
    """The first byte and the bitmap of these entries, or (-1, b"") when it would be sparse:
    more than 64 bytes and over two bytes per entry (APPLY then sets bit by bit)."""
    if not indexes:
        return -1, b""
    first, last = min(indexes) >> 3, max(indexes) >> 3
    if last - first >= max(64, 2 * len(indexes)):
        return -1, b""
    bitmap = bytearray(last - first + 1)
    for index in indexes:
        bitmap[(index >> 3) - first] |= 0x80 >> (index & 7)
    return first, bytes(bitmap)


class Ledger:
    """What this run settled, kept until its final write. Redis acknowledges a write before
    its replica has it, so a failover can lose outcomes: the final write sends again those
    whose marks are missing, and they count then. 16 bytes per settled entry."""

    __slots__ = ("acked", "failures", "settled")

    def __init__(self) -> None:
        self.settled = array("q")  # index, bytes (-1: found present), index, bytes, ...
        self.failures: dict[int, tuple[str, str]] = {}
        self.acked = 0  # `settled` up to here was acknowledged by Redis (APPLY)

    def success(self, index: int, nbytes: int) -> None:
        self.settled.extend((index, nbytes))

    def unacknowledged(self) -> Batch:
        """The successes no APPLY of this run was acknowledged for."""
        batch = Batch()
        settled = self.settled
        for k in range(self.acked, len(settled), 2):
            batch.success(settled[k], settled[k + 1])
        return batch

    def acknowledged(self) -> tuple[int, bytes]:
        """The bitmap of the acknowledged successes (see `_bitmap`), for CLOSE to check that
        Redis still shows them: (-1, b"") when there are none, or when sparse (None)."""
        return _bitmap([self.settled[k] for k in range(0, self.acked, 2)])

    def missing(self, bitmap: bytes) -> Batch:
        """The outcomes Redis does not show: unmarked successes, and every failure (APPLY
        records a failure only while its entry is unmarked, so sending it again is safe)."""
        batch = Batch()
        settled = self.settled
        for k in range(0, len(settled), 2):
            index = settled[k]
            byte = index >> 3
            if byte >= len(bitmap) or not bitmap[byte] & (0x80 >> (index & 7)):
                batch.success(index, settled[k + 1])
        for index, (label, reason) in self.failures.items():
            batch.failures += (index, label, reason)
        return batch

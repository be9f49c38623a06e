"""Which job gives the next file: weighted round-robin over the active jobs.

A job of weight w gives up to w files in a row, then the next job has its turn, so a small job
that arrives behind a huge one waits one round, not until the huge one is done. A job with
nothing to give right now, or held back by its tube's rate limit, loses the rest of its turn.
The ring holds no I/O and no clock: the dispatcher asks it, and sleeps on its own terms.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

M = TypeVar("M", bound=Hashable)
E = TypeVar("E")


@dataclass(frozen=True, slots=True)
class Empty:
    """No member gave anything. `retry_in`: seconds until the soonest held-back member may
    give again; None when only news (a page, a new job, new limits) can change that."""

    retry_in: float | None


class _Seat(Generic[M]):
    __slots__ = ("credit", "member", "weight")

    def __init__(self, member: M, weight: int) -> None:
        self.member = member
        self.weight = weight
        self.credit = weight


class Ring(Generic[M]):
    def __init__(self) -> None:
        self._seats: deque[_Seat[M]] = deque()

    def __len__(self) -> int:
        return len(self._seats)

    def __contains__(self, member: object) -> bool:
        return any(seat.member == member for seat in self._seats)

    def add(self, member: M, weight: int = 1) -> None:
        """Seat a member last in the round, with a full turn ahead of it."""
        if weight < 1:
            raise ValueError(f"weight must be at least 1, not {weight}")
        self._seats.append(_Seat(member, weight))

    def remove(self, member: M) -> None:
        """The member leaves, mid-turn or not; the others keep their places and credit."""
        for seat in self._seats:
            if seat.member == member:
                self._seats.remove(seat)
                return

    def pick(
        self, take: Callable[[M], E | None], held_back: Callable[[M], float] = lambda _: 0.0
    ) -> tuple[M, E] | Empty:
        """The next member in turn that gives something, and what it gave.

        `held_back(member)` is how many seconds the member must wait before it may give (0: it
        may now); `take(member)` is what it gives, or None. One full round at the most.
        """
        soonest: float | None = None
        for _ in range(len(self._seats)):
            seat = self._seats[0]
            wait = held_back(seat.member)
            item = take(seat.member) if wait <= 0 else None
            if item is not None:
                seat.credit -= 1
                if seat.credit <= 0:
                    self._next_turn()
                return seat.member, item
            if wait > 0:
                soonest = wait if soonest is None else min(soonest, wait)
            self._next_turn()
        return Empty(soonest)

    def _next_turn(self) -> None:
        seat = self._seats[0]
        seat.credit = seat.weight
        self._seats.rotate(-1)

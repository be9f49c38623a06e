"""Upload slots and the byte budget: bounds that hold while the limit changes under load."""

from __future__ import annotations

import asyncio

import pytest

from uploader.pipeline.limits import ByteBudget, Slots


async def settle() -> None:
    """Let every ready task run until it blocks; no I/O is involved, so this is deterministic."""
    for _ in range(20):
        await asyncio.sleep(0)


class Holders:
    """Tasks that take a slot and keep it until told to give it back, counted independently."""

    def __init__(self, slots: Slots) -> None:
        self.slots = slots
        self.running = 0
        self.peak = 0
        self.admitted = 0
        self._gates: list[asyncio.Event] = []
        self.tasks: list[asyncio.Task[None]] = []

    def start(self, n: int) -> None:
        for _ in range(n):
            self.tasks.append(asyncio.create_task(self._hold()))

    async def _hold(self) -> None:
        await self.slots.acquire()
        gate = asyncio.Event()
        self._gates.append(gate)
        self.running += 1
        self.admitted += 1
        self.peak = max(self.peak, self.running)
        try:
            await gate.wait()
        finally:
            self.running -= 1
            self.slots.release()

    async def finish(self, n: int) -> None:
        """Let the `n` longest-running holders go."""
        waiting = [g for g in self._gates if not g.is_set()]
        assert len(waiting) >= n
        for gate in waiting[:n]:
            gate.set()
        await settle()

    async def finish_all(self) -> None:
        while self.tasks and not all(t.done() for t in self.tasks):
            for gate in self._gates:
                gate.set()
            await settle()
        await asyncio.gather(*self.tasks)


async def test_slots_never_admit_more_than_the_limit() -> None:
    slots = Slots(3)
    holders = Holders(slots)
    holders.start(10)
    await settle()
    assert (holders.running, slots.in_use) == (3, 3)

    for _ in range(7):
        await holders.finish(1)
        assert holders.running == 3
    await holders.finish_all()

    assert holders.peak == 3
    assert (holders.admitted, slots.in_use) == (10, 0)


async def test_resize_up_admits_waiting_acquirers() -> None:
    slots = Slots(2)
    holders = Holders(slots)
    holders.start(6)
    await settle()
    assert holders.running == 2

    slots.resize(5)
    await settle()

    assert (holders.running, slots.in_use, slots.limit) == (5, 5, 5)
    await holders.finish_all()


async def test_resize_down_withholds_permits_as_they_come_back() -> None:
    slots = Slots(4)
    holders = Holders(slots)
    holders.start(8)
    await settle()
    assert holders.running == 4

    slots.resize(2)
    await settle()
    assert holders.running == 4  # nothing running is interrupted

    await holders.finish(1)
    assert holders.running == 3  # the freed permit is withheld, not handed to a waiter
    await holders.finish(1)
    assert holders.running == 2
    for _ in range(4):
        await holders.finish(1)
        assert holders.running == 2  # from now on one out, one in
    await holders.finish_all()
    assert holders.admitted == 8
    assert slots.in_use == 0


async def test_resize_down_when_idle_then_up_again() -> None:
    slots = Slots(4)
    slots.resize(1)
    holders = Holders(slots)
    holders.start(3)
    await settle()
    assert holders.running == 1

    slots.resize(3)
    await settle()
    assert holders.running == 3
    await holders.finish_all()


async def test_shrink_then_grow_before_anything_is_released() -> None:
    slots = Slots(4)
    holders = Holders(slots)
    holders.start(6)
    await settle()

    slots.resize(1)
    slots.resize(5)  # the owed permits are forgiven; one more slot is free at once
    await settle()
    assert holders.running == 5

    await holders.finish(5)
    assert holders.running == 1
    await holders.finish_all()
    assert holders.peak == 5


async def test_cancelled_waiter_does_not_leak_a_slot() -> None:
    slots = Slots(1)
    await slots.acquire()
    waiter = asyncio.create_task(slots.acquire())
    await settle()
    waiter.cancel()
    await settle()

    slots.release()
    await asyncio.wait_for(slots.acquire(), 1)  # the slot is still there to take
    assert slots.in_use == 1


def test_resize_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match=">= 1"):
        Slots(2).resize(0)


# --- ByteBudget ---


class Budgeted:
    """Tasks holding bytes of a budget until released, with the peak of concurrent bytes."""

    def __init__(self, budget: ByteBudget) -> None:
        self.budget = budget
        self.held: dict[str, int] = {}
        self.peak_holders = 0
        self.gates: dict[str, asyncio.Event] = {}
        self.tasks: dict[str, asyncio.Task[None]] = {}

    def start(self, name: str, nbytes: int) -> None:
        self.gates[name] = asyncio.Event()
        self.tasks[name] = asyncio.create_task(self._hold(name, nbytes))

    async def _hold(self, name: str, nbytes: int) -> None:
        async with self.budget.hold(nbytes):
            self.held[name] = nbytes
            self.peak_holders = max(self.peak_holders, len(self.held))
            try:
                await self.gates[name].wait()
            finally:
                del self.held[name]

    async def finish(self, name: str) -> None:
        self.gates[name].set()
        await asyncio.wait_for(self.tasks[name], 1)
        await settle()


async def test_byte_budget_caps_concurrent_holders() -> None:
    budget = ByteBudget(100)
    b = Budgeted(budget)
    for name in "abcde":
        b.start(name, 40)
    await settle()
    assert sorted(b.held) == ["a", "b"]
    assert budget.used == 80

    await b.finish("a")
    assert sorted(b.held) == ["b", "c"]
    for name in "bcde":
        await b.finish(name)
    assert b.peak_holders == 2
    assert budget.used == 0


async def test_an_oversize_request_runs_alone() -> None:
    budget = ByteBudget(100)
    b = Budgeted(budget)
    b.start("small", 10)
    await settle()
    b.start("huge", 10_000)
    await settle()
    assert list(b.held) == ["small"]  # waits for the budget to empty, never forever

    await b.finish("small")
    assert list(b.held) == ["huge"]
    b.start("after", 1)
    await settle()
    assert list(b.held) == ["huge"]  # nothing runs beside it

    await b.finish("huge")
    assert list(b.held) == ["after"]
    await b.finish("after")
    assert budget.used == 0


async def test_zero_bytes_never_wait() -> None:
    budget = ByteBudget(10)
    async with budget.hold(10), asyncio.timeout(1), budget.hold(0):
        assert budget.used == 10


async def test_a_cancelled_holder_gives_its_bytes_back() -> None:
    budget = ByteBudget(100)
    b = Budgeted(budget)
    b.start("a", 60)
    b.start("b", 60)
    await settle()
    assert list(b.held) == ["a"]

    b.tasks["b"].cancel()  # cancelled while waiting
    b.tasks["a"].cancel()  # cancelled while holding
    await asyncio.gather(*b.tasks.values(), return_exceptions=True)

    assert budget.used == 0
    async with asyncio.timeout(1), budget.hold(100):
        pass

"""The fair ring on its own: no server, no event loop."""

from __future__ import annotations

from collections import deque

import pytest

from uploader.pipeline.ring import Empty, Ring


def queues(**sizes: int) -> dict[str, deque[str]]:
    return {name: deque(f"{name}{i}" for i in range(n)) for name, n in sizes.items()}


def take_from(files: dict[str, deque[str]]):  # type: ignore[no-untyped-def]
    return lambda job: files[job].popleft() if files[job] else None


def drain(ring: Ring[str], files: dict[str, deque[str]], limit: int = 10_000) -> list[str]:
    order: list[str] = []
    while len(order) < limit:
        got = ring.pick(take_from(files))
        if isinstance(got, Empty):
            break
        order.append(got[1])
    return order


def test_equal_weights_take_turns_one_file_each() -> None:
    ring: Ring[str] = Ring()
    files = queues(a=3, b=3)
    for job in files:
        ring.add(job)
    assert drain(ring, files) == ["a0", "b0", "a1", "b1", "a2", "b2"]


def test_a_job_of_weight_three_gives_three_in_a_row() -> None:
    ring: Ring[str] = Ring()
    files = queues(a=6, b=6)
    ring.add("a", 3)
    ring.add("b", 1)
    assert drain(ring, files, limit=8) == ["a0", "a1", "a2", "b0", "a3", "a4", "a5", "b1"]


def test_a_small_job_behind_a_huge_one_waits_one_turn_not_the_whole_job() -> None:
    ring: Ring[str] = Ring()
    files = queues(huge=5_000)
    ring.add("huge")
    assert drain(ring, files, limit=10) == [f"huge{i}" for i in range(10)]
    files["small"] = deque(["s0", "s1", "s2"])
    ring.add("small")
    order = drain(ring, files, limit=6)
    assert order == ["huge10", "s0", "huge11", "s1", "huge12", "s2"]


def test_shares_follow_the_weights_over_many_rounds() -> None:
    ring: Ring[str] = Ring()
    files = queues(a=10_000, b=10_000, c=10_000)
    for job, weight in (("a", 1), ("b", 2), ("c", 5)):
        ring.add(job, weight)
    order = drain(ring, files, limit=8_000)
    shares = {job: sum(f.startswith(job) for f in order) for job in "abc"}
    assert shares == {"a": 1_000, "b": 2_000, "c": 5_000}


def test_a_job_leaving_mid_turn_hands_the_turn_on() -> None:
    ring: Ring[str] = Ring()
    files = queues(a=9, b=9, c=9)
    ring.add("a", 3)
    ring.add("b", 3)
    ring.add("c", 3)
    assert drain(ring, files, limit=4) == ["a0", "a1", "a2", "b0"]
    ring.remove("b")  # mid-turn: b had two more
    assert "b" not in ring and len(ring) == 2
    assert drain(ring, files, limit=4) == ["c0", "c1", "c2", "a3"]


def test_removing_a_job_not_seated_changes_nothing() -> None:
    ring: Ring[str] = Ring()
    ring.add("a")
    ring.remove("zz")
    assert len(ring) == 1


def test_a_job_with_nothing_to_give_loses_its_turn_and_gets_a_full_one_later() -> None:
    ring: Ring[str] = Ring()
    files = queues(a=0, b=4)
    ring.add("a", 2)
    ring.add("b", 2)
    assert drain(ring, files, limit=2) == ["b0", "b1"]
    files["a"].extend(["a0", "a1", "a2"])
    assert drain(ring, files, limit=4) == ["a0", "a1", "b2", "b3"]


def test_nothing_anywhere_is_empty_with_no_retry_time() -> None:
    ring: Ring[str] = Ring()
    assert ring.pick(lambda _: None) == Empty(None)
    ring.add("a")
    ring.add("b")
    assert ring.pick(lambda _: None) == Empty(None)


def test_held_back_jobs_are_skipped_and_the_soonest_wait_reported() -> None:
    ring: Ring[str] = Ring()
    files = queues(a=3, b=3, c=3)
    for job in files:
        ring.add(job)
    waits = {"a": 2.0, "b": 0.5, "c": 0.0}
    got = ring.pick(take_from(files), lambda job: waits[job])
    assert got == ("c", "c0")
    waits["c"] = 1.0
    assert ring.pick(take_from(files), lambda job: waits[job]) == Empty(0.5)
    taken: list[str] = []
    assert ring.pick(lambda job: taken.append(job), lambda job: waits[job]) == Empty(0.5)
    assert taken == [], "a held-back job is not even asked"


def test_weight_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        Ring[str]().add("a", 0)

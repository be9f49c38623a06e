"""Weighted tubes: when several tubes have ready jobs, reservations follow the tubes' weights."""

from __future__ import annotations

import pytest

from tests.helpers import Env
from uploader.config.settings import SourceConfig, Tube
from uploader.config.stores import LocalStoreConfig
from uploader.entries.files import SourceFile
from uploader.source.beanstalkd.source import Source, TubeOrder
from uploader.stores.base import PutRequest, PutResult
from uploader.stores.local import LocalStore


def picks(order: TubeOrder, rounds: int, empty: frozenset[str] = frozenset()) -> list[str]:
    """What a reserver would take, `rounds` times, when the tubes in `empty` have no job."""
    out = []
    for _ in range(rounds):
        tried: set[str] = set()
        for tube in order.order():
            if tube not in empty:
                order.served(tube, tried)
                out.append(tube)
                break
            tried.add(tube)
    return out


def test_smooth_weighted_order_interleaves_by_weight() -> None:
    order = TubeOrder({"bulk": 1, "interactive": 3})
    assert picks(order, 8) == ["interactive", "interactive", "bulk", "interactive"] * 2


def test_an_empty_tube_is_skipped_and_comes_back_without_a_burst() -> None:
    order = TubeOrder({"bulk": 1, "interactive": 3})
    assert picks(order, 20, empty=frozenset({"interactive"})) == ["bulk"] * 20
    # Back with jobs: the usual 3:1 interleaving, not 20 interactive jobs in a row to catch up.
    assert picks(order, 8).count("bulk") == 2


def test_only_different_weights_take_the_per_tube_path() -> None:
    """Equal weights keep beanstalkd's own order (priority, then age) over all tubes."""
    assert Source(SourceConfig(tubes=(Tube("a", 2), Tube("b", 1))))._weighted
    assert not Source(SourceConfig(tubes=(Tube("a"), Tube("b"))))._weighted


class TubeCountingStore(LocalStore):
    """Notes, in order, which tube each uploaded file came from (its job ID's prefix)."""

    def __init__(self, config: LocalStoreConfig) -> None:
        super().__init__(config)
        self.tubes: list[str] = []

    async def put(self, source: SourceFile, request: PutRequest) -> PutResult:
        self.tubes.append(request.key.split("-", 1)[0])
        return await super().put(source, request)


@pytest.mark.timeout(90)
async def test_backlogged_tubes_are_served_in_proportion_to_their_weights(env: Env) -> None:
    jobs_per_tube, files_per_job = 40, 20
    hi, lo = f"{env.tube}-hi", f"{env.tube}-lo"
    config = env.config(
        source={"tubes": [{"name": lo, "weight": 1}, {"name": hi, "weight": 3}], "max_active_jobs": 4},
    )
    files = [str(p) for p in env.write_files(files_per_job, size=64)]
    for j in range(jobs_per_tube):  # both tubes backlogged before the daemon starts
        await env.push_job(f"lo-{j:02d}", files, tube=lo)
        await env.push_job(f"hi-{j:02d}", files, tube=hi)
    store = TubeCountingStore(config.store.local)
    async with env.daemon(config, store=store):
        for j in range(jobs_per_tube):
            for prefix in ("hi", "lo"):
                state = await env.wait_final(f"{prefix}-{j:02d}", 60)
                assert state["state"] == "done", state
    total = 2 * jobs_per_tube * files_per_job
    assert len(store.tubes) == total
    # While both tubes still had ready jobs: "hi" holds 800 files, at 3:1 it runs dry near 1067.
    window = store.tubes[80:800]
    share = window.count("hi") / window.count("lo")
    print(f"weights 3:1 -> files uploaded hi:lo = {window.count('hi')}:{window.count('lo')} = {share:.2f}")
    assert 2.2 <= share <= 4.0

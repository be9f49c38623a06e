"""Adaptive upload slots (AIMD): the controller on a fake clock, and the daemon against a store
that throttles for a while (503 SlowDown from the fault proxy in front of moto)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from dataclasses import replace
from typing import Any

import pytest

from tests.faultproxy import FaultProxy, Rule
from tests.helpers import Env, deep_merge, uploaded_at_least, wait_until
from uploader.config import settings as config_mod
from uploader.config.settings import UploadConfig
from uploader.errors import ConfigError, ThrottledError, TransientFileError
from uploader.metrics import Metrics
from uploader.pipeline.aimd import Aimd
from uploader.pipeline.limits import Slots


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def controller(clock: Clock, concurrency: int = 32, **upload: Any) -> tuple[Aimd, Slots, Metrics]:
    config = replace(UploadConfig(), concurrency=concurrency, throttle_cooldown=1.0, **upload)
    slots, metrics = Slots(concurrency), Metrics()
    return Aimd(slots, config, metrics, clock), slots, metrics


def gauge(metrics: Metrics) -> float | None:
    return metrics.registry.get_sample_value("uploader_upload_slots")


async def test_a_burst_of_throttles_within_the_cooldown_cuts_once() -> None:
    clock = Clock()
    aimd, slots, metrics = controller(clock)
    for _ in range(20):  # every upload in flight comes back throttled at about the same time
        aimd.attempt_failed(ThrottledError("s3: SlowDown (503)"))
        clock.now += 0.01
    assert slots.limit == 16
    clock.now += 1.0
    aimd.throttled()
    assert slots.limit == 8
    assert gauge(metrics) == 8
    assert metrics.registry.get_sample_value("uploader_upload_slot_cuts_total") == 2


async def test_a_reload_retunes_the_controller_and_lifts_slots_it_may_no_longer_hold_down() -> None:
    clock = Clock()
    aimd, slots, metrics = controller(clock, min_concurrency=2)
    for _ in range(3):
        aimd.throttled()
        clock.now += 1.0
    assert slots.limit == 4

    base = replace(UploadConfig(), concurrency=32, throttle_cooldown=1.0)
    aimd.retune(replace(base, min_concurrency=8, decrease_factor=0.75, throttle_cooldown=5.0))
    assert (slots.limit, aimd.floor, aimd.factor, aimd.cooldown) == (8, 8, 0.75, 5.0)
    clock.now += 5.0
    aimd.throttled()
    assert slots.limit == 8, "cut below the new floor"

    aimd.retune(replace(base, concurrency=24, adaptive=False))
    assert (slots.limit, gauge(metrics)) == (24, 24)
    aimd.throttled()
    assert slots.limit == 24, "adaptation is off"

    aimd.retune(replace(base, concurrency=24))  # on again, nothing cut: the ceiling rules
    assert slots.limit == 24


async def test_other_transient_errors_do_not_cut() -> None:
    clock = Clock()
    aimd, slots, _ = controller(clock)
    aimd.attempt_failed(TransientFileError("s3: connection error: reset"))
    assert slots.limit == 32


async def test_cuts_stop_at_the_floor_and_the_floor_is_capped_by_the_ceiling() -> None:
    clock = Clock()
    aimd, slots, _ = controller(clock, min_concurrency=5)
    seen = []
    for _ in range(6):
        aimd.throttled()
        seen.append(slots.limit)
        clock.now += 1.0
    assert seen == [16, 8, 5, 5, 5, 5]
    small, small_slots, _ = controller(Clock(), concurrency=2, min_concurrency=5)
    small.throttled()
    assert small_slots.limit == 2


async def test_growth_is_one_slot_per_window_of_successes_after_the_cooldown() -> None:
    clock = Clock()
    aimd, slots, metrics = controller(clock, concurrency=8)
    aimd.throttled()
    assert slots.limit == 4
    for _ in range(50):  # completions of uploads sent before the cut: no evidence either way
        aimd.succeeded()
    assert slots.limit == 4
    clock.now += 1.0
    trace = []
    for _ in range(4 + 5 + 6 + 7 + 10):
        aimd.succeeded()
        trace.append(slots.limit)
    assert trace[3] == 5 and trace[2] == 4  # +1 after `limit` successes
    assert trace[4 + 5 - 1] == 6 and trace[4 + 5 + 6 + 7 - 1] == 8
    assert max(trace) == 8  # never above the ceiling
    assert gauge(metrics) == 8


async def test_the_ceiling_follows_sighup_and_a_backed_off_controller_stays_below_it() -> None:
    clock = Clock()
    aimd, slots, metrics = controller(clock, concurrency=16)
    aimd.set_ceiling(24)  # not backed off: follow at once
    assert slots.limit == 24
    aimd.throttled()
    assert slots.limit == 12
    aimd.set_ceiling(40)  # backed off: keep 12 and grow towards 40
    assert (slots.limit, aimd.ceiling) == (12, 40)
    aimd.set_ceiling(6)  # below the current width: clamp
    assert slots.limit == 6 and gauge(metrics) == 6
    clock.now += 2
    for _ in range(100):
        aimd.succeeded()
    assert slots.limit == 6


async def test_adaptive_false_keeps_the_slots_fixed() -> None:
    clock = Clock()
    aimd, slots, _ = controller(clock, adaptive=False)
    aimd.throttled()
    assert slots.limit == 32
    aimd.set_ceiling(10)
    assert slots.limit == 10


def test_adaptive_keys_parse_and_are_range_checked() -> None:
    upload = config_mod.parse(
        {"upload": {"adaptive": False, "min_concurrency": 2, "decrease_factor": 0.7, "throttle_cooldown": 3}}
    ).upload
    assert (upload.adaptive, upload.min_concurrency, upload.decrease_factor, upload.throttle_cooldown) == (
        False, 2, 0.7, 3.0,
    )
    default = config_mod.parse({}).upload
    assert (default.adaptive, default.min_concurrency, default.decrease_factor) == (True, 4, 0.5)
    for key, value, message in [
        ("decrease_factor", 1.0, "[upload].decrease_factor must be <= 0.95"),
        ("min_concurrency", 0, "[upload].min_concurrency must be >= 1"),
        ("throttle_cooldown", 0, "[upload].throttle_cooldown must be >= 0.01"),
        ("adaptive", "yes", "[upload].adaptive must be true or false"),
    ]:
        with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(".", r"\.")):
            config_mod.parse({"upload": {key: value}}, "u.toml")


# --- through the daemon -------------------------------------------------------------------


@pytest.mark.timeout(90)
async def test_slots_fall_under_throttling_and_recover_after_it(
    env: Env, bucket: str, proxy: FaultProxy
) -> None:
    concurrency, floor, cooldown, window = 16, 2, 0.2, 1.5
    data = deep_merge(env.config_data("s3", bucket), {
        "store": {"s3": {"endpoint_url": proxy.endpoint}},
        "upload": {
            "concurrency": concurrency,
            "min_concurrency": floor,
            "throttle_cooldown": cooldown,
            "retry": {"max_attempts": 5, "base": 0.02, "cap": 0.2},
        },
    })
    config = config_mod.parse(data, "aimd.toml")
    paths = env.write_files(800, size=256)
    trace: list[tuple[float, int]] = []
    gauge_wrong: list[tuple[int, float | None]] = []
    async with env.daemon(config) as daemon:
        slots = daemon.scheduler.slots

        async def sample() -> None:
            while True:
                if not trace or trace[-1][1] != slots.limit:
                    trace.append((time.monotonic(), slots.limit))
                    if gauge(daemon.metrics) != slots.limit:
                        gauge_wrong.append((slots.limit, gauge(daemon.metrics)))
                await asyncio.sleep(0.005)

        sampler = asyncio.create_task(sample())
        await env.push_job("aimd", [str(p) for p in paths])
        await wait_until(lambda: uploaded_at_least(env, "aimd", 40), 30, "40 files uploaded")
        throttle_from = time.monotonic()
        proxy.add(Rule("slowdown", methods=frozenset({"PUT"}), until=throttle_from + window))
        await wait_until(lambda: slots.limit == floor, 10, "the slots cut to the floor")
        await wait_until(lambda: time.monotonic() > throttle_from + window and slots.limit == concurrency,
                         30, "the slots to grow back")
        state = await env.wait_final("aimd", 60)
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
    throttled = proxy.count(lambda r: r.fault == "slowdown")
    origin = trace[0][0]
    print(f"AIMD trace ({throttled} requests throttled in {window}s from t={throttle_from - origin:.2f}s):")
    print("  " + ", ".join(f"{t - origin:.2f}s:{n}" for t, n in trace))
    assert (state["state"], state["uploaded"], state["failed"]) == ("done", "800", "0")
    assert await env.failures("aimd") == {}
    assert gauge_wrong == [], "uploader_upload_slots differs from the slots in force"
    limits = [n for _, n in trace]
    first_cut = limits.index(concurrency // 2)
    assert limits[: first_cut + 1] == [16, 8], "a burst of throttled answers counted more than once"
    assert limits[first_cut : first_cut + 3] == [8, 4, 2]
    cut_times = [t for (_, prev), (t, n) in itertools.pairwise(trace) if n < prev]
    assert all(b - a >= cooldown * 0.9 for a, b in itertools.pairwise(cut_times))
    assert limits[-1] == concurrency and min(limits) == floor
    assert throttled >= 10  # the store really throttled a burst of requests, not one

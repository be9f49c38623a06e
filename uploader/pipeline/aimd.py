"""Adaptive upload concurrency: additive increase, multiplicative decrease (AIMD).

A store that throttles (S3 `SlowDown`, HTTP 429/503) is saying that we send more than it
will take. Retrying each file with backoff rides that out, but keeps just as many requests
knocking; cutting the number of upload slots lowers the pressure at its source, as TCP does
with its congestion window. So:

- on a throttle answer, `slots *= decrease_factor` (never below the floor), at most once per
  `cooldown` seconds: the uploads already in flight when the cut was made were sent at the
  old width, and their throttles are the same signal, not a new one;
- on each success after the cooldown, count it; once a window's worth (`limit` successes,
  i.e. about one round trip of every slot) went through without a throttle, add one slot,
  up to the ceiling (`[upload].concurrency`, which SIGHUP may change).

The controller only calls `Slots.resize`, which never interrupts an upload: a cut takes
effect as uploads finish.
"""

from __future__ import annotations

import math
import time

import structlog

from uploader.clock import Clock
from uploader.config.settings import UploadConfig
from uploader.errors import FileError, ThrottledError
from uploader.metrics import Metrics
from uploader.pipeline.limits import Slots

log = structlog.get_logger("uploader.pipeline.aimd")



class Aimd:
    """Owns the size of `slots` between `floor` and `ceiling`; the scheduler reports outcomes."""

    def __init__(
        self,
        slots: Slots,
        config: UploadConfig,
        metrics: Metrics | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        self.slots = slots
        self._metrics = metrics
        self._clock = clock
        self.ceiling = config.concurrency
        self._cut_at = -math.inf  # time of the last decrease
        self._successes = 0
        self.retune(config)

    def retune(self, config: UploadConfig) -> None:
        """Start and SIGHUP: the tuning keys apply at once; slots cut below a new floor, or
        cut at all when adaptation is turned off, come back to where they may be."""
        self.enabled = config.adaptive
        self.factor = config.decrease_factor
        self.cooldown = config.throttle_cooldown
        self._min = config.min_concurrency
        self.set_ceiling(config.concurrency)
        if self.slots.limit < self.floor or not self.enabled:
            self._resize(self.floor if self.enabled else self.ceiling)

    @property
    def limit(self) -> int:
        return self.slots.limit

    @property
    def floor(self) -> int:
        return min(self._min, self.ceiling)

    def set_ceiling(self, ceiling: int) -> None:
        """New `[upload].concurrency` (start, SIGHUP). Not backed off: follow it at once;
        backed off after throttling: stay below it and keep growing towards it."""
        backed_off = self.enabled and self.slots.limit < self.ceiling
        self.ceiling = ceiling
        self._resize(min(self.slots.limit, ceiling) if backed_off else ceiling)

    def attempt_failed(self, error: FileError) -> None:
        """An upload attempt failed and will be retried; only throttling says anything about width."""
        if isinstance(error, ThrottledError):
            self.throttled()

    def throttled(self) -> None:
        """The store asked us to slow down: cut, unless a cut was made less than `cooldown` ago."""
        if not self.enabled:
            return
        now = self._clock()
        if now - self._cut_at < self.cooldown:
            return
        self._cut_at = now
        self._successes = 0
        old = self.slots.limit
        new = max(self.floor, math.floor(old * self.factor))
        if new >= old:
            return  # already at the floor
        self._resize(new)
        if self._metrics is not None:
            self._metrics.slot_cuts.inc()
        log.warning("upload_slots_cut", slots=new, was=old, floor=self.floor, reason="store throttling")

    def succeeded(self) -> None:
        """One upload went through; a window's worth of them without a throttle adds a slot."""
        if not self.enabled or self.slots.limit >= self.ceiling:
            return
        if self._clock() - self._cut_at < self.cooldown:
            return  # sent at the old width, before the cut could act: no evidence either way
        self._successes += 1
        if self._successes >= self.slots.limit:
            self._successes = 0
            self._resize(self.slots.limit + 1)

    def _resize(self, limit: int) -> None:
        if limit != self.slots.limit:
            self.slots.resize(limit)
        if self._metrics is not None:
            self._metrics.slots.set(limit)

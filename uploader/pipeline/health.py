"""Why the daemon takes no new work right now: each cause by name, with a one-line reason.

Redis not answering, or a store that refuses writes, is an outage, never a bad file: while any
cause is present nothing is reserved, and `/readyz` and sd_notify STATUS say why. Each cause
is logged once when it starts and once when it ends, however often it is seen meanwhile.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import structlog

log = structlog.get_logger("uploader.pipeline.health")

UNCHECKED = "not checked yet"


class Health:
    def __init__(self, *causes: str, on_change: Callable[[], None] | None = None) -> None:
        # Causes named here start present: nothing is reserved before they are proven fine.
        self._causes: dict[str, str] = dict.fromkeys(causes, UNCHECKED)
        self._clear = asyncio.Event()
        if not self._causes:
            self._clear.set()
        self._change = asyncio.Event()
        self.on_change = on_change

    @property
    def ok(self) -> bool:
        return not self._causes

    def reasons(self) -> dict[str, str]:
        return dict(self._causes)

    def fail(self, cause: str, reason: str) -> None:
        before = self._causes.get(cause)
        self._causes[cause] = reason
        self._clear.clear()
        if before is None or before == UNCHECKED:
            log.warning("taking_no_work", cause=cause, reason=reason)
        if before != reason:
            self._changed()

    def recover(self, cause: str) -> None:
        before = self._causes.pop(cause, None)
        if before is None:
            return
        if not self._causes:
            self._clear.set()
        if before != UNCHECKED:
            log.info("taking_work_again", cause=cause, after=before)
        self._changed()

    def judge(self, cause: str, reason: str | None) -> None:
        """A check's verdict: None, the cause is gone; else it is present for `reason`."""
        if reason is None:
            self.recover(cause)
        else:
            self.fail(cause, reason)

    async def wait_clear(self) -> None:
        await self._clear.wait()

    async def wait_change(self) -> None:
        """Until a cause comes, goes or changes its reason."""
        await self._change.wait()

    def unchecked(self) -> bool:
        """Some cause has had no verdict yet (the first probes are still out)."""
        return UNCHECKED in self._causes.values()

    def _changed(self) -> None:
        self._change.set()
        self._change = asyncio.Event()
        if self.on_change is not None:
            self.on_change()

    def describe(self) -> str:
        return "; ".join(f"{cause} ({reason})" for cause, reason in self._causes.items())


async def problem(check: Callable[[], Awaitable[object]], timeout: float) -> str | None:
    """None when `check` answers within `timeout`, else why not, in one line."""
    try:
        async with asyncio.timeout(timeout):
            await check()
    except Exception as exc:  # noqa: BLE001 - whatever the check met is the reason shown
        return str(exc) or type(exc).__name__
    return None

"""What the pipeline and a job's state know of a job source, whatever its broker: the delivery
that carries a run, a reservation that is no longer ours, and the ways a job is settled."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Settle = Literal["delete", "bury", "release"]


class ReservationLost(Exception):
    """The job is no longer ours: its connection closed, or beanstalkd gave it to another
    worker after its TTR ran out. beanstalkd has it; nothing here may settle it."""


@dataclass(frozen=True, slots=True)
class Delivery:
    """Which beanstalkd job carries a run: a job ID's runs are told apart by it."""

    address: str
    job: int
    put_at: float
    tube: str

"""Job sources: the protocols every source keeps (base.py) and one subpackage per broker.

`open_source` and `open_admin` are the one place that knows which brokers exist, as
`stores.open_store` is for stores: the daemon and the pipeline speak only `base.Source`, the
operators' commands and the status page's actions only `base.SourceAdmin`.
"""

from __future__ import annotations

from collections.abc import Callable

from uploader.clock import SYSTEM, Time
from uploader.config.settings import SourceConfig
from uploader.source.base import Source, SourceAdmin
from uploader.source.beanstalkd.admin import BeanstalkdAdmin
from uploader.source.beanstalkd.jobsource import BeanstalkdSource


def open_source(
    config: SourceConfig,
    probe_timeout: float,
    time: Time = SYSTEM,
    on_change: Callable[[str, bool], None] | None = None,
) -> Source:
    """The configured source; `on_change(server, up)` hears each server's verdict change."""
    return BeanstalkdSource(config, probe_timeout, time, on_change)


def open_admin(config: SourceConfig) -> SourceAdmin:
    """The configured source's operators' side; it owns its connections until `close`."""
    return BeanstalkdAdmin(config)

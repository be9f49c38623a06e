"""The TOML config file as frozen dataclasses, validated once at load.

Every error is one line that names the file, the key and the value, e.g.
`config/uploader.toml: [upload].concurrency must be >= 1, got 0`.
"""

from __future__ import annotations

import dataclasses
import re
import string
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal, cast, get_args
from urllib.parse import urlsplit

from uploader.config.stores import StoreConfig, read_store
from uploader.config.table import MISSING, MiB, Table, mask_url, show
from uploader.errors import ConfigError

SkipExisting = Literal["never", "same-size", "same-checksum"]
LogFormat = Literal["auto", "json", "console"]
LogLevel = Literal["debug", "info", "warning", "error"]
RedisMode = Literal["standalone", "cluster", "sentinel"]
REDIS_MODES: tuple[str, ...] = get_args(RedisMode)

TUBE_NAME = re.compile(r"^[A-Za-z0-9+/;.$_()][A-Za-z0-9+/;.$_()-]{0,199}\Z")
KEY_FIELDS = frozenset({"job_id", "relpath", "name", "index"})


@dataclass(frozen=True, slots=True)
class Tube:
    name: str
    weight: int = 1


@dataclass(frozen=True, slots=True)
class SourceConfig:
    addresses: tuple[str, ...] = ("127.0.0.1:11300",)
    tubes: tuple[Tube, ...] = (Tube("uploads"),)
    completion_tube: str = "uploads-done"
    max_active_jobs: int = 32
    # A job whose TTR is shorter than this is touched at least this often anyway.
    min_touch_interval: float = 0.5


@dataclass(frozen=True, slots=True)
class RedisConfig:
    mode: RedisMode = "standalone"
    url: str = "redis://127.0.0.1:6379/0"
    sentinels: tuple[str, ...] = ()
    service: str = "mymaster"
    key_prefix: str = "uploader:"
    page_size: int = 500
    flush_interval: float = 0.1
    flush_batch: int = 500
    progress_ttl: int = 7 * 24 * 3600
    files_ttl: int = 0  # 0 keeps a finished job's files list: it is the producer's


@dataclass(frozen=True, slots=True)
class RetryConfig:
    max_attempts: int = 5
    base: float = 0.2
    cap: float = 30.0


@dataclass(frozen=True, slots=True)
class UploadConfig:
    concurrency: int = 64
    allowed_roots: tuple[str, ...] = ("/srv/uploads",)
    key_template: str = "{job_id}/{relpath}"
    retry: RetryConfig = field(default_factory=RetryConfig)
    skip_existing: SkipExisting = "never"
    # A manifest entry naming a directory uploads every regular file below it
    # (uploader/entries/walk.py).
    directories: bool = True
    max_inflight_bytes: int = 256 * MiB
    allow_hard_links: bool = False
    default_content_type: str = "application/octet-stream"
    # AIMD (uploader/pipeline/aimd.py): cut the slots on store throttling, grow them back on
    # success.
    adaptive: bool = True
    min_concurrency: int = 4
    decrease_factor: float = 0.5
    throttle_cooldown: float = 1.0


@dataclass(frozen=True, slots=True)
class HttpConfig:
    listen: str = "127.0.0.1:9464"
    token: str = field(default="", repr=False)


@dataclass(frozen=True, slots=True)
class DaemonConfig:
    drain_timeout: float = 30.0
    release_timeout: float = 10.0
    log_level: LogLevel = "info"
    log_format: LogFormat = "auto"


@dataclass(frozen=True, slots=True)
class RateLimit:
    """A files/s and bytes/s pair; 0 means unlimited."""

    files_per_second: float = 0.0
    bytes_per_second: float = 0.0


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    """`[limits]`: global token buckets, plus optional ones per tube in `[limits.tubes.NAME]`."""

    files_per_second: float = 0.0
    bytes_per_second: float = 0.0
    # Bucket capacity in seconds of its rate: how much may go at once after a quiet spell.
    burst_seconds: float = 1.0
    tubes: tuple[tuple[str, RateLimit], ...] = ()

    @property
    def total(self) -> RateLimit:
        return RateLimit(self.files_per_second, self.bytes_per_second)


@dataclass(frozen=True, slots=True)
class Config:
    source: SourceConfig = field(default_factory=SourceConfig)
    redis: RedisConfig = field(default_factory=RedisConfig)
    upload: UploadConfig = field(default_factory=UploadConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    path: str = "<defaults>"


SECRET_FIELDS = frozenset(
    {"access_key_id", "secret_access_key", "session_token", "token", "connection_string"}
)
# (name, value) pairs whose names may be shown but whose values are secrets.
SECRET_PAIR_FIELDS = frozenset({"headers"})


def _address(table: Table, key: str, value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise table.fail(key, f"must be HOST:PORT, got {show(value)}")
    return value


def _source(table: Table) -> SourceConfig:
    d = SourceConfig()
    raw = table.raw("address")
    if raw is MISSING:
        addresses = d.addresses
    elif isinstance(raw, str):
        addresses = (raw,)
    elif isinstance(raw, list) and raw and all(isinstance(a, str) for a in raw):
        addresses = tuple(raw)
    else:
        raise table.fail("address", f"must be HOST:PORT or a list of them, got {show(raw)}")
    addresses = tuple(_address(table, "address", a) for a in addresses)
    tubes = _tubes(table, d.tubes)
    completion = table.get("completion_tube", str, d.completion_tube)
    if completion and not TUBE_NAME.match(completion):
        raise table.fail("completion_tube", f"is not a valid tube name, got {show(completion)}")
    return SourceConfig(
        addresses=addresses,
        tubes=tubes,
        completion_tube=completion,
        max_active_jobs=table.number("max_active_jobs", int, d.max_active_jobs, 1, 100_000),
        min_touch_interval=table.number("min_touch_interval", float, d.min_touch_interval, 0.05, 3600),
    )


def _tubes(table: Table, default: tuple[Tube, ...]) -> tuple[Tube, ...]:
    raw = table.raw("tubes")
    if raw is MISSING:
        return default
    if not isinstance(raw, list) or not raw:
        raise table.fail("tubes", f"must be a non-empty list, got {show(raw)}")
    tubes: list[Tube] = []
    for item in raw:
        if isinstance(item, str):
            tube = Tube(item)
        elif isinstance(item, dict):
            sub = Table(table.file, f"{table.name}.tubes", item)
            name = sub.get("name", str, "")
            tube = Tube(name, sub.number("weight", int, 1, 1, 1000))
            sub.close()
        else:
            raise table.fail("tubes", f"entries must be names or tables, got {show(item)}")
        if not TUBE_NAME.match(tube.name):
            raise table.fail("tubes", f"has an invalid tube name {show(tube.name)}")
        tubes.append(tube)
    if len({t.name for t in tubes}) != len(tubes):
        raise table.fail("tubes", f"names a tube twice: {show(raw)}")
    return tuple(tubes)


def _redis_url(table: Table, mode: RedisMode, url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise table.fail("url", f"must be a redis://, rediss:// or unix:// URL, got {show(mask_url(url))}")
    if mode != "standalone" and parts.scheme == "unix":
        raise table.fail("url", f"must be redis:// or rediss:// in {mode} mode, got {show(mask_url(url))}")
    if mode == "cluster" and parts.path.strip("/") not in ("", "0"):
        raise table.fail("url", f"a Redis Cluster has only database 0, got {show(mask_url(url))}")
    return url


def _redis(table: Table) -> RedisConfig:
    d = RedisConfig()
    mode = cast(RedisMode, table.choice("mode", REDIS_MODES, d.mode))
    url = _redis_url(table, mode, table.get("url", str, d.url))
    sentinels = tuple(_address(table, "sentinels", a) for a in table.strings("sentinels", d.sentinels))
    if mode == "sentinel" and not sentinels:
        raise table.fail("sentinels", "must name at least one sentinel (host:port) in sentinel mode")
    service = table.get("service", str, d.service)
    if not service:
        raise table.fail("service", "must name the monitored master")
    prefix = table.get("key_prefix", str, d.key_prefix)
    if any(c in prefix for c in "{} \t\r\n"):
        raise table.fail("key_prefix", f"must not contain braces or spaces, got {show(prefix)}")
    return RedisConfig(
        mode=mode, url=url, sentinels=sentinels, service=service, key_prefix=prefix,
        page_size=table.number("page_size", int, d.page_size, 1, 100_000),
        flush_interval=table.number("flush_interval", float, d.flush_interval, 0.001, 60),
        flush_batch=table.number("flush_batch", int, d.flush_batch, 1, 100_000),
        progress_ttl=table.number("progress_ttl", int, d.progress_ttl, 1, 10 * 365 * 86400),
        files_ttl=table.number("files_ttl", int, d.files_ttl, 0, 10 * 365 * 86400),
    )


def _retry(table: Table) -> RetryConfig:
    d = RetryConfig()
    config = RetryConfig(
        max_attempts=table.number("max_attempts", int, d.max_attempts, 1, 100),
        base=table.number("base", float, d.base, 0, 3600),
        cap=table.number("cap", float, d.cap, 0, 86400),
    )
    if config.cap < config.base:
        raise table.fail("cap", f"must be >= base ({config.base:g}), got {config.cap:g}")
    return config


def _upload(table: Table) -> UploadConfig:
    d = UploadConfig()
    roots = table.strings("allowed_roots", d.allowed_roots)
    if not roots:
        raise table.fail("allowed_roots", "must name at least one directory, got []")
    for root in roots:
        if not root.startswith("/") or root == "/":
            raise table.fail("allowed_roots", f"entries must be absolute and not '/', got {show(root)}")
    template = table.get("key_template", str, d.key_template)
    try:
        parsed = [(f, spec, conv) for _, f, spec, conv in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:
        raise table.fail("key_template", f"is not a valid template ({exc}), got {show(template)}") from None
    fields = {f for f, _, _ in parsed}
    plain = all(not spec and conv is None for _, spec, conv in parsed)
    if not fields <= KEY_FIELDS or not plain or not template.strip("/"):
        known = ", ".join("{" + f + "}" for f in sorted(KEY_FIELDS))
        raise table.fail("key_template", f"may only use {known}, got {show(template)}")
    retry_table = table.table("retry")
    retry = _retry(retry_table)
    retry_table.close()
    return UploadConfig(
        concurrency=table.number("concurrency", int, d.concurrency, 1, 10_000),
        allowed_roots=roots,
        key_template=template,
        retry=retry,
        skip_existing=cast(
            SkipExisting, table.choice("skip_existing", get_args(SkipExisting), d.skip_existing)
        ),
        max_inflight_bytes=table.number("max_inflight_bytes", int, d.max_inflight_bytes, MiB, 1 << 40),
        allow_hard_links=table.get("allow_hard_links", bool, d.allow_hard_links),
        default_content_type=table.get("default_content_type", str, d.default_content_type),
        directories=table.get("directories", bool, d.directories),
        adaptive=table.get("adaptive", bool, d.adaptive),
        min_concurrency=table.number("min_concurrency", int, d.min_concurrency, 1, 10_000),
        decrease_factor=table.number("decrease_factor", float, d.decrease_factor, 0.1, 0.95),
        throttle_cooldown=table.number("throttle_cooldown", float, d.throttle_cooldown, 0.01, 3600),
    )


def _http(table: Table) -> HttpConfig:
    d = HttpConfig()
    listen = table.get("listen", str, d.listen)
    if listen:
        _address(table, "listen", listen)
    return HttpConfig(listen=listen, token=table.get("token", str, d.token))


def _daemon(table: Table) -> DaemonConfig:
    d = DaemonConfig()
    return DaemonConfig(
        drain_timeout=table.number("drain_timeout", float, d.drain_timeout, 0, 86400),
        release_timeout=table.number("release_timeout", float, d.release_timeout, 0, 86400),
        log_level=cast(LogLevel, table.choice("log_level", get_args(LogLevel), d.log_level)),
        log_format=cast(LogFormat, table.choice("log_format", get_args(LogFormat), d.log_format)),
    )


def _rate(table: Table) -> RateLimit:
    return RateLimit(
        files_per_second=table.number("files_per_second", float, 0.0, 0, 1e9),
        bytes_per_second=table.number("bytes_per_second", float, 0.0, 0, 1e15),
    )


def _limits(table: Table) -> LimitsConfig:
    d = LimitsConfig()
    total = _rate(table)
    tubes_t = table.table("tubes")
    tubes: list[tuple[str, RateLimit]] = []
    for name in tubes_t.data:
        if not TUBE_NAME.match(name):
            raise tubes_t.fail(name, "is not a valid tube name")
        tubes_t.used.add(name)
        sub = Table(table.file, f"{tubes_t.name}.{name}", tubes_t.data[name])
        tubes.append((name, _rate(sub)))
        sub.close()
    tubes_t.close()
    return LimitsConfig(
        files_per_second=total.files_per_second,
        bytes_per_second=total.bytes_per_second,
        burst_seconds=table.number("burst_seconds", float, d.burst_seconds, 0.001, 3600),
        tubes=tuple(tubes),
    )


_SECTIONS: Mapping[str, Callable[[Table], object]] = {
    "source": _source,
    "redis": _redis,
    "upload": _upload,
    "store": read_store,
    "http": _http,
    "daemon": _daemon,
    "limits": _limits,
}


def parse(data: Mapping[str, object], path: str = "<config>") -> Config:
    """Build a Config from already-parsed TOML; raises ConfigError naming `path`."""
    unknown = sorted(set(data) - set(_SECTIONS))
    if unknown:
        raise ConfigError(f"{path}: [{unknown[0]}] is not a known table")
    sections: dict[str, object] = {}
    for name, build in _SECTIONS.items():
        table = Table(path, name, data.get(name, {}))
        sections[name] = build(table)
        table.close()
    return Config(path=path, **sections)  # type: ignore[arg-type]


def load(path: str) -> Config:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not valid TOML: the file is not UTF-8") from None
    return parse(data, path)


# Fields whose TOML key has another name, and fields that are no key of the file at all.
_TOML_KEYS: Mapping[str, str] = {"SourceConfig.addresses": "address"}
_NOT_KEYS = frozenset({"Config.path"})
# (name, value) pairs that the file writes as a table: `[limits.tubes.NAME]`, `tagging = {...}`.
_PAIR_TABLES = frozenset({"LimitsConfig.tubes", "S3StoreConfig.tagging"})


def redacted(config: Config) -> dict[str, Any]:
    """The effective config as plain data, secrets masked: safe to print or log. Keys are the
    config file's own, so the output reads (and, secrets aside, loads) as the file would."""

    def walk(obj: object) -> Any:
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            out: dict[str, Any] = {}
            for f in dataclasses.fields(obj):
                where = f"{type(obj).__name__}.{f.name}"
                if where not in _NOT_KEYS:
                    out[_TOML_KEYS.get(where, f.name)] = shown(where, f.name, getattr(obj, f.name))
            return out
        if isinstance(obj, tuple):
            return [walk(v) for v in obj]
        return obj

    def shown(where: str, name: str, value: object) -> Any:
        if name in SECRET_FIELDS:
            return "***" if value else ""
        if name in SECRET_PAIR_FIELDS:
            return {key: "***" for key, _ in cast(tuple[tuple[str, str], ...], value)}
        if name in ("url", "url_template", "health_url") and isinstance(value, str):
            return mask_url(value)
        if where in _PAIR_TABLES:
            return {key: walk(v) for key, v in cast(tuple[tuple[str, object], ...], value)}
        return walk(value)

    result: dict[str, Any] = walk(config)
    return result


@dataclass(frozen=True, slots=True)
class Reload:
    """What a SIGHUP makes of a fresh file: `config` to run on now, and the tables whose
    changes it leaves out (`restart`), since they are wired into connections and clients."""

    config: Config
    restart: tuple[str, ...]


def reloaded(old: Config, fresh: Config) -> Reload:
    live = _live(old, fresh)
    restart = tuple(
        f.name
        for f in dataclasses.fields(Config)
        if f.name != "path" and getattr(fresh, f.name) != getattr(live, f.name)
    )
    return Reload(live, restart)


def _live(old: Config, fresh: Config) -> Config:
    """`old` with the keys a running daemon can apply taken from `fresh`."""
    return replace(
        old,
        upload=replace(
            old.upload,
            concurrency=fresh.upload.concurrency,
            adaptive=fresh.upload.adaptive,
            min_concurrency=fresh.upload.min_concurrency,
            decrease_factor=fresh.upload.decrease_factor,
            throttle_cooldown=fresh.upload.throttle_cooldown,
        ),
        daemon=replace(old.daemon, log_level=fresh.daemon.log_level, log_format=fresh.daemon.log_format),
        http=replace(old.http, token=fresh.http.token),
        limits=fresh.limits,
    )

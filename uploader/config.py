"""The TOML config file as frozen dataclasses, validated once at load.

Every error is one line that names the file, the key and the value, e.g.
`config/uploader.toml: [upload].concurrency must be >= 1, got 0`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import string
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, cast, get_args
from urllib.parse import urlsplit, urlunsplit

from uploader.errors import ConfigError

T = TypeVar("T")

StoreKind = Literal["local", "s3", "http"]
SkipExisting = Literal["never", "same-size", "same-checksum"]
LogFormat = Literal["auto", "json", "console"]
LogLevel = Literal["debug", "info", "warning", "error"]

TUBE_NAME = re.compile(r"^[A-Za-z0-9+/;.$_()][A-Za-z0-9+/;.$_()-]{0,199}\Z")
KEY_FIELDS = frozenset({"job_id", "relpath", "name", "index"})
MiB = 1024 * 1024


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
    url: str = "redis://127.0.0.1:6379/0"
    key_prefix: str = "uploader:"
    page_size: int = 500
    flush_interval: float = 0.1
    flush_batch: int = 500
    progress_ttl: int = 7 * 24 * 3600


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
    # A manifest entry naming a directory uploads every regular file below it (uploader/walk.py).
    directories: bool = True
    max_inflight_bytes: int = 256 * MiB
    allow_hard_links: bool = False
    default_content_type: str = "application/octet-stream"
    # AIMD (uploader/aimd.py): cut the slots on store throttling, grow them back on success.
    adaptive: bool = True
    min_concurrency: int = 4
    decrease_factor: float = 0.5
    throttle_cooldown: float = 1.0


@dataclass(frozen=True, slots=True)
class LocalStoreConfig:
    root: str = "/var/lib/uploader/objects"
    fsync: bool = True


@dataclass(frozen=True, slots=True)
class S3StoreConfig:
    bucket: str = "uploads"
    prefix: str = ""
    region: str = "us-east-1"
    endpoint_url: str = ""
    access_key_id: str = field(default="", repr=False)
    secret_access_key: str = field(default="", repr=False)
    session_token: str = field(default="", repr=False)
    addressing_style: Literal["auto", "path", "virtual"] = "auto"
    multipart_threshold: int = 16 * MiB
    part_size: int = 16 * MiB
    timeout: float = 60.0
    # PutObject with If-None-Match: * when skipping existing objects (412: already there).
    conditional_put: bool = False


@dataclass(frozen=True, slots=True)
class HttpStoreConfig:
    # e.g. "https://blobs.example.com/bucket/{key}"; required when [store].kind is "http".
    url_template: str = ""
    # Sent with every request to the template's origin; values are secrets (API keys).
    headers: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    meta_prefix: str = "x-meta-"
    timeout: float = 60.0
    head_for_size: bool = True
    # GET by check(); empty: readiness only checks that the template's host accepts connections.
    health_url: str = ""
    # Files from this size up are streamed in chunks of `chunk_size` instead of read whole.
    stream_threshold: int = 8 * MiB
    chunk_size: int = 1 * MiB
    # Hosts a manifest entry's own "url" may name ("*.example.com" covers its subdomains);
    # empty: any host. Anything else fails the file before a byte is read.
    url_hosts: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class StoreConfig:
    kind: StoreKind = "local"
    local: LocalStoreConfig = field(default_factory=LocalStoreConfig)
    s3: S3StoreConfig = field(default_factory=S3StoreConfig)
    http: HttpStoreConfig = field(default_factory=HttpStoreConfig)


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
class Config:
    source: SourceConfig = field(default_factory=SourceConfig)
    redis: RedisConfig = field(default_factory=RedisConfig)
    upload: UploadConfig = field(default_factory=UploadConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    limits: LimitsConfig = field(default_factory=lambda: LimitsConfig())
    path: str = "<defaults>"


SECRET_FIELDS = frozenset({"access_key_id", "secret_access_key", "session_token", "token"})
# (name, value) pairs whose names may be shown but whose values are secrets.
SECRET_PAIR_FIELDS = frozenset({"headers"})


class _Table:
    """Reads one TOML table, checking types and ranges and refusing unknown keys."""

    def __init__(self, file: str, name: str, data: object) -> None:
        self.file = file
        self.name = name
        if not isinstance(data, dict):
            raise ConfigError(f"{file}: [{name}] must be a table, got {_show(data)}")
        self.data: dict[str, Any] = data
        self.used: set[str] = set()

    def where(self, key: str) -> str:
        return f"[{self.name}].{_toml_key(key)}"

    def fail(self, key: str, message: str) -> ConfigError:
        return ConfigError(f"{self.file}: {self.where(key)} {message}")

    def raw(self, key: str) -> object:
        self.used.add(key)
        return self.data.get(key, _MISSING)

    def get(self, key: str, kind: type[T], default: T) -> T:
        value = self.raw(key)
        if value is _MISSING:
            return default
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            raise self.fail(key, f"must be {_type_name(kind)}, got {_show(value)}")
        if isinstance(value, float) and not math.isfinite(value):
            raise self.fail(key, f"must be a finite number, got {_show(value)}")
        return value

    def number(self, key: str, kind: type[T], default: T, low: float, high: float) -> T:
        value = self.get(key, kind, default)
        assert isinstance(value, int | float)
        if value < low:
            raise self.fail(key, f"must be >= {low:g}, got {_show(value)}")
        if value > high:
            raise self.fail(key, f"must be <= {high:g}, got {_show(value)}")
        return value

    def choice(self, key: str, choices: tuple[str, ...], default: str) -> str:
        value = self.get(key, str, default)
        if value not in choices:
            allowed = ", ".join(repr(c) for c in choices)
            raise self.fail(key, f"must be one of {allowed}, got {_show(value)}")
        return value

    def strings(self, key: str, default: tuple[str, ...]) -> tuple[str, ...]:
        value = self.raw(key)
        if value is _MISSING:
            return default
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.fail(key, f"must be a list of strings, got {_show(value)}")
        return tuple(value)

    def table(self, key: str) -> _Table:
        value = self.raw(key)
        return _Table(self.file, f"{self.name}.{_toml_key(key)}", {} if value is _MISSING else value)

    def close(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            raise self.fail(unknown[0], f"is not a known key (value {_show(self.data[unknown[0]])})")


_MISSING: Any = object()


def _type_name(kind: type) -> str:
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
        kind, kind.__name__
    )


_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _toml_key(key: str) -> str:
    """A key as TOML spells it: bare when it may be, else quoted (so an error stays one line)."""
    return key if _BARE_KEY.match(key) else json.dumps(key)


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _address(table: _Table, key: str, value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise table.fail(key, f"must be HOST:PORT, got {_show(value)}")
    return value


def _source(table: _Table) -> SourceConfig:
    d = SourceConfig()
    raw = table.raw("address")
    if raw is _MISSING:
        addresses = d.addresses
    elif isinstance(raw, str):
        addresses = (raw,)
    elif isinstance(raw, list) and raw and all(isinstance(a, str) for a in raw):
        addresses = tuple(raw)
    else:
        raise table.fail("address", f"must be HOST:PORT or a list of them, got {_show(raw)}")
    addresses = tuple(_address(table, "address", a) for a in addresses)
    tubes = _tubes(table, d.tubes)
    completion = table.get("completion_tube", str, d.completion_tube)
    if completion and not TUBE_NAME.match(completion):
        raise table.fail("completion_tube", f"is not a valid tube name, got {_show(completion)}")
    return SourceConfig(
        addresses=addresses,
        tubes=tubes,
        completion_tube=completion,
        max_active_jobs=table.number("max_active_jobs", int, d.max_active_jobs, 1, 100_000),
        min_touch_interval=table.number("min_touch_interval", float, d.min_touch_interval, 0.05, 3600),
    )


def _tubes(table: _Table, default: tuple[Tube, ...]) -> tuple[Tube, ...]:
    raw = table.raw("tubes")
    if raw is _MISSING:
        return default
    if not isinstance(raw, list) or not raw:
        raise table.fail("tubes", f"must be a non-empty list, got {_show(raw)}")
    tubes: list[Tube] = []
    for item in raw:
        if isinstance(item, str):
            tube = Tube(item)
        elif isinstance(item, dict):
            sub = _Table(table.file, f"{table.name}.tubes", item)
            name = sub.get("name", str, "")
            tube = Tube(name, sub.number("weight", int, 1, 1, 1000))
            sub.close()
        else:
            raise table.fail("tubes", f"entries must be names or tables, got {_show(item)}")
        if not TUBE_NAME.match(tube.name):
            raise table.fail("tubes", f"has an invalid tube name {_show(tube.name)}")
        tubes.append(tube)
    if len({t.name for t in tubes}) != len(tubes):
        raise table.fail("tubes", f"names a tube twice: {_show(raw)}")
    return tuple(tubes)


def _redis(table: _Table) -> RedisConfig:
    d = RedisConfig()
    url = table.get("url", str, d.url)
    if urlsplit(url).scheme not in ("redis", "rediss", "unix"):
        raise table.fail("url", f"must be a redis://, rediss:// or unix:// URL, got {_show(mask_url(url))}")
    prefix = table.get("key_prefix", str, d.key_prefix)
    if any(c in prefix for c in "{} \t\r\n"):
        raise table.fail("key_prefix", f"must not contain braces or spaces, got {_show(prefix)}")
    return RedisConfig(
        url=url,
        key_prefix=prefix,
        page_size=table.number("page_size", int, d.page_size, 1, 100_000),
        flush_interval=table.number("flush_interval", float, d.flush_interval, 0.001, 60),
        flush_batch=table.number("flush_batch", int, d.flush_batch, 1, 100_000),
        progress_ttl=table.number("progress_ttl", int, d.progress_ttl, 1, 10 * 365 * 86400),
    )


def _retry(table: _Table) -> RetryConfig:
    d = RetryConfig()
    config = RetryConfig(
        max_attempts=table.number("max_attempts", int, d.max_attempts, 1, 100),
        base=table.number("base", float, d.base, 0, 3600),
        cap=table.number("cap", float, d.cap, 0, 86400),
    )
    if config.cap < config.base:
        raise table.fail("cap", f"must be >= base ({config.base:g}), got {config.cap:g}")
    return config


def _upload(table: _Table) -> UploadConfig:
    d = UploadConfig()
    roots = table.strings("allowed_roots", d.allowed_roots)
    if not roots:
        raise table.fail("allowed_roots", "must name at least one directory, got []")
    for root in roots:
        if not root.startswith("/") or root == "/":
            raise table.fail("allowed_roots", f"entries must be absolute and not '/', got {_show(root)}")
    template = table.get("key_template", str, d.key_template)
    try:
        parsed = [(f, spec, conv) for _, f, spec, conv in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:
        raise table.fail("key_template", f"is not a valid template ({exc}), got {_show(template)}") from None
    fields = {f for f, _, _ in parsed}
    plain = all(not spec and conv is None for _, spec, conv in parsed)
    if not fields <= KEY_FIELDS or not plain or not template.strip("/"):
        known = ", ".join("{" + f + "}" for f in sorted(KEY_FIELDS))
        raise table.fail("key_template", f"may only use {known}, got {_show(template)}")
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


def _store(table: _Table) -> StoreConfig:
    d = StoreConfig()
    kind = cast(StoreKind, table.choice("kind", get_args(StoreKind), d.kind))
    local_t = table.table("local")
    dl = d.local
    local = LocalStoreConfig(
        root=local_t.get("root", str, dl.root), fsync=local_t.get("fsync", bool, dl.fsync)
    )
    if not local.root.startswith("/"):
        raise local_t.fail("root", f"must be an absolute path, got {_show(local.root)}")
    local_t.close()
    s3_t = table.table("s3")
    ds = d.s3
    s3 = S3StoreConfig(
        bucket=s3_t.get("bucket", str, ds.bucket),
        prefix=s3_t.get("prefix", str, ds.prefix),
        region=s3_t.get("region", str, ds.region),
        endpoint_url=s3_t.get("endpoint_url", str, ds.endpoint_url),
        access_key_id=s3_t.get("access_key_id", str, ds.access_key_id),
        secret_access_key=s3_t.get("secret_access_key", str, ds.secret_access_key),
        session_token=s3_t.get("session_token", str, ds.session_token),
        addressing_style=cast(
            Literal["auto", "path", "virtual"],
            s3_t.choice("addressing_style", ("auto", "path", "virtual"), ds.addressing_style),
        ),
        multipart_threshold=s3_t.number("multipart_threshold", int, ds.multipart_threshold, 5 * MiB, 5 << 30),
        part_size=s3_t.number("part_size", int, ds.part_size, 5 * MiB, 5 << 30),
        timeout=s3_t.number("timeout", float, ds.timeout, 0.1, 3600),
        conditional_put=s3_t.get("conditional_put", bool, ds.conditional_put),
    )
    if kind == "s3" and not s3.bucket:
        raise s3_t.fail("bucket", "must be set when [store].kind is 's3', got ''")
    if s3.endpoint_url and urlsplit(s3.endpoint_url).scheme not in ("http", "https"):
        raise s3_t.fail("endpoint_url", f"must be an http(s) URL, got {_show(s3.endpoint_url)}")
    if bool(s3.access_key_id) != bool(s3.secret_access_key):
        raise s3_t.fail("secret_access_key", "and access_key_id must be set together")
    if s3.prefix.startswith("/") or ".." in s3.prefix.split("/"):
        raise s3_t.fail("prefix", f"must not start with '/' or contain '..', got {_show(s3.prefix)}")
    s3_t.close()
    http = _http_store(table.table("http"), kind)
    return StoreConfig(kind=kind, local=local, s3=s3, http=http)


def _http(table: _Table) -> HttpConfig:
    d = HttpConfig()
    listen = table.get("listen", str, d.listen)
    if listen:
        _address(table, "listen", listen)
    return HttpConfig(listen=listen, token=table.get("token", str, d.token))


def _daemon(table: _Table) -> DaemonConfig:
    d = DaemonConfig()
    return DaemonConfig(
        drain_timeout=table.number("drain_timeout", float, d.drain_timeout, 0, 86400),
        release_timeout=table.number("release_timeout", float, d.release_timeout, 0, 86400),
        log_level=cast(LogLevel, table.choice("log_level", get_args(LogLevel), d.log_level)),
        log_format=cast(LogFormat, table.choice("log_format", get_args(LogFormat), d.log_format)),
    )


_SECTIONS: Mapping[str, Callable[[_Table], object]] = {
    "source": _source,
    "redis": _redis,
    "upload": _upload,
    "store": _store,
    "http": _http,
    "daemon": _daemon,
    "limits": lambda table: _limits(table),
}


def parse(data: Mapping[str, object], path: str = "<config>") -> Config:
    """Build a Config from already-parsed TOML; raises ConfigError naming `path`."""
    unknown = sorted(set(data) - set(_SECTIONS))
    if unknown:
        raise ConfigError(f"{path}: [{unknown[0]}] is not a known table")
    sections: dict[str, object] = {}
    for name, build in _SECTIONS.items():
        table = _Table(path, name, data.get(name, {}))
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


def mask_url(url: str) -> str:
    """The URL with any password replaced, for logs and `check-config`."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


# Fields whose TOML key has another name, and fields that are no key of the file at all.
_TOML_KEYS: Mapping[str, str] = {"SourceConfig.addresses": "address"}
_NOT_KEYS = frozenset({"Config.path"})
# (name, table) pairs that the file writes as a table of tables, `[limits.tubes.NAME]`.
_PAIR_TABLES = frozenset({"LimitsConfig.tubes"})


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


# --- [store.http] and [limits] -------------------------------------------------------------

HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,256}$")
# A host name or IP address, or "*." and a domain; no scheme, port or path.
HOST_PATTERN = re.compile(r"^(\*\.)?[a-z0-9:]([a-z0-9.:-]*[a-z0-9])?$")
# Headers the HTTP store computes itself for each request; configuring them is a mistake.
RESERVED_HEADERS = frozenset({"content-length", "content-type", "transfer-encoding", "host", "connection"})


def _http_url(table: _Table, key: str, url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise table.fail(key, f"must be an http(s) URL with a host, got {_show(mask_url(url))}")


def _http_store(table: _Table, kind: str) -> HttpStoreConfig:
    d = HttpStoreConfig()
    template = table.get("url_template", str, d.url_template)
    if not template and kind == "http":
        raise table.fail("url_template", "must be set when [store].kind is 'http', got ''")
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:
        raise table.fail("url_template", f"is not a valid template ({exc})") from None
    if template and fields != ["key"]:
        shown = _show(mask_url(template))
        raise table.fail("url_template", f"must contain {{key}} once and no other field, got {shown}")
    if template:
        _http_url(table, "url_template", template.format(key="k"))
    headers_t = table.table("headers")
    headers: list[tuple[str, str]] = []
    for name in headers_t.data:
        value = headers_t.raw(name)
        if not isinstance(value, str):
            raise headers_t.fail(name, "must be a string (value not shown)")
        if not HEADER_NAME.match(name) or name.lower() in RESERVED_HEADERS:
            raise headers_t.fail(name, "is not a header name that may be configured")
        if not value.isascii() or not value.isprintable():
            # The value is a secret: say what is wrong with it, never what it is.
            raise headers_t.fail(name, "must be printable ASCII (value not shown)")
        headers.append((name, value))
    headers_t.close()
    prefix = table.get("meta_prefix", str, d.meta_prefix)
    if not prefix or not HEADER_NAME.match(prefix):
        raise table.fail("meta_prefix", f"must be a non-empty header name prefix, got {_show(prefix)}")
    health = table.get("health_url", str, d.health_url)
    if health:
        _http_url(table, "health_url", health)
    url_hosts = tuple(h.lower() for h in table.strings("url_hosts", d.url_hosts))
    for host in url_hosts:
        if not HOST_PATTERN.match(host):
            raise table.fail("url_hosts", f"holds {_show(host)}, not a host name or '*.domain'")
    config = HttpStoreConfig(
        url_template=template,
        headers=tuple(headers),
        meta_prefix=prefix,
        timeout=table.number("timeout", float, d.timeout, 0.1, 3600),
        head_for_size=table.get("head_for_size", bool, d.head_for_size),
        health_url=health,
        stream_threshold=table.number("stream_threshold", int, d.stream_threshold, 64 * 1024, 1 << 40),
        chunk_size=table.number("chunk_size", int, d.chunk_size, 16 * 1024, 256 * MiB),
        url_hosts=url_hosts,
    )
    table.close()
    return config


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


def _rate(table: _Table) -> RateLimit:
    return RateLimit(
        files_per_second=table.number("files_per_second", float, 0.0, 0, 1e9),
        bytes_per_second=table.number("bytes_per_second", float, 0.0, 0, 1e15),
    )


def _limits(table: _Table) -> LimitsConfig:
    d = LimitsConfig()
    total = _rate(table)
    tubes_t = table.table("tubes")
    tubes: list[tuple[str, RateLimit]] = []
    for name in tubes_t.data:
        if not TUBE_NAME.match(name):
            raise tubes_t.fail(name, "is not a valid tube name")
        tubes_t.used.add(name)
        sub = _Table(table.file, f"{tubes_t.name}.{name}", tubes_t.data[name])
        tubes.append((name, _rate(sub)))
        sub.close()
    tubes_t.close()
    return LimitsConfig(
        files_per_second=total.files_per_second,
        bytes_per_second=total.bytes_per_second,
        burst_seconds=table.number("burst_seconds", float, d.burst_seconds, 0.001, 3600),
        tubes=tuple(tubes),
    )

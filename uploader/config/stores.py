"""The `[store]` tables of the config file: which store, and the settings of each kind.

Every kind's table is validated, the unused ones too, so a mistake is found when the file is
loaded and not on the day the store is switched.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass, field
from typing import Literal, cast, get_args
from urllib.parse import urlsplit

from uploader.config.objectfields import read_s3_options
from uploader.config.table import MiB, Table, mask_url, show

StoreKind = Literal["local", "s3", "http", "azure"]
AddressingStyle = Literal["auto", "path", "virtual"]

HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,256}$")
# A host name or IP address, or "*." and a domain; no scheme, port or path.
HOST_PATTERN = re.compile(r"^(\*\.)?[a-z0-9:]([a-z0-9.:-]*[a-z0-9])?$")
# Headers the HTTP store computes itself for each request; configuring them is a mistake.
RESERVED_HEADERS = frozenset({"content-length", "content-type", "transfer-encoding", "host", "connection"})
# Azure's container names: 3 to 63 of a-z, 0-9 and single hyphens, neither first nor last;
# "$root" is the account's root container.
CONTAINER_NAME = re.compile(r"^(?!.*--)[a-z0-9][a-z0-9-]{1,61}[a-z0-9]$|^\$root$")
MAX_BLOCK = 4000 * MiB  # Azure's largest staged block
MAX_SINGLE_PUT = 5000 * MiB  # and its largest blob in one Put Blob


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
    addressing_style: AddressingStyle = "auto"
    multipart_threshold: int = 16 * MiB
    part_size: int = 16 * MiB
    timeout: float = 60.0
    # PutObject with If-None-Match: * when skipping existing objects (412: already there).
    conditional_put: bool = False
    # Parts of one file in flight at once; the file holds part_size * this of the byte budget.
    part_concurrency: int = 4
    # Object options (uploader/config/objectfields.py), "" / () for S3's default; an entry's own
    # cache_control, content_disposition and tagging replace the store's.
    storage_class: str = ""
    server_side_encryption: str = ""
    sse_kms_key_id: str = ""
    acl: str = ""
    cache_control: str = ""
    content_disposition: str = ""
    tagging: tuple[tuple[str, str], ...] = ()


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
class AzureStoreConfig:
    container: str = "uploads"
    prefix: str = ""
    # A storage connection string (account key or SAS); empty: AZURE_STORAGE_CONNECTION_STRING,
    # else `account_url` with azure-identity's DefaultAzureCredential.
    connection_string: str = field(default="", repr=False)
    account_url: str = ""
    # Files from this size up go as staged blocks of `part_size`, `part_concurrency` at a time.
    block_threshold: int = 16 * MiB
    part_size: int = 8 * MiB
    part_concurrency: int = 4
    timeout: float = 60.0
    # Put Blob with If-None-Match: * when skipping existing blobs (409: already there).
    conditional_put: bool = False


@dataclass(frozen=True, slots=True)
class StoreConfig:
    kind: StoreKind = "local"
    local: LocalStoreConfig = field(default_factory=LocalStoreConfig)
    s3: S3StoreConfig = field(default_factory=S3StoreConfig)
    http: HttpStoreConfig = field(default_factory=HttpStoreConfig)
    azure: AzureStoreConfig = field(default_factory=AzureStoreConfig)


def read_store(table: Table) -> StoreConfig:
    d = StoreConfig()
    kind = cast(StoreKind, table.choice("kind", get_args(StoreKind), d.kind))
    local = _local(table.table("local"))
    s3 = _s3(table.table("s3"), kind)
    http = _http(table.table("http"), kind)
    azure = read_azure(table.table("azure"), kind)
    return StoreConfig(kind=kind, local=local, s3=s3, http=http, azure=azure)


def _local(table: Table) -> LocalStoreConfig:
    d = LocalStoreConfig()
    config = LocalStoreConfig(root=table.get("root", str, d.root), fsync=table.get("fsync", bool, d.fsync))
    if not config.root.startswith("/"):
        raise table.fail("root", f"must be an absolute path, got {show(config.root)}")
    table.close()
    return config


def _s3(table: Table, kind: StoreKind) -> S3StoreConfig:
    d = S3StoreConfig()
    config = S3StoreConfig(
        bucket=table.get("bucket", str, d.bucket),
        prefix=table.get("prefix", str, d.prefix),
        region=table.get("region", str, d.region),
        endpoint_url=table.get("endpoint_url", str, d.endpoint_url),
        access_key_id=table.get("access_key_id", str, d.access_key_id),
        secret_access_key=table.get("secret_access_key", str, d.secret_access_key),
        session_token=table.get("session_token", str, d.session_token),
        addressing_style=cast(
            AddressingStyle, table.choice("addressing_style", get_args(AddressingStyle), d.addressing_style)
        ),
        multipart_threshold=table.number("multipart_threshold", int, d.multipart_threshold, 5 * MiB, 5 << 30),
        part_size=table.number("part_size", int, d.part_size, 5 * MiB, 5 << 30),
        timeout=table.number("timeout", float, d.timeout, 0.1, 3600),
        conditional_put=table.get("conditional_put", bool, d.conditional_put),
        part_concurrency=table.number("part_concurrency", int, d.part_concurrency, 1, 64),
        **read_s3_options(table),
    )
    _check_s3(table, config, kind)
    table.close()
    return config


def _check_s3(table: Table, s3: S3StoreConfig, kind: StoreKind) -> None:
    """What no single key can say wrong on its own."""
    if kind == "s3" and not s3.bucket:
        raise table.fail("bucket", "must be set when [store].kind is 's3', got ''")
    if s3.endpoint_url and urlsplit(s3.endpoint_url).scheme not in ("http", "https"):
        raise table.fail("endpoint_url", f"must be an http(s) URL, got {show(s3.endpoint_url)}")
    if bool(s3.access_key_id) != bool(s3.secret_access_key):
        raise table.fail("secret_access_key", "and access_key_id must be set together")
    if s3.prefix.startswith("/") or ".." in s3.prefix.split("/"):
        raise table.fail("prefix", f"must not start with '/' or contain '..', got {show(s3.prefix)}")


def _http(table: Table, kind: StoreKind) -> HttpStoreConfig:
    d = HttpStoreConfig()
    template = _url_template(table, kind, d.url_template)
    headers = _headers(table.table("headers"))
    prefix = table.get("meta_prefix", str, d.meta_prefix)
    if not prefix or not HEADER_NAME.match(prefix):
        raise table.fail("meta_prefix", f"must be a non-empty header name prefix, got {show(prefix)}")
    health = table.get("health_url", str, d.health_url)
    if health:
        _http_url(table, "health_url", health)
    url_hosts = _url_hosts(table, d.url_hosts)
    config = HttpStoreConfig(
        url_template=template,
        headers=headers,
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


def _url_template(table: Table, kind: StoreKind, default: str) -> str:
    """Required by the http store; elsewhere it may be empty, but if set it must be right."""
    template = table.get("url_template", str, default)
    if not template and kind == "http":
        raise table.fail("url_template", "must be set when [store].kind is 'http', got ''")
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:
        raise table.fail("url_template", f"is not a valid template ({exc})") from None
    if template and fields != ["key"]:
        shown = show(mask_url(template))
        raise table.fail("url_template", f"must contain {{key}} once and no other field, got {shown}")
    if template:
        _http_url(table, "url_template", template.format(key="k"))
    return template


def _http_url(table: Table, key: str, url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise table.fail(key, f"must be an http(s) URL with a host, got {show(mask_url(url))}")


def _headers(table: Table) -> tuple[tuple[str, str], ...]:
    """`[store.http.headers]`; a value is a secret, so an error says what is wrong, never what it is."""
    headers: list[tuple[str, str]] = []
    for name in table.data:
        value = table.raw(name)
        if not isinstance(value, str):
            raise table.fail(name, "must be a string (value not shown)")
        if not HEADER_NAME.match(name) or name.lower() in RESERVED_HEADERS:
            raise table.fail(name, "is not a header name that may be configured")
        if not value.isascii() or not value.isprintable():
            raise table.fail(name, "must be printable ASCII (value not shown)")
        headers.append((name, value))
    table.close()
    return tuple(headers)


def _url_hosts(table: Table, default: tuple[str, ...]) -> tuple[str, ...]:
    hosts = tuple(h.lower() for h in table.strings("url_hosts", default))
    for host in hosts:
        if not HOST_PATTERN.match(host):
            raise table.fail("url_hosts", f"holds {show(host)}, not a host name or '*.domain'")
    return hosts


def read_azure(table: Table, kind: str) -> AzureStoreConfig:
    d = AzureStoreConfig()
    config = AzureStoreConfig(
        container=table.get("container", str, d.container),
        prefix=table.get("prefix", str, d.prefix),
        connection_string=table.get("connection_string", str, d.connection_string),
        account_url=table.get("account_url", str, d.account_url),
        block_threshold=table.number("block_threshold", int, d.block_threshold, 64 * 1024, MAX_SINGLE_PUT),
        part_size=table.number("part_size", int, d.part_size, 64 * 1024, MAX_BLOCK),
        part_concurrency=table.number("part_concurrency", int, d.part_concurrency, 1, 64),
        timeout=table.number("timeout", float, d.timeout, 0.1, 3600),
        conditional_put=table.get("conditional_put", bool, d.conditional_put),
    )
    _check_azure(table, config, kind)
    table.close()
    return config


def _check_azure(table: Table, azure: AzureStoreConfig, kind: str) -> None:
    """What no single key can say wrong on its own; the connection string is never shown."""
    if kind == "azure" and not azure.container:
        raise table.fail("container", "must be set when [store].kind is 'azure', got ''")
    if azure.container and not CONTAINER_NAME.match(azure.container):
        shown = show(azure.container)
        raise table.fail("container", f"must be 3-63 of a-z, 0-9 and single '-' (Azure's rule), got {shown}")
    if azure.prefix.startswith("/") or ".." in azure.prefix.split("/"):
        raise table.fail("prefix", f"must not start with '/' or contain '..', got {show(azure.prefix)}")
    if azure.account_url:
        parts = urlsplit(azure.account_url)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.query:
            raise table.fail("account_url", "must be an http(s) URL with a host, no query (value not shown)")
    if azure.connection_string and "=" not in azure.connection_string:
        raise table.fail("connection_string", "must be KEY=VALUE;... as Azure shows it (value not shown)")

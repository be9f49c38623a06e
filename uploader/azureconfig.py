"""`[store.azure]`: the Azure Blob store's settings, validated at load like every kind's.

A module of its own beside `storeconfig.py`, which reads it with the other kinds' tables.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from uploader.configtable import MiB, Table, show

# Azure's container names: 3 to 63 of a-z, 0-9 and single hyphens, neither first nor last;
# "$root" is the account's root container.
CONTAINER_NAME = re.compile(r"^(?!.*--)[a-z0-9][a-z0-9-]{1,61}[a-z0-9]$|^\$root$")
MAX_BLOCK = 4000 * MiB  # Azure's largest staged block
MAX_SINGLE_PUT = 5000 * MiB  # and its largest blob in one Put Blob


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
    _check(table, config, kind)
    table.close()
    return config


def _check(table: Table, azure: AzureStoreConfig, kind: str) -> None:
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

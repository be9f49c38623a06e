"""Stores behind one protocol; `open_store` picks the one the config names."""

from __future__ import annotations

from uploader.config.stores import StoreConfig
from uploader.stores.base import PutRequest, PutResult, Store

__all__ = ["PutRequest", "PutResult", "Store", "open_store"]


def open_store(config: StoreConfig, concurrency: int, path: str = "<config>") -> Store:
    """The store `config.kind` names; `path`, the config file, is named in its start errors."""
    if config.kind == "s3":
        from uploader.stores.s3 import S3Store

        return S3Store(config.s3, concurrency)
    if config.kind == "http":
        from uploader.stores.http import HttpStore

        return HttpStore(config.http, concurrency)
    if config.kind == "azure":
        from uploader.stores.azure import AzureStore

        return AzureStore(config.azure, concurrency, path)
    from uploader.stores.local import LocalStore

    return LocalStore(config.local, f"{path}: [store.local].root")

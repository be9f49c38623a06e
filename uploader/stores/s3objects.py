"""What goes with each object's bytes: the store's and the entry's object options, as botocore
parameters and as the lean path's signed headers, and the Content-MD5 that lets S3 verify
every byte it stores (a mismatch is BadDigest: retried, see s3errors.DIGEST_CODES)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
from typing import Any

from uploader.config.objectfields import tagging_header
from uploader.config.stores import S3StoreConfig
from uploader.stores.base import PutRequest

# Bodies up to this size are hashed on the loop; bigger ones in a thread (hashlib frees the GIL).
INLINE_HASH_LIMIT = 256 * 1024

# (S3StoreConfig field, botocore parameter, header) for the options only the store sets.
_STORE_ONLY = (
    ("storage_class", "StorageClass", "x-amz-storage-class"),
    ("server_side_encryption", "ServerSideEncryption", "x-amz-server-side-encryption"),
    ("sse_kms_key_id", "SSEKMSKeyId", "x-amz-server-side-encryption-aws-kms-key-id"),
    ("acl", "ACL", "x-amz-acl"),
    ("cache_control", "CacheControl", "Cache-Control"),
    ("content_disposition", "ContentDisposition", "Content-Disposition"),
)


def md5_of(body: bytes) -> str:
    return base64.b64encode(hashlib.md5(body, usedforsecurity=False).digest()).decode()


async def content_md5(body: bytes) -> str:
    """The Content-MD5 header of `body`: base64 of its MD5, off the loop when it is big."""
    if len(body) <= INLINE_HASH_LIMIT:
        return md5_of(body)
    return await asyncio.to_thread(md5_of, body)


class ObjectOptions:
    """The store's options, built once; `params`/`headers` add one request's own on top."""

    __slots__ = ("_headers", "_params")

    def __init__(self, config: S3StoreConfig) -> None:
        self._params: dict[str, str] = {}
        self._headers: dict[str, str] = {}
        for field, param, header in _STORE_ONLY:
            if value := getattr(config, field):
                self._params[param] = self._headers[header] = value
        if config.tagging:
            self._params["Tagging"] = self._headers["x-amz-tagging"] = tagging_header(config.tagging)

    @staticmethod
    def _own(request: PutRequest) -> list[tuple[str, str, str]]:
        """The request's fields that replace or add to the store's: (parameter, header, value)."""
        own: list[tuple[str, str, str]] = []
        if request.content_encoding:
            own.append(("ContentEncoding", "Content-Encoding", request.content_encoding))
        if request.cache_control is not None:
            own.append(("CacheControl", "Cache-Control", request.cache_control))
        if request.content_disposition is not None:
            own.append(("ContentDisposition", "Content-Disposition", request.content_disposition))
        if request.tagging is not None:
            own.append(("Tagging", "x-amz-tagging", tagging_header(request.tagging)))
        return own

    def params(self, request: PutRequest) -> dict[str, Any]:
        """Keyword arguments for PutObject and CreateMultipartUpload."""
        params: dict[str, Any] = dict(self._params)
        for param, _, value in self._own(request):
            params[param] = value
        if not params.get("Tagging"):
            params.pop("Tagging", None)  # an entry's empty tag set: none at all
        return params

    def headers(self, request: PutRequest) -> dict[str, str]:
        """The lean PUT's extra headers (all signed); shared, not copied, when the entry sets none."""
        if request.content_encoding is None and request.cache_control is None and (
            request.content_disposition is None and request.tagging is None
        ):
            return self._headers
        headers = dict(self._headers)
        for _, header, value in self._own(request):
            headers[header] = value
        if not headers.get("x-amz-tagging"):
            headers.pop("x-amz-tagging", None)
        return headers

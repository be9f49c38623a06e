"""S3 (and S3-compatible) store over one aioboto3 client with a pool sized to concurrency.

Small files go up in one PutObject; files from `multipart_threshold` up go part by part,
`part_concurrency` parts in flight (`s3parts.py`), and an unfinished multipart upload is always
aborted. Every body carries its Content-MD5: S3 stores nothing it did not receive intact.
botocore's own retries are off: `pipeline/retry.py` decides what is retried, from the errors
that `classify_s3_error` (`s3errors.py`) translates at the boundary (`base.translated`). The
store's and the entry's object options (`s3objects.py`) go with every PutObject and
CreateMultipartUpload, on the lean path as signed headers.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
from typing import Any

import aioboto3
import structlog
from aiobotocore.session import AioSession
from botocore.config import Config as BotoConfig
from botocore.exceptions import ClientError, NoCredentialsError, PartialCredentialsError

from uploader.config.stores import S3StoreConfig
from uploader.entries.files import SourceFile
from uploader.errors import ConfigError
from uploader.stores import base
from uploader.stores.base import SHA256_META, PutRequest, PutResult, StoredObject, file_digest
from uploader.stores.s3errors import (
    NOT_FOUND_CODES,
    OUTAGE_CODES,
    PRECONDITION_CODES,
    classify_s3_error,
    client_error_parts,
)
from uploader.stores.s3lean import Credentials, CredentialSource, LeanPut, UseBotocore
from uploader.stores.s3objects import INLINE_HASH_LIMIT, ObjectOptions, content_md5, md5_of
from uploader.stores.s3parts import Multipart, abort, parts_in_flight

__all__ = ["S3Store", "classify_s3_error", "object_name"]

log = structlog.get_logger("uploader.s3")

# A single-part object's ETag is the MD5 of its content (not under SSE-KMS or SSE-C: then it
# just never matches and the file is uploaded again); a multipart one's ends in "-<parts>".
_MD5_ETAG = re.compile(r'^"?([0-9a-fA-F]{32})"?$')


def object_name(prefix: str, key: str) -> str:
    """`prefix + key`, for a key that `key_problem` lets through (none climbs out of the prefix)."""
    base.checked_key(key, "s3")
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    return prefix + key


def boto_config(config: S3StoreConfig, concurrency: int) -> BotoConfig:
    """botocore with its own retries off (`pipeline/retry.py` decides) and a pool for every
    upload slot."""
    return BotoConfig(
        # A socket for every upload slot, and for one big file's extra parts on top.
        max_pool_connections=max(10, concurrency + config.part_concurrency),
        # One attempt in all: botocore's `max_attempts` counts retries after the first (1 was
        # one hidden retry of every request); `total_max_attempts` counts the first too.
        retries={"total_max_attempts": 1, "mode": "standard"},
        connect_timeout=config.timeout,
        read_timeout=config.timeout,
        s3={"addressing_style": config.addressing_style},
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )


def client_args(config: S3StoreConfig, concurrency: int) -> dict[str, Any]:
    """Keyword arguments of the aioboto3 client: credentials only where the config sets them."""
    args: dict[str, Any] = {"region_name": config.region or None, "config": boto_config(config, concurrency)}
    if config.endpoint_url:
        args["endpoint_url"] = config.endpoint_url
    if config.access_key_id:
        args["aws_access_key_id"] = config.access_key_id
        args["aws_secret_access_key"] = config.secret_access_key
        if config.session_token:
            args["aws_session_token"] = config.session_token
    return args


def refusal(bucket: str, code: str, status: int) -> str:
    """Why the bucket refused the start-up check, in words an operator acts on."""
    if status == 404 or code == "NoSuchBucket":
        return f"s3: bucket {bucket!r} does not exist ({code}, {status})"
    if status == 403 or code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
        return f"s3: access to bucket {bucket!r} refused, check the credentials ({code}, {status})"
    return f"s3: bucket {bucket!r} refused the request ({code}, {status})"


def credential_source(config: S3StoreConfig, core: AioSession) -> CredentialSource:
    """The lean path's credentials: the configured keys, or botocore's own chain."""
    if config.access_key_id:
        static = Credentials(config.access_key_id, config.secret_access_key, config.session_token or None)

        async def configured() -> Credentials | None:
            return static

        return configured

    async def chain() -> Credentials | None:
        found = await core.get_credentials()  # refreshable ones refresh themselves
        if found is None:
            return None
        frozen = await found.get_frozen_credentials()
        return Credentials(frozen.access_key, frozen.secret_key, frozen.token)

    return chain


class S3Store:
    def __init__(self, config: S3StoreConfig, concurrency: int) -> None:
        self.config = config
        self.concurrency = concurrency
        self._stack: contextlib.AsyncExitStack | None = None
        self._client: Any = None
        self._aborts: set[asyncio.Task[None]] = set()
        self._options = ObjectOptions(config)
        # Single-part PUTs without botocore's per-request machinery; None: all go through aioboto3.
        self._lean: LeanPut | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        if self._client is not None:
            return
        core = AioSession()
        session = aioboto3.Session(botocore_session=core)
        stack = contextlib.AsyncExitStack()
        try:
            client_cm = session.client("s3", **client_args(self.config, self.concurrency))
            self._client = await stack.enter_async_context(client_cm)
        except BaseException:
            await stack.aclose()
            raise
        self._stack = stack
        await self._first_check()
        self._lean = await self._lean_path(core)

    async def _first_check(self) -> None:
        """HEAD the bucket once at start: ConfigError for what no wait can fix; a bucket missing
        or refused now, or one not reachable, is an outage the daemon waits out."""
        bucket = self.config.bucket
        try:
            await self._client.head_bucket(Bucket=bucket)
        except ClientError as exc:
            code, status, _ = client_error_parts(exc)
            if status in (403, 404) or code in OUTAGE_CODES:
                # Missing or refused now, perhaps not in a minute (a bucket being created, a
                # policy being fixed): an outage that readiness reports, not a fatal error.
                log.warning("store_unavailable", reason=refusal(bucket, code, status))
            elif 400 <= status < 500 and status not in (408, 429):
                await self.close()
                raise ConfigError(refusal(bucket, code, status)) from None
        except (NoCredentialsError, PartialCredentialsError):
            await self.close()
            raise ConfigError(
                f"s3: no usable credentials for bucket {bucket!r} "
                "(set [store.s3].access_key_id or the standard AWS variables)"
            ) from None
        except Exception as exc:  # unreachable now: the daemon retries later
            if classify_s3_error(exc) is None:
                await self.close()
                raise

    async def _lean_path(self, core: AioSession) -> LeanPut | None:
        """The lean PUT, addressed where botocore would send a PutObject; None when the bucket is
        one botocore must handle itself (an ARN, S3 Express)."""
        c = self.config
        if ":" in c.bucket or c.bucket.endswith("--x-s3"):
            return None
        probe = "lean-probe"
        url = await self._client.generate_presigned_url(
            "put_object", Params={"Bucket": c.bucket, "Key": probe}, ExpiresIn=60
        )
        bucket_url = url.split("?", 1)[0]  # the query is a presigned signature, of no use here
        if not bucket_url.endswith("/" + probe):
            return None
        lean = LeanPut(
            bucket_url[: -len(probe)],
            self._client.meta.region_name or "us-east-1",
            credential_source(c, core),
            max(10, self.concurrency),
            c.timeout,
        )
        await lean.start()
        return lean

    async def close(self) -> None:
        if self._aborts:
            await asyncio.gather(*self._aborts, return_exceptions=True)
        lean, self._lean = self._lean, None
        if lean is not None:
            await lean.close()
        stack, self._stack, self._client = self._stack, None, None
        if stack is not None:
            await stack.aclose()

    async def check(self) -> None:
        client, bucket = self._require(), self.config.bucket
        with base.translated(base.probe_failure(classify_s3_error, f"s3: bucket {bucket!r} not usable")):
            await client.head_bucket(Bucket=bucket)

    def _require(self) -> Any:
        if self._client is None:
            raise RuntimeError("S3Store used before start() or after close()")
        return self._client

    # -- objects -----------------------------------------------------------------------------

    def memory_needed(self, size: int) -> int:
        """The whole body below the multipart threshold; from it up, a part for each part in
        flight (part_size * part_concurrency, fewer for a file of fewer parts)."""
        c = self.config
        if size < c.multipart_threshold:
            return size
        return c.part_size * parts_in_flight(size, c.part_size, c.part_concurrency)

    def conditional(self, size: int) -> bool:
        return self.config.conditional_put and size < self.config.multipart_threshold

    async def stat(self, key: str, checksum: bool = False) -> StoredObject | None:
        """One HEAD: the size, the ETag's MD5 when single-part, our SHA-256 metadata if any."""
        client = self._require()
        name = object_name(self.config.prefix, key)
        with base.translated(classify_s3_error):
            try:
                response = await client.head_object(Bucket=self.config.bucket, Key=name)
            except ClientError as exc:
                code, status, _ = client_error_parts(exc)
                if status == 404 or code in NOT_FOUND_CODES:
                    return None
                raise
        etag = _MD5_ETAG.match(str(response.get("ETag") or ""))
        sha256 = (response.get("Metadata") or {}).get(SHA256_META)
        return StoredObject(
            size=int(response["ContentLength"]),
            md5=etag.group(1).lower() if etag else None,
            sha256=sha256.lower() if isinstance(sha256, str) else None,
        )

    async def put(self, source: SourceFile, request: PutRequest) -> PutResult:
        client = self._require()
        name = object_name(self.config.prefix, request.key)
        with base.translated(classify_s3_error):
            if source.size < self.config.multipart_threshold:
                # An overall deadline as well as the socket timeouts: a server that accepts the
                # connection and then never answers must not hold an upload slot for ever.
                async with asyncio.timeout(2 * self.config.timeout):
                    return await self._put_single(client, name, source, request)
            return await self._put_multipart(client, name, source, request)

    async def _put_single(self, client: Any, name: str, source: SourceFile, request: PutRequest) -> PutResult:
        body = await source.read_all() if source.size else b""
        source.check_unchanged()
        metadata = dict(request.metadata)
        if request.checksum:
            metadata[SHA256_META] = hashlib.sha256(body).hexdigest()
        md5 = md5_of(body) if len(body) <= INLINE_HASH_LIMIT else await content_md5(body)
        if_absent = request.if_absent and self.config.conditional_put
        try:
            if self._lean is not None and await self._put_lean(name, body, md5, metadata, request, if_absent):
                return PutResult(bytes_sent=len(body))
            await client.put_object(
                Bucket=self.config.bucket,
                Key=name,
                Body=body,
                ContentType=request.content_type,
                Metadata=metadata,
                ContentLength=len(body),
                ContentMD5=md5,
                **self._options.params(request),
                **({"IfNoneMatch": "*"} if if_absent else {}),
            )
        except ClientError as exc:
            code, status, _ = client_error_parts(exc)
            if if_absent and (status == 412 or code in PRECONDITION_CODES):
                return PutResult(0, already_present=True)
            raise
        return PutResult(bytes_sent=len(body))

    async def _put_lean(
        self, name: str, body: bytes, md5: str, metadata: dict[str, str], request: PutRequest, if_absent: bool
    ) -> bool:
        """The lean PUT; False once it hands over to botocore (a region redirect and the like:
        botocore follows those, and serves every PUT from then on)."""
        assert self._lean is not None
        headers = self._options.headers(request)
        try:
            await self._lean.put(
                name, body, request.content_type, metadata, if_absent=if_absent, md5=md5, headers=headers
            )
            return True
        except UseBotocore as exc:
            log.warning("s3_lean_path_off", reason=str(exc))
            lean, self._lean = self._lean, None
            if lean is not None:
                await lean.close()
            return False

    async def _put_multipart(
        self, client: Any, name: str, source: SourceFile, request: PutRequest
    ) -> PutResult:
        bucket = self.config.bucket
        metadata = dict(request.metadata)
        if request.checksum:
            # Metadata goes with the create, before any part: one extra read of the file.
            metadata[SHA256_META] = await file_digest(source, "sha256")
        created = await client.create_multipart_upload(
            Bucket=bucket,
            Key=name,
            ContentType=request.content_type,
            Metadata=metadata,
            **self._options.params(request),
        )
        upload = Multipart(client, bucket, name, created["UploadId"], source, self.config.part_size)
        try:
            await upload.send_all(self.config.part_concurrency)
            source.check_unchanged()
            await upload.complete()
        except BaseException:
            await abort(client, bucket, name, upload.upload_id, self._aborts)
            raise
        return PutResult(bytes_sent=source.size)

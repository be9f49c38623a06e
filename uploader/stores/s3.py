"""S3 (and S3-compatible) store over one aioboto3 client with a pool sized to concurrency.

Small files go up in one PutObject; files from `multipart_threshold` up go part by part,
one part in memory at a time, and an unfinished multipart upload is always aborted.
botocore's own retries are off: `retry.py` decides what is retried, from the errors that
`classify_s3_error` translates here, at the boundary (`base.translated`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import re
from typing import Any

import aioboto3
import structlog
from aiobotocore.session import AioSession
from botocore.config import Config as BotoConfig
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    HTTPClientError,
    NoCredentialsError,
    ParamValidationError,
    PartialCredentialsError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

from uploader.config import S3StoreConfig
from uploader.errors import (
    ConfigError,
    FileError,
    PermanentFileError,
    StoreUnavailableError,
    ThrottledError,
    TransientFileError,
)
from uploader.files import SourceFile
from uploader.stores import base
from uploader.stores.base import SHA256_META, PutRequest, PutResult, StoredObject, file_digest
from uploader.stores.s3lean import Credentials, CredentialSource, LeanPut, UseBotocore

log = structlog.get_logger("uploader.s3")

MAX_PARTS = 10_000

THROTTLE_CODES = frozenset(
    {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests"}
)
TRANSIENT_CODES = frozenset(
    {
        "RequestTimeout",
        "InternalError",
        "ExpiredToken",
        "ExpiredTokenException",
        "RequestExpired",
        # Two conditional writes of one key at once: S3 asks to retry the loser.
        "ConditionalRequestConflict",
    }
)
# The bucket refuses every write, whichever the file: a missing bucket, refused or expired
# credentials, a disabled account. An outage: the daemon waits for it, no file fails.
OUTAGE_CODES = frozenset(
    {
        "NoSuchBucket",
        "AccessDenied",
        "AllAccessDisabled",
        "AccountProblem",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "InvalidToken",
        "TokenRefreshRequired",
        "RequestTimeTooSkewed",
    }
)
PRECONDITION_CODES = frozenset({"PreconditionFailed", "412"})
# A single-part object's ETag is the MD5 of its content (not under SSE-KMS or SSE-C: then it
# just never matches and the file is uploaded again); a multipart one's ends in "-<parts>".
_MD5_ETAG = re.compile(r'^"?([0-9a-fA-F]{32})"?$')
NOT_FOUND_CODES = frozenset({"404", "NoSuchKey", "NotFound"})
_MESSAGE_LIMIT = 200


def _client_error_parts(exc: ClientError) -> tuple[str, int, str]:
    response: dict[str, Any] = getattr(exc, "response", None) or {}
    error = response.get("Error") or {}
    meta = response.get("ResponseMetadata") or {}
    status = meta.get("HTTPStatusCode") or 0
    code = str(error.get("Code") or status or "Unknown")
    message = " ".join(str(error.get("Message") or "").split())
    if len(message) > _MESSAGE_LIMIT:
        message = message[: _MESSAGE_LIMIT - 3] + "..."
    try:
        status = int(status)
    except (TypeError, ValueError):
        status = 0
    return code, status, message


def classify_s3_error(exc: BaseException) -> FileError | None:
    """Translate an error raised by botocore/aiohttp into our hierarchy, or None if unknown.

    Messages carry the S3 error code, status and message, never the request's credentials.
    """
    if isinstance(exc, FileError):
        return exc
    if isinstance(exc, asyncio.CancelledError):
        return None
    if isinstance(exc, ClientError):
        return _reply_error(exc)
    if isinstance(exc, NoCredentialsError | PartialCredentialsError):
        return StoreUnavailableError("s3: no usable credentials found")
    if isinstance(exc, ParamValidationError):
        return PermanentFileError(f"s3: invalid request: {_one_line(exc)}")
    if isinstance(exc, BotoConnectionError | HTTPClientError):
        # EndpointConnectionError, ConnectionClosedError, ReadTimeoutError, ConnectTimeoutError.
        return TransientFileError(f"s3: connection error: {_one_line(exc)}")
    if isinstance(exc, BotoCoreError):
        # Incomplete reads, response streaming errors and the like: the request may succeed.
        return TransientFileError(f"s3: {type(exc).__name__}: {_one_line(exc)}")
    # The lean path's aiohttp errors, and timeouts and resets from under either path.
    return base.transport_error(exc, "s3")


def _reply_error(exc: ClientError) -> FileError:
    """An S3 error reply judged by its code and status: slow down, outage, retry, or fail."""
    code, status, message = _client_error_parts(exc)
    head = f"s3: {code} ({status})" if status else f"s3: {code}"
    if code in THROTTLE_CODES or status in (429, 503):
        return ThrottledError(head)
    if code in OUTAGE_CODES or status in (401, 403):
        # A bucket policy may deny one prefix: AccessDenied alone is asked of the probe.
        per_key = code not in OUTAGE_CODES or code == "AccessDenied"
        return StoreUnavailableError(f"{head}: {message}" if message else head, per_key)
    if code in TRANSIENT_CODES or status >= 500 or status == 0:
        return TransientFileError(f"{head}: {message}" if message else head)
    return PermanentFileError(f"{head}: {message}" if message else head)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= _MESSAGE_LIMIT else text[: _MESSAGE_LIMIT - 3] + "..."


def object_name(prefix: str, key: str) -> str:
    """`prefix + key`, for a key that `key_problem` lets through (none climbs out of the prefix)."""
    base.checked_key(key, "s3")
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    return prefix + key


def boto_config(config: S3StoreConfig, concurrency: int) -> BotoConfig:
    """botocore with its own retries off (`retry.py` decides) and a pool for every upload slot."""
    return BotoConfig(
        max_pool_connections=max(10, concurrency),
        retries={"max_attempts": 1, "mode": "standard"},
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
            code, status, _ = _client_error_parts(exc)
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
        """One part at a time from the multipart threshold up, else the whole body."""
        if size < self.config.multipart_threshold:
            return size
        return self.config.part_size

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
                code, status, _ = _client_error_parts(exc)
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
        put_args = {
            "Bucket": self.config.bucket,
            "Key": name,
            "Body": body,
            "ContentType": request.content_type,
            "Metadata": metadata,
            "ContentLength": len(body),
        }
        if_absent = request.if_absent and self.config.conditional_put
        try:
            if self._lean is not None:
                try:
                    await self._lean.put(name, body, request.content_type, metadata, if_absent=if_absent)
                    return PutResult(bytes_sent=len(body))
                except UseBotocore as exc:
                    # A region redirect and the like: botocore follows those; it serves from now on.
                    log.warning("s3_lean_path_off", reason=str(exc))
                    lean, self._lean = self._lean, None
                    await lean.close()
            await client.put_object(**put_args, **({"IfNoneMatch": "*"} if if_absent else {}))
        except ClientError as exc:
            code, status, _ = _client_error_parts(exc)
            if if_absent and (status == 412 or code in PRECONDITION_CODES):
                return PutResult(0, already_present=True)
            raise
        return PutResult(bytes_sent=len(body))

    async def _put_multipart(
        self, client: Any, name: str, source: SourceFile, request: PutRequest
    ) -> PutResult:
        bucket = self.config.bucket
        size = source.size
        part_size = max(self.config.part_size, math.ceil(size / MAX_PARTS))
        metadata = dict(request.metadata)
        if request.checksum:
            # Metadata goes with the create, before any part: one extra read of the file.
            metadata[SHA256_META] = await file_digest(source, "sha256")
        created = await client.create_multipart_upload(
            Bucket=bucket,
            Key=name,
            ContentType=request.content_type,
            Metadata=metadata,
        )
        upload_id: str = created["UploadId"]
        try:
            parts: list[dict[str, Any]] = []
            for number, offset in enumerate(range(0, size, part_size), start=1):
                length = min(part_size, size - offset)
                body = await source.read(offset, length)
                response = await client.upload_part(
                    Bucket=bucket,
                    Key=name,
                    UploadId=upload_id,
                    PartNumber=number,
                    Body=body,
                    ContentLength=length,
                )
                del body
                parts.append({"ETag": response["ETag"], "PartNumber": number})
            source.check_unchanged()
            await client.complete_multipart_upload(
                Bucket=bucket, Key=name, UploadId=upload_id, MultipartUpload={"Parts": parts}
            )
        except BaseException:
            await self._abort(client, name, upload_id)
            raise
        return PutResult(bytes_sent=size)

    async def _abort(self, client: Any, name: str, upload_id: str) -> None:
        """Abort an unfinished upload; shielded from cancellation, its failure never raised."""

        async def abort() -> None:
            with contextlib.suppress(Exception):
                await client.abort_multipart_upload(Bucket=self.config.bucket, Key=name, UploadId=upload_id)

        task = asyncio.ensure_future(abort())
        self._aborts.add(task)
        task.add_done_callback(self._aborts.discard)
        # A second cancellation ends this wait (and wins over the original error, as it
        # must); the abort goes on and close() awaits it.
        await asyncio.shield(task)

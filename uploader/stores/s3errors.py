"""What S3 and botocore raise, translated once into the project's errors (`classify_s3_error`)."""

from __future__ import annotations

import asyncio
from typing import Any

from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    HTTPClientError,
    NoCredentialsError,
    ParamValidationError,
    PartialCredentialsError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

from uploader.errors import (
    FileError,
    PermanentFileError,
    StoreUnavailableError,
    ThrottledError,
    TransientFileError,
)
from uploader.stores import base

THROTTLE_CODES = frozenset(
    {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests"}
)
# The bytes S3 received are not the bytes we sent (Content-MD5 or the signed payload hash does
# not match): corrupted on the way, so sending them again is the cure, never a stored bad object.
DIGEST_CODES = frozenset({"BadDigest", "InvalidDigest", "XAmzContentSHA256Mismatch"})
TRANSIENT_CODES = frozenset(
    {
        "RequestTimeout",
        "InternalError",
        "ExpiredToken",
        "ExpiredTokenException",
        "RequestExpired",
        # Two conditional writes of one key at once: S3 asks to retry the loser.
        "ConditionalRequestConflict",
        *DIGEST_CODES,
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
NOT_FOUND_CODES = frozenset({"404", "NoSuchKey", "NotFound"})
_MESSAGE_LIMIT = 200


def client_error_parts(exc: ClientError) -> tuple[str, int, str]:
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
    code, status, message = client_error_parts(exc)
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

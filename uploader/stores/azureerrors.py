"""What the Azure SDK raises, translated once into our errors (`classify_azure_error`).

Judged by the reply's status and Azure's error code; messages keep the code, the status and
the first line of the service's message, never a URL (a SAS in its query is a credential).
"""

from __future__ import annotations

import asyncio

from azure.core.exceptions import AzureError, ClientAuthenticationError, HttpResponseError

from uploader.errors import (
    FileError,
    PermanentFileError,
    StoreUnavailableError,
    ThrottledError,
    TransientFileError,
)
from uploader.stores import base

THROTTLE_CODES = frozenset({"ServerBusy", "TooManyRequests"})
# The body reached the service other than it was sent: the MD5 the request carried does not
# match. Sent again, never kept. (Azurite answers InvalidOperation, see `_corrupted`.)
INTEGRITY_CODES = frozenset({"Md5Mismatch", "InvalidMd5", "Crc64Mismatch", "InvalidCrc64"})
TRANSIENT_CODES = frozenset(
    {
        "InternalError",
        "OperationTimedOut",
        # A commit naming blocks that are gone: another writer of the same blob committed
        # first (which drops every other uncommitted block). Staging again mends it.
        "InvalidBlockList",
    }
)
# The container refuses every write, whichever the blob: missing, being deleted, refused
# credentials, a disabled account. An outage: the daemon waits for it, no file fails.
OUTAGE_CODES = frozenset(
    {
        "ContainerNotFound",
        "ContainerBeingDeleted",
        "ContainerDisabled",
        "AccountIsDisabled",
        "AuthenticationFailed",
        "InvalidAuthenticationInfo",
        "NoAuthenticationInformation",
        "KeyBasedAuthenticationNotPermitted",
        "AuthorizationFailure",
        "AuthorizationPermissionMismatch",
        "AuthorizationSourceIPMismatch",
        "AuthorizationProtocolMismatch",
        "InsufficientAccountPermissions",
    }
)
# Refusals that may be this blob's alone (a policy or an ACL on one path): the scheduler asks
# the store's probe before it believes the whole container is refused.
PER_KEY_CODES = frozenset({"AuthorizationFailure", "AuthorizationPermissionMismatch"})
EXISTS_CODES = frozenset({"BlobAlreadyExists", "ConditionNotMet"})
_MESSAGE_LIMIT = 200


def reply_parts(exc: HttpResponseError) -> tuple[str, int, str]:
    """(error code, status, the message's first line) of an error reply."""
    status = int(exc.status_code or 0)
    raw = getattr(exc, "error_code", None)
    code = str(getattr(raw, "value", raw) or "") or (str(status) if status else "Unknown")
    text = str(exc.message or exc.reason or "")
    first = text.splitlines()[0] if text else ""
    return code, status, _one_line(first) if first else ""


def classify_azure_error(exc: BaseException) -> FileError | None:
    """Translate an error of the Azure SDK (or of aiohttp below it), or None if unknown."""
    if isinstance(exc, FileError):
        return exc
    if isinstance(exc, asyncio.CancelledError):
        return None
    if isinstance(exc, HttpResponseError) and exc.status_code:
        return reply_error(exc)
    if isinstance(exc, ClientAuthenticationError):
        # No reply at all: the credential could not get a token (azure-identity).
        return StoreUnavailableError(f"azure: no usable credentials: {type(exc).__name__}")
    if isinstance(exc, AzureError):
        # ServiceRequestError, ServiceResponseError and their timeouts wrap aiohttp's errors.
        inner = exc.inner_exception
        found = base.transport_error(inner, "azure") if isinstance(inner, BaseException) else None
        return found or TransientFileError(f"azure: {type(exc).__name__}")
    return base.transport_error(exc, "azure")


def reply_error(exc: HttpResponseError) -> FileError:
    """An error reply judged by its code and status: resend, slow down, outage, or fail."""
    code, status, message = reply_parts(exc)
    head = f"azure: {code} ({status})"
    text = f"{head}: {message}" if message else head
    if _corrupted(code, message):
        return TransientFileError(f"{text} (the body arrived changed: sent again)")
    if code in THROTTLE_CODES or status in (429, 503):
        return ThrottledError(head)
    if code in OUTAGE_CODES or status in (401, 403):
        return StoreUnavailableError(text, per_key=code in PER_KEY_CODES or code not in OUTAGE_CODES)
    if code in TRANSIENT_CODES or status >= 500 or status == 408:
        return TransientFileError(text)
    return PermanentFileError(text)


def _corrupted(code: str, message: str) -> bool:
    # Azurite says "InvalidOperation: Provided contentMD5 doesn't match." where Azure says Md5Mismatch.
    return code in INTEGRITY_CODES or (code == "InvalidOperation" and "md5" in message.lower())


def already_exists(exc: BaseException) -> bool:
    """The answer to a create-only-if-absent whose blob is there (409, or 412 from some servers)."""
    return isinstance(exc, HttpResponseError) and reply_parts(exc)[0] in EXISTS_CODES


def refusal(container: str, code: str, status: int) -> str:
    """Why the container refused the start-up check, in words an operator acts on."""
    if status == 404 or code == "ContainerNotFound":
        return f"azure: container {container!r} does not exist ({code}, {status})"
    if status in (401, 403) or code in OUTAGE_CODES:
        return f"azure: access to container {container!r} refused, check the credentials ({code}, {status})"
    return f"azure: container {container!r} refused the request ({code}, {status})"


def _one_line(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _MESSAGE_LIMIT else text[: _MESSAGE_LIMIT - 3] + "..."

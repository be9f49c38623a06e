"""The lean path for single-part S3 uploads: one aiohttp PUT with a SigV4 signature.

botocore spends about a millisecond of CPU on each PutObject (parameter validation, endpoint
rules, event hooks, signing, response parsing); for 4 KiB files that, not the network, is the
daemon's limit (see docs/benchmarks.md). A single-part PUT needs none of that machinery: an
address, a handful of headers, one signature. This module sends exactly that and leaves
everything else (multipart, HEAD, bucket checks, region redirects) to aioboto3.

The address comes from botocore itself (a presigned URL, so custom endpoints and addressing
styles resolve as they would there); credentials come from botocore's own chain (refreshable
ones are re-read when they near expiry). The signer is checked against botocore's in
tests/stores/test_store_s3lean.py.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import os
import re
import ssl
import warnings
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit
from urllib.request import getproxies, proxy_bypass

import aiohttp
from botocore.exceptions import ClientError

ALGORITHM = "AWS4-HMAC-SHA256"
USER_AGENT = "uploader (lean s3 put)"
LARGE_BODY = 1 << 20  # aiohttp's TOO_LARGE_BYTES_BODY
# S3 error replies are small XML documents; the first Code and Message are all we need.
_CODE = re.compile(rb"<Code>([^<]{1,200})</Code>")
_MESSAGE = re.compile(rb"<Message>([^<]{0,1000})</Message>")
# Replies that mean "ask botocore": it knows region redirects and other S3 subtleties.
REDIRECT_STATUSES = frozenset({301, 302, 307, 308})
REGION_CODES = frozenset(
    {"AuthorizationHeaderMalformed", "PermanentRedirect", "IllegalLocationConstraintException"}
)


@dataclass(frozen=True, slots=True)
class Credentials:
    access_key: str
    secret_key: str
    token: str | None = None


CredentialSource = Callable[[], Awaitable[Credentials | None]]


class UseBotocore(Exception):
    """The lean path cannot serve this request (a redirect, a region mismatch): use aioboto3."""


def md5_base64(body: bytes) -> str:
    return base64.b64encode(hashlib.md5(body, usedforsecurity=False).digest()).decode()


def canonical_header_value(value: str) -> str:
    return " ".join(value.split())


def host_of(url: str) -> str:
    """The Host header as botocore signs it: the port only when it is not the scheme's default."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    default = {"http": 80, "https": 443}.get(parts.scheme)
    return host if parts.port is None or parts.port == default else f"{host}:{parts.port}"


class Signer:
    """SigV4 for S3 requests without a query string, the payload hashed and signed.

    The signing key depends only on the day, region and secret, so it is derived once a day.
    """

    def __init__(self, region: str, service: str = "s3") -> None:
        self.region = region
        self.service = service
        self._key_for: tuple[str, str] = ("", "")
        self._key = b""

    def _signing_key(self, secret: str, day: str) -> bytes:
        if self._key_for != (secret, day):
            key = hmac.digest(("AWS4" + secret).encode(), day.encode(), "sha256")
            for part in (self.region, self.service, "aws4_request"):
                key = hmac.digest(key, part.encode(), "sha256")
            self._key, self._key_for = key, (secret, day)
        return self._key

    def sign(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str],
        payload_hash: str,
        credentials: Credentials,
        now: datetime.datetime,
    ) -> dict[str, str]:
        """Return `headers` plus Host, X-Amz-Date, X-Amz-Content-SHA256, the token and Authorization.

        `url` must already be percent-encoded as it goes on the wire (S3 signs the path as sent).
        """
        amz_date = now.strftime("%Y%m%dT%H%M%SZ")
        day = amz_date[:8]
        out = dict(headers)
        out["Host"] = host_of(url)
        out["X-Amz-Date"] = amz_date
        out["X-Amz-Content-SHA256"] = payload_hash
        if credentials.token:
            out["X-Amz-Security-Token"] = credentials.token
        signed = sorted((k.lower(), canonical_header_value(v)) for k, v in out.items())
        names = ";".join(k for k, _ in signed)
        path = urlsplit(url).path or "/"
        canonical = "\n".join(
            (method, path, "", "".join(f"{k}:{v}\n" for k, v in signed), names, payload_hash)
        )
        scope = f"{day}/{self.region}/{self.service}/aws4_request"
        to_sign = f"{ALGORITHM}\n{amz_date}\n{scope}\n{hashlib.sha256(canonical.encode()).hexdigest()}"
        signature = hmac.new(
            self._signing_key(credentials.secret_key, day), to_sign.encode(), "sha256"
        ).hexdigest()
        out["Authorization"] = (
            f"{ALGORITHM} Credential={credentials.access_key}/{scope}, "
            f"SignedHeaders={names}, Signature={signature}"
        )
        return out


def object_url(base: str, name: str) -> str:
    """`base` (the bucket's URL, ending in '/') plus the key, encoded as botocore encodes it."""
    return base + quote(name, safe="/~")


def error_from_reply(status: int, body: bytes, operation: str = "PutObject") -> ClientError:
    """A botocore ClientError, so that `classify_s3_error` judges both paths alike."""
    code_match = _CODE.search(body)
    message_match = _MESSAGE.search(body)
    code = code_match.group(1).decode("utf-8", "replace") if code_match else str(status)
    message = message_match.group(1).decode("utf-8", "replace") if message_match else ""
    response: dict[str, Any] = {
        "Error": {"Code": code, "Message": message},
        "ResponseMetadata": {"HTTPStatusCode": status},
    }
    return ClientError(response, operation)


class LeanPut:
    """PutObject for bodies already in memory, over one aiohttp pool of `concurrency` sockets."""

    def __init__(
        self,
        base_url: str,
        region: str,
        credentials: CredentialSource,
        concurrency: int,
        timeout: float,
    ) -> None:
        self.base_url = base_url if base_url.endswith("/") else base_url + "/"
        self.signer = Signer(region)
        self._credentials = credentials
        self._concurrency = concurrency
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=timeout, sock_read=timeout)
        self._session: aiohttp.ClientSession | None = None
        self._proxy: str | None = None

    async def start(self) -> None:
        if self._session is not None:
            return
        ssl_context: ssl.SSLContext | bool = True
        if os.environ.get("AWS_CA_BUNDLE"):
            ssl_context = ssl.create_default_context(cafile=os.environ["AWS_CA_BUNDLE"])
        # HTTP(S)_PROXY and NO_PROXY, as botocore honours them; read once (aiohttp's trust_env
        # would read them, and ~/.netrc in a thread, on every request).
        parts = urlsplit(self.base_url)
        proxy = getproxies().get(parts.scheme)
        self._proxy = proxy if proxy and not proxy_bypass(parts.hostname or "") else None
        connector = aiohttp.TCPConnector(limit=self._concurrency, ssl=ssl_context, ttl_dns_cache=60)
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=self._timeout,
            headers={"User-Agent": USER_AGENT},
            skip_auto_headers=("Accept-Encoding",),
        )

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def put(
        self,
        name: str,
        body: bytes,
        content_type: str,
        metadata: Mapping[str, str],
        now: datetime.datetime | None = None,
        if_absent: bool = False,
        md5: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """Store `body` under `name` (only if no object is there, with `if_absent`), with its
        Content-MD5 (`md5`, base64, computed here when not given) and the extra `headers`;
        raise ClientError for an S3 error reply (412 when one was there, BadDigest when the
        body arrived changed), UseBotocore for one only botocore handles, aiohttp errors for
        the connection's."""
        session = self._session
        if session is None:
            raise RuntimeError("LeanPut used before start() or after close()")
        credentials = await self._credentials()
        if credentials is None:
            raise UseBotocore("no credentials")
        url = object_url(self.base_url, name)
        wanted = {"Content-Type": content_type, "Content-MD5": md5 or md5_base64(body)}
        if headers:
            wanted.update(headers)
        if if_absent:
            wanted["If-None-Match"] = "*"
        for key, value in metadata.items():
            wanted[f"x-amz-meta-{key}"] = value
        signed = self.signer.sign(
            "PUT",
            url,
            wanted,
            hashlib.sha256(body).hexdigest(),
            credentials,
            now or datetime.datetime.now(datetime.UTC),
        )
        async with session.put(
            url, data=as_payload(body), headers=signed, allow_redirects=False, proxy=self._proxy
        ) as response:
            reply = await response.read()
            check_reply(response.status, reply)


def as_payload(body: bytes) -> bytes | aiohttp.BytesPayload:
    """`body` for aiohttp. Over 1 MiB aiohttp warns (ResourceWarning) that a bytes body "might
    lock the event loop"; it does not here (the loop's transport takes it in one call, no copy),
    and a BytesIO instead would be copied whole, so the payload is made with that one warning
    silenced (synchronously: no other task runs inside the block)."""
    if len(body) <= LARGE_BODY:
        return body
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        return aiohttp.BytesPayload(body)


def check_reply(status: int, reply: bytes) -> None:
    """Return for a stored object; raise UseBotocore or the reply's error otherwise."""
    if status == 200:
        return
    error = error_from_reply(status, reply)
    code = error.response["Error"]["Code"]
    if status in REDIRECT_STATUSES or code in REGION_CODES:
        raise UseBotocore(f"s3 answered {status} {code}")
    raise error

"""Object fields beyond the type and the metadata: caching headers, Content-Encoding, tags,
and S3's storage class, encryption and ACL. Checked once, where they are read (the config
file, a manifest entry), so that a store only copies them into its requests.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from uploader.config.table import MISSING, Table, show

Tags = tuple[tuple[str, str], ...]

STORAGE_CLASSES = (
    "STANDARD", "REDUCED_REDUNDANCY", "STANDARD_IA", "ONEZONE_IA", "INTELLIGENT_TIERING",
    "GLACIER", "DEEP_ARCHIVE", "GLACIER_IR", "OUTPOSTS", "SNOW", "EXPRESS_ONEZONE",
)
ENCRYPTIONS = ("AES256", "aws:kms", "aws:kms:dsse")
ACLS = (
    "private", "public-read", "public-read-write", "authenticated-read", "aws-exec-read",
    "bucket-owner-read", "bucket-owner-full-control",
)
MAX_HEADER_VALUE = 1024
MAX_TAGS = 10  # S3's limit per object
# S3's tag alphabet: letters and digits of any script, space, and + - = . _ : / @.
TAG_KEY = re.compile(r"^[\w +\-=.:/@]{1,128}\Z")
TAG_VALUE = re.compile(r"^[\w +\-=.:/@]{0,256}\Z")
# One content-coding or a list of them ("gzip", "br", "zstd", "gzip, br").
CODINGS = re.compile(r"^[A-Za-z0-9-]{1,32}(\s*,\s*[A-Za-z0-9-]{1,32}){0,3}\Z")


@dataclass(frozen=True, slots=True)
class ObjectFields:
    """What one manifest entry sets for its object; None: the store's own setting."""

    cache_control: str | None = None
    content_disposition: str | None = None
    content_encoding: str | None = None
    tagging: Tags | None = None


def header_problem(name: str, value: object) -> str | None:
    if not isinstance(value, str) or not value or len(value) > MAX_HEADER_VALUE:
        return f"{name} must be a string of 1-{MAX_HEADER_VALUE} characters"
    if not value.isascii() or not value.isprintable():
        return f"{name} must be printable ASCII (RFC 5987-encode a non-ASCII file name)"
    return None


def encoding_problem(value: object) -> str | None:
    if not isinstance(value, str) or not CODINGS.match(value):
        return "content_encoding must be a content-coding such as 'gzip', 'br' or 'zstd'"
    return None


def tags_problem(tags: object) -> str | None:
    """Why a tag set is refused as S3 would refuse it, or None."""
    if not isinstance(tags, Mapping):
        return "tagging must be a table of strings"
    if len(tags) > MAX_TAGS:
        return f"tagging has {len(tags)} tags, S3 allows {MAX_TAGS}"
    for k, v in tags.items():
        if not isinstance(k, str) or not TAG_KEY.match(k):
            return f"tag key {show(k)} must be 1-128 letters, digits, spaces or + - = . _ : / @"
        if not isinstance(v, str) or not TAG_VALUE.match(v):
            return f"tag value for {k!r} must be 0-256 letters, digits, spaces or + - = . _ : / @"
    return None


def entry_fields(obj: Mapping[str, object]) -> ObjectFields | str | None:
    """A manifest entry's own fields (None when it sets none), or why they are refused."""
    values: dict[str, Any] = {}
    for name in ("cache_control", "content_disposition"):
        if (value := obj.get(name)) is not None:
            if (problem := header_problem(name, value)) is not None:
                return problem
            values[name] = value
    if (encoding := obj.get("content_encoding")) is not None:
        if (problem := encoding_problem(encoding)) is not None:
            return problem
        values["content_encoding"] = encoding
    if (tags := obj.get("tagging")) is not None:
        if (problem := tags_problem(tags)) is not None:
            return problem
        assert isinstance(tags, Mapping)
        values["tagging"] = tuple(tags.items())
    return ObjectFields(**values) if values else None


def tagging_header(tags: Tags) -> str:
    """The tag set as S3's `x-amz-tagging` header (and botocore's `Tagging`) take it."""
    return "&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in tags)


def read_s3_options(table: Table) -> dict[str, Any]:
    """`[store.s3]`'s object options, as S3StoreConfig's keyword arguments; "" is unset."""
    sse = table.choice("server_side_encryption", ("", *ENCRYPTIONS), "")
    kms_key = table.get("sse_kms_key_id", str, "")
    if kms_key and not sse.startswith("aws:kms"):
        raise table.fail("sse_kms_key_id", f"needs server_side_encryption 'aws:kms', got {show(sse)}")
    options: dict[str, Any] = {
        "storage_class": table.choice("storage_class", ("", *STORAGE_CLASSES), ""),
        "server_side_encryption": sse,
        "sse_kms_key_id": kms_key,
        "acl": table.choice("acl", ("", *ACLS), ""),
    }
    for name in ("cache_control", "content_disposition"):
        value = table.get(name, str, "")
        if value and (problem := header_problem(name, value)) is not None:
            raise table.fail(name, f"{problem.removeprefix(name).strip()}, got {show(value)}")
        options[name] = value
    options["tagging"] = _tags(table)
    return options


def _tags(table: Table) -> Tags:
    """`tagging = { project = "x", team = "y" }`: at most ten, in S3's alphabet."""
    tags = table.raw("tagging")
    if tags is MISSING:
        return ()
    if (problem := tags_problem(tags)) is not None:
        raise table.fail("tagging", f"{problem.removeprefix('tagging').strip()}, got {show(tags)}")
    assert isinstance(tags, dict)
    return tuple(tags.items())

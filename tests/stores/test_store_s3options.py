"""[store.s3]'s object options and an entry's own, on every path to S3 (lean PUT, aioboto3
PutObject, CreateMultipartUpload), read back from moto; and their checks at load."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import OpenFile
from tests.stores.test_store_s3 import make_config
from uploader.config import settings as config
from uploader.config.objectfields import ObjectFields, entry_fields
from uploader.config.table import MiB
from uploader.errors import ConfigError
from uploader.stores.base import PutRequest
from uploader.stores.s3 import S3Store

OPTIONS: dict[str, Any] = {
    "storage_class": "STANDARD_IA",
    "server_side_encryption": "aws:kms",
    "sse_kms_key_id": "alias/uploads",
    "acl": "public-read",
    "cache_control": "max-age=3600",
    "content_disposition": "attachment",
    "tagging": (("project", "media"), ("tier", "hot one")),
}
ALL_USERS = "http://acs.amazonaws.com/groups/global/AllUsers"


@pytest.fixture(params=["lean", "aioboto3"])
async def store(request: pytest.FixtureRequest, moto_endpoint: str, bucket: str) -> AsyncIterator[S3Store]:
    s = S3Store(make_config(moto_endpoint, bucket, **OPTIONS), concurrency=4)
    await s.start()
    if request.param == "aioboto3":
        off, s._lean = s._lean, None
        assert off is not None
        await off.close()
    else:
        assert s._lean is not None
    yield s
    await s.close()


def _read_back(s3: Any, bucket: str, key: str) -> dict[str, Any]:
    head = s3.head_object(Bucket=bucket, Key=key)
    tags = s3.get_object_tagging(Bucket=bucket, Key=key)["TagSet"]
    grants = s3.get_object_acl(Bucket=bucket, Key=key)["Grants"]
    return {
        "storage_class": head.get("StorageClass"),
        "server_side_encryption": head.get("ServerSideEncryption"),
        "sse_kms_key_id": head.get("SSEKMSKeyId"),
        "public_read": any(
            g["Grantee"].get("URI") == ALL_USERS and g["Permission"] == "READ" for g in grants
        ),
        "cache_control": head.get("CacheControl"),
        "content_disposition": head.get("ContentDisposition"),
        "content_encoding": head.get("ContentEncoding"),
        "tagging": sorted((t["Key"], t["Value"]) for t in tags),
    }


STORE_SAYS = {
    "storage_class": "STANDARD_IA",
    "server_side_encryption": "aws:kms",
    "sse_kms_key_id": "alias/uploads",
    "public_read": True,
    "cache_control": "max-age=3600",
    "content_disposition": "attachment",
    "content_encoding": None,
    "tagging": [("project", "media"), ("tier", "hot one")],
}


@pytest.mark.parametrize("size", [3000, 6 * MiB], ids=["single", "multipart"])
async def test_the_stores_options_go_with_every_object(
    store: S3Store, s3: Any, bucket: str, open_file: OpenFile, size: int
) -> None:
    data = os.urandom(size)
    with open_file("f", data) as source:
        await store.put(source, PutRequest("o/f", "text/plain"))
    assert _read_back(s3, bucket, "o/f") == STORE_SAYS
    assert s3.get_object(Bucket=bucket, Key="o/f")["Body"].read() == data


@pytest.mark.parametrize("size", [3000, 6 * MiB], ids=["single", "multipart"])
async def test_an_entrys_own_fields_replace_the_stores(
    store: S3Store, s3: Any, bucket: str, open_file: OpenFile, size: int
) -> None:
    request = PutRequest(
        "o/g.css.gz", "text/css", content_encoding="gzip", cache_control="no-cache",
        content_disposition='inline; filename="g.css"', tagging=(("owner", "42"),),
    )
    with open_file("g", os.urandom(size)) as source:
        await store.put(source, request)
    assert _read_back(s3, bucket, "o/g.css.gz") == STORE_SAYS | {
        "cache_control": "no-cache",
        "content_disposition": 'inline; filename="g.css"',
        "content_encoding": "gzip",
        "tagging": [("owner", "42")],
    }


async def test_an_entrys_empty_tag_set_sends_no_tags(
    store: S3Store, s3: Any, bucket: str, open_file: OpenFile
) -> None:
    with open_file("h", b"x") as source:
        await store.put(source, PutRequest("o/h", "text/plain", tagging=()))
    assert _read_back(s3, bucket, "o/h")["tagging"] == []


async def test_without_options_nothing_extra_is_sent(
    moto_endpoint: str, s3: Any, bucket: str, open_file: OpenFile
) -> None:
    plain = S3Store(make_config(moto_endpoint, bucket), concurrency=2)
    await plain.start()
    try:
        with open_file("p", b"plain") as source:
            await plain.put(source, PutRequest("o/p", "text/plain"))
    finally:
        await plain.close()
    said = _read_back(s3, bucket, "o/p")
    assert said["public_read"] is False and said["tagging"] == []
    assert said["cache_control"] is None and said["server_side_encryption"] in (None, "AES256")


# --- at load ------------------------------------------------------------------------------------


def _load(tmp_path: Path, s3_table: str) -> config.Config:
    path = tmp_path / "c.toml"
    path.write_text(f"[store]\nkind = 's3'\n[store.s3]\n{s3_table}\n")
    return config.load(str(path))


def test_the_options_load_from_store_s3(tmp_path: Path) -> None:
    loaded = _load(
        tmp_path,
        'storage_class = "GLACIER_IR"\nserver_side_encryption = "aws:kms"\nsse_kms_key_id = "k1"\n'
        'acl = "bucket-owner-full-control"\ncache_control = "public, max-age=60"\n'
        'content_disposition = "attachment"\ntagging = { team = "a-b", "with space" = "x/y@z" }\n'
        "part_concurrency = 8",
    )
    s3 = loaded.store.s3
    assert (s3.storage_class, s3.server_side_encryption, s3.sse_kms_key_id, s3.acl) == (
        "GLACIER_IR", "aws:kms", "k1", "bucket-owner-full-control",
    )
    assert (s3.cache_control, s3.content_disposition) == ("public, max-age=60", "attachment")
    assert s3.tagging == (("team", "a-b"), ("with space", "x/y@z")) and s3.part_concurrency == 8


@pytest.mark.parametrize(
    ("line", "said"),
    [
        ('storage_class = "COLD"', "[store.s3].storage_class must be one of"),
        ('server_side_encryption = "aes256"', "[store.s3].server_side_encryption must be one of"),
        ('sse_kms_key_id = "k"', "[store.s3].sse_kms_key_id needs server_side_encryption 'aws:kms'"),
        ('acl = "public"', "[store.s3].acl must be one of"),
        ('cache_control = "max-age=60\\n"', "[store.s3].cache_control must be printable ASCII"),
        ('content_disposition = "attachment; filename=\\"é\\""', "[store.s3].content_disposition must be"),
        ("tagging = { a = 1 }", "[store.s3].tagging tag value for 'a' must be"),
        ('tagging = { "a#b" = "x" }', "[store.s3].tagging tag key 'a#b' must be"),
        ("tagging = {" + ", ".join(f"t{i} = 'v'" for i in range(11)) + "}", "has 11 tags, S3 allows 10"),
        ('tagging = "a=b"', "[store.s3].tagging must be a table of strings"),
        ("part_concurrency = 0", "[store.s3].part_concurrency must be >= 1"),
    ],
)
def test_a_bad_option_is_one_line_naming_the_key(tmp_path: Path, line: str, said: str) -> None:
    with pytest.raises(ConfigError) as caught:
        _load(tmp_path, line)
    message = str(caught.value)
    assert said in message and "\n" not in message, message


def test_an_entrys_fields_are_checked_as_the_configs() -> None:
    assert entry_fields({"path": "/p"}) is None
    assert entry_fields({"cache_control": "no-store", "tagging": {"k": "v"}, "content_encoding": "br"}) == (
        ObjectFields(cache_control="no-store", content_encoding="br", tagging=(("k", "v"),))
    )
    for bad, said in (
        ({"cache_control": ""}, "cache_control must be a string of 1-1024"),
        ({"content_disposition": "a\tb"}, "content_disposition must be printable ASCII"),
        ({"content_encoding": "gzip; q=1"}, "content_encoding must be a content-coding"),
        ({"tagging": ["k"]}, "tagging must be a table of strings"),
        ({"tagging": {"k": 1}}, "tag value for 'k'"),
    ):
        problem = entry_fields(bad)
        assert isinstance(problem, str) and said in problem, (bad, problem)

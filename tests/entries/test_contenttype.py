"""Content types: the entry's, else the name's extension's (from the shipped table), else the
default; a file compressed with a content-coding as what it holds plus that Content-Encoding,
an archive or unknown inside as the compression format, so it downloads as what it is."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import Env
from uploader.entries import contenttype
from uploader.entries.contenttype import ContentTypes
from uploader.entries.mimetable import CODINGS, COMPRESSED

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("a.css.gz", ("text/css", "gzip")),
        ("a.txt.gz", ("text/plain", "gzip")),
        ("A.JSON.BR", ("application/json", "br")),
        ("app.min.js.zst", ("text/javascript", "zstd")),
        ("logo.svgz", ("image/svg+xml", "gzip")),
        ("d.x/page.html.gz", ("text/html", "gzip")),
    ],
)
def test_a_file_compressed_with_a_content_coding_is_its_inner_type_with_that_encoding(
    name: str, expected: tuple[str, str]
) -> None:
    assert ContentTypes().for_path(f"/srv/up/{name}") == expected


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("a.tar.gz", "application/gzip"),  # an archive: downloaded as the .tar.gz it is
        ("a.tgz", "application/gzip"),
        ("a.tar.zst", "application/zstd"),
        ("a.gz", "application/gzip"),
        ("a.unknownext.gz", "application/gzip"),
        ("a.gz.gz", "application/gzip"),
        (".bashrc.gz", "application/gzip"),
        ("a.br", "application/x-brotli"),
        ("a.zst", "application/zstd"),
        ("a.tar.bz2", "application/x-bzip2"),
        ("a.txt.xz", "application/x-xz"),
        ("a.tar.Z", "application/x-compress"),
    ],
)
def test_an_archive_or_unknown_inside_or_no_content_coding_is_the_compression_format(
    name: str, expected: str
) -> None:
    assert ContentTypes().for_path(f"/srv/up/{name}") == (expected, None)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("a.txt", "text/plain"),
        ("d.x/photo.JPG", "image/jpeg"),
        ("a.tar", "application/x-tar"),
        ("f.woff2", "font/woff2"),
        ("m.webmanifest", "application/manifest+json"),
        ("v.webm", "video/webm"),
        ("i.avif", "image/avif"),
    ],
)
def test_an_uncompressed_file_is_typed_by_its_extension(name: str, expected: str) -> None:
    assert ContentTypes().for_path(f"/srv/up/{name}") == (expected, None)


@pytest.mark.parametrize("name", ["Makefile", ".bashrc", "a.no-such-extension", "dir.d/plain", "a."])
def test_a_name_without_a_known_extension_gives_none(name: str) -> None:
    assert ContentTypes().for_path(f"/srv/up/{name}") == (None, None)


def test_the_guess_never_reads_the_hosts_mime_types(monkeypatch: pytest.MonkeyPatch) -> None:
    """The table ships with the daemon: a host whose /etc/mime.types says otherwise (or has
    none) stores the same types. mimetypes is not even consulted."""
    import mimetypes

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("mimetypes consulted")

    for name in ("guess_type", "init", "read_mime_types"):
        monkeypatch.setattr(mimetypes, name, refuse)
    assert ContentTypes().for_path("/r/a.css.gz") == ("text/css", "gzip")
    assert contenttype.guess("/r/b.ogg") == ("audio/ogg", None)


def test_the_cache_is_bounded_and_answers_the_same_as_a_fresh_guess(monkeypatch: pytest.MonkeyPatch) -> None:
    types = ContentTypes(limit=2)
    assert [types.for_path(f"/r/f.{ext}")[0] for ext in ("txt", "jpg", "png")] == [
        "text/plain",
        "image/jpeg",
        "image/png",
    ]
    assert len(types._cache) == 2
    guesses: list[str] = []
    real = contenttype.guess
    monkeypatch.setattr(contenttype, "guess", lambda p: guesses.append(p) or real(p))
    assert types.for_path("/r/other.txt") == ("text/plain", None)  # cached: no guess
    assert types.for_path("/r/other.png") == ("image/png", None)  # past the bound: guessed again
    assert guesses == ["other.png"]


async def test_the_stored_type_is_the_entrys_else_the_extensions_else_the_default(
    env: Env, s3: Any, bucket: str
) -> None:
    names = ("a.txt.gz", "b.txt", "c.unknownext", "d.txt.gz", "e.tar.gz", "f.css.br")
    for name in names:
        (env.uploads / name).write_bytes(b"x")
    entries = [
        str(env.uploads / "a.txt.gz"),
        str(env.uploads / "b.txt"),
        str(env.uploads / "c.unknownext"),
        json.dumps({"path": str(env.uploads / "d.txt.gz"), "content_type": "text/x-mine"}),
        str(env.uploads / "e.tar.gz"),
        json.dumps({"path": str(env.uploads / "f.css.br"), "cache_control": "max-age=60"}),
        json.dumps({"path": str(env.uploads / "g"), "content_disposition": "attachment"}),
    ]
    (env.uploads / "g").mkdir()
    (env.uploads / "g" / "x.txt").write_bytes(b"in a directory")
    config = env.config("s3", bucket, upload={"default_content_type": "application/x-default"})
    async with env.daemon(config):
        await env.push_job("ct", entries)
        state = await env.wait_final("ct")
    assert state["state"] == "done", state
    stored = {n: s3.head_object(Bucket=bucket, Key=f"ct/{n}") for n in names}
    assert {n: (h["ContentType"], h.get("ContentEncoding")) for n, h in stored.items()} == {
        "a.txt.gz": ("text/plain", "gzip"),
        "b.txt": ("text/plain", None),
        "c.unknownext": ("application/x-default", None),
        "d.txt.gz": ("text/x-mine", None),  # the entry's type stands alone
        "e.tar.gz": ("application/gzip", None),
        "f.css.br": ("text/css", "br"),
    }
    assert stored["f.css.br"]["CacheControl"] == "max-age=60"
    in_dir = s3.head_object(Bucket=bucket, Key="ct/g/x.txt")  # a directory's files carry its fields
    assert (in_dir["ContentType"], in_dir["ContentDisposition"]) == ("text/plain", "attachment")


# --- the docs say what the code does ---


def _section(text: str, heading: str) -> str:
    start = text.index(heading)
    end = text.find("\n#", start + len(heading))
    return text[start : end if end >= 0 else len(text)]


def test_readme_states_the_rule_and_every_example_type_is_what_the_code_gives() -> None:
    section = _section((REPO / "README.md").read_text(), "### Where each file goes")
    for said in ("`content_type`", "extension", "`[upload].default_content_type`", "no Content-Encoding",
                 "/etc/mime.types"):
        assert said in section, said
    text = " ".join(section.split())
    examples = re.findall(r"`([^`\s/]+\.[^`\s/]+)` as `([^`]+)`(?: with `([^`]+)`)?", text)
    types = ContentTypes()
    said_types = {name: (kind, encoding or None) for name, kind, encoding in examples}
    assert {name: types.for_path(f"/srv/up/{name}") for name in said_types} == said_types
    rare = {"application/x-lzip", "application/x-lzma"}
    every = {t for _, t in CODINGS.values()} | set(COMPRESSED.values()) - rare
    assert every <= {t for t, _ in said_types.values()}, "a compressed type is missing"
    assert {c for c, _ in CODINGS.values()} <= {e for _, e in said_types.values()}, "a coding is missing"


def test_the_config_comment_for_the_default_type_states_the_same_order() -> None:
    text = (REPO / "config" / "uploader.toml").read_text()
    assert tomllib.loads(text)["upload"]["default_content_type"] == "application/octet-stream"
    lines = text.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("default_content_type ="))
    comment = []
    for line in reversed(lines[:at]):
        if not line.startswith("#"):
            break
        comment.insert(0, line.lstrip("# "))
    said = " ".join(comment)
    assert "entry" in said and "extension" in said, said
    assert said.index("entry") < said.index("extension") < said.index("this"), said
    assert "application/gzip" in said

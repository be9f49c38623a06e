"""Content types: the entry's, else the name's extension's, else the default; compressed files
typed as their compression format, so they download as what they are."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import Env
from uploader import contenttype
from uploader.contenttype import COMPRESSED_TYPES, ContentTypes

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("a.txt.gz", "application/gzip"),
        ("a.tar.gz", "application/gzip"),
        ("a.tgz", "application/gzip"),  # mimetypes reads it as .tar.gz
        ("a.gz", "application/gzip"),
        ("a.tar.bz2", "application/x-bzip2"),
        ("a.xz", "application/x-xz"),
        ("a.json.br", "application/x-brotli"),
        ("a.tar.Z", "application/x-compress"),
    ],
)
def test_a_compressed_file_is_typed_as_its_compression_format(name: str, expected: str) -> None:
    assert ContentTypes().for_path(f"/srv/up/{name}") == expected


@pytest.mark.parametrize(
    ("name", "expected"),
    [("a.txt", "text/plain"), ("d.x/photo.jpg", "image/jpeg"), ("a.tar", "application/x-tar")],
)
def test_an_uncompressed_file_is_typed_by_its_extension(name: str, expected: str) -> None:
    assert ContentTypes().for_path(f"/srv/up/{name}") == expected


@pytest.mark.parametrize("name", ["Makefile", ".bashrc", "a.no-such-extension", "dir.d/plain"])
def test_a_name_without_a_known_extension_gives_none(name: str) -> None:
    assert ContentTypes().for_path(f"/srv/up/{name}") is None


def test_the_cache_is_bounded_and_answers_the_same_as_a_fresh_guess(monkeypatch: pytest.MonkeyPatch) -> None:
    types = ContentTypes(limit=2)
    assert [types.for_path(f"/r/f.{ext}") for ext in ("txt", "jpg", "png")] == [
        "text/plain",
        "image/jpeg",
        "image/png",
    ]
    assert len(types._cache) == 2
    guesses: list[str] = []
    real = contenttype.guess
    monkeypatch.setattr(contenttype, "guess", lambda p: guesses.append(p) or real(p))
    assert types.for_path("/r/other.txt") == "text/plain"  # cached: no guess
    assert types.for_path("/r/other.png") == "image/png"  # past the bound: guessed again
    assert guesses == ["/r/other.png"]


async def test_the_stored_type_is_the_entrys_else_the_extensions_else_the_default(
    env: Env, s3: Any, bucket: str
) -> None:
    names = ("a.txt.gz", "b.txt", "c.unknownext", "d.txt.gz")
    for name in names:
        (env.uploads / name).write_bytes(b"x")
    entries = [
        str(env.uploads / "a.txt.gz"),
        str(env.uploads / "b.txt"),
        str(env.uploads / "c.unknownext"),
        json.dumps({"path": str(env.uploads / "d.txt.gz"), "content_type": "text/x-mine"}),
    ]
    config = env.config("s3", bucket, upload={"default_content_type": "application/x-default"})
    async with env.daemon(config):
        await env.push_job("ct", entries)
        state = await env.wait_final("ct")
    assert state["state"] == "done", state
    stored = {n: s3.head_object(Bucket=bucket, Key=f"ct/{n}") for n in names}
    assert {n: h["ContentType"] for n, h in stored.items()} == {
        "a.txt.gz": "application/gzip",
        "b.txt": "text/plain",
        "c.unknownext": "application/x-default",
        "d.txt.gz": "text/x-mine",
    }
    assert not any("ContentEncoding" in h for h in stored.values())


# --- the docs say what the code does ---


def _section(text: str, heading: str) -> str:
    start = text.index(heading)
    end = text.find("\n#", start + len(heading))
    return text[start : end if end >= 0 else len(text)]


def test_readme_states_the_rule_and_every_example_type_is_what_the_code_gives() -> None:
    section = _section((REPO / "README.md").read_text(), "### Where each file goes")
    for said in ("`content_type`", "extension", "`[upload].default_content_type`", "no Content-Encoding"):
        assert said in section, said
    examples = re.findall(r"`([^`\s/]+\.[^`\s/]+)`\s+as\s+`([^`]+)`", section)
    assert len(examples) >= len(COMPRESSED_TYPES)
    types = ContentTypes()
    assert {name: types.for_path(f"/srv/up/{name}") for name, _ in examples} == dict(examples)
    assert set(COMPRESSED_TYPES.values()) <= {t for _, t in examples}, "a compressed type is missing"


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

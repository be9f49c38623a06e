"""The Content-Type guessed from a file's name, for entries that give none.

The rule, in order: the entry's `content_type`; else the type guessed here from the name's
extension; else `[upload].default_content_type`. A compressed file (`.gz`, `.bz2`, `.xz`,
`.br`, `.Z`) is stored as the compressed format, not as what it holds: no store sets a
Content-Encoding, so `a.txt.gz` stored as `text/plain` would be shown by a browser as gzip
bytes, where `application/gzip` downloads as the file it is.
"""

from __future__ import annotations

import mimetypes

CONTENT_TYPE_CACHE = 4096  # distinct file-name extensions whose guessed type is remembered

# mimetypes' encoding names (its `encodings_map`) -> the compressed format's own type. Brotli
# has no registered type; `application/x-brotli` is the one in use. An encoding not listed
# here gets None, so the default type applies.
COMPRESSED_TYPES = {
    "gzip": "application/gzip",  # RFC 6713
    "bzip2": "application/x-bzip2",
    "xz": "application/x-xz",
    "br": "application/x-brotli",
    "compress": "application/x-compress",
}


def guess(path: str) -> str | None:
    """mimetypes' guess, with a compressed file typed as its compression format."""
    kind, encoding = mimetypes.guess_type(path)
    if encoding is not None:
        return COMPRESSED_TYPES.get(encoding)
    return kind


class ContentTypes:
    """`guess`, cached by the name's extensions (all it looks at), bounded: a few thousand
    distinct extensions, never one entry per file."""

    def __init__(self, limit: int = CONTENT_TYPE_CACHE) -> None:
        self._limit = limit
        self._cache: dict[str, str | None] = {}

    def for_path(self, path: str) -> str | None:
        name = path.rpartition("/")[2]
        dot = name.find(".", len(name) - len(name.lstrip(".")))
        if dot < 0:
            return guess(path)
        suffix = name[dot:]
        try:
            return self._cache[suffix]
        except KeyError:
            found = guess(path)
            if len(self._cache) < self._limit:
                self._cache[suffix] = found
            return found

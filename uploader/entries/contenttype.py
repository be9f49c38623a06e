"""The Content-Type and Content-Encoding guessed from a file's name, for entries that give none.

The rule, in order: the entry's `content_type` (and its `content_encoding`, if any); else the
type guessed here from the name's extensions; else `[upload].default_content_type`. Guesses
come from the table shipped in `uploader/entries/mimetable.py`, never from the host's
/etc/mime.types, so every host stores a file alike.

A file compressed with a coding browsers decode (`.gz`, `.br`, `.zst`) is stored as what it
holds, with that Content-Encoding: `a.css.gz` is `text/css` with `Content-Encoding: gzip`, and
a browser shows the stylesheet. When what it holds is unknown, or a tar archive (`a.tar.gz`,
`a.tgz`: people download those, and a browser would undo the encoding while saving), it is
stored as the compression format itself (`application/gzip`) with no Content-Encoding. The
other compression formats (`.bz2`, `.xz`, `.Z`) are always their own type.
"""

from __future__ import annotations

from uploader.entries.mimetable import ARCHIVES, CODINGS, COMPRESSED, SHORTHANDS, TYPES

CONTENT_TYPE_CACHE = 4096  # distinct file-name extensions whose guess is remembered

# (Content-Type, Content-Encoding); either may be None.
Guess = tuple[str | None, str | None]
_UNKNOWN: Guess = (None, None)


def _suffixes(name: str) -> tuple[str, str]:
    """The name's last two extensions, a shorthand (`.tgz`) spelled out: ('.tar', '.gz')."""
    stem, dot, last = name.rpartition(".")
    if not dot or not stem.strip("."):
        return "", ""  # no extension, or a dot file such as `.bashrc`
    last = "." + last
    if (long := SHORTHANDS.get(last.lower())) is not None:
        inner, _, outer = long[1:].partition(".")
        return "." + inner, "." + outer
    inner_stem, inner_dot, inner = stem.rpartition(".")
    return ("." + inner if inner_dot and inner_stem.strip(".") else ""), last


def guess(path: str) -> Guess:
    """The type and encoding of the file `path` names, from its extensions alone."""
    inner, last = _suffixes(path.rpartition("/")[2])
    if not last:
        return _UNKNOWN
    if last in COMPRESSED:  # `.Z`, case and all
        return COMPRESSED[last], None
    last = last.lower()
    if last in COMPRESSED:
        return COMPRESSED[last], None
    coding = CODINGS.get(last)
    if coding is None:
        return TYPES.get(last), None
    encoding, own_type = coding
    inner_type = TYPES.get(inner.lower()) if inner else None
    if inner_type is None or inner_type in ARCHIVES:
        return own_type, None
    return inner_type, encoding


class ContentTypes:
    """`guess`, cached by the name's extensions (all it looks at), bounded: a few thousand
    distinct extensions, never one entry per file."""

    def __init__(self, limit: int = CONTENT_TYPE_CACHE) -> None:
        self._limit = limit
        self._cache: dict[str, Guess] = {}

    def for_path(self, path: str) -> Guess:
        name = path.rpartition("/")[2]
        dot = name.find(".", len(name) - len(name.lstrip(".")))
        if dot < 0:
            return _UNKNOWN
        suffix = name[dot:]
        try:
            return self._cache[suffix]
        except KeyError:
            found = guess(name)
            if len(self._cache) < self._limit:
                self._cache[suffix] = found
            return found

"""The file-name extensions the daemon knows, shipped with it: the same type on every host,
whatever /etc/mime.types says there (Python's mimetypes reads it). Lower-case extensions;
the common web, document, media and archive formats (IANA types where one is registered)."""

from __future__ import annotations

TYPES: dict[str, str] = {
    # text and the web
    ".html": "text/html", ".htm": "text/html", ".xhtml": "application/xhtml+xml",
    ".css": "text/css", ".js": "text/javascript", ".mjs": "text/javascript", ".cjs": "text/javascript",
    ".json": "application/json", ".map": "application/json", ".jsonld": "application/ld+json",
    ".webmanifest": "application/manifest+json", ".geojson": "application/geo+json",
    ".ndjson": "application/x-ndjson", ".xml": "application/xml", ".xsl": "application/xml",
    ".rss": "application/rss+xml", ".atom": "application/atom+xml", ".txt": "text/plain",
    ".text": "text/plain", ".log": "text/plain", ".md": "text/markdown", ".markdown": "text/markdown",
    ".csv": "text/csv", ".tsv": "text/tab-separated-values", ".ics": "text/calendar",
    ".vcf": "text/vcard", ".yaml": "application/yaml", ".yml": "application/yaml",
    ".toml": "application/toml", ".rtf": "application/rtf", ".wasm": "application/wasm",
    ".srt": "application/x-subrip", ".vtt": "text/vtt",
    # images
    ".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".jpe": "image/jpeg",
    ".gif": "image/gif", ".webp": "image/webp", ".avif": "image/avif", ".svg": "image/svg+xml",
    ".ico": "image/vnd.microsoft.icon", ".bmp": "image/bmp", ".tif": "image/tiff",
    ".tiff": "image/tiff", ".heic": "image/heic", ".heif": "image/heif", ".jxl": "image/jxl",
    ".apng": "image/apng",
    # fonts
    ".woff": "font/woff", ".woff2": "font/woff2", ".ttf": "font/ttf", ".otf": "font/otf",
    ".eot": "application/vnd.ms-fontobject",
    # audio and video
    ".mp3": "audio/mpeg", ".m4a": "audio/mp4", ".aac": "audio/aac", ".oga": "audio/ogg",
    ".ogg": "audio/ogg", ".opus": "audio/ogg", ".wav": "audio/wav", ".flac": "audio/flac",
    ".weba": "audio/webm", ".mid": "audio/midi", ".midi": "audio/midi", ".mp4": "video/mp4",
    ".m4v": "video/mp4", ".webm": "video/webm", ".ogv": "video/ogg", ".mov": "video/quicktime",
    ".avi": "video/x-msvideo", ".mkv": "video/x-matroska", ".mpeg": "video/mpeg",
    ".mpg": "video/mpeg", ".ts": "video/mp2t", ".m3u8": "application/vnd.apple.mpegurl",
    ".mpd": "application/dash+xml",
    # documents
    ".pdf": "application/pdf", ".epub": "application/epub+zip",
    ".doc": "application/msword", ".xls": "application/vnd.ms-excel",
    ".ppt": "application/vnd.ms-powerpoint",
    ".docx": "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
    ".xlsx": "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
    ".pptx": "application/vnd.openxmlformats-officedocument.presentationml.presentation",
    ".odt": "application/vnd.oasis.opendocument.text",
    ".ods": "application/vnd.oasis.opendocument.spreadsheet",
    ".odp": "application/vnd.oasis.opendocument.presentation",
    # archives, packages, data
    ".zip": "application/zip", ".tar": "application/x-tar", ".7z": "application/x-7z-compressed",
    ".rar": "application/vnd.rar", ".jar": "application/java-archive",
    ".apk": "application/vnd.android.package-archive", ".deb": "application/vnd.debian.binary-package",
    ".rpm": "application/x-rpm", ".iso": "application/x-iso9660-image",
    ".dmg": "application/x-apple-diskimage", ".whl": "application/zip",
    ".parquet": "application/vnd.apache.parquet", ".avro": "application/avro",
    ".sqlite": "application/vnd.sqlite3", ".db": "application/vnd.sqlite3",
".exe": "application/vnd.microsoft.portable-executable",
    ".sh": "application/x-sh", ".py": "text/x-python", ".c": "text/x-c", ".h": "text/x-c",
    ".java": "text/x-java-source", ".go": "text/x-go", ".rs": "text/x-rust",
}

# Suffixes that stand for two: `a.tgz` is `a.tar.gz`.
SHORTHANDS: dict[str, str] = {
    ".tgz": ".tar.gz", ".taz": ".tar.gz", ".tz": ".tar.gz", ".tbz": ".tar.bz2",
    ".tbz2": ".tar.bz2", ".txz": ".tar.xz", ".tzst": ".tar.zst", ".svgz": ".svg.gz",
}

# Compression suffixes with an HTTP content-coding a browser decodes: suffix -> (coding, the
# compressed format's own type, for when the inner type is unknown or an archive's).
CODINGS: dict[str, tuple[str, str]] = {
    ".gz": ("gzip", "application/gzip"),  # RFC 6713
    ".br": ("br", "application/x-brotli"),  # no registered type; this one is in use
    ".zst": ("zstd", "application/zstd"),  # RFC 8878
}

# Compression formats no browser decodes as a content-coding: always their own type.
COMPRESSED: dict[str, str] = {
    ".bz2": "application/x-bzip2",
    ".xz": "application/x-xz",
    ".lz": "application/x-lzip",
    ".lzma": "application/x-lzma",
    ".Z": "application/x-compress",  # upper-case Z only: ".z" is another format
}

# Inner types whose compressed file is the thing people download (`x.tar.gz`): stored as the
# compression format, never with a Content-Encoding a browser would undo on saving.
ARCHIVES = frozenset({"application/x-tar"})

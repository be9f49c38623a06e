"""Reading one TOML table of the config file: types, ranges and unknown keys, each mistake
one line naming the file, the key and the value."""

from __future__ import annotations

import json
import math
import re
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

from uploader.errors import ConfigError

T = TypeVar("T")

MiB = 1024 * 1024
MISSING: Any = object()
_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


class Table:
    """Reads one TOML table, checking types and ranges and refusing unknown keys."""

    def __init__(self, file: str, name: str, data: object) -> None:
        self.file = file
        self.name = name
        if not isinstance(data, dict):
            raise ConfigError(f"{file}: [{name}] must be a table, got {show(data)}")
        self.data: dict[str, Any] = data
        self.used: set[str] = set()

    def where(self, key: str) -> str:
        return f"[{self.name}].{_toml_key(key)}"

    def fail(self, key: str, message: str) -> ConfigError:
        return ConfigError(f"{self.file}: {self.where(key)} {message}")

    def raw(self, key: str) -> object:
        self.used.add(key)
        return self.data.get(key, MISSING)

    def get(self, key: str, kind: type[T], default: T) -> T:
        value = self.raw(key)
        if value is MISSING:
            return default
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            raise self.fail(key, f"must be {_type_name(kind)}, got {show(value)}")
        if isinstance(value, float) and not math.isfinite(value):
            raise self.fail(key, f"must be a finite number, got {show(value)}")
        return value

    def number(self, key: str, kind: type[T], default: T, low: float, high: float) -> T:
        value = self.get(key, kind, default)
        assert isinstance(value, int | float)
        if value < low:
            raise self.fail(key, f"must be >= {low:g}, got {show(value)}")
        if value > high:
            raise self.fail(key, f"must be <= {high:g}, got {show(value)}")
        return value

    def choice(self, key: str, choices: tuple[str, ...], default: str) -> str:
        value = self.get(key, str, default)
        if value not in choices:
            allowed = ", ".join(repr(c) for c in choices)
            raise self.fail(key, f"must be one of {allowed}, got {show(value)}")
        return value

    def strings(self, key: str, default: tuple[str, ...]) -> tuple[str, ...]:
        value = self.raw(key)
        if value is MISSING:
            return default
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.fail(key, f"must be a list of strings, got {show(value)}")
        return tuple(value)

    def table(self, key: str) -> Table:
        value = self.raw(key)
        return Table(self.file, f"{self.name}.{_toml_key(key)}", {} if value is MISSING else value)

    def close(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            raise self.fail(unknown[0], f"is not a known key (value {show(self.data[unknown[0]])})")


def _type_name(kind: type) -> str:
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
        kind, kind.__name__
    )


def _toml_key(key: str) -> str:
    """A key as TOML spells it: bare when it may be, else quoted (so an error stays one line)."""
    return key if _BARE_KEY.match(key) else json.dumps(key)


def show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def mask_url(url: str) -> str:
    """The URL with any password replaced, for logs and `check-config`."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))

"""One flat error hierarchy; library errors are translated at the boundary that meets them."""

from __future__ import annotations


class UploaderError(Exception):
    """Base of every error the project raises on purpose."""


class ConfigError(UploaderError):
    """A config file that cannot be used; the message names the file, the key and the value."""


class BadJobError(UploaderError):
    """A job body or a manifest that cannot be processed at all."""


class FileError(UploaderError):
    """One file could not be uploaded.

    `transient` decides whether the retry policy tries again; the message is the one-line
    reason recorded in the job's `failed` hash, so it must make sense to a person.
    """

    transient: bool = False

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class PermanentFileError(FileError):
    """Retrying cannot help: refused path, missing file, 4xx from the store."""

    transient = False


class TransientFileError(FileError):
    """Retrying may help: timeouts, resets, 5xx, throttling, a file changed while read."""

    transient = True


class ThrottledError(TransientFileError):
    """The store asked us to slow down (S3 SlowDown, HTTP 429/503)."""


class StoreUnavailableError(FileError):
    """The store refuses writes (read-only, full, missing bucket, refused credentials).

    Not the file's fault: the file is not counted, the daemon stops taking work until the
    store answers its probe again, and the file is uploaded then. `per_key`: the refusal may
    be this key's alone (a 403, EACCES below the root); the scheduler then asks the store's
    probe, and fails only the file if the store answers it. A FileError so that each store's
    one translation of library errors returns it like the others.
    """

    transient = False

    def __init__(self, reason: str, per_key: bool = False) -> None:
        super().__init__(reason)
        self.per_key = per_key


class InfrastructureError(UploaderError):
    """beanstalkd or a store's probe cannot be reached: never a reason to fail a file, only to wait.

    Not raised for Redis, whose errors are not translated: `redisio.until_done` waits its
    outages out.
    """

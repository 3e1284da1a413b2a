"""One exception hierarchy for the whole product.

Every error a user can trigger derives from :class:`PgtError`, so a job runner can catch
the product's errors without swallowing programming bugs.
"""

from __future__ import annotations

from pathlib import Path


def printable(text: str) -> str:
    """``text`` made storable as UTF-8: undecodable file-name bytes become ``\\xNN``."""
    try:  # file names decoded by the OS hold their bad bytes as surrogate escapes
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # other lone surrogates (e.g. from a JSON string)
        raw = text.encode("utf-8", "backslashreplace")
    return raw.decode("utf-8", "backslashreplace")


class PgtError(Exception):
    """Base class of every error the product raises on purpose."""


class ConfigError(PgtError):
    """A configuration value is missing, out of range or inconsistent."""


class ModelError(PgtError):
    """A face model or rig file is malformed or inconsistent."""


class CaptureError(PgtError):
    """A capture file is missing, unreadable or violates the capture contract.

    Attributes:
        path: the file (or folder) at fault.
        problem: what is wrong with it, in words.
    """

    def __init__(self, path: str | Path, problem: str) -> None:
        # File names need not be UTF-8: keep messages printable and storable.
        self.path = printable(str(path))
        self.problem = printable(problem)
        super().__init__(f"{self.path}: {self.problem}")

    def __reduce__(self):  # keeps the two fields through pickling (Dask workers)
        return (type(self), (self.path, self.problem))


class StageError(PgtError):
    """A pipeline stage failed on its input."""


class StorageError(PgtError):
    """An artifact or table could not be read or committed."""

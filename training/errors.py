"""The error family every reelrank command raises for a user mistake or bad input.

The CLI turns a ``ReelrankError`` into one plain message and a non-zero exit; the gRPC service
maps the serving subclasses onto status codes in one place.
"""

from __future__ import annotations

from pathlib import Path


class ReelrankError(Exception):
    """A failure the user can act on; its message names what was wrong."""


class DataError(ReelrankError):
    """Input data that is missing, malformed or inconsistent.

    ``path`` and ``line`` (1-based) locate the problem when it sits in a file.
    """

    def __init__(self, message: str, path: Path | str | None = None, line: int | None = None):
        self.path = Path(path) if path is not None else None
        self.line = line
        where = ""
        if self.path is not None:
            where = f"{self.path}:{line}: " if line is not None else f"{self.path}: "
        super().__init__(f"{where}{message}")


class DownloadError(ReelrankError):
    """A download that failed, was cut short or did not match its checksum."""


class ArtifactError(ReelrankError):
    """An artifacts directory that is missing, damaged or from an incompatible version."""

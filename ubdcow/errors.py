"""The exceptions ubdcow raises: one small tree under :class:`UbdCowError`.

Every error message is one line that names the file and the problem, in the
form ``<file>: <problem>``; some errors also carry a ``hint`` (what to do
about it), which the command line prints on a second line.
"""

from __future__ import annotations

import os

__all__ = [
    "UbdCowError",
    "FormatError",
    "NotACowFileError",
    "UnsupportedVersionError",
    "CorruptHeaderError",
    "CorruptImageError",
    "UnsupportedSectorSizeError",
    "BackingFileError",
    "BackingMismatchError",
    "ImageLockedError",
    "ImageRangeError",
    "UnrecordableWriteError",
    "OutputError",
    "ImageIOError",
    "ServeError",
]


class UbdCowError(Exception):
    """Base class of every error ubdcow raises."""

    def __init__(self, filename: str | os.PathLike[str] | None, message: str, *, hint: str | None = None) -> None:
        self.filename = os.fspath(filename) if filename is not None else None
        self.message = message
        self.hint = hint
        super().__init__(str(self))

    def __str__(self) -> str:
        if self.filename is None:
            return self.message
        return f"{self.filename}: {self.message}"


class FormatError(UbdCowError):
    """The file's content is not a COW image ubdcow can use."""


class NotACowFileError(FormatError):
    """The file does not start with the UML COW magic number."""


class UnsupportedVersionError(FormatError):
    """The header's version is not 1, 2 or 3."""


class CorruptHeaderError(FormatError):
    """The header is truncated or holds impossible values."""


class CorruptImageError(FormatError):
    """The header is valid but the rest of the file is not (e.g. truncated)."""


class UnsupportedSectorSizeError(FormatError):
    """The header is valid but its sector size is not 512, so I/O is refused."""


class BackingFileError(UbdCowError):
    """The backing file is missing, unreadable or unusable."""


class BackingMismatchError(BackingFileError):
    """The backing file's size or mtime differs from the header's record."""


class ImageLockedError(UbdCowError):
    """Another process (often a running UML guest) holds a conflicting lock."""

    def __init__(
        self, filename: str | os.PathLike[str] | None, message: str, *, hint: str | None = None, pid: int | None = None
    ) -> None:
        self.pid = pid
        super().__init__(filename, message, hint=hint)


class ImageRangeError(UbdCowError):
    """An I/O request lies outside the virtual disk."""


class UnrecordableWriteError(UbdCowError):
    """A write touches sectors a v1/v2 bitmap has no bit for."""


class OutputError(UbdCowError):
    """An output path is refused (exists, or is one of the inputs)."""


class ImageIOError(UbdCowError):
    """An operating-system error while reading or writing a file."""

    def __init__(
        self,
        filename: str | os.PathLike[str] | None,
        message: str,
        *,
        hint: str | None = None,
        errno: int | None = None,
    ) -> None:
        self.errno = errno
        super().__init__(filename, message, hint=hint)


class ServeError(UbdCowError):
    """The NBD server cannot start: nbdkit or its Python plugin missing or unusable, a socket or port taken."""


def io_error(filename: str | os.PathLike[str], exc: OSError, what: str | None = None) -> ImageIOError:
    """Wrap an :class:`OSError` as an :class:`ImageIOError` with one clear line."""
    reason = exc.strerror or str(exc)
    message = f"{what}: {reason}" if what else reason
    return ImageIOError(filename, message, errno=exc.errno)

"""The exceptions ubdcow raises: one small tree under :class:`UbdCowError`.

Every error message is one line that names the file and the problem, in the
form ``<file>: <problem>``; some errors also carry a ``hint`` (what to do
about it), which the command line prints on a second line.
"""

from __future__ import annotations

import errno as _errno
import os
from dataclasses import dataclass

__all__ = [
    "Fix",
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
    "MountError",
    "FilesystemError",
    "CorruptFilesystemError",
    "UnsupportedFilesystemError",
    "JournalError",
    "PartitionError",
    "FsPathError",
    "FsFileNotFoundError",
    "FsNotADirectoryError",
    "FsIsADirectoryError",
]


@dataclass(frozen=True)
class Fix:
    """A change to the failed call that may make it work: ``options``, the call's keyword arguments to set, as
    ``(name, value)`` (value None: a flag such as ``unsafe``; ``"PATH"``: a placeholder for the user's value).

    The library's hint names them as options (``--backing PATH``); the command line renders each as a whole
    command line: the user's own, with these options set (see :mod:`ubdcow.cli.base`).
    """

    why: str
    options: tuple[tuple[str, str | None], ...]

    def words(self) -> str:
        """The options as the command line spells them when its option has the keyword's name: ``--backing PATH``."""
        return " ".join(f"--{k.replace('_', '-')}" + (f" {v}" if v is not None else "") for k, v in self.options)

    def text(self) -> str:
        """``why`` followed by the options, e.g. ``if it moved, name it with --backing PATH``."""
        return f"{self.why} with {self.words()}"

    def command(self, command_line: str) -> str:
        """``why: COMMAND_LINE`` plus the options, e.g. ``if it moved, name it: ubdcow info x.cow --backing PATH``."""
        return f"{self.why}: {command_line} {self.words()}"


class UbdCowError(Exception):
    """Base class of every error ubdcow raises.

    ``hint`` is what to do: ``lead`` (prose) and the ``fixes`` (changes to the call), joined.
    """

    def __init__(
        self,
        filename: str | os.PathLike[str] | None,
        message: str,
        *,
        hint: str | None = None,
        fixes: tuple[Fix, ...] = (),
    ) -> None:
        self.filename = os.fspath(filename) if filename is not None else None
        self.message = message
        self.lead = hint
        self.fixes = fixes
        self.hint = "; ".join([*([hint] if hint else []), *(f.text() for f in fixes)]) or None
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
        self,
        filename: str | os.PathLike[str] | None,
        message: str,
        *,
        hint: str | None = None,
        pid: int | None = None,
        fixes: tuple[Fix, ...] = (),
    ) -> None:
        self.pid = pid
        super().__init__(filename, message, hint=hint, fixes=fixes)


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


class MountError(UbdCowError):
    """A folder cannot be mounted or unmounted: FUSE missing or not permitted, a mountpoint refused, libfuse's own
    refusal (``filename`` is the mountpoint, ``/dev/fuse``, or None)."""


class FilesystemError(UbdCowError):
    """The filesystem inside a disk cannot be read: corrupt, unsupported, or not there."""


class CorruptFilesystemError(FilesystemError):
    """The filesystem's structures are inconsistent (a loop, a block past the end, an impossible size)."""


class UnsupportedFilesystemError(FilesystemError):
    """Not ext2/3/4, or an ext4 feature the reader does not understand (named in the message)."""


class JournalError(FilesystemError):
    """The jbd2 journal cannot be replayed (corrupt or external); ``--no-journal`` reads the disk as it is."""


class PartitionError(FilesystemError):
    """No filesystem to choose, or several partitions and no ``--partition`` (the message lists them)."""


class FsPathError(FilesystemError):
    """A path inside the filesystem cannot be used as asked."""

    _errno_code: int | None = None

    def __init__(self, filename: str | os.PathLike[str] | None, message: str, *, hint: str | None = None) -> None:
        super().__init__(filename, message, hint=hint)
        if self._errno_code is not None:  # the OSError subclasses below carry their errno, as the OS's would
            setattr(self, "errno", self._errno_code)  # noqa: B010


class FsFileNotFoundError(FsPathError, FileNotFoundError):
    """A path does not exist inside the filesystem."""

    _errno_code = _errno.ENOENT


class FsNotADirectoryError(FsPathError, NotADirectoryError):
    """A path component inside the filesystem is not a directory."""

    _errno_code = _errno.ENOTDIR


class FsIsADirectoryError(FsPathError, IsADirectoryError):
    """A file operation named a directory inside the filesystem."""

    _errno_code = _errno.EISDIR


def io_error(filename: str | os.PathLike[str], exc: OSError, what: str | None = None) -> ImageIOError:
    """Wrap an :class:`OSError` as an :class:`ImageIOError`: ``<file>: <what>: <reason>``, keeping its errno.

    The one wrapper every caller uses (``raise io_error(name, exc, "cannot flush") from None``), so that no
    error loses its errno: the NBD plugin hands it to clients (``nbd.errno_of``).
    """
    reason = exc.strerror or str(exc)
    message = f"{what}: {reason}" if what else reason
    return ImageIOError(filename, message, errno=exc.errno)

"""ubdcow: User-Mode Linux copy-on-write (COW) block images in pure Python.

Read a guest's disk, write to it with the ubd driver's semantics, flatten it::

    import ubdcow
    with ubdcow.open("overlay.cow") as disk:
        boot_sector = disk.pread(512, 0)
    ubdcow.merge("overlay.cow", "flat.img")

See docs/api.md.
"""

from __future__ import annotations

__version__ = "0.1.0"

from . import _deps  # noqa: F401  (first: without construct, numpy or tqdm, one line, not a traceback)
from .changes import Change, ChangesReport, ChangesSession, changes
from .check import CheckReport, Finding, check
from .compact import CompactResult, compact
from .compare import CompareResult, compare
from .convert import ConvertResult, convert
from .create import create
from .diff import DiffResult, diff
from .du import DuReport, du
from .errors import (
    BackingFileError,
    BackingMismatchError,
    CorruptFilesystemError,
    CorruptHeaderError,
    CorruptImageError,
    FilesystemError,
    FormatError,
    FsFileNotFoundError,
    FsIsADirectoryError,
    FsNotADirectoryError,
    FsPathError,
    ImageIOError,
    ImageLockedError,
    ImageRangeError,
    JournalError,
    MountError,
    NotACowFileError,
    OutputError,
    PartitionError,
    ServeError,
    UbdCowError,
    UnrecordableWriteError,
    UnsupportedFilesystemError,
    UnsupportedSectorSizeError,
    UnsupportedVersionError,
)
from .extract import ExtractResult, extract
from .format import CowHeader, make_header, parse_header, read_header
from .fs import FileStat, FileSystem, open_fs
from .image import CowFile, CowImage, Extent, Run, open
from .inspect import Info, info, iter_map
from .inspect import map_image as map_image  # list(iter_map(...)), for earlier callers
from .merge import MergeResult, merge
from .rebase import RebaseResult, rebase

__all__ = [
    "__version__",
    "open",
    "create",
    "info",
    "merge",
    "iter_map",
    "check",
    "compare",
    "rebase",
    "diff",
    "convert",
    "du",
    "compact",
    "changes",
    "open_fs",
    "FileSystem",
    "FileStat",
    "extract",
    "ExtractResult",
    "MergeResult",
    "CheckReport",
    "Finding",
    "CompareResult",
    "RebaseResult",
    "DiffResult",
    "ConvertResult",
    "DuReport",
    "CompactResult",
    "Change",
    "ChangesReport",
    "ChangesSession",
    "CowFile",
    "CowImage",
    "CowHeader",
    "Extent",
    "Run",
    "Info",
    "make_header",
    "parse_header",
    "read_header",
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

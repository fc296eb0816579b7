"""ubdcow: User-Mode Linux copy-on-write (COW) block images in pure Python.

>>> import ubdcow
>>> with ubdcow.open("overlay.cow") as disk:        # doctest: +SKIP
...     boot_sector = disk.pread(512, 0)
"""

from __future__ import annotations

__version__ = "0.1.0"

from .create import create
from .errors import (
    BackingFileError,
    BackingMismatchError,
    CorruptHeaderError,
    CorruptImageError,
    FormatError,
    ImageIOError,
    ImageLockedError,
    ImageRangeError,
    NotACowFileError,
    OutputError,
    UbdCowError,
    UnrecordableWriteError,
    UnsupportedSectorSizeError,
    UnsupportedVersionError,
)
from .format import CowHeader, make_header, parse_header, read_header
from .image import CowImage, Extent, open
from .inspect import info

__all__ = [
    "__version__",
    "open",
    "create",
    "info",
    "CowImage",
    "CowHeader",
    "Extent",
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
]

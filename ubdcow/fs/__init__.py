"""Read the files inside a disk: a read-only ext2/ext3/ext4 reader over ``pread``.

This subpackage sits above the disk layer and needs only a ``pread(length, offset) -> bytes``
callable: a COW overlay's virtual disk (``ubdcow.open``), a raw image, or a partition of either.
It never writes to any file. ``open_fs`` is the entry point; see docs/api.md and docs/design.md.
"""

from __future__ import annotations

from .files import FsFile
from .filesystem import FileSystem
from .openfs import open_fs, open_volume
from .records import FileStat

__all__ = ["open_fs", "open_volume", "FileSystem", "FileStat", "FsFile"]

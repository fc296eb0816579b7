"""A COW file on its own, without its backing file: header, bitmap and data area, and the map of its
virtual disk (which runs come from the COW file, which from the backing file, which are holes)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Literal, NamedTuple

from . import lock as _lock
from ._io import Segments, file_size, open_file
from .bitmap import Bitmap
from .errors import CorruptImageError
from .format import SECTOR_SIZE, read_header_from

__all__ = ["CowFile", "Extent", "Source"]

Source = Literal["cow", "backing", "zero"]
_SHIFT = 9  # log2(SECTOR_SIZE)


class Extent(NamedTuple):
    """A run of the virtual disk with one source.

    ``offset`` is where the bytes live: in the COW file for "cow" and "zero",
    in the backing file for "backing".
    """

    start: int
    length: int
    source: Source
    offset: int


class CowFile:
    """A COW file on its own: header, bitmap and data area, without the backing file.

    For tools that do not read the backing file (info, map, convert, rebase
    --unsafe), and the base of :class:`CowImage`. With ``lock`` it takes the
    same lock as CowImage: a write lock when ``writable``, else a read lock.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        writable: bool = False,
        lock: bool = True,
        require_io: bool = True,
        allow_truncated: bool = False,
    ) -> None:
        self.name = os.fspath(path)
        self.fd = -1
        try:
            self.fd, _ = open_file(self.name, os.O_RDWR if writable else os.O_RDONLY, what="COW file")
            if lock:
                _lock.lock(self.fd, self.name, exclusive=writable)
            self.header = header = read_header_from(self.fd, self.name)
            if require_io:
                header.require_io_support(self.name)
            self.stat = os.fstat(self.fd)
            self.length = file_size(self.fd, self.stat)
            if self.length < header.data_offset and not allow_truncated:
                raise CorruptImageError(
                    self.name,
                    f"file is {self.length} bytes, shorter than its data offset {header.data_offset}: truncated",
                )
            # a truncated file (allow_truncated) has only some of its bitmap: the rest reads as clear,
            # and is never scanned
            present = max(0, min(header.bitmap_len, self.length - header.bitmap_offset))
            self.bitmap = Bitmap(self.fd, header.bitmap_offset, present, header.mapped_sectors)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Close the file (dropping its lock); idempotent."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> CowFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def extents(self, offset: int = 0, length: int | None = None) -> Iterator[tuple[int, int, str]]:
        """Coalesced runs ``(start, length, source)`` of the virtual disk, source "cow" or "backing"."""
        size = self.header.size
        end = size if length is None else min(size, offset + length)
        if offset >= end:
            return
        first, last = offset >> _SHIFT, (end + SECTOR_SIZE - 1) >> _SHIFT
        for sector, count, is_set in self.bitmap.runs(first, last):
            a = max(offset, sector << _SHIFT)
            b = min(end, (sector + count) << _SHIFT)
            yield a, b - a, "cow" if is_set else "backing"

    def mapping(self, offset: int = 0, length: int | None = None) -> Iterator[Extent]:
        """Like :meth:`extents`, with cow runs over holes in the data area split off as "zero"."""
        base = self.header.data_offset
        segments = Segments(self.fd)
        for start, n, source in self.extents(offset, length):
            if source == "backing":
                yield Extent(start, n, "backing", start)
                continue
            for a, b, is_data in segments(base + start, base + start + n):
                yield Extent(a - base, b - a, "cow" if is_data else "zero", a)

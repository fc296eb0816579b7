"""A COW file on its own, without its backing file: header, bitmap and data area, and the map of its
virtual disk (which runs come from the COW file, which from the backing file, which are holes)."""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from collections.abc import Iterator
from typing import Literal, NamedTuple

import numpy as np

from . import lock as _lock
from ._io import Segments, file_size, open_file
from .bitmap import Bitmap
from .errors import CorruptImageError
from .format import SECTOR_SIZE, read_header_from

__all__ = ["CowFile", "Extent", "Source", "split_data", "written_extents"]

Source = Literal["cow", "backing", "zero"]
_SHIFT = 9  # log2(SECTOR_SIZE)

# FIEMAP (linux/fiemap.h): struct fiemap is 32 bytes, then fm_extent_count struct fiemap_extent
_FS_IOC_FIEMAP = 0xC020660B
_FIEMAP_HEAD = struct.Struct("=QQIIII")  # fm_start, fm_length, fm_flags, fm_mapped_extents, fm_extent_count, reserved
_FIEMAP_EXTENT = np.dtype(
    [
        ("logical", "<u8"),
        ("physical", "<u8"),
        ("length", "<u8"),
        ("reserved", "<u8", 2),
        ("flags", "<u4"),
        ("reserved32", "<u4", 3),
    ]
)
_FIEMAP_EXTENT_LAST = 0x1
_FIEMAP_EXTENT_UNWRITTEN = 0x800  # allocated, reads as zeros unless the page cache holds data: not trusted
_FIEMAP_BATCH = 4096
_EMPTY = np.empty(0, dtype=np.int64)


def written_extents(fd: int, start: int, end: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Byte ranges ``[starts, ends)`` of the file, sorted and coalesced, that FIEMAP reports as written
    extents (allocated or delayed allocation) overlapping [start, end); None where FIEMAP does not work.

    Only the positive answer is trusted: a range inside these extents (and inside the file) is data for
    SEEK_DATA too. Anything else — unwritten extents, apparent holes — must be asked with SEEK_DATA/SEEK_HOLE.
    """
    starts: list[np.ndarray] = []
    ends: list[np.ndarray] = []
    pos = start
    buf = bytearray(_FIEMAP_HEAD.size + _FIEMAP_EXTENT.itemsize * _FIEMAP_BATCH)
    while pos < end:
        _FIEMAP_HEAD.pack_into(buf, 0, pos, end - pos, 0, 0, _FIEMAP_BATCH, 0)
        try:
            fcntl.ioctl(fd, _FS_IOC_FIEMAP, buf, True)
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL, errno.ENOSYS):
                return None
            raise
        mapped = _FIEMAP_HEAD.unpack_from(buf)[3]
        if mapped == 0:
            break
        ext = np.frombuffer(buf, dtype=_FIEMAP_EXTENT, count=mapped, offset=_FIEMAP_HEAD.size)
        written = ext[(ext["flags"] & _FIEMAP_EXTENT_UNWRITTEN) == 0]
        starts.append(written["logical"].astype(np.int64))
        ends.append((written["logical"] + written["length"]).astype(np.int64))
        last = ext[-1]
        if last["flags"] & _FIEMAP_EXTENT_LAST or mapped < _FIEMAP_BATCH:
            break
        pos = max(pos + 1, int(last["logical"]) + int(last["length"]))
    if not starts:
        return _EMPTY, _EMPTY
    s, e = np.concatenate(starts), np.concatenate(ends)
    if s.size > 1:  # coalesce touching extents
        joined = np.flatnonzero(s[1:] > np.maximum.accumulate(e)[:-1]) + 1
        first = np.concatenate(([0], joined))
        last_end = np.maximum.accumulate(e)[np.concatenate((joined - 1, [s.size - 1]))]
        s, e = s[first], last_end
    return s, e


def split_data(
    fd: int, starts: np.ndarray, ends: np.ndarray, shift: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split the ranges ``[starts, ends)`` (sorted, disjoint) of a file at ``+ shift`` into data and holes.

    Returns ``(starts, ends, is_data)`` of the pieces, in the input's coordinates and order. The answer is
    SEEK_DATA/SEEK_HOLE's (holes past the end of the file, everything data where the filesystem cannot
    tell); ranges that FIEMAP shows inside written extents are answered without asking it per range.
    """
    if starts.size == 0:
        return _EMPTY, _EMPTY, np.empty(0, dtype=bool)
    size = file_size(fd)
    a, b = starts + shift, ends + shift
    covered = np.zeros(starts.size, dtype=bool)
    written = written_extents(fd, int(a[0]), min(int(b[-1]), size))
    if written is not None and written[0].size:
        ws, we = written[0], np.minimum(written[1], size)
        i = np.minimum(np.searchsorted(we, a, side="right"), ws.size - 1)  # the first extent ending after a
        covered = (ws[i] <= a) & (we[i] >= b)
    if covered.all():
        return starts, ends, np.ones(starts.size, dtype=bool)
    segments = Segments(fd)
    piece_starts: list[int] = []
    piece_ends: list[int] = []
    piece_data: list[bool] = []
    for k in np.flatnonzero(~covered).tolist():
        for x, y, is_data in segments(int(a[k]), int(b[k])):
            piece_starts.append(x - shift)
            piece_ends.append(y - shift)
            piece_data.append(is_data)
    out_s = np.concatenate((starts[covered], np.array(piece_starts, dtype=np.int64)))
    out_e = np.concatenate((ends[covered], np.array(piece_ends, dtype=np.int64)))
    out_d = np.concatenate((np.ones(int(covered.sum()), dtype=bool), np.array(piece_data, dtype=bool)))
    order = np.argsort(out_s, kind="stable")
    return out_s[order], out_e[order], out_d[order]


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

"""A COW file on its own, without its backing file: header, bitmap and data area, and the map of its
virtual disk: which bytes come from the COW file, which from the backing file, which read as zeros.

The map is :meth:`CowFile.run_arrays` (arrays, for the hot paths: a window of up to 4 GiB per call) and
:meth:`CowFile.runs` (a generator of :class:`Run` over any range, built on it); ``extents``, ``mapping``,
``ubdcow.iter_map``, ``CowImage.source_runs`` and merge's copy loop are views of it. Zeros come from
holes: a hole in the data area under set bits, a hole in the backing file under clear bits, and what lies
past the end of either file, which is a hole too (:func:`ubdcow._io.split_data`). That is the rule "a set
bit past the end of the COW file reads as zeros"; :meth:`CowFile.read_data` is the same rule for reads.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Literal, NamedTuple

import numpy as np

from . import lock as _lock
from ._io import file_size, open_file, pread_into, split_data
from .bitmap import Bitmap
from .errors import CorruptImageError, io_error
from .format import SECTOR_SHIFT, SECTOR_SIZE, CowHeader, read_header_from

__all__ = ["CowFile", "Extent", "Run", "Source", "BACKING", "COW", "ZERO", "SOURCES", "RUNS_MAX", "cow_bytes"]

Source = Literal["cow", "backing", "zero"]
#: source codes of :meth:`CowFile.run_arrays` (and ``CowImage.source_runs``), and their names
BACKING, COW, ZERO = 0, 1, 2
SOURCES: tuple[Source, ...] = ("backing", "cow", "zero")
#: bytes of disk per :meth:`CowFile.run_arrays` call: 8 Mi sectors, 1 MiB of bitmap
RUNS_MAX = 4 << 30
_NO_RUNS = np.empty(0, dtype=np.int64)


class Extent(NamedTuple):
    """A run of the virtual disk with one source.

    ``offset`` is where the bytes live: in the COW file for "cow" and "zero",
    in the backing file for "backing".
    """

    start: int
    length: int
    source: Source
    offset: int


class Run(NamedTuple):
    """A piece of the virtual disk with one source: ``length`` bytes from ``start``, read from ``fd`` at
    ``offset`` ("cow": the COW file's data area; "backing": the backing file), or zeros ("zero", ``fd`` -1;
    ``offset`` is where they would lie in the file whose hole they are). ``fd`` is -1 for "backing" runs of
    a :class:`CowFile` on its own too: it has no backing file open."""

    start: int
    length: int
    source: Source
    fd: int
    offset: int


def cow_bytes(header: CowHeader, cow_sectors: int, last_set: bool) -> int:
    """Bytes of the virtual disk read from the COW file (a set partial last sector counts its defined part)."""
    total = cow_sectors * header.sectorsize
    if last_set:
        total -= header.sectors * header.sectorsize - header.size
    return min(total, header.size)


class CowFile:
    """A COW file on its own: header, bitmap and data area, without the backing file.

    For tools that do not read the backing file (info, map, convert, rebase
    --unsafe); :class:`~ubdcow.CowImage` holds one. With ``lock`` it takes the
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

    def cow_bytes(self) -> int:
        """Bytes of the virtual disk read from the COW file: its set (and honoured) bits."""
        h = self.header
        return cow_bytes(h, self.bitmap.count(), self.bitmap.test(h.sectors - 1))

    def read_data(self, view: memoryview, pos: int) -> None:
        """Fill ``view`` with the data area's bytes for disk offset ``pos`` on: what a set bit reads. Past the
        end of the file they are zeros, as in the kernel; a read error names the file and the offset."""
        at = self.header.data_offset + pos
        try:
            got = pread_into(self.fd, view, at)
        except OSError as exc:
            raise io_error(self.name, exc, f"read error at data offset {at}") from None
        if got < len(view):
            view[got:] = bytes(len(view) - got)

    # -- the map -----------------------------------------------------------------------------------------
    def run_arrays(
        self, offset: int = 0, length: int | None = None, *, backing_fd: int = -1, holes: bool = False
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The map of [offset, offset+length) as arrays ``(starts, ends, sources)``, pieces in order.

        Sources are :data:`COW` (set bits), :data:`BACKING` (clear bits) and, with ``holes``, :data:`ZERO`:
        set bits over holes of the data area, and clear bits over holes of the backing file ``backing_fd``
        (when given), past the end of a file included. Only the bitmap's runs are coalesced. One call covers
        at most :data:`RUNS_MAX` bytes: ask again from where it ends for the rest.
        """
        return self._pieces(offset, length, backing_fd, holes)[:3]

    def _pieces(
        self, offset: int, length: int | None, backing_fd: int, holes: bool
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`run_arrays`, and which pieces lie under set bits (their bytes live in the COW file)."""
        size = self.header.size
        end = size if length is None else min(size, offset + length)
        end = min(end, offset + RUNS_MAX)
        if offset >= end:
            return _NO_RUNS, _NO_RUNS, np.empty(0, dtype=np.int8), np.empty(0, dtype=bool)
        lo, hi = offset >> SECTOR_SHIFT, (end + SECTOR_SIZE - 1) >> SECTOR_SHIFT
        edges, set_first = self.bitmap.edges(lo, hi)
        first = np.concatenate(([0], edges))
        starts = np.maximum((first + lo) << SECTOR_SHIFT, offset)
        ends = np.minimum((np.concatenate((edges, [hi - lo])) + lo) << SECTOR_SHIFT, end)
        is_set = (np.arange(first.size) % 2).astype(bool) ^ set_first  # (runs alternate)
        if not holes:
            return starts, ends, is_set.astype(np.int8), is_set
        cow = split_data(self.fd, starts[is_set], ends[is_set], self.header.data_offset)
        clear = starts[~is_set], ends[~is_set]
        backing = split_data(backing_fd, *clear) if backing_fd >= 0 else (*clear, np.ones(clear[0].size, dtype=bool))
        order = np.argsort(np.concatenate((cow[0], backing[0])), kind="stable")
        sources = np.concatenate((np.where(cow[2], COW, ZERO), np.where(backing[2], BACKING, ZERO)))
        in_cow = np.concatenate((np.ones(cow[0].size, dtype=bool), np.zeros(backing[0].size, dtype=bool)))
        return (
            np.concatenate((cow[0], backing[0]))[order],
            np.concatenate((cow[1], backing[1]))[order],
            sources.astype(np.int8)[order],
            in_cow[order],
        )

    def runs(
        self, offset: int = 0, length: int | None = None, *, backing_fd: int = -1, holes: bool = False
    ) -> Iterator[Run]:
        """The map of [offset, offset+length) as coalesced :class:`Run` records, in order (streamed, a window
        at a time; see :meth:`run_arrays` for ``holes`` and ``backing_fd``)."""
        end = self.header.size if length is None else min(self.header.size, offset + length)
        base = self.header.data_offset
        fds = (backing_fd, self.fd, -1)  # by source code
        pending: Run | None = None
        pos = offset
        while pos < end:
            starts, ends, sources, in_cow = self._pieces(pos, end - pos, backing_fd, holes)
            first = True  # pieces of one window never carry each other on: only its first may carry on the last
            for a, b, code, cow in zip(starts.tolist(), ends.tolist(), sources.tolist(), in_cow.tolist(), strict=True):
                run = Run(a, b - a, SOURCES[code], fds[code], base + a if cow else a)
                if pending is not None:
                    if first and _continues(pending, run):
                        run = pending._replace(length=pending.length + run.length)
                    else:
                        yield pending
                first = False
                pending = run
            pos = int(ends[-1])
        if pending is not None:
            yield pending

    def extents(self, offset: int = 0, length: int | None = None) -> Iterator[tuple[int, int, str]]:
        """Coalesced runs ``(start, length, source)`` of the virtual disk, source "cow" or "backing" (by the bits)."""
        for run in self.runs(offset, length):
            yield run.start, run.length, run.source

    def mapping(self, offset: int = 0, length: int | None = None) -> Iterator[Extent]:
        """Like :meth:`extents`, with cow runs over holes in the data area split off as "zero"."""
        for run in self.runs(offset, length, holes=True):
            yield Extent(run.start, run.length, run.source, run.offset)


def _continues(a: Run, b: Run) -> bool:
    """Whether run ``b`` carries on run ``a``: same source, same file, the next bytes of it."""
    return a.source == b.source and a.fd == b.fd and a.offset + a.length == b.offset and a.start + a.length == b.start

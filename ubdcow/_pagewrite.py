"""The write path of :class:`ubdcow.image.CowImage`: page-granular writes, zeroing and discards, and
making mixed pages whole.

Writes extend to whole 4 KiB pages of the virtual disk, filled from the
current content, write the data, and only then set the bits: every page a
write touches ends all set (the Linux ubd driver misreads pages that mix COW
and backing sectors).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from ._io import punch_hole, pwrite_all
from ._readpath import Reader
from .cowfile import CowFile
from .errors import ImageRangeError, UnrecordableWriteError, io_error
from .format import PAGE_SECTORS, PAGE_SHIFT, PAGE_SIZE, SECTOR_SHIFT, SECTOR_SIZE
from .lock import SharedLock

__all__ = ["PageWriter", "write_clear_sectors"]

_ZERO_CHUNK = 8 << 20
# mixed pages whose data is written before one fsync and their bits
_FILL_BATCH = 4096


def write_clear_sectors(fd: int, page: memoryview, bits: list[bool], at: int) -> None:
    """Write the sectors of ``page`` whose bit is clear to ``fd`` at ``at`` + their offset, one write per run.

    How mixed pages are made whole (in place, and by ``convert``): the set
    sectors keep the data they have, the clear ones get the backing file's.
    """
    i = 0
    while i < len(bits):
        if bits[i]:
            i += 1
            continue
        j = i
        while j < len(bits) and not bits[j]:
            j += 1
        a, b = i * SECTOR_SIZE, min(j * SECTOR_SIZE, len(page))
        pwrite_all(fd, [page[a:b]], at + a)
        i = j


class PageWriter:
    """The write path of an open image: it shares the image's COW file, its :class:`~ubdcow._readpath.Reader`
    (for the current content of the pages a write completes) and its lock, whose exclusive side it takes.
    The image checks that it is open for writing before it calls in."""

    def __init__(self, cow: CowFile, reader: Reader, lock: SharedLock) -> None:
        self.cow = cow
        self.reader = reader
        self.lock = lock
        self.name = cow.name
        self.header = cow.header
        self.size = cow.header.size
        self.bitmap = cow.bitmap
        self.data_offset = cow.header.data_offset
        #: written since the last flush
        self.dirty = False

    @property
    def fd(self) -> int:
        """The COW file's descriptor (-1 once the image is closed)."""
        return self.cow.fd

    def flush(self) -> None:
        """fsync the COW file if anything was written since the last flush (nothing once it is closed)."""
        if self.dirty and self.cow.fd >= 0:
            with self.lock:
                try:
                    os.fsync(self.cow.fd)
                except OSError as exc:
                    raise io_error(self.name, exc, "cannot flush") from None
                self.dirty = False

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> int:
        """Write ``data`` at ``offset``; the whole range must lie inside the disk."""
        view = memoryview(data).cast("B")
        n = len(view)
        self.check_range(offset, n)
        if n:
            with self.lock:
                self._write(view, offset)
        return n

    def write_zeroes(self, offset: int, length: int) -> None:
        """Make [offset, offset+length) read as zeros: set the bits and punch holes, as the kernel does.

        Whole pages are punched; the rest of a partly covered page keeps its
        content and the whole page becomes COW (pages stay whole).
        """
        self.check_range(offset, length)
        if length == 0:
            return
        end = offset + length
        first = -(-offset // PAGE_SIZE) * PAGE_SECTORS
        # A range reaching the end of the disk covers its partial last page.
        last = self.header.sectors if end == self.size else (end // PAGE_SIZE) * PAGE_SECTORS
        with self.lock:
            if first >= last:
                self._write(memoryview(bytes(length)), offset)
                return
            if offset < first << SECTOR_SHIFT:
                self._write(memoryview(bytes((first << SECTOR_SHIFT) - offset)), offset)
            tail = last << SECTOR_SHIFT
            if tail < end:
                self._write(memoryview(bytes(end - tail)), tail)
            self._zero_sectors(first, last)

    def fill_mixed_pages(self, progress: Callable[[int], Any] | None = None) -> int:
        """Make every mixed page whole without changing what the disk reads; returns how many there were.

        A mixed page's clear sectors are copied from the backing file into the
        data area, fsynced, and only then are its bits set: at any point of a
        crash each sector reads the same bytes. ``progress`` gets bytes of disk scanned.
        """
        done = 0
        pending: list[list[int]] = []  # coalesced [first, last) sector spans whose data is written
        with self.lock:
            scanned = 0
            for pages, end in self.bitmap.mixed():
                for page in pages.tolist():
                    span = self._fill_page_data(page)
                    if pending and pending[-1][1] == span[0]:
                        pending[-1][1] = span[1]
                    else:
                        pending.append(list(span))
                    done += 1
                    if done % _FILL_BATCH == 0:
                        self._set_durably(pending)
                if progress is not None:
                    progress(min(end * PAGE_SIZE, self.size) - scanned)
                    scanned = min(end * PAGE_SIZE, self.size)
            self._set_durably(pending)
        return done

    def _fill_page_data(self, page: int) -> tuple[int, int]:
        """Copy a page's clear sectors from the backing file into the data area; its sector span."""
        lo = page * PAGE_SECTORS
        hi = min(lo + PAGE_SECTORS, self.bitmap.nbits)
        start, stop = lo << SECTOR_SHIFT, min(hi << SECTOR_SHIFT, self.size)
        buf = memoryview(bytearray(stop - start))
        self.reader.read_backing(buf, start)
        try:
            write_clear_sectors(self.fd, buf, self.bitmap.bits(lo, hi).tolist(), self.data_offset + start)
        except OSError as exc:
            raise io_error(self.name, exc, f"write error at offset {start}") from None
        self.dirty = True
        return lo, hi

    def _set_durably(self, spans: list[list[int]]) -> None:
        """fsync the data written for ``spans``, then set their bits (and forget them)."""
        if not spans:
            return
        try:
            os.fsync(self.fd)
            for lo, hi in spans:
                self.bitmap.set_range(lo, hi)
        except OSError as exc:
            raise io_error(self.name, exc, "cannot make pages whole") from None
        spans.clear()

    def check_range(self, offset: int, length: int) -> None:
        """Refuse a write outside the disk, or on sectors the bitmap has no bit for."""
        if offset < 0 or length < 0:
            raise ValueError("offset and length must be >= 0")
        if offset + length > self.size:
            raise ImageRangeError(
                self.name,
                f"write of {length} bytes at offset {offset} ends past the end of the disk ({self.size} bytes)",
            )
        last = (offset + length + SECTOR_SIZE - 1) >> SECTOR_SHIFT
        if length and last > self.bitmap.nbits:
            first = max(offset >> SECTOR_SHIFT, self.bitmap.nbits)
            raise UnrecordableWriteError(
                self.name,
                f"sectors {first}-{last - 1} have no bit in this {self.header.layout} bitmap (the v1/v2 rounding "
                "bug): the kernel would read them back from the backing file, so the write is refused",
                hint=f"convert the file to v3 first: ubdcow convert {self.name} -o NEW.cow",
            )

    def _page_span(self, offset: int, end: int) -> tuple[int, int]:
        """Sectors ``[first, last)`` of the whole pages that bytes [offset, end) touch (the last page may be short)."""
        first = (offset >> PAGE_SHIFT) * PAGE_SECTORS
        last = min(((end + PAGE_SIZE - 1) >> PAGE_SHIFT) * PAGE_SECTORS, self.header.sectors)
        return first, last

    def _write(self, view: memoryview, offset: int) -> None:
        """Page-granular write: fill the rest of the pages from the current content, write the data, then
        the bits (caller holds the lock). Every page touched ends all set."""
        n = len(view)
        end = offset + n
        first, last = self._page_span(offset, end)
        start = first << SECTOR_SHIFT
        stop = min(last << SECTOR_SHIFT, self.size)
        parts: list[memoryview | bytes] = []
        if start < offset:
            parts.append(self._current(start, offset - start))
        parts.append(view)
        if end < stop:
            parts.append(self._current(end, stop - end))
        try:
            pwrite_all(self.fd, parts, self.data_offset + start)
            self.dirty = True
            self.bitmap.set_range(first, last)
        except OSError as exc:
            raise io_error(self.name, exc, f"write error at offset {offset}") from None

    def _current(self, offset: int, length: int) -> memoryview:
        """Current content of less than a page of the disk (caller holds the lock)."""
        buf = memoryview(bytearray(length))
        self.reader.fill(buf, offset)
        return buf

    def _zero_sectors(self, first: int, last: int) -> None:
        """Zero whole sectors [first, last): punch the data area (or write zeros), then set the bits."""
        start = self.data_offset + (first << SECTOR_SHIFT)
        length = (last - first) << SECTOR_SHIFT
        try:
            # the zeroed sectors must lie inside the file (as holes), or a set bit would point past its end
            end = self.data_offset + min(last << SECTOR_SHIFT, self.size)
            if os.fstat(self.fd).st_size < end:
                os.ftruncate(self.fd, end)
            if not punch_hole(self.fd, start, length):
                zeros = bytes(min(_ZERO_CHUNK, length))
                for pos in range(0, length, len(zeros)):
                    pwrite_all(self.fd, [zeros[: min(len(zeros), length - pos)]], start + pos)
            self.dirty = True
            self.bitmap.set_range(first, last)
        except OSError as exc:
            raise io_error(self.name, exc, f"cannot zero sectors {first}-{last - 1}") from None

"""The write path of :class:`ubdcow.image.CowImage`, as a mixin: page-granular writes, zeroing and
discards, and making mixed pages whole.

Writes extend to whole 4 KiB pages of the virtual disk, filled from the
current content, write the data, and only then set the bits: every page a
write touches ends all set (the Linux ubd driver misreads pages that mix COW
and backing sectors).
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ._io import punch_hole, pwrite_all
from .bitmap import PAGE_SECTORS, PAGE_SIZE, Bitmap
from .errors import ImageRangeError, UnrecordableWriteError, io_error
from .format import SECTOR_SHIFT as _SHIFT
from .format import SECTOR_SIZE, CowHeader

_PAGE_SHIFT = 12  # log2(PAGE_SIZE)
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


class _PageWriter:
    """The writing half of :class:`ubdcow.image.CowImage` (which provides the state and the read path)."""

    name: str
    mode: str
    size: int
    header: CowHeader
    _fd: int
    _data_offset: int
    _bitmap: Bitmap
    _mutex: contextlib.AbstractContextManager[object]
    _dirty: bool

    if TYPE_CHECKING:

        def _checkClosed(self) -> None: ...

        def _fill(self, view: memoryview, offset: int, *, one_source_tried: bool = False) -> None: ...

        def _read_backing(self, chunk: memoryview, pos: int) -> None: ...

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> int:
        """Write ``data`` at ``offset``; the whole range must lie inside the disk."""
        self._check_writable()
        view = memoryview(data).cast("B")
        n = len(view)
        self._check_range(offset, n)
        if n:
            with self._mutex:
                self._write(view, offset)
        return n

    def write_zeroes(self, offset: int, length: int) -> None:
        """Make [offset, offset+length) read as zeros: set the bits and punch holes, as the kernel does.

        Whole pages are punched; the rest of a partly covered page keeps its
        content and the whole page becomes COW (pages stay whole).
        """
        self._check_writable()
        self._check_range(offset, length)
        if length == 0:
            return
        end = offset + length
        first = -(-offset // PAGE_SIZE) * PAGE_SECTORS
        # A range reaching the end of the disk covers its partial last page.
        last = self.header.sectors if end == self.size else (end // PAGE_SIZE) * PAGE_SECTORS
        with self._mutex:
            if first >= last:
                self._write(memoryview(bytes(length)), offset)
                return
            if offset < first << _SHIFT:
                self._write(memoryview(bytes((first << _SHIFT) - offset)), offset)
            tail = last << _SHIFT
            if tail < end:
                self._write(memoryview(bytes(end - tail)), tail)
            self._zero_sectors(first, last)

    def discard(self, offset: int, length: int) -> None:
        """Discard a range: with the ubd driver it reads as zeros afterwards (same as :meth:`write_zeroes`)."""
        self.write_zeroes(offset, length)

    def fill_mixed_pages(self, progress: Callable[[int], Any] | None = None) -> int:
        """Make every mixed page whole without changing what the disk reads; returns how many there were.

        A mixed page's clear sectors are copied from the backing file into the
        data area, fsynced, and only then are its bits set: at any point of a
        crash each sector reads the same bytes. ``progress`` gets bytes of disk scanned.
        """
        self._check_writable()
        done = 0
        pending: list[list[int]] = []  # coalesced [first, last) sector spans whose data is written
        with self._mutex:
            scanned = 0
            for pages, end in self._bitmap.mixed():
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
        hi = min(lo + PAGE_SECTORS, self._bitmap.nbits)
        start, stop = lo << _SHIFT, min(hi << _SHIFT, self.size)
        buf = memoryview(bytearray(stop - start))
        self._read_backing(buf, start)
        try:
            write_clear_sectors(self._fd, buf, self._bitmap.bits(lo, hi).tolist(), self._data_offset + start)
        except OSError as exc:
            raise io_error(self.name, exc, f"write error at offset {start}") from None
        self._dirty = True
        return lo, hi

    def _set_durably(self, spans: list[list[int]]) -> None:
        """fsync the data written for ``spans``, then set their bits (and forget them)."""
        if not spans:
            return
        try:
            os.fsync(self._fd)
            for lo, hi in spans:
                self._bitmap.set_range(lo, hi)
        except OSError as exc:
            raise io_error(self.name, exc, "cannot make pages whole") from None
        spans.clear()

    def _check_writable(self) -> None:
        self._checkClosed()
        if self.mode != "r+":
            raise io.UnsupportedOperation(f"{self.name}: opened read-only (use mode 'r+' to write)")

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0:
            raise ValueError("offset and length must be >= 0")
        if offset + length > self.size:
            raise ImageRangeError(
                self.name,
                f"write of {length} bytes at offset {offset} ends past the end of the disk ({self.size} bytes)",
            )
        last = (offset + length + SECTOR_SIZE - 1) >> _SHIFT
        if length and last > self._bitmap.nbits:
            first = max(offset >> _SHIFT, self._bitmap.nbits)
            raise UnrecordableWriteError(
                self.name,
                f"sectors {first}-{last - 1} have no bit in this {self.header.layout} bitmap (the v1/v2 rounding "
                "bug): the kernel would read them back from the backing file, so the write is refused",
                hint=f"convert the file to v3 first: ubdcow convert {self.name} -o NEW.cow",
            )

    def _page_span(self, offset: int, end: int) -> tuple[int, int]:
        """Sectors ``[first, last)`` of the whole pages that bytes [offset, end) touch (the last page may be short)."""
        first = (offset >> _PAGE_SHIFT) * PAGE_SECTORS
        last = min(((end + PAGE_SIZE - 1) >> _PAGE_SHIFT) * PAGE_SECTORS, self.header.sectors)
        return first, last

    def _write(self, view: memoryview, offset: int) -> None:
        """Page-granular write: fill the rest of the pages from the current content, write the data, then
        the bits (caller holds the mutex). Every page touched ends all set."""
        n = len(view)
        end = offset + n
        first, last = self._page_span(offset, end)
        start = first << _SHIFT
        stop = min(last << _SHIFT, self.size)
        parts: list[memoryview | bytes] = []
        if start < offset:
            parts.append(self._current(start, offset - start))
        parts.append(view)
        if end < stop:
            parts.append(self._current(end, stop - end))
        try:
            pwrite_all(self._fd, parts, self._data_offset + start)
            self._dirty = True
            self._bitmap.set_range(first, last)
        except OSError as exc:
            raise io_error(self.name, exc, f"write error at offset {offset}") from None

    def _current(self, offset: int, length: int) -> memoryview:
        """Current content of less than a page of the disk (caller holds the mutex)."""
        buf = memoryview(bytearray(length))
        self._fill(buf, offset)
        return buf

    def _zero_sectors(self, first: int, last: int) -> None:
        """Zero whole sectors [first, last): punch the data area (or write zeros), then set the bits."""
        start = self._data_offset + (first << _SHIFT)
        length = (last - first) << _SHIFT
        try:
            # the zeroed sectors must lie inside the file (as holes), or a set bit would point past its end
            end = self._data_offset + min(last << _SHIFT, self.size)
            if os.fstat(self._fd).st_size < end:
                os.ftruncate(self._fd, end)
            if not punch_hole(self._fd, start, length):
                zeros = bytes(min(_ZERO_CHUNK, length))
                for pos in range(0, length, len(zeros)):
                    pwrite_all(self._fd, [zeros[: min(len(zeros), length - pos)]], start + pos)
            self._dirty = True
            self._bitmap.set_range(first, last)
        except OSError as exc:
            raise io_error(self.name, exc, f"cannot zero sectors {first}-{last - 1}") from None

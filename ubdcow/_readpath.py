"""The read path of an open image: a plan made from the bitmap bytes of a request, and one routine that
fills a buffer by it.

:func:`plan` is pure (bytes in, a plan out: no file), so it is tested on its own; :class:`Reader` fetches
the bitmap bytes (cached), plans, and fills by the plan, copying COW data from the mapped COW file where it
can. A bitmap byte holds the 8 bits of a 4 KiB page: 0x00 all backing, 0xFF all COW (every writer keeps
pages whole), anything else a mixed page. A request inside whole-page bytes is planned from them with
C-speed scans; one that touches a mixed page, or sectors past the honoured bits (the end of a v1/v2
bitmap), from the bits of its sectors.
"""

from __future__ import annotations

import errno
import mmap
import os
import re
from typing import NamedTuple

import numpy as np

from ._io import pread_into
from .backing import Backing
from .bitmap import iter_runs, unpack_bits
from .cowfile import BACKING, COW, CowFile
from .errors import ImageIOError, io_error
from .format import PAGE_SHIFT, PAGE_SIZE, SECTOR_SHIFT, SECTOR_SIZE

__all__ = ["Plan", "Reader", "plan", "OVERLAY_MIN", "OVERLAY_MAX", "MAP_COPY_MAX"]

#: requests of whole sectors between these sizes, mostly backing, with mixed pages, take the overlay: the
#: backing file in one read, then the COW sectors copied over it from the mapped COW file in one numpy step
OVERLAY_MIN = 64 << 10
OVERLAY_MAX = 16 << 20
#: COW runs shorter than this are copied from the mapped COW file (no system call); longer ones are read
#: with preadv, which lets other threads run while the kernel copies
MAP_COPY_MAX = 64 << 10
_COW_PAGES = re.compile(rb"[^\x00]+")
_span = re.Match.span

#: bytes [start, end) of the disk and the file they come from (BACKING or COW)
Step = tuple[int, int, int]


class Plan(NamedTuple):
    """How to fill a request whose bytes come from both files.

    Without ``under``, ``steps`` cover the request in order, each read from its file. With ``under``
    (mostly backing), the backing file is read for the whole request first, and ``steps`` are the COW runs
    to copy over it, or, when ``sectors`` is given, the request's COW sectors (indexes from its first
    sector) are copied over it from the mapped COW file in one step.
    """

    under: bool
    steps: list[Step]
    sectors: np.ndarray | None = None


Pages = bytes | bytearray


def plan(pages: Pages, base: int, nbits: int, offset: int, end: int, mapped_end: int = 0) -> int | Plan:
    """Plan the read of disk bytes [offset, end) from the bitmap bytes in hand.

    ``pages`` holds bitmap bytes from byte ``base`` on (byte *p*: the bits of page *p*), covering the
    request's pages as far as the honoured bits go; ``nbits``: the honoured bits (sectors from there on read
    from the backing file, whatever the bytes say); ``mapped_end``: the disk offset up to which the COW
    data is mapped in memory (the overlay is planned only below it). Returns :data:`~ubdcow.cowfile.BACKING`
    or :data:`~ubdcow.cowfile.COW` when one file holds the whole request, else a :class:`Plan`.
    """
    first = offset >> PAGE_SHIFT
    last = (end + PAGE_SIZE - 1) >> PAGE_SHIFT
    if last << 3 <= nbits:  # every bit of these bytes is honoured
        a, b = first - base, last - base
        if b - a == 1:
            kind = pages[a]
            if kind == 0:
                return BACKING
            if kind == 0xFF:
                return COW
        else:
            cow = pages.count(0xFF, a, b)
            if cow == b - a:
                return COW
            backing = pages.count(0, a, b)
            if cow + backing == b - a:
                return BACKING if backing == b - a else _by_pages(pages, a, b, base, offset, end, cow)
    return _by_sectors(pages, base, nbits, offset, end, mapped_end)


def _by_pages(pages: Pages, a: int, b: int, base: int, offset: int, end: int, cow: int) -> Plan:
    """:func:`plan` where the bytes ``pages[a:b]`` are all 0x00 or 0xFF, ``cow`` of them 0xFF, some of each."""
    origin = base << PAGE_SHIFT
    steps = [
        (origin + (s << PAGE_SHIFT), origin + (e << PAGE_SHIFT), COW)
        for s, e in map(_span, _COW_PAGES.finditer(pages, a, b))
    ]
    if steps[0][0] < offset:
        steps[0] = (offset, steps[0][1], COW)
    if steps[-1][1] > end:
        steps[-1] = (steps[-1][0], end, COW)
    if 2 * cow <= b - a:  # mostly backing: the backing file in one read, the COW runs over it
        return Plan(True, steps)
    every: list[Step] = []
    pos = offset
    for step in steps:
        if pos < step[0]:
            every.append((pos, step[0], BACKING))
        every.append(step)
        pos = step[1]
    if pos < end:
        every.append((pos, end, BACKING))
    return Plan(False, every)


def _by_sectors(pages: Pages, base: int, nbits: int, offset: int, end: int, mapped_end: int) -> int | Plan:
    """:func:`plan` from the bits of each sector (mixed pages, the end of a v1/v2 bitmap)."""
    n = end - offset
    lo, hi = offset >> SECTOR_SHIFT, (end + SECTOR_SIZE - 1) >> SECTOR_SHIFT
    top = max(lo, min(hi, nbits))
    if OVERLAY_MIN <= n <= OVERLAY_MAX and not (offset | n) & (SECTOR_SIZE - 1) and end <= mapped_end:
        dirty = np.flatnonzero(unpack_bits(pages, base * 8, lo, top, hi))
        if 2 * dirty.size <= hi - lo:
            return Plan(True, [], dirty)
    runs = list(iter_runs(pages, base * 8, lo, top))
    if top < hi:  # past the honoured bits: always clear
        if runs and not runs[-1][2]:
            runs[-1] = (runs[-1][0], runs[-1][1] + hi - top, False)
        else:
            runs.append((top, hi - top, False))
    if len(runs) == 1:
        return COW if runs[0][2] else BACKING
    steps = [
        (max(offset, sector << SECTOR_SHIFT), min(end, (sector + count) << SECTOR_SHIFT), COW if is_set else BACKING)
        for sector, count, is_set in runs
    ]
    cow_bytes = sum(count for _, count, is_set in runs if is_set) << SECTOR_SHIFT
    if len(runs) > 2 and 2 * cow_bytes < n:  # mostly backing, in many runs: the COW runs over one backing read
        return Plan(True, [step for step in steps if step[2] == COW])
    return Plan(False, steps)


class Reader:
    """Reads the disk of an open COW file and its backing file (the caller holds the image's lock).

    The COW file is mapped read-only for ``map_length`` bytes (0: not at all), so that many small COW runs
    in a read cost no system call; only while its lock is held, since a page of a mapping that someone
    truncates away faults (SIGBUS). Reads past the mapped length (the file grew) use pread.
    """

    def __init__(self, cow: CowFile, backing: Backing, map_length: int) -> None:
        self.cow = cow
        self.bitmap = cow.bitmap
        self.nbits = cow.bitmap.nbits
        self.top = (self.nbits + 7) >> 3  # bitmap bytes that hold honoured bits
        self.whole = self.nbits >> 3  # bitmap bytes whose 8 bits are all honoured
        self.fd, self.data_offset = cow.fd, cow.header.data_offset
        self.backing = backing
        self.bfd = backing.fd
        self.map: mmap.mmap | None = None
        self.mapv: memoryview | None = None
        self.map_len = 0
        if map_length > 0:
            try:
                self.map = mmap.mmap(self.fd, map_length, prot=mmap.PROT_READ)
            except (OSError, ValueError, OverflowError):
                pass  # e.g. no address space for it: pread does the job
            else:
                self.mapv = memoryview(self.map)
                self.map_len = map_length
        #: the disk offset up to which the COW data is mapped
        self.mapped_end = max(0, self.map_len - self.data_offset)

    def close(self) -> None:
        """Unmap the COW file (the files are the image's to close)."""
        if self.mapv is not None:
            self.mapv.release()
            self.mapv = None
        if self.map is not None:
            self.map.close()
            self.map = None
        self.mapped_end = 0

    def plan(self, offset: int, end: int) -> int | Plan:
        """The plan of disk bytes [offset, end), from the bitmap's bytes (cached)."""
        first = offset >> PAGE_SHIFT
        last = min((end + PAGE_SIZE - 1) >> PAGE_SHIFT, self.top)
        if first < last:
            pages, base = self.bitmap.page_bytes(first, last)
            return plan(pages, base, self.nbits, offset, end, self.mapped_end)
        return plan(b"", first, self.nbits, offset, end, self.mapped_end)

    def pread(self, offset: int, n: int) -> bytes:
        """The ``n`` bytes of the disk at ``offset`` (inside the disk): one system call, or one copy from the
        mapped file, when one file holds them."""
        end = offset + n
        last = (end + PAGE_SIZE - 1) >> PAGE_SHIFT
        if last <= self.whole:  # the common case, without a call to fetch the bytes
            pages, base = self.bitmap.page_bytes(offset >> PAGE_SHIFT, last)
            todo = plan(pages, base, self.nbits, offset, end, self.mapped_end)
        else:
            todo = self.plan(offset, end)
        if isinstance(todo, int):
            if todo == BACKING:
                fd, at = self.bfd, offset
            else:
                fd, at = self.fd, self.data_offset + offset
                if end <= self.mapped_end and self.map is not None:
                    return self.map[at : at + n]
            try:
                data = os.pread(fd, n, at)
            except OSError:
                data = b""  # the careful path below reports it, naming the file and the offset
            if len(data) == n:
                return data
        buf = bytearray(n)
        self.fill(memoryview(buf), offset, todo)
        return bytes(buf)

    def fill(self, view: memoryview, offset: int, todo: int | Plan | None = None) -> None:
        """Fill ``view`` with the disk's bytes at ``offset`` (inside the disk) by their plan."""
        if todo is None:
            end = offset + len(view)
            last = (end + PAGE_SIZE - 1) >> PAGE_SHIFT
            if last <= self.whole:  # the common case, without a call to fetch the bytes
                pages, base = self.bitmap.page_bytes(offset >> PAGE_SHIFT, last)
                todo = plan(pages, base, self.nbits, offset, end, self.mapped_end)
            else:
                todo = self.plan(offset, end)
        if isinstance(todo, int):
            if todo == COW:
                self.read_cow(view, offset)
            else:
                self.read_backing(view, offset)
            return
        if todo.under:
            self.read_backing(view, offset)
            if todo.sectors is not None:
                self._overlay(view, offset, todo.sectors)
                return
            mapv, base = self.mapv, self.data_offset
            if mapv is not None and offset + len(view) <= self.mapped_end:
                # the hot loop of sequential reads: a slice copy per short COW run, no system call
                for start, stop, _ in todo.steps:
                    if stop - start < MAP_COPY_MAX:
                        view[start - offset : stop - offset] = mapv[base + start : base + stop]
                    else:
                        self.cow.read_data(view[start - offset : stop - offset], start)
                return
        for start, stop, source in todo.steps:
            if source == COW:
                self.read_cow(view[start - offset : stop - offset], start)
            else:
                self.read_backing(view[start - offset : stop - offset], start)

    def _overlay(self, view: memoryview, offset: int, sectors: np.ndarray) -> None:
        """Copy the COW sectors ``sectors`` (indexes from ``offset``'s) over ``view`` from the mapped file."""
        if sectors.size and self.map is not None:
            n = len(view)
            dst = np.frombuffer(view, dtype=np.uint8, count=n).reshape(-1, SECTOR_SIZE)
            src = np.frombuffer(self.map, dtype=np.uint8, count=n, offset=self.data_offset + offset)
            dst[sectors] = src.reshape(-1, SECTOR_SIZE)[sectors]

    def read_cow(self, chunk: memoryview, pos: int) -> None:
        """COW data for disk offset ``pos``: from the mapped file when short and inside it, else read."""
        at = self.data_offset + pos
        if self.mapv is not None and len(chunk) < MAP_COPY_MAX and at + len(chunk) <= self.map_len:
            chunk[:] = self.mapv[at : at + len(chunk)]
            return
        self.cow.read_data(chunk, pos)

    def read_backing(self, chunk: memoryview, pos: int) -> None:
        """The backing file's bytes at ``pos``: zeros past its end (a smaller backing file, accepted with
        ``check_backing=False``); a backing file that shrank since it was opened is an error."""
        backing = self.backing
        try:
            got = pread_into(backing.fd, chunk, pos)
        except OSError as exc:
            raise io_error(backing.path, exc, f"read error at offset {pos}") from None
        if got < len(chunk):
            if pos + got < backing.size:
                now = os.fstat(backing.fd).st_size
                raise ImageIOError(
                    backing.path,
                    f"short read at offset {pos + got}: the backing file is now {now} bytes but was "
                    f"{backing.size} when opened (it changed while in use)",
                    errno=errno.EIO,
                )
            chunk[got:] = bytes(len(chunk) - got)

"""``compact``: give a COW file's space back in place, without changing what the virtual disk reads.

Page by page (4 KiB, 8 sectors), under the write lock, with the backing file
the header records (size and mtime must match):

* a page whose bits are all set and whose data equals the backing file's:
  its bits are cleared, the bitmap is made durable (fsync), and only then is
  its data punched ("returned to the backing file");
* a set page whose data is all zeros (and differs from the backing file):
  its data is punched, the bits stay set, so it reads as zeros (as after a
  guest's discard);
* data under the clear pages after the last page that keeps set bits (dead
  data: nothing reads it): punched. Clear pages before it are not looked at
  (that would cost a look-up per data extent of the file).

Bytes past the end of the data area (``data_offset`` + the disk's sectors)
are cut off; the file never becomes shorter than that. Mixed pages are left
alone (``check --repair`` makes them whole), and no page is made mixed. Only
the set pages and the matching backing pages are read, a window at a time.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._io import Segments, pread_into, punch_hole, read_at
from ._result import Result
from .backing import attach_backing
from .bitmap import popcount
from .cowfile import CowFile
from .errors import ImageIOError, UnrecordableWriteError, io_error
from .format import PAGE_SECTORS, PAGE_SIZE, SECTOR_SIZE

__all__ = ["CompactResult", "compact"]

#: pages of the disk looked at per step (8 MiB)
_WINDOW_PAGES = 2048
#: returned pages whose bits are cleared before one fsync and the punches that follow it
_BATCH = 32768
#: pending punched ranges that force a commit (bounds the memory of a fragmented file)
_MAX_SPANS = 65536


@dataclass(frozen=True)
class CompactResult(Result):
    """What ``compact`` did (or, with ``dry_run``, would do) to one COW file.

    Allocated sizes are ``st_blocks`` bytes; after a dry run
    ``allocated_after`` is an estimate (the pages to punch that hold data).
    """

    file: str
    dry_run: bool
    allocated_before: int
    allocated_after: int
    reclaimed_bytes: int
    apparent_before: int
    apparent_after: int
    #: set pages equal to the backing file's: bits cleared, data punched
    pages_returned: int
    #: set pages of zeros whose data was punched (bits kept)
    pages_punched: int
    #: clear pages after the last page that keeps set bits, with data under them (dead data), punched
    dead_pages: int
    #: bytes cut off past the end of the data area
    truncated_bytes: int
    #: mixed pages, left alone (see ``check --repair``)
    mixed_pages: int
    seconds: float


@dataclass
class _Plan:
    """Work found but not yet committed: bit spans to clear, then byte ranges (of the file) to punch."""

    clear: list[tuple[int, int]] = field(default_factory=list)
    punch: list[tuple[int, int]] = field(default_factory=list)
    cleared_pages: int = 0

    def add_punch(self, a: int, b: int) -> None:
        if self.punch and self.punch[-1][1] == a:
            self.punch[-1] = (self.punch[-1][0], b)
        else:
            self.punch.append((a, b))


@dataclass
class _Counts:
    returned: int = 0
    punched: int = 0
    dead: int = 0
    mixed: int = 0
    freed: int = 0  # allocated bytes planned for punching (the dry run's estimate)


def _spans(mask: np.ndarray, base: int) -> list[tuple[int, int]]:
    """Runs ``[a, b)`` (page numbers, offset by ``base``) where ``mask`` is True."""
    if not mask.any():
        return []
    edges = np.flatnonzero(np.diff(np.concatenate(([False], mask, [False])).astype(np.int8)))
    return list(zip((edges[::2] + base).tolist(), (edges[1::2] + base).tolist(), strict=True))


def _refuse_stray_bits(cow: CowFile) -> None:
    """v1/v2 files whose bitless sectors (the rounding bug) have bits written past the bitmap: refuse."""
    h = cow.header
    mapped = h.mapped_sectors
    if mapped >= h.sectors:
        return
    need = (h.sectors + 7) // 8 - h.bitmap_len
    buf = bytearray(need)
    pread_into(cow.fd, memoryview(buf), h.bitmap_offset + h.bitmap_len)
    stray = popcount(buf, mapped, mapped, h.sectors)
    if stray:
        raise UnrecordableWriteError(
            cow.name,
            f"sectors {mapped}-{h.sectors - 1} have no bit in this {h.layout} bitmap (the v1/v2 rounding bug), and "
            f"{stray} bits for them were written past it: compact cannot clear bits the bitmap does not have",
            hint=f"convert the file to v3 first: ubdcow convert {cow.name} -o NEW.cow",
        )


_ZERO_PAGE = bytes(PAGE_SIZE)


class _Compactor:
    """One pass over a COW file open for writing (or a dry run) with its backing file."""

    def __init__(self, cow: CowFile, bfd: int, backing_name: str, dry_run: bool) -> None:
        self.cow, self.bfd, self.backing_name, self.dry_run = cow, bfd, backing_name, dry_run
        h = cow.header
        self.base = h.data_offset
        self.size = h.size
        self.sectors = h.sectors
        self.pages = -(-h.sectors // PAGE_SECTORS)
        self.segments = Segments(cow.fd)
        self.plan = _Plan()
        self.counts = _Counts()
        self.last_kept = -1  # the last page that keeps set bits so far
        self.tail_returned: list[tuple[int, int]] = []  # returned page spans after it
        self._cbuf, self._bbuf = bytearray(), bytearray()

    # -- looking ---------------------------------------------------------------
    def _classify(self, spans: list[tuple[int, int]], lo: int, returned: np.ndarray, zero: np.ndarray) -> None:
        """Mark the pages of ``spans`` (all bits set) equal to the backing file's in ``returned``, and the
        other pages of zeros in ``zero`` (both indexed from page ``lo``).

        One ``pread`` per span and file, compared as bytes (a memcmp that stops at the first difference:
        no copy, no array); a short read (the end of the disk or of the COW file) or an error takes the
        careful path (:meth:`_read_pages_into`).
        """
        cfd, bfd, base, pread = self.cow.fd, self.bfd, self.base, os.pread
        for a, b in spans:
            n = (b - a) * PAGE_SIZE
            try:
                c = pread(cfd, n, base + a * PAGE_SIZE)
                k = pread(bfd, n, a * PAGE_SIZE)
            except OSError:
                c = k = b""
            if len(c) != n or len(k) != n:
                cw, kw = self._read_pages_into([(a, b)], b - a)
                equal = (cw == kw).all(axis=1)
                returned[a - lo : b - lo] = equal
                zero[a - lo : b - lo] = ~equal & ~cw.any(axis=1)
            elif c == k:
                returned[a - lo : b - lo] = True
            elif b - a == 1:
                zero[a - lo] = c == _ZERO_PAGE
            else:
                for i in range(b - a):
                    page = c[i * PAGE_SIZE : (i + 1) * PAGE_SIZE]
                    if page == k[i * PAGE_SIZE : (i + 1) * PAGE_SIZE]:
                        returned[a - lo + i] = True
                    elif page == _ZERO_PAGE:
                        zero[a - lo + i] = True

    def _read_pages_into(self, spans: list[tuple[int, int]], count: int) -> tuple[np.ndarray, np.ndarray]:
        """The pages of ``spans`` from the COW file and from the backing file, as rows of 64-bit words.

        Only the disk's defined bytes [0, size) are read (the rest of a last page is zeros, and so is COW
        data past the end of the file), and errors name the file."""
        need = count * PAGE_SIZE
        if len(self._cbuf) < need:
            self._cbuf, self._bbuf = bytearray(need), bytearray(need)
        cv, bv = memoryview(self._cbuf), memoryview(self._bbuf)
        cfd, bfd, base, last = self.cow.fd, self.bfd, self.base, self.pages
        preadv = os.preadv
        pos = 0
        for a, b in spans:
            start = a * PAGE_SIZE
            n = (b - a) * PAGE_SIZE
            end = pos + n
            if b == last:  # the disk's last page may be partial
                n = self.size - start
                cv[pos + n : end] = bytes(end - pos - n)
                bv[pos + n : end] = bytes(end - pos - n)
            c, k = cv[pos : pos + n], bv[pos : pos + n]
            try:  # the common case in two system calls; short reads and errors below
                done = preadv(cfd, [c], base + start) == n and preadv(bfd, [k], start) == n
            except OSError:
                done = False
            if not done:
                self.cow.read_data(c, start)
                if read_at(bfd, k, start, self.backing_name) < n:
                    raise ImageIOError(
                        self.backing_name, f"short read at offset {start}: the backing file changed while in use"
                    )
            pos = end
        shape = (count, PAGE_SIZE // 8)
        words = np.dtype(np.uint64)
        cow = np.frombuffer(self._cbuf, dtype=words, count=count * PAGE_SIZE // 8).reshape(shape)
        back = np.frombuffer(self._bbuf, dtype=words, count=count * PAGE_SIZE // 8).reshape(shape)
        return cow, back

    def _blocks(self, a: int, b: int) -> tuple[int, int]:
        """The file blocks wholly inside the data of pages [a, b): in a 4 KiB-aligned data area (v3), the
        pages' own; in a 512-aligned one (v1/v2), not the blocks shared with the pages around."""
        start = -(-(self.base + a * PAGE_SIZE) // PAGE_SIZE) * PAGE_SIZE
        return start, max(start, (self.base + b * PAGE_SIZE) // PAGE_SIZE * PAGE_SIZE)

    def _data(self, a: int, b: int) -> Iterator[tuple[int, int]]:
        """Data ranges of the file (SEEK_DATA, no reads) in the blocks of pages [a, b)."""
        start, stop = self._blocks(a, b)
        for x, y, is_data in self.segments(start, stop):
            if is_data:
                yield x, y

    def _pages_of(self, x: int, y: int) -> tuple[int, int]:
        return (x - self.base) // PAGE_SIZE, -(-(y - self.base) // PAGE_SIZE)

    def window(self, lo: int, hi: int) -> None:
        """Classify pages [lo, hi) and add their work to the plan."""
        s_lo, s_hi = lo * PAGE_SECTORS, min(hi * PAGE_SECTORS, self.sectors)
        padded = np.zeros((hi - lo) * PAGE_SECTORS, dtype=bool)
        padded[: s_hi - s_lo] = self.cow.bitmap.bits(s_lo, s_hi)
        set_count = padded.reshape(-1, PAGE_SECTORS).sum(axis=1)
        in_page = np.full(hi - lo, PAGE_SECTORS)
        in_page[-1] = s_hi - (hi - 1) * PAGE_SECTORS
        full = set_count == in_page
        empty = set_count == 0
        returned = np.zeros(hi - lo, dtype=bool)
        zero = np.zeros(hi - lo, dtype=bool)
        if full.any():
            self._classify(_spans(full, lo), lo, returned, zero)
        c = self.counts
        c.mixed += int((~full & ~empty).sum())
        c.returned += int(returned.sum())
        for a, b in _spans(returned, lo):
            if self.dry_run:
                c.freed += sum(y - x for x, y in self._data(a, b))
            else:  # bits first: cleared and made durable (commit) before the punch of the same plan
                self.plan.clear.append((a * PAGE_SECTORS, min(b * PAGE_SECTORS, self.sectors)))
                self.plan.cleared_pages += b - a
                start, stop = self._blocks(a, b)
                if start < stop:
                    self.plan.add_punch(start, stop)
            self.tail_returned.append((a, b))
        for a, b in _spans(zero, lo):  # punched where they hold data; a page of zeros over a hole is done
            hit = np.zeros(b - a, dtype=bool)
            for x, y in self._data(a, b):
                c.freed += y - x
                self.plan.add_punch(x, y)
                p, q = self._pages_of(x, y)
                hit[max(p, a) - a : min(q, b) - a] = True
            c.punched += int(hit.sum())
        kept = np.flatnonzero(~empty & ~returned)
        if kept.size:
            self.last_kept = lo + int(kept[-1])
            self.tail_returned = [(a, b) for a, b in self.tail_returned if a > self.last_kept]
        if self.dry_run:
            self.plan = _Plan()
        elif self.plan.cleared_pages >= _BATCH or len(self.plan.punch) >= _MAX_SPANS:
            _commit(self)

    def tail(self) -> None:
        """Plan the punch of data under the clear pages after the last page that keeps set bits."""
        first = self.last_kept + 1
        if first >= self.pages:
            return
        hit = np.zeros(self.pages - first, dtype=bool)
        gone = np.zeros(self.pages - first, dtype=bool)  # returned pages: counted (and punched) already
        for a, b in self.tail_returned:
            gone[a - first : b - first] = True
        for x, y in self._data(first, self.pages):
            p, q = self._pages_of(x, y)
            hit[p - first : q - first] = True
            if not self.dry_run:
                self.plan.add_punch(x, y)
            else:
                returned = sum(
                    max(0, min(y, self.base + b * PAGE_SIZE) - max(x, self.base + a * PAGE_SIZE))
                    for a, b in self.tail_returned
                )
                self.counts.freed += y - x - returned
        self.counts.dead += int((hit & ~gone).sum())

    # -- changing --------------------------------------------------------------
    def commit(self) -> None:
        """Clear the planned bits, make them durable, then punch the planned ranges."""
        plan, fd = self.plan, self.cow.fd
        try:
            if plan.clear:
                for lo, hi in plan.clear:
                    self.cow.bitmap.clear_range(lo, hi)
                os.fsync(fd)  # the bits are clear on disk before any of their data goes
            for a, b in plan.punch:
                if not punch_hole(fd, a, b - a):
                    break  # this filesystem cannot punch holes: nothing to give back
        except OSError as exc:
            raise io_error(self.cow.name, exc, "cannot compact") from None
        self.plan = _Plan()

    def cut_tail(self) -> int:
        """Cut bytes past the end of the data area; the bytes cut (or that would be)."""
        data_end = self.base + self.sectors * SECTOR_SIZE
        length = os.fstat(self.cow.fd).st_size
        if length <= data_end:
            return 0
        if not self.dry_run:
            try:
                os.ftruncate(self.cow.fd, data_end)
                os.fsync(self.cow.fd)
            except OSError as exc:
                raise io_error(self.cow.name, exc, "cannot truncate") from None
        return length - data_end

    def tail_allocated(self) -> int:
        """Allocated bytes past the data area's last page (what cutting the tail frees)."""
        end = self.base + self.pages * PAGE_SIZE
        length = os.fstat(self.cow.fd).st_size
        # data ends in a whole block, even where the file ends inside one
        return sum(
            -(-b // PAGE_SIZE) * PAGE_SIZE - a for a, b, is_data in Segments(self.cow.fd)(end, length) if is_data
        )


def _commit(job: _Compactor) -> None:
    """One commit of a job's plan (a module function, so tests can watch the commits)."""
    job.commit()


def compact(
    cow_path: str | os.PathLike[str],
    *,
    backing: str | os.PathLike[str] | None = None,
    dry_run: bool = False,
    lock: bool = True,
    progress: Callable[[int], Any] | None = None,
) -> CompactResult:
    """Give back the space of pages that read the same without their data, in place (see the module).

    Takes the write lock (a read lock for ``dry_run``) and needs the backing
    file the header records, with matching size and mtime (or ``backing``).
    Raises :class:`~ubdcow.ImageLockedError` (a running guest),
    :class:`~ubdcow.BackingFileError` / :class:`~ubdcow.BackingMismatchError`,
    and :class:`~ubdcow.UnrecordableWriteError` for a v1/v2 file with bits
    written past its bitmap; nothing is changed then.
    """
    t0 = time.monotonic()
    name = os.fspath(cow_path)
    with CowFile(name, writable=not dry_run, lock=lock) as cow:
        with attach_backing(cow.header, name, cow.stat, backing, lock=lock) as found:
            _refuse_stray_bits(cow)
            return _run(cow, found.fd, found.path, dry_run, progress, t0)


def _run(
    cow: CowFile, bfd: int, backing_name: str, dry_run: bool, progress: Callable[[int], Any] | None, t0: float
) -> CompactResult:
    try:
        # written back first: blocks still in the page cache (delayed allocation) count without the extent
        # blocks the filesystem adds when it writes them
        os.fsync(cow.fd)
    except OSError as exc:
        raise io_error(cow.name, exc, "cannot flush") from None
    st = os.fstat(cow.fd)
    allocated_before, apparent_before = st.st_blocks * 512, st.st_size
    job = _Compactor(cow, bfd, backing_name, dry_run)
    for lo in range(0, job.pages, _WINDOW_PAGES):
        hi = min(lo + _WINDOW_PAGES, job.pages)
        job.window(lo, hi)
        if progress is not None:
            progress(min(hi * PAGE_SIZE, job.size) - lo * PAGE_SIZE)
    job.tail()
    tail = job.tail_allocated()
    if not dry_run:
        _commit(job)
    truncated = job.cut_tail()
    c = job.counts
    if dry_run:
        allocated_after = max(0, allocated_before - c.freed - tail)
        apparent_after = apparent_before - truncated
    else:
        st = os.fstat(cow.fd)
        allocated_after, apparent_after = st.st_blocks * 512, st.st_size
    return CompactResult(
        file=cow.name,
        dry_run=dry_run,
        allocated_before=allocated_before,
        allocated_after=allocated_after,
        reclaimed_bytes=allocated_before - allocated_after,
        apparent_before=apparent_before,
        apparent_after=apparent_after,
        pages_returned=c.returned,
        pages_punched=c.punched,
        dead_pages=c.dead,
        truncated_bytes=truncated,
        mixed_pages=c.mixed,
        seconds=time.monotonic() - t0,
    )

"""The virtual disk of a COW file as a file object, with the ubd driver's semantics.

Reads split at bitmap run boundaries: set bits read the COW data area, clear
bits read the backing file. Writes (the page-granular write path is in
:mod:`ubdcow._pagewrite`) extend to whole 4 KiB pages of the virtual disk,
filled from the current content, write the data, and only then set the bits.
The backing file is only ever opened ``O_RDONLY``.
"""

from __future__ import annotations

import errno
import io
import mmap
import os
import re
import threading
from collections.abc import Iterator

import numpy as np

from ._io import pread_into
from ._pagewrite import _PageWriter
from .backing import attach_backing
from .cowfile import CowFile, Extent, Run
from .errors import ImageIOError, io_error
from .format import SECTOR_SHIFT as _SHIFT
from .format import SECTOR_SIZE, CowHeader

__all__ = ["CowFile", "CowImage", "Extent", "Run", "open"]

# reads of whole sectors between these sizes may take the numpy overlay path (bitmaps with mixed pages)
_OVERLAY_MIN = 64 << 10
_OVERLAY_MAX = 16 << 20
# requests up to this size first try to find a single source (larger ones rarely have one)
_ONE_SOURCE_MAX = 64 << 10
# COW runs shorter than this are copied from the mapping (no system call); longer ones are read with
# preadv, which lets other threads run while the kernel copies
_MAP_COPY_MAX = 64 << 10
_PAGE_SHIFT = 12
_PAGE = 1 << _PAGE_SHIFT
# A bitmap byte holds the 8 bits of a 4 KiB page: 0x00 all backing, 0xFF all COW (every writer keeps pages
# whole), anything else a mixed page.
_COW_PAGES = re.compile(rb"[^\x00]+")
_span = re.Match.span


class SharedLock:
    """A readers-writer lock: reads share it; writes, flush and close take it alone.

    Used as a context manager it is the exclusive side (what the write path's
    ``with self._mutex:`` takes); :meth:`acquire_shared`/:meth:`release_shared`
    are the readers' side. A writer closes the gate to new readers, then
    waits for the readers inside to leave, so writers are not starved. The
    readers inside are counted in a list (``append`` and ``pop`` are atomic),
    so a read costs one uncontended lock round trip.
    """

    def __init__(self) -> None:
        self._gate = threading.Lock()
        self._readers: list[None] = []
        self._drained = threading.Condition(threading.Lock())
        self._writer_waiting = False

    def acquire_shared(self) -> None:
        """Enter as a reader (waits while a writer holds the lock or waits for it)."""
        with self._gate:
            self._readers.append(None)

    def release_shared(self) -> None:
        """Leave as a reader."""
        self._readers.pop()
        if self._writer_waiting and not self._readers:
            with self._drained:
                self._drained.notify_all()

    def acquire(self) -> None:
        """Take the lock alone: no new reader gets in, then wait for the readers inside to leave."""
        self._gate.acquire()
        if not self._readers:
            return
        try:
            with self._drained:
                self._writer_waiting = True
                try:
                    while self._readers:
                        self._drained.wait()
                finally:
                    self._writer_waiting = False
        except BaseException:
            self._gate.release()
            raise

    def release(self) -> None:
        """Give up the exclusive side."""
        self._gate.release()

    def __enter__(self) -> SharedLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class CowImage(_PageWriter, io.RawIOBase):
    """The virtual disk of a COW file: a seekable, readable (and in "r+" writable) raw file.

    Create it with :func:`ubdcow.open`. Positional calls (:meth:`pread`,
    :meth:`pwrite`, :meth:`discard`, :meth:`write_zeroes`) leave the position alone.
    """

    header: CowHeader
    size: int
    name: str
    mode: str
    backing_name: str

    def __init__(
        self,
        cow_path: str | os.PathLike[str],
        mode: str = "r",
        *,
        backing: str | os.PathLike[str] | None = None,
        check_backing: bool = True,
        lock: bool = True,
    ) -> None:
        super().__init__()
        if mode not in ("r", "r+"):
            raise ValueError(f"mode must be 'r' or 'r+', not {mode!r}")
        self.name = os.fspath(cow_path)
        self.mode = mode
        self._fd = -1
        self._bfd = -1
        self._pos = 0
        self._dirty = False
        self._lock = SharedLock()
        # the write path (_pagewrite) takes ``with self._mutex:``: the exclusive side of the same lock
        self._mutex = self._lock
        writable = mode == "r+"
        try:
            self._open(writable, backing, check_backing, lock)
        except BaseException:
            self._close_fds()
            raise

    def _open(self, writable: bool, backing: str | os.PathLike[str] | None, check_backing: bool, lock: bool) -> None:
        self._cow = cow = CowFile(self.name, writable=writable, lock=lock)
        self._fd = cow.fd
        self.header = header = cow.header
        self.size = header.size
        self._data_offset = header.data_offset
        self._bitmap = cow.bitmap
        # pages whose 8 bits are all honoured: reads inside them may look at whole bitmap bytes
        self._whole_pages = cow.bitmap.nbits >> 3
        found = attach_backing(header, self.name, cow.stat, backing, check=check_backing, lock=lock and writable)
        self._bfd, self.backing_name, self._backing_size = found.fd, found.path, found.size
        self._map_cow(cow.length if lock else 0)

    def _map_cow(self, length: int) -> None:
        """Map the COW file read-only, so that many small COW runs in a read cost no system calls.

        Only while we hold its lock: a page of a mapping that someone truncates
        away faults (SIGBUS), and the lock is what keeps writers out. Reads past
        the mapped length (the file grew) use pread.
        """
        self._map: mmap.mmap | None = None
        self._mapv: memoryview | None = None
        self._map_len = 0
        if length <= 0:
            return
        try:
            self._map = mmap.mmap(self._fd, length, prot=mmap.PROT_READ)
        except (OSError, ValueError, OverflowError):
            return  # e.g. no address space for it: pread does the job
        self._mapv = memoryview(self._map)
        self._map_len = length

    # -- io.RawIOBase ------------------------------------------------------
    def readable(self) -> bool:
        self._checkClosed()
        return True

    def writable(self) -> bool:
        self._checkClosed()
        return self.mode == "r+"

    def seekable(self) -> bool:
        self._checkClosed()
        return True

    def tell(self) -> int:
        self._checkClosed()
        return self._pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        self._checkClosed()
        if whence == os.SEEK_SET:
            pos = offset
        elif whence == os.SEEK_CUR:
            pos = self._pos + offset
        elif whence == os.SEEK_END:
            pos = self.size + offset
        else:
            raise ValueError(f"invalid whence ({whence})")
        if pos < 0:
            raise ValueError(f"negative seek position {pos}")
        self._pos = pos
        return pos

    def readinto(self, buffer: memoryview | bytearray) -> int:  # type: ignore[override]
        self._checkClosed()
        n = self._readinto_at(memoryview(buffer).cast("B"), self._pos)
        self._pos += n
        return n

    def readall(self) -> bytes:
        pos = self.tell()
        data = self.pread(max(0, self.size - pos), pos)
        self._pos = pos + len(data)
        return data

    def write(self, data: bytes | bytearray | memoryview) -> int:  # type: ignore[override]
        self._check_writable()
        n = self.pwrite(data, self._pos)
        self._pos += n
        return n

    def truncate(self, size: int | None = None) -> int:
        raise io.UnsupportedOperation("the virtual disk of a COW file has a fixed size")

    def flush(self) -> None:
        """fsync the COW file if anything was written since the last flush."""
        super().flush()
        if self._dirty and self._fd >= 0:  # closed already (close() cut short by a signal): nothing to sync
            with self._mutex:
                try:
                    os.fsync(self._fd)
                except OSError as exc:
                    raise io_error(self.name, exc, "cannot flush") from None
                self._dirty = False

    def close(self) -> None:
        if self.closed:
            return
        try:
            if self._fd >= 0:
                self.flush()
        finally:
            with self._mutex:  # wait for reads in flight: they use the mapping and the descriptors
                self._close_fds()
            super().close()

    def _close_fds(self) -> None:
        if getattr(self, "_mapv", None) is not None:
            self._mapv.release()  # type: ignore[union-attr]
            self._mapv = None
        if getattr(self, "_map", None) is not None:
            self._map.close()  # type: ignore[union-attr]
            self._map = None
        cow = getattr(self, "_cow", None)
        if cow is not None:
            cow.close()  # closing the description drops its OFD lock
        self._fd = -1
        if self._bfd >= 0:
            os.close(self._bfd)
            self._bfd = -1

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"size={getattr(self, 'size', '?')}"
        return f"<CowImage {self.name!r} mode={self.mode!r} {state}>"

    # -- positional I/O ----------------------------------------------------
    def pread(self, length: int, offset: int) -> bytes:
        """Read up to ``length`` bytes at ``offset`` (short at the end of the disk)."""
        self._checkClosed()
        if length < 0 or offset < 0:
            raise ValueError("length and offset must be >= 0")
        n = min(length, self.size - offset)
        if n <= 0:
            return b""
        lock = self._lock
        lock.acquire_shared()
        try:
            self._check_open()
            if n <= _ONE_SOURCE_MAX:
                data = self._read_one_source(offset, n)
                if data is not None:  # the common case: one system call (or one copy from the map)
                    return data
            buf = bytearray(n)
            self._fill(memoryview(buf), offset)
        finally:
            lock.release_shared()
        return bytes(buf)

    def preadinto(self, buffer: memoryview | bytearray, offset: int) -> int:
        """Fill ``buffer`` from ``offset``; returns the bytes read (short at the end of the disk)."""
        self._checkClosed()
        return self._readinto_at(memoryview(buffer).cast("B"), offset)

    def backing_preadinto(self, buffer: memoryview | bytearray, offset: int) -> None:
        """Fill ``buffer`` from the backing file at ``offset``, whatever the bitmap says (zeros past its end)."""
        self._checkClosed()
        lock = self._lock
        lock.acquire_shared()
        try:
            self._check_open()
            self._read_backing(memoryview(buffer).cast("B"), offset)
        finally:
            lock.release_shared()

    # -- maps ----------------------------------------------------------------
    def extents(self, offset: int = 0, length: int | None = None) -> Iterator[tuple[int, int, str]]:
        """Coalesced runs ``(start, length, source)`` of [offset, offset+length), source "cow" or "backing"."""
        self._checkClosed()
        return self._cow.extents(offset, length)

    def mapping(self, offset: int = 0, length: int | None = None) -> Iterator[Extent]:
        """Like :meth:`extents`, but cow runs over holes in the data area are split off as "zero"."""
        self._checkClosed()
        return self._cow.mapping(offset, length)

    def runs(self, offset: int = 0, length: int | None = None, *, holes: bool = False) -> Iterator[Run]:
        """The map of [offset, offset+length) as coalesced :class:`~ubdcow.cowfile.Run` records ``(start,
        length, source, fd, offset)``: by the bits ("cow", "backing"), and with ``holes`` the holes of the data
        area under set bits and of the backing file under clear bits as "zero" (past either file's end too)."""
        self._checkClosed()
        return self._cow.runs(offset, length, backing_fd=self._bfd, holes=holes)

    def source_runs(self, offset: int = 0, length: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """What :meth:`mapping` says, with the backing file's holes too, as arrays for large ranges.

        Returns ``(starts, ends, sources)`` of pieces covering [offset, offset+length) in order (not
        coalesced), ``sources`` 0 for backing data, 1 for COW data, 2 for zeros: clear bits over a hole
        or past the end of the backing file, or set bits over a hole in the data area. One call covers
        at most 4 GiB (one bitmap window); ask again from where it ends for the rest.
        """
        self._checkClosed()
        lock = self._lock
        lock.acquire_shared()
        try:
            self._check_open()
            return self._cow.run_arrays(offset, length, backing_fd=self._bfd, holes=True)
        finally:
            lock.release_shared()

    def count_cow_sectors(self) -> int:
        """Sectors whose bit is set (and honoured)."""
        self._checkClosed()
        return self._bitmap.count()

    @property
    def fds(self) -> tuple[int, int]:
        """``(cow_fd, backing_fd)``, for tools that copy ranges themselves (merge)."""
        self._checkClosed()
        return self._fd, self._bfd

    @property
    def backing_size(self) -> int:
        """The backing file's size when it was opened."""
        return self._backing_size

    # -- internals -----------------------------------------------------------
    def _check_open(self) -> None:
        """Refuse a read that got the lock after :meth:`close` (which closes under the exclusive lock)."""
        if self._fd < 0:
            raise ValueError("I/O operation on closed file.")

    def _readinto_at(self, view: memoryview, offset: int) -> int:
        n = min(len(view), self.size - offset)
        if n <= 0:
            return 0
        if n < len(view):
            view = view[:n]
        lock = self._lock
        lock.acquire_shared()
        try:
            self._check_open()
            self._fill(view, offset)
        finally:
            lock.release_shared()
        return n

    def _fill(self, view: memoryview, offset: int, *, one_source_tried: bool = False) -> None:
        """Fill ``view`` with the disk's content at ``offset`` (inside the disk; caller holds the lock).

        Requests inside whole-page bitmap bytes (every bitmap a writer keeps
        whole) are planned from those bytes with C-speed scans; mixed pages
        take the sector-level path.
        """
        end = offset + len(view)
        first = offset >> _PAGE_SHIFT
        last = (end + _PAGE - 1) >> _PAGE_SHIFT
        if last <= self._whole_pages:
            pages, base = self._bitmap.page_bytes(first, last)
            a, b = first - base, last - base
            cow = pages.count(0xFF, a, b)
            if cow + pages.count(0, a, b) == b - a:  # no mixed page
                self._fill_pages(view, offset, end, pages, a, b, base, cow)
                return
        self._fill_sectors(view, offset, one_source_tried)

    def _fill_pages(
        self, view: memoryview, offset: int, end: int, pages: bytearray, a: int, b: int, base: int, cow: int
    ) -> None:
        """:meth:`_fill` where the bitmap bytes ``pages[a:b]`` (page ``a + base`` first) are all 0x00 or 0xFF,
        ``cow`` of them 0xFF."""
        total = b - a
        if cow == 0:
            self._read_backing(view, offset)
            return
        if cow == total:
            self._read_cow(view, offset)
            return
        base <<= _PAGE_SHIFT
        if 2 * cow <= total:
            # mostly backing: the backing file in one read, then the COW runs copied over it
            self._read_backing(view, offset)
            mapv = self._mapv
            at = self._data_offset + offset
            if mapv is None or at + len(view) > self._map_len or (offset | end) & (_PAGE - 1):
                for s, e in map(_span, _COW_PAGES.finditer(pages, a, b)):
                    lo = max(offset, base + (s << _PAGE_SHIFT))
                    hi = min(end, base + (e << _PAGE_SHIFT))
                    self._read_cow(view[lo - offset : hi - offset], lo)
                return
            # the hot loop of sequential reads (whole pages, all mapped): a slice copy per run, no system call
            for s, e in map(_span, _COW_PAGES.finditer(pages, a, b)):
                lo = (s - a) << _PAGE_SHIFT
                hi = (e - a) << _PAGE_SHIFT
                if hi - lo < _MAP_COPY_MAX:
                    view[lo:hi] = mapv[at + lo : at + hi]
                else:
                    self._read_cow(view[lo:hi], offset + lo)
            return
        # mostly COW: each run from its file
        pos = offset
        for s, e in map(_span, _COW_PAGES.finditer(pages, a, b)):
            lo = max(offset, base + (s << _PAGE_SHIFT))
            hi = min(end, base + (e << _PAGE_SHIFT))
            if pos < lo:
                self._read_backing(view[pos - offset : lo - offset], pos)
            self._read_cow(view[lo - offset : hi - offset], lo)
            pos = hi
        if pos < end:
            self._read_backing(view[pos - offset :], pos)

    def _fill_sectors(self, view: memoryview, offset: int, one_source_tried: bool) -> None:
        """:meth:`_fill` from the bits of each sector (bitmaps with mixed pages, the end of a v1/v2 bitmap)."""
        n = len(view)
        end = offset + n
        if n >= _OVERLAY_MIN and not (offset | n) & (SECTOR_SIZE - 1) and self._overlay(view, offset, n):
            return
        source = None if one_source_tried else self._one_source(offset, n)
        if source is not None:  # the whole request from one file, in one system call
            try:
                if os.preadv(source[0], [view], source[1]) == n:
                    return
            except OSError:
                pass  # the run loop below reports it, naming the file and offset
        runs = self._bitmap.runs_list(offset >> _SHIFT, (end + SECTOR_SIZE - 1) >> _SHIFT)
        cow_bytes = sum(count for _, count, is_set in runs if is_set) << _SHIFT
        if len(runs) > 2 and 2 * cow_bytes < n:
            # mostly backing, in many runs: one read of the backing, then the COW runs over it
            self._read_backing(view, offset)
            runs = [run for run in runs if run[2]]
        for sector, count, is_set in runs:
            start = max(offset, sector << _SHIFT)
            stop = min(end, (sector + count) << _SHIFT)
            chunk = view[start - offset : stop - offset]
            if is_set:
                self._read_cow(chunk, start)
            else:
                self._read_backing(chunk, start)

    def _read_one_source(self, offset: int, n: int) -> bytes | None:
        """The ``n`` bytes at ``offset`` when they lie in one run and read whole, else None (caller holds the lock)."""
        first = offset >> _PAGE_SHIFT
        last = (offset + n + _PAGE - 1) >> _PAGE_SHIFT
        if last <= self._whole_pages:
            pages, base = self._bitmap.page_bytes(first, last)
            a, b = first - base, last - base
            if b - a == 1:
                kind = pages[a]  # 0x00, 0xFF or a mixed page
            else:
                kind = 0 if pages.count(0, a, b) == b - a else 0xFF if pages.count(0xFF, a, b) == b - a else 1
            if kind == 0:
                fd, at = self._bfd, offset
            elif kind == 0xFF:
                fd, at = self._fd, self._data_offset + offset
                if self._map is not None and at + n <= self._map_len:
                    return self._map[at : at + n]
            else:
                return None
        else:
            source = self._one_source(offset, n)
            if source is None:
                return None
            fd, at = source
        try:
            data = os.pread(fd, n, at)
        except OSError:
            return None  # the general path reports it, naming the file and offset
        return data if len(data) == n else None

    def _one_source(self, offset: int, n: int) -> tuple[int, int] | None:
        """``(fd, file offset)`` when [offset, offset+n) lies in one run, else None (caller holds the lock)."""
        if n > _ONE_SOURCE_MAX:
            return None
        runs = self._bitmap.runs_list(offset >> _SHIFT, (offset + n + SECTOR_SIZE - 1) >> _SHIFT)
        if len(runs) != 1:
            return None
        return (self._fd, self._data_offset + offset) if runs[0][2] else (self._bfd, offset)

    def _overlay(self, view: memoryview, offset: int, n: int) -> bool:
        """Whole-sector read of a mostly-backing range: the backing in one read, then the COW sectors
        copied over it from the mapped COW file in one numpy operation (no system call per run).
        False if it does not apply."""
        at = self._data_offset + offset
        if self._map is None or at + n > self._map_len or n > _OVERLAY_MAX:
            return False
        dirty = np.flatnonzero(self._bitmap.bits(offset >> _SHIFT, (offset + n) >> _SHIFT))
        if 2 * dirty.size > n >> _SHIFT:
            return False
        self._read_backing(view[:n], offset)
        if dirty.size:
            dst = np.frombuffer(view, dtype=np.uint8, count=n).reshape(-1, SECTOR_SIZE)
            src = np.frombuffer(self._map, dtype=np.uint8, count=n, offset=at).reshape(-1, SECTOR_SIZE)
            dst[dirty] = src[dirty]
        return True

    def _read_cow(self, chunk: memoryview, pos: int) -> None:
        at = self._data_offset + pos
        if self._mapv is not None and len(chunk) < _MAP_COPY_MAX and at + len(chunk) <= self._map_len:
            chunk[:] = self._mapv[at : at + len(chunk)]
            return
        try:
            got = pread_into(self._fd, chunk, self._data_offset + pos)
        except OSError as exc:
            raise io_error(self.name, exc, f"read error at data offset {self._data_offset + pos}") from None
        if got < len(chunk):  # a set bit past the end of the file reads as zeros, as in the kernel
            chunk[got:] = bytes(len(chunk) - got)

    def _read_backing(self, chunk: memoryview, pos: int) -> None:
        try:
            got = pread_into(self._bfd, chunk, pos)
        except OSError as exc:
            raise io_error(self.backing_name, exc, f"read error at offset {pos}") from None
        if got < len(chunk):
            if pos + got < self._backing_size:
                now = os.fstat(self._bfd).st_size
                raise ImageIOError(
                    self.backing_name,
                    f"short read at offset {pos + got}: the backing file is now {now} bytes but was "
                    f"{self._backing_size} when opened (it changed while in use)",
                    errno=errno.EIO,
                )
            chunk[got:] = bytes(len(chunk) - got)  # a backing smaller than the disk (check_backing=False)


def open(
    cow_path: str | os.PathLike[str],
    mode: str = "r",
    *,
    backing: str | os.PathLike[str] | None = None,
    check_backing: bool = True,
    lock: bool = True,
) -> CowImage:
    """Open the virtual disk of a COW file.

    ``mode`` is "r" or "r+". ``backing`` overrides the recorded backing path;
    ``check_backing=False`` skips the kernel's size and mtime checks;
    ``lock=False`` skips the fcntl locks that keep a running guest out
    (dangerous: only when you know nothing else uses the file).
    """
    return CowImage(cow_path, mode, backing=backing, check_backing=check_backing, lock=lock)

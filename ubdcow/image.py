"""The virtual disk of a COW file as a file object, with the ubd driver's semantics.

A :class:`CowImage` holds its parts: the :class:`~ubdcow.cowfile.CowFile` (header, bitmap, the map), the
:class:`~ubdcow.backing.Backing` file (only ever opened ``O_RDONLY``), the read path
(:mod:`ubdcow._readpath`: a plan from the bitmap bytes, one fill routine), the write path
(:mod:`ubdcow._pagewrite`: whole pages, data before bits) and the lock that lets reads share the image
while writes, flushes and closing run alone.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from ._pagewrite import PageWriter
from ._readpath import Reader
from .backing import Backing, attach_backing
from .cowfile import CowFile, Extent, Run
from .format import CowHeader
from .lock import SharedLock

__all__ = ["CowFile", "CowImage", "Extent", "Run", "open"]


class CowImage(io.RawIOBase):
    """The virtual disk of a COW file: a seekable, readable (and in "r+" writable) raw file.

    Create it with :func:`ubdcow.open`. Positional calls (:meth:`pread`,
    :meth:`pwrite`, :meth:`discard`, :meth:`write_zeroes`) leave the position alone.
    """

    header: CowHeader
    size: int
    name: str
    mode: str
    backing_name: str
    _cow: CowFile
    _backing: Backing
    _reader: Reader
    _writer: PageWriter

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
        self._fd = -1  # the COW file's, while open: what reads check once they hold the lock
        self._pos = 0
        self._lock = SharedLock()
        try:
            self._open(mode == "r+", backing, check_backing, lock)
        except BaseException:
            self._close_fds()
            raise

    def _open(self, writable: bool, backing: str | os.PathLike[str] | None, check_backing: bool, lock: bool) -> None:
        self._cow = cow = CowFile(self.name, writable=writable, lock=lock)
        self.header = cow.header
        self.size = cow.header.size
        self._backing = attach_backing(
            cow.header, self.name, cow.stat, backing, check=check_backing, lock=lock and writable
        )
        self.backing_name = self._backing.path
        # mapped only while we hold the lock that keeps writers (who may truncate it) out
        self._reader = Reader(cow, self._backing, cow.length if lock else 0)
        self._writer = PageWriter(cow, self._reader, self._lock)
        self._fd = cow.fd

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
        n = self.pwrite(data, self._pos)
        self._pos += n
        return n

    def truncate(self, size: int | None = None) -> int:
        raise io.UnsupportedOperation("the virtual disk of a COW file has a fixed size")

    def flush(self) -> None:
        """fsync the COW file if anything was written since the last flush."""
        super().flush()
        writer = getattr(self, "_writer", None)
        if writer is not None:  # a close cut short by a signal closed the file: nothing to sync
            writer.flush()

    def close(self) -> None:
        if self.closed:
            return
        try:
            if self._fd >= 0:
                self.flush()
        finally:
            with self._lock:  # wait for reads in flight: they use the mapping and the descriptors
                self._close_fds()
            super().close()

    def _close_fds(self) -> None:
        for part in ("_reader", "_cow", "_backing"):  # closing the COW file's description drops its OFD lock
            if hasattr(self, part):
                getattr(self, part).close()
        self._fd = -1

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
            return self._reader.pread(offset, n)
        finally:
            lock.release_shared()

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
            self._reader.read_backing(memoryview(buffer).cast("B"), offset)
        finally:
            lock.release_shared()

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> int:
        """Write ``data`` at ``offset``; the whole range must lie inside the disk."""
        self._check_writable()
        return self._writer.pwrite(data, offset)

    def write_zeroes(self, offset: int, length: int) -> None:
        """Make [offset, offset+length) read as zeros: set the bits and punch holes, as the kernel does.

        Whole pages are punched; the rest of a partly covered page keeps its
        content and the whole page becomes COW (pages stay whole).
        """
        self._check_writable()
        self._writer.write_zeroes(offset, length)

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
        return self._writer.fill_mixed_pages(progress)

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
        return self._cow.runs(offset, length, backing_fd=self._backing.fd, holes=holes)

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
            return self._cow.run_arrays(offset, length, backing_fd=self._backing.fd, holes=True)
        finally:
            lock.release_shared()

    def count_cow_sectors(self) -> int:
        """Sectors whose bit is set (and honoured)."""
        self._checkClosed()
        return self._cow.bitmap.count()

    def cow_bytes(self) -> int:
        """Bytes of the disk read from the COW file: its set (and honoured) bits."""
        self._checkClosed()
        return self._cow.cow_bytes()

    @property
    def fds(self) -> tuple[int, int]:
        """``(cow_fd, backing_fd)``, for tools that copy ranges themselves (merge)."""
        self._checkClosed()
        return self._fd, self._backing.fd

    @property
    def backing_size(self) -> int:
        """The backing file's size when it was opened."""
        return self._backing.size

    # -- internals -----------------------------------------------------------
    def _check_open(self) -> None:
        """Refuse a read that got the lock after :meth:`close` (which closes under the exclusive lock)."""
        if self._fd < 0:
            raise ValueError("I/O operation on closed file.")

    def _check_writable(self) -> None:
        self._checkClosed()
        if self.mode != "r+":
            raise io.UnsupportedOperation(f"{self.name}: opened read-only (use mode 'r+' to write)")

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
            self._reader.fill(view, offset)
        finally:
            lock.release_shared()
        return n


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

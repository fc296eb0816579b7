"""The virtual disk of a COW file as a file object, with the ubd driver's semantics.

Reads split at bitmap run boundaries: set bits read the COW data area, clear
bits read the backing file. Writes extend to whole 4 KiB pages of the virtual
disk, filled from the current content, write the data, and only then set the
bits: every page a write touches ends all set (the Linux ubd driver misreads
pages that mix COW and backing sectors). The backing file is only ever opened
``O_RDONLY``.
"""

from __future__ import annotations

import errno
import io
import mmap
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any, Literal, NamedTuple

import numpy as np

from . import lock as _lock
from ._io import Segments, file_size, mtime_seconds, open_file, pread_into, punch_hole, pwrite_all, same_file
from .bitmap import PAGE_SECTORS, PAGE_SIZE, Bitmap
from .errors import (
    BackingFileError,
    BackingMismatchError,
    CorruptImageError,
    ImageIOError,
    ImageRangeError,
    UnrecordableWriteError,
)
from .format import SECTOR_SIZE, CowHeader, read_header_from

__all__ = [
    "CowFile",
    "CowImage",
    "Extent",
    "open",
    "open_backing",
    "backing_stats",
    "check_backing_file",
    "mismatch_message",
    "mismatch_hint",
]

Source = Literal["cow", "backing", "zero"]
_SHIFT = 9  # log2(SECTOR_SIZE)
_PAGE_SHIFT = 12  # log2(PAGE_SIZE)
_ZERO_CHUNK = 8 << 20
# mixed pages whose data is written before one fsync and their bits
_FILL_BATCH = 4096
# reads of whole sectors between these sizes may take the numpy overlay path
_OVERLAY_MIN = 64 << 10
_OVERLAY_MAX = 16 << 20
# requests up to this size first try to find a single source (larger ones rarely have one)
_ONE_SOURCE_MAX = 64 << 10


class Extent(NamedTuple):
    """A run of the virtual disk with one source.

    ``offset`` is where the bytes live: in the COW file for "cow" and "zero",
    in the backing file for "backing".
    """

    start: int
    length: int
    source: Source
    offset: int


def mismatch_message(header: CowHeader, size: int, mtime: int) -> str | None:
    """The kernel's complaint about a backing file of this size and mtime, or None if it fits."""
    if size != header.size:
        return f"Size mismatch ({header.size} vs {size}) of COW header vs backing file"
    if mtime != header.mtime:
        return f"mtime mismatch ({header.mtime} vs {mtime}) of COW header vs backing file"
    return None


def mismatch_hint(cow: str, backing: str, header: CowHeader, size: int, mtime: int) -> str:
    """What to do about a backing file the kernel would refuse (see :func:`mismatch_message`)."""
    if size != header.size:
        return (
            f"the backing file is {size} bytes but the COW file was made on one of {header.size}: "
            "this is not the file the COW file was made on"
        )
    fix = f"ubdcow rebase --unsafe {cow} --backing {backing}"
    if not 0 <= mtime < 2**32:  # a header cannot record this mtime: give the file one it can
        fix = f"touch {backing}, then {fix}"
    return (
        "the backing file was modified, copied or touched after the COW file was made, and UML will refuse "
        f"to boot it; if its content is unchanged, record its new mtime with: {fix}"
    )


def check_backing_file(header: CowHeader, cow_path: str, backing_path: str, st: os.stat_result, size: int) -> None:
    """Raise :class:`BackingMismatchError` unless size and whole-second mtime match the header."""
    mtime = mtime_seconds(st)
    message = mismatch_message(header, size, mtime)
    if message is not None:
        raise BackingMismatchError(
            cow_path, f"{message} {backing_path}", hint=mismatch_hint(cow_path, backing_path, header, size, mtime)
        )


def backing_candidates(header: CowHeader, cow_path: str | os.PathLike[str]) -> list[str]:
    """Where the recorded backing path is looked for: as is, or (if relative) from the cwd then the COW's folder."""
    recorded = header.backing_file
    if not recorded or os.path.isabs(recorded):
        return [recorded]
    here = os.path.abspath(recorded)
    beside = os.path.join(os.path.dirname(os.path.abspath(cow_path)), recorded)
    return [here] if here == beside else [here, beside]


def backing_stats(
    header: CowHeader, cow_path: str | os.PathLike[str], backing: str | os.PathLike[str] | None = None
) -> list[os.stat_result]:
    """The stat of each existing file the backing path could resolve to (never raises).

    For tools that do not open the backing file but must never replace it.
    """
    candidates = [os.fspath(backing)] if backing is not None else backing_candidates(header, cow_path)
    found = []
    for path in candidates:
        try:
            found.append(os.stat(path))
        except (OSError, ValueError):
            continue
    return found


def open_backing(
    header: CowHeader,
    cow_path: str,
    cow_stat: os.stat_result,
    backing: str | os.PathLike[str] | None = None,
) -> tuple[int, str, os.stat_result, int]:
    """Open the backing file read-only: ``(fd, path, stat, size)``.

    ``backing`` overrides the recorded path. Raises :class:`BackingFileError`
    when it is missing, unusable or the COW file itself.
    """
    if backing is not None:
        candidates = [os.fspath(backing)]
    elif not header.backing_file:
        raise BackingFileError(
            cow_path, "no backing file is recorded in the header", hint="name one with --backing PATH"
        )
    else:
        candidates = backing_candidates(header, cow_path)
    # a recorded path that is unusable is a problem of the COW file: name it, and the path
    report_as = None if backing is not None else cow_path
    for path in candidates:
        what = "backing file" if backing is not None else f"backing file {path}"
        try:
            os.stat(path)
        except FileNotFoundError:
            continue  # missing, or a dangling link: try the next place
        except OSError as exc:
            reason = "too many levels of symbolic links" if exc.errno == errno.ELOOP else exc.strerror
            raise BackingFileError(report_as or path, f"cannot open {what}: {reason}") from None
        fd, st = open_file(path, os.O_RDONLY, what=what, error=BackingFileError, report_as=report_as)
        if same_file(st, cow_stat):
            os.close(fd)
            raise BackingFileError(cow_path, f"the backing file {path} is the COW file itself")
        try:
            size = file_size(fd, st)
        except OSError as exc:
            os.close(fd)
            raise BackingFileError(report_as or path, f"cannot read the size of {what}: {exc.strerror}") from None
        return fd, path, st, size
    if backing is not None:
        raise BackingFileError(candidates[0], "backing file not found")
    tried = ", ".join(candidates)
    message = f"backing file {header.backing_file} not found"
    if candidates != [header.backing_file]:
        message += f" (tried {tried})"
    raise BackingFileError(cow_path, message, hint="if it moved, name it with --backing PATH")


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
        self._mutex = threading.Lock()
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
        self._bfd, self.backing_name, bst, self._backing_size = open_backing(header, self.name, cow.stat, backing)
        if check_backing:
            check_backing_file(header, self.name, self.backing_name, bst, self._backing_size)
        if lock and writable:
            _lock.lock(self._bfd, self.backing_name, exclusive=False, what="backing file")
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
        if self._dirty:
            with self._mutex:
                try:
                    os.fsync(self._fd)
                except OSError as exc:
                    raise ImageIOError(self.name, f"cannot flush: {exc.strerror}", errno=exc.errno) from None
                self._dirty = False

    def close(self) -> None:
        if self.closed:
            return
        try:
            if self._fd >= 0:
                self.flush()
        finally:
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
        with self._mutex:
            source = self._one_source(offset, n)
            if source is not None:  # the common case: one system call, no copy
                try:
                    data = os.pread(source[0], n, source[1])
                except OSError:
                    data = b""  # the general path reports it, naming the file and offset
                if len(data) == n:
                    return data
        buf = bytearray(n)
        self._readinto_at(memoryview(buf), offset, one_source_tried=True)
        return bytes(buf)

    def preadinto(self, buffer: memoryview | bytearray, offset: int) -> int:
        """Fill ``buffer`` from ``offset``; returns the bytes read (short at the end of the disk)."""
        self._checkClosed()
        return self._readinto_at(memoryview(buffer).cast("B"), offset)

    def backing_preadinto(self, buffer: memoryview | bytearray, offset: int) -> None:
        """Fill ``buffer`` from the backing file at ``offset``, whatever the bitmap says (zeros past its end)."""
        self._checkClosed()
        with self._mutex:
            self._read_backing(memoryview(buffer).cast("B"), offset)

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
        bits = self._bitmap.bits(lo, hi).tolist()
        try:
            for i, is_set in enumerate(bits):
                if not is_set:
                    a = i << _SHIFT
                    pwrite_all(self._fd, [buf[a : a + SECTOR_SIZE]], self._data_offset + start + a)
        except OSError as exc:
            raise ImageIOError(self.name, f"write error at offset {start}: {exc.strerror}", errno=exc.errno) from None
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
            raise ImageIOError(self.name, f"cannot make pages whole: {exc.strerror}", errno=exc.errno) from None
        spans.clear()

    # -- maps ----------------------------------------------------------------
    def extents(self, offset: int = 0, length: int | None = None) -> Iterator[tuple[int, int, str]]:
        """Coalesced runs ``(start, length, source)`` of [offset, offset+length), source "cow" or "backing"."""
        self._checkClosed()
        return self._cow.extents(offset, length)

    def mapping(self, offset: int = 0, length: int | None = None) -> Iterator[Extent]:
        """Like :meth:`extents`, but cow runs over holes in the data area are split off as "zero"."""
        self._checkClosed()
        return self._cow.mapping(offset, length)

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

    def _readinto_at(self, view: memoryview, offset: int, *, one_source_tried: bool = False) -> int:
        n = min(len(view), self.size - offset)
        if n <= 0:
            return 0
        with self._mutex:
            self._fill(view[:n], offset, one_source_tried=one_source_tried)
        return n

    def _fill(self, view: memoryview, offset: int, *, one_source_tried: bool = False) -> None:
        """Fill ``view`` with the disk's content at ``offset`` (inside the disk; caller holds the mutex)."""
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

    def _one_source(self, offset: int, n: int) -> tuple[int, int] | None:
        """``(fd, file offset)`` when [offset, offset+n) lies in one run, else None (caller holds the mutex)."""
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
        if self._mapv is not None and at + len(chunk) <= self._map_len:
            chunk[:] = self._mapv[at : at + len(chunk)]
            return
        try:
            got = pread_into(self._fd, chunk, self._data_offset + pos)
        except OSError as exc:
            raise ImageIOError(
                self.name, f"read error at data offset {self._data_offset + pos}: {exc.strerror}", errno=exc.errno
            ) from None
        if got < len(chunk):  # a set bit past the end of the file reads as zeros, as in the kernel
            chunk[got:] = bytes(len(chunk) - got)

    def _read_backing(self, chunk: memoryview, pos: int) -> None:
        try:
            got = pread_into(self._bfd, chunk, pos)
        except OSError as exc:
            raise ImageIOError(
                self.backing_name, f"read error at offset {pos}: {exc.strerror}", errno=exc.errno
            ) from None
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
            raise ImageIOError(self.name, f"write error at offset {offset}: {exc.strerror}", errno=exc.errno) from None

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
            raise ImageIOError(
                self.name, f"cannot zero sectors {first}-{last - 1}: {exc.strerror}", errno=exc.errno
            ) from None


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

"""Flatten a COW image into a new raw image: exact, sparse, atomic, backing untouched.

Where the output can share extents with its inputs (XFS with reflink, btrfs:
the same filesystem), the image is shared, not copied: each window of the
disk first gets the backing file's block-aligned data ranges (FICLONERANGE),
then its COW runs over them (cloned from the data area where both sides are
block-aligned, else copied). New space is then about the size of what was
copied, and the time follows the number of runs, not the size.

Elsewhere, or with ``reflink=False``, the image is copied run by run (never
sector by sector): data runs are read, all-zero 4 KiB blocks are left as
holes (as are holes in the backing file and in the COW data area), and the
rest is written by a second thread while the next chunk is read.
"""

from __future__ import annotations

import bisect
import errno
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._atomic import AtomicFile, check_output_path
from ._io import Segments, clone_block, clone_range, punch_hole, pwrite_all, read_at, start_writeback
from ._result import Result
from ._signals import deferred, register, release
from .errors import ImageIOError, io_error
from .image import CowImage

__all__ = ["MergeResult", "merge", "stream", "default_output"]

CHUNK = 1 << 20  # read/zero-check granularity (fits in cache, so the copy that follows is cheap)
BLOCK = 4096  # hole granularity in the output
WRITEBACK = 32 << 20  # start write-back of the output after this many bytes
BUFFERS = 3  # CHUNK buffers between the reading thread and the writing one
SHARE_WINDOW = 1 << 30  # the reflink path shares the backing and then lays the COW runs a window at a time

Progress = Callable[[int], Any]


@dataclass(frozen=True)
class MergeResult(Result):
    """What a merge did. ``cow_bytes + backing_bytes == size``.

    ``shared_bytes``: bytes of the output that share the backing's or the COW
    file's blocks (reflink) instead of being copied; ``hole_bytes``: bytes
    left unallocated.
    """

    output: str
    size: int
    cow_bytes: int
    backing_bytes: int
    hole_bytes: int
    seconds: float
    shared_bytes: int = 0


def default_output(cow_path: str | os.PathLike[str]) -> str:
    """``overlay.cow`` -> ``overlay.img`` (a name without a suffix gets ``.img`` appended)."""
    root, _ = os.path.splitext(os.fspath(cow_path))
    return root + ".img"


class _Copier:
    """Writes data into the output, skipping all-zero blocks when sparse, on a thread of its own.

    The caller fills a buffer (:meth:`take`) and hands it over
    (:meth:`write_buffer`); the writer thread scans it for zero blocks and
    writes the rest (``pwritev``, or ``copy_file_range`` from where the bytes
    came from), so that reading the next buffer overlaps writing this one. A
    write error is raised by the next :meth:`take`, :meth:`drain` or
    :meth:`finish`. :meth:`close` (idempotent) must come before the output
    is closed.
    """

    def __init__(self, out_fd: int, sparse: bool, in_kernel: bool = True) -> None:
        self.out_fd = out_fd
        self.sparse = sparse
        self.written = 0  # counted by the writer
        # copy_file_range shares extents on XFS/btrfs: not when the caller asked for a copy
        self._cfr = in_kernel and hasattr(os, "copy_file_range")
        self._kicked = 0  # bytes written when write-back was last started
        self._free: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
        for _ in range(BUFFERS):
            self._free.put(bytearray(CHUNK))
        self._jobs: queue.Queue[tuple[bytearray, int, int, int, int] | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._stopping = False
        self._undo = 0

    def take(self) -> bytearray:
        """A free buffer of :data:`CHUNK` bytes, once the writer has given one back."""
        buf = self._free.get()
        self._raise_error()
        return buf

    def write_buffer(self, buf: bytearray, dst_off: int, n: int, src: int = -1, src_off: int = 0) -> None:
        """Have ``buf[:n]`` written at ``dst_off`` (all-zero blocks left as holes when sparse); ``buf`` goes
        back to the free buffers after. ``src``, ``src_off``: the file and offset the bytes were read from."""
        if self._thread is None:
            self._start()
        self._jobs.put((buf, n, dst_off, src, src_off))

    def _start(self) -> None:
        with deferred():  # started, recorded and its stop registered together: close() never meets a thread
            thread = threading.Thread(target=self._run, name="ubdcow-merge-writer", daemon=True)
            thread.start()
            self._thread = thread
            self._undo = register(self.close)

    def copy(self, src: int, src_off: int, dst_off: int, length: int, src_name: str) -> None:
        """Copy a data range of ``src`` a chunk at a time (all-zero blocks skipped when sparse)."""
        pos = 0
        while pos < length:
            n = min(CHUNK, length - pos)
            if n == CHUNK:  # end chunks on output block boundaries so zero blocks line up with holes
                n -= (dst_off + pos + n) % BLOCK
            buf = self.take()
            got = read_at(src, memoryview(buf)[:n], src_off + pos, src_name)
            if got < n:
                raise _short_read(src_name, src_off + pos + got)
            self.write_buffer(buf, dst_off + pos, n, src, src_off + pos)
            pos += n

    def clear(self, dst_off: int, length: int) -> None:
        """Make a range of the output read zeros: a hole, or written zeros where holes cannot be punched."""
        self.drain()
        if punch_hole(self.out_fd, dst_off, length):
            return
        zeros = bytes(min(CHUNK, length))
        for pos in range(0, length, CHUNK):
            n = min(CHUNK, length - pos)
            pwrite_all(self.out_fd, [zeros[:n]], dst_off + pos)
            self._wrote(n)

    def drain(self) -> None:
        """Wait until everything handed over is written."""
        if self._thread is not None:
            self._jobs.join()
        self._raise_error()

    def finish(self) -> None:
        """Write what is left and stop the writer."""
        self.drain()
        self.close()

    def close(self) -> None:
        """Stop the writer, dropping what it has not begun, and wait for it."""
        with deferred():  # a signal does not cut this short: the writer is gone before the output is closed
            release(self._undo)
            if self._thread is not None:
                self._stopping = True
                self._jobs.put(None)
                self._thread.join()
                self._thread = None

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            buf, n, dst_off, src, src_off = job
            try:
                if self._error is None and not self._stopping:
                    self._write_buffer(buf, n, dst_off, src, src_off)
            except BaseException as exc:  # handed to the caller's thread
                self._error = exc
            finally:
                self._free.put(buf)
                self._jobs.task_done()
        self._jobs.task_done()

    def _write_buffer(self, buf: bytearray, n: int, dst_off: int, src: int, src_off: int) -> None:
        view = memoryview(buf)
        for a, b in _nonzero_runs(buf, n, dst_off % BLOCK) if self.sparse else [(0, n)]:
            if src >= 0 and self._cfr:
                self._copy_range(src, src_off + a, dst_off + a, view[a:b])
            else:
                pwrite_all(self.out_fd, [view[a:b]], dst_off + a)
                self._wrote(b - a)

    def _copy_range(self, src: int, src_off: int, dst_off: int, data: memoryview) -> None:
        """copy_file_range of ``data``'s bytes from ``src``, falling back to writing ``data``."""
        done = 0
        try:
            while done < len(data):
                n = os.copy_file_range(src, self.out_fd, len(data) - done, src_off + done, dst_off + done)
                if n == 0:
                    break
                done += n
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EPERM):
                raise
            self._cfr = False
        if done:
            self._wrote(done)
        if done < len(data):
            pwrite_all(self.out_fd, [data[done:]], dst_off + done)
            self._wrote(len(data) - done)

    def _wrote(self, n: int) -> None:
        """Count written bytes; every WRITEBACK bytes, start write-back so the final fsync is short."""
        self.written += n
        if self.written - self._kicked >= WRITEBACK:
            start_writeback(self.out_fd)
            self._kicked = self.written


def _short_read(name: str, offset: int) -> ImageIOError:
    return ImageIOError(
        name, f"file ended at offset {offset} during the merge: it changed while being read", errno=errno.EIO
    )


def _nonzero_runs(buf: bytearray, n: int, phase: int) -> list[tuple[int, int]]:
    """Byte ranges of ``buf[:n]`` to write: everything but all-zero blocks.

    Blocks are :data:`BLOCK` bytes aligned to the output; ``phase`` is the
    output offset of ``buf[0]`` modulo BLOCK. Partial blocks at either end
    are written unless entirely zero; a piece of two blocks or less is
    written whole unless entirely zero.
    """
    if n <= 2 * BLOCK:
        return [] if buf.count(0, 0, n) == n else [(0, n)]
    head = min((BLOCK - phase) % BLOCK, n)
    k = (n - head) // BLOCK
    tail = head + k * BLOCK
    keep = np.empty(k + 2, dtype=bool)  # [head piece, k blocks, tail piece]
    keep[0] = head > 0 and buf.count(0, 0, head) != head
    keep[-1] = tail < n and buf.count(0, tail, n) != n - tail
    words = np.frombuffer(buf, dtype=np.uint64, count=k * (BLOCK // 8), offset=head).reshape(k, BLOCK // 8)
    nonzero = words[:, 0] != 0  # most data blocks show themselves in their first word
    maybe_zero = np.flatnonzero(~nonzero)
    if maybe_zero.size:
        nonzero[maybe_zero] = words[maybe_zero].any(axis=1)
    keep[1:-1] = nonzero
    if keep.all():
        return [(0, n)]
    bounds = np.concatenate(([0], head + BLOCK * np.arange(k + 1), [n]))  # piece i is [bounds[i], bounds[i+1])
    edges = np.flatnonzero(np.diff(np.concatenate(([0], keep.view(np.int8), [0]))))
    return [
        (int(bounds[a]), int(bounds[b])) for a, b in zip(edges[::2], edges[1::2], strict=True) if bounds[b] > bounds[a]
    ]


class _Batch:
    """Short runs in a row, merged in memory: one read of the backing, one read per COW run, one write."""

    def __init__(self) -> None:
        self.runs: list[tuple[int, int, str]] = []

    @property
    def start(self) -> int:
        return self.runs[0][0]

    @property
    def end(self) -> int:
        return self.runs[-1][0] + self.runs[-1][1]


def _copy_image(
    img: CowImage, copier: _Copier, totals: dict[str, int], *, start: int, progress: Progress | None
) -> None:
    """Copy the virtual disk from ``start`` on into the copier's output (already ``size`` long and zero there).

    Long runs are copied from their file range by range (holes skipped);
    runs shorter than :data:`CHUNK` are gathered into batches of up to
    CHUNK bytes and assembled in memory, so that a fragmented bitmap costs a
    few system calls per MiB rather than a few per run. ``totals`` counts
    the bytes of each source.
    """
    cow_segments, backing_segments = Segments(img.fds[0]), Segments(img.fds[1])
    batch = _Batch()

    def flush() -> None:
        if len(batch.runs) == 1:
            _copy_run(img, copier, *batch.runs[0], cow_segments, backing_segments)
        elif batch.runs:
            _copy_batch(img, copier, batch)
        if batch.runs and progress is not None:
            progress(batch.end - batch.start)
        batch.runs.clear()

    for run, length, source in img.extents(start, img.size - start):
        totals[source] += length
        if length >= CHUNK:
            flush()
            _copy_run(img, copier, run, length, source, cow_segments, backing_segments)
            if progress is not None:
                progress(length)
            continue
        if batch.runs and run + length - batch.start > CHUNK:
            flush()
        batch.runs.append((run, length, source))
    flush()


def _copy_run(
    img: CowImage,
    copier: _Copier,
    start: int,
    length: int,
    source: str,
    cow_segments: Segments,
    backing_segments: Segments,
) -> None:
    """Copy one run from its file, skipping the file's holes (past a file's end is a hole: zeros)."""
    if source == "cow":
        src, base, name, segments = img.fds[0], img.header.data_offset, img.name, cow_segments
    else:
        src, base, name, segments = img.fds[1], 0, img.backing_name, backing_segments
    for a, b, is_data in segments(base + start, base + start + length):
        if is_data:
            copier.copy(src, a, a - base, b - a, name)
    if source == "backing":
        _backing_still_covers(img, min(start + length, img.backing_size))


def _copy_batch(img: CowImage, copier: _Copier, batch: _Batch) -> None:
    """Assemble a batch of short runs in the copier's buffer and write what is not zero."""
    cow_fd, backing_fd = img.fds
    first, n = batch.start, batch.end - batch.start
    buf = copier.take()
    view = memoryview(buf)[:n]
    in_backing = max(0, min(n, img.backing_size - first))  # a smaller backing (force) reads as zeros
    got = read_at(backing_fd, view[:in_backing], first, img.backing_name)
    if got < in_backing:
        raise _short_read(img.backing_name, first + got)
    view[in_backing:] = bytes(n - in_backing)
    for start, length, source in batch.runs:
        if source == "cow":
            part = view[start - first : start - first + length]
            got = read_at(cow_fd, part, img.header.data_offset + start, img.name)
            part[got:] = bytes(length - got)  # a set bit past the COW file's end reads as zeros
    copier.write_buffer(buf, first, n)


class _Ranges:
    """Sorted, disjoint byte ranges ``[a, b)``, added in order; what intersects a query range."""

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []

    def add(self, a: int, b: int) -> None:
        if a < b:
            self.starts.append(a)
            self.ends.append(b)

    def pieces(self, a: int, b: int) -> Iterator[tuple[int, int]]:
        """The parts of ``[a, b)`` inside the ranges."""
        i = bisect.bisect_right(self.ends, a)
        while i < len(self.starts) and self.starts[i] < b:
            yield max(a, self.starts[i]), min(b, self.ends[i])
            i += 1

    def intersects(self, a: int, b: int) -> bool:
        """Whether any byte of ``[a, b)`` is inside the ranges."""
        return next(self.pieces(a, b), None) is not None


class _Sharer:
    """The reflink path: shares the backing's and the COW file's extents into the output, copies the rest.

    Each window of the disk gets the backing's data ranges first (their
    block-aligned parts cloned, the edges remembered), then its runs in
    order: backing runs copy the edges that fall in them; COW runs replace
    what is under them, cloned from the data area where it is block-aligned
    on both sides (v3; v1 and v2 data areas are only sector-aligned), else
    copied into a punched range (a copy into shared blocks would make the
    filesystem unshare them, and XFS then reserves whole CoW extents).
    Cloning a hole makes a hole, so set bits over holes of the data area
    read zeros, and so do set bits past the COW file's end (punched).
    """

    def __init__(self, img: CowImage, copier: _Copier, totals: dict[str, int]) -> None:
        self.img = img
        self.copier = copier
        self.totals = totals
        self.block = clone_block(copier.out_fd)
        self.cow_fd, self.backing_fd = img.fds
        self.base = img.header.data_offset
        self.cow_end = os.fstat(self.cow_fd).st_size - self.base  # set bits past here read zeros
        self.backing_end = min(img.size, img.backing_size)
        self.cow_segments, self.backing_segments = Segments(self.cow_fd), Segments(self.backing_fd)
        # a source stays shareable until a clone from it fails
        self.shareable = {self.backing_fd: True, self.cow_fd: self.base % self.block == 0}
        self.cloned = 0  # bytes cloned (some of them later replaced)

    def _clone(self, src: int, src_off: int, dst_off: int, length: int) -> bool:
        if not self.shareable[src]:
            return False
        if clone_range(src, src_off, self.copier.out_fd, dst_off, length):
            self.cloned += length
            return True
        self.shareable[src] = False
        return False

    def _aligned(self, a: int, b: int) -> tuple[int, int]:
        """The block-aligned part ``[ca, cb)`` of ``[a, b)`` (empty when ``ca >= cb``)."""
        return -(-a // self.block) * self.block, b // self.block * self.block

    def window(self, start: int, end: int, progress: Progress | None) -> bool:
        """Merge ``[start, end)`` of the disk; False, having written nothing there, if the backing cannot share."""
        if not self.shareable[self.backing_fd]:
            return False
        cloned, edges = _Ranges(), _Ranges()
        for a, b, is_data in self.backing_segments(start, min(end, self.backing_end)):
            if not is_data:
                continue
            ca, cb = self._aligned(a, b)
            if ca < cb and self._clone(self.backing_fd, ca, ca, cb - ca):
                cloned.add(ca, cb)
                edges.add(a, ca)
                edges.add(cb, b)
            elif not self.shareable[self.backing_fd] and not cloned.starts:
                return False  # nothing shared in this window yet: copy it (and the rest) the usual way
            else:
                edges.add(a, b)
        totals, copy = self.totals, self.copier.copy
        for run, length, source in self.img.extents(start, end - start):
            totals[source] += length
            if source == "backing":
                for a, b in edges.pieces(run, run + length) if edges.starts else ():
                    copy(self.backing_fd, a, a, b - a, self.img.backing_name)
            else:
                self._cow_run(run, run + length, cloned)
            if progress is not None:
                progress(length)
        _backing_still_covers(self.img, min(end, self.backing_end))
        return True

    def _cow_run(self, a: int, b: int, cloned: _Ranges) -> None:
        block = self.block
        if a % block == 0 == b % block and b <= self.cow_end and self._clone(self.cow_fd, self.base + a, a, b - a):
            return  # the usual case: whole pages of a v3 file
        stop = max(a, min(b, self.cow_end))
        if stop < b:
            self.copier.clear(stop, b - stop)
        ca, cb = self._aligned(a, stop)
        if ca < cb and self._clone(self.cow_fd, self.base + ca, ca, cb - ca):
            self._copy_cow(a, ca, cloned)
            self._copy_cow(cb, stop, cloned)
        else:
            self._copy_cow(a, stop, cloned)

    def _copy_cow(self, a: int, b: int, cloned: _Ranges) -> None:
        """Copy a COW range the usual way (zero blocks and holes of the data area left as holes)."""
        if a >= b:
            return
        if cloned.intersects(a, b):
            self.copier.clear(a, b - a)  # unshare by deallocating, then write into the hole
        for x, y, is_data in self.cow_segments(self.base + a, self.base + b):
            if is_data:
                self.copier.copy(self.cow_fd, x, x - self.base, y - x, self.img.name)


def _backing_still_covers(img: CowImage, end: int) -> None:
    """A backing file that shrank would look like holes (zeros): refuse, naming where it ends now."""
    now = os.fstat(img.fds[1]).st_size
    if now < end:
        raise ImageIOError(
            img.backing_name,
            f"backing file ended at offset {now} during the merge, but it was {img.backing_size} bytes when opened: "
            "it changed while being read",
            errno=errno.EIO,
        )


def _backing_unchanged(img: CowImage, before: os.stat_result) -> None:
    after = os.fstat(img.fds[1])
    if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
        raise ImageIOError(
            img.backing_name, "backing file changed during the merge; the output was discarded", errno=errno.EIO
        )


def merge(
    cow_path: str | os.PathLike[str],
    output_path: str | os.PathLike[str],
    *,
    backing: str | os.PathLike[str] | None = None,
    force: bool = False,
    overwrite: bool = False,
    sparse: bool = True,
    progress: Progress | None = None,
    lock: bool = True,
    reflink: bool = True,
) -> MergeResult:
    """Write the virtual disk of ``cow_path`` to a new raw image ``output_path``.

    The output appears atomically (temporary file, fsync, rename) and is
    exactly ``size`` bytes. ``force`` accepts a backing file whose size or
    mtime differs from the header; ``overwrite`` replaces an existing output
    (never the COW or backing file). ``progress`` is called with the number
    of bytes of virtual disk done since its last call. Where the filesystem
    can, the output shares the inputs' extents instead of copying them
    (``shared_bytes``); ``reflink=False``, or ``sparse=False`` (every byte
    the output's own), copies everything.
    """
    t0 = time.monotonic()
    output = os.fspath(output_path)
    with CowImage(cow_path, "r", backing=backing, check_backing=not force, lock=lock) as img:
        cow_fd, backing_fd = img.fds
        backing_stat = os.fstat(backing_fd)
        check_output_path(
            output, overwrite=overwrite, inputs={"COW file": os.fstat(cow_fd), "backing file": backing_stat}
        )
        with AtomicFile(output, overwrite=overwrite, inputs=(os.fstat(cow_fd), backing_stat)) as out:
            totals = {"cow": 0, "backing": 0}
            copier = _Copier(out.fd, sparse, in_kernel=reflink)
            allocated = shared = 0
            try:
                os.ftruncate(out.fd, img.size)
                if not sparse:
                    os.posix_fallocate(out.fd, 0, img.size)
                pos = 0
                sharer = _Sharer(img, copier, totals) if reflink and sparse else None
                while sharer is not None and pos < img.size:
                    if not sharer.window(pos, min(img.size, pos + SHARE_WINDOW), progress):
                        break
                    pos = min(img.size, pos + SHARE_WINDOW)
                _copy_image(img, copier, totals, start=pos, progress=progress)
                copier.finish()
                if sharer is not None and sharer.cloned:  # shared: neither a hole nor written
                    allocated = sum(b - a for a, b, is_data in Segments(out.fd)(0, img.size) if is_data)
                    shared = max(0, allocated - copier.written)
                else:
                    allocated = img.size if not sparse else min(img.size, copier.written)
            except OSError as exc:
                raise io_error(output, exc, "cannot write the merged image") from None
            finally:
                copier.close()
            _backing_unchanged(img, backing_stat)
            out.commit()
    return MergeResult(
        output=out.path,
        size=img.size,
        cow_bytes=totals["cow"],
        backing_bytes=totals["backing"],
        hole_bytes=img.size - allocated,
        seconds=time.monotonic() - t0,
        shared_bytes=shared,
    )


def stream(
    cow_path: str | os.PathLike[str],
    out_fd: int,
    *,
    backing: str | os.PathLike[str] | None = None,
    force: bool = False,
    progress: Progress | None = None,
    lock: bool = True,
) -> MergeResult:
    """Write the virtual disk to an open descriptor (a pipe, stdout) sequentially."""
    t0 = time.monotonic()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    with CowImage(cow_path, "r", backing=backing, check_backing=not force, lock=lock) as img:
        cow_bytes = sum(n for _, n, src in img.extents() if src == "cow")
        pos = 0
        while pos < img.size:
            n = img.preadinto(view, pos)
            write_all(out_fd, view[:n])
            pos += n
            if progress is not None:
                progress(n)
    return MergeResult(
        output="-",
        size=img.size,
        cow_bytes=cow_bytes,
        backing_bytes=img.size - cow_bytes,
        hole_bytes=0,
        seconds=time.monotonic() - t0,
    )


def write_all(fd: int, data: memoryview) -> None:
    """Write all of ``data`` to a stream descriptor (a reader going away raises BrokenPipeError)."""
    try:
        while len(data):
            n = os.write(fd, data)
            data = data[n:]
    except BrokenPipeError:
        raise
    except OSError as exc:
        raise io_error("<output stream>", exc, "write error") from None

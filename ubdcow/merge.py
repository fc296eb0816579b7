"""Flatten a COW image into a new raw image: exact, sparse, atomic, backing untouched.

The image is copied run by run (never sector by sector): data runs go through
``copy_file_range`` (in-kernel copy; reflinks where the filesystem has them)
after a read that finds all-zero 4 KiB blocks, which are left as holes, as
are holes in the backing file and in the COW data area.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._atomic import AtomicFile, check_output_path
from ._io import Segments, pwrite_all, read_at, start_writeback
from ._result import Result
from .errors import ImageIOError
from .image import CowImage

__all__ = ["MergeResult", "merge", "stream", "default_output"]

CHUNK = 1 << 20  # read/zero-check granularity (fits in cache, so the copy that follows is cheap)
BLOCK = 4096  # hole granularity in the output
WRITEBACK = 32 << 20  # start write-back of the output after this many bytes

Progress = Callable[[int], Any]


@dataclass(frozen=True)
class MergeResult(Result):
    """What a merge did. ``cow_bytes + backing_bytes == size``."""

    output: str
    size: int
    cow_bytes: int
    backing_bytes: int
    hole_bytes: int
    seconds: float


def default_output(cow_path: str | os.PathLike[str]) -> str:
    """``overlay.cow`` -> ``overlay.img`` (a name without a suffix gets ``.img`` appended)."""
    root, _ = os.path.splitext(os.fspath(cow_path))
    return root + ".img"


class _Copier:
    """Copies data ranges between files, skipping all-zero blocks when sparse."""

    def __init__(self, out_fd: int, sparse: bool) -> None:
        self.out_fd = out_fd
        self.sparse = sparse
        self.buf = bytearray(CHUNK)
        self.view = memoryview(self.buf)
        self.written = 0
        self._cfr = hasattr(os, "copy_file_range")
        self._kicked = 0  # bytes written when write-back was last started

    def wrote(self, n: int) -> None:
        """Count written bytes; every WRITEBACK bytes, start write-back so the final fsync is short."""
        self.written += n
        if self.written - self._kicked >= WRITEBACK:
            start_writeback(self.out_fd)
            self._kicked = self.written

    def copy(self, src: int, src_off: int, dst_off: int, length: int, src_name: str) -> None:
        """Copy a data range of ``src`` a chunk at a time (all-zero blocks skipped when sparse)."""
        pos = 0
        while pos < length:
            n = min(CHUNK, length - pos)
            if n == CHUNK:  # end chunks on output block boundaries so zero blocks line up with holes
                n -= (dst_off + pos + n) % BLOCK
            view = self.view[:n]
            got = read_at(src, view, src_off + pos, src_name)
            if got < n:
                raise _short_read(src_name, src_off + pos + got)
            runs = _nonzero_runs(self.buf, n, (dst_off + pos) % BLOCK) if self.sparse else [(0, n)]
            for a, b in runs:
                self._write(src, src_off + pos + a, dst_off + pos + a, view[a:b])
            pos += n

    def _write(self, src: int, src_off: int, dst_off: int, data: memoryview) -> None:
        if self._cfr:
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
                self.wrote(done)
                data = data[done:]
                dst_off += done
            if not len(data):
                return
        pwrite_all(self.out_fd, [data], dst_off)
        self.wrote(len(data))

    def write_buffer(self, dst_off: int, n: int) -> None:
        """Write ``buf[:n]`` at ``dst_off`` (all-zero blocks left as holes when sparse)."""
        runs = _nonzero_runs(self.buf, n, dst_off % BLOCK) if self.sparse else [(0, n)]
        for a, b in runs:
            pwrite_all(self.out_fd, [self.view[a:b]], dst_off + a)
            self.wrote(b - a)


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


def _copy_image(img: CowImage, out_fd: int, *, sparse: bool, progress: Progress | None) -> tuple[int, int, int]:
    """Copy the virtual disk into ``out_fd`` (already ``size`` long and zero); returns (cow, backing, written).

    Long runs are copied from their file range by range (holes skipped);
    runs shorter than :data:`CHUNK` are gathered into batches of up to
    CHUNK bytes and assembled in memory, so that a fragmented bitmap costs a
    few system calls per MiB rather than a few per run.
    """
    copier = _Copier(out_fd, sparse)
    cow_segments, backing_segments = Segments(img.fds[0]), Segments(img.fds[1])
    totals = {"cow": 0, "backing": 0}
    batch = _Batch()

    def flush() -> None:
        if len(batch.runs) == 1:
            _copy_run(img, copier, *batch.runs[0], cow_segments, backing_segments)
        elif batch.runs:
            _copy_batch(img, copier, batch)
        if batch.runs and progress is not None:
            progress(batch.end - batch.start)
        batch.runs.clear()

    for start, length, source in img.extents():
        totals[source] += length
        if length >= CHUNK:
            flush()
            _copy_run(img, copier, start, length, source, cow_segments, backing_segments)
            if progress is not None:
                progress(length)
            continue
        if batch.runs and start + length - batch.start > CHUNK:
            flush()
        batch.runs.append((start, length, source))
    flush()
    return totals["cow"], totals["backing"], copier.written


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
    view = copier.view[:n]
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
    copier.write_buffer(first, n)


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
) -> MergeResult:
    """Write the virtual disk of ``cow_path`` to a new raw image ``output_path``.

    The output appears atomically (temporary file, fsync, rename) and is
    exactly ``size`` bytes. ``force`` accepts a backing file whose size or
    mtime differs from the header; ``overwrite`` replaces an existing output
    (never the COW or backing file). ``progress`` is called with the number
    of bytes of virtual disk done since its last call.
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
            try:
                os.ftruncate(out.fd, img.size)
                if not sparse:
                    os.posix_fallocate(out.fd, 0, img.size)
                cow_bytes, backing_bytes, written = _copy_image(img, out.fd, sparse=sparse, progress=progress)
            except OSError as exc:
                raise ImageIOError(output, f"cannot write the merged image: {exc.strerror}", errno=exc.errno) from None
            _backing_unchanged(img, backing_stat)
            out.commit()
    allocated = img.size if not sparse else written
    return MergeResult(
        output=out.path,
        size=img.size,
        cow_bytes=cow_bytes,
        backing_bytes=backing_bytes,
        hole_bytes=img.size - allocated,
        seconds=time.monotonic() - t0,
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
        raise ImageIOError("<output stream>", f"write error: {exc.strerror}", errno=exc.errno) from None

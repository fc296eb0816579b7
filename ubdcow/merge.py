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
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from ._atomic import AtomicFile, check_output_path
from ._copier import CHUNK, Copier
from ._io import Segments, clone_block, clone_range
from ._result import Result
from .cowfile import Run
from .errors import ImageIOError, io_error
from .image import CowImage

__all__ = ["MergeResult", "merge", "stream", "default_output"]

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


def _copy_image(img: CowImage, copier: Copier, *, start: int, progress: Progress | None) -> None:
    """Copy the virtual disk from ``start`` on into the copier's output (already ``size`` long and zero there).

    The map with holes says where each byte comes from. Long runs of data are copied from their file
    (``copy_file_range``), long runs of zeros are left alone; runs shorter than :data:`CHUNK` are gathered
    into batches of up to CHUNK bytes, read with the image's own read path (the backing file once, the COW
    runs over it), so that a fragmented bitmap costs a few system calls per MiB rather than a few per run.
    """
    first = last = start  # the batch [first, last)

    def flush() -> None:
        if last > first:
            buf = copier.take()
            img.preadinto(memoryview(buf)[: last - first], first)
            copier.write_buffer(buf, first, last - first)
            if progress is not None:
                progress(last - first)

    for run in img.runs(start, img.size - start, holes=True):
        if run.length >= CHUNK:
            flush()
            first = last = run.start + run.length
            _copy_run(img, copier, run)
            if progress is not None:
                progress(run.length)
            continue
        if run.start + run.length - first > CHUNK:
            flush()
            first = run.start
        last = run.start + run.length
    flush()


def _copy_run(img: CowImage, copier: Copier, run: Run) -> None:
    """Copy one long run from its file (a run of zeros is there already: the output is sparse)."""
    if run.source != "zero":
        name = img.name if run.source == "cow" else img.backing_name
        copier.copy(run.fd, run.offset, run.start, run.length, name)
    _backing_still_covers(img, min(run.start + run.length, img.backing_size))


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
    Runs of zeros (set bits over holes of the data area or past its end)
    punch what was cloned under them.
    """

    def __init__(self, img: CowImage, copier: Copier) -> None:
        self.img = img
        self.copier = copier
        self.block = clone_block(copier.out_fd)
        self.cow_fd, self.backing_fd = img.fds
        self.base = img.header.data_offset
        self.backing_end = min(img.size, img.backing_size)
        self.backing_segments = Segments(self.backing_fd)
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
        copy = self.copier.copy
        for run in self.img.runs(start, end - start, holes=True):
            a, b = run.start, run.start + run.length
            if run.source == "backing":
                for x, y in edges.pieces(a, b) if edges.starts else ():
                    copy(self.backing_fd, x, x, y - x, self.img.backing_name)
            elif run.source == "cow":
                self._cow_run(a, b, cloned)
            elif cloned.intersects(a, b):
                self.copier.clear(a, b - a)
            if progress is not None:
                progress(run.length)
        _backing_still_covers(self.img, min(end, self.backing_end))
        return True

    def _cow_run(self, a: int, b: int, cloned: _Ranges) -> None:
        """A run of COW data: shared where block-aligned on both sides, copied at the edges."""
        block = self.block
        if a % block == 0 == b % block and self._clone(self.cow_fd, self.base + a, a, b - a):
            return  # the usual case: whole pages of a v3 file
        ca, cb = self._aligned(a, b)
        if ca < cb and self._clone(self.cow_fd, self.base + ca, ca, cb - ca):
            self._copy_cow(a, ca, cloned)
            self._copy_cow(cb, b, cloned)
        else:
            self._copy_cow(a, b, cloned)

    def _copy_cow(self, a: int, b: int, cloned: _Ranges) -> None:
        """Copy a COW range the usual way (zero blocks left as holes)."""
        if a >= b:
            return
        if cloned.intersects(a, b):
            self.copier.clear(a, b - a)  # unshare by deallocating, then write into the hole
        self.copier.copy(self.cow_fd, self.base + a, a, b - a, self.img.name)


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
        cow_bytes = img.cow_bytes()
        with AtomicFile(output, overwrite=overwrite, inputs=(os.fstat(cow_fd), backing_stat)) as out:
            try:
                allocated, shared = _write_disk(img, out.fd, sparse=sparse, reflink=reflink, progress=progress)
            except OSError as exc:
                raise io_error(output, exc, "cannot write the merged image") from None
            _backing_unchanged(img, backing_stat)
            out.commit()
    return MergeResult(
        output=out.path,
        size=img.size,
        cow_bytes=cow_bytes,
        backing_bytes=img.size - cow_bytes,
        hole_bytes=img.size - allocated,
        seconds=time.monotonic() - t0,
        shared_bytes=shared,
    )


def _write_disk(
    img: CowImage, out_fd: int, *, sparse: bool, reflink: bool, progress: Progress | None
) -> tuple[int, int]:
    """Write the disk into ``out_fd``, shared where the filesystem can (``reflink``), else copied; returns the
    bytes the output allocates and those of them shared with the inputs."""
    copier = Copier(out_fd, sparse, in_kernel=reflink)
    try:
        os.ftruncate(out_fd, img.size)
        if not sparse:
            os.posix_fallocate(out_fd, 0, img.size)
        pos = 0
        sharer = _Sharer(img, copier) if reflink and sparse else None
        while sharer is not None and pos < img.size:
            if not sharer.window(pos, min(img.size, pos + SHARE_WINDOW), progress):
                break
            pos = min(img.size, pos + SHARE_WINDOW)
        _copy_image(img, copier, start=pos, progress=progress)
        copier.finish()
    finally:
        copier.close()
    if sharer is not None and sharer.cloned:  # shared: neither a hole nor written
        allocated = sum(b - a for a, b, is_data in Segments(out_fd)(0, img.size) if is_data)
        return allocated, max(0, allocated - copier.written)
    return (img.size if not sparse else min(img.size, copier.written)), 0


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
        cow_bytes = img.cow_bytes()
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

"""``convert``: rewrite a COW file in another layout (v1/v2/broken v3 -> v3 by default).

The new file has the same header facts (backing path, mtime, size), the same
honoured set bits and the same data; it is written beside the target and
renamed into place. The source is only read. Mixed pages (4 KiB pages of the
disk with some bits set and some clear, which the Linux ubd driver misreads)
come out whole: their clear sectors are copied from the backing file (only
read, and only when it matches the header). Without a usable backing file
they are carried over as they are and counted in the result.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._atomic import AtomicFile, check_output_path
from ._io import copy_range, pwrite_all, read_at
from ._pagewrite import write_clear_sectors
from ._result import Result
from .backing import attach_backing, backing_stats
from .cowfile import CowFile
from .errors import BackingFileError, ImageIOError, UnrecordableWriteError, io_error
from .format import HOST_ORDER, PAGE_SECTORS, PAGE_SIZE, SECTOR_SIZE, CowHeader, Layout

__all__ = ["ConvertResult", "convert"]


@dataclass(frozen=True)
class ConvertResult(Result):
    """The converted file's layout and what was carried over.

    ``filled_pages`` mixed pages were made whole from the backing file;
    ``mixed_pages`` were carried over mixed because it could not be used
    (``backing_problem`` says why).
    """

    output: str
    layout: str
    source_layout: str
    sectors: int
    seconds: float
    filled_pages: int = 0
    mixed_pages: int = 0
    backing_problem: str | None = None


def _target_header(src: CowHeader, layout: Layout, alignment: int | None, name: str) -> CowHeader:
    if alignment is None:
        alignment = src.alignment if src.layout in ("v3", "v3-broken") else 4096
    target = CowHeader(
        layout=layout,
        backing_file_raw=src.backing_file_raw,
        mtime=src.mtime,
        size=src.size,
        sectorsize=src.sectorsize,
        alignment=alignment,
        # v1 fields are read in the host's order; keep a v1 source's own order
        byteorder=src.byteorder if src.layout == "v1" else HOST_ORDER,
    )
    target.validate(name)
    try:
        target.to_bytes()
    except ValueError as exc:
        raise ImageIOError(name, f"cannot convert to {layout}: {exc}") from None
    return target


def convert(
    cow_path: str | os.PathLike[str],
    output_path: str | os.PathLike[str],
    *,
    layout: Layout = "v3",
    alignment: int | None = None,
    backing: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    lock: bool = True,
    progress: Callable[[int], Any] | None = None,
) -> ConvertResult:
    """Write ``cow_path``'s content as a new COW file of ``layout`` at ``output_path``.

    ``backing`` names the backing file to fill mixed pages from (default: the
    recorded one); a named backing file that cannot be used is an error, a
    recorded one only leaves the mixed pages as they are.
    """
    t0 = time.monotonic()
    output = os.fspath(output_path)
    with CowFile(cow_path, lock=lock) as src:
        h = src.header
        target = _target_header(h, layout, alignment, output)
        sectors = src.bitmap.count()
        if sectors and target.mapped_sectors < h.mapped_sectors:
            beyond = src.bitmap.count(target.mapped_sectors, h.mapped_sectors)
            if beyond:
                raise UnrecordableWriteError(
                    output,
                    f"{beyond} written sectors at or past sector {target.mapped_sectors} have no bit in a {layout} "
                    "bitmap of this size (the v1/v2 rounding bug); choose v3",
                )
        mixed, _ = src.bitmap.count_mixed(limit=0)
        bfd, bpath, problem = _usable_backing(src, backing) if mixed else (-1, "", None)
        try:
            inputs = [("COW file", src.stat)] + [("backing file", st) for st in backing_stats(h, src.name, backing)]
            check_output_path(output, overwrite=overwrite, inputs=inputs)
            # the output holds the COW file's data, and the backing file's where it fills mixed pages
            sources = [src.stat] + ([os.fstat(bfd)] if bfd >= 0 else [])
            with AtomicFile(output, overwrite=overwrite, inputs=sources) as out:
                try:
                    pwrite_all(out.fd, [target.to_bytes()], 0)
                    os.ftruncate(out.fd, target.file_size)
                    _copy_data(src, target, out.fd, progress)
                    if bfd >= 0:
                        _fill_pages(src, bfd, bpath, target, out.fd)
                    _copy_bits(src, target, out.fd, whole=bfd >= 0)
                except OSError as exc:
                    raise io_error(output, exc, "cannot write") from None
                out.commit()
        finally:
            if bfd >= 0:
                os.close(bfd)
    filled = mixed if bfd >= 0 else 0
    seconds = time.monotonic() - t0
    return ConvertResult(out.path, layout, h.layout, sectors, seconds, filled, mixed - filled, problem)


def _usable_backing(src: CowFile, backing: str | os.PathLike[str] | None) -> tuple[int, str, str | None]:
    """The backing file opened read-only, and its path, if it matches the header; else ``(-1, "", why not)``.

    A backing file the caller named must be usable: its problems raise.
    """
    try:
        found = attach_backing(src.header, src.name, src.stat, backing, check=False)
    except BackingFileError as exc:
        if backing is not None:
            raise
        return -1, "", exc.message
    message = found.mismatch(src.header)
    if message is None:
        return found.fd, found.path, None
    found.close()
    if backing is not None:
        raise BackingFileError(backing, f"{message}: it cannot be used to fill the mixed pages")
    return -1, "", f"{message} {found.path}"


def _copy_data(src: CowFile, target: CowHeader, out_fd: int, progress: Callable[[int], Any] | None) -> None:
    """Copy the data of set sectors before any bit is written (holes, and set bits past the end of the
    file, stay holes)."""
    for run in src.runs(holes=True):
        if run.source == "cow":
            copy_range(src.fd, run.offset, out_fd, target.data_offset + run.start, run.length)
        if progress is not None:
            progress(run.length)


def _fill_pages(src: CowFile, backing_fd: int, backing_path: str, target: CowHeader, out_fd: int) -> None:
    """Copy the clear sectors of every mixed page from the backing file into the target's data area."""
    size = src.header.size
    buf = memoryview(bytearray(PAGE_SIZE))
    for pages, _ in src.bitmap.mixed():
        for page in pages.tolist():
            lo = page * PAGE_SECTORS
            hi = min(lo + PAGE_SECTORS, src.bitmap.nbits)
            start = lo * SECTOR_SIZE
            n = min(hi * SECTOR_SIZE, size) - start
            got = read_at(backing_fd, buf[:n], start, backing_path)
            buf[got:n] = bytes(n - got)
            write_clear_sectors(out_fd, buf[:n], src.bitmap.bits(lo, hi).tolist(), target.data_offset + start)


def _copy_bits(src: CowFile, target: CowHeader, out_fd: int, *, whole: bool) -> None:
    """Write the honoured bits into the target's bitmap, a window at a time; ``whole`` sets every page
    that has any bit set (its data was filled)."""
    for buf, first_bit, lo, hi in src.bitmap.windows(0, src.bitmap.nbits):
        # windows start on byte boundaries, so bytes copy as they are (the last one masked)
        a = (lo - first_bit) // 8
        b = (hi - first_bit + 7) // 8
        chunk = np.frombuffer(buf, dtype=np.uint8, count=b - a, offset=a).copy()
        mask = (1 << (hi % 8)) - 1 if hi % 8 else 0xFF
        chunk[-1] &= mask
        if whole:
            chunk[chunk != 0] = 0xFF
            chunk[-1] &= mask
        if chunk.any():
            pwrite_all(out_fd, [chunk.tobytes()], target.bitmap_offset + lo // 8)

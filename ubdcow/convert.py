"""``convert``: rewrite a COW file in another layout (v1/v2/broken v3 -> v3 by default).

The new file has the same header facts (backing path, mtime, size), the same
honoured set bits and the same data; it is written beside the target and
renamed into place. The source is only read and the backing file not at all.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ._atomic import AtomicFile, check_output_path
from ._io import Segments, copy_range, pwrite_all
from ._result import Result
from .errors import ImageIOError, UnrecordableWriteError
from .format import HOST_ORDER, SECTOR_SIZE, CowHeader, Layout
from .image import CowFile, backing_stats

__all__ = ["ConvertResult", "convert"]


@dataclass(frozen=True)
class ConvertResult(Result):
    """The converted file's layout and what was carried over."""

    output: str
    layout: str
    source_layout: str
    sectors: int
    seconds: float


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
    overwrite: bool = False,
    lock: bool = True,
    progress: Callable[[int], Any] | None = None,
) -> ConvertResult:
    """Write ``cow_path``'s content as a new COW file of ``layout`` at ``output_path``."""
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
        inputs = [("COW file", src.stat)] + [("backing file", st) for st in backing_stats(h, src.name)]
        check_output_path(output, overwrite=overwrite, inputs=inputs)
        with AtomicFile(output, overwrite=overwrite) as out:
            try:
                pwrite_all(out.fd, [target.to_bytes()], 0)
                os.ftruncate(out.fd, target.file_size)
                _copy_data(src, target, out.fd, progress)
                _copy_bits(src, target, out.fd)
            except OSError as exc:
                raise ImageIOError(output, f"cannot write: {exc.strerror}", errno=exc.errno) from None
            out.commit()
    return ConvertResult(out.path, layout, h.layout, sectors, time.monotonic() - t0)


def _copy_data(src: CowFile, target: CowHeader, out_fd: int, progress: Callable[[int], Any] | None) -> None:
    """Copy the data of set sectors (holes stay holes), before any bit is written."""
    base = src.header.data_offset
    segments = Segments(src.fd)
    for start, length, source in src.extents():
        if source == "cow":
            end = min(base + start + length, base + src.header.sectors * SECTOR_SIZE)
            for a, b, is_data in segments(base + start, end):
                if is_data:
                    b = min(b, src.length)
                    if b > a:
                        copy_range(src.fd, a, out_fd, target.data_offset + (a - base), b - a)
        if progress is not None:
            progress(length)


def _copy_bits(src: CowFile, target: CowHeader, out_fd: int) -> None:
    """Write the honoured bits into the target's bitmap, a window at a time."""
    for buf, first_bit, lo, hi in src.bitmap.windows(0, src.bitmap.nbits):
        # windows start on byte boundaries, so bytes copy as they are (the last one masked)
        a = (lo - first_bit) // 8
        b = (hi - first_bit + 7) // 8
        chunk = bytearray(buf[a:b])
        if hi % 8:
            chunk[-1] &= (1 << (hi % 8)) - 1
        if chunk.count(0) != len(chunk):
            pwrite_all(out_fd, [bytes(chunk)], target.bitmap_offset + lo // 8)

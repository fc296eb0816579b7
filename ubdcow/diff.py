"""``diff``: thin a full copy back into an overlay on its original.

Creates a v3 COW file on BASE holding exactly the 4 KiB pages where MODIFIED
differs from BASE (like ``qemu-img convert -B``), each page whole: a page
that differs anywhere is stored with all its sectors, because the Linux ubd
driver misreads pages that mix COW and backing sectors. Differing pages that
are all zeros are stored as holes with their bits set.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._atomic import AtomicFile, check_output_path
from ._io import file_size, open_file, pwrite_all, read_at
from ._result import Result
from .bitmap import PAGE_SECTORS, PAGE_SIZE
from .create import backing_record
from .disk import Disk, open_disk
from .errors import BackingFileError, ImageIOError, io_error
from .format import SECTOR_SIZE, has_cow_magic, make_header

__all__ = ["DiffResult", "diff"]

WINDOW = 4 << 20  # a multiple of the page size, so each window's bits are whole bitmap bytes


@dataclass(frozen=True)
class DiffResult(Result):
    """The new overlay and what it holds: ``sectors`` set bits (whole pages), ``zero_sectors`` of them holes."""

    output: str
    size: int
    sectors: int
    zero_sectors: int
    seconds: float
    #: pages stored (each differs from BASE somewhere)
    pages: int = 0


def diff(
    base_path: str | os.PathLike[str],
    modified_path: str | os.PathLike[str],
    output_path: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    progress: Callable[[int], Any] | None = None,
    lock: bool = True,
    modified_backing: str | os.PathLike[str] | None = None,
) -> DiffResult:
    """Write a v3 COW file on ``base_path`` whose virtual disk equals ``modified_path``.

    ``modified_path`` may itself be a COW file (its virtual disk is read; ``modified_backing`` overrides the
    backing file it records).
    """
    import time

    t0 = time.monotonic()
    base_path, output = os.fspath(base_path), os.fspath(output_path)
    bfd, bst = open_file(base_path, os.O_RDONLY, what="base image", error=BackingFileError)
    try:
        if has_cow_magic(os.pread(bfd, 4, 0)):
            raise BackingFileError(
                base_path, "BASE is a COW file; it must be a raw image (it becomes the backing file)"
            )
        size = file_size(bfd, bst)
        with open_disk(modified_path, backing=modified_backing, lock=lock) as modified:
            if modified.size != size:
                raise ImageIOError(modified.path, f"size {modified.size} differs from BASE's {size}: sizes must match")
            inputs = {"base image": bst, **{f"modified image's {k}": v for k, v in modified.files.items()}}
            check_output_path(output, overwrite=overwrite, inputs=inputs)
            try:
                header = make_header("v3", *backing_record(base_path, bst), size)
            except ValueError as exc:
                raise BackingFileError(base_path, f"cannot record it as a backing file: {exc}") from None
            with AtomicFile(output, overwrite=overwrite, inputs=inputs) as out:
                try:
                    pwrite_all(out.fd, [header.to_bytes()], 0)
                    os.ftruncate(out.fd, header.file_size)
                    sectors, zeros, pages = _write_differences(
                        bfd,
                        base_path,
                        modified,
                        out.fd,
                        header.bitmap_offset,
                        header.data_offset,
                        size,
                        progress,
                    )
                except OSError as exc:
                    raise io_error(output, exc, "cannot write") from None
                out.commit()
    finally:
        os.close(bfd)
    return DiffResult(out.path, size, sectors, zeros, time.monotonic() - t0, pages)


def _write_differences(
    base_fd: int,
    base_path: str,
    modified: Disk,
    out_fd: int,
    bitmap_offset: int,
    data_offset: int,
    size: int,
    progress: Callable[[int], Any] | None,
) -> tuple[int, int, int]:
    """Store the differing pages (data, then their bits); returns (sectors, zero sectors, pages)."""
    base_buf, mod_buf = bytearray(WINDOW), bytearray(WINDOW)
    sectors = zeros = pages = 0
    total_sectors = -(-size // SECTOR_SIZE)
    pos = 0
    while pos < size:
        n = min(WINDOW, size - pos)
        padded = -(-n // PAGE_SIZE) * PAGE_SIZE
        base_view, mod_view = memoryview(base_buf)[:padded], memoryview(mod_buf)[:padded]
        got = read_at(base_fd, base_view[:n], pos, base_path)
        if got < n:
            raise ImageIOError(base_path, f"file ended at offset {pos + got} while reading it")
        got = modified.preadinto(mod_view[:n], pos)
        if got < n:
            raise ImageIOError(modified.path, f"file ended at offset {pos + got} while reading it")
        base_view[n:] = bytes(padded - n)  # the bytes of a partial last page past the disk's end
        mod_view[n:] = bytes(padded - n)
        if base_view != mod_view:
            a = np.frombuffer(base_view, dtype=np.uint8).reshape(-1, PAGE_SIZE)
            b = np.frombuffer(mod_view, dtype=np.uint8).reshape(-1, PAGE_SIZE)
            differs = (a != b).any(axis=1)
            data = differs & b.any(axis=1)
            first_sector = pos // SECTOR_SIZE
            edges = np.flatnonzero(np.diff(np.concatenate(([0], data.view(np.int8), [0]))))
            for s, e in zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True):
                start, stop = s * PAGE_SIZE, min(n, e * PAGE_SIZE)
                pwrite_all(out_fd, [mod_view[start:stop]], data_offset + pos + start)
            # a page's bits are one bitmap byte; the disk's last page keeps only its own sectors
            bits = np.where(differs, np.uint8(0xFF), np.uint8(0))
            window_sectors = min(len(bits) * PAGE_SECTORS, total_sectors - first_sector)
            if window_sectors % PAGE_SECTORS:
                bits[-1] &= (1 << (window_sectors % PAGE_SECTORS)) - 1
            pwrite_all(out_fd, [bits.tobytes()], bitmap_offset + first_sector // 8)  # after the data
            sectors += _count(bits)
            zeros += _count(np.where(data, np.uint8(0), bits))
            pages += int(differs.sum())
        pos += n
        if progress is not None:
            progress(n)
    return sectors, zeros, pages


def _count(bits: np.ndarray) -> int:
    """Set bits in an array of bitmap bytes."""
    return int(np.unpackbits(bits).sum(dtype=np.int64))
